"""THE round: one loop every trigger and every method runs through.

- :mod:`.loop`: :func:`run_round`, in named phases: prepare, score the served model, produce
  candidates, score them, decide (the gate), commit (working model, publish or keep);
- :mod:`.producers`: what a round trains, behind one small interface (:class:`Producer`):
  :class:`Local`, :class:`DCML` (and, in the simulator, the FL baselines' :class:`~gcml_app.sim.methods.Offered`);
- :mod:`.pull`: asking partners in order for a new, checked model;
- :mod:`.gossip`: :func:`gossip_round`, :func:`labels_round` and the :class:`SyncRequest` they take;
- :mod:`.record`: reading a round record back (:func:`summarize`, :func:`partner_gain`).
"""

import importlib
from typing import Any

_FROM = {"SyncRequest": "gossip", "gossip_round": "gossip", "labels_round": "gossip", "run_round": "loop",
         "DCML": "producers", "Local": "producers", "Produced": "producers", "Producer": "producers",
         "partner_gain": "record", "summarize": "record"}

__all__ = sorted(_FROM)


def __getattr__(name: str) -> Any:
    """The names above, imported on first use (PEP 562): ``gcml_app.rounds.lock`` or ``.record`` alone, as
    ``gcml status`` needs them, do not import the networks and MONAI (6 s on a busy 2-core machine)."""
    if name in _FROM:
        return getattr(importlib.import_module(f"gcml_app.rounds.{_FROM[name]}"), name)
    raise AttributeError(f"module 'gcml_app.rounds' has no attribute {name!r}")
