"""kvray — wrk for LLM inference, KV edition, distributed on Ray.

The Python API, importable from here without paying for torch, Ray or pandas until a name is used:

    from kvray import load_job, job_from_dict, plan_cells, run_job, check_oom_risk

``run_job`` returns a RunRecord (the folder and the manifest's record of the run), ``check_oom_risk`` an
OomRisk (``to_dict()``: ``kvray check --json``'s object).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; imported on first use (PEP 562) so `import kvray` stays light.
_API = {
    "load_job": "kvray.plan.job",
    "job_from_dict": "kvray.plan.job",
    "plan_cells": "kvray.plan.planner",
    "run_job": "kvray.sweep",
    "RunRecord": "kvray.sweep",
    "check_oom_risk": "kvray.model.oom",
    "OomRisk": "kvray.model.oom",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'kvray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
