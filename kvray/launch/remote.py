"""What every path to a remote Ray cluster shares: its token, its default Ray Client port, and the error a
remote failure is (kvray/launch/jobs_api.py submits jobs, kvray/launch/cluster_up.py brings clusters up)."""

from __future__ import annotations

import os
from pathlib import Path

RAY_CLIENT_PORT = 10001  # `ray start --head`'s default --ray-client-server-port


class RemoteJobError(RuntimeError):
    """The job ran on the cluster and did not bring a dataset back: its status, exit code and last log lines."""


def ray_auth_headers() -> dict[str, str]:
    """The Authorization header for a token-authenticated cluster, from the environment or Ray's token file."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}
