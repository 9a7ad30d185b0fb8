"""One CLI dialect (issue 26, item 4), in this process: ``--address`` means the same for ``run``, ``launch`` and
the exp commands (one path, kvray/launch/submit.py), ``-m/--model`` or the positional MODEL wherever a model is
named, ``--output`` for what a command writes (the old ``--out`` still parses, unlisted), and the public API
returns what it ran (``run_job`` a RunRecord, ``check_oom_risk`` an OomRisk).

No Ray and no cluster: the remote and Ray paths are replaced by recorders where the test is which path is taken;
``run --address inprocess`` runs a synthetic job for real, with ``import ray`` made to fail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from job_files import write_job_file

import kvray
from kvray.cli import main
from kvray.cli.app import app


def cli(*args: str) -> int:
    """``kvray ARGS`` in this process; its exit code."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return int(exc.value.code or 0)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvray: error: ") and "Traceback" not in err, err
    return lines[0]


# --- --address: the same forms, the same path, for run, launch and an exp command ---------------------------


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Both ways a job can go replaced by recorders: the Jobs API launch and the local sweep."""
    import kvray.launch.jobs_api
    import kvray.sweep.driver
    from kvray.plan.job import load_job

    calls: list[tuple] = []

    def fake_launch(job_file, output, *, address=None, cluster=None, **_):
        calls.append(("launch", load_job(job_file).name, address, cluster, Path(output).name))
        return "SUCCEEDED", []

    def fake_run_job(job, output_dir=None, *, address="local", **_):
        calls.append(("run_job", job.name, address, None, Path(output_dir).name))
        return kvray.sweep.driver.RunRecord(Path(output_dir), {"outcome": "finished"})

    monkeypatch.setattr(kvray.launch.jobs_api, "launch", fake_launch)
    monkeypatch.setattr(kvray.sweep.driver, "run_job", fake_run_job)
    monkeypatch.chdir(tmp_path)
    return calls


# a one-cell exp1 on the synthetic engine (the exp commands' own flags are theirs; these are the shared ones)
EXP1 = ("exp1", "-m", "kvray/tiny-llama", "--backend", "synthetic", "-c", "1", "--prompt-toks", "8", "--gen-toks", "2")

ADDRESSES = [
    ("http://head:8265", "launch"),
    ("https://head.example:443", "launch"),
    ("auto", "run_job"),
    ("ray://10.0.0.1:10001", "run_job"),
    ("inprocess", "run_job"),
    ("local", "run_job"),
]


@pytest.mark.parametrize(("address", "path"), ADDRESSES)
def test_an_address_takes_the_same_path_from_run_and_from_an_exp_command(recorded, tmp_path, address, path):
    job_file = write_job_file(tmp_path, "dialect")
    assert cli("run", str(job_file), "--address", address, "--output", "run-out", "--no-plots") == 0
    assert cli(*EXP1, "--address", address, "--output", "exp-out", "--no-plots") == 0
    (run_call, exp_call) = recorded  # a URL goes to the Jobs API as it was given; any other form to the sweep
    assert run_call == (path, "dialect", address, None, "run-out")
    assert exp_call[0] == path and exp_call[2:] == (address, None, "exp-out")


def test_a_cluster_file_launches_from_run_as_from_launch_and_exp(recorded, tmp_path):
    job_file = write_job_file(tmp_path, "dialect")
    cluster = str(tmp_path / "c.yaml")
    assert cli("run", str(job_file), "--cluster", cluster, "--output", "a", "--no-plots") == 0
    assert cli("launch", "--job", str(job_file), "--cluster", cluster, "--output", "b", "--no-plots") == 0
    assert cli(*EXP1, "--cluster", cluster, "--output", "c", "--no-plots") == 0
    assert [c[0] for c in recorded] == ["launch"] * 3
    assert [c[2:] for c in recorded] == [(None, cluster, "a"), (None, cluster, "b"), (None, cluster, "c")]


def test_launch_takes_only_a_dashboard_url_and_run_refuses_a_remote_dashboard(recorded, tmp_path, capsys):
    job_file = str(write_job_file(tmp_path, "dialect"))
    assert cli("launch", "--job", job_file, "--address", "127.0.0.1:8265") == 2
    assert "http(s)://HOST:8265" in one_error_line(capsys)
    assert cli("run", job_file, "--address", "http://head:8265", "--dashboard") == 2
    assert "--dashboard" in one_error_line(capsys)
    assert recorded == [] and not (tmp_path / "results").exists()


def test_run_inprocess_runs_a_synthetic_job_end_to_end_without_ray(tmp_path, monkeypatch, capsys):
    from kvray.data.manifest import last_run
    from kvray.data.reader import read_results

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails: inprocess must never need it
    job_file = write_job_file(tmp_path, "e2e", grid={"prompt_toks": [8, 16], "gen_toks": [3], "concurrency": [1, 2]})
    out = tmp_path / "out"
    assert cli("run", str(job_file), "--address", "inprocess", "--output", str(out), "--no-plots") == 0
    rows = read_results(out, traces=False)
    assert sorted(
        (r["cell"]["workload"]["requests"][0]["prompt_toks"], len(r["cell"]["workload"]["requests"])) for r in rows
    ) == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert {r["status"] for r in rows} == {"ok"}
    run = last_run(out)
    assert run["address"] == "inprocess" and run["cells_to_run"] == 4 and run["outcome"] == "finished"
    assert "4 run now, 0 already done" in capsys.readouterr().out
    # the rerun resumes: nothing left to do, said the same way
    assert cli("run", str(job_file), "--address", "inprocess", "--output", str(out), "--no-plots") == 0
    assert "0 run now, 4 already done" in capsys.readouterr().out


# --- -m/--model or MODEL -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["info", "{}", "--json"],
        ["check", "{}", "-c", "2", "--seq-len", "1000", "--gpu", "L4", "--json"],
        ["predict", "--concurrency", "1", "2", "{}", "--json", "--no-calibration"],  # a list flag stops at MODEL
    ],
)
def test_the_model_is_the_positional_or_m_and_two_different_ones_are_one_line(args, capsys):
    model = "facebook/opt-1.3b"
    outputs = []
    for form in ([model], ["-m", model], ["--model", model], [model, "-m", model]):
        argv = [a for arg in args for a in (form if arg == "{}" else [arg])]
        assert cli(*argv) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert all(o == outputs[0] for o in outputs)
    two = [a for arg in args for a in ([model, "-m", "gpt2"] if arg == "{}" else [arg])]
    assert cli(*two) == 2
    assert "two models given" in one_error_line(capsys)
    none = [arg for arg in args if arg != "{}"]
    assert cli(*none) == 2
    assert "-m/--model" in one_error_line(capsys)


# --- --output, and the old --out still parsed ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args"),
    [("plot", ["res"]), ("compare", ["base", "new"]), ("calibrate", ["res"])],
)
def test_output_is_the_flag_and_out_still_parses_but_is_not_listed(command, args):
    import typer.main

    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    for flag in ("--output", "--out"):
        ctx = cmd.make_context(command, [*args, flag, "somewhere"])
        assert ctx.params["output"] == "somewhere"
    help_text = cmd.get_help(cmd.make_context(command, list(args)))
    assert "--output" in help_text and "--out " not in help_text and "--out," not in help_text


# --- the public API returns what it ran ----------------------------------------------------------------------


def test_check_oom_risk_is_a_dataclass_and_check_json_keeps_its_keys(capsys):
    risk = kvray.check_oom_risk("gpt2", 2, 1000, gpu="L4")
    assert isinstance(risk, kvray.OomRisk)
    # GPT-2: 12 layers × (K + V) × 12 heads × 64 dims × 2 B (bf16) = 36,864 B a token; 2 × 1000 tokens
    assert risk.kv_gb == pytest.approx(2 * 1000 * 36_864 / 2**30)
    assert cli("check", "gpt2", "-c", "2", "--seq-len", "1000", "--gpu", "L4", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data == risk.to_dict()
    assert set(data) == {
        "model",
        "tensor_parallel",
        "per_gpu",
        "concurrency",
        "seq_len",
        "dtype",
        "kv_dtype",
        "layout",
        "device",
        "risk_level",
        "weights_gb",
        "kv_gb",
        "activation_gb",
        "overhead_gb",
        "total_estimated_gb",
        "available_gb",
        "fraction_of_available",
        "max_concurrency",
        "recommendations",
    }


def test_many_parameter_functions_take_their_settings_by_keyword():
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.simulate import predict_cell

    g = resolve_geometry("gpt2")
    with pytest.raises(TypeError):
        predict_cell(g, "H100-SXM", 1, 8, 2, "bf16")  # type: ignore[misc]
    with pytest.raises(TypeError):
        kvray.check_oom_risk("gpt2", 1, 8, "bf16")  # type: ignore[misc]
    with pytest.raises(TypeError):
        kvray.run_job(None, None, "inprocess")  # type: ignore[arg-type, misc]


# --- bench: -c is concurrency, --users a closed loop's users --------------------------------------------------

BENCH = ("bench", "-m", "kvray/tiny-llama", "--backend", "synthetic", "--dtype", "fp32", "--warmup", "0")


def test_bench_users_is_a_closed_loop_and_the_older_load_closed_c_is_the_same_cell(tmp_path, capsys):
    args = ("--repeats", "1", "--prompt-toks", "8", "--gen-toks", "2", "--requests", "6", "--json")
    assert cli(*BENCH, *args, "--users", "3", "--output", str(tmp_path / "a")) == 0
    users = json.loads(capsys.readouterr().out)
    assert cli(*BENCH, *args, "--load", "closed", "-c", "3", "--output", str(tmp_path / "b")) == 0
    older = json.loads(capsys.readouterr().out)
    assert users["cell_id"] == older["cell_id"] and users["status"] == "ok"
    assert users["metrics"]["load"] == "closed" and users["metrics"]["users"] == 3
    assert cli(*BENCH, *args, "--users", "3", "--load", "poisson", "--output", str(tmp_path / "c")) == 2
    assert "--users makes a closed loop" in one_error_line(capsys)
    assert not (tmp_path / "c").exists()
