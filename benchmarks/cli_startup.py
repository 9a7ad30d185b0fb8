"""Cold-start time of the CLI: `kvray --help` and `kvray info facebook/opt-1.3b --json`.

Targets on a 2-core machine: ≤ 0.5 s and ≤ 1.0 s. Prints the median of N fresh processes each.
Run: uv run python benchmarks/cli_startup.py
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time

RUNS = 7
COMMANDS = {
    "kvray --help": (["--help"], 0.5),
    "kvray info facebook/opt-1.3b --json": (["info", "facebook/opt-1.3b", "--json"], 1.0),
}


def main() -> int:
    exe = shutil.which("kvray") or sys.executable
    prefix = [exe] if exe.endswith("kvray") else [exe, "-m", "kvray.cli"]
    failed = False
    for label, (args, target) in COMMANDS.items():
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            subprocess.run([*prefix, *args], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        ok = median <= target
        failed |= not ok
        print(
            f"{label:40s} median {median:.3f} s  (min {min(times):.3f}, target ≤ {target} s) {'ok' if ok else 'SLOW'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
