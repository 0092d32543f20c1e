"""Facts about this process that the train subprocess, the warm trainer and the train task share.

Standard library only: :mod:`.train_entry` imports it before torch, MONAI or MONAI Label.
"""

from __future__ import annotations

import os
import sys
import time
from itertools import pairwise
from pathlib import Path

__all__ = ["STARTED_ENV", "is_background_process", "is_training_process", "lower_priority", "process_started", "started_at"]

STARTED_ENV = "GCML_TRAIN_STARTED"  # in a round's child: when MONAI Label started the relay (epoch seconds)


def is_training_process(argv: list[str] | None = None) -> bool:
    """Whether this process is MONAI Label's train subprocess (``... interfaces/utils/app.py -m train``)."""
    return is_background_process(argv, ("train",))


def is_background_process(argv: list[str] | None = None, methods: tuple[str, ...] = ("train", "scoring")) -> bool:
    """Whether this process is one of MONAI Label's task subprocesses for ``methods`` (``... app.py -m scoring``)."""
    argv = sys.argv if argv is None else argv
    if not argv or not argv[0].replace(os.sep, "/").endswith("monailabel/interfaces/utils/app.py"):
        return False
    return any(a == "-m" and b in methods for a, b in pairwise(argv))


def lower_priority(nice: int) -> None:
    """Raise this process's niceness to ``nice`` (never lower it: that would need privileges)."""
    lower = nice - os.nice(0)
    if lower > 0:
        os.nice(lower)


def started_at(pid: int) -> float:
    """When process ``pid`` started (epoch seconds, to a clock tick; ``psutil`` rounds the boot time to
    whole seconds, too coarse for a start-up of about one)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def process_started() -> float:
    """When MONAI Label started this round's train subprocess (epoch seconds): for a round forked by the
    warm trainer, the start of the subprocess that relays it; otherwise this process's own start."""
    started = os.environ.get(STARTED_ENV)
    return float(started) if started else started_at(os.getpid())
