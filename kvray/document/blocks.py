"""A page as a list of blocks, the formatting of a table cell, the one-row-per-cell table and figure blocks.

Every number a section shows goes through the ``fmt_*`` helpers here, so "—" always means "this row has no
number" and a percentile always says how many samples it pools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.analysis.views import View, as_number, peak_memory, series_labels
from kvray.units import human_bytes


@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | ul | table | figure
    text: str = ""
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None  # figure PNG
    svg: Path | None = None


# A table cell: the value formatted, or "—" where the row has no number.


def fmt_bytes(v: Any) -> str:
    return human_bytes(float(v)) if as_number(v) is not None else "—"


def fmt_ms(v: Any) -> str:
    return f"{float(v) * 1e3:,.1f}" if as_number(v) is not None else "—"


def fmt_num(v: Any, digits: int = 1) -> str:
    return f"{float(v):,.{digits}f}" if as_number(v) is not None else "—"


def fmt_pct(v: Any) -> str:
    return f"{float(v):+.2%}" if as_number(v) is not None else "—"


def fmt_percentile(r: Any, column: str) -> str:
    """A latency percentile in ms with its 95 % interval and the number of samples it pools:
    "12.3 [11.9–12.8] (n=24)"; a percentile the sample cannot hold is shown as what it is: "max 14.1 of 9"."""
    from kvray.measure.metrics import min_samples

    metric, pct = column.rsplit("_p", 1)
    n = as_number(r.get(metric + "_n"))
    if n is not None and n < min_samples(float(pct)) and as_number(r.get(metric + "_max")) is not None:
        return f"max {fmt_ms(r[metric + '_max'])} of {int(n)}"
    value = fmt_ms(r[column])
    low, high = as_number(r.get(column + "_ci_low")), as_number(r.get(column + "_ci_high"))
    if value != "—" and low is not None and high is not None:
        value += f" [{fmt_ms(low)}–{fmt_ms(high)}]"
    return value if value == "—" or n is None else f"{value} (n={int(n)})"


def fmt_tps(r: Any) -> str:
    """Mean output tok/s with its 95 % interval over repeats: "512.3 [498.1–526.5] (3 rep)"; one repeat: "(1 rep)"."""
    value = fmt_num(r["output_tps"])
    low, high, n = (as_number(r.get(k)) for k in ("output_tps_ci_low", "output_tps_ci_high", "output_tps_n"))
    if value != "—" and low is not None and high is not None:
        value += f" [{fmt_num(low)}–{fmt_num(high)}]"
    return value if value == "—" or n is None else f"{value} ({int(n)} rep)"


def fmt_failed(r: Any) -> str:
    """Failed requests of all measured repeats: "0", or "2/24 (8.3%)"."""
    failed, total = as_number(r.get("requests_failed")), as_number(r.get("requests"))
    if failed is None or total is None:
        return "—"
    return "0" if failed == 0 else f"{int(failed)}/{int(total)} ({failed / total:.1%})"


CELL_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("c", lambda r: fmt_num(r["concurrency"], 0)),  # an open loop has none: "—"
    ("prompt", lambda r: str(r["prompt_toks_list"]) if r["workload"] == "mixed" else f"{int(r['prompt_toks'])}"),
    ("gen", lambda r: f"{int(r['gen_toks'])}"),
    ("status", lambda r: str(r["status"]) + (" ⚠" if r.get("_suspect") else "")),
    ("peak mem", lambda r: fmt_bytes(peak_memory(r)[0])),
    ("KV measured", lambda r: fmt_bytes(r["kv_measured_bytes"])),
    ("KV predicted", lambda r: fmt_bytes(r["kv_predicted_bytes"])),
    ("KV error", lambda r: fmt_pct(r["kv_rel_error"])),
    ("out tok/s [95 % CI]", fmt_tps),
    ("failed", fmt_failed),  # beside the latencies: they pool only the successful requests
    ("TTFT p50 ms [95 % CI]", lambda r: fmt_percentile(r, "ttft_s_p50")),
    ("TTFT p99 ms", lambda r: fmt_percentile(r, "ttft_s_p99")),
    ("TPOT p50 ms", lambda r: fmt_percentile(r, "tpot_s_p50")),
    ("E2E p99 ms", lambda r: fmt_percentile(r, "e2e_s_p99")),
)


def cell_table(view: View, rows: Any, sort: tuple[str, ...], suspects: set[str] | None = None) -> Block:
    """One row per cell; the series column only when the dataset holds several series; a sanity warning's
    suspect cells marked ⚠ beside their status."""
    headers = (["series"] if view.series_keys else []) + [name for name, _ in CELL_COLUMNS]
    body = []
    labelled = rows.assign(
        _series=series_labels(view, rows),
        _suspect=rows["cell_id"].astype(str).isin(suspects or set()),
    )
    for row in labelled.sort_values(["_series", *sort]).to_dict("records"):  # dicts: a pandas row each cost ms
        body.append(([str(row["_series"])] if view.series_keys else []) + [fn(row) for _, fn in CELL_COLUMNS])
    return Block("table", headers=headers, rows=body)


@dataclass
class FigureBlocks:
    """Figure name → its block (the PNG, a link to its SVG, the figure's notes as caption); none where the PNG is
    not on disk. ``figures``: the FigureResults drawn this time (their notes), by name."""

    fig_dir: Path
    figures: list[Any] = field(default_factory=list)  # kvray.figures.common.FigureResult

    def __call__(self, name: str) -> list[Block]:
        png, svg = self.fig_dir / f"{name}.png", self.fig_dir / f"{name}.svg"
        if not png.is_file():
            return []
        result = next((f for f in self.figures if f.name == name), None)
        caption = name + (": " + "; ".join(result.notes) if result is not None and result.notes else "")
        return [Block("figure", caption, path=png, svg=svg if svg.is_file() else None)]
