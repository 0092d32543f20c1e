"""A site's round, in one place: train the working model, validate every candidate, gate, publish.

The ``gcml`` train task (in MONAI Label's training subprocess), the scheduler, ``POST /gcml/sync``,
``gcml sync`` and the simulator (``gcml simulate``) all run rounds through this module; only the
transport to partners differs (HTTP with :class:`~gcml_app.federation.client.PeerClient` on servers, an
in-memory partner in the simulator). See docs/design.md, "The round".

- :func:`run_round`: train (alone, or DCML with an incoming model), score every candidate on the
  fixed validation split case by case, gate, keep the working model, publish the winner.
- :func:`gossip_round`: pick a partner, pull and verify its model, then :func:`run_round` with it;
  a warm-up round when the site has labels but no model, adoption when it has too few labels.
- :func:`labels_round`: the round new labels trigger: DCML with the last partner model, else local.

Working model and served model: every round starts from the site's *working* model (stored beside
the model store) and leaves its training there, whatever the gate decides; the gate only decides
what is *served*. The working model is written before the publish, so a crash between the two
loses neither: the next round goes on from the new working model and gates it again.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism

from gcml_app.config import SiteConfig
from gcml_app.errors import IncomingModelRejected, NotEnoughLabels, NothingToShare, PayloadRejected, PeerUnavailable
from gcml_app.federation.audit import AuditLog
from gcml_app.federation.client import PeerClient, PeerManifest, Pulled
from gcml_app.federation.payload import our_arch, verify_weights
from gcml_app.federation.peers import PeerBook, order_peers
from gcml_app.federation.state import GossipState
from gcml_app.ml.dcml import average_state, dcml_train, supervised_train
from gcml_app.ml.evaluate import dice_per_case
from gcml_app.ml.gate import SERVED, select
from gcml_app.ml.network import arch_fingerprint, build_network
from gcml_app.ml.split import FixedSplit, labels_for_validation
from gcml_app.ml.transforms import train_transforms, val_transforms
from gcml_app.store import ModelStore, StoreError
from gcml_app.util.files import sha256_bytes
from gcml_app.util.jsonl import clean

__all__ = ["Partner", "Progress", "gossip_round", "labels_round", "load_incoming", "run_round", "summarize"]

logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
LINEAGE_DEPTH = 32  # lineage steps kept in a manifest, newest first


class Partner(Protocol):
    """What a round needs of a partner: its manifest, then its verified weights (see :class:`PeerClient`)."""

    def manifest(self) -> PeerManifest: ...

    def fetch(self, manifest: PeerManifest, cfg: SiteConfig, ours: str, etag: str | None = None) -> Pulled | None: ...

    def close(self) -> None: ...


Connect = Callable[[str], Partner]
"""Partner name -> a :class:`Partner` to talk to (HTTP on servers, in memory in the simulator)."""


def _http(cfg: SiteConfig) -> Connect:
    peers = {p.name: p for p in cfg.gossip.peers}
    spool = GossipState(cfg.state_dir).cache  # bodies arrive beside the cache they are moved into
    return lambda name: PeerClient(peers[name], cfg.gossip, spool=spool)


# ------------------------------------------------------------------------------------------ run_round
def _device(cfg: SiteConfig) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def load_incoming(path: str | Path, cfg: SiteConfig, ours: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Load an incoming model for a DCML round: tensors only, our architecture, every value finite.

    Args:
        path: a safetensors file inside ``cfg.state_dir`` (where the gossip client stores payloads).
        ours: our architecture fingerprint, if already computed.

    Returns:
        the state dict and the file's sha256.

    Raises:
        IncomingModelRejected: outside the state folder, unreadable, another architecture, or non-finite.
    """
    path = Path(path).resolve()
    if not path.is_relative_to(Path(cfg.state_dir).resolve()):
        raise IncomingModelRejected(f"incoming model {path} rejected: expected a file inside {cfg.state_dir}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IncomingModelRejected(f"incoming model {path.name} rejected: unreadable ({e})") from None
    try:
        state = verify_weights(data, cfg, ours)
    except ValueError as e:
        raise IncomingModelRejected(f"incoming model {path.name} rejected: {e}") from None
    return state, sha256_bytes(data)


def _start_state(cfg: SiteConfig, store: ModelStore, arch: str) -> tuple[dict, dict[str, Any]]:
    """Where a round starts: the working model, else the served model, else fresh weights."""
    served = store.served()
    if served is not None and served.arch != arch:
        raise StoreError(
            f"served v{served.version} was trained for another network (architecture {served.arch[:19]}...; "
            f"the config now gives {arch[:19]}...): restore the old network settings or use a new state_dir"
        )
    working = store.working()
    if working is not None:
        state, info = working
        if info.get("arch") == arch:
            return state, {"from": "working", "sha256": info["sha256"],
                           "rounds_unpublished": int(info.get("rounds_unpublished", 0))}
        logger.warning(f"gcml[{cfg.site}] working model is for another network; starting from the served model")
    if served is not None:
        return store.load(served.version), {"from": f"served v{served.version}", "rounds_unpublished": 0}
    with torch.random.fork_rng():  # sites with the same train.seed share an initialisation (so averages are meaningful)
        torch.manual_seed(cfg.train.seed)
        return build_network(cfg).state_dict(), {"from": "fresh", "rounds_unpublished": 0}


def run_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    epochs: int | None = None,
    incoming: str | Path | None = None,
    progress: Progress | None = None,
    origin: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """One round: train the working model, score every candidate per validation case, gate, publish.

    Without ``incoming`` the working model trains alone; the candidates are ``served`` and
    ``local``. With ``incoming`` it runs DCML with that model; the candidates are ``served``,
    ``dcml_local``, ``dcml_incoming`` and ``average`` (their parameter mean). The new working model
    is the published winner, or, when the gate keeps the served model, the trained candidate with the
    best paired validation gain (``local`` in a local round). A site's first model starts from the
    initialisation ``train.seed`` gives, the same at every site that keeps the default.

    Args:
        cfg: site config.
        store: the site's model store (and working model).
        cases: ``[{"id", "image", "label"}]`` with validated final labels.
        epochs: overrides ``cfg.train.epochs``.
        incoming: a peer model file (see :func:`load_incoming`).
        progress: called with ``{"epoch", "total_epochs", "loss", ...}`` after each epoch.
        origin: where ``incoming`` came from (``{"peer", "peer_site", "peer_version", ...}``); it goes
            into the published model's lineage.
        extra: more fields for the round record (trigger, gossip attempts, bytes pulled, ...).
        seed: the round's random seed (batches, crops, voxel sampling); default ``train.seed`` plus
            the number of decisions in the history, so successive rounds draw different batches.

    Returns:
        the round record (mode, split sizes, per-epoch losses, every candidate's per-case Dice, the
        gate's evidence, decision, served and working versions).

    Raises:
        NotEnoughLabels: fewer than ``validation.min_cases`` validation cases or no training case.
        IncomingModelRejected: the incoming model is unsafe or unusable.
    """
    epochs = epochs or cfg.train.epochs
    lap = _Laps()

    def report(p: dict[str, Any]) -> None:
        logger.info(f"gcml[{cfg.site}] epoch {p['epoch']}/{p['total_epochs']} loss {p['loss']:.4f}")
        if progress:
            progress(p)

    train_ids, val_ids = FixedSplit(cfg.state_dir / "split.json", cfg.validation).assign(c["id"] for c in cases)
    need = cfg.validation.min_cases
    if len(val_ids) < need or not train_ids:
        raise NotEnoughLabels(
            f"not enough labelled cases to train site {cfg.site}: {len(train_ids)} train and {len(val_ids)} "
            f"validation; need at least 1 train and {need} validation (label more cases and retry)"
        )
    by_id = {c["id"]: c for c in cases}
    device = _device(cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed = cfg.train.seed + len(store.history()) if seed is None else seed
    set_determinism(seed=seed)

    served = store.served()
    model = build_network(cfg)
    arch = arch_fingerprint(cfg, model.state_dict())
    peer = load_incoming(incoming, cfg, arch) if incoming is not None else None
    start, working = _start_state(cfg, store, arch)
    model.load_state_dict(start)
    model.to(device)
    names = list(cfg.labels)

    def files(ids):
        return [{"image": by_id[i]["image"], "label": by_id[i]["label"]} for i in ids]

    val_data = CacheDataset(files(val_ids), val_transforms(cfg), progress=False)
    train_data = CacheDataset(files(train_ids), train_transforms(cfg), progress=False)
    loader = DataLoader(train_data, batch_size=cfg.train.batch_size, shuffle=True, num_workers=0)

    def evaluate(m):
        v = cfg.validation
        return dice_per_case(m, val_data, names, cfg.roi_size, v.sw_batch_size, v.overlap, device)

    scores: dict[str, list[dict[str, float]]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    lap("load_s")
    if served is not None:
        probe = build_network(cfg).to(device)
        probe.load_state_dict(store.load(served.version))
        scores[SERVED] = evaluate(probe)
    lap("validate_s", peak="validate_served")

    t, wd = cfg.train, cfg.train.weight_decay
    if peer is None:
        mode, kept = "local", "local"
        losses = supervised_train(model, loader, epochs, t.lr, wd, device, report)
        states["local"] = model.state_dict()
    else:
        mode, kept = "dcml", "dcml_local"
        other = build_network(cfg)
        other.load_state_dict(peer[0])
        other.to(device)
        model, other, losses = dcml_train(model, other, loader, cfg.dcml, epochs, t.lr, wd, device, report, seed)
        states["dcml_local"] = model.state_dict()
        states["dcml_incoming"] = other.state_dict()
        states["average"] = average_state(states["dcml_local"], states["dcml_incoming"])
    lap("train_s")
    probe = build_network(cfg).to(device)
    for name, state in states.items():
        probe.load_state_dict(state)
        scores[name] = evaluate(probe)
    lap("validate_s", peak="validate_candidates")

    decision = select(scores, SERVED if served is not None else None, cfg.validation)
    if not cfg.validation.gate and not decision.publish:  # an ablation: serve the new working model unchecked
        decision = replace(decision, winner=kept, publish=True, reason=f"gate off: serving {kept} unchecked")
    n_train, n_val = len(train_ids), len(val_ids)
    record: dict[str, Any] = {
        "mode": mode,
        "epochs": epochs,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "more_labels_for_strict": 0 if decision.strict else labels_for_validation(
            cfg.validation, n_train, n_val, cfg.validation.strict_cases),
        "losses": losses,
        **decision.as_record(),
        **(extra or {}),
    }
    step: dict[str, Any] = {"site": cfg.site, "mode": mode, "candidate": decision.winner}
    if peer is not None:
        record["incoming"] = {"file": Path(incoming).name, "sha256": peer[1], **(origin or {})}
        step.update(origin or {"incoming_sha256": peer[1]})

    # The working model first: a crash before the publish then loses nothing (the next round gates it again).
    # A keep goes on from the candidate with the best paired validation gain (DCML-L unless another did better).
    # Both happen under the store's lock, and only if the served model is still the one this round was gated
    # against: an operator's rollback (or another publish) during the round wins, and the round is recorded
    # as superseded instead of undoing it.
    new_working = decision.winner if decision.publish else max(
        states, key=lambda k: (decision.evidence[k].gain, k == kept))
    unpublished = 0 if decision.publish else working["rounds_unpublished"] + 1
    base_version = served.version if served is not None else None
    with store.locked():
        now = store.served_version()
        if now != base_version:
            record.update(superseded_by=now, version=now, gate_reason=record.get("reason"), reason=(
                f"served model changed during the round (v{base_version} -> v{now}); nothing published, "
                "working model left as it is"))
            store.record("superseded", base_version=base_version, **record)
            logger.warning(f"gcml[{cfg.site}] round superseded: {record['reason']}")
            lap("publish_s")
            record["timings"], record["peak_rss_mb"] = lap.laps, lap.peak_mb
            return record
        info = store.save_working(states[new_working], arch=arch, candidate=new_working, mode=mode,
                                  round_id=(extra or {}).get("round_id"), base_version=base_version,
                                  rounds_unpublished=unpublished, val_dice=decision.scores[new_working])
        record["working"] = {"from": working["from"], "candidate": new_working, "sha256": info["sha256"],
                             "rounds_unpublished": unpublished}
        step["working_rounds"] = working["rounds_unpublished"]
        if decision.publish:
            parent_lineage = served.lineage if served is not None else []
            man = store.publish(
                states[decision.winner], arch=arch, val_dice=decision.scores[decision.winner], n_train=n_train,
                n_val=n_val, produced_by=_produced_by(mode, decision.winner, origin), site=cfg.site,
                lineage=[step, *parent_lineage][:LINEAGE_DEPTH], decision=record, expected_parent=base_version,
            )
            record["version"] = man.version
        else:
            store.record("keep", version=base_version, **record)
            record["version"] = base_version
    lap("publish_s")
    # in the returned record (train stats), not in the history line
    record["timings"], record["peak_rss_mb"] = lap.laps, lap.peak_mb
    logger.info(f"gcml[{cfg.site}] gate: {decision.reason}; seconds {lap.laps}")
    return record


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB; Linux reports ``ru_maxrss`` in kB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Laps:
    """Wall seconds per phase of a round: ``laps("train_s")`` adds the time since the previous call.

    ``peak_mb`` is the process's peak memory at the round's start (imports, app, datastore) and after
    each phase, in time order, so what a phase added is the step from the one before. A phase timed in
    two parts (validation: the served model before training, the candidates after) names each part's
    figure with ``peak``.
    """

    def __init__(self):
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {"before_round": _peak_rss_mb()}

    def __call__(self, name: str, peak: str | None = None) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.t, 3)
        # the kernel's figure can step back a little: it is the larger of a recorded high-water mark
        # and the current RSS, and the mark is updated lazily (seen in rounds forked by the warm trainer)
        self.peak_mb[peak or name.removesuffix("_s")] = max(_peak_rss_mb(), *self.peak_mb.values())
        self.t = now


def _produced_by(mode: str, winner: str, origin: dict[str, Any] | None) -> str:
    """``"local"``, ``"dcml:average"``, ``"gossip:site-b:dcml_local"``, ..."""
    if mode == "local":
        return "local"
    if origin and origin.get("peer"):
        return f"gossip:{origin['peer']}:{winner}"
    return f"{mode}:{winner}"


# ------------------------------------------------------------------------------------------ gossip
def _split_ok(cfg: SiteConfig, cases: list[dict[str, str]]) -> tuple[bool, int, int]:
    train_ids, val_ids = FixedSplit(cfg.state_dir / "split.json", cfg.validation).assign(c["id"] for c in cases)
    return len(val_ids) >= cfg.validation.min_cases and bool(train_ids), len(train_ids), len(val_ids)


def _pull(
    cfg: SiteConfig, order: list[str], book: PeerBook, state: GossipState, ours: str, validated_only: bool,
    connect: Connect,
) -> tuple[tuple[str, PeerManifest, Pulled, Path] | None, list[dict[str, Any]]]:
    """Ask partners in ``order`` until one gives a new model that passes every check (each try audited)."""
    urls = {p.name: p.url for p in cfg.gossip.peers}
    attempts: list[dict[str, Any]] = []
    audit = AuditLog(cfg.state_dir / "audit.jsonl", cfg.security.audit_max_bytes)
    for name in order:
        client = connect(name)
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
            os.replace(got.path, cached)  # the verified file itself: no second copy
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
        except Exception as e:  # whatever a partner sends must not end our round: refuse it, ask the next one
            reason = f"unexpected {type(e).__name__} while checking its answer: {clean(e, 200)}"
            book.rejected(name, reason, cfg.gossip)
            attempts.append({"peer": name, "outcome": "rejected", "reason": reason})
            logger.exception(f"gossip[{cfg.site}] {name}: {reason}")
        finally:
            client.close()
            book.save()
            last = attempts[-1] if attempts and attempts[-1]["peer"] == name else {}
            audit.write("pull", peer=name, url=urls.get(name, name), verdict=last.get("outcome", "error"),
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
    connect: Connect | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run one gossip round (docs/design.md, "The round"):

    1. order the partners (:func:`.gossip.peers.order_peers`), or take the order the request named;
    2. for each partner in turn: its manifest; skip it when its model is the one we already hold;
       fetch and verify; stop at the first usable model;
    3. :func:`run_round` with that model (DCML, gate, publish with lineage);
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
        peers: partners to ask, in this order, instead of the policy's order.
        epochs: DCML epochs (default ``gossip.epochs``).
        progress: per-epoch callback, as in :func:`run_round`.
        rng: random source for the partner order.
        connect: how to reach a partner by name (default: HTTP to its configured URL).
        seed: the training seed, as in :func:`run_round`.

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
    if peers:
        order, backed_off = list(peers), []
    else:
        order, backed_off = order_peers(names, book, cfg.gossip, rng or random.Random())
    if adopting:  # a model served without local validation comes only from partners the site chose to trust so
        order = [n for n in order if n in cfg.gossip.adopt_from]
    ours = our_arch(cfg)
    got, attempts = _pull(cfg, order, book, state, ours, adopting, connect or _http(cfg))
    for name in backed_off:
        attempts.append({"peer": name, "outcome": "backed_off", "reason": book.get(name).last_error})
    pulled_bytes = sum(a.get("bytes", 0) for a in attempts)
    # a partner that answered "unchanged" still serves the model we hold: train with it
    reuse = None if (got is not None or adopting) else next(
        (a["peer"] for a in attempts if a["outcome"] == "unchanged" and state.cached_model(a["peer"]).exists()), None)
    if got is None and reuse is None:
        reason = "no partner had a new usable model: " + "; ".join(
            f"{a['peer']} {a['outcome']}" + (f" ({a['reason']})" if a.get("reason") else "") for a in attempts
        ) if attempts else "no partner to ask"
        logger.info(f"gossip[{cfg.site}] {reason}")
        return store.record("gossip", outcome="no_model", reason=reason, attempts=attempts,
                            bytes_pulled=pulled_bytes, **base)
    if got is None:  # nothing new anywhere: our labels still train, with the partner model we hold (policy order)
        rec = book.get(reuse)
        origin = {"peer": reuse, "peer_site": rec.last_site, "peer_version": rec.last_version,
                  "peer_sha256": rec.last_sha256, "cached": True}
        gossip = {"peer": reuse, "peer_version": rec.last_version, "attempts": attempts, "bytes_pulled": pulled_bytes,
                  "cached": True}
        logger.info(f"gossip[{cfg.site}] no new partner model: DCML with the cached model of {reuse} v{rec.last_version}")
        return _train_with(cfg, store, cases, book, state, reuse, state.cached_model(reuse), origin, gossip,
                           base, epochs, progress, seed)

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

    return _train_with(cfg, store, cases, book, state, name, path, origin, gossip, base, epochs, progress, seed)


def _train_with(cfg, store, cases, book, state, name, path, origin, gossip, base, epochs, progress, seed):
    """DCML with partner ``name``'s model at ``path``, then credit the partner with what it brought."""
    state.learned(c["id"] for c in cases)  # only a round that trains learns from the pending labels
    record = run_round(cfg, store, cases, epochs=epochs or cfg.gossip.epochs, incoming=path, progress=progress,
                       origin=origin, extra={**base, "gossip": gossip}, seed=seed)
    book.credit(name, partner_gain(record), cfg.gossip)
    book.save()
    return record


def partner_gain(record: dict[str, Any]) -> float:
    """What a DCML round with a partner's model brought: the best candidate's mean paired validation gain.

    Negative when every candidate trained with that partner validated worse than the served model;
    0 when nothing was served before (no comparison).
    """
    gains = [e["gain"] for e in record.get("evidence", {}).values()]
    return max(gains, default=0.0)


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
    if event == "superseded" or record.get("superseded_by") is not None:
        return f"superseded: {record.get('reason', '')}"
    if event in ("gossip", "labels"):  # ended without training
        return f"{record.get('outcome', event)}: {record.get('reason', '')}{pulled}"
    if record.get("mode") == "adopt":
        return f"adopted v{record.get('version')} unvalidated from {g.get('peer')}{pulled}"
    how = f"gossip with {g['peer']} v{g.get('peer_version')}" if g else f"{record.get('mode')} round"
    if event == "publish" or record.get("published"):
        winner = record.get("winner")
        score = f"{winner} {means.get(winner, 0):.3f}" + (f" > served {means['served']:.3f}" if "served" in means else "")
        return f"published v{record.get('version')}: {how}, {score}" + (pulled if g else "")
    best = max((k for k in means if k != "served"), key=lambda k: means[k], default=None)
    score = f"best candidate {best} {means[best]:.3f}, not enough over served {means.get('served', 0):.3f}" if best else ""
    return f"kept v{record.get('version')}: {how}, {score}; training kept in the working model" + (pulled if g else "")
