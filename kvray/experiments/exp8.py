"""exp8 — real traffic: a trace replayed on each backend and GPU type, and how many chat sessions fit an SLO.

What it answers: how an engine serves a production trace at its recorded arrivals (× speedup) — TTFT over the
trace against the SLO, the requests in flight, the client's lag (a replay whose client fell behind is flagged) —
what share of the trace's prompt a prefix cache can serve and at what pool size that falls off (predicted from the
trace alone, kvray/traces/footprint.py; measured where the engine counts hits), and the most concurrent multi-turn
sessions whose p95 TTFT stays under the SLO. On the sim backend (the default) it runs in seconds on any machine and
predicts for each GPU; ``--backends vllm`` measures. Trace: the shipped Mooncake excerpt unless ``--trace FILE``;
prompts longer than the model holds are scaled down block for block (a trace block → fewer tokens), said in the notes.
docs/traces.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvray.errors import KvrayInputError
from kvray.experiments.base import Experiment, Flags, Page
from kvray.experiments.options import BackendsOpt, LimitOpt, TraceFormatOpt, TurnFlags
from kvray.experiments.sections import cell_rows_blocks

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.document import Block
    from kvray.plan.job import Job

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "traces" / "mooncake_conversation_first300.jsonl"
EXP8_GPUS = ("H100-SXM", "A100-80GB-SXM")


def fitted_block_toks(opts: dict[str, Any], positions: int) -> tuple[int | None, str | None]:
    """The block size (a power of two, at most the trace's) at which the trace's longest request fits ``positions``,
    and a note; (None, None) when it fits as recorded. One line when it cannot fit (a trace without blocks)."""
    from kvray.plan.replay import cut_trace

    trace = cut_trace(opts)
    longest = max(r.prompt_toks + r.gen_toks for r in trace.requests)
    if longest <= positions:
        return None, None
    if not trace.block_toks:
        raise KvrayInputError(
            f"the trace's longest request ({longest} tokens) exceeds the model's {positions} "
            "positions; choose a longer-context --model"
        )
    block = trace.block_toks
    while block > 1 and longest * block / trace.block_toks > positions:
        block //= 2
    return (
        block,
        f"trace blocks of {trace.block_toks} tokens replayed as {block} (lengths × {block / trace.block_toks:g}) so the longest request fits {positions} positions",
    )


def exp8_blocks(
    trace: dict[str, Any],
    speedups: list[float],
    slo_ttft_ms: float,
    sessions: list[int],
    turns: int,
    user_toks: int,
    gen_toks: int,
    think_s: float,
) -> list[dict[str, Any]]:
    """exp8's grid blocks in the job file's keys: the trace at each speedup, then the staggered sessions sweep."""
    slo = {"ttft_ms": slo_ttft_ms}
    blocks: list[dict[str, Any]] = [{"trace": {**trace, "speedup": s}, "slo": slo} for s in speedups]
    if sessions:
        blocks.append(
            {
                "workload": "multi_turn",
                "conversations": sorted(set(sessions)),
                "turns": [turns],
                "user_toks": [user_toks],
                "gen_toks": [gen_toks],
                "think_s": [think_s],
                "slo": slo,
            }
        )
    return blocks


def build(
    flags: Flags,
    backends: BackendsOpt = ["sim"],  # noqa: B006 - typer reads a list default, never mutates it
    trace: Annotated[
        str | None, typer.Option("--trace", help="trace file (default: the shipped Mooncake excerpt)")
    ] = None,
    trace_format: TraceFormatOpt = None,
    speedup: Annotated[
        list[float] | None, typer.Option("--speedup", help="replay speedups: 0.25 0.5 1 (default; < 1 slows)")
    ] = None,
    limit: LimitOpt = None,
    block_toks: Annotated[int | None, typer.Option("--block-toks", help="tokens one trace block becomes")] = None,
    slo_ttft_ms: Annotated[float, typer.Option("--slo-ttft-ms", help="the TTFT SLO (ms)")] = 2000.0,
    sessions: Annotated[
        list[int] | None, typer.Option("--sessions", help="concurrent sessions: 1 4 16 64 256 (default)")
    ] = None,
    session: TurnFlags = TurnFlags(turns=4, user_toks=256, turn_gen_toks=128),
    think_s: Annotated[float, typer.Option("--think-s", help="think time after each answer (s)")] = 2.0,
) -> tuple[Job, list[str]]:
    """Exp8, real traffic: a trace replayed (TTFT over time vs the SLO, arrivals, in flight, client lag), its prefix
    hit rate vs pool size predicted (and measured), and the most chat sessions under the SLO. sim by default."""
    from kvray.plan.experiments import job_from_grid_blocks, max_positions, positive
    from kvray.plan.replay import check_trace_key

    speedups = speedup or [0.25, 0.5, 1.0]
    if any(not s > 0 for s in speedups) or slo_ttft_ms <= 0 or think_s < 0:
        raise KvrayInputError("--speedup and --slo-ttft-ms must be positive, --think-s >= 0")
    session_counts = [1, 4, 16, 64, 256] if sessions is None else sessions
    positive("--sessions", session_counts or [1])
    positive("--turns", [session.turns])
    raw = {"path": trace or str(DEFAULT_TRACE), "format": trace_format, "limit": limit, "block_toks": block_toks}
    opts = check_trace_key({k: v for k, v in raw.items() if v is not None}, "--trace")
    common = flags.common(backends, default_backends=("sim",))
    notes = []
    if block_toks is None:
        fitted, note = fitted_block_toks(opts, max_positions(common.model))
        if fitted is not None:
            opts["block_toks"], notes = fitted, [str(note)]
    if set(common.backends) == {"sim"} and common.hardware == "any":
        common.hardware = list(EXP8_GPUS)
    blocks = exp8_blocks(
        opts, speedups, slo_ttft_ms, session_counts, session.turns, session.user_toks, session.turn_gen_toks, think_s
    )
    return job_from_grid_blocks("exp8", common, blocks), notes


def draw(dataset: Dataset, out_dir: Path) -> list[Any]:
    """The exp8 figures when the folder holds replayed or exp8 cells, else none."""
    from kvray.figures.replay import has_replay_data, replay_figures

    return replay_figures(dataset, out_dir) if has_replay_data(dataset.records) else []


def section(exp: Experiment, page: Page) -> list[Block]:
    """Each replayed cell: its trace, offered vs achieved rate, client lag, TTFT against the SLO, hit rates; the
    sessions sweep; then the exp8 figures and cells. None without replayed or exp8 cells."""
    from kvray.document import Block
    from kvray.document.blocks import fmt_num
    from kvray.figures.replay import has_replay_data, is_replay, label

    records = page.dataset.records
    if not has_replay_data(records):
        return []
    blocks = [Block("h2", exp.title)]
    rows = []
    for r in records:
        if not is_replay(r):
            continue
        m, mem = r.get("metrics") or {}, r.get("memory") or {}
        pct = [
            f"{100 * float(v):.1f} %" if v is not None else "—"
            for v in (mem.get("prefix_cache_hit_rate"), mem.get("prefix_cache_hit_rate_predicted"))
        ]
        rows.append(
            [
                r["cell_id"],
                label(r),
                r["status"],
                fmt_num(m.get("requests"), 0),
                fmt_num(m.get("offered_rps"), 2),
                fmt_num(m.get("achieved_rps"), 2),
                fmt_num(1e3 * float(m.get("client_lag_s_p99") or 0), 1)
                + (" ⚠ behind" if m.get("client_behind") else ""),
                fmt_num(1e3 * float(m.get("ttft_s_p50") or float("nan")), 0),
                fmt_num(1e3 * float(m.get("ttft_s_p95") or float("nan")), 0),
                fmt_num(100 * float(m.get("slo_attainment") or float("nan")), 1),
                *pct,
            ]
        )
    if rows:
        blocks.append(
            Block(
                "table",
                headers=[
                    "cell",
                    "replay",
                    "status",
                    "requests",
                    "offered req/s",
                    "achieved req/s",
                    "client lag p99 ms",
                    "TTFT p50 ms",
                    "TTFT p95 ms",
                    "SLO met %",
                    "hit rate",
                    "predicted",
                ],
                rows=rows,
            )
        )
        traces = sorted({(r["cell"]["workload"].get("load") or {}).get("trace") or "" for r in records if is_replay(r)})
        blocks.append(Block("ul", items=[f"trace: {t}" for t in traces if t]))
        blocks.append(
            Block(
                "p",
                "Offered: the cut trace's mean rate; achieved: completions per second over the window; "
                "client lag: sent − due per request (a p99 over the limit flags the row). Hit rate "
                "predicted: vLLM's rule on the prompts sent, an unbounded cache (docs/traces.md).",
            )
        )
    for name in exp.figures:
        blocks += page.figure(name)
    if cell_rows := cell_rows_blocks(exp, page):
        blocks += [Block("h3", "Every exp8 cell"), *cell_rows]
    return blocks


EXPERIMENT = Experiment.of_module(
    globals(),
    "Exp8 — real traffic: trace replay and sessions",
    figures=("exp8_arrivals", "exp8_ttft_over_time", "exp8_hit_rate_pool", "exp8_sessions_slo"),
)
