"""Cold-start time of the CLI: `kvray --help` and `kvray info facebook/opt-1.3b --json`.

Targets on a 2-core machine: ≤ 0.5 s and ≤ 1.0 s. Prints the median of N fresh processes each, the
commands interleaved so that a burst of load from something else hits all of them alike, and the load
average before and after (a shared machine's other work shows there, and medians under load run high).
Run: uv run python benchmarks/cli_startup.py [RUNS]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

RUNS = 9
COMMANDS = {
    "kvray --help": (["--help"], 0.5),
    "kvray info facebook/opt-1.3b --json": (["info", "facebook/opt-1.3b", "--json"], 1.0),
}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    exe = shutil.which("kvray") or sys.executable
    prefix = [exe] if exe.endswith("kvray") else [exe, "-m", "kvray.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"before: {load()}")
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for _ in range(runs):
        for label, (args, _target) in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run([*prefix, *args], check=True, capture_output=True, env=env)
            times[label].append(time.perf_counter() - start)
    print(f"after:  {load()}")
    failed = False
    for label, (_args, target) in COMMANDS.items():
        median = statistics.median(times[label])
        ok = median <= target
        failed |= not ok
        print(
            f"{label:40s} median {median:.3f} s  (min {min(times[label]):.3f}, max {max(times[label]):.3f}, "
            f"{runs} runs, target ≤ {target} s) {'ok' if ok else 'SLOW'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
