"""Paged KV predicted from what the engine actually ran, sample by sample, beside the KV it measured.

A paged engine (vLLM, hf-paged) does not hold every request at its final length at once: with
``max_num_seqs`` below the concurrency, arrival gaps or preemption, requests queue and finish in turns.
Predicting the all-resident figure (every request at P + G − 1 cached positions together) and comparing it
with the measured peak books the scheduling as "prediction error". Here the prediction follows the run: at
each KV sample, the requests the engine held then, each at the positions it had cached by then, block-rounded
with kvmath's paged layout. The row's ``kv_predicted_bytes`` is that prediction at the sample where measured
used KV peaked (``kv_at_peak``), so predicted and measured describe the same instant.

Which requests the engine held at a sample (``running_set``):
  * by the traces: from ``start_s`` (hf-paged: admitted by the scheduler; a server: the request was sent)
    until its last token (a server: the last token reached the client);
  * when the sample carries the engine's running count, the set is trimmed or filled to it: requests that
    have produced tokens come first (they are in the engine for sure), then those still waiting for their
    first token in the order they started (FCFS); when the engine counts more than the traces place, the
    requests that finished most recently fill the gap at their final length (an engine stamps a request's
    last token a moment before it frees its blocks).
Positions: one still in prefill holds its P prompt positions; one that has produced n ≥ 1 of its G tokens holds
P + n while the step computing token n + 1 runs — an engine allocates the slot of the token it feeds before
the step (vLLM's scheduler and transformers' alike) and a decode step is nearly all of the time between two
tokens — and never more than P + G − 1 (the last token is sampled, never fed back: ``kvmath.cached_positions``).

Tolerance: a sample taken between two steps (the newest token's slot not yet allocated), or while a token is
still on its way to its timestamp (hf-paged: the engine's own clock; vLLM: the token's arrival at the client,
and the /metrics answer's arrival), sees one position more or fewer per running request than the traces say,
which is at most one block per running request either way. ``KVAtPeak.tolerance_bytes`` states that bound; preemption (a request's KV dropped and
recomputed) is not modelled and can exceed it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvray.measure.trace import RunTrace
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import cached_positions, kv_bytes_batch, kv_bytes_per_token

# What a run's memory carries about the peak sample; the runner takes all of them from the repeat whose
# measured KV peaked (a max over repeats of each would pair one repeat's prediction with another's peak).
PEAK_KEYS = ("kv_predicted_bytes", "kv_predicted_basis", "kv_peak_t_s", "kv_peak_running",
             "kv_prediction_tolerance_bytes")  # fmt: skip
BASIS_TIMELINE = "running set at the measured peak sample"
BASIS_ALL_RESIDENT = "all requests resident at P + G - 1 (no KV sample caught the requests)"


@dataclass(frozen=True)
class KVSample:
    """One KV sample: seconds since the repeat's t0 (the traces' clock), used bytes, the engine's running count."""

    t_s: float
    used_bytes: int | None
    running: int | None = None


@dataclass(frozen=True)
class KVAtPeak:
    """The prediction at the sample where measured used KV peaked (the first such sample on a tie)."""

    t_s: float
    measured_bytes: int
    predicted_bytes: int
    running: int  # requests the prediction placed in the engine
    positions: tuple[int, ...]  # their cached positions, in running-set order
    tolerance_bytes: int  # one block per running request: |measured − predicted| ≤ this (module docstring)

    def memory(self) -> dict[str, int | float | str]:
        """The run-memory keys the runner and the dataset row read (PEAK_KEYS)."""
        return {
            "kv_predicted_bytes": self.predicted_bytes,
            "kv_predicted_basis": BASIS_TIMELINE,
            "kv_peak_t_s": self.t_s,
            "kv_peak_running": self.running,
            "kv_prediction_tolerance_bytes": self.tolerance_bytes,
        }


def _last_s(trace: RunTrace) -> float:
    return trace.token_times_s[-1] if trace.token_times_s else trace.end_s


def positions_at(trace: RunTrace, t_s: float) -> int:
    """Positions ``trace`` holds at ``t_s`` by its own timestamps: P in prefill, P + n after n tokens (the slot of
    the token being fed), at most P + G − 1."""
    n = bisect.bisect_right(trace.token_times_s, t_s)
    return min(trace.prompt_toks + n, cached_positions(trace.prompt_toks, len(trace.token_times_s)))


def running_set(traces: Sequence[RunTrace], t_s: float, running: int | None = None) -> list[tuple[RunTrace, int]]:
    """(request, cached positions) for each request the engine held at ``t_s`` (rules: module docstring)."""
    inside = [t for t in traces if t.start_s <= t_s < _last_s(t)]
    inside.sort(key=lambda t: (bisect.bisect_right(t.token_times_s, t_s) == 0, t.start_s, t.request_id))
    held = [(t, positions_at(t, t_s)) for t in inside]
    if running is None:
        return held
    if len(held) >= running:
        return held[:running]
    ended = sorted((t for t in traces if _last_s(t) <= t_s and t.start_s <= t_s), key=_last_s, reverse=True)
    return held + [(t, cached_positions(t.prompt_toks, len(t.token_times_s))) for t in ended[: running - len(held)]]


def predicted_used_bytes(
    traces: Sequence[RunTrace], sample: KVSample, g: ModelGeometry, dtype: str, block_size: int
) -> int:
    """Paged KV bytes of the requests the engine held at ``sample``, each block-rounded at its own length."""
    held = running_set(traces, sample.t_s, sample.running)
    return kv_bytes_batch(g, [n for _, n in held], dtype, "paged", block_size)


def kv_at_peak(
    traces: Sequence[RunTrace], samples: Sequence[KVSample], g: ModelGeometry, dtype: str, block_size: int
) -> KVAtPeak | None:
    """The prediction at the sample where measured used KV peaked; None when no sample measured any KV."""
    # a sample of an engine running nothing says nothing about the workload's KV (vLLM: not the measured peak)
    measured = [s for s in samples if s.used_bytes and (s.running is None or s.running > 0)]
    if not measured:
        return None
    top = max(measured, key=lambda s: s.used_bytes or 0)  # max() keeps the first of equal peaks
    held = running_set(traces, top.t_s, top.running)
    positions = tuple(n for _, n in held)
    block_bytes = round(block_size * kv_bytes_per_token(g, dtype, "paged"))
    return KVAtPeak(
        t_s=top.t_s,
        measured_bytes=int(top.used_bytes or 0),
        predicted_bytes=kv_bytes_batch(g, positions, dtype, "paged", block_size),
        running=len(held),
        positions=positions,
        tolerance_bytes=len(held) * block_bytes,
    )


def timeline_prediction(
    points: list[dict[str, Any]],
    traces: Sequence[RunTrace],
    g: ModelGeometry,
    dtype: str,
    block_size: int,
    all_resident_bytes: int,
) -> dict[str, Any]:
    """A run's KV-prediction memory keys from its timeline points ({t_s, kv_used_bytes, running, …}).

    Each point gets ``kv_predicted_bytes`` (the running set's paged KV at that instant) beside its measured
    ``kv_used_bytes``; the run's ``kv_predicted_bytes`` is the prediction at the measured peak, or the
    all-resident figure, said so in ``kv_predicted_basis``, when no sample caught the requests running.
    """
    samples = []
    for p in points:
        running, used = p.get("running"), p.get("kv_used_bytes")  # a Prometheus gauge is a float: 2.0 requests
        sample = KVSample(
            float(p["t_s"]), int(used) if used is not None else None, int(running) if running is not None else None
        )
        p["kv_predicted_bytes"] = predicted_used_bytes(traces, sample, g, dtype, block_size)
        samples.append(sample)
    peak = kv_at_peak(traces, samples, g, dtype, block_size)
    memory: dict[str, Any] = {"kv_predicted_all_resident_bytes": all_resident_bytes}
    if peak is None:
        memory.update(kv_predicted_bytes=all_resident_bytes, kv_predicted_basis=BASIS_ALL_RESIDENT)
    else:
        memory.update(peak.memory())
    return memory
