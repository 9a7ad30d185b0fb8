"""How long `kvray plot` and `kvray report` take on a finished results folder (issue #31's goal: ≤ 15 s each on
the 10,000-cell folder of 64 × 32 cells).

    uv run python benchmarks/plot_report_speed.py FOLDER [--repeats 2]
    uv run python benchmarks/plot_report_speed.py --make 200 [--requests 64] [--gen-toks 32] [--repeats 2]
    uv run python benchmarks/scale.py --cells 10000 --requests 64 --gen-toks 32 --plot-report   # the 10,000 cells

Each command runs as the user runs it: its own process (``python -m kvray.cli plot FOLDER``, then ``… report
FOLDER``, which redraws the figures too), alternating, ``--repeats`` times each. Printed per run: the wall time
(``time.perf_counter`` around the child) and the child's CPU time (user + system, from ``os.wait4``: its own
rusage, threads included, no other process's). ``PYTHONDONTWRITEBYTECODE`` is removed from the child's
environment, as a normal install has its .pyc files (where it is set, as on this machine, every run compiles
matplotlib and pandas from source, ~6 s of CPU more; ``--keep-env`` keeps it). ``--make N`` first writes a folder
of N instant synthetic cells in this process (no Ray: ``address="inprocess"``, scale.py's job on one device), so
the script can be tried on a small folder; the figures of the goal are from scale.py's 10,000-cell folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_timed(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall s, the child's CPU s, its exit code) of one command."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child never blocks on a full pipe
        wall = time.perf_counter()
        child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall_s = time.perf_counter() - wall
        child.returncode = code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
    return wall_s, usage.ru_utime + usage.ru_stime, code


def time_outputs(folder: Path, repeats: int = 2, keep_env: bool = False) -> dict[str, list[tuple[float, float]]]:
    """`kvray plot` and `kvray report` on ``folder``, alternating, ``repeats`` times each; prints each run and
    returns {command: [(wall s, CPU s), …]}."""
    env = dict(os.environ)
    if not keep_env:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    with open(folder / "cells.jsonl", "rb") as lines:
        cells = sum(1 for _ in lines)
    print(
        f"folder {folder}: {cells} lines of cells.jsonl; load average {os.getloadavg()[0]:.1f}; "
        f"PYTHONDONTWRITEBYTECODE {'as set' if keep_env else 'unset'} for the children"
    )
    times: dict[str, list[tuple[float, float]]] = {"plot": [], "report": []}
    for i in range(repeats):
        for command in times:
            wall_s, cpu_s, code = run_timed([sys.executable, "-m", "kvray.cli", command, str(folder)], env)
            if code:
                raise SystemExit(f"kvray {command} exited {code}")
            times[command].append((wall_s, cpu_s))
            print(
                f"run {i + 1}: kvray {command:6s} wall {wall_s:6.1f} s, CPU {cpu_s:6.1f} s "
                f"(load average {os.getloadavg()[0]:.1f})"
            )
    for command, runs in times.items():
        print(
            f"kvray {command:6s} median of {len(runs)}: wall {statistics.median(w for w, _ in runs):.1f} s, "
            f"CPU {statistics.median(c for _, c in runs):.1f} s   goal ≤ 15 s on 10,000 cells"
        )
    return times


def make_folder(out: Path, cells: int, requests: int, gen_toks: int) -> None:
    """``cells`` instant synthetic cells of ``requests`` × ``gen_toks``, written in this process (no Ray)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from scale import build_job

    from kvray.sweep import run_job

    job = build_job(cells, ["any"], 0.0, requests, gen_toks, hardware="any")
    wall = time.perf_counter()
    run_job(job, out, address="inprocess", progress=False)  # type: ignore[arg-type]
    print(f"made {out}: {cells} cells of {requests} × {gen_toks} in {time.perf_counter() - wall:.1f} s (in-process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a finished results folder (default with --make: a temporary one)")
    parser.add_argument("--make", type=int, default=0, help="first write a folder of this many instant cells")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--gen-toks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep-env", action="store_true", help="leave PYTHONDONTWRITEBYTECODE as it is")
    args = parser.parse_args()
    if not args.folder and not args.make:
        parser.error("name a results folder, or --make N to write one")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "out"
        if args.make:
            make_folder(folder, args.make, args.requests, args.gen_toks)
        time_outputs(folder, args.repeats, args.keep_env)


if __name__ == "__main__":
    main()
