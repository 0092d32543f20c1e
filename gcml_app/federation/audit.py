"""Append-only audit trail of the partner link: ``<state_dir>/audit.jsonl``.

Two kinds of lines:

- ``request``: every request to the peer surface and refused requests (time, client address,
  partner or ``anonymous``, token id, method, path, status, bytes sent, sha256 served, reason;
  repeated refusals of one kind from one client are folded into one line a minute with a ``folded`` count);
- ``pull``: every model we tried to fetch from a partner (partner, version, sha256, verdict,
  reason, bytes).

Never in it: token text, image or label names, patient identifiers. Every string is escaped and
cut (no control characters, so no forged lines); each line is one ``write`` on an ``O_APPEND``
descriptor (:mod:`gcml_app.util.jsonl`), so the server and the training process can both append. The
file is rotated to ``audit.jsonl.1`` before it would pass ``security.audit_max_bytes``, so the
trail takes at most twice that on disk.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from gcml_app.util import jsonl
from gcml_app.util.jsonl import clean

__all__ = ["AuditLog"]

class AuditLog:
    """The audit file of one site.

    Args:
        path: the JSON-lines file (created on first write, mode 0600).
        max_bytes: rotate to ``<path>.1`` before the file would pass this size.
    """

    def __init__(self, path: str | Path, max_bytes: int = 16 * 2**20):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.skipped_lines = 0

    def write(self, kind: str, **fields: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind,
                  **{k: clean(v, 300) if isinstance(v, str) else v for k, v in fields.items()}}
        line = jsonl.encode(record)
        try:
            if self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate(len(line))
        except FileNotFoundError:
            pass
        jsonl.append(self.path, line)

    def _rotate(self, incoming: int) -> None:
        lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:  # another process may have rotated it meanwhile
                if self.path.stat().st_size + incoming > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            except FileNotFoundError:
                pass
        finally:
            os.close(lock)

    def tail(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` lines, oldest first (malformed lines skipped and counted in :attr:`skipped_lines`)."""
        records, self.skipped_lines = jsonl.read(self.path, limit)
        return records
