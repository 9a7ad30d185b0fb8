"""``kvray validate``: replay a folder's measured cells on the simulator and print the error per cell and metric."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvray.cli import render
from kvray.cli.options import JsonOpt, output_option


def validate(
    measured_dirs: Annotated[
        list[str],
        typer.Argument(
            metavar="MEASURED_DIR...",
            help="a results folder with measured cells (cells.jsonl); several: rounds of one held-out job "
            "(each cell's median over rounds, the range over rounds beside it)",
        ),
    ],
    calibration: Annotated[
        str | None,
        typer.Option("--calibration", metavar="FILE", help="calibration file (default $KVRAY_CALIBRATION)"),
    ] = None,
    as_json: JsonOpt = False,
    output: Annotated[
        str | None, output_option("also write validation.json and the figure here", metavar="DIR")
    ] = None,
) -> None:
    """Predict every measured cell of a folder with the simulator: measured, predicted, error per metric."""
    from kvray.analysis.validate import validate as run

    measured_dir = " + ".join(measured_dirs)
    result = run(measured_dirs, calibration)
    record = result.to_dict()
    if output is not None:
        import json

        from kvray.figures.validation import draw_validation

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "validation.json").write_text(json.dumps(record, indent=1))
        draw_validation(
            result.rows,
            out,
            "Simulator vs measured: every cell replayed",
            f"{measured_dir} · calibration {result.calibration}",
        )
    if as_json:
        render.print_json(record)
        return
    _table(result, measured_dir)
    if output is not None:
        render.note(f"wrote {Path(output) / 'validation.json'} and validation.png / .svg")


def _table(result: Any, measured_dir: str) -> None:
    columns = ("cell", "metric", "measured", "predicted", "error", "spread")
    table = render.simple_table(f"Validation of {measured_dir}", columns, left=("cell", "metric"))
    for r in result.rows:
        err = "—" if r["rel_error"] is None else f"{r['rel_error']:+.1%}" + (" (left out)" if r.get("excluded") else "")
        label = result.labels.get(r["cell"], r["cell"])
        spread = result.spread.get(r["cell"], {}).get(r["metric"])
        shown = "—" if spread is None else f"{spread:.1%}"
        table.add_row(label, r["metric"], f"{r['measured']:.4g}", f"{r['predicted']:.4g}", err, shown)
    out = render.console(min_width_when_piped=120)
    out.print(table)
    if result.rounds > 1:
        render.note(
            f"error: predicted / measured − 1, measured the median over {result.rounds} rounds; "
            "spread: (max − min) / median over the rounds"
        )
    else:
        render.note("error: predicted / measured − 1; spread: (max − min) / median over the measured repeats")
    reasons = sorted({r["excluded"] for r in result.rows if r.get("excluded")})
    for why in reasons:
        render.note(f"left out of the summary: {why}")
    median, worst = result.median_abs_rel_error(), result.worst_abs_rel_error()
    summary = "; ".join(f"{m} {median[m]:.1%} (worst {worst[m]:.1%})" for m in median) or "nothing compared"
    skipped = ", ".join(f"{n} {why}" for why, n in result.skipped.items())
    render.line(
        f"{result.cells} cells; median |error| {summary}" + (f"; skipped {skipped}" if skipped else ""), soft_wrap=True
    )
