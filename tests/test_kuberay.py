"""KubeRay manifests: cluster/kuberay.yaml (shipped) and `kvray launch --kuberay --emit` (written) are checked
against KubeRay's own CRD schemas (cluster/kuberay-crds/, release v1.7.0), with unknown fields refused as
`kubectl apply`'s strict field validation refuses them — a misspelt key fails here, not on the cluster."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvray.errors import KvrayInputError
from tests.job_files import write_job_file

ROOT = Path(__file__).parent.parent
CRDS = ROOT / "cluster" / "kuberay-crds"


def _strict(schema: Any) -> Any:
    """The CRD's structural schema as the API server applies it with strict field validation: an object with
    declared properties takes no others, unless the CRD says it keeps unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, Any]:
    """kind → a jsonschema validator of that CRD's v1 schema."""
    from jsonschema import Draft7Validator

    found = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        crd = yaml.load((CRDS / name).read_text(), Loader=yaml.CSafeLoader)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        found[crd["spec"]["names"]["kind"]] = Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))
    return found


def _errors(validators: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    assert doc["apiVersion"] == "ray.io/v1"
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]


def _start_resources(group: dict[str, Any]) -> dict[str, float]:
    """The custom resources a group's `ray start` gets: KubeRay writes `--resources=<value>` into a shell line."""
    (arg,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
    return json.loads(arg.split("=", 1)[1])


def test_the_pinned_crds_carry_kuberays_licence():
    assert "Apache License" in (CRDS / "LICENSE").read_text()
    assert "v1.7.0" in (CRDS / "README.md").read_text()


def test_the_shipped_raycluster_validates_and_its_groups_sit_on_their_gpu_type(validators):
    from kvray.hardware.gpus import get_gpu

    doc = yaml.safe_load((ROOT / "cluster" / "kuberay.yaml").read_text())
    assert doc["kind"] == "RayCluster"
    assert _errors(validators, doc) == []
    spec = doc["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no benchmarks
    declared = {
        get_gpu(n).ray_accelerator_type for n in doc["metadata"]["annotations"]["kvray.io/gpu-types"].split(",")
    }
    seen = set()
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        product = pod["nodeSelector"]["nvidia.com/gpu.product"]
        (resource,) = _start_resources(group)
        ray_type = resource.removeprefix("accelerator_type:")
        # the node label GPU Feature Discovery writes and the Ray resource kvray asks for name one GPU type
        assert get_gpu(product).ray_accelerator_type == ray_type
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        seen.add(ray_type)
    assert seen == declared == {"A100", "H100"}


def test_a_misspelt_or_mistyped_field_is_refused(validators):
    """The check is strict enough to matter: what the API server would refuse, the test refuses."""
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replica"] = doc["spec"]["workerGroupSpecs"][0].pop("replicas")
    assert any("replica" in e for e in _errors(validators, doc))
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    assert any("maxReplicas" in e for e in _errors(validators, doc))
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay.yaml").read_text())
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in _errors(validators, doc))


JOBS = {
    "typed_tp": {"hardware": ["A100", "H100"], "tensor_parallel": [1, 2], "backends": ["hf"]},
    "any_gpu": {"backends": ["hf"]},
    "simulated": {"backends": ["sim"], "hardware": ["H100-SXM"]},
}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_emitted_rayjob_validates_and_runs_the_job_into_object_storage(validators, tmp_path, name):
    from kvray.launch.kuberay import DNS_LABEL, JOB_MOUNT, RayJobSettings, emit

    job_file = write_job_file(tmp_path, name, **JOBS[name])
    out = tmp_path / "rayjob.yaml"
    settings = RayJobSettings(namespace="ml-bench", image="reg.example/kvray:0.1.0")
    emit(str(job_file), "s3://bench/runs/x", str(out), settings)
    config_map, rayjob = yaml.safe_load_all(out.read_text())
    assert _errors(validators, rayjob) == []
    assert config_map["kind"] == "ConfigMap" and config_map["apiVersion"] == "v1"
    assert config_map["data"] == {job_file.name: job_file.read_text()}  # the job file, verbatim
    for doc in (config_map, rayjob):
        assert DNS_LABEL.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
        assert doc["metadata"]["namespace"] == "ml-bench"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    # KubeRay pastes the entrypoint unquoted into the submitter's shell line: it must be one plain command
    entry = spec["entrypoint"]
    assert not set(entry) & set(";&|<>$`\\\n'\"")
    assert entry.split()[:4] == ["python", "-m", "kvray.cli", "run"]
    assert entry.split()[4] == f"{JOB_MOUNT}/{job_file.name}" and "s3://bench/runs/x" in entry.split()
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == JOB_MOUNT
    assert "AWS_ACCESS_KEY_ID" not in out.read_text()  # credentials come from the Secret, never the file
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    if name == "typed_tp":
        assert [g["groupName"] for g in groups] == ["a100", "h100"]
        for g, ray_type in zip(groups, ["A100", "H100"], strict=True):
            assert _start_resources(g) == {f"accelerator_type:{ray_type}": 1}
            assert (
                g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
            )  # TP=2 on one pod
    elif name == "any_gpu":
        assert [g["groupName"] for g in groups] == ["gpu"] and "resources" not in groups[0]["rayStartParams"]
    else:
        assert [g["groupName"] for g in groups] == ["cpu"]
        assert "nvidia.com/gpu" not in groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_every_product_label_maps_to_its_ray_type():
    """kvray's affinity table and its GPU table (NVML names) agree on every GPU Feature Discovery label."""
    from kvray.hardware.gpus import match_gpu
    from kvray.launch.kuberay import GPU_PRODUCTS

    for ray_type, labels in GPU_PRODUCTS.items():
        for label in labels:
            spec = match_gpu(label)
            assert spec is not None and spec.ray_accelerator_type == ray_type, label


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--output", "results/x"], "object storage"),
        ([], "--output s3://"),
        (["--output", "s3://b/p", "--namespace", "Bad_NS"], "namespace"),
        (["--output", "s3://user:pw@b/p"], "credentials"),
        (["--output", "s3://b/p", "--address", "http://127.0.0.1:8265"], "leave out --cluster"),
    ],
)
def test_bad_kuberay_input_is_one_line_and_nothing_written(tmp_path, capsys, args, message):
    from kvray.cli.app import main

    job_file = write_job_file(tmp_path, "j", backends=["hf"])
    out = tmp_path / "rayjob.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--job", str(job_file), "--kuberay", "--emit", str(out), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_hardware_each_needs_the_types_listed(tmp_path):
    from kvray.launch.kuberay import rayjob_manifests
    from kvray.plan.job import load_job

    job_file = write_job_file(tmp_path, "j", backends=["hf"], hardware="each")
    with pytest.raises(KvrayInputError, match="list the types"):
        rayjob_manifests(load_job(job_file), job_file, "s3://b/p")


def test_the_command_writes_the_file_and_says_how_to_apply_it(tmp_path, capsys):
    from kvray.cli.app import main

    job_file = write_job_file(tmp_path, "j", backends=["hf"], hardware=["H100"])
    out = tmp_path / "rayjob.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--job", str(job_file), "--kuberay", "--output", "s3://b/p", "--emit", str(out)])
    assert exit_info.value.code in (0, None)
    assert f"kubectl apply -f {out}" in capsys.readouterr().out.replace("\n", "")
    kinds = [d["kind"] for d in yaml.safe_load_all(out.read_text())]
    assert kinds == ["ConfigMap", "RayJob"]


def test_a_job_file_with_non_ascii_text_stays_a_readable_literal_block(tmp_path):
    """The ConfigMap holds the job file as written: a "→" in a comment keeps the literal block (PyYAML escapes
    it into a double-quoted "\\u2192" line without allow_unicode) and the data reads back byte for byte."""
    from kvray.launch.kuberay import emit

    job_file = write_job_file(tmp_path, "arrows", backends=["hf"], hardware=["H100"])
    text = "# prompt → decode, 8–32 tokens (µs-level TTFT budget)\n" + job_file.read_text()
    job_file.write_text(text, encoding="utf-8")
    out = tmp_path / "rayjob.yaml"
    emit(str(job_file), "s3://bench/runs/x", str(out))
    written = out.read_text(encoding="utf-8")
    assert f"  {job_file.name}: |\n    # prompt → decode, 8–32 tokens" in written
    assert "\\u2192" not in written and "\\u" not in written
    config_map, _ = yaml.safe_load_all(written)
    assert config_map["data"] == {job_file.name: text}
