"""Test tiers and shared fixtures.

The README's command, ``uv run pytest -q``, runs the fast tier: every in-process test (crafted datasets,
backends on tiny models, the simulator, the in-process sweep runner, every command once). A test's tier
follows from what it starts, declared once here or by a marker on the test:

  integration  a real Ray (the ``ray_session`` fixture), ``kvray`` child processes, ``transformers serve``
  cluster      several Ray nodes, a ``ray start --head``, sshd, object storage (the ``s3`` fixture)
  vllm         vLLM's CPU build

``.ci/run`` runs the fast tier, then ``-m "integration or cluster or vllm"``; ``-m ""`` runs everything.
"""

import os
import sys
from pathlib import Path

import pytest

# Tests never reach the hub: an unknown id must fail fast, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["ray_fixtures", "storage_fixtures", "netns_fixtures"]

# What a test starts decides its tier: a fixture that starts it marks every test that asks for it.
TIER_OF_FIXTURE = {
    "ray_session": "integration",  # tests/ray_fixtures.py: one local Ray for the session
    "transformers_server": "integration",  # tests/test_openai_backend.py: a real `transformers serve`
    "s3": "cluster",  # tests/storage_fixtures.py: moto's S3 server
    "ray_head": "cluster",  # tests/ray_fixtures.py: a real `ray start --head`, shared by the modules that ask
    "bare_head": "cluster",  # tests/test_launch_bare.py: a head without typer/rich
    "cluster_run": "cluster",  # tests/test_tp_placement.py: a multi-node ray.cluster_utils.Cluster
    "partition_lab": "cluster",  # tests/netns_fixtures.py: Ray nodes in their own network namespaces
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, tier in TIER_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(tier)
