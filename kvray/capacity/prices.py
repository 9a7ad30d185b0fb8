"""On-demand dollars per GPU-hour: a bundled table, each price with where and when it was published, and the
``--prices FILE`` override (a YAML mapping ``H100-SXM: 4.0``). Never fetched at run time: a price is a choice
the user can read and replace, not a live quote.

The bundled figures are one provider's list (RunPod's on-demand rates, March 2026, as deploybase.ai tabled
them), so the GPUs compare on one vendor's margins; hyperscalers charge 1.5–2.5× more for the same board. A GPU
the table does not price is planned only when a price file names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import get_gpu

RUNPOD_2026_03 = "RunPod on-demand, deploybase.ai/articles/runpod-gpu-pricing ('data as of March 2026')"


@dataclass(frozen=True)
class Price:
    """Dollars per GPU-hour of one GPU type, and where the figure comes from."""

    usd_per_gpu_hour: float
    source: str
    date: str  # when the source published it (YYYY-MM), or "given" for a --prices file


# GPU table name → price. A100-40GB-SXM, H100-NVL and H200-NVL are not in that list: give them with --prices.
PRICES: dict[str, Price] = {
    "H100-SXM": Price(4.76, RUNPOD_2026_03, "2026-03"),
    "H100-PCIe": Price(3.51, RUNPOD_2026_03, "2026-03"),
    "H200": Price(6.35, RUNPOD_2026_03, "2026-03"),
    "A100-80GB-SXM": Price(2.45, RUNPOD_2026_03, "2026-03"),
    "A100-80GB-PCIe": Price(2.10, RUNPOD_2026_03, "2026-03"),
    "L40S": Price(1.40, RUNPOD_2026_03, "2026-03"),
    "L4": Price(0.78, RUNPOD_2026_03, "2026-03"),
    "RTX-4090": Price(0.60, RUNPOD_2026_03, "2026-03"),
    "RTX-3090": Price(0.39, RUNPOD_2026_03, "2026-03"),
}


def prices_from_mapping(data: Any, where: str) -> dict[str, Price]:
    """A mapping GPU name → dollars per GPU-hour, checked: known GPU names (any spelling the GPU table matches),
    positive finite numbers. ``where`` names the file in the one-line error."""
    if not isinstance(data, Mapping) or not data:
        raise KvrayInputError(f"{where}: expected a mapping of GPU type to dollars per GPU-hour, like 'H100-SXM: 4.0'")
    out: dict[str, Price] = {}
    for name, value in data.items():
        try:
            gpu = get_gpu(str(name)).name
        except KvrayInputError as exc:
            raise KvrayInputError(f"{where}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise KvrayInputError(f"{where}: {name}: expected a positive number of dollars per GPU-hour, got {value!r}")
        out[gpu] = Price(float(value), f"given in {where}", "given")
    return out


def load_prices(path: str | Path | None = None) -> dict[str, Price]:
    """The bundled table, with every GPU a ``--prices`` YAML file names replaced by (or added with) its price."""
    table = dict(PRICES)
    if path is None:
        return table
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise KvrayInputError(f"--prices {p}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise KvrayInputError(f"--prices {p}: not valid YAML{at}") from None
    table.update(prices_from_mapping(data, f"--prices {p}"))
    return table
