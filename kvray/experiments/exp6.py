"""exp6 — KV reuse and pressure: shared prefixes of several lengths, multi-turn chats, and a KV-pressure sweep on a
small pool that makes the engine preempt. Prefix-cache hit rate predicted (kvray/sim/reuse.py) vs measured, TTFT
vs shared fraction, per-turn hits, the pool's fill point (docs/kv_reuse.md; figures: kvray/figures/reuse.py).
Its workloads are built by the planner from the job file's keys (kvray/plan/reuse.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvray.errors import KvrayInputError
from kvray.experiments.base import Experiment, Flags, Page
from kvray.experiments.options import BackendsOpt, GenOpt, ServerFlags, TurnFlags, VllmPythonOpt
from kvray.experiments.sections import every_cell_blocks

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.document import Block
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job

REUSE_KEYS = ("prefix_cache_hit_rate", "prefix_cache_hit_rate_predicted", "kv_not_recomputed_bytes", "preemptions")


def exp6_grid(
    shared_prefix_toks: list[int],
    total_prompt_toks: int,
    concurrency: int,
    gen_toks: int,
    conversations: int,
    turns: int,
    user_toks: int,
    turn_gen_toks: int,
    pressure_concurrency: list[int],
    pressure_prompt_toks: int,
    pressure_gen_toks: int,
) -> list[dict[str, Any]]:
    """exp6's grid blocks, in the job file's own keys (``workload: shared_prefix`` / ``multi_turn``):

    - the same total prompt with a shared prefix of each of ``shared_prefix_toks`` (and 0: a uniform block), so
      TTFT and hit rate can be drawn against the shared fraction;
    - ``conversations`` × ``turns`` multi-turn chats;
    - a KV-pressure sweep: ``pressure_concurrency`` requests of ``pressure_prompt_toks`` + ``pressure_gen_toks``
      (long outputs grow the running set's KV until a small pool fills and the engine preempts).
    """
    from kvray.plan.experiments import positive

    for flag, value in (
        ("--prompt-toks", total_prompt_toks),
        ("--concurrency", concurrency),
        ("--gen-toks", gen_toks),
        ("--conversations", conversations),
        ("--turns", turns),
        ("--user-toks", user_toks),
        ("--turn-gen-toks", turn_gen_toks),
        ("--pressure-prompt-toks", pressure_prompt_toks),
        ("--pressure-gen-toks", pressure_gen_toks),
    ):
        positive(flag, [value])
    if pressure_concurrency:
        positive("--pressure-concurrency", list(pressure_concurrency))
    bad = [p for p in shared_prefix_toks if not 0 < p < total_prompt_toks]
    if bad:
        raise KvrayInputError(
            f"--prefix-toks must be within 1..{total_prompt_toks - 1} (the total prompt), got {bad[0]}"
        )
    blocks: list[dict[str, Any]] = [
        {"prompt_toks": [total_prompt_toks], "gen_toks": [gen_toks], "concurrency": [concurrency]}
    ]
    blocks += [
        {
            "workload": "shared_prefix",
            "prefix_toks": [p],
            "suffix_toks": [total_prompt_toks - p],
            "groups": [1],
            "gen_toks": [gen_toks],
            "concurrency": [concurrency],
        }
        for p in sorted(set(shared_prefix_toks))
    ]
    blocks.append(
        {
            "workload": "multi_turn",
            "conversations": [conversations],
            "turns": [turns],
            "user_toks": [user_toks],
            "gen_toks": [turn_gen_toks],
        }
    )
    if pressure_concurrency:
        blocks.append(
            {
                "prompt_toks": [pressure_prompt_toks],
                "gen_toks": [pressure_gen_toks],
                "concurrency": sorted(set(pressure_concurrency)),
            }
        )
    return blocks


def exp6_job(common: Common, grid: list[dict[str, Any]]) -> Job:
    """exp6 as a Job, parsed from the job-file mapping so it means exactly what jobs/exp6_kv_reuse.yaml means."""
    from kvray.plan.experiments import job_from_grid_blocks

    return job_from_grid_blocks("exp6", common, grid)


@dataclass(frozen=True)
class SharedPrefixFlags:
    """exp6's shared-prefix cells: the prefixes swept, each cell's whole prompt and how many requests share it."""

    prefix_toks: Annotated[
        list[int] | None, typer.Option("--prefix-toks", help="shared prefixes: 128 256 384 512 (default)")
    ] = None
    prompt_toks: Annotated[int, typer.Option("--prompt-toks", help="prompt tokens of each shared-prefix cell")] = 544
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="requests per shared-prefix cell")] = 16


@dataclass(frozen=True)
class PressureFlags:
    """The KV-pressure cells: a small pool that long outputs overrun (preemptions)."""

    pressure_concurrency: Annotated[
        list[int] | None, typer.Option("--pressure-concurrency", help="KV-pressure cells: 4 8 16 (default)")
    ] = None
    pressure_gen_toks: Annotated[
        int, typer.Option("--pressure-gen-toks", help="output tokens of a pressure request")
    ] = 400
    kv_pool_mib: Annotated[int, typer.Option("--kv-pool-mib", help="KV pool of vllm / hf-paged (small: pressure)")] = 24


def build(
    flags: Flags,
    backends: BackendsOpt = ["vllm", "hf-paged"],  # noqa: B006 - typer reads a list default, never mutates it
    shared: SharedPrefixFlags = SharedPrefixFlags(),
    gen_toks: GenOpt = 16,
    conversations: Annotated[int, typer.Option("--conversations", help="multi-turn chats, interleaved")] = 4,
    chat: TurnFlags = TurnFlags(turns=6, user_toks=100, turn_gen_toks=30),
    pressure: PressureFlags = PressureFlags(),
    vllm_python: VllmPythonOpt = None,
) -> tuple[Job, list[str]]:
    """Exp6, KV reuse and pressure: shared prefixes, multi-turn chats and a small pool that preempts — hit rate
    predicted vs measured, TTFT vs shared fraction, per-turn hits, the fill point (docs/kv_reuse.md)."""
    if pressure.kv_pool_mib < 1:
        raise KvrayInputError(f"--kv-pool-mib must be >= 1, got {pressure.kv_pool_mib}")
    server_flags = [
        *ServerFlags(vllm_python=vllm_python).option_pairs(),
        f"kv_cache_memory_bytes={pressure.kv_pool_mib * 2**20}",
    ]
    common = flags.common(backends, default_backends=("vllm", "hf-paged"), extra_options=server_flags)
    grid = exp6_grid(
        shared.prefix_toks or [128, 256, 384, 512],
        shared.prompt_toks,
        shared.concurrency,
        gen_toks,
        conversations,
        chat.turns,
        chat.user_toks,
        chat.turn_gen_toks,
        [4, 8, 16] if pressure.pressure_concurrency is None else pressure.pressure_concurrency,
        32,
        pressure.pressure_gen_toks,
    )
    return exp6_job(common, grid), []


def draw(dataset: Dataset, out_dir: Path) -> list[Any]:
    """The exp6 figures when the folder holds exp6 / reuse cells, else none (no "missing data" figures)."""
    from kvray.figures.reuse import has_reuse_data, reuse_figures

    return reuse_figures(dataset, out_dir) if has_reuse_data(dataset.records) else []


def section(exp: Experiment, page: Page) -> list[Block]:
    """Each reuse cell's prefix-cache hit rate and saved KV, measured beside predicted, its preemptions and fill
    point, the cells that failed and why, then the exp6 figures and cells; none without reuse data."""
    from kvray.analysis.reuse import kv_memory_saved
    from kvray.analysis.views import as_number
    from kvray.document import Block
    from kvray.document.blocks import fmt_bytes, fmt_num
    from kvray.figures.reuse import has_reuse_data

    records = page.dataset.records
    if not has_reuse_data(records):
        return []
    blocks = [Block("h2", exp.title)]
    rows = []
    saved = kv_memory_saved(records)
    for r in records:
        m = r.get("memory") or {}
        if not any(m.get(k) is not None for k in REUSE_KEYS) and r["cell"].get("experiment") != "exp6":
            continue
        wl = r["cell"]["workload"]
        rows.append(
            [
                r["cell_id"],
                r["cell"]["backend"],
                str(wl.get("kind")),
                str(len(wl["requests"])),
                r["status"],
                *(
                    f"{float(m[k]):.1%}" if as_number(m.get(k)) is not None else "—"
                    for k in ("prefix_cache_hit_rate", "prefix_cache_hit_rate_predicted")
                ),
                fmt_bytes(m.get("kv_not_recomputed_bytes")),
                fmt_bytes(m.get("kv_not_recomputed_bytes_predicted")),
                fmt_bytes(saved.get(r["cell_id"])),
                fmt_num((r.get("metrics") or {}).get("preemptions"), 0),
                fmt_num(m.get("pool_full_at_s"), 2),
                fmt_num(m.get("kv_fill_concurrency_predicted"), 0),
            ]
        )
    blocks.append(
        Block(
            "table",
            headers=[
                "cell",
                "backend",
                "workload",
                "requests",
                "status",
                "hit rate",
                "predicted",
                "KV not recomputed",
                "predicted",
                "KV memory saved per GPU",
                "preemptions",
                "pool full at s",
                "fills from (kvmath)",
            ],
            rows=rows,
        )
    )
    blocks.append(
        Block(
            "p",
            "Hit rate: the engine's prefix-cache hits / prompt tokens over the measured repeats "
            "(vLLM /metrics); predicted: a block prefix cache replayed on the prompts kvray sent "
            "(docs/kv_reuse.md). KV not recomputed: hit tokens × KV bytes per token per GPU, per repeat — "
            "the prefill the cache skipped, not memory. KV memory saved per GPU: peak KV of the same "
            "cell with the prefix cache off − with it on; — where the dataset has only one arm.",
        )
    )
    failed = [r for r in records if r["status"] not in ("ok", "partial") and r["cell"].get("experiment") == "exp6"]
    if failed:  # e.g. a KV dtype this engine's build refuses on this hardware, in the engine's own words
        blocks.append(
            Block(
                "ul",
                items=[
                    f"{r['cell_id']} ({r['cell']['backend']}, kv_dtype "
                    f"{r['cell'].get('kv_dtype') or r['cell']['dtype']}): {r['status']} — "
                    f"{str(r.get('reason'))[:300]}"
                    for r in failed
                ],
            )
        )
    for name in exp.figures:
        blocks += page.figure(name)
    return blocks + every_cell_blocks(exp, page)


EXPERIMENT = Experiment.of_module(
    globals(),
    "Exp6 — KV reuse and pressure",
    figures=("exp6_hit_rate", "exp6_ttft_vs_shared_prefix", "exp6_multi_turn", "exp6_kv_pressure", "exp6_kv_dtype"),
)
