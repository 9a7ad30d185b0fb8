"""``kvray compare BASE NEW``: did it get faster? Two results folders joined by what was measured, each shared
cell's latencies and throughput compared with a test that suits them, corrected for asking many questions.

Join. A cell is matched by what it measured — model, backend, dtype, KV dtype, weights, experiment, the exact
workload (every request's prompt, output and arrival) and the hardware it ran on — not by its cell_id, which
also hashes backend options, repeats and warmup. Those are *what changed* and are listed, so comparing two
engine settings (``block_size=16`` vs ``32``) is the main use, not a mismatch. When each folder ran on one
hardware type and the two differ (H100 vs A100), the hardware is what changed too and cells join without it.
Cells present in only one folder, or measured in only one (oom, error, refused), are listed, never dropped.

Compare. Per shared cell, for TTFT, TPOT, ITL, E2E and queue time (ok requests of all measured repeats), the
p50 and the highest of p99/p95/p90 both samples hold (p99 needs 100 values): new / base by a bootstrap that
resamples repeats, then requests (ITL: gaps) within them — the repeats are the independent units — giving the
change's interval and a bootstrap-z p-value (kvray.analysis.stats.bootstrap_ratio); and output tokens/s over repeats: Welch's t on log tokens/s (needs ≥ 2 repeats a side; one repeat cannot
tell a change from run-to-run noise, and the row says so and how to get more).
All p-values of a comparison are Holm-adjusted together. A row's verdict is "faster" or "slower" only when its
adjusted p < ``alpha`` **and** the change is at least ``min_change`` (default 5 %) and at least
``MIN_ABS_CHANGE_S`` — a statistically sure 0.3 % is not a change a user acts on, and timer and event-loop
jitter on a loaded machine is real but not the engine's. Queue time, often ~0, is held to a floor of
``min_change`` × the base TTFT p50 instead (it is part of TTFT). ``regressions(pct)`` are the slower rows whose
change exceeds ``pct``: what ``--fail-on-regression`` gates on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvray.analysis.stats import Change, bootstrap_ratio, holm, welch_log_ratio
from kvray.measure.metrics import CI_LEVEL, repeat_samples, supported_percentile, throughput
from kvray.measure.trace import MEASURED_STATUSES, CellResult

ALPHA = 0.05
MIN_CHANGE = 0.05
MIN_ABS_CHANGE_S = 0.0002  # 0.2 ms: below the resolution of what a harness on a busy host can attribute
LATENCY = ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s")
METRIC_NAMES = {"ttft_s": "TTFT", "tpot_s": "TPOT", "itl_s": "ITL", "e2e_s": "E2E", "queue_s": "queue",
                "output_tps": "output tok/s"}  # fmt: skip
FASTER, SLOWER, SAME, UNTESTED = "faster", "slower", "no significant change", "not testable"


@dataclass
class Row:
    """One statistic of one shared cell, base vs new."""

    cell: str  # human label of the cell
    metric: str  # ttft_s | … | output_tps
    stat: str  # p50 | p90 | p95 | p99 | mean
    unit: str  # "s" | "tok/s"
    base: float
    new: float
    n_base: int  # samples each side rests on (requests, gaps or repeats)
    n_new: int
    change: float  # (new − base) / base
    ci_low: float  # of the change, same units
    ci_high: float
    p_value: float
    p_adjusted: float
    test: str
    verdict: str = UNTESTED
    note: str = ""

    @property
    def label(self) -> str:
        return f"{METRIC_NAMES.get(self.metric, self.metric)} {self.stat}"


@dataclass
class Pair:
    key: tuple[Any, ...]
    label: str
    base: CellResult
    new: CellResult
    changed: dict[str, tuple[Any, Any]]  # option / setting → (base, new)


@dataclass
class Comparison:
    base_dir: str
    new_dir: str
    alpha: float
    min_change: float
    changed: dict[str, tuple[Any, Any]]  # what differs for every shared cell alike
    changed_per_cell: dict[str, dict[str, tuple[Any, Any]]]  # what differs for some cells only
    rows: list[Row]
    only_base: list[str]
    only_new: list[str]
    not_measured: list[str]  # shared cells without a measurement on one side, and why
    cells_compared: int
    cross_hardware: bool
    ci_level: float = CI_LEVEL
    advice: list[str] = field(default_factory=list)

    def regressions(self, pct: float) -> list[Row]:
        """Rows significantly slower by more than ``pct`` per cent (throughput: lower by more than ``pct`` %)."""
        return [r for r in self.rows if r.verdict == SLOWER and abs(r.change) * 100 > pct]

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            return v

        out = asdict(self)
        out["counts"] = {v: sum(1 for r in self.rows if r.verdict == v) for v in (FASTER, SLOWER, SAME, UNTESTED)}
        return clean(out)


# ---------------------------------------------------------------- join


def _hardware(result: CellResult) -> str:
    from kvray.analysis.views import short_hardware

    return short_hardware(result.hardware.get("name", "cpu"))


def _key(result: CellResult, with_hardware: bool) -> tuple[Any, ...]:
    c = result.cell
    requests = tuple((r.prompt_toks, r.gen_toks, r.arrival_s) for r in c.workload.requests)
    key = (c.model, c.backend, c.dtype, c.kv_dtype or c.dtype, c.weights, c.experiment, c.workload.kind, requests)
    return (*key, _hardware(result)) if with_hardware else key


def cell_label(result: CellResult, hardware: bool = True) -> str:
    c = result.cell
    wl = c.workload
    shape = (
        "mixed " + ",".join(str(r.prompt_toks) for r in wl.requests)
        if wl.kind == "mixed"
        else f"prompt {c.prompt_toks}"
    )
    parts = [c.experiment or "", c.model, c.backend, c.dtype, f"c={c.concurrency}", shape, f"gen {c.gen_toks}"]
    if hardware:
        parts.append(_hardware(result))
    return " · ".join(p for p in parts if p)


def short_labels(labels: list[str]) -> tuple[str, dict[str, str]]:
    """(the " · " parts every label shares, each label without them): the table names only what differs."""
    parts = [label.split(" · ") for label in labels]
    shared = [p for p in parts[0] if all(p in q for q in parts)] if parts else []
    short = {
        label: " · ".join(p for p in q if p not in shared) or label for label, q in zip(labels, parts, strict=True)
    }
    return " · ".join(shared), short


def _settings(result: CellResult) -> dict[str, Any]:
    c = result.cell
    out: dict[str, Any] = {f"option {k}": v for k, v in c.options}
    out.update(repeats=c.repeats, warmup=c.warmup, hardware=_hardware(result))
    out.update({f"{k} version": v for k, v in (result.versions or {}).items() if v})
    return out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if str(a.get(k)) != str(b.get(k))}


def join(base: list[CellResult], new: list[CellResult]) -> tuple[list[Pair], list[CellResult], list[CellResult], bool]:
    """(matched pairs, only in base, only in new, cross_hardware). Exact settings match first (so a run that swept
    an option pairs each option value with its own), then by what was measured where that is unambiguous."""
    hw_base, hw_new = {_hardware(r) for r in base}, {_hardware(r) for r in new}
    cross = len(hw_base) == 1 and len(hw_new) == 1 and hw_base != hw_new
    left, right = list(base), list(new)
    pairs: list[Pair] = []
    for strict in (True, False):
        groups_l: dict[tuple[Any, ...], list[CellResult]] = defaultdict(list)
        groups_r: dict[tuple[Any, ...], list[CellResult]] = defaultdict(list)
        for r in left:
            groups_l[(_key(r, not cross), tuple(r.cell.options) if strict else ())].append(r)
        for r in right:
            groups_r[(_key(r, not cross), tuple(r.cell.options) if strict else ())].append(r)
        for k, ls in groups_l.items():
            rs = groups_r.get(k, [])
            if len(ls) == 1 and len(rs) == 1:
                a, b = ls[0], rs[0]
                pairs.append(Pair(k, cell_label(a, not cross), a, b, _diff(_settings(a), _settings(b))))
                left.remove(a)
                right.remove(b)
    labels = [p.label for p in pairs]
    for p in pairs:  # an option swept within a run: its cells differ by their options only, so name them
        if labels.count(p.label) > 1:
            p.label += " · " + ", ".join(f"{k}={v}" for k, v in p.base.cell.options)
    return pairs, left, right, cross


# ---------------------------------------------------------------- compare


def _repeat_tps(result: CellResult) -> list[float]:
    by_repeat: dict[int, list[Any]] = defaultdict(list)
    for t in result.traces:
        by_repeat[t.repeat].append(t)
    values = [throughput(ts)["output_tps"] for _, ts in sorted(by_repeat.items())]
    return [v for v in values if v == v]


def _row(label: str, metric: str, stat: str, unit: str, ch: Change, p: float, n: tuple[int, int], test: str) -> Row:
    return Row(label, metric, stat, unit, ch.base, ch.new, n[0], n[1], ch.rel_change, ch.ci_low - 1,
               ch.ci_high - 1, p, math.nan, test)  # fmt: skip


def compare_pair(pair: Pair) -> list[Row]:
    """Every testable statistic of one shared cell (p-values not yet adjusted)."""
    a, b = repeat_samples(pair.base.traces), repeat_samples(pair.new.traces)
    rows = []
    for metric in LATENCY:
        x, y = a[metric], b[metric]
        n = (sum(len(g) for g in x), sum(len(g) for g in y))
        if min(n) < 2:
            rows.append(Row(pair.label, metric, "p50", "s", math.nan, math.nan, *n, math.nan, math.nan, math.nan,
                            math.nan, math.nan, "", UNTESTED, "fewer than 2 samples on a side"))  # fmt: skip
            continue
        for p in (50, supported_percentile(min(n))):
            if p is not None:
                ch = bootstrap_ratio(x, y, p)
                rows.append(_row(pair.label, metric, f"p{p:g}", "s", ch, ch.p_value, n, ch.test))
    ta, tb = _repeat_tps(pair.base), _repeat_tps(pair.new)
    ch = welch_log_ratio(ta, tb)
    row = _row(pair.label, "output_tps", "mean", "tok/s", ch, ch.p_value, (len(ta), len(tb)), ch.test)
    if min(len(ta), len(tb)) < 2:
        row.verdict, row.note = UNTESTED, "one repeat on a side: rerun both with --repeats 5"
    rows.append(row)
    return rows


def _verdict(row: Row, alpha: float, min_change: float, floor_s: float) -> str:
    if row.base == row.new and row.unit == "s":  # 0 → 0 (no queueing on either side): nothing to test
        return SAME
    if row.p_adjusted != row.p_adjusted or row.base != row.base or row.new != row.new:
        return UNTESTED
    diff = row.new - row.base
    material = abs(diff) >= abs(row.base) * min_change if row.base else diff != 0
    if row.unit == "s":
        material = material and abs(diff) >= floor_s
    if row.p_adjusted >= alpha or not material:
        return SAME
    worse = diff > 0 if row.unit == "s" else diff < 0
    return SLOWER if worse else FASTER


def compare_results(
    base: list[CellResult],
    new: list[CellResult],
    base_dir: str = "",
    new_dir: str = "",
    alpha: float = ALPHA,
    min_change: float = MIN_CHANGE,
) -> Comparison:
    """The whole comparison of two lists of results (``read_results`` of two folders)."""
    pairs, only_base, only_new, cross = join(base, new)
    rows: list[Row] = []
    not_measured: list[str] = []
    ttft_of: dict[str, float] = {}  # base TTFT p50 per cell: the floor of its queue-time change
    for p in sorted(pairs, key=lambda p: p.label):
        bad = [
            f"{side} {r.status}" for side, r in (("base", p.base), ("new", p.new)) if r.status not in MEASURED_STATUSES
        ]
        if bad:
            not_measured.append(f"{p.label}: " + ", ".join(bad))
            continue
        cell_rows = compare_pair(p)
        ttft_of[p.label] = next((r.base for r in cell_rows if r.metric == "ttft_s" and r.stat == "p50"), math.nan)
        rows += cell_rows
    for r, adjusted in zip(rows, holm([r.p_value for r in rows]), strict=True):
        r.p_adjusted = adjusted
        if r.note:  # untestable by construction (one repeat, too few samples): says why already
            continue
        floor, ttft = MIN_ABS_CHANGE_S, ttft_of.get(r.cell, math.nan)
        if r.metric == "queue_s" and ttft == ttft:
            floor = max(floor, min_change * ttft)
        r.verdict = _verdict(r, alpha, min_change, floor)
        if r.verdict == UNTESTED:
            r.note = "no test: a side has only zeros or too few values"
    changed, per_cell = _what_changed(pairs)
    comparison = Comparison(
        base_dir, new_dir, alpha, min_change, changed, per_cell, rows,
        sorted(cell_label(r) + f" ({r.status})" for r in only_base),
        sorted(cell_label(r) + f" ({r.status})" for r in only_new),
        not_measured, len(ttft_of), cross,
    )  # fmt: skip
    comparison.advice = _advice(comparison, pairs)
    return comparison


def _what_changed(pairs: list[Pair]) -> tuple[dict[str, tuple[Any, Any]], dict[str, dict[str, tuple[Any, Any]]]]:
    """Differences every pair shares (the change under test) and the ones only some pairs have."""
    if not pairs:
        return {}, {}
    common = {k: v for k, v in pairs[0].changed.items() if all(str(p.changed.get(k)) == str(v) for p in pairs)}
    per_cell = {p.label: {k: v for k, v in p.changed.items() if k not in common} for p in pairs}
    return common, {k: v for k, v in per_cell.items() if v}


def _advice(c: Comparison, pairs: list[Pair]) -> list[str]:
    """What to run when the data cannot answer: more repeats where throughput was untestable, more requests
    where a tail could not be compared."""
    out = []
    one_repeat = [r for r in c.rows if r.metric == "output_tps" and r.verdict == UNTESTED]
    if one_repeat:
        out.append(
            f"{len(one_repeat)} cell(s) have one repeat on a side, so their throughput cannot be tested: rerun both "
            "folders with `--repeats 5` (e.g. `kvray run JOB.yaml --output DIR` with `repeats: 5` in the job, or "
            "`kvray bench … --repeats 5`)."
        )
    small = sorted(
        {r.cell for r in c.rows if r.stat == "p50" and r.metric == "ttft_s" and min(r.n_base, r.n_new) < 100}
    )
    if small:
        out.append(
            f"{len(small)} cell(s) pool fewer than 100 requests a side, so their p99 is not compared (a p99 needs "
            "100 values; the highest percentile both hold is): raise --repeats until concurrency × repeats ≥ 100."
        )
    return out


def compare_dirs(
    base_dir: str | Path, new_dir: str | Path, alpha: float = ALPHA, min_change: float = MIN_CHANGE
) -> Comparison:
    """``compare_results`` of two results folders (their cells.jsonl)."""
    from kvray.data.store import read_results

    base = [CellResult.from_dict(r) for r in read_results(base_dir)]
    new = [CellResult.from_dict(r) for r in read_results(new_dir)]
    return compare_results(base, new, str(base_dir), str(new_dir), alpha, min_change)
