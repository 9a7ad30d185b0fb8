"""The pipeline holds: no import cycle in kvray/, and no module imports a later stage than its own.

Stages are written once, in kvray/layers.py. Every import counts, lazy ones inside functions included, since
a lazy import of a later stage is the same tangle, only deferred.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvray.layers import STAGE_NAMES, stage_of

ROOT = Path(__file__).resolve().parents[1] / "kvray"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, root: Path) -> bool:
    path = root.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def kvray_imports(source: str, module: str, is_package: bool, root: Path = ROOT) -> set[str]:
    """Every kvray module ``source`` imports (``from kvray.x import y`` counts y when y is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kvray")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kvray":
                continue
            modules = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}", root)]
            found.update(modules if len(modules) == len(node.names) else [target, *modules])
    found.discard(module)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    return {
        module_name(p, root): kvray_imports(p.read_text(), module_name(p, root), p.name == "__init__.py", root)
        for p in sorted(root.rglob("*.py"))
    }


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imports in graph.items():
        own = stage_of(module)
        if own is None:
            continue
        for target in sorted(imports):
            theirs = stage_of(target)
            if theirs is not None and theirs > own:
                bad.append(f"{module} ({STAGE_NAMES[own]}) imports {target} ({STAGE_NAMES[theirs]}, a later stage)")
    return bad


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles among modules (Tarjan's strongly connected components of size > 1, or self-loops)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its own modules is not a cycle with them: fold the edge from a
    submodule to its own package __init__ (``from kvray.backends import X`` inside kvray.backends.hf is
    checked as the modules it names)."""
    out = {}
    for module, imports in graph.items():
        out[module] = {t for t in imports if not (module.startswith(t + ".") and t in graph)}
    return out


def test_every_module_has_a_stage() -> None:
    unstaged = [m for m in import_graph() if stage_of(m) is None and m not in ("kvray", "kvray.layers")]
    assert unstaged == [], f"add these to kvray/layers.py STAGES: {unstaged}"


def test_no_module_imports_a_later_stage() -> None:
    assert layering_violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert import_cycles(without_package_inits(import_graph())) == []


def test_each_package_says_its_role() -> None:
    for init in ROOT.rglob("__init__.py"):
        if init.parent.name == "geometries":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 20, f"{init} has no docstring saying its role"


# The checks themselves must be able to fail: a tree with a backwards import and a cycle is caught.


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    root = tmp_path / "kvray"
    (root / "model").mkdir(parents=True)
    (root / "figures").mkdir()
    (root / "__init__.py").write_text('"""kvray"""\n')
    (root / "model" / "__init__.py").write_text('"""model"""\n')
    (root / "figures" / "__init__.py").write_text('"""figures"""\n')
    # model (early) imports figures (late), lazily inside a function, and figures imports model back.
    (root / "model" / "kvmath.py").write_text("def f():\n    from kvray.figures import style\n    return style\n")
    (root / "figures" / "style.py").write_text("from kvray.model.kvmath import f\n")
    return root


def test_a_later_stage_import_is_caught(bad_tree: Path) -> None:
    graph = import_graph(bad_tree)
    assert layering_violations(graph) == [
        "kvray.model.kvmath (model) imports kvray.figures.style (figures, a later stage)"
    ]


def test_a_cycle_is_caught(bad_tree: Path) -> None:
    assert import_cycles(without_package_inits(import_graph(bad_tree))) == [
        ["kvray.figures.style", "kvray.model.kvmath"]
    ]


def test_the_documented_python_api_is_importable_from_kvray() -> None:
    """README: ``from kvray import load_job, job_from_dict, plan_cells, run_job, check_oom_risk``, lazily."""
    import subprocess
    import sys

    code = (
        "import sys, kvray\n"
        "assert not {'torch', 'ray', 'pandas', 'transformers'} & set(sys.modules), 'import kvray is not light'\n"
        "from kvray import load_job, job_from_dict, plan_cells, run_job, check_oom_risk\n"
        "job = job_from_dict({'name': 'api', 'models': ['kvray/tiny-llama'], 'backends': ['synthetic'],"
        " 'grid': {'prompt_toks': [8], 'gen_toks': [2], 'concurrency': [1, 2]}})\n"
        "assert len(plan_cells(job)) == 2\n"
        "assert callable(load_job) and callable(run_job)\n"
        "risk = check_oom_risk('facebook/opt-1.3b', concurrency=1, seq_len=128, gpu='H100-SXM')\n"
        "assert risk.risk_level == 'low', risk.risk_level\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
