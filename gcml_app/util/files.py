"""Crash-safe file writes and content hashes. A leaf: imports neither torch nor the model store."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["ContentHashes", "atomic_write", "flocked", "fsync_dir", "merge_json", "read_json", "sha256_bytes", "sha256_file"]


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data`` (model files, payloads, tokens' audit ids)."""
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's content, read in 4 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (created if missing) for the ``with`` block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when it is missing, torn or not an object (a memo can always be rebuilt)."""
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


def merge_json(path: Path, new: dict[str, Any], keep: Callable[[str, Any], bool] | None = None) -> None:
    """Add ``new``'s keys to the JSON object in ``path``, under a lock (processes of one site share memos).

    ``keep(key, value)``, if given, prunes: only the entries it accepts stay (``new``'s among them).
    """
    if not new and keep is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(path.with_name(path.name + ".lock")):
        merged = {**read_json(path), **new}
        if keep is not None:
            merged = {k: v for k, v in merged.items() if k in new or keep(k, v)}
        atomic_write(path, json.dumps(merged).encode())


class ContentHashes:
    """sha256 of files' content, memoised by ``(path, size, mtime_ns, inode)`` in a JSON file.

    A file replaced in place (a new label saved from Slicer) has a new mtime or inode, so it is hashed
    again; an unchanged one is hashed once, across rounds and restarts.

    Args:
        path: the memo file (written on :meth:`save`).
    """

    def __init__(self, path: Path):
        self.path = path
        self._memo = read_json(path)
        self._new: dict[str, dict[str, Any]] = {}

    def of(self, file: str | Path) -> str:
        st = os.stat(file)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = str(Path(file).resolve())
        known = self._memo.get(key)
        if isinstance(known, dict) and known.get("stamp") == stamp:
            return known["sha256"]
        digest = sha256_file(file)
        self._memo[key] = self._new[key] = {"stamp": stamp, "sha256": digest}
        return digest

    def save(self, prune: bool = False) -> None:
        """Merge this process's new hashes into the memo file; ``prune``: and drop the files that are gone
        (the memo then stays bounded by the files present)."""
        merge_json(self.path, self._new, (lambda key, _: os.path.exists(key)) if prune else None)
        self._new = {}
