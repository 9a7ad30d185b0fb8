"""Byte, time and error-message formatting: one definition each, shared by every stage from the CLI to the figures."""

from __future__ import annotations

BYTE_UNITS = (("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40))
GIB = 2**30


def byte_scale(max_bytes: float) -> tuple[float, str]:
    """(divisor, unit) that puts ``max_bytes`` between 1 and 1024 of the unit (binary units, never GB)."""
    chosen = BYTE_UNITS[0]
    for unit in BYTE_UNITS:
        if max_bytes >= unit[1]:
            chosen = unit
    return float(chosen[1]), chosen[0]


def human_bytes(n: float) -> str:
    """ "512 B", "1.50 KiB", "2.45 GiB" — for tables, logs and the report."""
    div, unit = byte_scale(abs(n))
    return f"{n / div:,.0f} {unit}" if unit == "B" else f"{n / div:,.2f} {unit}"


def compact_bytes(n: float) -> str:
    """3 significant digits: "80 GiB", "2.45 GiB", "113 MiB" — for labels inside a figure."""
    div, unit = byte_scale(abs(n))
    return f"{n / div:.3g} {unit}"


def human_seconds(seconds: float) -> str:
    """ "12.3 ms" below a second, "1.25 s" above; "n/a" for NaN."""
    if seconds != seconds:
        return "n/a"
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first non-blank line`` of an exception — what a row's ``error`` column and a log line keep."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
