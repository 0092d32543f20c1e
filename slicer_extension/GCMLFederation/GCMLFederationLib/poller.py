"""Fetch in a background thread; the GUI's ``qt.QTimer`` only calls :meth:`Poller.tick` and :meth:`Poller.take`.

Neither method blocks: ``tick`` starts a fetch when one is due and none is running; ``take`` hands
over the newest finished result once.

Example (in a widget)::

    self.poller = Poller(self.logic.fetch, interval_s=5)
    self.timer.timeout.connect(self.onTimer)      # every 500 ms
    def onTimer(self):
        self.poller.tick()
        got = self.poller.take()
        if got: self.show(*got)                   # (result, None) or (None, error)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Poller"]


class Poller:
    """Runs ``fetch()`` at most every ``interval_s`` seconds in a daemon thread.

    Args:
        fetch: the network call; its return value or exception is handed to :meth:`take`.
        interval_s: seconds between the starts of two fetches.
        clock: time source (tests pass a fake one).
    """

    def __init__(self, fetch: Callable[[], Any], interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError(f"interval_s: found {interval_s}; expected a positive number of seconds")
        self.fetch = fetch
        self.interval_s = interval_s
        self.clock = clock
        self._last_start: float | None = None
        self._thread: threading.Thread | None = None
        self._result: tuple[Any, BaseException | None] | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tick(self, force: bool = False) -> bool:
        """Start a fetch if one is due (or ``force``) and none is running; returns whether it started."""
        now = self.clock()
        due = force or self._last_start is None or now - self._last_start >= self.interval_s
        if not due or self.busy:
            return False
        self._last_start = now
        self._thread = threading.Thread(target=self._run, name="GCMLFederation-poll", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        try:
            got: tuple[Any, BaseException | None] = (self.fetch(), None)
        except Exception as e:  # handed to the GUI, which shows it
            got = (None, e)
        with self._lock:
            self._result = got

    def take(self) -> tuple[Any, BaseException | None] | None:
        """The newest finished ``(result, error)``, once; ``None`` when nothing new arrived."""
        with self._lock:
            got, self._result = self._result, None
        return got

    def wait(self, timeout: float = 10.0) -> None:
        """Wait for a running fetch (for tests and the module's self-test; never in a GUI slot)."""
        if self._thread is not None:
            self._thread.join(timeout)
