"""Experiments are objects (issue 26): every exp command, `kvray plot` and the report read one registry, so a new
experiment is one module. This file *is* that module for a toy experiment — registered from here, nothing else
edited — and the test sees it in the command list, the plan, a run, the report's sections and its findings.

Also: the built-in experiments' commands are exactly the registry's, and one `kvray report` reads each file of
the results folder once (a counter on the dataset store's readers)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Annotated

import pytest
import typer

from kvray.analysis.evidence import Finding
from kvray.analysis.findings import FindingRule
from kvray.experiments import Experiment, Flags, Page, experiments, get, register, unregister
from kvray.plan.job import Job

# --- the toy experiment: everything kvray needs to know about it, declared here --------------------------


def toy_build(
    flags: Flags,
    prompt_toks: Annotated[int, typer.Option("--prompt-toks", help="prompt tokens")] = 8,
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", "-c", help="requests: 1 3 (default)")
    ] = None,
) -> tuple[Job, list[str]]:
    """Toy, a burst of equal requests per concurrency on the synthetic backend."""
    from kvray.plan.experiments import experiment_job
    from kvray.plan.job import Grid

    common = flags.common(None, default_backends=("synthetic",))
    grid = Grid(gen_toks=(4,), prompt_toks=(prompt_toks,), concurrency=tuple(sorted(set(concurrency or [1, 3]))))
    return experiment_job("toy", common, [grid]).validate(), ["toy: a note printed before the run"]


def toy_requests(view) -> list[Finding]:
    """How many requests the toy cells ran: from the rows' own request counts."""
    rows = view.cells[view.cells["experiment"] == "toy"]
    if not len(rows):
        return []
    n = int(rows["requests"].sum())
    return [Finding("toy_requests", "toy", "all", {"requests": n}, f"the toy cells ran {n} requests.")]


def toy_section(exp: Experiment, page: Page):
    from kvray.document import Block
    from kvray.experiments.sections import cells_blocks

    return [*cells_blocks(exp, page), Block("p", "The toy's own paragraph.")]


TOY = Experiment(
    name="toy",
    title="Toy — a registered experiment",
    build=toy_build,
    section=toy_section,
    findings=lambda: (FindingRule("toy_requests", "Requests the toy ran", toy_requests),),
)


class FlagsStub:
    """What the CLI hands ``build`` (ExperimentFlags.common), for building the job without the CLI."""

    def common(self, backends, default_backends=("hf",), extra_options=()):
        from kvray.plan.experiments import Common

        return Common(
            model="kvray/tiny-llama",
            backends=list(default_backends),
            dtype="fp32",
            warmup=0,
            repeats=1,
            options={"ttft_s": 0.01, "tpot_s": 0.005},
        )


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    unregister("toy")


def command_names(app: typer.Typer) -> list[str]:
    return list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def run_cli(app: typer.Typer, *args: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        typer.main.get_command(app).main(args=list(args), prog_name="kvray", standalone_mode=False)
    return out.getvalue()


def test_a_registered_experiment_is_a_command_a_plan_a_report_section_and_findings(toy, tmp_path, capsys):
    from kvray.cli.app import new_app
    from kvray.plan.planner import plan_cells
    from kvray.report import make_report
    from kvray.sweep import run_job

    assert [e.name for e in experiments()][-1] == "toy"
    app = new_app()
    names = command_names(app)
    assert (
        names.index("compare") < names.index("exp1") < names.index("exp7") < names.index("toy") < names.index("predict")
    )
    assert "Toy, a burst of equal requests" in run_cli(app, "--help")
    shown = json.loads(run_cli(app, "toy", "-m", "kvray/tiny-llama", "-c", "1", "2", "4", "--dry-run", "--json"))
    assert [c["concurrency"] for c in shown["cells"]] == [1, 2, 4] and {c["experiment"] for c in shown["cells"]} == {
        "toy"
    }
    assert shown["job"] == "toy-kvray--tiny-llama"

    job, notes = toy.build(FlagsStub())
    assert notes == ["toy: a note printed before the run"]
    assert sorted(c.concurrency for c in plan_cells(job)) == [1, 3] and job.experiment == "toy"
    run_job(job, tmp_path, address="inprocess", progress=False)
    md = make_report(tmp_path).markdown.read_text()
    toy_part = md[md.index("## Toy — a registered experiment") :].split("\n## ", 1)[0]
    assert len([line for line in toy_part.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]) == 2
    assert "The toy's own paragraph." in toy_part and "## Other cells" not in md  # toy cells are the toy's
    assert "### Requests the toy ran\n\n- the toy cells ran 4 requests." in md  # 1 + 3 requests, one repeat
    assert "## Exp1 — concurrency sweep" in md and "No exp1 cells in this dataset" in md


def test_without_registration_there_is_no_toy(tmp_path):
    from kvray.cli.app import new_app

    assert "toy" not in [e.name for e in experiments()]
    assert "toy" not in command_names(new_app())


def test_the_built_in_experiments_are_the_commands_and_the_job_files():
    from kvray.cli.app import app

    builtin = [*(f"exp{i}" for i in range(1, 9)), "exp9"]
    assert [e.name for e in experiments()] == builtin
    assert [name for name in command_names(app) if name.startswith("exp")] == builtin
    jobs = Path(__file__).parents[1] / "jobs"
    from kvray.plan.job import load_job

    assert sorted(load_job(p).experiment for p in jobs.glob("exp*.yaml")) == builtin  # one job file each
    assert get("exp5").title == "Serving — goodput under SLOs"


def test_a_report_reads_each_file_of_the_folder_once(tmp_path, monkeypatch):
    """The folder's readers, counted: every JSONL file is parsed once, the parts' tables once per kind (before
    the Dataset, one report read cells.jsonl about nine times in three shapes: records, frames, a View)."""
    from collections import Counter

    from job_files import synthetic_job

    import kvray.data.parts as parts
    import kvray.data.reader as reader
    from kvray.cli import main
    from kvray.sweep import run_job

    run_job(synthetic_job("reads"), tmp_path, address="inprocess", progress=False)
    reads: Counter[str] = Counter()
    jsonl, read_parts = reader.jsonl_last_wins, parts.read_parts

    def count_jsonl(path, start=0, *args, **kwargs):
        reads[Path(path).name + (" after the parts" if start else "")] += 1  # a tail: the rows the parts lack
        return jsonl(path, start, *args, **kwargs)

    def count_parts(out_dir, index, kind):
        reads[f"parts/{kind}"] += 1
        return read_parts(out_dir, index, kind)

    monkeypatch.setattr(reader, "jsonl_last_wins", count_jsonl)
    monkeypatch.setattr(parts, "read_parts", count_parts)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 0
    assert reads and max(reads.values()) == 1, reads


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["exp1", "--output-dir", "old-name", "-c", "1,2", "--dry-run", "--json"], 0, ""),  # the hidden old name
        (["exp1", "--output", "a", "--output-dir", "b", "--dry-run"], 2, "give one folder"),
        (["exp5", "-c", "4", "--dry-run"], 2, "No such option: -c"),  # -c is concurrency; exp5 has --users
        (["exp2", "--seqlens", "128", "256", "gpt2", "--dry-run"], 2, "unexpected extra argument"),  # list ends
    ],
)
def test_exp_commands_speak_one_dialect(capsys, args, code, needle):
    from kvray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert needle in err and len(err.strip().splitlines()) <= 1
