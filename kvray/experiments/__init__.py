"""The experiments, one module each (exp1.py … exp7.py), and their registry (base.py).

Each module declares its experiment once — name, job builder from flags, CLI options, figures, report section,
findings — as ``EXPERIMENT``; ``kvray expN``, ``kvray plot`` and the report read ``experiments()``. A stage
after figures and before the report: it may import the planner, the analysis and the figures; the planner never
imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvray.experiments.base import Experiment, Flags, Page, experiments, get, register, unregister

if TYPE_CHECKING:
    from kvray.analysis.evidence import Finding
    from kvray.analysis.findings import FindingRule
    from kvray.analysis.views import View

__all__ = [
    "Experiment",
    "Flags",
    "Page",
    "compute_findings",
    "experiments",
    "finding_rules",
    "get",
    "register",
    "unregister",
]


def finding_rules() -> list[FindingRule]:
    """Every finding rule in report order: the general ones first and last, each experiment's between."""
    from kvray.analysis.findings import GENERAL_FIRST, GENERAL_LAST

    own = [rule for exp in experiments() if exp.findings is not None for rule in exp.findings()]
    return [*GENERAL_FIRST, *own, *GENERAL_LAST]


def compute_findings(view: View) -> list[Finding]:
    """Every finding the data supports: the registered experiments' and the general ones, in report order."""
    from kvray.analysis import findings

    return findings.compute_findings(view, [r for exp in experiments() if exp.findings for r in exp.findings()])
