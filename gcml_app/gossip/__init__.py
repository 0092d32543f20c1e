"""Gossip between partner sites: payload checks, the peer client, peer selection, rounds, HTTP surfaces.

The gossip code moves and checks bytes; it never trains. Rounds (:mod:`gcml_app.rounds`) call it.
"""
