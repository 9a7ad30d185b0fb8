"""``kvray compare BASE_DIR NEW_DIR``: before/after, with statistics (kvray.analysis.compare), for people and CI.

Writes ``compare.md``, a self-contained ``compare.html`` (the figure embedded as base64 PNG, like report.html)
and the figure ``compare_changes.png|svg`` into ``--output`` (default NEW_DIR/compare); ``--json`` prints the
whole comparison as one object instead of the summary. Exit codes: 0 when nothing regressed significantly by
more than ``--fail-on-regression PCT`` (always 0 without the flag), 1 when something did, 2 for bad input.
Everything heavy (numpy, matplotlib) is imported inside the command: ``kvray --help`` stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from kvray.errors import KvrayInputError

COMPARE_MD = "compare.md"
COMPARE_HTML = "compare.html"


def compare(
    base_dir: Annotated[str, typer.Argument(metavar="BASE_DIR", help="the results folder before the change")],
    new_dir: Annotated[str, typer.Argument(metavar="NEW_DIR", help="the results folder after it")],
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object instead of the summary")] = False,
    fail_on_regression: Annotated[
        float | None,
        typer.Option(
            "--fail-on-regression",
            metavar="PCT",
            help="exit 1 when any metric is significantly worse by more than PCT per cent",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "--out", help="where compare.md/.html go, a folder or s3://… (default NEW_DIR/compare)"
        ),
    ] = None,
    min_change: Annotated[
        float, typer.Option("--min-change", metavar="PCT", help="smallest change called one, per cent (default 5)")
    ] = 5.0,
) -> int:
    """Compare two results folders cell by cell: change, 95 % interval, faster / slower / no significant change."""
    from contextlib import ExitStack

    from kvray.data.location import is_uri, output_folder

    if fail_on_regression is not None and not (0 <= fail_on_regression < math.inf):
        raise KvrayInputError(f"--fail-on-regression must be a percentage >= 0, got {fail_on_regression}")
    if not (0 <= min_change < 100):
        raise KvrayInputError(f"--min-change must be a percentage in [0, 100), got {min_change}")
    # Object-storage folders (s3://…) are downloaded into staging folders; what compare writes goes back up at
    # the end: into NEW_DIR/compare (NEW_DIR's staging is uploaded) or --output. BASE_DIR is only read.
    with ExitStack() as stack:
        base = stack.enter_context(output_folder(base_dir, upload=False, must_exist=True))
        new = stack.enter_context(output_folder(new_dir, upload=output is None, must_exist=True))
        out_dir = stack.enter_context(output_folder(output)) if output else new / "compare"
        shown_out = output if output else f"{new_dir.rstrip('/')}/compare"
        return _compare(
            base,
            new,
            out_dir,
            json_out=json_out,
            fail_on_regression=fail_on_regression,
            min_change=min_change,
            names=(base_dir, new_dir),
            shown_out=shown_out if is_uri(shown_out) else None,
        )


def _compare(
    base_dir: Path,
    new_dir: Path,
    out_dir: Path,
    *,
    json_out: bool,
    fail_on_regression: float | None,
    min_change: float,
    names: tuple[str, str],
    shown_out: str | None,
) -> int:
    """``compare`` on local folders (staging copies of URIs); ``names``: base and new as the user named them;
    ``shown_out``: the URI the outputs are uploaded to, if they are."""
    import dataclasses

    from kvray.cli.output_cmds import require_results

    for folder in (base_dir, new_dir):
        require_results(str(folder))
    if out_dir.exists() and not out_dir.is_dir():
        raise KvrayInputError(f"--output {out_dir} is a file, not a folder")

    from kvray.analysis.compare import compare_dirs

    comparison = compare_dirs(base_dir, new_dir, min_change=min_change / 100)
    # compare.md names the folders as the user did (a URI, not its staging copy)
    comparison = dataclasses.replace(comparison, base_dir=names[0], new_dir=names[1])
    md_path, html_file = write_compare(comparison, out_dir, fail_on_regression)
    md, html_path = (
        (f"{shown_out}/{md_path.name}", f"{shown_out}/{html_file.name}") if shown_out else (md_path, html_file)
    )
    regressions = comparison.regressions(fail_on_regression) if fail_on_regression is not None else []
    if json_out:
        from kvray.cli import render

        data = comparison.to_json()
        data.update(
            outputs={"markdown": str(md), "html": str(html_path)},
            fail_on_regression=fail_on_regression,
            regressions=len(regressions),
        )
        render.print_json(data)
    else:
        _summary(comparison, md, html_path, fail_on_regression, regressions)
    return 1 if regressions else 0


def _summary(comparison: Any, md: Path | str, html_path: Path | str, pct: float | None, regressions: list[Any]) -> None:
    from kvray.cli import render

    counts = comparison.to_json()["counts"]
    render.line(
        soft_wrap=True,
        text=f"{comparison.cells_compared} shared cell(s) compared: {counts['slower']} slower, {counts['faster']} faster, "
        f"{counts['no significant change']} no significant change, {counts['not testable']} not testable",
    )
    if comparison.untestable_line():  # why, and what it would take: "3 metrics not testable: 1 repeat a side, need 3"
        render.line(soft_wrap=True, text=comparison.untestable_line())
    for r in [r for r in comparison.rows if r.verdict in ("slower", "faster")][:20]:
        render.line(soft_wrap=True, text=f"  {r.verdict:7s} {r.label:16s} {_fmt_change(r)}  {r.cell}")
    for text, items in (
        ("only in base", comparison.only_base),
        ("only in new", comparison.only_new),
        ("not measured on a side", comparison.not_measured),
    ):
        if items:
            render.line(
                soft_wrap=True,
                text=f"{len(items)} cell(s) {text}: " + "; ".join(items[:5]) + (" …" if len(items) > 5 else ""),
            )
    if pct is not None:
        render.line(soft_wrap=True, text=_gate_line(comparison, pct, regressions))
    render.line(soft_wrap=True, text=f"wrote {md} and {html_path}")


def _gate_line(comparison: Any, pct: float, regressions: list[Any]) -> str:
    """What ``--fail-on-regression`` decided, and which rows it could not judge (they never fail the gate)."""
    text = (
        f"--fail-on-regression {pct:g}: {len(regressions)} regression(s) beyond {pct:g} %"
        if regressions
        else f"--fail-on-regression {pct:g}: no significant regression beyond {pct:g} %"
    )
    untested = sum(comparison.untestable().values())
    if untested:
        text += f" ({untested} not testable metric(s) not gated: {comparison.untestable_line().split(': ', 1)[1]})"
    return text


# ---------------------------------------------------------------- compare.md / compare.html


def _fmt_value(v: float, unit: str) -> str:
    if v != v:
        return "—"
    return f"{v * 1e3:,.2f} ms" if unit == "s" else f"{v:,.1f}"


def _fmt_change(r: Any) -> str:
    if r.change != r.change:
        return "—"
    ci = f" [{r.ci_low:+.1%}, {r.ci_high:+.1%}]" if r.ci_low == r.ci_low else ""
    return f"{r.change:+.1%}{ci}"


def _fmt_p(p: float) -> str:
    return "—" if p != p else f"{p:.2g}"


def write_compare(comparison: Any, out_dir: Path, fail_pct: float | None) -> tuple[Path, Path]:
    """compare.md, compare.html and the figure; the same blocks rendered twice (kvray.document)."""
    from kvray.analysis.compare import MIN_REPEATS, short_labels
    from kvray.document import Block, render_html, render_markdown
    from kvray.figures.compare import draw_changes
    from kvray.figures.style import styled

    out_dir.mkdir(parents=True, exist_ok=True)
    with styled():
        figure = draw_changes(comparison, out_dir / "figures", fail_pct)
    c = comparison
    blocks = [Block("h1", "kvray compare"), Block("p", f"Base `{c.base_dir}` → new `{c.new_dir}`.")]
    counts = c.to_json()["counts"]
    blocks.append(
        Block(
            "p",
            (
                f"{c.cells_compared} shared cell(s) compared: **{counts['slower']} slower, {counts['faster']} faster**, "
                f"{counts['no significant change']} no significant change, {counts['not testable']} not testable. A verdict "
                f"is faster/slower only when the Holm-adjusted p-value (over all {len(c.rows)} rows) is below {c.alpha:g} "
                f"and the change is at least {c.min_change:.0%}; intervals are {c.ci_level:.0%} (docs/metrics.md). A "
                f"verdict needs {MIN_REPEATS} repeats a side: the repeats are the test's units."
            ),
        )
    )
    if c.untestable_line():
        blocks.append(Block("p", c.untestable_line() + "."))
    if fail_pct is not None:
        blocks.append(Block("p", f"`{_gate_line(c, fail_pct, c.regressions(fail_pct))}`."))
    blocks.append(Block("h2", "What changed"))
    changed = [f"{k}: {a} → {b}" for k, (a, b) in c.changed.items()]
    if c.cross_hardware:
        changed.insert(0, "hardware: the cells were joined across hardware types (each folder ran on one)")
    blocks.append(Block("ul", items=changed) if changed else Block("p", "No setting kvray records differs."))
    for cell, diff in c.changed_per_cell.items():
        blocks.append(Block("p", f"{cell} also: " + "; ".join(f"{k}: {a} → {b}" for k, (a, b) in diff.items())))
    blocks.append(Block("h2", "Changes"))
    common, short = short_labels([r.cell for r in c.rows])
    if common:
        blocks.append(Block("p", f"Every compared cell: {common}."))
    headers = [
        "cell",
        "metric",
        "base",
        "new",
        "n base / new",
        "repeats",
        "change [95 % CI]",
        "p (Holm)",
        "test",
        "verdict",
    ]
    body = [
        [
            short[r.cell],
            r.label,
            _fmt_value(r.base, r.unit),
            _fmt_value(r.new, r.unit),
            f"{r.n_base} / {r.n_new}",
            f"{r.repeats_base} / {r.repeats_new}",
            _fmt_change(r),
            _fmt_p(r.p_adjusted),
            r.test,
            r.verdict + (f" ({r.note})" if r.note else ""),
        ]
        for r in c.rows
    ]
    blocks.append(Block("table", headers=headers, rows=body) if body else Block("p", "No shared measured cell."))
    png = out_dir / "figures" / "compare_changes.png"
    if png.is_file():
        svg = png.with_suffix(".svg")
        blocks.append(
            Block("figure", "compare_changes: " + "; ".join(figure.notes), path=png, svg=svg if svg.is_file() else None)
        )
    for title, items in (
        ("Only in base (not compared)", c.only_base),
        ("Only in new (not compared)", c.only_new),
        ("Shared but not measured on a side", c.not_measured),
    ):
        if items:
            blocks += [Block("h2", title), Block("ul", items=list(items))]
    if c.advice:
        blocks += [Block("h2", "To answer more"), Block("ul", items=list(c.advice))]
    md, html_path = out_dir / COMPARE_MD, out_dir / COMPARE_HTML
    md.write_text(render_markdown(blocks, out_dir))
    html_path.write_text(render_html(blocks, out_dir))
    return md, html_path
