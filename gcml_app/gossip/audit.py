"""Append-only audit trail of the partner link: ``<state_dir>/audit.jsonl``.

Two kinds of lines:

- ``request``: every request to the peer surface and every refused request (time, client address,
  partner or ``anonymous``, token id, method, path, status, bytes sent, sha256 served, reason);
- ``pull``: every model we tried to fetch from a partner (partner, version, sha256, verdict,
  reason, bytes).

Never in it: token text, image or label names, patient identifiers. Lines are written with one
``write`` on an ``O_APPEND`` descriptor, so the server and the training process can both append.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["AuditLog"]


class AuditLog:
    """The audit file of one site.

    Args:
        path: the JSON-lines file (created on first write, mode 0600).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, **fields}, sort_keys=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def tail(self, limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` lines, oldest first."""
        try:
            with open(self.path) as f:
                return [json.loads(line) for line in deque(f, maxlen=limit) if line.strip()]
        except FileNotFoundError:
            return []
