"""``kvray compare BASE NEW``: did it get faster? Two results folders joined by what was measured, each shared
cell's latencies and throughput compared with a test that suits them, corrected for asking many questions.

Join. A cell is matched by what it measured — model, backend, dtype, KV dtype, weights, experiment, the exact
workload (every request's prompt, output and arrival) and the hardware it ran on — not by its cell_id, which
also hashes backend options, repeats and warmup. Those are *what changed* and are listed, so comparing two
engine settings (``block_size=16`` vs ``32``) is the main use, not a mismatch. When each folder ran on one
hardware type and the two differ (H100 vs A100), the hardware is what changed too and cells join without it.
Cells present in only one folder, or measured in only one (oom, error, refused), are listed, never dropped.

Sample. Each side's values are the requests its dataset row summarised: under a serving load, each repeat's
steady-state window as ``kvray.measure.serving.split_steady`` draws it (the same function the row used, so the
two never disagree); for a burst, every request.

Compare. Per shared cell, for TTFT, TPOT, ITL, E2E and queue time (ok requests of the row's sample), the p50
and the highest of p99/p95/p90 that every repeat on both sides holds (a per-repeat p99 needs 100 values):
base and new are the pooled percentiles (what the rows show); the interval and p-value come from Welch's t on
the log of each repeat's own percentile (kvray.analysis.stats.repeat_ratio) — the repeats are the independent
units; and output tokens/s, Welch's t on log tokens/s per repeat. A verdict needs ``MIN_REPEATS`` (3) repeats
a side: with one, the only spread is between the requests of one run, which says nothing of the run-to-run
noise (5 % between repeats made 37 % of identical setups "changed" at 1 repeat and 24 % at 2). Below that a
row shows the point change, ``not testable``, and the repeats it needs; it is never a regression.
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

from kvray.analysis.stats import Change, holm, repeat_ratio, welch_log_ratio
from kvray.measure.metrics import CI_LEVEL, repeat_samples, supported_percentile, throughput
from kvray.measure.serving import split_steady
from kvray.measure.trace import MEASURED_STATUSES, CellResult, RunTrace

ALPHA = 0.05
MIN_CHANGE = 0.05
MIN_ABS_CHANGE_S = 0.0002  # 0.2 ms: below the resolution of what a harness on a busy host can attribute
MIN_REPEATS = 3  # a side's repeats a verdict needs: fewer cannot tell a change from run-to-run noise
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
    repeats_base: int = 0  # repeats each side's values come from: the test's units
    repeats_new: int = 0
    why_untested: str = ""  # short reason of a `not testable` row, shared by rows alike ("1 repeat a side, need 3")

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

    def untestable(self) -> dict[str, int]:
        """Why rows are ``not testable`` → how many: what the summary line says next to the count."""
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            if r.verdict == UNTESTED:
                out[r.why_untested or "no test"] += 1
        return dict(out)

    def untestable_line(self) -> str:
        """ "3 metrics not testable: 1 repeat a side, need 3" ("" when every row was tested)."""
        reasons = self.untestable()
        if not reasons:
            return ""
        total = sum(reasons.values())
        head = f"{total} metric{'s' if total != 1 else ''} not testable"
        return head + ": " + "; ".join(why if len(reasons) == 1 else f"{why} ({n})" for why, n in reasons.items())

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
        out["not_testable"] = self.untestable()
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


def row_sample(result: CellResult) -> list[RunTrace]:
    """The traces a cell's dataset row summarised: each repeat's steady-state requests under a serving load
    (``split_steady``, called as kvray.measure.serving.serving_summary calls it — one repeat at a time), every
    trace of a burst. Compare tests these, so its base value is the row's."""
    by_repeat: dict[int, list[RunTrace]] = defaultdict(list)
    for t in result.traces:
        by_repeat[t.repeat].append(t)
    out: list[RunTrace] = []
    for _, ts in sorted(by_repeat.items()):
        out += split_steady(result.cell.workload, ts)[0]
    return out


def _row_repeat_samples(result: CellResult, sample: list[RunTrace]) -> dict[str, list[list[float]]]:
    """Each latency metric's values per repeat, counted as the row counted them (serving_summary): a serving
    loop's failed requests add what they observed, a simulated cell's streams are never judged bunched."""
    loop = result.cell.workload.load_kind != "burst"
    return repeat_samples(sample, failed_observations=loop, simulated=bool(result.simulated))


def _repeat_tps(traces: list[RunTrace]) -> list[float]:
    by_repeat: dict[int, list[Any]] = defaultdict(list)
    for t in traces:
        by_repeat[t.repeat].append(t)
    values = [throughput(ts)["output_tps"] for _, ts in sorted(by_repeat.items())]
    return [v for v in values if v == v]


def _row(label: str, metric: str, stat: str, unit: str, ch: Change, p: float, n: tuple[int, int], test: str) -> Row:
    return Row(
        label,
        metric,
        stat,
        unit,
        ch.base,
        ch.new,
        n[0],
        n[1],
        ch.rel_change,
        ch.ci_low - 1,
        ch.ci_high - 1,
        p,
        math.nan,
        test,
    )


def too_few_repeats(reps: tuple[int, int]) -> str:
    """The short reason a row with these repeats (base, new) gets no verdict; "" when it can have one."""
    if min(reps) >= MIN_REPEATS:
        return ""
    if reps[0] == reps[1]:
        return f"{reps[0]} repeat{'s' if reps[0] != 1 else ''} a side, need {MIN_REPEATS}"
    return f"{reps[0]} repeat(s) in base, {reps[1]} in new, need {MIN_REPEATS} a side"


def _hold_back(row: Row, reps: tuple[int, int]) -> Row:
    """A row of a side with too few repeats: its point change stays, its interval and p-value go."""
    row.repeats_base, row.repeats_new = reps
    why = too_few_repeats(reps)
    if why:
        row.ci_low = row.ci_high = row.p_value = math.nan
        row.verdict, row.why_untested = UNTESTED, why
        row.note = f"{why}: rerun both with --repeats {max(MIN_REPEATS, 5)}"
    return row


def compare_pair(pair: Pair) -> list[Row]:
    """Every statistic of one shared cell (p-values not yet adjusted), over each side's row sample."""
    sample_a, sample_b = row_sample(pair.base), row_sample(pair.new)
    a, b = _row_repeat_samples(pair.base, sample_a), _row_repeat_samples(pair.new, sample_b)
    rows = []
    for metric in LATENCY:
        x, y = [g for g in a[metric] if g], [g for g in b[metric] if g]
        n, reps = (sum(len(g) for g in x), sum(len(g) for g in y)), (len(x), len(y))
        if min(n) < 2:
            rows.append(
                Row(
                    pair.label,
                    metric,
                    "p50",
                    "s",
                    math.nan,
                    math.nan,
                    *n,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    "",
                    UNTESTED,
                    "fewer than 2 samples on a side",
                    *reps,
                    "fewer than 2 samples on a side",
                )
            )
            continue
        # the tail every repeat holds: the test takes each repeat's own percentile
        for p in (50, supported_percentile(min(len(g) for g in x + y))):
            if p is not None:
                ch = repeat_ratio(x, y, p)
                rows.append(_hold_back(_row(pair.label, metric, f"p{p:g}", "s", ch, ch.p_value, n, ch.test), reps))
    ta, tb = _repeat_tps(sample_a), _repeat_tps(sample_b)
    ch = welch_log_ratio(ta, tb)
    n = (len(ta), len(tb))
    rows.append(_hold_back(_row(pair.label, "output_tps", "mean", "tok/s", ch, ch.p_value, n, ch.test), n))
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
            r.note = r.why_untested = "no test: a side has only zeros or too few values"
    changed, per_cell = _what_changed(pairs)
    comparison = Comparison(
        base_dir,
        new_dir,
        alpha,
        min_change,
        changed,
        per_cell,
        rows,
        sorted(cell_label(r) + f" ({r.status})" for r in only_base),
        sorted(cell_label(r) + f" ({r.status})" for r in only_new),
        not_measured,
        len(ttft_of),
        cross,
    )
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
    """What to run when the data cannot answer: more repeats where a side had too few for a verdict, more
    requests per repeat where a tail could not be compared."""
    out = []
    few = sorted(
        {r.cell for r in c.rows if r.metric == "output_tps" and too_few_repeats((r.repeats_base, r.repeats_new))}
    )
    if few:
        out.append(
            f"{len(few)} cell(s) have fewer than {MIN_REPEATS} repeats on a side, so they get no verdict (one run's "
            "requests say nothing of run-to-run noise): rerun both folders with `--repeats 5` (e.g. `kvray run "
            "JOB.yaml --output DIR` with `repeats: 5` in the job, or `kvray bench … --repeats 5`)."
        )
    ttft = [r for r in c.rows if r.metric == "ttft_s"]
    small = sorted({r.cell for r in ttft} - {r.cell for r in ttft if r.stat == "p99"})
    if small:
        out.append(
            f"{len(small)} cell(s) hold fewer than 100 requests in a repeat, so their TTFT p99 is not compared (the "
            "test takes each repeat's own percentile, and a p99 needs 100 values): raise the requests per repeat "
            "(concurrency, or a serving load's request count) to 100 or more."
        )
    return out


def compare_dirs(
    base_dir: str | Path, new_dir: str | Path, alpha: float = ALPHA, min_change: float = MIN_CHANGE
) -> Comparison:
    """``compare_results`` of two results folders, each read as a Dataset (kvray.analysis.dataset)."""
    from kvray.analysis.dataset import Dataset

    base, new = Dataset.load(base_dir).results(), Dataset.load(new_dir).results()
    return compare_results(base, new, str(base_dir), str(new_dir), alpha, min_change)
