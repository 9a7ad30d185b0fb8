"""The figure of ``kvray compare``: every compared statistic's relative change with its 95 % interval.

One row per (cell, statistic), a dot at the change and a bar over its interval, coloured by the verdict
(slower red, faster green, no significant change grey, not testable hollow), a shaded band of ±min_change (the
smallest change the verdict calls one) and, with ``--fail-on-regression``, a dashed line at the gate. Throughput
rows are drawn as "higher is better" too: a slower throughput points left like a slower latency points right,
so the x axis is the change in *time*: latency change, or −throughput change.
"""

from __future__ import annotations

import math
from pathlib import Path

from kvray.analysis.compare import FASTER, SAME, SLOWER, Comparison, Row, short_labels
from kvray.figures import common

COMPARE_FIGURE = "compare_changes"
VERDICT_COLORS = {SLOWER: "#C0392B", FASTER: "#009E73", SAME: "#7F7F7F"}
MAX_ROWS = 60  # one figure stays readable; the tables list every row


def _slowdown(row: Row, value: float) -> float:
    """A change as "how much slower", in %: a latency's own change, a throughput's change negated."""
    return value * 100 if row.unit == "s" else -value * 100


def draw_changes(comparison: Comparison, out_dir: Path, fail_pct: float | None = None) -> common.FigureResult:
    rows = [r for r in comparison.rows if r.change == r.change]
    rows = sorted(rows, key=lambda r: (r.verdict != SLOWER, r.verdict != FASTER, r.cell, r.metric))[:MAX_ROWS]
    height = min(2.0 + 0.22 * max(len(rows), 1), 16.0)
    title = ("Changes, new vs base (95 % intervals)", f"{comparison.base_dir} → {comparison.new_dir}")
    with common.new_figure(COMPARE_FIGURE, out_dir, 1, 1, figsize=(9.0, height), title=title) as d:
        ax, result = d.axes, d.result
        if not rows:
            return d.missing("No shared measured cell to compare.", "nothing to compare")
        labels = []
        shared, short = short_labels([r.cell for r in rows])
        for i, r in enumerate(reversed(rows)):
            y = i
            color = VERDICT_COLORS.get(r.verdict, "#333333")
            x = _slowdown(r, r.change)
            lo, hi = sorted((_slowdown(r, r.ci_low), _slowdown(r, r.ci_high)))
            if lo == lo and hi == hi:
                ax.plot([lo, hi], [y, y], color=color, linewidth=1.6, solid_capstyle="butt", gid="ci")
            face = color if r.verdict in VERDICT_COLORS else "white"
            ax.plot([x], [y], "o", color=color, markerfacecolor=face, markersize=4.5, gid=f"change-{r.verdict}")
            labels.append(f"{short[r.cell]} · {r.label}"[:90])
        ax.set_yticks(range(len(rows)), labels, fontsize=6.5)
        band = comparison.min_change * 100
        ax.axvspan(-band, band, color="#EEEEEE", zorder=0, label=f"±{band:g} %: below the smallest change called one")
        ax.axvline(0, color="#444444", linewidth=0.8)
        if fail_pct is not None and math.isfinite(fail_pct):
            ax.axvline(
                fail_pct,
                color=VERDICT_COLORS[SLOWER],
                linestyle="--",
                linewidth=1.0,
                label=f"--fail-on-regression {fail_pct:g} %",
            )
        ax.set_xlabel("slower by (%): latency change; throughput change with its sign flipped")
        ax.set_ylim(-0.8, len(rows) - 0.2)
        ax.legend(loc="lower right", fontsize=7)
        if shared:
            result.notes.append(f"every cell: {shared}")
        counts = {v: sum(1 for r in comparison.rows if r.verdict == v) for v in (SLOWER, FASTER, SAME)}
        result.series = [f"{n} {v}" for v, n in counts.items()]
        result.notes.append(
            f"{counts[SLOWER]} slower, {counts[FASTER]} faster, {counts[SAME]} no significant change "
            f"(Holm-adjusted p < {comparison.alpha:g} and |change| ≥ {band:g} %)"
        )
        if comparison.untestable_line():  # hollow dots without an interval: a point change, no verdict
            result.notes.append(comparison.untestable_line())
        if len([r for r in comparison.rows if r.change == r.change]) > MAX_ROWS:
            result.notes.append(f"first {MAX_ROWS} rows drawn (changes first); compare.md lists them all")
    return result
