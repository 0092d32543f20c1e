"""What MONAI Label's train subprocess does first, before torch, MONAI or MONAI Label are imported.

MONAI Label starts every train task as ``python -m monailabel.interfaces.utils.app -m train ...``,
which loads the app's ``main.py``; ``main.py`` imports this module first. In that process only
(recognised from ``argv``; importing it anywhere else does nothing) it:

1. hands the round to the site's warm trainer when the server runs one (:mod:`gcml_app.site.warm`): the
   round then runs in a fork of an already-imported process and this process only relays its output
   and exit status, which saves the imports (about 6 s of CPU on a 2-core machine);
2. otherwise (no warm trainer, or it declines) lowers its CPU priority to ``train.nice`` of the site
   YAML before those imports, so a cold start does not compete with radiologists' ``gcml_seg``
   requests either. Data loader workers inherit it.

MONAI Label's scoring subprocess (``-m scoring``: active-learning scores, :mod:`gcml_app.site.scoring`)
gets step 2 alone: it never goes through the warm trainer.
"""

from __future__ import annotations

import os
import sys

from gcml_app.site.process import is_background_process, is_training_process, lower_priority

__all__: list[str] = []


def _start() -> None:
    if not is_background_process():
        return
    from gcml_app.site import warm

    if is_training_process() and (path := os.environ.get(warm.ENV)):
        rc = warm.relay(path, sys.argv)
        if rc is not None:
            warm.drained(sys.stdout)
            os._exit(rc)  # the round ran in the warm trainer; nothing is left to do here

    from monailabel.config import settings

    from gcml_app.config import CONFIG_ENV, ConfigError, load_config

    path = (settings.MONAI_LABEL_APP_CONF or {}).get("gcml_config") or os.environ.get(CONFIG_ENV)
    try:
        t = load_config(path).train
        lower_priority(t.nice, t.sched_idle)
    except (ConfigError, OSError):
        pass  # the app's own start-up reports a bad config with its key paths


_start()
