"""One round at a time per site, across processes (docs/design.md, "One round at a time").

A site's rounds can start in several processes: MONAI Label's training subprocess (Slicer's Train,
``gcml sync``, the scheduler, new labels), a second server pointed at the same ``state_dir`` by mistake,
or a script calling :func:`~gcml_app.rounds.loop.run_round`. Two rounds on one state would overwrite
each other's claim on the pending labels and evict case-cache entries the other still reads. So every
round entry (:func:`~gcml_app.rounds.gossip.gossip_round`, :func:`~gcml_app.rounds.gossip.labels_round`,
:func:`~gcml_app.rounds.loop.run_round`) holds an exclusive ``flock`` on ``<state_dir>/round.lock`` for
the whole round; ``round.json`` beside it says which round holds it.

A second caller is refused at once, never queued: :class:`~gcml_app.errors.RoundBusy`, with a message
naming the running round (its id, trigger, process and age), and a ``busy`` line in the history, so
both attempts are on record. The caller's pending labels stay pending (the train task re-arms the
trigger); the scheduler's next interval, the next label or the operator tries again. The kernel drops
the lock when the holder's process ends, however it ends (killed, out of memory, power cut): a dead
round never blocks the next one. A round's nested entries (``gossip_round`` calling ``run_round``) take
it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from gcml_app.config import SiteConfig
from gcml_app.errors import RoundBusy
from gcml_app.store import ModelStore
from gcml_app.util.files import atomic_write, read_json

__all__ = ["exclusive", "one_round", "running_round"]

F = TypeVar("F", bound=Callable[..., Any])

_held: dict[Path, int] = {}  # lock file -> the thread of this process that holds it
_guard = threading.Lock()


def running_round(state_dir: Path) -> dict[str, Any] | None:
    """The round that holds the site's lock now (``{"round_id", "trigger", "pid", "started"}``), or ``None``."""
    path = Path(state_dir) / "round.lock"
    if not path.exists():
        return None
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_json(path.with_name("round.json")) or {"round_id": None}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def one_round(cfg: SiteConfig, store: ModelStore, trigger: str | None = None,
              round_id: str | None = None) -> Iterator[None]:
    """Hold the site's round lock for the ``with`` block (at once, or :class:`RoundBusy`).

    Raises:
        RoundBusy: another process (or another thread of this one) holds it; recorded in the history
            (``event: busy``) with the running round's id.
    """
    path = (Path(cfg.state_dir) / "round.lock").resolve()
    me = threading.get_ident()
    with _guard:
        nested = _held.get(path) == me
    if nested:  # gossip_round -> run_round: one round, one lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    try:
        with _guard:
            busy = path in _held  # another thread here: flock alone would let it through (one open file each)
        if not busy:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = True
        if busy:
            raise _refuse(cfg, store, path, trigger, round_id)
        with _guard:
            _held[path] = me
        try:
            atomic_write(path.with_name("round.json"), json.dumps(
                {"round_id": round_id, "trigger": trigger, "pid": os.getpid(), "started": time.time()}).encode())
            yield
        finally:
            with _guard:
                _held.pop(path, None)
            path.with_name("round.json").unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


def _refuse(cfg: SiteConfig, store: ModelStore, path: Path, trigger: str | None, round_id: str | None) -> RoundBusy:
    holder = read_json(path.with_name("round.json"))
    age = f", started {time.time() - holder['started']:.0f} s ago" if isinstance(holder.get("started"), float) else ""
    running = (f"round {holder.get('round_id') or '(no id)'} (trigger {holder.get('trigger') or 'unknown'}, "
               f"pid {holder.get('pid')}{age})") if holder else "another round (starting)"
    msg = (f"site {cfg.site}: {running} is running on this state folder; one round at a time, "
           "try again when it ends")
    store.record("busy", outcome="refused", reason=msg, trigger=trigger, round_id=round_id,
                 running=holder.get("round_id"))
    return RoundBusy(msg, holder)


def exclusive(f: F) -> F:
    """Run a round entry ``f(cfg, store, ...)`` under :func:`one_round`; the trigger and round id for the
    message come from its ``trigger``/``round_id`` keywords or its ``extra`` record fields."""

    @functools.wraps(f)
    def entry(cfg: SiteConfig, store: ModelStore, *args: Any, **kwargs: Any) -> Any:
        extra = kwargs.get("extra") or {}
        trigger = kwargs.get("trigger", extra.get("trigger", "labels" if f.__name__ == "labels_round" else None))
        with one_round(cfg, store, trigger, kwargs.get("round_id", extra.get("round_id"))):
            return f(cfg, store, *args, **kwargs)

    return entry  # type: ignore[return-value]
