"""Flags declared once: the option types every command shares, the exp commands' common flags, list parsing.

The exp commands take the same ~20 flags (model, dtypes, hardware, where to run, what to print);
``ExperimentFlags`` declares them once as a dataclass whose fields are Typer options, and
``experiment_command`` adds them to a command's own flags, so an experiment (kvray/experiments/) declares only
its workload's.
Nothing here imports rich, pandas, torch or ray: this module is read on every ``kvray`` start.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvray.errors import KvrayInputError

# Declared beside the experiments, whose commands take them too; bench's flags of the same names.
from kvray.experiments.options import ApiKeyEnvOpt as ApiKeyEnvOpt
from kvray.experiments.options import BackendsOpt as BackendsOpt
from kvray.experiments.options import BaseUrlOpt as BaseUrlOpt
from kvray.experiments.options import GenDistOpt as GenDistOpt
from kvray.experiments.options import GenOpt as GenOpt
from kvray.experiments.options import HostOpt as HostOpt
from kvray.experiments.options import LimitOpt as LimitOpt
from kvray.experiments.options import PromptDistOpt as PromptDistOpt
from kvray.experiments.options import PromptToksOpt as PromptToksOpt
from kvray.experiments.options import SeedOpt as SeedOpt
from kvray.experiments.options import ServerFlags as ServerFlags
from kvray.experiments.options import SloOpt as SloOpt
from kvray.experiments.options import SpeedupOpt as SpeedupOpt
from kvray.experiments.options import TraceFileOpt as TraceFileOpt
from kvray.experiments.options import TraceFormatOpt as TraceFormatOpt
from kvray.experiments.options import VllmPythonOpt as VllmPythonOpt

if TYPE_CHECKING:
    from kvray.launch.submit import RunSettings
    from kvray.plan.experiments import Common

# --- option types shared by several commands ----------------------------------------------------------

ModelArg = Annotated[str, typer.Argument(help="HF id, bundled id or local directory with config.json")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="HF id, bundled id or local directory")]
# Where a command names one model: -m/--model as bench and the exp commands take it, or the positional MODEL
# that info/check/predict always took (kept so scripts keep working); ``one_model`` reads the pair.
ModelPositional = Annotated[
    str | None,
    typer.Argument(metavar="MODEL", help="the model, as -m/--model (either one)", show_default=False),
]
ModelNamedOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="HF id, bundled id or local directory with config.json")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32 | fp16 | bf16 (| fp8 for KV figures)")]
KvDtypeOpt = Annotated[str | None, typer.Option("--kv-dtype", help="KV dtype if not --dtype")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]
TpOpt = Annotated[int, typer.Option("--tp", help="tensor parallel degree: GPUs one model is split over (1)")]
WeightsOpt = Annotated[str, typer.Option("--weights", help="random (no download) | pretrained")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
OptionOpt = Annotated[list[str] | None, typer.Option("--option", help="backend option KEY=VALUE (repeatable)")]
NoPlotsOpt = Annotated[bool, typer.Option("--no-plots", help="skip the figures and report at the end")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="unmeasured runs of each cell first")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", help="measured runs of each cell")]
NoCheckOomOpt = Annotated[bool, typer.Option("--no-check-oom", help="run cells even when OOM risk is high")]
# A job's results folder (run, launch): a local folder or object storage.
JobOutputOpt = Annotated[
    str | None,
    typer.Option("--output", help="results folder or s3://bucket/prefix, gs://… (default results/<job name>)"),
]


def output_option(help: str, *, metavar: str | None = None) -> Any:
    """``--output`` of a command that writes what ``help`` says; ``--out``, its old spelling, still parses
    (OLD_SPELLINGS: not listed in help)."""
    return typer.Option("--output", "--out", help=help, metavar=metavar)


ResultsDirArg = Annotated[
    str,
    typer.Argument(help="a results folder (cells.jsonl from kvray run / exp / bench) or s3://bucket/prefix, gs://…"),
]


def parse_option_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``--option KEY=VALUE`` values as backend options, sorted by key, None dropped; a value is read as JSON
    when it parses (numbers, true, null), else kept as text."""
    from kvray.spec import make_options

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KvrayInputError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return dict(make_options(**options))


def one_model(positional: str | None, named: str | None) -> str:
    """The model of a command taking ``MODEL`` or ``-m/--model``: either, or both when they agree."""
    if positional is not None and named is not None and positional != named:
        raise KvrayInputError(f"two models given: MODEL {positional!r} and -m/--model {named!r}; give one")
    model = named if named is not None else positional
    if model is None:
        raise KvrayInputError("name a model: -m/--model MODEL (an HF id, a bundled id or a local directory)")
    return model


def comma_ints(flag: str, text: str) -> list[int]:
    """``128,128,4096`` → [128, 128, 4096]; anything else is one line naming ``flag``."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvrayInputError(f"{flag} expects comma-separated prompt lengths, got {text!r}") from None


def split_values(values: Sequence[str] | None) -> list[str]:
    """A list flag's values with commas split too: ``["hf,sim", "vllm"]`` → ["hf", "sim", "vllm"]."""
    return [v for item in values or [] for v in item.split(",") if v]


# --- list flags: `--concurrency 1 2 4 8`, as the seed's argparse CLI took them ---------------------------


def expand_space_lists(command: Any, args: list[str]) -> list[str]:
    """Let each multiple-value option of ``command`` take every value after one flag, as the seed's
    ``--concurrency 1 2 4 8`` does: rewritten to ``--concurrency 1 --concurrency 2 …`` for click, which also
    keeps repeated flags working. Commas split values too (``--concurrency 1,2,4``)."""
    names = {o for p in command.params if getattr(p, "multiple", False) for o in getattr(p, "opts", [])}
    out: list[str] = []
    flag: str | None = None  # the list option whose values are being read
    given = 0  # values seen for it
    taken: list[str] = []  # … and their tokens
    for tok in [*args, None]:
        if (
            flag is not None
            and tok is not None
            and (not tok.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", tok))
            and _fits(taken, tok)
        ):
            out += [x for value in tok.split(",") if value for x in (flag, value)]
            taken.append(tok)
            given += 1
            continue
        if flag is not None and not given:
            out.append(flag)  # a list flag without a value: click reports it
        flag, given, taken = None, 0, []
        if tok is None:
            break
        name, eq, value = tok.partition("=")
        if name in names and tok != "--":
            flag = name
            if eq:
                out += [x for v in value.split(",") if v for x in (flag, v)]
                given, taken = 1, [value]
            continue
        out.append(tok)
    return out


NUMBERS = re.compile(r"-?\d+(\.\d+)?(,-?\d+(\.\d+)?)*,?")


def _fits(taken: list[str], token: str) -> bool:
    """Whether ``token`` continues a list flag whose values so far are ``taken``: a list that began with a number
    ends at the first token that is not one (``--concurrency 1 2 MODEL`` leaves MODEL to the positional); a
    list of words takes every token up to the next flag."""
    return not taken or not NUMBERS.fullmatch(taken[0]) or bool(NUMBERS.fullmatch(token))


# Old spellings of renamed flags: they still parse, so scripts keep working, but help lists only the new name.
OLD_SPELLINGS = frozenset({"--out"})


class Command(typer.core.TyperCommand):
    """A kvray command: its help lists each option by its current names only (not OLD_SPELLINGS)."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        rows: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            shown = copy.copy(param)
            shown.opts = [o for o in param.opts if o not in OLD_SPELLINGS] or param.opts
            record = shown.get_help_record(ctx)
            if record is not None and param.param_type_name in rows:
                rows[param.param_type_name].append(record)
        for title, kind in (("Arguments", "argument"), ("Options", "option")):
            if rows[kind]:
                with formatter.section(title):
                    formatter.write_dl(rows[kind])


class SpaceListCommand(Command):
    """A command whose multiple-value options take space-separated values after one flag."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_space_lists(self, list(args)))


@dataclass(frozen=True)
class LoadFlags:
    """``kvray bench``'s serving load instead of one burst: a closed loop of users or an open loop at a rate
    (kvray/plan/loads.py), how long it sends and which of its requests are measured."""

    load: Annotated[
        str | None, typer.Option("--load", help="burst | closed (--users N) | poisson | gamma | constant")
    ] = None
    users: Annotated[
        int | None, typer.Option("--users", help="a closed loop of N users, each sending its next request at once")
    ] = None
    rate: Annotated[str | None, typer.Option("--rate", help="requests/s of an open loop, or auto (search)")] = None
    requests: Annotated[int | None, typer.Option("--requests", help="requests a load sends")] = None
    duration_s: Annotated[float | None, typer.Option("--duration-s", help="stop sending after this")] = None
    seed: SeedOpt = 0
    warmup_s: Annotated[
        float | None,
        typer.Option("--warmup-s", help="a load's ramp-up: requests sent in its first S s are not measured"),
    ] = None
    cooldown_s: Annotated[
        float | None, typer.Option("--cooldown-s", help="a load's tail: requests sent in its last S s are not measured")
    ] = None

    def load_and_concurrency(self, concurrency: int) -> tuple[dict[str, Any] | None, int]:
        """The load as ``bench_cell`` takes it (None: a burst) and the cell's concurrency. ``--users N`` is a
        closed loop of N users (``--load closed`` implied) whose concurrency is N; the ``--load closed -c N`` of
        older scripts means the same."""
        from kvray.plan.loads import parse_load_flags

        kind, users = self.load, self.users
        if users is not None:
            if kind not in (None, "closed"):
                raise KvrayInputError(
                    f"--users makes a closed loop; --load {kind} is not one (use -c for its concurrency)"
                )
            if concurrency not in (1, users):
                raise KvrayInputError(
                    f"--users {users} and -c {concurrency}: a closed loop's users are its concurrency, give one"
                )
            kind, concurrency = "closed", users
        trims = {"warmup_s": self.warmup_s, "cooldown_s": self.cooldown_s}
        return parse_load_flags(kind, self.rate, self.requests, self.duration_s, self.seed, **trims), concurrency


@dataclass(frozen=True)
class TraceFlags:
    """A trace to replay (``kvray bench``) or plan for (``kvray plan``), and how to cut it: the first N requests,
    its arrivals sped up S times."""

    trace: TraceFileOpt = None
    trace_format: TraceFormatOpt = None
    limit: LimitOpt = None
    speedup: SpeedupOpt = None

    def replay_options(self) -> dict[str, Any] | None:
        """The trace's checked replay options (kvray/plan/replay.py), None without ``--trace``; the flags that cut
        a trace without one are an input error."""
        if self.trace is None:
            if self.trace_format is not None or self.speedup is not None or self.limit is not None:
                raise KvrayInputError("--trace-format, --speedup and --limit replay a trace: they need --trace FILE")
            return None
        from kvray.plan.replay import check_trace_key

        raw = {"path": self.trace, "format": self.trace_format, "speedup": self.speedup, "limit": self.limit}
        return check_trace_key({k: v for k, v in raw.items() if v is not None}, "--trace")


# --- the exp commands' shared flags ---------------------------------------------------------------------

HardwareOpt = Annotated[
    list[str] | None,
    typer.Option("--hardware", help="any (default) | each (every GPU type in the cluster) | GPU types: H100 A100"),
]
OutputOpt = Annotated[
    str | None,
    typer.Option("--output", help="results folder or s3://bucket/prefix, gs://… (default results/<exp>-<model>)"),
]
OutputDirAliasOpt = Annotated[str | None, typer.Option("--output-dir", hidden=True, help="the old name of --output")]
AddressOpt = Annotated[
    str,
    typer.Option(
        "--address",
        help="where the cells run: local (start Ray here, default) | auto (join this machine's Ray) | ray://HOST:PORT "
        "| inprocess (no Ray: one cell after another in this process) | http://HOST:8265 (a remote cluster's Jobs "
        "API: the dataset comes home)",
    ),
]
ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="Ray cluster-launcher file: run there (kvray launch), fetch the data")
]


@dataclass(frozen=True)
class ExperimentFlags:
    """Every flag the exp commands share, declared once: each field is the Typer option it is parsed from.

    ``experiment_command`` puts these options on a command (``--model`` first, then the command's own,
    then the rest in this order) and hands the command one ExperimentFlags."""

    model: ModelOpt = "facebook/opt-1.3b"
    dtype: DtypeOpt = "bf16"
    kv_dtype: KvDtypeOpt = None
    weights: WeightsOpt = "random"
    hardware: HardwareOpt = None
    device: DeviceOpt = "auto"
    tp: Annotated[
        list[int] | None, typer.Option("--tp", help="tensor parallel degrees: --tp 1 2 4 8 (GPUs per model)")
    ] = None
    warmup: WarmupOpt = 1
    repeats: RepeatsOpt = 3
    option: OptionOpt = None
    output: OutputOpt = None
    output_dir: OutputDirAliasOpt = None  # hidden: --output's name before issue 26
    address: AddressOpt = "local"
    cluster: ClusterOpt = None
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the cells and their predicted memory; run nothing")
    ] = False
    as_json: JsonOpt = False
    no_plots: NoPlotsOpt = False
    no_check_oom: NoCheckOomOpt = False
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what each stage does")] = False
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="live progress table")] = True

    def common(
        self,
        backends: Sequence[str] | None,
        default_backends: Sequence[str] = ("hf",),
        extra_options: Sequence[str] = (),
    ) -> Common:
        """What every experiment's job is built from: these flags, the command's backends and any options
        its own flags add (exp4's server flags)."""
        from kvray.plan.experiments import Common, hardware_arg

        return Common(
            model=self.model,
            backends=split_values(backends) or list(default_backends),
            dtype=self.dtype,
            kv_dtype=self.kv_dtype,
            weights=self.weights,
            device=self.device,
            hardware=hardware_arg(self.hardware),
            warmup=self.warmup,
            repeats=self.repeats,
            options=parse_option_pairs([*(self.option or []), *extra_options]),
            tensor_parallel=sorted(set(self.tp or [1])),
        )

    @property
    def output_folder(self) -> str | None:
        """``--output`` (or its old name ``--output-dir``); both, naming two folders, is an input error."""
        if self.output and self.output_dir and self.output != self.output_dir:
            raise KvrayInputError(f"--output {self.output} and --output-dir {self.output_dir}: give one folder")
        return self.output or self.output_dir

    def run_settings(self) -> RunSettings:
        """Where the job runs and where its dataset goes."""
        from kvray.launch.submit import RunSettings

        return RunSettings(
            output_dir=self.output_folder,
            address=self.address,
            cluster=self.cluster,
            check_oom=not self.no_check_oom,
            progress=self.progress,
        )


def _group_options(group: type, defaults: Any = None) -> list[inspect.Parameter]:
    """A flag group's fields (a dataclass whose fields are Typer options) as keyword parameters, with the values
    of ``defaults`` (an instance: a command's own defaults) or else the fields' as their defaults."""
    hints = typing.get_type_hints(group, include_extras=True)
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(f.name, keyword, default=getattr(defaults, f.name, f.default), annotation=hints[f.name])
        for f in fields(group)
    ]


def _as_command(
    func: Callable[..., Any], params: list[inspect.Parameter], groups: dict[str, type]
) -> Callable[..., Any]:
    """``func`` as a Typer command over ``params``: the options of each flag group ``groups`` (parameter name →
    dataclass) are gathered back into one instance of it, passed as that parameter."""
    names = {name: [f.name for f in fields(group)] for name, group in groups.items()}
    if len(clash := [p.name for p in params]) != len(set(clash)):
        raise TypeError(f"{func.__name__} declares a flag twice: {sorted(n for n in clash if clash.count(n) > 1)}")

    @functools.wraps(func)
    def command(**kwargs: Any) -> Any:
        for name, group in groups.items():
            kwargs[name] = group(**{field: kwargs.pop(field) for field in names[name]})
        return func(**kwargs)

    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _expand_groups(params: list[inspect.Parameter]) -> tuple[list[inspect.Parameter], dict[str, type]]:
    """Each parameter typed as a flag group — a dataclass whose fields are Typer options (``ServerFlags``) —
    replaced by the group's options, in its place, its default instance giving theirs."""
    out: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for p in params:
        if isinstance(p.annotation, type) and dataclasses.is_dataclass(p.annotation):
            groups[p.name] = p.annotation
            out += _group_options(p.annotation, p.default if isinstance(p.default, p.annotation) else None)
        else:
            out.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    return out, groups


def flag_groups(func: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose parameters may be flag groups (``servers: ServerFlags``): each stands for its options."""
    params, groups = _expand_groups(list(inspect.signature(func, eval_str=True).parameters.values()))
    return _as_command(func, params, groups)


def experiment_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func(flags: ExperimentFlags, **own_options)`` as a Typer command taking ExperimentFlags' options
    beside its own (flag groups among them expanded): Typer reads the returned function's signature."""
    shared = _group_options(ExperimentFlags)
    own, groups = _expand_groups(list(inspect.signature(func, eval_str=True).parameters.values())[1:])
    if clash := {p.name for p in own} & {p.name for p in shared}:
        raise TypeError(f"{func.__name__} redeclares shared experiment flags: {', '.join(sorted(clash))}")
    params = [shared[0], *own, *shared[1:]]  # --model leads, as it always has

    def with_flags(**kwargs: Any) -> Any:
        flags = ExperimentFlags(**{p.name: kwargs.pop(p.name) for p in shared})
        return func(flags, **kwargs)

    return _as_command(functools.wraps(func)(with_flags), params, groups)
