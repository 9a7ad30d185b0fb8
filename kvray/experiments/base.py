"""What an experiment is, and the registry of them.

An ``Experiment`` declares everything kvray does with it: its name (the ``kvray expN`` command, the job's and the
cells' ``experiment``), its job built from the command's flags (``build``: its parameters after ``flags`` are
the command's own options, as Typer reads them), the figures its report section embeds and how they are drawn,
its report section, and the findings it states. The CLI's exp commands, ``kvray plot`` and the report read the
registry (``experiments()``), so a new experiment is one new module ``kvray/experiments/expN.py`` that defines
``EXPERIMENT`` — found by ``experiments()`` on first use — or an ``Experiment`` passed to ``register``.

Nothing heavy at import: the modules import the planner, pandas and matplotlib inside their functions, because
the CLI reads the registry on every start (``kvray --help``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.analysis.findings import FindingRule
    from kvray.document import Block, FigureBlocks
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job


class Flags(Protocol):
    """What ``build`` receives first: the flags every exp command shares (kvray/cli/options.py ExperimentFlags)."""

    def common(
        self,
        backends: Sequence[str] | None,
        default_backends: Sequence[str] = ("hf",),
        extra_options: Sequence[str] = (),
    ) -> Common: ...


@dataclass
class Page:
    """What a report section is drawn from: the dataset, the figures on disk by name, and the cells a sanity
    warning calls suspect (marked ⚠ in the tables)."""

    dataset: Dataset
    figure: FigureBlocks
    suspects: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Experiment:
    """One experiment, declared once (module docstring). ``build(flags, **options) -> (job, notes)``: notes are
    lines printed before the run (a prompt length dropped, a degree the model refuses)."""

    name: str  # "exp1"
    title: str  # the report's heading: "Exp1 — concurrency sweep"
    build: Callable[..., tuple[Job, list[str]]]
    # Figures its section embeds, in order: names of files in RESULTS_DIR/figures, or globs ("exp7_tp_scaling_*").
    figures: tuple[str, ...] = ()
    # Draws its figures into a folder; None: drawn by the report's general figures (fig1–fig7, kvray.figures.plots).
    draw: Callable[[Dataset, Path], list[Any]] | None = None
    # Its report section; None: the default (kvray/experiments/sections.py: a table of its cells, then its figures).
    section: Callable[[Experiment, Page], list[Block]] | None = None
    # The rules of the findings it states (kvray.analysis.findings.FindingRule), returned by a function: they
    # import the analysis stage (numpy), which a `kvray --help` must not.
    findings: Callable[[], Sequence[FindingRule]] | None = None
    table_sort: tuple[str, ...] = ("workload", "concurrency", "prompt_toks")  # its cell table's order, after series

    @classmethod
    def of_module(cls, module: Mapping[str, Any], title: str, **declared: Any) -> Experiment:
        """The experiment a module ``kvray/experiments/expN.py`` declares by its names: ``expN`` (the module's),
        its ``build``, and its ``draw``, ``section`` and ``findings`` where it defines them; ``declared`` adds the
        rest (figures, table_sort). ``EXPERIMENT = Experiment.of_module(globals(), "Exp1 — …", figures=(…))``."""
        own = {key: module[key] for key in ("draw", "section", "findings") if key in module}
        name = str(module["__name__"]).rpartition(".")[2]
        return cls(name=name, title=title, build=module["build"], **{**own, **declared})

    @property
    def summary(self) -> str:
        """The command's help: ``build``'s docstring."""
        return (self.build.__doc__ or self.title).strip()


_REGISTRY: dict[str, Experiment] = {}
_FOUND = False


def _number(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"exp(\d+)", name)
    return (int(match.group(1)) if match else 10**9, name)


def _discover() -> None:
    """Import every ``kvray/experiments/expN.py`` once and register its ``EXPERIMENT``."""
    global _FOUND
    if _FOUND:
        return
    _FOUND = True
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if re.fullmatch(r"exp\d+", info.name):
            module = importlib.import_module(f"kvray.experiments.{info.name}")
            _REGISTRY.setdefault(module.EXPERIMENT.name, module.EXPERIMENT)


def register(experiment: Experiment) -> Experiment:
    """Add (or replace) an experiment; returned, so a module may write ``EXPERIMENT = register(Experiment(…))``."""
    _discover()
    _REGISTRY[experiment.name] = experiment
    return experiment


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def experiments() -> list[Experiment]:
    """Every registered experiment, exp1, exp2, … first, then any other by name."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda e: _number(e.name))


def get(name: str) -> Experiment:
    _discover()
    return _REGISTRY[name]
