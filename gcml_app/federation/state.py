"""Small pieces of a site's gossip state that the server and the training process share.

Layout under ``<state_dir>/gossip``::

    control.json       {"paused": bool, "changed": time}   survives restarts
    pending.json       {"labels": [image ids]}   final labels saved since the last round learned them
    peers.json         partner records (see :mod:`.peers`)
    peers/<name>.safetensors   the last verified model pulled from each partner

Read-modify-write of these files holds an ``fcntl`` lock, because the server (label saves,
pause/resume) and the training subprocess (rounds) both write them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gcml_app.util.files import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["GossipState"]


class GossipState:
    """Pause flag, pending labels, and the cached partner models of one site.

    Args:
        state_dir: the site's ``state_dir``.
    """

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir) / "gossip"
        self.root.mkdir(parents=True, exist_ok=True)
        self.cache = self.root / "peers"
        self.cache.mkdir(exist_ok=True)
        self.peers_path = self.root / "peers.json"
        self._control = self.root / "control.json"
        self._pending = self.root / "pending.json"
        self._lock = self.root / ".lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(self._lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            logger.warning(f"{path} is not valid JSON ({e}); using defaults (not paused, no pending labels)")
            return {}

    # ------------------------------------------------------------ pause / resume
    @property
    def paused(self) -> bool:
        return bool(self._read(self._control).get("paused", False))

    def set_paused(self, paused: bool) -> None:
        with self.locked():
            atomic_write(self._control, json.dumps({"paused": paused, "changed": time.time()}).encode())

    # ------------------------------------------------------------ pending labels
    def pending(self) -> list[str]:
        return list(self._read(self._pending).get("labels", []))

    def add_pending(self, image_id: str, threshold: int) -> bool:
        """Note a new final label.

        Returns:
            ``True`` exactly once each time ``threshold`` labels are pending and no round for them is
            queued yet: the caller should enqueue one. :meth:`learned` re-arms it.
        """
        with self.locked():
            raw = self._read(self._pending)
            ids = list(raw.get("labels", []))
            if image_id not in ids:
                ids.append(image_id)
            enqueue = threshold > 0 and len(ids) >= threshold and not raw.get("queued", False)
            atomic_write(self._pending, json.dumps({"labels": ids, "queued": raw.get("queued", False) or enqueue}).encode())
            return enqueue

    def learned(self, image_ids: Iterable[str]) -> None:
        """A round is training on these cases: they are no longer pending, and a new round may be queued."""
        done = set(image_ids)
        with self.locked():
            ids = [i for i in self.pending() if i not in done]
            atomic_write(self._pending, json.dumps({"labels": ids, "queued": False}).encode())

    # ------------------------------------------------------------ partner models
    def cached_model(self, peer: str) -> Path:
        return self.cache / f"{peer}.safetensors"
