"""What a prefix cache saved, from a dataset's rows: the peak KV in use with the cache off − with it on (exp6's
"KV memory saved per GPU"; kvray/backends/kv_reuse.py records the rows' own prefix-cache figures)."""

from __future__ import annotations

import json
import math
from typing import Any

from kvray.analysis.views import as_number
from kvray.measure.trace import MEASURED_STATUSES

# The cell options that turn an engine's prefix cache on or off (vLLM's engine argument, the simulator's).
PREFIX_CACHE_OPTIONS = ("enable_prefix_caching", "prefix_caching")


def kv_peak_used_bytes(memory: dict[str, Any]) -> float | None:
    """A row's peak KV in use, per GPU: a paged engine's measured peak (``kv_used_peak_bytes``: usage × a rank's
    pool), else the KV tensors measured, else — a simulated row — the predicted peak of blocks in use."""
    for key in ("kv_used_peak_bytes", "kv_measured_bytes", "kv_predicted_bytes"):
        value = as_number(memory.get(key))
        if value is not None:
            return value
    return None


def kv_memory_saved(records: list[dict[str, Any]]) -> dict[str, float]:
    """``kv_memory_saved_bytes_per_gpu`` of each row whose prefix cache was on: the peak KV in use of the same
    cell with the cache off − its own (``kv_peak_used_bytes``; per GPU of a TP group, as both are). NaN where the
    dataset holds only one arm. The cell with the cache off is the baseline and carries none. Not hit tokens ×
    bytes (``kv_not_recomputed_bytes``): blocks a cache hits can be resident anyway, so the peak may not move."""

    def arm(record: dict[str, Any]) -> tuple[str, bool] | None:
        cell = record.get("cell") or {}
        options = dict(cell.get("options") or {})
        flags = [options.pop(k) for k in PREFIX_CACHE_OPTIONS if k in options]
        # unset: on (vLLM V1's default, the simulator's); "false"/"0" from a job file or --option: off
        on = not flags or str(flags[0]).strip().lower() not in ("false", "0", "no", "off")
        if record.get("status") not in MEASURED_STATUSES:
            return None
        rest = {k: v for k, v in cell.items() if k not in ("options", "experiment")}
        return json.dumps({**rest, "options": options}, sort_keys=True, default=str), on

    peaks: dict[tuple[str, bool], float] = {}
    for r in records:
        key = arm(r)
        peak = kv_peak_used_bytes(r.get("memory") or {})
        if key is not None and peak is not None:
            peaks[key] = peak
    out: dict[str, float] = {}
    for r in records:
        key = arm(r)
        if key is not None and key[1]:
            without, with_ = peaks.get((key[0], False)), peaks.get(key)
            out[str(r["cell_id"])] = without - with_ if without is not None and with_ is not None else math.nan
    return out
