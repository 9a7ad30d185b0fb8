"""Calling kvray's CLI in the test process: one helper for the modules that only need its exit code."""

from __future__ import annotations

from kvray.cli import main


def kvray(*args: str) -> int:
    """``kvray ARGS`` in this process; its exit code (0 when the command returns without exiting)."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
