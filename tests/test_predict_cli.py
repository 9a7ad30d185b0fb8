"""`kvray predict` and `kvray calibrate` as a user runs them: real subprocesses, the seed's list syntax."""

import json
import subprocess
import sys

import pytest

from kvray.cli import main
from kvray.model.resolve import resolve_geometry
from kvray.sim.simulate import Efficiency, predict_cell


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


@pytest.fixture
def kvray(tmp_path):
    def run(*args: str, calibration=None) -> subprocess.CompletedProcess:
        import os

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVRAY_CALIBRATION": str(calibration or tmp_path / "absent.json")}
        return subprocess.run([sys.executable, "-m", "kvray.cli", *args], capture_output=True, text=True, env=env)

    return run


def test_space_separated_and_repeated_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "gpt2", "-c", "1", "2", "--gen-toks", "8", "16", "--concurrency", "4", "--json"])
    assert exit_info.value.code == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    assert sorted({p["concurrency"] for p in preds}) == [1, 2, 4]
    assert sorted({p["gen_toks"] for p in preds}) == [8, 16] and len(preds) == 6


def test_a_numeric_list_never_swallows_the_positional_after_it(capsys):
    """`--concurrency 1 2 MODEL`: the list ends at the first token that is not a number; MODEL is the model."""
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--concurrency", "1", "2", "gpt2", "--gen-toks", "8", "--json"])
    assert exit_info.value.code == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    assert sorted(p["concurrency"] for p in preds) == [1, 2] and {p["model"] for p in preds} == {"gpt2"}


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_predict_sweep_json_matches_the_predictor(kvray):
    out = kvray(
        "predict",
        "meta-llama/Meta-Llama-3-8B",
        "--gpu",
        "H100-SXM,L4",
        "--concurrency",
        "1",
        "2",
        "4",
        "8",
        "--prompt-toks",
        "512",
        "1024",
        "--gen-toks",
        "64",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    preds = data["predictions"]
    assert len(preds) == 2 * 4 * 2
    assert {(p["gpu"], p["concurrency"], p["prompt_toks"]) for p in preds} == {
        (gpu, c, p) for gpu in ("H100-SXM", "L4") for c in (1, 2, 4, 8) for p in (512, 1024)
    }
    assert "defaults" in data["efficiency"]["L4"]
    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    for p in preds:
        ref = predict_cell(g, p["gpu"], p["concurrency"], p["prompt_toks"], 64, eff=Efficiency())
        assert p["tpot_s"] == pytest.approx(ref.tpot_s) and p["ttft_s"] == pytest.approx(ref.ttft_s)
        assert p["fits"] is True


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_predict_table_shows_oom_and_bounds(kvray):
    out = kvray("predict", "meta-llama/Meta-Llama-3-8B", "--gpu", "L4", "-c", "1", "64", "--prompt-toks", "4096")
    assert out.returncode == 0, out.stderr
    assert "OOM" in out.stdout and "yes" in out.stdout and "C/M" in out.stdout
    assert "η_compute 0.7, η_memory 0.9 (defaults)" in out.stdout


def test_predict_imports_no_torch():
    code = (
        "import sys\nfrom kvray.cli import app\n"
        "app(args=['predict', 'gpt2', '-c', '1', '2', '--layout', 'paged', '--json'], standalone_mode=False)\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'ray') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_calibrate_command_writes_the_file_predict_reads(kvray, tmp_path):
    from kvray.backends.sim import SimBackend
    from kvray.data.writer import DatasetWriter
    from kvray.runner.run import run_cell
    from kvray.spec import Cell, Workload, make_options

    writer = DatasetWriter(tmp_path / "res", tables=False)
    for c in (1, 8):
        for p in (256, 4096):
            cell = Cell(
                model="meta-llama/Meta-Llama-3-8B",
                backend="hf",
                workload=Workload.uniform(c, p, 8),
                warmup=0,
                options=make_options(eta_compute=0.5, eta_memory=0.6),
            )
            result = run_cell(SimBackend(), cell)
            result.simulated, result.hardware = False, {"name": "NVIDIA H100 80GB HBM3"}
            writer.append(result)
    cal = tmp_path / "cal.json"
    out = kvray("calibrate", str(tmp_path / "res"), "--output", str(cal))
    assert out.returncode == 0, out.stderr
    assert "H100-SXM" in out.stdout and "0.600" in out.stdout and cal.is_file()
    pred = kvray("predict", "meta-llama/Meta-Llama-3-8B", "--json", calibration=cal)
    data = json.loads(pred.stdout)
    assert data["predictions"][0]["eta_memory"] == pytest.approx(0.6, rel=1e-3)
    assert "calibrated from 4 rows" in data["efficiency"]["H100-SXM"]
    nocal = json.loads(
        kvray("predict", "meta-llama/Meta-Llama-3-8B", "--json", "--no-calibration", calibration=cal).stdout
    )
    assert nocal["predictions"][0]["eta_memory"] == 0.9


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["predict", "gpt2", "--gpu", "Z100"], "unknown GPU 'Z100'"),
        (["predict", "gpt2", "--concurrency", "0", "2"], "--concurrency values must be positive"),
        (["predict", "gpt2", "--concurrency", "many"], "--concurrency"),
        (["predict", "gpt2", "--layout", "ring"], "unknown --layout"),
        (["predict", "gpt2", "--dtype", "int3"], "unknown dtype"),
        (["predict", "nobody/nothing"], "nobody/nothing"),
        (["calibrate", "/nonexistent/results"], "not a results folder"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(args)  # in-process: the same entry point as the console script
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_calibrate_empty_folder_says_why(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "nothing to calibrate" in capsys.readouterr().err
