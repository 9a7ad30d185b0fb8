"""The sweep's scheduling policy without Ray: hand-out order, group stickiness, OOM skips, retries, settling.

The scheduler is driven here the way the driver drives it (join, next_cell, done / settle, leave), with
placements as plain strings. Expected values come from the policy in kvray/sweep/scheduler.py's docstring,
written out by hand.
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from kvray.plan.job import job_from_dict
from kvray.plan.planner import plan_cells
from kvray.spec import Cell
from kvray.sweep.scheduler import Scheduler, Verdict

TINY, GPT2, OPT = "kvray/tiny-llama", "gpt2", "facebook/opt-125m"


def make_cells(model: str = TINY, prompt_toks=(8, 64), concurrency=(1, 2, 4, 8), hardware: Any = "any") -> list[Cell]:
    job = job_from_dict(
        {
            "name": "sched",
            "models": [model],
            "backends": ["synthetic"],
            "dtypes": ["fp32"],
            "hardware": hardware,
            "warmup": 0,
            "repeats": 1,
            "grid": {"prompt_toks": list(prompt_toks), "gen_toks": [4], "concurrency": list(concurrency)},
        }
    )
    return plan_cells(job)


def shape(cell: Cell | None) -> tuple[int, int]:
    assert cell is not None
    return (cell.workload.concurrency, cell.workload.prompt_toks)


def where(cell: Cell) -> str:
    return "cpu" if cell.hardware == "any" else f"gpu:{cell.hardware}"


class Recorder:
    """The driver's side: verdicts it would write, and every cell settled, in order."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.settled: list[tuple[str, str]] = []

    def scheduler(self, cells: list[Cell], max_attempts: int = 2) -> Scheduler[str]:
        return Scheduler(
            cells,
            where=where,
            max_attempts=max_attempts,
            write=self.verdicts.append,
            on_settled=lambda cell, status: self.settled.append((cell.cell_id, status)),
        )


def run_rounds(s: Scheduler[str], workers: list[str], status=lambda worker, cell: "ok") -> dict[str, list[Cell]]:
    """Each round: every idle worker asks for a cell (in order), then every busy one finishes it."""
    ran: dict[str, list[Cell]] = {w: [] for w in workers}
    for _ in range(1000):
        for w in workers:
            if s.seats[w].cell is None and (cell := s.next_cell(w)) is not None:
                ran[w].append(cell)
        busy = [w for w in workers if s.seats[w].cell is not None]
        if not busy:
            return ran
        for w in busy:
            s.done(w, status(w, s.seats[w].cell))
    raise AssertionError("the sweep never ended")


# --- no Ray ------------------------------------------------------------------------------------------


def test_the_scheduler_and_the_sweep_names_import_without_ray() -> None:
    code = (
        "import sys\n"
        "import kvray.sweep.scheduler\n"
        "assert 'ray' not in sys.modules, 'the scheduler imported ray'\n"
        "from kvray.sweep import run_job, SweepError, connect, status_counts, last_run, default_output_dir\n"
        "from kvray.sweep.driver import run_job as driver_run_job\n"
        "from kvray.data import status_counts, last_run, default_output_dir, read_manifest\n"
        "assert driver_run_job is run_job\n"
        "assert 'ray' not in sys.modules, 'kvray.sweep names imported ray'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Not even lazily, inside a function: no import statement in the module names Ray.
    tree = ast.parse(Path(sys.modules["kvray.sweep.scheduler"].__file__ or "").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "ray" or "ray_env" in n or "pool" in n]


# --- order and stickiness ----------------------------------------------------------------------------


def test_a_group_goes_out_from_small_to_large() -> None:
    cells = make_cells()
    random.Random(1).shuffle(cells)
    s = Recorder().scheduler(cells)
    s.join("w", "cpu", {"name": "cpu"})
    ran = run_rounds(s, ["w"])
    # By tokens held, concurrency × (prompt + 4 generated): 12, 24, 48, 68, 96, 136, 272, 544.
    assert [shape(c) for c in ran["w"]] == [(1, 8), (2, 8), (4, 8), (1, 64), (8, 8), (2, 64), (4, 64), (8, 64)]
    assert s.all_settled and s.statuses == {"ok": 8}


def test_a_worker_keeps_to_its_group_and_loads_each_model_once() -> None:
    a = make_cells(TINY, prompt_toks=(8,), concurrency=(1, 2, 3, 4))
    b = make_cells(GPT2, prompt_toks=(8,), concurrency=(1, 2))
    c = make_cells(OPT, prompt_toks=(8,), concurrency=(1, 2, 3, 4))
    s = Recorder().scheduler(a + b + c)
    for w in ("w0", "w1"):
        s.join(w, "cpu", {"name": "cpu"})
    ran = run_rounds(s, ["w0", "w1"])
    models = {w: [cell.model for cell in cells] for w, cells in ran.items()}
    # w0 takes the first of the largest groups (a, 4 cells); w1 the group with fewest workers, then most
    # cells (c). When a runs out, w0 joins b (2 queued, nobody on it); w1, done with c, does not load b
    # for the one cell left there, which w0 is about to take.
    assert models == {"w0": [TINY] * 4 + [GPT2] * 2, "w1": [OPT] * 4}
    assert s.all_settled and s.statuses == {"ok": 10}


def test_a_fresh_worker_joins_a_group_only_when_it_has_more_cells_than_workers_on_it() -> None:
    s = Recorder().scheduler(make_cells(TINY, prompt_toks=(8,), concurrency=(1, 2, 3)))
    for w in ("w0", "w1", "w2"):
        s.join(w, "cpu", {"name": "cpu"})
    assert shape(s.next_cell("w0")) == (1, 8)
    assert shape(s.next_cell("w1")) == (2, 8)  # 2 queued > 1 worker on the group
    assert s.next_cell("w2") is None  # 1 queued, 2 workers on it: not worth loading the model
    s.done("w0", "ok")
    assert shape(s.next_cell("w0")) == (3, 8)  # w0 keeps to its group


# --- OOM ---------------------------------------------------------------------------------------------


def test_after_an_oom_only_cells_that_outgrow_it_on_that_hardware_are_skipped() -> None:
    rec = Recorder()
    s = rec.scheduler(make_cells())
    s.join("w", "cpu", {"name": "A100", "node_id": "n1"})
    oom_at = (8, 8)
    ran = run_rounds(s, ["w"], status=lambda w, cell: "oom" if shape(cell) == oom_at else "ok")
    # (2, 64) and (4, 64) need more memory but fewer requests than (8, 8): they run; (8, 64) outgrows it.
    assert [shape(c) for c in ran["w"]] == [(1, 8), (2, 8), (4, 8), (1, 64), (8, 8), (2, 64), (4, 64)]
    [verdict] = rec.verdicts
    oomed = next(c for c in ran["w"] if shape(c) == oom_at)
    assert shape(verdict.cell) == (8, 64) and verdict.status == "skipped_after_oom"
    assert oomed.cell_id in verdict.reason and "A100" in verdict.reason
    assert verdict.hardware == {"name": "A100", "node_id": "n1"}
    assert s.statuses == {"ok": 6, "oom": 1, "skipped_after_oom": 1}


def test_an_oom_on_one_gpu_type_does_not_skip_cells_on_another() -> None:
    rec = Recorder()
    s = rec.scheduler(make_cells())
    s.join("l4", "cpu", {"name": "L4"})
    s.join("a100", "cpu", {"name": "A100"})
    ran = run_rounds(s, ["l4", "a100"], status=lambda w, cell: "oom" if shape(cell) == (2, 8) else "ok")
    # Round 1: l4 (1, 8), a100 (2, 8) → OOM on A100. Round 2: l4 (4, 8) runs although it outgrows (2, 8):
    # that OOM was on A100; a100 (1, 64) runs (fewer requests). Round 3: l4 (8, 8); a100 finds (2, 64),
    # (4, 64), (8, 64) all outgrowing its OOM and skips them.
    assert [shape(c) for c in ran["l4"]] == [(1, 8), (4, 8), (8, 8)]
    assert [shape(c) for c in ran["a100"]] == [(2, 8), (1, 64)]
    assert [(shape(v.cell), v.hardware["name"]) for v in rec.verdicts] == [
        ((2, 64), "A100"),
        ((4, 64), "A100"),
        ((8, 64), "A100"),
    ]
    assert s.all_settled


def test_an_oom_in_one_group_does_not_skip_another_group() -> None:
    rec = Recorder()
    small = make_cells(TINY, prompt_toks=(64,), concurrency=(4,))
    large = make_cells(GPT2, prompt_toks=(64,), concurrency=(8,))
    s = rec.scheduler(small + large)
    s.join("w", "cpu", {"name": "A100"})
    ran = run_rounds(s, ["w"], status=lambda w, cell: "oom" if cell.model == TINY else "ok")
    assert [c.model for c in ran["w"]] == [TINY, GPT2] and rec.verdicts == []
    assert s.statuses == {"oom": 1, "ok": 1}


# --- failures ----------------------------------------------------------------------------------------


def test_a_dead_workers_cell_is_retried_up_to_max_attempts_then_an_error_with_the_reason() -> None:
    rec = Recorder()
    first, second = make_cells(prompt_toks=(8,), concurrency=(1, 2))
    s = rec.scheduler([second, first], max_attempts=2)
    why = "worker died while running this cell: ActorDiedError"
    for incarnation in (1, 2):
        s.join(0, "cpu", {"name": "cpu"})
        assert s.next_cell(0) == first  # a requeued cell goes back to the front
        s.settle(first, why, retry=True)
        s.leave(0)
        assert s.attempts[first.cell_id] == incarnation
    [verdict] = rec.verdicts
    assert verdict.cell == first and verdict.status == "error"
    assert verdict.reason == f"{why} (after 2 attempts)"
    s.join(0, "cpu", {"name": "cpu"})
    assert s.next_cell(0) == second
    s.done(0, "ok")
    assert s.all_settled and rec.settled == [(first.cell_id, "error"), (second.cell_id, "ok")]


def test_a_worker_error_is_retried_on_the_same_worker() -> None:
    rec = Recorder()
    [cell] = make_cells(prompt_toks=(8,), concurrency=(1,))
    s = rec.scheduler([cell], max_attempts=1)
    s.join(0, "cpu", {"name": "L4"})
    assert s.next_cell(0) == cell
    s.settle(cell, "worker error: ValueError: boom", retry=True)  # the worker stays
    assert s.seats[0].cell is None and s.next_cell(0) is None
    assert [(v.status, v.reason, v.hardware) for v in rec.verdicts] == [
        ("error", "worker error: ValueError: boom (after 1 attempt)", {"name": "L4"})
    ]


def test_a_timeout_settles_the_cell_as_an_error_without_retrying() -> None:
    rec = Recorder()
    slow, other = make_cells(prompt_toks=(8,), concurrency=(1, 2))
    s = rec.scheduler([slow, other], max_attempts=3)
    s.join(0, "cpu", {"name": "cpu"})
    assert s.next_cell(0) == slow
    s.settle(slow, "timed out after 1.5 s", retry=False)
    s.leave(0)
    assert [(v.cell, v.status, v.reason) for v in rec.verdicts] == [
        (slow, "error", "timed out after 1.5 s (after 1 attempt)")
    ]
    s.join(0, "cpu", {"name": "cpu"})
    assert s.next_cell(0) == other  # the slow cell is not handed out again


def test_a_row_the_worker_wrote_before_it_died_stands() -> None:
    rec = Recorder()
    [cell] = make_cells(prompt_toks=(8,), concurrency=(1,))
    s = rec.scheduler([cell])
    s.join(0, "cpu", {"name": "cpu"})
    s.next_cell(0)
    s.settle(cell, "worker died while running this cell: gone", retry=True, recorded="ok")
    assert rec.verdicts == [] and rec.settled == [(cell.cell_id, "ok")] and s.all_settled
    s.settle(cell, "a late second report", retry=False)  # changes nothing
    assert rec.verdicts == [] and rec.settled == [(cell.cell_id, "ok")]


def test_every_cell_is_settled_exactly_once_through_deaths_errors_and_ooms() -> None:
    rec = Recorder()
    cells = make_cells(TINY) + make_cells(GPT2) + make_cells(OPT, concurrency=(1, 2))
    s = rec.scheduler(cells, max_attempts=2)
    workers = [0, 1, 2]
    for w in workers:
        s.join(w, "cpu", {"name": "cpu"})
    rng = random.Random(7)
    for _ in range(1000):
        for w in workers:
            if s.seats[w].cell is None:
                s.next_cell(w)
        busy = [w for w in workers if s.seats[w].cell is not None]
        if not busy:
            break
        for w in busy:
            cell = s.seats[w].cell
            assert cell is not None
            roll = rng.random()
            if roll < 0.2:  # the worker dies: settled, replaced by a fresh one in the same slot
                s.settle(cell, "worker died", retry=True)
                s.leave(w)
                s.join(w, "cpu", {"name": "cpu"})
            elif roll < 0.3:  # the worker's own code raised; it stays
                s.settle(cell, "worker error", retry=True)
            else:
                s.done(w, "oom" if roll > 0.95 else "ok")
    ids = [c.cell_id for c in cells]
    settled_ids = [cell_id for cell_id, _ in rec.settled]
    assert sorted(settled_ids) == sorted(ids)  # every cell, none twice
    assert s.all_settled and sum(s.statuses.values()) == len(ids) == 20
    assert len({v.cell.cell_id for v in rec.verdicts}) == len(rec.verdicts)
    assert Counter(status for _, status in rec.settled) == s.statuses
    assert all(s.attempts[i] <= 2 for i in ids)
    assert {"error", "ok"} <= set(s.statuses)  # the seed exercises both retries that ran out and successes


# --- placement ---------------------------------------------------------------------------------------


def test_a_group_without_a_capable_worker_is_stranded_not_handed_to_another() -> None:
    cpu_cells = make_cells(prompt_toks=(8,), concurrency=(1, 2))
    a100_cells = make_cells(prompt_toks=(8,), concurrency=(1, 2, 4), hardware=["A100"])
    s = Recorder().scheduler(cpu_cells + a100_cells)
    assert s.demand() == {"cpu": 2, "gpu:A100": 3}
    s.join("cpu0", "cpu", {"name": "cpu"})
    ran = run_rounds(s, ["cpu0"])
    assert [c.hardware for c in ran["cpu0"]] == ["any", "any"]
    assert not s.all_settled and s.has_work("gpu:A100") and not s.has_work("cpu")
    assert s.stranded({"cpu"}) == ["gpu:A100"]
    assert s.stranded({"cpu", "gpu:A100"}) == []
    s.join("a100", "gpu:A100", {"name": "A100"})
    ran = run_rounds(s, ["a100"])
    assert len(ran["a100"]) == 3 and s.all_settled and s.stranded(set()) == []
