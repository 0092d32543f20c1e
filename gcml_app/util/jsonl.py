"""Append-only JSON-lines files shared by processes: ``history.jsonl`` and ``audit.jsonl``.

Each record is one ``write`` on an ``O_APPEND`` descriptor, so two processes appending at once
never interleave inside a line. A line torn by a crash (or written by anything else) is skipped
and counted by :func:`read`, never fatal: one bad line must not hide a site's whole history.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["append", "clean", "encode", "finite", "read"]

logger = logging.getLogger(__name__)


def clean(text: Any, limit: int = 200) -> str:
    """``text`` safe for one log or audit line: control characters escaped, at most ``limit`` characters."""
    text = str(text)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: limit + 1])
    return out if len(text) <= limit and len(out) <= limit else out[:limit] + f"...[{len(text)} chars]"


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by ``None``: strict JSON (``/info``, ``/gcml/status``)
    refuses them, and one diverged loss must not make a site unreachable."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def encode(record: dict[str, Any]) -> bytes:
    """``record`` as one strict-JSON line (non-finite numbers written as ``null``)."""
    return (json.dumps(finite(record), sort_keys=True, allow_nan=False) + "\n").encode()


def append(path: str | Path, record: dict[str, Any] | bytes, fsync: bool = False) -> None:
    """Append ``record`` (or a line from :func:`encode`) as one write (the file is created with mode 0600)."""
    line = record if isinstance(record, bytes) else encode(record)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: end it, so ours stays whole
            line = b"\n" + line
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str | Path, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The records of ``path`` (the last ``limit`` lines if given), oldest first, and the number of
    malformed lines skipped. A missing file is empty."""
    try:
        with open(path, "rb") as f:
            lines = deque(f, maxlen=limit) if limit else list(f)
    except FileNotFoundError:
        return [], 0
    out, bad = [], 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    if bad:
        logger.warning(f"{path}: skipped {bad} malformed line(s)")
    return out, bad
