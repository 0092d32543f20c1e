"""MONAI Label's training subprocess yields the CPU to inference from its first line, not its first step.

MONAI Label starts every train task as ``python -m monailabel.interfaces.utils.app -m train ...``,
which loads the app's ``main.py``; importing torch, MONAI and MONAI Label there costs about 6 s of
CPU on a 2-core machine, and at normal priority that start-up is when radiologists' ``gcml_seg``
requests queued behind a round. ``main.py`` imports this module first, so the process lowers its
priority (``train.nice`` of the site YAML) before those imports. Children (data loader workers)
inherit it. Importing it anywhere else does nothing.
"""

from __future__ import annotations

import os
import sys
from itertools import pairwise

__all__ = ["is_training_process", "lower_priority"]


def is_training_process(argv: list[str] | None = None) -> bool:
    """Whether this process is MONAI Label's train subprocess (``... interfaces/utils/app.py -m train``)."""
    argv = sys.argv if argv is None else argv
    if not argv or not argv[0].replace(os.sep, "/").endswith("monailabel/interfaces/utils/app.py"):
        return False
    return any(a == "-m" and b == "train" for a, b in pairwise(argv))


def lower_priority(nice: int) -> None:
    """Raise this process's niceness to ``nice`` (never lower it: that would need privileges)."""
    lower = nice - os.nice(0)
    if lower > 0:
        os.nice(lower)


def _lower_if_training_process() -> None:
    if not is_training_process():
        return
    from monailabel.config import settings

    from gcml_app.config import CONFIG_ENV, ConfigError, load_config

    path = (settings.MONAI_LABEL_APP_CONF or {}).get("gcml_config") or os.environ.get(CONFIG_ENV)
    try:
        lower_priority(load_config(path).train.nice)
    except (ConfigError, OSError):
        pass  # the app's own start-up reports a bad config with its key paths


_lower_if_training_process()
