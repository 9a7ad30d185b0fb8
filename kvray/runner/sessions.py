"""The sessions-under-SLO search run in this process: each probe is one cell of ``sessions_workload`` on a backend
(``sim`` for the prediction on any GPU, a measured backend otherwise), its p95 TTFT over the measured turns."""

from __future__ import annotations

from typing import Any

from kvray.backends import get_backend
from kvray.plan.sessions import SessionsSearch, most_sessions_under_slo, sessions_workload
from kvray.spec import Cell, make_options


def sessions_under_slo(
    model: str,
    backend: str = "sim",
    *,
    slo_ttft_ms: float,
    turns: int = 4,
    user_toks: int = 256,
    gen_toks: int = 128,
    think_s: float = 2.0,
    hardware: str = "any",
    dtype: str = "bf16",
    options: dict[str, Any] | None = None,
    max_sessions: int = 512,
    repeats: int = 1,
) -> SessionsSearch:
    """The most concurrent sessions whose p95 TTFT (the steady turns: each session's first turn is its ramp-up,
    kvray/measure/serving.py) stays within ``slo_ttft_ms`` on ``backend``."""
    from kvray.runner.run import run_cell

    engine = get_backend(backend)
    try:

        def p95(n: int) -> float:
            wl = sessions_workload(n, turns, user_toks, gen_toks, think_s)
            cell = Cell(
                model,
                wl,
                backend=backend,
                dtype=dtype,
                hardware=hardware,
                warmup=0,
                repeats=repeats,
                options=make_options(**(options or {})),
                experiment="exp8",
            )
            result = run_cell(engine, cell)
            return float(result.metrics.get("ttft_s_p95", float("nan"))) if result.status == "ok" else float("inf")

        return most_sessions_under_slo(p95, slo_ttft_ms / 1000.0, max_sessions)
    finally:
        engine.close()
