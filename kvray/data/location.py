"""Where a results folder lives: a local path, or an object-storage URI mirrored through a local staging folder.

    with output_folder("s3://bucket/sweeps/run1") as folder:   # a Path; downloaded first, uploaded on exit
        run_job(job, folder, sync_to="s3://bucket/sweeps/run1")

A *local path* is any text without ``scheme://``; a filesystem the cluster shares (NFS, Lustre, a FUSE mount
of a bucket) is a local path too: the writer appends and fsyncs there as on a local disk, and nothing here is
involved. A *URI* (``s3://bucket/prefix``, ``gs://bucket/prefix``, or any other scheme pyarrow's filesystems
know) is an object store: no append, no fsync, no rename. The writer's guarantees (a row is fsync'ed before it
is acknowledged, a torn last line is cut, a failed write is cut back) need a POSIX folder, so a URI is never
written in place. Instead:

  staging   a fresh folder under ``$KVRAY_STAGING_DIR`` (default: the system temp dir),
            ``kvray-staging-XXXX/<bucket>/<prefix>``, filled with everything the URI already holds — so a
            resume, ``plot``, ``report`` and ``compare`` work on it exactly as on a local folder. It is removed
            once everything reached the bucket; kept (and named on stderr) when an upload failed.
  in flight ``Stage.sync(final=False)``, run by the collector after each Parquet parts flush: the new parts,
            the JSONL files cut at the offsets the parts index names, the manifest, and ``parts/index.json``
            last — so the bucket always holds a loadable dataset up to the last flush, never a row without its
            traces (the JSONL files go up before the index that points into them).
  at exit   ``Stage.sync(final=True)``: every file that changed since it was downloaded or last uploaded (whole
            tables, figures, report.html, the manifest), the index still last; also after a failure or Ctrl-C,
            so rows already collected reach the bucket. Objects whose local file was removed are deleted.

What changed is told by a record in the staging folder (``.kvray-sync.json``: bytes and mtime of each file as
last downloaded or uploaded), shared by the driver and the collector (one sync at a time, under ``flock``), so
an unchanged file is never sent twice. Object stores have no append: a JSONL file that grew is sent whole.

Credentials and endpoint: kvray/data/object_store.py.

pyarrow is imported inside functions: importing kvray.data stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kvray.data import parts
from kvray.data.object_store import (
    CHUNK_BYTES,
    URI_PATTERN,
    Remote,
    first_line,
    open_filesystem,
    parse_remote,
    s3_endpoint,
    shown_uri,
)
from kvray.errors import KvrayInputError

SYNC_RECORD = ".kvray-sync.json"  # a dot file: never uploaded, like the run lock and the writers' temp files
SYNC_LOCK = ".kvray-sync.lock"
STAGING_ENV = "KVRAY_STAGING_DIR"
# Append-only files: a prefix of them may be uploaded mid-run (cut at the parts index's offsets).
_JSONL = tuple(parts.SOURCES.values())
_INDEX = f"{parts.PARTS_DIR}/{parts.INDEX_NAME}"
_MANIFEST = "manifest.json"


def is_uri(where: str | Path | None) -> bool:
    """True for ``scheme://…`` text other than ``file://``; a path (a shared filesystem's included) is not."""
    if where is None or isinstance(where, Path):
        return False
    m = URI_PATTERN.match(where)
    return m is not None and m.group(1).lower() != "file"


def local_path(where: str | Path) -> Path:
    """``where`` as a local Path (``file:///x`` → ``/x``); for a URI use ``output_folder``."""
    text = str(where)
    m = URI_PATTERN.match(text)
    if m and m.group(1).lower() == "file":
        return Path("/" + m.group(2).lstrip("/"))
    return Path(where)


def check_writable_folder(folder: str | Path, what: str) -> None:
    """A local folder kvray is about to write into, proven writable before any work: the missing part of the
    path is created, a file written and removed in it, and then everything the probe made is removed again (a
    permission check alone says yes to root on /proc and on a read-only mount), and the existing folder's times
    are put back. One KvrayInputError line naming ``what`` (``--out /x``) otherwise — so a minute of drawing
    never ends in a traceback at the first save."""
    path = local_path(folder).expanduser()
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise KvrayInputError(f"{what}: {probe} is a file, not a folder")
    stat = probe.stat()
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kvray-write-probe-"):
            pass
    except OSError as exc:
        raise KvrayInputError(f"{what}: cannot write to {path} ({exc.strerror or type(exc).__name__})") from None
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            os.utime(probe, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _is_hidden(rel: str) -> bool:
    """Dot files and folders (the run lock, writers' temp files, the sync record) stay local."""
    return any(p.startswith(".") for p in PurePosixPath(rel).parts)


@dataclass
class Stage:
    """A local staging folder mirrored to ``remote``: ``download`` fills it, ``sync`` sends what changed.

    Built in the driver (``Stage.create``: a new temp folder) and in the collector (``Stage(remote,
    folder)``: the same folder, reached on the same node), each with its own filesystem object."""

    remote: Remote
    local: Path
    _fs: Any = field(default=None, repr=False)
    uploads: int = 0  # files sent by this object
    deletes: int = 0
    # Objects cannot be appended to, so a mid-run sync re-sends each grown JSONL file whole: O(size) a time.
    # They (and the index that points into them) go up only when due, at most DUTY of the wall time — e.g.
    # a 10 s upload waits 90 s — and at least every MIN_GAP_S; immutable parts go up at every flush.
    DUTY = 0.1
    MIN_GAP_S = 10.0
    _rows_sent_at: float = field(default=-1e18, repr=False)
    _rows_send_s: float = field(default=0.0, repr=False)

    @classmethod
    def create(cls, uri: str) -> Stage:
        """A fresh staging folder for ``uri`` (not yet filled: ``download``)."""
        remote = parse_remote(uri)
        base = os.environ.get(STAGING_ENV) or None
        if base:
            Path(base).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="kvray-staging-", dir=base))
        local = root / remote.bucket / remote.prefix if remote.prefix else root / remote.bucket
        local.mkdir(parents=True, exist_ok=True)
        return cls(remote, local)

    @property
    def root(self) -> Path:
        """The temp folder ``create`` made (what ``cleanup`` removes)."""
        depth = 1 + (len(self.remote.prefix.split("/")) if self.remote.prefix else 0)
        return self.local.parents[depth - 1]

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = open_filesystem(self.remote)
        return self._fs

    def check(self) -> str:
        """Fail with one line unless the bucket exists and is reachable; returns the prefix's type there
        (``"missing"``, ``"folder"``)."""
        import pyarrow as pa
        import pyarrow.fs as pafs

        def info_of(path: str, verb: str) -> Any:
            try:
                return self.fs.get_file_info(path)
            except (OSError, pa.ArrowException) as exc:
                raise KvrayInputError(f"cannot {verb} {self.remote.uri}{self._at()}: {first_line(exc)}") from None

        if info_of(self.remote.bucket, "reach").type == pafs.FileType.NotFound:
            raise KvrayInputError(f"{self.remote.uri}: bucket {self.remote.bucket!r} does not exist{self._at()}")
        if not self.remote.prefix:
            return "folder"
        info = info_of(self.remote.path, "read")
        if info.type == pafs.FileType.File:
            raise KvrayInputError(f"{self.remote.uri} is an object, not a folder (a prefix)")
        return "folder" if info.type == pafs.FileType.Directory else "missing"

    def _at(self) -> str:
        endpoint = s3_endpoint() if self.remote.scheme == "s3" else None
        return f" (endpoint {shown_uri(endpoint)})" if endpoint else ""

    # -- the record of what the bucket holds --

    def _read_record(self) -> dict[str, dict[str, Any]]:
        try:
            files = json.loads((self.local / SYNC_RECORD).read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return files if isinstance(files, dict) else {}

    def _write_record(self, files: dict[str, dict[str, Any]]) -> None:
        path = self.local / SYNC_RECORD
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"uri": self.remote.uri, "files": files}))
        os.replace(tmp, path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One sync at a time across processes (the collector's flush thread, the driver at exit)."""
        import fcntl

        with open(self.local / SYNC_LOCK, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- download, upload --

    def download(self) -> int:
        """Copy every object under the URI into the staging folder; returns how many files."""
        import pyarrow as pa
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.remote.path, recursive=True, allow_not_found=True)
        try:
            infos = [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        except (OSError, pa.ArrowException) as exc:
            raise KvrayInputError(f"cannot list {self.remote.uri}{self._at()}: {first_line(exc)}") from None
        files: dict[str, dict[str, Any]] = {}
        with self._locked():
            for info in infos:
                rel = info.path[len(self.remote.path) + 1 :]
                if not rel or _is_hidden(rel):
                    continue
                target = self.local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with self.fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                        while chunk := src.read(CHUNK_BYTES):
                            dst.write(chunk)
                except (OSError, pa.ArrowException) as exc:
                    raise KvrayInputError(f"cannot download {self.remote.uri}/{rel}: {first_line(exc)}") from None
                st = target.stat()
                files[rel] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            self._write_record(files)
        return len(files)

    def sync(self, final: bool = True) -> int:
        """Send what changed since the last download or upload; returns how many files went up.

        ``final=False`` (mid-run, the collector after a parts flush): the parts the index names, the JSONL
        files cut at the index's offsets (whole rows that every part agrees with), the manifest, then the
        index. ``final=True`` (the end of a command): every file, whole, then the index; and objects whose
        file is gone here are deleted. Either way the index goes last: a reader of the bucket never finds an
        index pointing past the JSONL it has."""
        now = time.monotonic()
        rows_due = final or now - self._rows_sent_at >= max(self.MIN_GAP_S, self._rows_send_s / self.DUTY)
        with self._locked():
            record = self._read_record()
            plan = self._plan(record, final)
            if not rows_due:  # parts only: without the JSONL the index would point past what the bucket holds
                plan = [(rel, size) for rel, size in plan if rel.startswith(parts.PARTS_DIR + "/") and rel != _INDEX]
            sent = 0
            for rel, size in plan:
                st = self._upload(rel, size)
                whole = size is None or size == st.st_size
                record[rel] = {"bytes": st.st_size if whole else size, "mtime_ns": st.st_mtime_ns if whole else None}
                sent += 1
                self._write_record(record)  # a failure later still knows what went up
            if final:
                for rel in [r for r in record if not (self.local / r).is_file()]:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.delete_file(f"{self.remote.path}/{rel}")
                    record.pop(rel)
                    self.deletes += 1
                self._write_record(record)
        if rows_due:
            self._rows_sent_at, self._rows_send_s = now, time.monotonic() - now
        self.uploads += sent
        return sent

    def _plan(self, record: dict[str, dict[str, Any]], final: bool) -> list[tuple[str, int | None]]:
        """(relative path, bytes to send or None for the whole file) in upload order."""
        if final:
            wanted: dict[str, int | None] = {
                p.relative_to(self.local).as_posix(): None for p in sorted(self.local.rglob("*")) if p.is_file()
            }
        else:
            index = parts.read_index(self.local)
            wanted = {_MANIFEST: None} if (self.local / _MANIFEST).is_file() else {}
            if index is not None:
                for kind in parts.KINDS:
                    for n in index.parts:
                        path = parts.part_path(self.local, kind, n)
                        if path.is_file():
                            wanted[path.relative_to(self.local).as_posix()] = None
                for kind, name in parts.SOURCES.items():
                    if index.offsets[kind]:
                        wanted[name] = index.offsets[kind]
                wanted[_INDEX] = None
        changed = [
            (rel, size) for rel, size in wanted.items() if not _is_hidden(rel) and self._changed(rel, size, record)
        ]

        def order(item: tuple[str, int | None]) -> tuple[int, str]:
            rel = item[0]
            if rel == _INDEX:
                return 5, rel  # last: it points into the JSONL files and names the parts
            if rel == _MANIFEST:
                return 4, rel
            if rel in _JSONL:  # traces and timeline before the rows that refer to them
                return 3, "~" if rel == parts.SOURCES["cells"] else rel
            if rel.startswith(parts.PARTS_DIR + "/"):
                return 0, rel
            return 1, rel

        return sorted(changed, key=order)

    def _changed(self, rel: str, size: int | None, record: dict[str, dict[str, Any]]) -> bool:
        try:
            st = (self.local / rel).stat()
        except FileNotFoundError:
            return False
        seen = record.get(rel)
        if seen is None:
            return True
        if size is not None:  # a prefix of an append-only file: the same length is the same bytes
            return bool(seen.get("bytes") != size)
        if seen.get("bytes") != st.st_size:
            return True
        # mtime None: a prefix went up mid-run and the file has not grown since (it only grows during a run)
        return seen.get("mtime_ns") is not None and seen.get("mtime_ns") != st.st_mtime_ns

    def _upload(self, rel: str, size: int | None) -> os.stat_result:
        """One object: the file's first ``size`` bytes (all of it when None), streamed. Returns the file's stat
        as it was opened: a file replaced meanwhile (the manifest) is then seen as changed next time."""
        left = size
        with open(self.local / rel, "rb") as src, self.fs.open_output_stream(f"{self.remote.path}/{rel}") as dst:
            st = os.fstat(src.fileno())
            while left is None or left > 0:
                chunk = src.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
                if not chunk:
                    break
                dst.write(chunk)
                if left is not None:
                    left -= len(chunk)
        return st

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def output_folder(where: str | Path, upload: bool = True, must_exist: bool = False) -> Iterator[Path]:
    """A local folder for ``where``: the path itself, or for a URI a staging folder filled from the bucket
    and uploaded when the block ends — on success, failure or Ctrl-C alike (rows already collected must reach
    the bucket). ``upload=False``: read only (``compare``'s base). ``must_exist``: a URI holding nothing is a
    KvrayInputError (``plot``, ``report``). A bad URI, a missing bucket or an unreachable endpoint is a
    KvrayInputError before the block runs. An upload that fails names the kept staging folder."""
    if not is_uri(where):
        yield local_path(where)
        return
    stage = Stage.create(str(where))
    try:
        kind = stage.check()
        if must_exist and kind == "missing":
            raise KvrayInputError(f"{stage.remote.uri} holds no results (nothing under it)")
        stage.download()
    except BaseException:
        stage.cleanup()
        raise
    failed = True
    try:
        yield stage.local
        failed = False
    finally:
        kept = False
        if upload:
            try:
                stage.sync(final=True)
            except Exception as exc:
                kept = True
                text = (
                    f"could not upload to {stage.remote.uri}: {first_line(exc)}; everything is kept in "
                    f"{stage.local}: copy it there, or rerun with --output {stage.local}"
                )
                if not failed:
                    raise StorageError(text) from None
                sys.stderr.write(f"kvray: error: {text}\n")  # the block's own failure is the one raised
        if not kept:
            stage.cleanup()


class StorageError(KvrayInputError):
    """The bucket could not be written at the end of a command: one line naming the staging folder kept."""
