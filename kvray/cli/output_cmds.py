"""Commands that read a results folder and draw from it: ``plot`` (every figure) and ``report`` — no Ray, no torch.

A results folder may be an object-storage URI (``s3://bucket/prefix``): it is downloaded into a staging folder,
drawn from there, and what was drawn goes back up when the command ends (kvray/data/location.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kvray.cli import render
from kvray.cli.options import ResultsDirArg, output_option
from kvray.errors import KvrayInputError


def require_results(results_dir: str) -> list[dict[str, Any]]:
    """A folder's rows (cells.jsonl, without traces), at least one, checked before anything is drawn: a folder
    with no results is an input error (one line, exit 2), not seven empty figures and a report about nothing."""
    from pathlib import Path

    from kvray.data.layout import CELLS_JSONL
    from kvray.data.reader import read_results

    folder = Path(results_dir)
    if not folder.is_dir():
        raise KvrayInputError(f"{folder} is not a results folder (no such directory)")
    path = folder / CELLS_JSONL
    try:
        rows = read_results(folder, traces=False)
    except OSError as exc:
        raise KvrayInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (KeyError, TypeError, AttributeError):  # JSON lines that are not kvray rows
        rows = []
    from kvray.measure.trace import CellResult

    # A JSON line that is not a kvray row would fail deep inside a figure. A folder is one tool's output, so its
    # first and last rows stand for it: checking all of 10,000 would cost seconds before any figure.
    for row in rows[:50] + rows[50:][-50:]:
        try:
            CellResult.from_dict(row)
        except Exception as exc:
            raise KvrayInputError(
                f"{path}: the row of cell {str(row.get('cell_id'))[:40]!r} is not a kvray result ({type(exc).__name__})"
            ) from None
    if not rows:
        what = "is not readable as kvray rows" if path.is_file() else "does not exist"
        raise KvrayInputError(
            f"{folder} holds no results: {path} {what} (a results folder comes from kvray run, an exp command or bench)"
        )
    return rows


def plot(
    results_dir: ResultsDirArg,
    output: Annotated[str | None, output_option("figures folder or s3://… (default RESULTS_DIR/figures)")] = None,
    cell: Annotated[
        str | None, typer.Option("--cell", help="draw only this cell's timeline (fig10): requests, hardware, engine")
    ] = None,
) -> None:
    """Regenerate every figure from a results folder alone (no Ray, no torch): fig1–fig7 and each experiment's
    whose data the folder holds, PNG + SVG; ``--cell CELL_ID``: that cell's timeline, fig10."""
    from contextlib import ExitStack

    from kvray.data.location import check_writable_folder, is_uri, output_folder

    if output is not None and not is_uri(output):  # before the results are read or anything drawn
        check_writable_folder(output, f"--output {output}")
    with ExitStack() as stack:  # a URI: downloaded now, figures uploaded when the block ends
        folder = str(stack.enter_context(output_folder(results_dir, must_exist=True)))
        figures_dir = str(stack.enter_context(output_folder(output))) if output is not None else None
        _plot(folder, figures_dir, cell)
    dest = output if output is not None else f"{results_dir.rstrip('/')}/figures"
    if is_uri(dest):
        render.line(f"uploaded the figures to {dest}")


def _plot(results_dir: str, out: str | None, cell: str | None) -> None:
    from pathlib import Path

    from kvray.analysis.dataset import Dataset
    from kvray.data.location import check_writable_folder
    from kvray.figures.common import FIGURES_DIR

    records = require_results(results_dir)
    if out is None:  # the default, RESULTS_DIR/figures: the results folder itself may be read-only
        check_writable_folder(Path(results_dir) / FIGURES_DIR, f"{results_dir}/{FIGURES_DIR}")
    target = Path(out) if out is not None else Path(results_dir) / FIGURES_DIR
    dataset = Dataset.load(results_dir, records=records)
    if cell is not None:  # fig10 of one cell: its lines of traces.jsonl and timeline.jsonl only
        from kvray.figures.timeline import cell_timelines

        render.figures(cell_timelines(dataset, [cell], target))
        return
    from kvray.report import draw_figures

    render.figures(draw_figures(dataset, target))


def report(
    results_dir: ResultsDirArg,
    no_figures: Annotated[
        bool, typer.Option("--no-figures", help="embed the figures already on disk instead of redrawing")
    ] = False,
) -> None:
    """Write report.md and a self-contained report.html: environment, a table per experiment, findings."""
    from kvray.analysis.dataset import Dataset
    from kvray.data.location import check_writable_folder, is_uri, output_folder
    from kvray.report import make_report

    with output_folder(results_dir, must_exist=True) as folder:  # a URI: the report goes back up at the end
        records = require_results(str(folder))
        check_writable_folder(folder, f"{results_dir} (report.md, report.html)")
        if not no_figures:
            check_writable_folder(folder / "figures", f"{results_dir}/figures")
        paths = make_report(folder, figures=not no_figures, dataset=Dataset.load(folder, records=records))
        render.figures(paths.figures)
        render.findings(paths.findings)
        shown = results_dir.rstrip("/") if is_uri(results_dir) else None
        render.line(
            f"wrote {shown}/{paths.markdown.name} and {shown}/{paths.html.name}"
            if shown
            else f"wrote {paths.markdown} and {paths.html}"
        )
