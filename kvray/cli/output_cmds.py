"""Commands that read a results folder and draw from it: ``plot`` (fig1–fig9) and ``report`` — no Ray, no torch."""

from __future__ import annotations

from typing import Annotated

import typer

from kvray.cli import render
from kvray.cli.options import ResultsDirArg


def plot(
    results_dir: ResultsDirArg,
    out: Annotated[str | None, typer.Option("--out", help="figures folder (default RESULTS_DIR/figures)")] = None,
) -> None:
    """Regenerate every figure from a results folder alone (no Ray, no torch): fig1 … fig7, PNG + SVG."""
    from kvray.figures.plots import make_figures
    from kvray.figures.server import server_figures_if_any

    render.figures(make_figures(results_dir, out) + server_figures_if_any(results_dir, out))


def report(
    results_dir: ResultsDirArg,
    no_figures: Annotated[
        bool, typer.Option("--no-figures", help="embed the figures already on disk instead of redrawing")
    ] = False,
) -> None:
    """Write report.md and a self-contained report.html: environment, a table per experiment, findings."""
    from kvray.report import make_report

    paths = make_report(results_dir, figures=not no_figures)
    render.figures(paths.figures)
    render.findings(paths.findings)
    render.line(f"wrote {paths.markdown} and {paths.html}")
