"""moto's S3 server on 127.0.0.1, in a subprocess: the real S3-compatible server kvray's object-storage tests
write to. One server and bucket for the session; each module that asks for ``s3`` gets a staging folder of its own,
and each test writes under a prefix of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvray.servers.process import free_port  # noqa: F401 - re-exported to the tests

BUCKET = "kvray-results"
SECRET = "kvray-test-secret-key-0123456789"  # must never appear in any object kvray writes


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]  # for the kvray subprocesses
    staging: Path  # KVRAY_STAGING_DIR of those processes: empty again after each command

    def fs(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key="test-key", secret_key=SECRET, region="us-east-1", endpoint_override=self.endpoint, scheme="http"
        )

    def keys(self, prefix: str) -> list[str]:
        """Every object under ``BUCKET/prefix``, relative to it."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
        infos = self.fs().get_file_info(selector)
        return sorted(i.path[len(BUCKET) + len(prefix) + 2 :] for i in infos if i.type == pafs.FileType.File)

    def download(self, prefix: str, dest: Path) -> Path:
        """The objects under ``prefix`` copied into ``dest`` (what any reader of the bucket sees)."""
        fs = self.fs()
        for rel in self.keys(prefix):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{BUCKET}/{prefix}/{rel}") as src:
                (dest / rel).write_bytes(src.read())
        return dest


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 with one bucket, for the session; stopped (its process group)
    at the end."""
    import pyarrow.fs as pafs

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        pafs.S3FileSystem(
            access_key="test-key",
            secret_key=SECRET,
            region="us-east-1",
            endpoint_override=endpoint,
            scheme="http",
            allow_bucket_creation=True,
        ).create_dir(BUCKET)
        yield endpoint
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> S3:
    """The session's S3 server, with this module's own staging folder (tests count what is left in it)."""
    staging = tmp_path_factory.mktemp("staging")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KVRAY_STAGING"))}
    env.update(
        HF_HUB_OFFLINE="1",
        AWS_ACCESS_KEY_ID="test-key",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=s3_endpoint,
        KVRAY_STAGING_DIR=str(staging),
    )
    return S3(s3_endpoint, env, staging)
