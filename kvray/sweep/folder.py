"""The results folder a sweep writes: one writer at a time, the job it holds, and a disk that fills up.

Three faults meet here, each answered before it can mix or lose rows:
  two runs into one folder   ``FolderLock``: ``.kvray-run.lock`` holds the running driver's pid; a second
                             run refuses with one line; a lock left by a dead process is taken over
  a job edited before resume ``job_changes``: the cells the folder's last job had against this one's,
                             so the resume can say which are new and which are gone
  a full disk                ``disk_full``: recognises ENOSPC however Ray wrapped it, so the sweep stops
                             with one line instead of retrying every cell into the same wall
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvray.data import status
from kvray.data.layout import LOCK_NAME
from kvray.data.manifest import read_manifest
from kvray.data.reader import read_results
from kvray.errors import KvrayInputError
from kvray.plan.job import Job


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class FolderLock:
    """An exclusive claim on a results folder for one driver process (``with FolderLock(out): …``)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """The lock's record if a live process on this host holds it, else None (no lock, or a stale one)."""
        try:
            record = json.loads(self.path.read_text())
            pid, host = int(record["pid"]), str(record["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: a torn write of a process that died while writing it
        if host == socket.gethostname() and not _pid_alive(pid):
            return None
        return dict(record)

    def acquire(self) -> None:
        """Take the lock, or raise KvrayInputError naming the process that holds it."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is not None:
                    raise KvrayInputError(
                        f"{self.path.parent} is in use by another kvray run (pid {other['pid']} on "
                        f"{other['host']}, since {other.get('since', '?')}); wait for it to end, or choose "
                        "another --output"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(record))
            self.held = True
            return
        raise KvrayInputError(f"{self.path.parent}: could not take the folder's lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(OSError):
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass(frozen=True)
class JobChanges:
    """Cells of this job against those of the job the folder's last run ran."""

    previous_name: str
    new: list[str]  # labels of cells this job has and the previous one did not
    gone: list[str]  # labels of cells with rows here that this job no longer has
    rows_gone: int  # rows in the folder that belong to gone cells

    def describe(self, limit: int = 3) -> str:
        """One line: what changed and what it means for the folder's rows."""

        def some(labels: list[str]) -> str:
            more = f" and {len(labels) - limit} more" if len(labels) > limit else ""
            return "; ".join(labels[:limit]) + more

        parts = []
        if self.new:
            parts.append(f"{len(self.new)} new cell(s) to run ({some(self.new)})")
        if self.gone:
            parts.append(
                f"{len(self.gone)} cell(s) gone ({some(self.gone)}), whose {self.rows_gone} row(s) stay in "
                "cells.jsonl and in the figures — use another --output to keep the two jobs apart"
            )
        return f"the job changed since the last run into this folder (job {self.previous_name!r}): " + ", ".join(parts)


def job_sha256(job: Job) -> str:
    """What the manifest records of a job, to tell an edited job from the one that wrote the rows."""
    import hashlib

    return hashlib.sha256(json.dumps(job.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def job_changes(job: Job, out_dir: Path) -> JobChanges | None:
    """None when the folder is new or its last job planned the same cells; else what changed."""
    from kvray.plan.job import job_from_dict
    from kvray.plan.planner import plan_cells

    spec = read_manifest(out_dir).get("job", {}).get("spec")
    if not isinstance(spec, dict):
        return None
    try:
        previous = job_from_dict(spec, source="manifest.json")
    except KvrayInputError:
        previous = None  # the old job no longer validates (a model or backend gone): compare by rows only
    rows = read_results(out_dir, traces=False)
    types = status.hardware_types_in(rows)
    now = {c.cell_id: c.label() for c in plan_cells(job, types)}
    before = {c.cell_id: c.label() for c in plan_cells(previous, types)} if previous else {}
    with_rows = {r["cell_id"] for r in rows}
    new = [label for cid, label in now.items() if cid not in before and cid not in with_rows]
    gone_ids = [cid for cid in with_rows if cid not in now]
    if not new and not gone_ids:
        return None
    gone = [before.get(cid, cid) for cid in gone_ids]
    return JobChanges(str(spec.get("name", "?")), new, gone, len(gone_ids))


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps: a Ray task error's cause, a chained exception) is ENOSPC/EDQUOT."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return False
