"""Predicted saturation of a continuous-batching engine on three GPUs, and latency vs achieved throughput.

Llama-3-8B (bundled geometry), bf16, vLLM's defaults (max_num_seqs 256, max_num_batched_tokens 8192 with chunked
prefill, gpu_memory_utilization 0.9, block 16), seeded Poisson arrivals, and a chat-like mix of four lengths drawn
with equal weight. Efficiencies: the calibration file's when it has the GPU, else η_compute 0.7 / η_memory 0.9.
Prints each GPU's predicted saturation rate (the highest achieved rate of any probe, kvray/sim/saturation.py), the
knee (the highest sustainable offered rate) and the achieved rate there, the simulated runs it took and the CPU
seconds they cost, and
draws TTFT and TPOT p50 / p99 against achieved requests/s into docs/figures/sim_saturation.png (and .svg).

Run: uv run python benchmarks/sim_saturation.py [--gpus H100-SXM,A100-80GB-SXM,L4] [--json] [--no-figure]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

MODEL = "meta-llama/Meta-Llama-3-8B"
GPUS = ("H100-SXM", "A100-80GB-SXM", "L4")
MIX = ((128, 64), (512, 128), (1024, 256), (2048, 128))  # (prompt, generated) tokens, equal weight
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures"


def predict(gpus: tuple[str, ...]) -> list[Any]:
    from kvray.hardware.gpus import get_gpu
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.saturation import find_saturation
    from kvray.sim.simulate import efficiency_for

    g = resolve_geometry(MODEL)
    curves = []
    for name in gpus:
        gpu = get_gpu(name)
        start = time.process_time()
        curve = find_saturation(g, gpu, MIX, eff=efficiency_for(gpu, "paged"), arrivals="poisson", seed=0)
        cpu_s = time.process_time() - start
        curves.append((curve, cpu_s))
        print(
            f"{gpu.name:14s} saturation {curve.saturation_rps:7.2f} req/s achieved; knee {curve.knee_rps:7.2f} "
            f"req/s offered ({curve.achieved_at_knee_rps:6.2f} achieved there); one request alone "
            f"{curve.service_s:.3f} s; KV pool {curve.kv_pool_blocks} blocks; {curve.probes} simulated runs in "
            f"{cpu_s:.1f} CPU s"
        )
    return curves


def draw(curves: list[Any], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from kvray.figures import style

    with style.styled():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for i, (curve, _) in enumerate(curves):
            pts = [p for p in curve.points if p.offered_rps <= curve.knee_rps_nominal * 1.3]
            x = [p.achieved_rps for p in pts]
            for ax, key in zip(axes, ("ttft", "tpot"), strict=True):
                for q, ls in (("p50", "-"), ("p99", "--")):
                    y = [1e3 * getattr(p, f"{key}_s_{q}") for p in pts]
                    ax.plot(
                        x, y, ls, color=style.color(i), marker=style.marker(i), markersize=3.5, label=f"{curve.gpu} {q}"
                    )
                ax.axvline(curve.saturation_rps, color=style.color(i), linewidth=0.8, alpha=0.6)
        for ax, what in zip(axes, ("TTFT", "TPOT"), strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("achieved requests/s (log)")
            ax.set_ylabel(f"{what} (ms, log)")
        axes[0].legend(fontsize=6.5, ncol=1)
        style.figure_title(
            fig,
            "Predicted latency vs achieved throughput (continuous batching, simulated)",
            f"{MODEL} bf16 · vLLM defaults · Poisson arrivals · mix {list(MIX)} · vertical lines: predicted saturation",
        )
        fig.tight_layout()
        return style.save(fig, out_dir, "sim_saturation")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default=",".join(GPUS))
    parser.add_argument("--json", action="store_true", help="print every curve as JSON too")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--out", type=Path, default=FIGURE)
    args = parser.parse_args()
    curves = predict(tuple(g.strip() for g in args.gpus.split(",") if g.strip()))
    if args.json:
        print(json.dumps([{**c.to_dict(), "cpu_s": s} for c, s in curves], indent=1))
    if not args.no_figure:
        for path in draw(curves, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
