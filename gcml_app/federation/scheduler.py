"""The in-server gossip scheduler: a daemon thread that starts a round every ``interval_s`` with jitter.

It only *starts* rounds (as MONAI Label training tasks, in their own subprocess); it never trains on
the server's event loop. The pause flag lives in :class:`.state.GossipState`, so a pause survives a
restart. A tick that finds a round already running is skipped, not queued.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from gcml_app.federation.state import GossipState

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)


class Scheduler(threading.Thread):
    """Calls ``start_round()`` every ``interval * (1 +- jitter)`` seconds while not paused.

    Args:
        interval: mean seconds between rounds (> 0).
        jitter: fraction of ``interval`` each wait varies by, so partners do not all pull at once.
        state: holds the pause flag.
        start_round: starts a round; returns a short description of what happened (for the log).
        seed: seeds the jitter.
    """

    def __init__(self, interval: float, jitter: float, state: GossipState, start_round: Callable[[], str],
                 seed: int | None = None):
        super().__init__(name="gcml-gossip-scheduler", daemon=True)
        if interval <= 0:
            raise ValueError(f"scheduler interval: found {interval}; expected > 0 seconds")
        self.interval, self.jitter = interval, jitter
        self.state = state
        self.start_round = start_round
        self.rng = random.Random(seed)
        self.next_run: float | None = None
        self.last_result = ""
        self._halt = threading.Event()

    def _wait(self) -> float:
        return self.interval * (1 + self.rng.uniform(-self.jitter, self.jitter))

    def run(self) -> None:
        while True:
            self.next_run = time.time() + self._wait()
            if self._halt.wait(max(0.0, self.next_run - time.time())):
                return
            if self.state.paused:
                self.last_result = "paused"
                continue
            try:
                self.last_result = self.start_round()
            except Exception as e:  # keep ticking; the next interval may work
                logger.exception("gossip scheduler: could not start a round")
                self.last_result = f"error: {e}"
            logger.info(f"gossip scheduler: {self.last_result}")

    def stop(self) -> None:
        self._halt.set()
