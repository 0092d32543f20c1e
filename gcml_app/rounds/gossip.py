"""The rounds triggers start: a gossip round (pull a partner's model, then the loop) and a new-labels round.

- :func:`gossip_round`: pick a partner, pull and check its model (:mod:`.pull`), then
  :func:`~gcml_app.rounds.loop.run_round` with DCML; a warm-up round when the site has labels but
  no model, adoption when it has too few labels to validate;
- :func:`labels_round`: the round new labels trigger: DCML with the last partner model, else local;
- :class:`SyncRequest`: the one check of a sync request (``POST /gcml/sync``, the train task, the round).
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gcml_app.config import SiteConfig
from gcml_app.federation.payload import our_arch
from gcml_app.federation.peers import PeerBook, order_peers
from gcml_app.federation.state import GossipState
from gcml_app.rounds.lock import exclusive
from gcml_app.rounds.loop import Progress, adopt, run_round, split_of
from gcml_app.rounds.producers import DCML, Local
from gcml_app.rounds.pull import Connect, http, pull_first
from gcml_app.rounds.record import RoundRecord, partner_gain
from gcml_app.store import ModelStore

__all__ = ["SyncRequest", "gossip_round", "labels_round"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncRequest:
    """What a sync may ask for: partners to ask, in this order, and the DCML epochs.

    Args:
        peers: configured partner names (default: the policy's order).
        epochs: 1 to 10000 (default: ``gossip.epochs``).
    """

    peers: list[str] | None = None
    epochs: int | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any], partners: list[str]) -> SyncRequest:
        """Check a request body against the site's partners.

        Raises:
            ValueError: another key, ``peers`` not a non-empty list of configured partners, or
                ``epochs`` not an integer from 1 to 10000; the message names what was found.
        """
        unknown = set(body) - {"peers", "epochs"}
        if unknown:
            raise ValueError(f"sync request: found keys {sorted(unknown)}; expected only 'peers' and 'epochs'")
        peers, epochs = body.get("peers"), body.get("epochs")
        if peers is not None and (not isinstance(peers, list) or not peers
                                  or not all(isinstance(p, str) and p in partners for p in peers)):
            raise ValueError(f"sync request: found peers {peers!r}; expected a non-empty list of configured "
                             f"partners {partners}")
        whole = isinstance(epochs, int) and not isinstance(epochs, bool)
        if epochs is not None and not (whole and 1 <= epochs <= 10_000):
            raise ValueError(f"sync request: found epochs {epochs!r}; expected an integer from 1 to 10000")
        return cls(peers, epochs)


@exclusive
def gossip_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    *,
    trigger: str = "train",
    round_id: str | None = None,
    request: SyncRequest = SyncRequest(),
    progress: Progress | None = None,
    rng: random.Random | None = None,
    connect: Connect | None = None,
    seed: int | None = None,
    unlabelled: list[dict[str, str]] | None = None,
) -> RoundRecord:
    """Run one gossip round (docs/design.md, "The round"):

    1. order the partners (:func:`~gcml_app.federation.peers.order_peers`), or take the order the request named;
    2. for each partner in turn: its manifest; skip it when its model is the one we already hold;
       fetch and check; stop at the first usable model (:func:`~gcml_app.rounds.pull.pull_first`);
    3. :func:`~gcml_app.rounds.loop.run_round` with that model (DCML, gate, publish with lineage);
    4. credit the partner with the best candidate's paired validation gain; the record goes to the history.

    Special cases: no served model yet and enough labels: a local warm-up round
    (``gossip.warmup_epochs``); too few labels to validate and no validated model: adopt a
    validated model of a partner listed in ``gossip.adopt_from`` unchanged, served and recorded as
    unvalidated until local labels validate it (``gossip.adopt_when_unlabelled``);
    no partner has a new model but one answered that it still serves the model we pulled from it
    before: DCML with that cached model (the first such partner in the policy's order), so the
    site's own labels keep training every round (``gossip.cached: true`` in the record).

    Args:
        cfg: site config (its ``gossip`` section lists the partners).
        store: the site's model store.
        cases: labelled cases (``[{"id", "image", "label"}]``).
        trigger: what started the round (``scheduler``, ``sync``, ``train``, ``simulate``), kept in the record.
        round_id: an id the caller can find the record by (default: a new uuid).
        request: partners to ask in order, and DCML epochs (default ``gossip.epochs``).
        progress: per-epoch callback, as in :func:`~gcml_app.rounds.loop.run_round`.
        rng: random source for the partner order.
        connect: how to reach a partner by name (default: HTTP to its configured URL).
        seed: the training seed, as in :func:`~gcml_app.rounds.loop.run_round`.
        unlabelled: the site's images without a label (``[{"id", "image"}]``), for DCML's unlabelled
            term (``dcml.lambda_unl``), as in :func:`~gcml_app.rounds.loop.run_round`.

    Returns:
        the round record, as appended to the store's history. Attempts and bytes pulled are under
        ``gossip``, whether the round trained or not.

    Raises:
        ValueError: the request names a partner that is not configured.
    """
    round_id = round_id or uuid.uuid4().hex[:12]
    base = {"trigger": trigger, "round_id": round_id}
    names = [p.name for p in cfg.gossip.peers]
    if request.peers:
        SyncRequest.parse({"peers": request.peers}, names)
    state = GossipState(cfg.state_dir)
    served = store.served()
    train_ids, val_ids, enough = split_of(cfg, cases)
    n_train, n_val = len(train_ids), len(val_ids)

    if enough and served is None:
        logger.info(f"gossip[{cfg.site}] no model yet: local warm-up round of {cfg.gossip.warmup_epochs} epochs")
        with state.training(c["id"] for c in cases):
            return run_round(cfg, store, cases, epochs=cfg.gossip.warmup_epochs, progress=progress,
                             extra={**base, "stage": "warmup"}, seed=seed)
    adopting = not enough
    if adopting and not (cfg.gossip.adopt_when_unlabelled and (served is None or not served.validated)):
        reason = (f"not enough labels to validate ({n_train} train, {n_val} validation; need "
                  f"{cfg.validation.min_cases} validation and 1 train) and the served model is validated")
        return store.record("gossip", outcome="skipped", reason=reason, **base)
    if not names:
        return store.record("gossip", outcome="no_peers", reason="no partners configured (gossip.peers)", **base)

    if adopting and not set(names) & set(cfg.gossip.adopt_from):
        reason = (f"not enough labels to validate ({n_train} train, {n_val} validation) and gossip.adopt_from names no "
                  "partner whose model this site would serve unvalidated")
        return store.record("gossip", outcome="skipped", reason=reason, **base)

    book = PeerBook.open(state.peers_path)
    if request.peers:
        order, backed_off = list(request.peers), []
    else:
        order, backed_off = order_peers(names, book, cfg.gossip, rng or random.Random())
    if adopting:  # a model served without local validation comes only from partners the site chose to trust so
        order = [n for n in order if n in cfg.gossip.adopt_from]
    ours = our_arch(cfg)
    got, attempts = pull_first(cfg, order, book, state, ours, adopting, connect or http(cfg))
    for name in backed_off:
        attempts.append({"peer": name, "outcome": "backed_off", "reason": book.get(name).last_error})
    pulled = sum(a.get("bytes", 0) for a in attempts)
    # a partner that answered "unchanged" still serves the model we hold: train with it
    reuse = None if (got is not None or adopting) else next(
        (a["peer"] for a in attempts if a["outcome"] == "unchanged" and state.cached_model(a["peer"]).exists()), None)
    if got is None and reuse is None:
        reason = "no partner had a new usable model: " + "; ".join(
            f"{a['peer']} {a['outcome']}" + (f" ({a['reason']})" if a.get("reason") else "") for a in attempts
        ) if attempts else "no partner to ask"
        logger.info(f"gossip[{cfg.site}] {reason}")
        return store.record("gossip", outcome="no_model", reason=reason,
                            gossip={"attempts": attempts, "bytes_pulled": pulled}, **base)
    if got is None:  # nothing new anywhere: our labels still train, with the partner model we hold (policy order)
        rec = book.get(reuse)
        origin = {"peer": reuse, "peer_site": rec.last_site, "peer_version": rec.last_version,
                  "peer_sha256": rec.last_sha256, "cached": True}
        gossip = {"peer": reuse, "peer_version": rec.last_version, "attempts": attempts, "bytes_pulled": pulled,
                  "cached": True}
        logger.info(f"gossip[{cfg.site}] no new partner model: DCML with the cached model of {reuse} v{rec.last_version}")
        producer = DCML.from_file(state.cached_model(reuse), cfg, ours, origin)
        return _train_with(cfg, store, cases, book, state, reuse, producer, {**base, "gossip": gossip},
                           request.epochs, progress, seed, unlabelled)

    man = got.manifest
    origin = {"peer": got.peer, "peer_site": man.site, "peer_version": man.version, "peer_sha256": man.sha256}
    gossip = {"peer": got.peer, "peer_version": man.version, "attempts": attempts, "bytes_pulled": pulled,
              "fetch_s": round(got.pulled.fetch_s, 3), "verify_s": round(got.pulled.verify_s, 3)}
    if adopting:
        return adopt(cfg, store, got.pulled.state, got.manifest, got.peer, origin, ours, n_val,
                     {**base, "gossip": gossip})
    # the weights were checked once, as they arrived (check_payload): the round trains on them as they are
    producer = DCML(got.pulled.state, man.sha256, origin, file=got.path.name)
    return _train_with(cfg, store, cases, book, state, got.peer, producer, {**base, "gossip": gossip},
                       request.epochs, progress, seed, unlabelled)


def _train_with(cfg: SiteConfig, store: ModelStore, cases: list[dict[str, str]], book: PeerBook, state: GossipState,
                peer: str, producer: DCML, extra: dict[str, Any], epochs: int | None, progress: Progress | None,
                seed: int | None, unlabelled: list[dict[str, str]] | None) -> dict[str, Any]:
    """DCML with partner ``peer``'s model, then credit the partner with what it brought."""
    with state.training(c["id"] for c in cases):  # only a round that trains learns from the pending labels
        record = run_round(cfg, store, cases, producer, epochs=epochs or cfg.gossip.epochs, progress=progress,
                           extra=extra, seed=seed, unlabelled=unlabelled)
    book.credit(peer, partner_gain(record), cfg.gossip)
    book.save()
    return record


@exclusive
def labels_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    *,
    epochs: int | None = None,
    progress: Progress | None = None,
    round_id: str | None = None,
    unlabelled: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The round new labels trigger: DCML with the last partner model we pulled (and the site's
    ``unlabelled`` images), else supervised."""
    state = GossipState(cfg.state_dir)
    extra = {"trigger": "labels", "round_id": round_id or uuid.uuid4().hex[:12]}
    train_ids, val_ids, enough = split_of(cfg, cases)
    if not enough:
        state.rearm()  # the next label tries again
        reason = f"not enough labels to validate yet ({len(train_ids)} train, {len(val_ids)} validation)"
        return store.record("labels", outcome="skipped", reason=reason, **extra)
    names = [p.name for p in cfg.gossip.peers]
    cached = [state.cached_model(n) for n in names if state.cached_model(n).exists()]
    latest = max(cached, key=lambda p: p.stat().st_mtime) if cached else None
    epochs = epochs or cfg.finetune.epochs or cfg.train.epochs
    with state.training(c["id"] for c in cases):
        if latest is None:
            return run_round(cfg, store, cases, Local(), epochs=epochs, progress=progress, extra=extra)
        rec = PeerBook.open(state.peers_path).get(latest.stem)
        origin = {"peer": latest.stem, "peer_site": rec.last_site, "peer_version": rec.last_version,
                  "peer_sha256": rec.last_sha256, "cached": True}
        return run_round(cfg, store, cases, epochs=epochs, incoming=latest, origin=origin, progress=progress,
                         extra=extra, unlabelled=unlabelled)
