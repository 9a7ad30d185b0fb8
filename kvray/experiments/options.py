"""The option types experiments declare their commands' flags with (Typer ``Annotated`` aliases), shared with
``kvray bench``'s flags of the same name (kvray/cli/options.py imports them from here)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated

import typer

from kvray.errors import KvrayInputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kvray.experiments.base import Flags
    from kvray.plan.experiments import Common

PromptToksOpt = Annotated[int, typer.Option("--prompt-toks", help="prompt tokens per request")]
GenOpt = Annotated[int, typer.Option("--gen-toks", help="generated tokens per request")]
# An experiment's backends and concurrency levels: each declares its defaults in its signature (shown by --help).
BackendsOpt = Annotated[
    list[str],
    typer.Option(
        "--backends", "--backend", help="backends, space-separated: hf hf-paged vllm openai ollama synthetic sim"
    ),
]
ConcurrencyListOpt = Annotated[
    list[int], typer.Option("--concurrency", "-c", help="concurrent requests, space-separated")
]

# The load and trace flags of kvray bench, kvray plan, exp5 and exp8.
PromptDistOpt = Annotated[
    str | None,
    typer.Option("--prompt-dist", help="prompt lengths drawn: lognormal:median=256,sigma=0.8,max=2048 | sharegpt …"),
]
GenDistOpt = Annotated[str | None, typer.Option("--gen-dist", help="output lengths drawn, same form")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of the arrivals and drawn lengths")]
TraceFormatOpt = Annotated[
    str | None,
    typer.Option("--trace-format", help="mooncake | azure | burstgpt | kvray | conversations (default: detected)"),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="the trace's first N requests")]
SpeedupOpt = Annotated[
    float | None, typer.Option("--speedup", help="divide the trace's arrival times by S (S times faster)")
]

SloOpt = Annotated[
    str | None, typer.Option("--slo", help="SLO thresholds in ms, e.g. ttft_ms=500,tpot_ms=50 (also itl_ms, e2e_ms)")
]
TraceFileOpt = Annotated[
    str | None,
    typer.Option("--trace", help="a trace file: Mooncake JSONL, Azure or BurstGPT CSV, kvray, conversations"),
]

# The server backends' flags (kvray bench, exp4, exp5, exp6); each becomes a backend option of the same name.
VllmPythonOpt = Annotated[
    str | None, typer.Option("--vllm-python", help="Python of a vLLM install (default: $KVRAY_VLLM_PYTHON, this one)")
]
BaseUrlOpt = Annotated[
    str | None, typer.Option("--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000")
]
ApiKeyEnvOpt = Annotated[
    str | None, typer.Option("--api-key-env", help="openai backend: environment variable holding the API key")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="ollama backend: server URL, e.g. http://127.0.0.1:11434")]


@dataclass(frozen=True)
class TurnFlags:
    """A multi-turn chat's shape (exp6's chats, exp8's sessions): each experiment gives its defaults as an instance."""

    turns: Annotated[int, typer.Option("--turns", help="turns per chat")] = 4
    user_toks: Annotated[int, typer.Option("--user-toks", help="tokens of each new user message")] = 100
    turn_gen_toks: Annotated[int, typer.Option("--turn-gen-toks", help="tokens of each answer")] = 30


@dataclass(frozen=True)
class ServerFlags:
    """The server backends' flags, declared once (``kvray bench``, exp4, exp5): a command parameter of this type
    stands for all four (kvray/cli/options.py ``flag_groups``); each becomes the backend option of its name."""

    vllm_python: VllmPythonOpt = None
    base_url: BaseUrlOpt = None
    api_key_env: ApiKeyEnvOpt = None
    host: HostOpt = None

    def option_pairs(self) -> list[str]:
        """The flags given, as --option KEY=VALUE pairs (the API key's *name* only; its value never leaves the
        environment)."""
        return [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)]


def require_server_flags(common: Common) -> None:
    """Names the missing *flag* (--base-url, --host) of a server backend; the options' form is each backend's
    own check when the job validates."""
    for name, option, flag in (("openai", "base_url", "--base-url"), ("ollama", "host", "--host")):
        if name in common.backends and option not in common.options:
            raise KvrayInputError(f"--backends {name} needs {flag}")


def server_common(
    flags: Flags, backends: list[str] | None, servers: ServerFlags, *, default_backends: Sequence[str]
) -> Common:
    """The experiment's ``Common`` with the server flags as backend options, a missing server flag named
    (exp4, exp5: any of their backends may be a server)."""
    common = flags.common(backends, default_backends=default_backends, extra_options=servers.option_pairs())
    require_server_flags(common)
    return common
