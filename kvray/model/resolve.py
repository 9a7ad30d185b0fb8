"""Turn a MODEL argument into a geometry: local directory → bundled geometry → Hugging Face hub.

Bundled geometries are the published config.json files of common models, shipped in
``kvray/model/geometries`` so that info, check, predict and random-weight runs need no download.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.model.geometry import ModelGeometry, geometry_from_config

BUNDLED_DIR = Path(__file__).parent / "geometries"


def _bundled_file(model_id: str) -> Path:
    return BUNDLED_DIR / (model_id.replace("/", "--") + ".json")


def bundled_models() -> list[str]:
    return sorted(json.loads(p.read_text())["_name_or_path"] for p in BUNDLED_DIR.glob("*.json"))


def is_bundled(model_id: str) -> bool:
    return _bundled_file(model_id).is_file()


def _read_config_file(path: Path, name: str) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KvrayInputError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise KvrayInputError(f"{path} is not a JSON object")
    cfg.setdefault("_name_or_path", name)
    return cfg


def _hub_config(model_id: str) -> dict[str, Any]:
    """config.json from the hub; any failure (offline, private, typo) becomes one clear line."""
    known = ", ".join(bundled_models())
    if _hub_offline():
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return _fetch_hub_config(model_id)
        except KvrayInputError:
            raise
        except Exception as exc:  # network, 404, auth: all mean "not available here"
            reason = str(exc).splitlines()[0][:120] or type(exc).__name__
    raise KvrayInputError(
        f"unknown model {model_id!r}: not a local directory, not bundled, and the Hugging Face hub "
        f"could not provide it ({reason}); bundled: {known}"
    )


def _fetch_hub_config(model_id: str) -> dict[str, Any]:
    """The hub's cached copy if any, else one GET with a short timeout and no retry storm."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return _read_config_file(Path(cached), model_id)
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{endpoint}/{model_id}/resolve/main/config.json"
    response = httpx.get(url, headers=headers, timeout=5.0, follow_redirects=True)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code} from the hub")
    cfg = response.json()
    if not isinstance(cfg, dict):
        raise KvrayInputError(f"the hub's config.json of {model_id!r} is not a JSON object")
    cfg.setdefault("_name_or_path", model_id)
    return cfg


@lru_cache(maxsize=64)
def load_config(model: str) -> dict[str, Any]:
    """The config.json dict of MODEL (cached: the same id is resolved many times in a sweep)."""
    if not model or not model.strip():
        raise KvrayInputError("model id is empty")
    path = Path(model).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise KvrayInputError(f"{path} is a directory without config.json")
        return _read_config_file(cfg_path, str(path))
    if path.suffix == ".json" and path.is_file():
        return _read_config_file(path, path.stem)
    if is_bundled(model):
        return _read_config_file(_bundled_file(model), model)
    return _hub_config(model)


def resolve_geometry(model: str) -> ModelGeometry:
    return geometry_from_config(load_config(model), name=model)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub's host: seconds at most, where the hub client would retry for ~30 s."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _cached_weights(model_id: str) -> bool:
    """True when the hub cache holds a snapshot of ``model_id`` with weight files in it."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    cached = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(cached, str):
        return False
    snapshot = Path(cached).parent
    return any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))


def check_pretrained_weights(model: str, network: bool = True) -> None:
    """``--weights pretrained`` asks for a checkpoint: say at once when there is none to be had here.

    A local directory must hold weight files; a geometry bundled with kvray alone (``kvray/…``) has no
    weights anywhere; a hub id must be in the local cache, or the hub must be reachable (HF_HUB_OFFLINE set
    or no connection within seconds is one line, not half a minute of retries and a multi-line OSError).
    ``network=False`` (a job planned here, run on workers that may have the network) skips the hub checks.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise KvrayInputError(f"{path} has no weight files (*.safetensors, *.bin) for --weights pretrained")
        return
    if model.startswith("kvray/") and is_bundled(model):
        raise KvrayInputError(
            f"{model} is a geometry bundled with kvray and has no pretrained weights; use --weights random"
        )
    if not network or _cached_weights(model):
        return
    if _hub_offline():
        raise KvrayInputError(
            f"--weights pretrained: {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    if not _hub_reachable():
        raise KvrayInputError(
            f"--weights pretrained: {model} is not in the local Hugging Face cache and the hub is unreachable "
            "(this machine looks offline); use --weights random, or download it where there is a network"
        )
