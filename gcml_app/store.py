"""Versioned model store: safetensors weights + a JSON manifest per version, a served pointer, rollback.

Layout under ``<state_dir>/models``::

    v000001.safetensors   weights (tensors only; never pickled)
    v000001.json          manifest: version, parent, created, sha256, bytes, arch, val_dice, ...
    served.json           {"version": 1}: the version the infer task serves
    history.jsonl         one JSON line per decision (publish, keep, rollback, superseded, and the
                          rounds that ended without training: gossip, labels)

and beside it, ``<state_dir>/working.safetensors``: the *working* model that rounds keep training
(docs/design.md, "Working model and served model"), one file with its description in the
safetensors header, so it is replaced whole or not at all.

Publishing writes weights, then manifest, then the pointer, each through a temporary file,
``fsync`` and ``os.replace``. A crash (even ``kill -9``) at any point leaves ``served.json``
naming the previous, complete version; leftovers of the interrupted publish are ignored and
never reused as a version number.

Publish, rollback and a round's commit (:meth:`ModelStore.locked`) hold one lock, a ``flock`` on
``models/.lock``, so the server process (rollback) and the training process (publish) never
interleave. Version numbers are claimed with ``O_EXCL``. ``publish(expected_parent=...)`` refuses
with :class:`Superseded` when the served version is no longer the one a round started from: a
round never undoes an operator's rollback.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from safetensors import SafetensorError

from gcml_app.util import jsonl
from gcml_app.util.files import atomic_write, sha256_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["Manifest", "ModelStore", "StoreError", "Superseded"]

logger = logging.getLogger(__name__)

_VERSION_FILE = re.compile(r"^v(\d{6})\.(safetensors|json)$")
_HIGH_WATER = "last_version.json"


class StoreError(RuntimeError):
    """The store cannot do what was asked (unknown version, corrupt file, ...)."""


class Superseded(StoreError):
    """The served version changed (a rollback, another publish) since the caller read it."""

_ANY = object()  # publish(expected_parent=_ANY): no check


@dataclass(frozen=True)
class Manifest:
    """What a version is, where it came from, and how it validated."""

    version: int
    parent: int | None
    created: str
    sha256: str
    bytes: int
    arch: str
    val_dice: dict[str, float]
    n_train: int
    n_val: int
    produced_by: str
    site: str = ""
    lineage: list[dict[str, Any]] = field(default_factory=list)
    validated: bool = True
    made_by: dict[str, Any] = field(default_factory=dict)  # produced_by, structured: {"mode", "candidate", "peer"}
    start: dict[str, Any] = field(default_factory=dict)  # where the site's first weights came from (bundle, ...)
    task: dict[str, Any] = field(default_factory=dict)  # what the model segments (gcml_app.federation.task)

    @property
    def mean_dice(self) -> float:
        return sum(self.val_dice.values()) / len(self.val_dice) if self.val_dice else 0.0


class ModelStore:
    """Versioned, crash-safe storage of one site's models.

    Args:
        root: the store folder (``<state_dir>/models``); created if missing.
        keep_versions: prune to this many newest versions (besides the rollback targets) after each
            publish (:meth:`prune`); ``None`` keeps every version.

    Example:
        >>> store = ModelStore(cfg.state_dir / "models")
        >>> m = store.publish(net.state_dict(), arch=fp, val_dice={"lesion": 0.8}, n_train=8, n_val=2,
        ...                   produced_by="local", made_by={"mode": "local", "candidate": "local", "peer": None})
        >>> store.served_version()
        1
    """

    def __init__(self, root: str | os.PathLike, keep_versions: int | None = None):
        self.root = Path(root)
        self.keep_versions = keep_versions  # prune after each publish (store.keep_versions); None: never
        self.root.mkdir(parents=True, exist_ok=True)
        self._pointer = self.root / "served.json"
        self._history = self.root / "history.jsonl"
        self.working_path = self.root.parent / "working.safetensors"
        self._lock_path = self.root / ".lock"
        self._thread_lock = threading.RLock()
        self._depth = 0
        self.skipped_history_lines = 0  # malformed lines the last history() skipped

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (re-entrant in this process; exclusive across processes)."""
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    # ---------------------------------------------------------------- reading
    def _weights(self, version: int) -> Path:
        return self.root / f"v{version:06d}.safetensors"

    def _manifest_path(self, version: int) -> Path:
        return self.root / f"v{version:06d}.json"

    def served_version(self) -> int | None:
        """The version the infer task serves, or ``None`` before the first publish."""
        try:
            return int(json.loads(self._pointer.read_text())["version"])
        except FileNotFoundError:
            return None

    def manifest(self, version: int) -> Manifest:
        path = self._manifest_path(version)
        try:
            return Manifest(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise StoreError(f"version {version} does not exist; known versions: {self.versions()}") from None

    def served(self) -> Manifest | None:
        v = self.served_version()
        return None if v is None else self.manifest(v)

    def versions(self) -> list[int]:
        """Complete versions (those with a manifest), oldest first."""
        return sorted(
            int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_FILE.match(p.name)) and m.group(2) == "json"
        )

    def read_bytes(self, version: int) -> bytes:
        """The weights file of ``version``, checked against its manifest's sha256."""
        man = self.manifest(version)
        data = self._weights(version).read_bytes()
        if sha256_bytes(data) != man.sha256:
            raise StoreError(f"version {version}: weights do not match the manifest sha256 (file corrupted)")
        return data

    def load(self, version: int) -> dict[str, torch.Tensor]:
        """The state dict of ``version`` (sha256-checked, tensors only)."""
        from safetensors.torch import load as st_load  # torch on first use: gcml status never imports it

        try:
            return st_load(self.read_bytes(version))
        except SafetensorError as e:
            raise StoreError(f"version {version}: unreadable safetensors file: {e}") from None

    def history(self) -> list[dict[str, Any]]:
        """Every recorded decision, oldest first; malformed lines are skipped (counted in
        :attr:`skipped_history_lines`, shown in ``/gcml/status``)."""
        records, self.skipped_history_lines = jsonl.read(self._history)
        return records

    # ---------------------------------------------------------------- writing
    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one decision to ``history.jsonl`` (fsynced)."""
        rec = jsonl.finite({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields})
        jsonl.append(self._history, rec, fsync=True)
        return rec

    def _claim_version(self) -> int:
        """A new version number, claimed by creating its weights file with ``O_EXCL``.

        Leftovers of interrupted publishes count as used, so a version number is never reused.
        """
        used = [int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION_FILE.match(p.name))]
        version = max(used + [self._high_water()], default=0) + 1
        while True:
            try:
                os.close(os.open(self._weights(version), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                return version
            except FileExistsError:
                version += 1

    def publish(
        self,
        state_dict: dict[str, torch.Tensor],
        *,
        arch: str,
        val_dice: dict[str, float],
        n_train: int,
        n_val: int,
        produced_by: str,
        site: str = "",
        lineage: list[dict[str, Any]] | None = None,
        validated: bool = True,
        decision: dict[str, Any] | None = None,
        expected_parent: Any = _ANY,
        made_by: dict[str, Any] | None = None,
        start: dict[str, Any] | None = None,
        task: dict[str, Any] | None = None,
    ) -> Manifest:
        """Store ``state_dict`` as a new version and serve it.

        Args:
            state_dict: tensors to store (moved to CPU, made contiguous).
            arch: architecture fingerprint (see :func:`gcml_app.ml.network.arch_fingerprint`).
            val_dice: validation Dice per label name.
            n_train, n_val: cases the model was trained and validated on.
            produced_by: how it was made, in one word or three, e.g. ``"local"``, ``"gossip:site-b:average"``,
                ``"adopted:site-b"`` (see :func:`gcml_app.rounds.record.provenance`).
            made_by: the same, structured, for readers (``{"mode", "candidate", "peer"}``).
            decision: extra fields for the history record (e.g. the gate's scores).
            expected_parent: the served version (or ``None``) the caller's decision was made against.
            start: where the site's first weights came from (a bundle's name and version, ...).
            task: the task the model is for (:func:`gcml_app.federation.task.task_of`).

        Returns:
            the new version's manifest.

        Raises:
            Superseded: ``expected_parent`` is given and is no longer the served version.
        """
        from safetensors.torch import save as st_save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        data = st_save(tensors, metadata={"arch": arch})
        with self.locked():
            parent = self.served_version()
            if expected_parent is not _ANY and parent != expected_parent:
                raise Superseded(f"served version is now {parent}, not {expected_parent} as when the decision was made")
            man = self._publish(data, parent, arch, val_dice, n_train, n_val, produced_by, site, lineage, validated,
                                decision, made_by, start, task)
            if self.keep_versions:
                self.prune(self.keep_versions)
            return man

    def _publish(self, data, parent, arch, val_dice, n_train, n_val, produced_by, site, lineage, validated,
                 decision, made_by, start, task) -> Manifest:
        version = self._claim_version()
        man = Manifest(
            version=version,
            parent=parent,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            sha256=sha256_bytes(data),
            bytes=len(data),
            arch=arch,
            val_dice={k: float(v) for k, v in val_dice.items()},
            n_train=n_train,
            n_val=n_val,
            produced_by=produced_by,
            site=site,
            lineage=list(lineage or []),
            validated=validated,
            made_by=dict(made_by or {}),
            start=dict(start or {}),
            task=dict(task or {}),
        )
        atomic_write(self._weights(version), data)
        atomic_write(self._manifest_path(version), json.dumps(asdict(man), indent=2).encode())
        atomic_write(self._pointer, json.dumps({"version": version}).encode())
        self.record("publish", version=version, parent=man.parent, produced_by=produced_by, made_by=man.made_by,
                    val_dice=man.val_dice, **(decision or {}))
        return man

    def rollback(self, version: int, reason: str = "") -> Manifest:
        """Serve an earlier version again (after checking its weights are intact).

        The working model restarts from that version too: an operator who rolls back does not want
        rounds to go on from what they rolled away from.
        """
        with self.locked():
            man = self.manifest(version)
            state = self.load(version)
            previous = self.served_version()
            atomic_write(self._pointer, json.dumps({"version": version}).encode())
            self.save_working(state, arch=man.arch, base_version=version, rounds_unpublished=0,
                              produced_by=f"rollback to v{version}")
            self.record("rollback", version=version, previous=previous, reason=reason)
        return man

    # ---------------------------------------------------------------- bounded disk
    def _high_water(self) -> int:
        """The highest version number ever claimed (pruned and swept numbers are never reused)."""
        try:
            return int(json.loads((self.root / _HIGH_WATER).read_text())["version"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    def _raise_high_water(self, versions: list[int]) -> None:
        top = max(versions, default=0)
        if top > self._high_water():
            atomic_write(self.root / _HIGH_WATER, json.dumps({"version": top}).encode())

    def protected(self, keep: int) -> set[int]:
        """The versions :meth:`prune` never removes: the served one, its last ``keep`` ancestors (the
        rollback targets that led to it), the newest ``keep``, and the site's first version."""
        versions = self.versions()
        keep_set = set(versions[-keep:]) | set(versions[:1])
        v, steps = self.served_version(), 0
        while v is not None and steps <= keep:
            keep_set.add(v)
            try:
                v = self.manifest(v).parent
            except StoreError:
                break
            steps += 1
        return keep_set

    def prune(self, keep: int) -> dict[str, Any]:
        """Remove the versions :meth:`protected` does not name (weights, then manifest), under the lock.

        A version's weights and manifest go together; its number is never claimed again. What was
        removed is appended to ``pruned.jsonl`` (not to the history: the history counts decisions).

        Returns:
            ``{"removed": [versions], "freed_bytes": n}``.
        """
        with self.locked():
            keep_set = self.protected(keep)
            gone = [v for v in self.versions() if v not in keep_set]
            self._raise_high_water(gone)
            freed = 0
            for v in gone:
                for path in (self._manifest_path(v), self._weights(v)):  # manifest first: a crash leaves an orphan to sweep
                    with contextlib.suppress(FileNotFoundError):
                        freed += path.stat().st_size
                        path.unlink()
        if gone:
            jsonl.append(self.root / "pruned.jsonl", {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                      "removed": gone, "freed_bytes": freed, "kept": sorted(keep_set)})
            logger.info(f"model store: pruned versions {gone} ({freed / 2**20:.1f} MB); kept {sorted(keep_set)}")
        return {"removed": gone, "freed_bytes": freed}

    def sweep(self) -> list[str]:
        """Remove what crashes leave behind, under the lock: version files with no manifest (a publish that
        stopped after claiming its number) and temporary files of interrupted writes. Their numbers are
        never claimed again.

        Returns:
            the names removed.
        """
        removed = []
        with self.locked():
            complete = set(self.versions())
            orphans = [p for p in self.root.iterdir()
                       if (m := _VERSION_FILE.match(p.name)) and int(m.group(1)) not in complete]
            self._raise_high_water([int(_VERSION_FILE.match(p.name).group(1)) for p in orphans])
            for p in orphans + [p for p in self.root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p.name)
        if removed:
            logger.warning(f"model store: swept {len(removed)} files left by interrupted writes: {removed[:5]}")
        return removed

    # ---------------------------------------------------------------- the working model
    def save_working(self, state_dict: dict[str, torch.Tensor], **info: Any) -> dict[str, Any]:
        """Replace the working model (one atomic file: weights and ``info`` in its header).

        Args:
            state_dict: the weights.
            info: JSON-serialisable description (``base_version``, ``rounds_unpublished``, ``val_dice``, ...).

        Returns:
            ``info`` with ``updated`` and ``sha256`` of the weights file added.
        """
        from safetensors.torch import save as st_save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        info = {**info, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = st_save(tensors, metadata={"gcml_working": json.dumps(info, sort_keys=True)})
        atomic_write(self.working_path, data)
        return {**info, "sha256": sha256_bytes(data)}

    def working(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The working model and its description, or ``None`` when there is none (or it is unreadable).

        An unreadable file is logged and treated as absent: rounds then restart from the served model,
        which loses that training but never serves or trains on damaged weights.
        """
        from safetensors.torch import load as st_load

        try:
            data = self.working_path.read_bytes()
            return st_load(data), {**_working_header(io.BytesIO(data)), "sha256": sha256_bytes(data)}
        except FileNotFoundError:
            return None
        except (OSError, SafetensorError, ValueError) as e:
            logger.warning(f"working model {self.working_path} is unreadable ({e}); rounds restart from the served model")
            return None

    def working_info(self) -> dict[str, Any] | None:
        """The working model's description from its header only (cheap: for ``/gcml/status``)."""
        try:
            with open(self.working_path, "rb") as f:
                return _working_header(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning(f"working model {self.working_path}: unreadable header ({e})")
            return None


_MAX_HEADER = 100_000_000  # safetensors' own bound on a header's length


def _working_header(f: BinaryIO) -> dict[str, Any]:
    """The ``gcml_working`` description in the safetensors header of ``f``, read through that one handle.

    Not ``safe_open``: it maps the file a second time by its path, so a round replacing the working
    model between the two opens pairs one file's header with the other's size, and torch raises a
    ``RuntimeError`` ("smaller than the required mapping size") that ``/gcml/status`` answered with
    HTTP 500. One handle sees one file: the old one or the whole new one (``atomic_write``).

    Raises:
        ValueError: the file is not a safetensors file, or is cut short.
    """
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise ValueError(f"header of {n} bytes, above the {_MAX_HEADER} a safetensors file may have")
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"header cut short: {len(raw)} of {n} bytes")
    header = json.loads(raw)  # JSONDecodeError is a ValueError
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("not a safetensors header")
    info = json.loads(meta.get("gcml_working", "{}"))
    if not isinstance(info, dict):
        raise ValueError("its working-model description is not a JSON object")
    return info
