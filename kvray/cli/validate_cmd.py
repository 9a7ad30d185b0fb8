"""``kvray validate``: replay a folder's measured cells on the simulator and print the error per cell and metric."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvray.cli import render
from kvray.cli.options import JsonOpt, output_option


def validate(
    measured_dir: Annotated[str, typer.Argument(help="a results folder with measured cells (cells.jsonl)")],
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

    result = run(measured_dir, calibration)
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
    columns = ("cell", "metric", "measured", "predicted", "error", "repeat spread")
    table = render.simple_table(f"Validation of {measured_dir}", columns, left=("cell", "metric"))
    for r in result.rows:
        err = "—" if r["rel_error"] is None else f"{r['rel_error']:+.1%}"
        label = result.labels.get(r["cell"], r["cell"])
        spread = result.spread.get(r["cell"], {}).get(r["metric"])
        shown = "—" if spread is None else f"{spread:.1%}"
        table.add_row(label, r["metric"], f"{r['measured']:.4g}", f"{r['predicted']:.4g}", err, shown)
    out = render.console(min_width_when_piped=120)
    out.print(table)
    render.note("error: predicted / measured − 1; repeat spread: (max − min) / median over the measured repeats")
    median, worst = result.median_abs_rel_error(), result.worst_abs_rel_error()
    summary = "; ".join(f"{m} {median[m]:.1%} (worst {worst[m]:.1%})" for m in median) or "nothing compared"
    skipped = ", ".join(f"{n} {why}" for why, n in result.skipped.items())
    render.line(
        f"{result.cells} cells; median |error| {summary}" + (f"; skipped {skipped}" if skipped else ""), soft_wrap=True
    )
