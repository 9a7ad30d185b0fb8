"""``--output s3://…`` against a real S3-compatible server: moto's server mode on 127.0.0.1, in a subprocess.

Nothing of pyarrow is mocked: kvray's commands run as ``python -m kvray.cli`` processes that reach the server
through pyarrow's S3 filesystem, configured only by the standard environment (``AWS_ENDPOINT_URL``, keys,
region), as a user's would be. The runs join the test session's Ray (``--address``), so their collector is a
Ray actor that did not inherit the subprocess's environment: it uploads with what the driver forwarded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from ray_fixtures import SIM_JOB
from storage_fixtures import BUCKET, S3, SECRET, free_port

from kvray.data.reader import load_dataset

SLOW_JOB = """
name: s3_slow
models: [kvray/tiny-llama]
backends: [synthetic]
dtypes: [fp32]
warmup: 4
repeats: 1
workers: 1
options: {ttft_s: 0.05, tpot_s: 0.05}
grid:
  prompt_toks: [8, 16, 32, 64]
  gen_toks: [12]
  concurrency: [1, 2, 3]
"""  # 12 cells of 5 × 0.6 s on one worker. The collector flushes (and so uploads) only outside a neighbour's
# measured window (kvray/sweep/collector.py): with 4 unmeasured warmups per measured run, 4 of 5 of its 5 s
# ticks find the worker outside one, so the first part goes up seconds into a run of ~36 s.


def kvray(s3: S3, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvray.cli", *args], env=s3.env, capture_output=True, text=True, timeout=timeout_s
    )


def job_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_run_plot_report_round_trip_through_the_bucket(s3: S3, ray_session: Any, tmp_path: Path) -> None:
    address = ray_session.get_runtime_context().gcs_address
    run = kvray(
        s3,
        "run",
        str(job_file(tmp_path, SIM_JOB)),
        "--output",
        f"s3://{BUCKET}/run1",
        "--address",
        address,
        "--no-plots",
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"s3://{BUCKET}/run1" in run.stdout
    keys = s3.keys("run1")
    for name in (
        "cells.jsonl",
        "traces.jsonl",
        "manifest.json",
        "cells.parquet",
        "cells.csv",
        "traces.parquet",
        "parts/index.json",
        "parts/cells-000001.parquet",
    ):
        assert name in keys, keys
    assert not [k for k in keys if any(p.startswith(".") for p in k.split("/"))], keys  # no lock, temp or record
    cells, traces, manifest = load_dataset(s3.download("run1", tmp_path / "copy"))
    assert len(cells) == 4 and set(cells["status"]) == {"ok"} and cells["cell_id"].is_unique
    assert manifest["runs"][-1]["output"] == f"s3://{BUCKET}/run1"
    assert manifest["runs"][-1]["collector"]["uploads"] > 0  # the collector uploaded, not only the driver
    assert manifest["runs"][-1]["collector"]["upload_failures"] == 0

    plot = kvray(s3, "plot", f"s3://{BUCKET}/run1")
    assert plot.returncode == 0, plot.stderr[-3000:]
    report = kvray(s3, "report", f"s3://{BUCKET}/run1", "--no-figures")  # embeds the figures it downloaded
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"s3://{BUCKET}/run1/report.html" in report.stdout
    keys = s3.keys("run1")
    assert "report.html" in keys and "report.md" in keys
    assert [k for k in keys if k.startswith("figures/") and k.endswith(".png")], keys
    with s3.fs().open_input_stream(f"{BUCKET}/run1/report.html") as fh:
        assert b"data:image/png;base64," in fh.read()
    for key in keys:  # the secret key reached every process, and no object
        with s3.fs().open_input_stream(f"{BUCKET}/run1/{key}") as fh:
            assert SECRET.encode() not in fh.read(), key
    assert list(s3.staging.iterdir()) == []  # every staging folder removed once its upload succeeded


def test_compare_reads_two_bucket_folders(s3: S3, tmp_path: Path) -> None:
    """run1 (from the round trip, or seeded here) copied to run2 server-side: compare reads both, writes into
    run2/compare in the bucket, and finds no change between identical data."""
    import pyarrow.fs as pafs

    if "cells.jsonl" not in s3.keys("run1"):  # the round trip did not run first (-k): seed run1 from a folder
        pytest.skip("needs test_run_plot_report_round_trip_through_the_bucket's run1")
    pafs.copy_files(f"{BUCKET}/run1", f"{BUCKET}/run2", source_filesystem=s3.fs(), destination_filesystem=s3.fs())
    out = kvray(s3, "compare", f"s3://{BUCKET}/run1", f"s3://{BUCKET}/run2", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    data = json.loads(out.stdout)
    assert data["outputs"]["markdown"] == f"s3://{BUCKET}/run2/compare/compare.md"
    assert data["counts"]["slower"] == 0 and data["counts"]["faster"] == 0
    assert {"compare/compare.md", "compare/compare.html"} <= set(s3.keys("run2"))
    assert not [k for k in s3.keys("run1") if k.startswith("compare/")]  # the base is only read
    with s3.fs().open_input_stream(f"{BUCKET}/run2/compare/compare.md") as fh:
        assert f"s3://{BUCKET}/run1".encode() in fh.read()  # named as the user named it, not its staging copy
    assert list(s3.staging.iterdir()) == []


def test_rows_reach_the_bucket_while_the_run_goes(s3: S3, ray_session: Any, tmp_path: Path) -> None:
    """The collector uploads after each parts flush: the bucket holds a loadable dataset before the run ends,
    and still does after the driver is killed (SIGKILL: no exit handler runs, only the collector's uploads)."""
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvray.cli",
            "run",
            str(job_file(tmp_path, SLOW_JOB)),
            "--output",
            f"s3://{BUCKET}/killed",
            "--address",
            address,
            "--no-plots",
        ],
        env=s3.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and "parts/index.json" not in s3.keys("killed"):
            time.sleep(0.5)
        assert proc.poll() is None, (
            f"the run ended before its first upload: {proc.stderr.read() if proc.stderr else ''}"
        )
        assert "parts/index.json" in s3.keys("killed"), "no part reached the bucket within 240 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    cells, _, manifest = load_dataset(s3.download("killed", tmp_path / "copy"))
    assert 1 <= len(cells) < 12 and set(cells["status"]) == {"ok"} and cells["cell_id"].is_unique
    assert manifest["job"]["name"] == "s3_slow"
    left = list(s3.staging.iterdir())  # a killed driver cannot clean up: its staging folder stays behind
    assert len(left) == 1
    shutil.rmtree(left[0])


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("ftp://somewhere/results", "unknown storage scheme 'ftp'"),
        (f"s3://no-such-bucket-{os.getpid()}/run", "does not exist"),
        (f"s3://test-key:{SECRET}@{BUCKET}/run", "credentials in a URI are not accepted"),
    ],
)
def test_bad_uris_are_one_line_and_exit_2(s3: S3, tmp_path: Path, uri: str, needle: str) -> None:
    out = kvray(s3, "run", str(job_file(tmp_path, SIM_JOB)), "--output", uri, "--no-plots", timeout_s=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert SECRET not in out.stderr
    assert list(s3.staging.iterdir()) == []  # nothing staged, nothing created
    assert s3.keys("run") == []
    assert not (Path.cwd() / "ftp:").exists() and not (Path.cwd() / "s3:").exists()


def test_unreachable_endpoint_is_one_line(s3: S3, tmp_path: Path) -> None:
    env = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    out = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "plot", f"s3://{BUCKET}/run1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "cannot reach" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_sync_sends_what_changed_once(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, against the same server: a mid-run sync sends the parts and the JSONL cut at the index's
    offsets (the bucket loads exactly the flushed rows); nothing unchanged is sent twice, downloaded files
    included; the final sync sends the rest; a file removed here is removed there."""
    from kvray.backends import get_backend
    from kvray.data import parts
    from kvray.data.layout import CELLS_JSONL
    from kvray.data.location import Stage
    from kvray.data.writer import DatasetWriter
    from kvray.plan.job import job_from_dict
    from kvray.plan.planner import plan_cells
    from kvray.runner.run import run_cell

    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "KVRAY_STAGING_DIR",
    ):
        monkeypatch.setenv(key, s3.env[key])
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    job = job_from_dict(
        {
            "name": "unit",
            "models": ["kvray/tiny-llama"],
            "backends": ["synthetic"],
            "dtypes": ["fp32"],
            "warmup": 0,
            "repeats": 1,
            "options": {"ttft_s": 0.0, "tpot_s": 0.0},
            "grid": {"prompt_toks": [8, 9, 10, 11, 12], "gen_toks": [2], "concurrency": [1]},
        }
    )
    results = [run_cell(get_backend("synthetic"), cell) for cell in plan_cells(job)]
    stage = Stage.create(f"s3://{BUCKET}/unit")
    try:
        assert stage.check() == "missing" and stage.download() == 0
        writer = DatasetWriter(stage.local, tables=False)
        for r in results[:3]:
            writer.append(r)
        writer.flush()
        for r in results[3:]:  # after the part: not in the bucket until the final sync
            writer.append(r)
        assert stage.sync(final=False) >= 5  # cells + traces part, cells + traces JSONL, the index
        index = parts.read_index(stage.local)
        assert index is not None
        with s3.fs().open_input_stream(f"{BUCKET}/unit/{CELLS_JSONL}") as fh:
            assert len(fh.read()) == index.offsets["cells"] < (stage.local / CELLS_JSONL).stat().st_size
        cells, _, _ = load_dataset(s3.download("unit", tmp_path / "mid"))
        assert len(cells) == 3
        assert stage.sync(final=False) == 0  # nothing new flushed: nothing sent
        (stage.local / "figures").mkdir()
        (stage.local / "figures" / "x.png").write_bytes(b"png")
        assert stage.sync(final=True) >= 3  # the JSONL files whole, the figure
        assert stage.sync(final=True) == 0
        cells, _, _ = load_dataset(s3.download("unit", tmp_path / "end"))
        assert len(cells) == 5
        (stage.local / "figures" / "x.png").unlink()
        assert stage.sync(final=True) == 0 and stage.deletes == 1
        assert "figures/x.png" not in s3.keys("unit")
    finally:
        stage.cleanup()
    again = Stage.create(f"s3://{BUCKET}/unit")
    try:
        assert again.check() == "folder" and again.download() == len(s3.keys("unit"))
        DatasetWriter(again.local, tables=False)  # a resume opens the folder: nothing of it changes
        assert again.sync(final=True) == 0  # what was downloaded is not sent back
    finally:
        again.cleanup()


def test_an_interrupted_command_still_uploads(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C inside the block: what the command wrote reaches the bucket, and the interrupt goes on."""
    from kvray.data.location import output_folder

    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "KVRAY_STAGING_DIR",
    ):
        monkeypatch.setenv(key, s3.env[key])
    with pytest.raises(KeyboardInterrupt), output_folder(f"s3://{BUCKET}/interrupted") as folder:
        (folder / "cells.jsonl").write_text('{"cell_id": "a"}\n')
        raise KeyboardInterrupt
    assert s3.keys("interrupted") == ["cells.jsonl"]
    assert list(s3.staging.iterdir()) == []
