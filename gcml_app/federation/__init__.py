"""Bytes between partner sites: they move and are checked here, and never train.

- :mod:`.client`: the HTTP client of a partner's peer surface (manifest, then weights), with every check;
- :mod:`.payload`: safetensors encoding of the weights, their checks and the manifest body;
- :mod:`.peers`: the partner book (scores, backoff) and the order partners are asked in;
- :mod:`.state`: the site's gossip state (cached partner models, pending labels, pause);
- :mod:`.audit`: the append-only audit trail of pulls and refusals;
- :mod:`.scheduler`: the in-server timer that starts gossip rounds.

The rounds (:mod:`gcml_app.rounds`) call this package; it imports neither them nor the site.
"""
