"""One gossip round at this site, and the round that new labels trigger.

Gossip round (DESIGN.md section 3), in MONAI Label's training subprocess:

1. order the partners (:func:`.peers.order_peers`), or take the order the request named;
2. for each partner in turn: its manifest; skip it when its model is the one we already hold;
   fetch and verify (:class:`.client.PeerClient`); stop at the first usable model;
3. DCML with that model, validation gate, publish with lineage (:func:`gcml_app.trainer.run_round`);
4. credit the partner with the Dice gain; append the round record to the history.

Special cases:

- no served model yet and enough labels: a local warm-up round (``gossip.warmup_epochs``) instead;
- too few labels to validate and no validated model: adopt a partner's validated model unchanged,
  recorded as unvalidated (``gossip.adopt_when_unlabelled``), so pre-annotations exist from day one;
- no partner has a new, usable model: the round ends with a ``gossip`` history record of every attempt.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any

from gcml_app.config import SiteConfig
from gcml_app.errors import NothingToShare, PayloadRejected, PeerUnavailable
from gcml_app.gossip.audit import AuditLog
from gcml_app.gossip.client import PeerClient, PeerManifest, Pulled
from gcml_app.gossip.payload import our_arch
from gcml_app.gossip.peers import PeerBook, order_peers
from gcml_app.gossip.state import GossipState
from gcml_app.split import FixedSplit
from gcml_app.store import ModelStore, atomic_write
from gcml_app.trainer import Progress, run_round

__all__ = ["gossip_round", "labels_round"]

logger = logging.getLogger(__name__)


def _split_ok(cfg: SiteConfig, cases: list[dict[str, str]]) -> tuple[bool, int, int]:
    train_ids, val_ids = FixedSplit(cfg.state_dir / "split.json", cfg.validation).assign(c["id"] for c in cases)
    return len(val_ids) >= cfg.validation.min_cases and bool(train_ids), len(train_ids), len(val_ids)


def _pull(
    cfg: SiteConfig, order: list[str], book: PeerBook, state: GossipState, ours: str, validated_only: bool
) -> tuple[tuple[str, PeerManifest, Pulled, Path] | None, list[dict[str, Any]]]:
    """Ask partners in ``order`` until one gives a new model that passes every check (each try audited)."""
    peers = {p.name: p for p in cfg.gossip.peers}
    attempts: list[dict[str, Any]] = []
    audit = AuditLog(cfg.state_dir / "audit.jsonl")
    for name in order:
        client = PeerClient(peers[name], cfg.gossip)
        t0 = time.perf_counter()
        man = None
        try:
            man = client.manifest()
            held = book.get(name).last_sha256
            cached = state.cached_model(name)
            if man.sha256 == held and cached.exists():
                book.answered(name)
                attempts.append({"peer": name, "outcome": "unchanged", "version": man.version,
                                 "reason": f"v{man.version} ({man.sha256[:12]}) is the model we pulled last time"})
                continue
            if validated_only and not man.validated:
                book.answered(name)
                attempts.append({"peer": name, "outcome": "skipped", "version": man.version,
                                 "reason": "its model is unvalidated; only validated models are adopted"})
                continue
            got = client.fetch(man, cfg, ours, etag=held if cached.exists() else None)
            if got is None:  # 304: it still serves what we hold, though its manifest said otherwise
                book.answered(name)
                attempts.append({"peer": name, "outcome": "unchanged", "version": man.version,
                                 "reason": "HTTP 304: the model is the one we hold"})
                continue
            atomic_write(cached, got.data)
            book.pulled(name, man.sha256, man.version, man.site, got.bytes_received)
            attempts.append({"peer": name, "outcome": "pulled", "version": man.version, "bytes": got.bytes_received,
                             "fetch_s": round(got.fetch_s, 3), "verify_s": round(got.verify_s, 3)})
            logger.info(f"gossip[{cfg.site}] pulled {name} v{man.version}: {got.bytes_received} bytes "
                        f"in {got.fetch_s:.2f} s, verified in {got.verify_s:.2f} s")
            return (name, man, got, cached), attempts
        except NothingToShare as e:
            book.answered(name)
            attempts.append({"peer": name, "outcome": "nothing_yet", "reason": e.reason})
        except PeerUnavailable as e:
            book.failed(name, e.reason, cfg.gossip)
            attempts.append({"peer": name, "outcome": "unavailable", "reason": e.reason,
                             "seconds": round(time.perf_counter() - t0, 2)})
            logger.warning(f"gossip[{cfg.site}] {e}")
        except PayloadRejected as e:
            book.rejected(name, e.reason, cfg.gossip)
            attempts.append({"peer": name, "outcome": "rejected", "reason": e.reason})
            logger.warning(f"gossip[{cfg.site}] rejected payload: {e}")
        finally:
            client.close()
            book.save()
            last = attempts[-1] if attempts and attempts[-1]["peer"] == name else {}
            audit.write("pull", peer=name, url=peers[name].url, verdict=last.get("outcome", "error"),
                        reason=last.get("reason", ""), version=man.version if man else None,
                        sha256=man.sha256 if man else None, bytes=last.get("bytes", 0))
    return None, attempts


def gossip_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    *,
    trigger: str = "train",
    round_id: str | None = None,
    peers: list[str] | None = None,
    epochs: int | None = None,
    progress: Progress | None = None,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Run one gossip round; see the module docstring.

    Args:
        cfg: site config (its ``gossip`` section lists the partners).
        store: the site's model store.
        cases: labelled cases (``[{"id", "image", "label"}]``).
        trigger: what started the round (``scheduler``, ``sync``, ``train``), kept in the record.
        round_id: an id the caller can find the record by (default: a new uuid).
        peers: partners to ask, in this order, instead of the policy's order.
        epochs: DCML epochs (default ``gossip.epochs``).
        progress: per-epoch callback, as in :func:`run_round`.
        rng: random source for the partner order.

    Returns:
        the round record, as appended to the store's history.

    Raises:
        ValueError: ``peers`` names a partner that is not configured.
    """
    round_id = round_id or uuid.uuid4().hex[:12]
    base = {"trigger": trigger, "round_id": round_id}
    names = [p.name for p in cfg.gossip.peers]
    if peers:
        unknown = [p for p in peers if p not in names]
        if unknown:
            raise ValueError(f"sync request: found peers {unknown}; expected configured partners {names}")
    state = GossipState(cfg.state_dir)
    served = store.served()
    enough, n_train, n_val = _split_ok(cfg, cases)

    if enough and served is None:
        logger.info(f"gossip[{cfg.site}] no model yet: local warm-up round of {cfg.gossip.warmup_epochs} epochs")
        state.learned(c["id"] for c in cases)
        return run_round(cfg, store, cases, epochs=cfg.gossip.warmup_epochs, progress=progress,
                         extra={**base, "stage": "warmup"})
    adopting = not enough
    if adopting and not (cfg.gossip.adopt_when_unlabelled and (served is None or not served.validated)):
        reason = (f"not enough labels to validate ({n_train} train, {n_val} validation; need "
                  f"{cfg.validation.min_cases} validation and 1 train) and the served model is validated")
        return store.record("gossip", outcome="skipped", reason=reason, **base)
    if not names:
        return store.record("gossip", outcome="no_peers", reason="no partners configured (gossip.peers)", **base)

    book = PeerBook.open(state.peers_path)
    if peers:
        order, backed_off = list(peers), []
    else:
        order, backed_off = order_peers(names, book, cfg.gossip, rng or random.Random())
    ours = our_arch(cfg)
    got, attempts = _pull(cfg, order, book, state, ours, validated_only=adopting)
    for name in backed_off:
        attempts.append({"peer": name, "outcome": "backed_off", "reason": book.get(name).last_error})
    pulled_bytes = sum(a.get("bytes", 0) for a in attempts)
    if got is None:
        reason = "no partner had a new usable model: " + "; ".join(
            f"{a['peer']} {a['outcome']}" + (f" ({a['reason']})" if a.get("reason") else "") for a in attempts
        ) if attempts else "no partner to ask"
        logger.info(f"gossip[{cfg.site}] {reason}")
        return store.record("gossip", outcome="no_model", reason=reason, attempts=attempts,
                            bytes_pulled=pulled_bytes, **base)

    name, man, pulled, path = got
    origin = {"peer": name, "peer_site": man.site, "peer_version": man.version, "peer_sha256": man.sha256}
    gossip = {"peer": name, "peer_version": man.version, "attempts": attempts, "bytes_pulled": pulled_bytes,
              "fetch_s": round(pulled.fetch_s, 3), "verify_s": round(pulled.verify_s, 3)}
    if adopting:
        step = {"site": cfg.site, "mode": "adopt", **origin}
        man_ = store.publish(
            pulled.state, arch=ours, val_dice={}, n_train=0, n_val=n_val, produced_by=f"adopted:{name}",
            site=cfg.site, lineage=[step], validated=False,
            decision={**base, "mode": "adopt", "gossip": gossip,
                      "reason": f"too few labels to validate: adopted {name} v{man.version} unvalidated"},
        )
        logger.info(f"gossip[{cfg.site}] adopted {name} v{man.version} as v{man_.version} (unvalidated)")
        return store.history()[-1]

    state.learned(c["id"] for c in cases)  # only a round that trains learns from the pending labels
    record = run_round(cfg, store, cases, epochs=epochs or cfg.gossip.epochs, incoming=path, progress=progress,
                       origin=origin, extra={**base, "gossip": gossip})
    means = record.get("mean", {})
    gain = means.get(record.get("winner"), 0.0) - means.get("served", 0.0) if "served" in means else 0.0
    book.credit(name, gain, cfg.gossip)
    book.save()
    return record


def labels_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    *,
    epochs: int | None = None,
    progress: Progress | None = None,
    round_id: str | None = None,
) -> dict[str, Any]:
    """The round new labels trigger: DCML with the last partner model we pulled, else supervised."""
    state = GossipState(cfg.state_dir)
    extra = {"trigger": "labels", "round_id": round_id or uuid.uuid4().hex[:12]}
    enough, n_train, n_val = _split_ok(cfg, cases)
    if not enough:
        state.learned([])  # re-arm the trigger: the next label tries again
        return store.record("labels", outcome="skipped", **extra,
                            reason=f"not enough labels to validate yet ({n_train} train, {n_val} validation)")
    names = [p.name for p in cfg.gossip.peers]
    cached = [state.cached_model(n) for n in names if state.cached_model(n).exists()]
    latest = max(cached, key=lambda p: p.stat().st_mtime) if cached else None
    state.learned(c["id"] for c in cases)
    epochs = epochs or cfg.finetune.epochs or cfg.train.epochs
    if latest is None:
        return run_round(cfg, store, cases, epochs=epochs, progress=progress, extra=extra)
    rec = PeerBook.open(state.peers_path).get(latest.stem)
    origin = {"peer": latest.stem, "peer_site": rec.last_site, "peer_version": rec.last_version,
              "peer_sha256": rec.last_sha256, "cached": True}
    return run_round(cfg, store, cases, epochs=epochs, incoming=latest, progress=progress, origin=origin, extra=extra)



def summarize(record: dict[str, Any]) -> str:
    """One line for a round record, e.g. for ``gcml sync`` and the demo.

    Example:
        ``"published v5: gossip with site-b v3, dcml_local 0.712 > served 0.690; pulled 42.7 kB"``
    """
    g = record.get("gossip") or {}
    pulled = f"; pulled {g.get('bytes_pulled', record.get('bytes_pulled', 0)) / 1000:.1f} kB"
    event, means = record.get("event"), record.get("mean", {})
    if event in ("gossip", "labels"):  # ended without training
        return f"{record.get('outcome', event)}: {record.get('reason', '')}{pulled}"
    if record.get("mode") == "adopt":
        return f"adopted v{record.get('version')} unvalidated from {g.get('peer')}{pulled}"
    how = f"gossip with {g['peer']} v{g.get('peer_version')}" if g else f"{record.get('mode')} round"
    if event == "publish":
        winner = record.get("winner")
        score = f"{winner} {means.get(winner, 0):.3f}" + (f" > served {means['served']:.3f}" if "served" in means else "")
        return f"published v{record.get('version')}: {how}, {score}" + (pulled if g else "")
    best = max((k for k in means if k != "served"), key=lambda k: means[k], default=None)
    score = f"best candidate {best} {means[best]:.3f} <= served {means.get('served', 0):.3f}" if best else ""
    return f"kept v{record.get('version')}: {how}, {score}" + (pulled if g else "")
