"""`kvray launch --kuberay --emit FILE`: a KubeRay RayJob that runs a kvray job in a cluster of its own.

KubeRay's RayJob creates a RayCluster, submits the entrypoint to it and, with ``shutdownAfterJobFinishes``,
deletes the cluster when the job ends — so the dataset cannot come home over Ray Client as `kvray launch
--address` brings it: the job writes it to object storage itself (``--output s3://…`` is required), and
``kvray plot s3://…`` reads it from there.

The file holds two documents, applied together by ``kubectl apply -f FILE``:
  ConfigMap   the job file, verbatim, mounted read-only into the head pod at JOB_MOUNT
  RayJob      the cluster (a CPU head that runs no benchmarks; one worker group per GPU type the job lists,
              each with ``nvidia.com/gpu`` limits, a node affinity on the GPU Feature Discovery product label
              and ``accelerator_type:<TYPE>`` declared in ``rayStartParams``), and the entrypoint
              ``python -m kvray.cli run JOB --address auto --output s3://… --no-plots``

The entrypoint is one plain command on purpose: KubeRay's submitter pod pastes it unquoted after
``ray job submit --`` into a shell line (ray-operator/controllers/ray/common/job.go), so a ``;`` or a heredoc
would run in the submitter, not in the cluster.

Credentials never enter the file: the head reads the object store's variables (``AWS_*``) and ``HF_TOKEN``
from the Kubernetes Secret SECRET_NAME (optional), and kvray's collector gets them from the driver as on
any cluster. The image must hold kvray and its dependencies (cluster/kuberay.Dockerfile); ``--image`` names it.
Every manifest is checked against KubeRay's own CRD schemas in the tests (cluster/kuberay-crds/, pinned).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvray.backends import backend_class
from kvray.data.location import is_uri
from kvray.errors import KvrayInputError
from kvray.plan.job import Job

JOB_MOUNT = "/home/ray/kvray-job"
SECRET_NAME = "kvray-credentials"  # kubectl create secret generic kvray-credentials --from-literal=AWS_…=…
DEFAULT_IMAGE = "kvray:0.1.0"  # built from cluster/kuberay.Dockerfile and pushed where the cluster pulls from
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on every GPU node by NVIDIA GPU Feature Discovery
# The product label GPU Feature Discovery writes (the NVML name, spaces as dashes) for each Ray accelerator
# type kvray places on; a type not listed here gets no product affinity and is placed by its Ray resource only.
GPU_PRODUCTS: dict[str, tuple[str, ...]] = {
    "A100": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-80GB-PCIe"),
    "H100": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
    "H200": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
    "L4": ("NVIDIA-L4",),
    "L40S": ("NVIDIA-L40S",),
}
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")  # what a ConfigMap key may be
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # Kubernetes object names (RFC 1123 label)


def object_name(job: Job, job_text: str) -> str:
    """``kvray-<job name>-<hash of the job file>``: a valid Kubernetes name, the same for the same file, so
    applying it twice is refused by Kubernetes rather than running the sweep twice."""
    base = re.sub(r"[^a-z0-9-]+", "-", job.name.lower()).strip("-")[:40].strip("-") or "job"
    return f"kvray-{base}-{hashlib.sha256(job_text.encode()).hexdigest()[:8]}"


def worker_groups(job: Job, image: str) -> list[dict[str, Any]]:
    """One worker group per GPU type the job lists (``hardware: [A100, H100]``), one untyped GPU group for
    ``hardware: any``, one CPU group when no cell needs a GPU (simulated backends, ``device: cpu``). A pod
    holds as many GPUs as the job's largest tensor-parallel degree: a TP worker's GPUs are on one node."""
    if all(backend_class(b).simulated for b in job.backends) or job.device == "cpu":
        return [_group("cpu", image, gpus=0, accelerator_type=None)]
    if job.hardware == "each":
        raise KvrayInputError(
            "hardware: each means every GPU type of an existing cluster; a RayJob makes its own: list the types "
            "(hardware: [A100, H100])"
        )
    gpus = max(job.tensor_parallel)
    if job.hardware == "any":
        return [_group("gpu", image, gpus=gpus, accelerator_type=None)]
    return [_group(t.lower(), image, gpus=gpus, accelerator_type=t) for t in job.hardware]


def _group(name: str, image: str, *, gpus: int, accelerator_type: str | None) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(max(4, 4 * gpus)), "memory": f"{max(16, 64 * gpus)}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    pod: dict[str, Any] = {
        "containers": [
            {"name": "ray-worker", "image": image, "resources": {"limits": limits, "requests": dict(limits)}}
        ]
    }
    start: dict[str, str] = {}
    if accelerator_type:
        # What kvray's worker actors ask for (kvray/sweep/placement.py); Ray would detect it from NVML too, but
        # declaring it lets Ray's autoscaler see it before the pod exists.
        start["resources"] = f'"{{\\"accelerator_type:{accelerator_type}\\": 1}}"'
        products = GPU_PRODUCTS.get(accelerator_type)
        if products:
            term = {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(products)}
            pod["affinity"] = {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [term]}]
                    }
                }
            }
    if gpus:  # GPU nodes are usually tainted so that only pods asking for GPUs land there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": name,
        "replicas": 1,
        "minReplicas": 1,
        "maxReplicas": 1,
        "rayStartParams": start,
        "template": {"spec": pod},
    }


def head_group(image: str, config_map: str) -> dict[str, Any]:
    """A CPU head that runs the driver and the collector, no benchmarks (``num-cpus: 0``, as cluster/*.yaml);
    the job file is mounted from the ConfigMap; credentials come from the optional Secret."""
    limits = {"cpu": "2", "memory": "8Gi"}
    container = {
        "name": "ray-head",
        "image": image,
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ],
        "resources": {"limits": limits, "requests": dict(limits)},
        "envFrom": [{"secretRef": {"name": SECRET_NAME, "optional": True}}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "volumeMounts": [{"name": "kvray-job", "mountPath": JOB_MOUNT, "readOnly": True}],
    }
    return {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "spec": {"containers": [container], "volumes": [{"name": "kvray-job", "configMap": {"name": config_map}}]}
        },
    }


@dataclass(frozen=True)
class RayJobSettings:
    """Where and how the RayJob runs: its namespace, the image its pods run, its deadline, and flags added to
    its ``kvray run`` entrypoint."""

    namespace: str = "default"
    image: str = DEFAULT_IMAGE
    timeout_s: float = 3600.0
    extra_args: tuple[str, ...] = ()


def rayjob_manifests(
    job: Job, job_file: str | Path, output: str, settings: RayJobSettings = RayJobSettings()
) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] that run ``job`` (read from ``job_file``) in a KubeRay cluster of its own, writing
    its dataset to the object-storage URI ``output``; the cluster is deleted ten minutes after the job ends."""
    import ray

    namespace, image = settings.namespace, settings.image

    if not is_uri(output):
        raise KvrayInputError(
            f"--kuberay needs --output in object storage (s3://bucket/prefix), got {output!r}: KubeRay deletes the "
            "cluster when the job ends, so the dataset cannot be carried home"
        )
    if not DNS_LABEL.match(namespace):
        raise KvrayInputError(f"--namespace {namespace!r} is not a Kubernetes namespace name (lowercase, digits, -)")
    text = Path(job_file).read_text(encoding="utf-8")
    name = object_name(job, text)
    file_name = Path(job_file).name if CONFIG_KEY.match(Path(job_file).name) else "job.yaml"
    run = [
        "python",
        "-m",
        "kvray.cli",
        "run",
        f"{JOB_MOUNT}/{file_name}",
        "--address",
        "auto",
        "--output",
        output,
        "--no-plots",
        *settings.extra_args,
    ]
    labels = {"app.kubernetes.io/name": "kvray", "app.kubernetes.io/part-of": "kvray"}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {file_name: text},
    }
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {"kvray.io/job": job.name, "kvray.io/output": output},
        },
        "spec": {
            "entrypoint": shlex.join(run),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,  # the cluster (and its logs) stay ten minutes after the job
            "activeDeadlineSeconds": max(1, int(settings.timeout_s)),
            "backoffLimit": 0,  # a sweep is resumable: rerun it yourself rather than twice behind your back
            "rayClusterSpec": {
                "rayVersion": ray.__version__,
                "headGroupSpec": head_group(image, name),
                "workerGroupSpecs": worker_groups(job, image),
            },
        },
    }
    return [config_map, rayjob]


def _block_strings(dumper: Any, value: str) -> Any:
    """Multi-line strings (the job file in the ConfigMap) as YAML literal blocks, readable as written (with
    ``allow_unicode`` in `emit`: PyYAML refuses a literal block for text it would have to escape, so without it a
    job file with one "→" in a comment would come out double-quoted with ``\\u`` escapes)."""
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _dumper() -> Any:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    Dumper.add_representer(str, _block_strings)
    return Dumper


def emit(job_file: str, output: str | None, emit_to: str, settings: RayJobSettings = RayJobSettings()) -> str:
    """Write the manifests to ``emit_to`` (``-``: stdout); returns the text. Bad input is one line, nothing written."""
    import yaml

    from kvray.plan.job import load_job

    job = load_job(job_file)
    if not output:
        raise KvrayInputError("--kuberay needs --output s3://bucket/prefix: the job writes its dataset there")
    if is_uri(output):
        from kvray.data.object_store import parse_remote

        output = parse_remote(output).uri  # a URI kvray cannot use (credentials, query, no bucket): one line here
    docs = rayjob_manifests(job, job_file, output, settings)
    head = (
        f"# kvray job {job.name} as a KubeRay RayJob (written by `kvray launch --kuberay`).\n"
        f"# kubectl apply -f THIS_FILE; kubectl -n {settings.namespace} get rayjob {docs[1]['metadata']['name']} -w\n"
        f"# The dataset goes to {output}; then: kvray plot {output}\n"
    )
    text = head + yaml.dump_all(docs, Dumper=_dumper(), sort_keys=False, width=120, allow_unicode=True)
    if emit_to == "-":
        import sys

        sys.stdout.write(text)
    else:
        Path(emit_to).write_text(text, encoding="utf-8")
    return text
