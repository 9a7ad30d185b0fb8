"""The straggler policy (kvray/sweep/stragglers.py) on rows whose latencies follow a known law.

Every healthy worker's cells take E2E = 0.02 s × concurrency^0.5 × (prompt/8)^0.3 × gen/4 — a law in the
fit's own form, so its prediction for a healthy worker is exact — and a throttled worker's take a known factor
more; the factor the policy reports must be that factor."""

from __future__ import annotations

import itertools
import random

import pytest

from kvray.data.manifest import last_run
from kvray.sweep.stragglers import find_stragglers


def law(conc: int, prompt: int, gen: int) -> float:
    return 0.02 * conc**0.5 * (prompt / 8) ** 0.3 * gen / 4


def rows(worker: str, gpu: str, shapes, factor: float = 1.0, *, model="m", status="ok", simulated=False):
    out = []
    for conc, prompt, gen in shapes:
        cid = f"{worker}-{model}-c{conc}-p{prompt}-g{gen}"
        out.append(
            {
                "cell_id": cid,
                "status": status,
                "simulated": simulated,
                "cell": {
                    "model": model,
                    "backend": "hf",
                    "dtype": "bf16",
                    "weights": "random",
                    "workload": {"kind": "burst", "requests": [{"prompt_toks": prompt, "gen_toks": gen}] * conc},
                },
                "hardware": {
                    "worker_id": worker,
                    "accelerator_type": gpu,
                    "node_id": f"node-{worker}",
                    "gpu_ids": ["0"],
                },
                "metrics": {"e2e_s_p50": law(conc, prompt, gen) * factor},
            }
        )
    return out


SHAPES = list(itertools.product([1, 2, 4, 8], [8, 32, 128], [4, 16]))  # 24 shapes


def dealt(n_workers: int) -> list[list[tuple[int, int, int]]]:
    """The shapes dealt to workers in a fixed shuffled order (whichever worker is free takes the next cell)."""
    order = random.Random(7).sample(SHAPES, len(SHAPES))
    return [order[i::n_workers] for i in range(n_workers)]


def test_a_worker_three_times_slower_than_its_two_peers_is_named_with_its_factor_and_cells():
    a, b, c = dealt(3)
    found = find_stragglers(rows("w0", "A100", a) + rows("w1", "A100", b) + rows("w2", "A100", c, factor=3.0))
    assert [s.worker_id for s in found] == ["w2"]
    (s,) = found
    assert s.slowdown == pytest.approx(3.0, rel=1e-6)
    assert s.gpu_type == "A100" and s.peers == 2 and 3 <= s.cells_judged <= len(c) == 8
    assert s.cell_ids == sorted(r["cell_id"] for r in rows("w2", "A100", c))
    assert "w2 (A100 GPU 0 on node node-w2): 3.0× slower than 2 peer worker(s)" in s.describe()


def test_of_two_workers_the_slow_one_is_named_never_the_fast_one():
    a, b = dealt(2)
    found = find_stragglers(rows("fast", "H100", a) + rows("slow", "H100", b, factor=2.0))
    assert [(s.worker_id, round(s.slowdown, 6)) for s in found] == [("slow", 2.0)]


def test_a_little_slower_is_not_a_straggler():
    a, b, c = dealt(3)
    assert find_stragglers(rows("w0", "A100", a) + rows("w1", "A100", b) + rows("w2", "A100", c, factor=1.3)) == []


def test_one_slow_cell_is_not_a_sick_gpu():
    a, b, c = dealt(3)
    third = rows("w2", "A100", c)
    third[0]["metrics"]["e2e_s_p50"] *= 10  # one page fault, one compile
    third[1]["metrics"]["e2e_s_p50"] *= 10
    assert find_stragglers(rows("w0", "A100", a) + rows("w1", "A100", b) + third) == []  # 2 of 8 cells slow


def test_workers_are_compared_within_their_gpu_type_only():
    """An A100 twice as slow as the H100s is what the types are, not a straggler."""
    a, b, c, d = dealt(4)
    records = rows("a0", "A100", a, 2.0) + rows("a1", "A100", b, 2.0) + rows("h0", "H100", c) + rows("h1", "H100", d)
    assert find_stragglers(records) == []


def test_families_get_their_own_baseline():
    """A bigger model is slower on every worker; a worker that ran only the small one is no straggler."""
    a, b, c = dealt(3)
    records = rows("w0", "A100", a, model="small") + rows("w0", "A100", a, 4.0, model="big")
    records += rows("w1", "A100", b, model="small") + rows("w1", "A100", b, 4.0, model="big")
    records += rows("w2", "A100", c, model="small")
    assert find_stragglers(records) == []
    records += rows("w2", "A100", c, 12.0, model="big")  # w2: 3× on the big model too, but not on the small one
    assert find_stragglers(records) == []  # half its cells slow: below two thirds


def test_too_few_cells_simulated_rows_and_other_runs_workers_are_not_named():
    a, b, c = dealt(3)
    base = rows("w0", "A100", a) + rows("w1", "A100", b)
    assert find_stragglers(base + rows("w2", "A100", c[:2], factor=3.0)) == []  # 2 cells: too few to judge
    assert find_stragglers(base + rows("w2", "A100", c, factor=3.0, simulated=True)) == []  # predicted times
    slow = base + rows("w2", "A100", c, factor=3.0)
    assert find_stragglers(slow, judge={"w0", "w1"}) == []  # this run's workers only
    assert [s.worker_id for s in find_stragglers(slow, judge={"w2"})] == ["w2"]


def test_failed_cells_are_marked_but_not_judged():
    a, b, c = dealt(3)
    slow = rows("w2", "A100", c, factor=3.0) + rows("w2", "A100", [(16, 8, 4)], status="error")
    (s,) = find_stragglers(rows("w0", "A100", a) + rows("w1", "A100", b) + slow)
    assert len(s.cell_ids) == 9 and s.cells_judged <= 8  # the error cell is marked, never judged


def test_cells_outside_what_the_peers_ran_are_not_judged():
    """No extrapolation: peers that only ran gen 4 say nothing about a gen-16 cell."""
    short = [s for s in SHAPES if s[2] == 4]
    long = [s for s in SHAPES if s[2] == 16]
    assert (
        find_stragglers(
            rows("w0", "A100", short[::2]) + rows("w1", "A100", short[1::2]) + rows("w2", "A100", long, 3.0)
        )
        == []
    )


# --- a real sweep: two workers on the test session's Ray, one of them throttled ---------------------------------


def test_a_sweep_with_one_throttled_worker_names_it_and_marks_its_cells(ray_session, tmp_path, capsys):
    import functools

    from kvray.analysis.dataset import Dataset
    from kvray.backends.synthetic import throttle_first_worker
    from kvray.cli import render
    from kvray.sweep.driver import run_job
    from tests.job_files import synthetic_job

    job = synthetic_job(
        "straggle",
        workers=2,
        options={"ttft_s": 0.02, "tpot_s": 0.01},
        grid={"prompt_toks": [8, 16, 32], "gen_toks": [4, 8, 16], "concurrency": [1, 2, 3]},
    )
    claim = tmp_path / "slow-claim"
    record = run_job(
        job, tmp_path / "out", progress=False, worker_setup=functools.partial(throttle_first_worker, str(claim), 3.0)
    ).run
    workers = record["workers"]
    assert len(workers) == 2  # both came up: one throttled, one not
    (found,) = record["stragglers"]
    # The named worker is the throttled one, by the injected schedule: its cells took 3 × (ttft + (gen-1) tpot)
    records = Dataset.load(tmp_path / "out").records
    by_worker: dict[str, list[float]] = {}
    for r in records:
        schedule = 0.02 + (r["cell"]["workload"]["requests"][0]["gen_toks"] - 1) * 0.01
        by_worker.setdefault(r["hardware"]["worker_id"], []).append(r["metrics"]["e2e_s_p50"] / schedule)
    slow = {w for w, ratios in by_worker.items() if min(ratios) > 2.5}
    assert slow == {found["worker_id"]} and len(by_worker) == 2
    assert 2.4 <= found["slowdown"] <= 3.6 and found["cells_judged"] >= 3
    assert found["peers"] == 1 and found["gpu_type"] == "cpu"  # the session's logical GPUs are no real device
    # marked in the dataset (its cells, no other) and in the manifest and the summary
    cells = Dataset.load(tmp_path / "out").cells
    marked = set(cells.loc[cells["straggler"], "cell_id"])
    assert marked == set(found["cell_ids"]) == {r["cell_id"] for r in records if r["hardware"]["worker_id"] in slow}
    assert last_run(tmp_path / "out")["stragglers"] == record["stragglers"]
    render.run_summary(job.name, {"ok": len(records)}, record, tmp_path / "out", [])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("straggler:")]
    assert len(line) == 1 and found["worker_id"] in line[0] and "slower than 1 peer worker(s)" in line[0]
    # the record docs/clusters.md cites (`pytest -rP` shows it; after capsys has read the summary): the factor
    # this run measured
    print(f"straggler sweep: throttled 3.0x, measured {found['slowdown']:.2f}x over {found['cells_judged']} cells")
