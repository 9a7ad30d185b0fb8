"""`kvray launch` against a head whose Python lacks kvray's light dependencies — a team cluster's usual state.

The head here is a real `ray start --head` on 127.0.0.1 running a Python that has Ray, torch and transformers
but neither typer nor rich (nor kvray): a virtualenv of the same interpreter whose site-packages see this
project's packages through a folder of links that leaves those out. Submitted blind, such a job dies on
`import typer`; kvray's preflight must find the gap and either add the two packages to the job's runtime
environment (Ray installs them from PyPI into the job's own virtualenv) or, with --no-provision, stop with
one line that says what to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from ray_fixtures import SIM_JOB, ray_head_process

VENV_BIN = Path(sys.executable).parent
LEFT_OUT = ("typer", "rich", "kvray", "_editable_impl_kvray", "__editable__", "_virtualenv", "pip")


@pytest.fixture(scope="module")
def bare_bin(tmp_path_factory) -> Path:
    """The bin folder of a Python with this project's packages minus typer, rich and kvray."""
    root = tmp_path_factory.mktemp("bare")
    base = Path(os.path.realpath(VENV_BIN / "python"))
    venv = root / "venv"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True, timeout=120)  # with pip: Ray installs with it
    farm = root / "farm"
    farm.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(LEFT_OUT):
            (farm / entry.name).symlink_to(entry)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "zz_kvray_test_farm.pth").write_text(f"import site; site.addsitedir({str(farm)!r})\n")
    bin_dir = venv / "bin"
    ray = bin_dir / "ray"
    ray.write_text(f"#!{bin_dir / 'python'}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n")
    ray.chmod(0o755)
    check = subprocess.run(
        [str(bin_dir / "python"), "-c", "import ray, torch, transformers, pyarrow; import typer"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "No module named 'typer'" in check.stderr, check.stderr[-2000:]  # everything else imports
    return bin_dir


@pytest.fixture(scope="module")
def bare_head(tmp_path_factory, bare_bin):
    with ray_head_process(tmp_path_factory.mktemp("bare-head"), bare_bin) as (url, ports):
        yield url, ports


def _launch(head, job: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    url, ports = head
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kvray.cli",
            "launch",
            "--address",
            url,
            "--job",
            str(job),
            "--output",
            str(out),
            "--timeout-s",
            "600",
            "--no-plots",
            "--ray-client-port",
            str(ports["--ray-client-server-port"]),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=700,
    )


def test_without_provisioning_one_line_names_what_to_install(bare_head, tmp_path):
    from importlib.metadata import version

    job = tmp_path / "bare_head.yaml"
    job.write_text(SIM_JOB)
    run = _launch(bare_head, job, tmp_path / "out", "--no-provision")
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "typer missing" in run.stderr and "rich missing" in run.stderr
    assert f"pip install typer=={version('typer')} rich=={version('rich')}" in run.stderr
    assert not (tmp_path / "out").exists()


def test_missing_typer_and_rich_are_provisioned_and_the_job_runs(bare_head, tmp_path):
    from importlib.metadata import version

    from kvray.data.reader import load_dataset

    job = tmp_path / "bare_head.yaml"
    job.write_text(SIM_JOB)
    out = tmp_path / "out"
    run = _launch(bare_head, job, out)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    pins = f"typer=={version('typer')}, rich=={version('rich')}"
    assert f"the cluster's Python lacks {pins}: added to the job's environment" in run.stdout
    assert "ModuleNotFoundError" not in run.stdout
    cells, traces, _ = load_dataset(out)
    assert len(cells) == 4 and set(cells["status"]) == {"ok"} and len(traces) == 6
