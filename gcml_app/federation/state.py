"""Small pieces of a site's gossip state that the server and the training process share.

Layout under ``<state_dir>/gossip``::

    control.json       {"paused": bool, "changed": time}   survives restarts
    pending.json       {"labels": [image ids], "queued": bool, "round": {"ids", "pid", "started"}}
                       final labels saved since a round last trained on them; "round" holds the ones
                       the running round took (back to "labels" if it fails or its process dies)
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

import psutil
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
        """Final labels no round has learned yet (those of a round that died mid-way included)."""
        return self._labels(self._read(self._pending))[0]

    @staticmethod
    def _alive(claim: dict[str, Any]) -> bool:
        """Whether the process that claimed labels for a round is still that process (pid and start time)."""
        try:
            return abs(psutil.Process(int(claim["pid"])).create_time() - float(claim["started"])) < 1.0
        except (psutil.Error, KeyError, TypeError, ValueError):
            return False

    def _labels(self, raw: dict[str, Any]) -> tuple[list[str], bool]:
        """``(pending ids, whether a dead round's claim was folded back in)``."""
        ids = list(raw.get("labels", []))
        claim = raw.get("round")
        if claim and not self._alive(claim):
            ids += [i for i in claim.get("ids", []) if i not in ids]
            return ids, True
        return ids, False

    def add_pending(self, image_id: str, threshold: int) -> bool:
        """Note a new final label.

        Returns:
            ``True`` exactly once each time ``threshold`` labels are pending and no round for them is
            queued yet: the caller should enqueue one. A round's start re-arms it (:meth:`training`),
            and so does a round that failed or was killed.
        """
        with self.locked():
            raw = self._read(self._pending)
            ids, orphaned = self._labels(raw)
            queued = raw.get("queued", False) and not orphaned  # a killed round re-arms the trigger
            claim = None if orphaned else raw.get("round")
            if image_id not in ids:
                ids.append(image_id)
            enqueue = threshold > 0 and len(ids) >= threshold and not queued
            self._write(ids, queued or enqueue, claim)
            return enqueue

    def _write(self, ids: list[str], queued: bool, claim: dict[str, Any] | None) -> None:
        body = {"labels": ids, "queued": queued} | ({"round": claim} if claim else {})
        atomic_write(self._pending, json.dumps(body).encode())

    @contextlib.contextmanager
    def training(self, image_ids: Iterable[str]) -> Iterator[None]:
        """A round trains on these cases: they leave the pending list, and new labels may queue the next round.

        If the round raises, the labels it took are pending again and the trigger re-arms. If its
        process dies (killed, out of memory), the claim it left names a dead process: the next
        reader folds those labels back (:meth:`pending`, :meth:`add_pending`).
        """
        took = set(image_ids)
        with self.locked():
            ids, _ = self._labels(self._read(self._pending))
            claimed = [i for i in ids if i in took]
            me = psutil.Process()
            self._write([i for i in ids if i not in took], False,
                        {"ids": claimed, "pid": me.pid, "started": me.create_time()})
        ok = False
        try:
            yield
            ok = True
        finally:
            with self.locked():
                raw = self._read(self._pending)
                ids = list(raw.get("labels", []))
                if not ok:
                    ids = claimed + [i for i in ids if i not in claimed]
                self._write(ids, raw.get("queued", False) and ok, None)

    def rearm(self) -> None:
        """A round that could not train: the next new label may queue another (nothing pending is dropped)."""
        with self.locked():
            raw = self._read(self._pending)
            ids, orphaned = self._labels(raw)
            self._write(ids, False, None if orphaned else raw.get("round"))

    # ------------------------------------------------------------ partner models
    def cached_model(self, peer: str) -> Path:
        return self.cache / f"{peer}.safetensors"
