"""The report section an experiment gets unless it declares its own: every cell of it in one table (the series
column where the dataset holds several), the cells that did not fit and why, then its figures.

Empty of cells, the section says so and which command fills it, so a reader sees every experiment kvray has.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.document import Block
    from kvray.experiments.base import Experiment, Page


def cells_blocks(exp: Experiment, page: Page) -> list[Block]:
    """The heading, the cell table and the list of cells that did not fit (with the reason each gave)."""
    from kvray.document import Block

    blocks = cell_rows_blocks(exp, page)
    if not blocks:
        blocks = [Block("p", f"No {exp.name} cells in this dataset (`kvray {exp.name} --help`).")]
    return [Block("h2", exp.title), *blocks]


def cell_rows_blocks(exp: Experiment, page: Page) -> list[Block]:
    """The experiment's cell table and the cells that did not fit; none without cells."""
    from kvray.analysis.views import OOM_STATUSES, experiment_rows
    from kvray.document import Block, cell_table
    from kvray.document.blocks import fmt_num

    view = page.dataset.view
    rows = experiment_rows(view, exp.name)
    if not len(rows):
        return []
    blocks = [cell_table(view, rows, exp.table_sort, page.suspects)]
    ooms = rows[rows["status"].isin(OOM_STATUSES) & rows["reason"].astype(bool)]
    if len(ooms):
        blocks.append(Block("p", "Cells that did not fit (the reason each gave):"))
        blocks.append(
            Block(
                "ul",
                items=[
                    f"{view.series_label(r) + ': ' if view.series_keys else ''}{r['status']} at c={fmt_num(r['concurrency'], 0)}"
                    f" × {r['prompt_toks_list'] if r['workload'] == 'mixed' else int(r['prompt_toks'])} prompt tokens"
                    f" — {str(r['reason'])[:240]}"
                    for _, r in ooms.head(8).iterrows()
                ],
            )
        )
    return blocks


def figure_blocks(exp: Experiment, page: Page) -> list[Block]:
    """The experiment's figures found on disk, in its order (a glob names every match, sorted)."""
    blocks: list[Block] = []
    for pattern in exp.figures:
        names = sorted(p.stem for p in page.figure.fig_dir.glob(f"{pattern}.png")) if "*" in pattern else [pattern]
        for name in names:
            blocks += page.figure(name)
    return blocks


def default_section(exp: Experiment, page: Page) -> list[Block]:
    return cells_blocks(exp, page) + figure_blocks(exp, page)


def section_of(exp: Experiment) -> Callable[[Experiment, Page], list[Block]]:
    return exp.section or default_section


def every_cell_blocks(exp: Experiment, page: Page) -> list[Block]:
    """ "Every expN cell" and its table, after a section of its own; none without cells."""
    from kvray.document import Block

    cell_rows = cell_rows_blocks(exp, page)
    return [Block("h3", f"Every {exp.name} cell"), *cell_rows] if cell_rows else []


def view_drawn(*names: str) -> dict[str, Any]:
    """``figures`` and ``draw`` of an experiment whose figures are of the fig1–fig7 family: ``Experiment(…,
    **view_drawn("fig1_mem_vs_concurrency", …))``."""
    return {"figures": names, "draw": view_figures(*names)}


def view_figures(*names: str) -> Callable[[Dataset, Path], list[Any]]:
    """An experiment's ``draw`` for figures of the fig1–fig7 family (kvray/figures/plots.py), drawn from the View
    for every folder — an empty sweep's figure says which command fills it."""

    def draw(dataset: Dataset, out_dir: Path) -> list[Any]:
        from kvray.figures.plots import plot_view

        return plot_view(dataset.view, out_dir, names)

    return draw
