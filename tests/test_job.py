"""Job files: the shipped ones plan as documented; every mistake is one line naming file, key and what is allowed."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvray.errors import KvrayInputError
from kvray.plan.job import Grid, Job, job_from_dict, load_job
from kvray.plan.planner import plan_cells

JOBS = Path(__file__).parent.parent / "jobs"

GOOD = """
name: t
models: [kvray/tiny-llama]
backends: [synthetic]
dtypes: [fp32]
grid:
  prompt_toks: [16, 32]
  gen_toks: [4]
  concurrency: [1, 2]
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_jobs_plan_the_seed_experiments():
    expected = {
        "exp1_concurrency": ("exp1", "facebook/opt-1.3b", [(c, 512, 64) for c in (1, 2, 4, 8)]),
        "exp2_seqlen": ("exp2", "Qwen/Qwen2.5-0.5B", [(1, p, 64) for p in (128, 512, 1024, 2048, 4096)]),
        "exp3_mixed": ("exp3", "Qwen/Qwen2.5-0.5B", [(4, 128, 64), (4, 4096, 64), (1, 4096, 64)]),
    }
    for name, (experiment, model, shapes) in expected.items():
        job = load_job(JOBS / f"{name}.yaml")
        cells = plan_cells(job)
        assert job.name == name and {c.experiment for c in cells} == {experiment}
        assert {c.model for c in cells} == {model}
        assert [(c.concurrency, c.prompt_toks, c.gen_toks) for c in cells] == shapes
    mixed = [c for c in plan_cells(load_job(JOBS / "exp3_mixed.yaml")) if c.workload.kind == "mixed"]
    assert [r.prompt_toks for r in mixed[0].workload.requests] == [128, 128, 128, 4096]


def test_quickstart_is_small_and_covers_the_three_experiments():
    job = load_job(JOBS / "quickstart.yaml")
    cells = plan_cells(job)
    assert job.models == ["kvray/tiny-llama"] and job.weights == "random"
    assert {c.experiment for c in cells} == {"exp1", "exp2", "exp3"}
    assert len(cells) <= 12 and max(c.concurrency * c.workload.max_seq_len for c in cells) <= 8192


def test_plan_is_deterministic_and_merges_duplicates(tmp_path):
    text = GOOD.replace(
        "grid:\n  prompt_toks: [16, 32]\n  gen_toks: [4]\n  concurrency: [1, 2]",
        "grid:\n  - {prompt_toks: [16, 32], gen_toks: [4], concurrency: [1, 2]}\n"
        "  - {prompt_toks: [16], gen_toks: [4], concurrency: [1]}",
    )
    job = load_job(write(tmp_path, text))
    first, second = plan_cells(job), plan_cells(load_job(write(tmp_path, text, "again.yaml")))
    assert len(job.grids) == 2 and len(first) == 4  # the second block repeats a cell of the first
    assert [c.cell_id for c in first] == [c.cell_id for c in second]
    assert len({c.cell_id for c in first}) == 4


def test_scalars_stand_for_lists_and_mixed_accepts_one_list(tmp_path):
    job = load_job(
        write(
            tmp_path,
            """
            models: kvray/tiny-llama
            backends: synthetic
            dtypes: float32
            grid: {mixed: [8, 8, 64], gen_toks: 4, arrival_gap_s: [0, 0.5]}
            """,
        )
    )
    cells = plan_cells(job)
    assert job.name == "job" and job.dtypes == ["fp32"]
    assert [c.workload.kind for c in cells] == ["mixed", "mixed"]
    assert [r.arrival_s for r in cells[1].workload.requests] == [0.0, 0.5, 1.0]


def test_job_round_trips_through_its_dict():
    job = Job(name="code", models=["kvray/tiny-llama"], grids=[Grid(gen_toks=(4,), prompt_toks=(8,))]).validate()
    again = job_from_dict(job.to_dict())
    assert [c.cell_id for c in plan_cells(job)] == [c.cell_id for c in plan_cells(again)]


def test_hardware_list_plans_each_cell_per_type_and_each_uses_types_present():
    base = {
        "name": "hw",
        "models": ["kvray/tiny-llama"],
        "backends": ["sim"],
        "grid": {"prompt_toks": [8], "gen_toks": [2]},
    }
    listed = job_from_dict({**base, "hardware": ["H100-SXM", "L4"]})
    assert sorted(c.hardware for c in plan_cells(listed)) == ["H100-SXM", "L4"]
    each = job_from_dict({**base, "hardware": "each"})
    assert [c.hardware for c in plan_cells(each)] == ["any"]
    assert [c.hardware for c in plan_cells(each, ["L4", "A100"])] == ["A100", "L4"]


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (("models:", "modles:"), ["modles", "unknown key", "allowed: name"]),
        (("  concurrency:", "  concurency:"), ["grid.concurency", "unknown key", "prompt_toks"]),
        (("[synthetic]", "[tensorrt]"), ["backends[0]", "'tensorrt'", "allowed: hf", "synthetic"]),
        (("[fp32]", "[int3]"), ["dtypes[0]", "unknown dtype", "bf16"]),
        (("[1, 2]", "[1, two]"), ["grid.concurrency", "integers >= 1", "'two'"]),
        (("[16, 32]", "[16, 4094]"), ["grid", "4094", "4097 positions", "kvray/tiny-llama", "4096"]),
        (("[16, 32]", "[0]"), ["grid.prompt_toks", "integers >= 1"]),
        (("name: t", "name: a/b"), ["name", "results folder"]),
        (("[kvray/tiny-llama]", "[nobody/nothing]"), ["models[0]", "unknown model", "bundled:"]),
        (("dtypes: [fp32]", "dtypes: [fp32]\nwarmup: -1"), ["warmup", ">= 0", "-1"]),
        (("dtypes: [fp32]", "dtypes: [fp32]\nhardware: 7"), ["hardware[0]", "string"]),
        (("dtypes: [fp32]", "dtypes: [fp32]\nweights: trained"), ["weights", "allowed: random, pretrained"]),
        (("dtypes: [fp32]", "dtypes: [fp32]\noptions: {ttft_s: [1]}"), ["options.ttft_s", "string, number"]),
        (("  gen_toks: [4]\n", ""), ["grid.gen_toks", "required"]),
        (("dtypes: [fp32]", "dtypes: [fp32]\nclients: 0"), ["clients", "positive integer", "got 0"]),
        (("dtypes: [fp32]", "dtypes: [fp32]\nclients: two"), ["clients", "positive integer", "'two'"]),
        (
            ("dtypes: [fp32]", "dtypes: [fp32]\nclients: 2"),
            ["clients", "synthetic runs in this process", "server backends: vllm, openai"],
        ),
    ],
)
def test_bad_jobs_fail_with_one_line(tmp_path, edit, needles):
    path = write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(KvrayInputError) as info:
        load_job(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_sim_hardware_must_be_a_known_gpu(tmp_path):
    path = write(tmp_path, GOOD.replace("[synthetic]", "[sim]") + "hardware: [Z100]\n")
    with pytest.raises(KvrayInputError, match=r"hardware\[0\].*unknown GPU 'Z100'.*known: A100"):
        load_job(path)


def test_missing_empty_and_broken_files(tmp_path):
    with pytest.raises(KvrayInputError, match="no such job file"):
        load_job(tmp_path / "absent.yaml")
    with pytest.raises(KvrayInputError, match="empty"):
        load_job(write(tmp_path, ""))
    with pytest.raises(KvrayInputError, match=r"not valid YAML at line \d"):
        load_job(write(tmp_path, "models: [a\ngrid: {"))
    with pytest.raises(KvrayInputError, match="expected a mapping"):
        load_job(write(tmp_path, "- a\n- b\n"))


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_kvray_run_rejects_a_bad_job_before_starting_ray(tmp_path):
    path = write(tmp_path, GOOD.replace("[synthetic]", "[tensorrt]"))
    code = (
        "import sys\nfrom kvray.cli import main\n"
        "try:\n    main(['run', sys.argv[1]])\n"
        "finally:\n    print('ray imported' if 'ray' in sys.modules else 'ray not imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvray: error: {path}: backends[0]: got 'tensorrt' (allowed: hf")
    assert "ray not imported" in out.stdout and "Traceback" not in out.stderr


def test_reuse_workloads_in_a_job_grid_work_under_loads_and_round_trip():
    """Issue #15's grid keys: shared_prefix under a closed loop keeps each request's prefix group and gets the
    loop's chains; multi_turn chains each turn after the previous one; both round-trip through to_dict."""
    from kvray.plan.job import job_from_dict
    from kvray.plan.planner import plan_cells

    job = job_from_dict(
        {
            "name": "reuse",
            "models": ["kvray/tiny-llama"],
            "backends": ["synthetic"],
            "dtypes": ["fp32"],
            "grid": [
                {
                    "workload": "shared_prefix",
                    "prefix_toks": [64],
                    "suffix_toks": [16],
                    "groups": [2],
                    "gen_toks": [4],
                    "load": {"kind": "closed", "users": [2], "requests": 6},
                },
                {"workload": "multi_turn", "conversations": [2], "turns": [3], "user_toks": [10], "gen_toks": [5]},
            ],
        }
    )
    shared, chat = plan_cells(job)
    reqs = shared.workload.requests
    assert [r.prefix_group for r in reqs] == [0, 1, 0, 1, 0, 1] and {r.shared_prefix_toks for r in reqs} == {64}
    assert [r.after for r in reqs] == [None, None, 0, 1, 2, 3] and shared.workload.load.kind == "closed"
    assert {r.prompt_toks for r in reqs} == {80}
    turns = chat.workload.requests  # turn k of chat c is request k·2 + c; its prompt is the chat so far
    assert [r.after for r in turns] == [None, None, 0, 1, 2, 3]
    assert [r.prompt_toks for r in turns] == [10, 10, 25, 25, 40, 40]
    again = job_from_dict(job.to_dict(), source="again")
    assert [c.cell_id for c in plan_cells(again)] == [shared.cell_id, chat.cell_id]


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ({"workload": "shared_prefix", "suffix_toks": [8], "gen_toks": [2]}, "prefix_toks"),
        (
            {
                "workload": "multi_turn",
                "conversations": [2],
                "turns": [2],
                "user_toks": [8],
                "gen_toks": [2],
                "load": {"kind": "poisson", "rate": 2, "requests": 4},
            },
            "own arrivals",
        ),
        ({"prompt_toks": [8], "gen_toks": [2], "groups": [2]}, "belongs to workload"),
        ({"workload": "ring", "prompt_toks": [8], "gen_toks": [2]}, "ring"),
        (
            {"workload": "shared_prefix", "prefix_toks": [999999], "suffix_toks": [8], "gen_toks": [2]},
            "max_position_embeddings",
        ),
    ],
)
def test_bad_reuse_blocks_are_one_line_naming_the_key(block, needle):
    from kvray.plan.job import job_from_dict

    with pytest.raises(KvrayInputError, match=needle):
        job_from_dict({"name": "x", "models": ["kvray/tiny-llama"], "backends": ["synthetic"], "grid": [block]})
