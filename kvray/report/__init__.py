"""``report.md`` and a self-contained ``report.html`` from a results folder alone (no Ray, no torch).

The one way from a dataset to its outputs: ``make_report`` loads the folder once (kvray.analysis.dataset),
draws every figure through ``draw_figures`` (the registered experiments' and the general ones — the same list
``kvray plot`` draws), computes the findings, and composes the page from blocks (kvray/document/): summary,
environment, findings, each experiment's own section (kvray/experiments/), the rest. The report only composes:
it draws nothing itself and reads no file but through the Dataset.
"""

from kvray.report.compose import ReportPaths, build_blocks, draw_figures, make_all, make_report

__all__ = ["ReportPaths", "build_blocks", "draw_figures", "make_all", "make_report"]
