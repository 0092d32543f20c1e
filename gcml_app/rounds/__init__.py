"""THE round: one loop every trigger and every method runs through.

- :mod:`.loop`: :func:`run_round`, in named phases: prepare, score the served model, produce
  candidates, score them, decide (the gate), commit (working model, publish or keep);
- :mod:`.producers`: what a round trains, behind one small interface (:class:`Producer`):
  :class:`Local`, :class:`DCML` (and, in the simulator, the FL baselines' :class:`~gcml_app.sim.methods.Offered`);
- :mod:`.pull`: asking partners in order for a new, checked model;
- :mod:`.gossip`: :func:`gossip_round`, :func:`labels_round` and the :class:`SyncRequest` they take;
- :mod:`.record`: reading a round record back (:func:`summarize`, :func:`partner_gain`).
"""

from gcml_app.rounds.gossip import SyncRequest, gossip_round, labels_round
from gcml_app.rounds.loop import run_round
from gcml_app.rounds.producers import DCML, Local, Produced, Producer
from gcml_app.rounds.record import partner_gain, summarize

__all__ = ["DCML", "Local", "Produced", "Producer", "SyncRequest", "gossip_round", "labels_round", "partner_gain",
           "run_round", "summarize"]
