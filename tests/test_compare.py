"""``kvray compare`` on runs whose answer is known: the synthetic backend's injected schedule (real sleeps).

Three folders, written with the real runner and DatasetWriter:
  base  cells A and B (TTFT 0.3 s, TPOT 100 ms), and C, which only base has
  same  A and B on the same schedule again                   → "no significant change" on every row
  slow  A and B with TPOT doubled (200 ms), and D, only here → slower on TPOT, ITL, E2E and throughput; TTFT and
                                                               queue time unchanged
The schedule is large against the jitter of sleeps on a loaded 2-core machine: a stall of the event loop delays
every request in flight by a few ms (measured: 2.7 ms in 3 of 4 repeats of one run and in none of the next), so
at TPOT 50 ms an ITL p99 moved 5.1 % between two identical runs — over the verdict's 5 % minimum change. At 100 ms
the same stall is 3 %. Each cell pools 96 or 24 requests over 3 repeats.
"""

from __future__ import annotations

import json

import pytest

from kvray.analysis.compare import FASTER, SAME, SLOWER, UNTESTED, compare_dirs, compare_results
from kvray.backends import get_backend
from kvray.bench.runner import run_cell
from kvray.cli.app import main
from kvray.data.store import DatasetWriter
from kvray.measure.metrics import summarize
from kvray.measure.trace import CellResult, RunTrace
from kvray.spec import Cell, Workload, make_options

TTFT_S, TPOT_S, GEN = 0.3, 0.1, 5
SHAPES = {"A": (32, 64), "B": (8, 128), "C": (4, 256), "D": (4, 512)}  # concurrency, prompt tokens


def cell(name: str, tpot_s: float, repeats: int = 3) -> Cell:
    c, p = SHAPES[name]
    return Cell(
        model="kvray/tiny-llama",
        backend="synthetic",
        workload=Workload.uniform(c, p, GEN),
        warmup=0,
        repeats=repeats,
        experiment="exp1",
        options=make_options(ttft_s=TTFT_S, tpot_s=tpot_s),
    )


def write_run(path, cells):
    backend = get_backend("synthetic")
    writer = DatasetWriter(path, tables=False)
    for c in cells:
        result = run_cell(backend, c)
        assert result.status == "ok", result.reason
        writer.append(result)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {
        "base": write_run(root / "base", [cell("A", TPOT_S), cell("B", TPOT_S), cell("C", TPOT_S, repeats=2)]),
        "same": write_run(root / "same", [cell("A", TPOT_S), cell("B", TPOT_S)]),
        "slow": write_run(root / "slow", [cell("A", 2 * TPOT_S), cell("B", 2 * TPOT_S), cell("D", TPOT_S, 2)]),
    }


def shape(row) -> str:
    return next(part for part in row.cell.split(" · ") if part.startswith("c="))


def verdicts(comparison):
    return {(shape(r), r.metric, r.stat): r.verdict for r in comparison.rows}


def test_same_schedule_is_no_significant_change_everywhere(runs):
    c = compare_dirs(runs["base"], runs["same"])
    assert c.cells_compared == 2
    assert c.rows and {r.verdict for r in c.rows} == {SAME}, [
        (r.cell, r.label, r.change, r.p_adjusted) for r in c.rows if r.verdict != SAME
    ]
    # Every latency of both cells is compared at p50 and at the highest percentile the samples hold: 96 and 24
    # requests hold a p95, not a p99; ITL pools 4 gaps a request (96 × 4 = 384 hold a p99).
    stats = {(shape(r), r.metric, r.stat) for r in c.rows}
    assert ("c=32", "ttft_s", "p95") in stats and ("c=32", "ttft_s", "p99") not in stats
    assert ("c=32", "itl_s", "p99") in stats
    assert ("c=8", "output_tps", "mean") in stats
    assert c.only_base == [r for r in c.only_base if "c=4" in r] and len(c.only_base) == 1  # C, listed
    assert c.changed == {}  # same options, repeats, versions


def test_doubled_tpot_is_slower_on_tpot_and_e2e_not_ttft(runs):
    c = compare_dirs(runs["base"], runs["slow"])
    v = verdicts(c)
    for c_label in ("c=32", "c=8"):
        assert v[(c_label, "tpot_s", "p50")] == SLOWER
        assert v[(c_label, "itl_s", "p50")] == SLOWER
        assert v[(c_label, "e2e_s", "p50")] == SLOWER
        assert v[(c_label, "output_tps", "mean")] == SLOWER
        assert v[(c_label, "ttft_s", "p50")] == SAME
        assert v[(c_label, "queue_s", "p50")] == SAME
    rows = {(shape(r), r.metric, r.stat): r for r in c.rows}
    tpot = rows[("c=32", "tpot_s", "p50")]
    assert tpot.change == pytest.approx(1.0, abs=0.1)  # doubled, up to a few ms of sleep overshoot
    assert tpot.ci_low > 0.8 and tpot.n_base == tpot.n_new == 96
    e2e = rows[("c=32", "e2e_s", "p50")]  # 0.3 + 4 × 0.1 = 0.7 s → 0.3 + 4 × 0.2 = 1.1 s: +57 %
    assert e2e.change == pytest.approx(0.4 / 0.7, abs=0.06)
    assert rows[("c=32", "output_tps", "mean")].change == pytest.approx(0.7 / 1.1 - 1, abs=0.06)
    # What changed: the backend option, named with both values; C and D are listed, not dropped.
    assert c.changed == {"option tpot_s": (TPOT_S, 2 * TPOT_S)}
    assert len(c.only_base) == 1 and "c=4" in c.only_base[0] and "prompt 256" in c.only_base[0]
    assert len(c.only_new) == 1 and "prompt 512" in c.only_new[0]
    assert not [r for r in c.rows if r.verdict == FASTER]


def test_reverse_direction_is_faster(runs):
    v = verdicts(compare_dirs(runs["slow"], runs["base"]))
    assert v[("c=32", "tpot_s", "p50")] == FASTER and v[("c=32", "output_tps", "mean")] == FASTER
    assert v[("c=32", "ttft_s", "p50")] == SAME


def test_cli_exit_codes_outputs_and_json(runs, tmp_path, capsys):
    base, same, slow = (str(runs[k]) for k in ("base", "same", "slow"))
    with pytest.raises(SystemExit) as exc:  # TPOT +100 %, E2E +57 %: beyond 10 %
        main(["compare", base, slow, "--fail-on-regression", "10", "--out", str(tmp_path / "a")])
    assert exc.value.code == 1
    assert "regression(s) beyond 10 %" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # nothing is worse by more than 150 %
        main(["compare", base, slow, "--fail-on-regression", "150", "--out", str(tmp_path / "b")])
    assert exc.value.code == 0
    assert "no significant regression beyond 150 %" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["compare", base, same, "--fail-on-regression", "0", "--json", "--out", str(tmp_path / "c")])
    assert exc.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["regressions"] == 0 and data["counts"][SLOWER] == 0 and data["counts"][UNTESTED] == 0
    assert data["cells_compared"] == 2 and len(data["only_base"]) == 1
    with pytest.raises(SystemExit) as exc:  # without the flag: a report, exit 0 even when slower
        main(["compare", base, slow])
    assert exc.value.code == 0
    md = (runs["slow"] / "compare" / "compare.md").read_text()
    assert "TPOT p50" in md and "slower" in md and "option tpot_s: 0.1 → 0.2" in md
    assert "Only in base" in md and "Only in new" in md
    html = (runs["slow"] / "compare" / "compare.html").read_text()
    assert 'src="data:image/png;base64,' in html and "<img" in html  # self-contained
    assert (runs["slow"] / "compare" / "figures" / "compare_changes.png").stat().st_size > 10_000


def test_same_folder_twice_is_no_change(runs, tmp_path):
    c = compare_dirs(runs["base"], runs["base"])
    assert {r.verdict for r in c.rows} == {SAME} and c.cells_compared == 3
    assert not c.only_base and not c.only_new


def test_one_repeat_throughput_is_untestable_and_says_what_to_run(tmp_path):
    one = [Cell("kvray/tiny-llama", Workload.uniform(4, 32, 3), backend="synthetic", warmup=0, repeats=1,
                options=make_options(ttft_s=0.02, tpot_s=0.01))]  # fmt: skip
    a, b = write_run(tmp_path / "a", one), write_run(tmp_path / "b", one)
    c = compare_dirs(a, b)
    (tps,) = [r for r in c.rows if r.metric == "output_tps"]
    assert tps.verdict == UNTESTED and "--repeats" in tps.note
    assert any("--repeats 5" in line for line in c.advice)


def crafted(hardware: str, speed: float, block_size: int, repeats: int = 3) -> CellResult:
    """A cell of 40 requests a repeat whose tokens come ``speed`` × 10 ms apart (± a deterministic 2 % wobble)."""
    cell_ = Cell("kvray/tiny-llama", Workload.uniform(40, 64, 6), backend="hf-paged", repeats=repeats,
                 options=make_options(block_size=block_size))  # fmt: skip
    traces = []
    for r in range(repeats):
        for i in range(40):
            step = 0.01 * speed * (1 + 0.02 * ((i * 7 + r * 3) % 5 - 2) / 2)
            times = [0.05 * speed + k * step for k in range(6)]
            traces.append(RunTrace(i, r, 0.0, 0.0, times, times[-1], 64, 6))
    return CellResult(cell_, "ok", traces=traces, metrics=summarize(traces), hardware={"name": hardware})


def test_across_hardware_is_the_same_command():
    """The same cells on an H100 and (1.6× slower) on an A100: joined without the hardware, which is listed as
    what changed, together with the option that differed; every latency slower by ~60 %."""
    base = [crafted("NVIDIA H100 80GB HBM3", 1.0, 16)]
    new = [crafted("NVIDIA A100-SXM4-40GB", 1.6, 32)]
    c = compare_results(base, new)
    assert c.cross_hardware and c.cells_compared == 1 and not c.only_base and not c.only_new
    assert c.changed == {"hardware": ("H100-SXM", "A100-40GB-SXM"), "option block_size": (16, 32)}
    v = verdicts(c)
    assert v[("c=40", "ttft_s", "p50")] == v[("c=40", "tpot_s", "p50")] == v[("c=40", "e2e_s", "p50")] == SLOWER
    assert v[("c=40", "output_tps", "mean")] == SLOWER
    tpot = next(r for r in c.rows if r.metric == "tpot_s" and r.stat == "p50")
    assert tpot.change == pytest.approx(0.6, abs=0.02)


def test_an_option_swept_within_a_run_pairs_with_its_own_value():
    base = [crafted("cpu", 1.0, 16), crafted("cpu", 2.0, 32)]
    new = [crafted("cpu", 2.0, 32), crafted("cpu", 1.0, 16)]
    c = compare_results(base, new)
    assert c.cells_compared == 2 and c.changed == {}
    assert {r.verdict for r in c.rows} == {SAME}  # block_size 16 met 16, 32 met 32
