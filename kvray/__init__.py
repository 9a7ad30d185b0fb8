"""kvray — wrk for LLM inference, KV edition, distributed on Ray."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def check_oom_risk(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`kvray.model.oom.check_oom_risk` (imported lazily so ``import kvray`` stays light)."""
    from kvray.model.oom import check_oom_risk as _check

    return _check(*args, **kwargs)


__all__ = ["__version__", "check_oom_risk"]
