"""cluster/*.yaml are standard Ray cluster-launcher files: Ray's own validator must accept them unchanged."""

from pathlib import Path

import pytest
import yaml

CLUSTER_DIR = Path(__file__).parent.parent / "cluster"
FILES = sorted(CLUSTER_DIR.glob("*.yaml"))


def test_the_three_cluster_files_exist():
    assert {f.name for f in FILES} >= {"a100.yaml", "h100.yaml", "mixed.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_validator_accepts_cluster_file(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    validate_config(prepare_config(cfg))  # raises on any schema violation
    # kvray's own settings live under metadata, which Ray does not interpret.
    assert set(cfg["metadata"]) == {"kvray"}
    from kvray.hardware.gpus import get_gpu

    accel_types = {
        key.split(":", 1)[1]
        for node in cfg["available_node_types"].values()
        for key in node.get("resources", {})
        if key.startswith("accelerator_type:")
    }
    declared = {get_gpu(name).ray_accelerator_type for name in cfg["metadata"]["kvray"]["gpu_types"]}
    assert accel_types == declared and accel_types
    assert any("install" in cmd and "kvray" in cmd for cmd in cfg["setup_commands"])


def test_ray_rejects_unknown_top_level_keys_so_kvray_keys_must_stay_in_metadata():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER_DIR / "a100.yaml").read_text())
    cfg["kvray"] = {"gpu_types": ["A100-40GB-SXM"]}
    with pytest.raises(Exception, match="kvray"):
        validate_config(prepare_config(cfg))
