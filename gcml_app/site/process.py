"""Facts about this process that the train subprocess, the warm trainer and the train task share.

Standard library only: :mod:`.train_entry` imports it before torch, MONAI or MONAI Label.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from itertools import pairwise
from pathlib import Path

__all__ = ["OMP_SERVER_ONLY_ENV", "STARTED_ENV", "freeze_startup", "is_background_process", "is_training_process",
           "lower_priority", "process_started", "started_at"]

STARTED_ENV = "GCML_TRAIN_STARTED"  # in a round's child: when MONAI Label started the relay (epoch seconds)
# set by gcml_app.site.serve_main when OMP_WAIT_POLICY is its own, for the server alone (the warm trainer drops both)
OMP_SERVER_ONLY_ENV = "GCML_OMP_WAIT_POLICY_SERVER_ONLY"


def is_training_process(argv: list[str] | None = None) -> bool:
    """Whether this process is MONAI Label's train subprocess (``... interfaces/utils/app.py -m train``)."""
    return is_background_process(argv, ("train",))


def is_background_process(argv: list[str] | None = None, methods: tuple[str, ...] = ("train", "scoring")) -> bool:
    """Whether this process is one of MONAI Label's task subprocesses for ``methods`` (``... app.py -m scoring``)."""
    argv = sys.argv if argv is None else argv
    if not argv or not argv[0].replace(os.sep, "/").endswith("monailabel/interfaces/utils/app.py"):
        return False
    return any(a == "-m" and b in methods for a, b in pairwise(argv))


def lower_priority(nice: int, idle: bool = False) -> None:
    """Raise this process's niceness to ``nice`` (never lower it: that would need privileges); with ``idle``,
    also move every thread it has to Linux's ``SCHED_IDLE`` policy (``train.sched_idle``), which its
    children and later threads inherit.

    Niceness only weighs the training against serving: a niced trainer that holds both cores still delays
    each of ``gcml_seg``'s parallel regions by a time slice, about 20x on a 2-core machine (issue 33's soak).
    A ``SCHED_IDLE`` task runs only on CPU time no other task wants, and a waking request preempts it at
    once. Moving to it needs no privilege; leaving it would.
    """
    lower = nice - os.nice(0)
    if lower > 0:
        os.nice(lower)
    if idle and hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) != os.SCHED_IDLE:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            except ProcessLookupError:  # a thread that has just ended
                pass


def freeze_startup() -> int:
    """Exempt everything alive now (the imports, the app) from garbage collection; returns how many objects.

    A full collection walks every tracked object: after torch, MONAI and MONAI Label are imported that is
    about 680 000, and each collection held the GIL 0.4 s (seen as 0.4-0.5 s stalls of ``gcml_seg`` under
    load). Objects that live as long as the server never become garbage; frozen, a full collection walks
    only what came after (``gc.freeze``, Python 3.7+), well under a millisecond here.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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
