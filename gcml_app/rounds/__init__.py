"""THE round: one loop every trigger and every method runs through.

- :mod:`.loop`: :func:`run_round`: train, score every candidate, gate, commit;
  :func:`gossip_round`: pick and pull a partner, then the loop; :func:`labels_round`.
"""
