"""cluster/*.yaml are standard Ray cluster-launcher files: Ray's own validator must accept them unchanged."""

from pathlib import Path

import pytest
import yaml

CLUSTER_DIR = Path(__file__).parent.parent / "cluster"
FILES = sorted(f for f in CLUSTER_DIR.glob("*.yaml") if f.name != "kuberay.yaml")  # a Kubernetes manifest:
# tests/test_kuberay.py checks it against KubeRay's schema


def test_the_cluster_files_exist():
    assert {f.name for f in FILES} >= {"a100.yaml", "h100.yaml", "mixed.yaml", "local.yaml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_ray_validator_accepts_cluster_file(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    validate_config(prepare_config(cfg))  # raises on any schema violation
    # kvray's own settings live under metadata, which Ray does not interpret.
    assert set(cfg["metadata"]) == {"kvray"}
    from kvray.hardware.gpus import get_gpu

    declared = {get_gpu(name).ray_accelerator_type for name in cfg["metadata"]["kvray"]["gpu_types"]}
    assert any("install" in cmd and "kvray" in cmd for cmd in cfg["setup_commands"])
    if cfg["provider"]["type"] == "local":
        # On-prem boxes: Ray refuses node types here and detects each box's GPUs itself, so the file only
        # names them (metadata) and lists the boxes by address.
        assert declared and "available_node_types" not in cfg
        assert cfg["provider"]["head_ip"] and isinstance(cfg["provider"]["worker_ips"], list)
        assert cfg["auth"]["ssh_user"] and cfg["auth"]["ssh_private_key"]
        return
    accel_types = {
        key.split(":", 1)[1]
        for node in cfg["available_node_types"].values()
        for key in node.get("resources", {})
        if key.startswith("accelerator_type:")
    }
    assert accel_types == declared and accel_types


def test_ray_rejects_unknown_top_level_keys_so_kvray_keys_must_stay_in_metadata():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER_DIR / "a100.yaml").read_text())
    cfg["kvray"] = {"gpu_types": ["A100-40GB-SXM"]}
    with pytest.raises(Exception, match="kvray"):
        validate_config(prepare_config(cfg))


def test_launch_reads_the_heads_ports_from_the_file():
    """`kvray launch --cluster` reaches the dashboard and Ray Client on the ports the head is started with."""
    from kvray.launch.cluster_up import head_port

    local = yaml.safe_load((CLUSTER_DIR / "local.yaml").read_text())
    assert head_port(local, "--dashboard-port", 8265) == 8265
    assert head_port(local, "--ray-client-server-port", 10001) == 10001  # not set: Ray's default
    custom = {
        "head_start_ray_commands": ["ray stop", "ray start --head --dashboard-port 9100 --ray-client-server-port=10201"]
    }
    assert head_port(custom, "--dashboard-port", 8265) == 9100
    assert head_port(custom, "--ray-client-server-port", 10001) == 10201


def test_an_ssh_failure_is_said_by_its_cause_line():
    from kvray.launch.cluster_up import _ssh_error

    proxied = "connect to 127.0.0.1 port 4: Connection refused\nkex_exchange_identification: Connection closed by remote host\n"
    assert _ssh_error(proxied, 255) == "connect to 127.0.0.1 port 4: Connection refused"
    assert _ssh_error("root@10.0.0.1: Permission denied (publickey).\n", 255).endswith("Permission denied (publickey).")
    assert _ssh_error("", 255) == "ssh exited with code 255"
