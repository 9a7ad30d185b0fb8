"""The synthetic job every sweep test starts from: one place, so a test states only what it changes.

``synthetic_job(name, **overrides)`` is a Job (kvray/plan/job.py) on the synthetic backend — the tiny Llama's
geometry, an injected schedule (``options``: ttft_s, tpot_s, …), no weights and no warm-up — and
``write_job_file`` the same job as a YAML file for tests that run the ``kvray`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvray.plan.job import Job, job_from_dict


def synthetic_spec(name: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "models": ["kvray/tiny-llama"],
        "backends": ["synthetic"],
        "dtypes": ["fp32"],
        "warmup": 0,
        "repeats": 1,
        "options": {"ttft_s": 0.01, "tpot_s": 0.005},
        "grid": {"prompt_toks": [8, 16, 32], "gen_toks": [4], "concurrency": [1, 2, 4]},
    }
    spec.update(overrides)
    return spec


def synthetic_job(name: str, **overrides: Any) -> Job:
    return job_from_dict(synthetic_spec(name, **overrides))


def write_job_file(folder: Path, name: str, **overrides: Any) -> Path:
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(synthetic_spec(name, **overrides), sort_keys=False))
    return path
