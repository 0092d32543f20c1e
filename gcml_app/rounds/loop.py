"""THE round: one loop with named phases, for every trigger and every method.

The ``gcml`` train task (in MONAI Label's training subprocess), the scheduler, ``POST /gcml/sync``,
``gcml sync`` and the simulator (``gcml simulate``, baselines included) all run rounds through
:func:`run_round`; only the candidate :class:`~gcml_app.rounds.producers.Producer` differs. See
docs/design.md, "The round".

Phases: **prepare** (the split, the working model, the validation and training data), **score the
served model**, **produce** candidates, **score** them case by case, **decide** (the gate) and
**commit** (the working model, then publish or keep, under the store's lock).

Working model and served model: every round starts from the site's *working* model (stored beside
the model store) and leaves its training there, whatever the gate decides; the gate only decides
what is *served*. The working model is written before the publish, so a crash between the two
loses neither: the next round goes on from the new working model and gates it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from monai.utils import set_determinism

from gcml_app.config import SiteConfig
from gcml_app.errors import NotEnoughLabels, RoundFailed
from gcml_app.federation.client import PeerManifest
from gcml_app.federation.task import task_of
from gcml_app.ml.bundle import is_bundle, load_backbone, read_bundle, read_weights, start_of
from gcml_app.ml.device import is_out_of_memory, precision, round_devices, sw_batch_size
from gcml_app.ml.gate import SERVED, GateDecision, select
from gcml_app.ml.network import arch_fingerprint, build_network, fit_state, other_layout_arch
from gcml_app.ml.split import FixedSplit, labels_for_validation
from gcml_app.rounds.compute import Laps, Phase, RoundWork, compute, rng_state
from gcml_app.rounds.lock import exclusive
from gcml_app.rounds.producers import DCML, PULLED, Local, Produced, Producer
from gcml_app.rounds.ranks import run_on_ranks
from gcml_app.rounds.record import RoundRecord, provenance
from gcml_app.store import Manifest, ModelStore, StoreError

__all__ = ["LINEAGE_DEPTH", "Progress", "adopt", "initial_state", "run_round", "split_of"]

logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
LINEAGE_DEPTH = 32  # lineage steps kept in a manifest, newest first


def split_of(cfg: SiteConfig, cases: list[dict[str, str]]) -> tuple[list[str], list[str], bool]:
    """The fixed split of ``cases``: ``(train ids, validation ids, whether a round can run on them)``."""
    train_ids, val_ids = FixedSplit(cfg.state_dir / "split.json", cfg.validation).assign(c["id"] for c in cases)
    return train_ids, val_ids, len(val_ids) >= cfg.validation.min_cases and bool(train_ids)


def _start_state(cfg: SiteConfig, store: ModelStore, arch: str) -> tuple[dict, dict[str, Any]]:
    """Where a round starts: the working model, else the served model, else the site's initial weights."""
    served = store.served()
    if served is not None and served.arch not in (arch, other_layout_arch(cfg)):
        raise StoreError(
            f"served v{served.version} was trained for another network (architecture {served.arch[:19]}...; "
            f"the config now gives {arch[:19]}...): restore the old network settings or use a new state_dir"
        )
    if served is not None and served.task and served.task.get("labels") != task_of(cfg)["labels"]:
        raise StoreError(f"served v{served.version} was trained for labels {served.task.get('labels')}; the config "
                         f"now gives {task_of(cfg)['labels']}: restore the old labels or use a new state_dir")
    working = store.working()
    if working is not None:
        state, info = working
        if info.get("arch") == arch:
            return state, {"from": "working", "sha256": info["sha256"], "start": info.get("start") or {},
                           "rounds_unpublished": int(info.get("rounds_unpublished", 0))}
        logger.warning(f"gcml[{cfg.site}] working model is for another network; starting from the served model")
    if served is not None:
        state = fit_state(store.load(served.version), cfg)  # from before interactive changed: exact
        return state, {"from": f"served v{served.version}", "start": served.start,
                                            "rounds_unpublished": 0}
    state, start = initial_state(cfg)
    return state, {"from": start["mode"], "start": start, "rounds_unpublished": 0}


def initial_state(cfg: SiteConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A site's first weights: ``network.init_from`` (a MONAI bundle or a checkpoint) in the backbone, and a
    fresh projection head; without it, the initialisation ``train.seed`` gives (the same at every site that
    keeps the default, so averages are meaningful).

    Returns:
        the state dict and where it came from (``{"mode": "fresh"}``, or the bundle's name, version and
        weights sha256 with the keys loaded and skipped: the lineage's first step).

    Raises:
        InitError: the bundle or checkpoint cannot be read, or does not fit (each key named).
    """
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        net = build_network(cfg)
    init = cfg.network.init_from
    if init is None:
        return net.state_dict(), {"mode": "fresh"}
    weights = read_bundle(init).weights if is_bundle(init) else init
    report = load_backbone(net.backbone, read_weights(weights), cfg.network.strict, str(init), len(cfg.guidance_names))
    start = {**start_of(init), **report.as_record()}
    logger.info(f"gcml[{cfg.site}] first model from {start.get('bundle') or start.get('checkpoint')}: "
                f"{report.loaded} weights loaded")
    return net.state_dict(), start


@exclusive
def run_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    producer: Producer | None = None,
    *,
    epochs: int | None = None,
    incoming: str | Path | None = None,
    origin: dict[str, Any] | None = None,
    progress: Progress | None = None,
    extra: dict[str, Any] | None = None,
    seed: int | None = None,
    unlabelled: list[dict[str, str]] | None = None,
) -> RoundRecord:
    """One round: prepare, score the served model, produce candidates, score them, decide, commit.

    The candidates come from ``producer`` (:mod:`gcml_app.rounds.producers`): by default the working
    model trains alone (``local``); with a partner's model, DCML (``dcml_local``, ``dcml_incoming`` and
    their parameter ``average``). Every candidate is scored per validation case beside the served
    model, and the gate (:func:`~gcml_app.ml.gate.select`) decides. The new working model is the
    published winner, or, when the gate keeps the served model, the candidate with the best paired
    validation gain. A site's first model starts from the initialisation ``train.seed`` gives, the
    same at every site that keeps the default.

    Args:
        cfg: site config.
        store: the site's model store (and working model).
        cases: ``[{"id", "image", "label"}]`` with validated final labels.
        producer: what trains the candidates (default :class:`~gcml_app.rounds.producers.Local`).
        epochs: overrides ``cfg.train.epochs``.
        incoming: shorthand for ``producer=DCML.from_file(incoming, cfg, origin=origin)``: a partner model
            file in the state folder (a train request's ``incoming``); checked before anything else runs.
        origin: where ``incoming`` came from (``{"peer", "peer_site", "peer_version", ...}``).
        progress: called with ``{"epoch", "total_epochs", "loss", ...}`` after each epoch.
        extra: more fields for the round record (trigger, round id, gossip attempts, ...).
        seed: the round's random seed (batches, crops, voxel sampling); default ``train.seed`` plus
            the number of decisions in the history, so successive rounds draw different batches.
        unlabelled: the site's images without a final label (``[{"id", "image"}]``): a producer that
            learns from them (DCML with ``dcml.lambda_unl``) trains on crops of a random subset.

    Returns:
        the round record (mode, split sizes, per-epoch losses, every candidate's per-case Dice, the
        gate's evidence, decision, served and working versions, timings and memory by phase, the case
        cache's hits and misses, the precision, and on a GPU its peak memory).

    Raises:
        NotEnoughLabels: fewer than ``validation.min_cases`` validation cases or no training case.
        IncomingModelRejected: the incoming model is unsafe or unusable.
        RoundFailed: the round stopped while preparing, training or validating (out of memory above
            all); it is recorded ``outcome: failed`` with what to lower, and nothing served changed.
    """
    epochs = epochs or cfg.train.epochs
    lap = Laps()

    def report(p: dict[str, Any]) -> None:
        logger.info(f"gcml[{cfg.site}] epoch {p['epoch']}/{p['total_epochs']} loss {p['loss']:.4f}")
        if progress:
            progress(p)

    # prepare
    train_ids, val_ids, enough = split_of(cfg, cases)
    if not enough:
        raise NotEnoughLabels(
            f"not enough labelled cases to train site {cfg.site}: {len(train_ids)} train and {len(val_ids)} "
            f"validation; need at least 1 train and {cfg.validation.min_cases} validation (label more cases and retry)"
        )
    devices = round_devices(cfg)
    if cfg.train.num_threads and len(devices) == 1:
        torch.set_num_threads(cfg.train.num_threads)
    seed = cfg.train.seed + len(store.history()) if seed is None else seed
    # the round's random draws start here: building networks (and fitting stored weights, which builds one)
    # draws from the seeded generator, and compute() goes on from this state, in this process or every rank
    set_determinism(seed=seed)
    served = store.served()
    arch = arch_fingerprint(cfg, build_network(cfg).state_dict())
    if incoming is not None:
        if producer is not None:
            raise ValueError("run_round: found both a producer and incoming; expected one of them "
                             "(incoming is DCML's shorthand)")
        producer = DCML.from_file(incoming, cfg, arch, origin)
    producer = producer or Local()
    phase = Phase()
    try:
        start, working = _start_state(cfg, store, arch)  # a bad init_from or another task: a failed round
        served_state = store.load(served.version) if served is not None else None  # compute() fits it
        work = RoundWork(cfg, cases, train_ids, val_ids, producer, start, served_state, epochs, seed, unlabelled or [],
                         rng_state())
        if len(devices) > 1 or cfg.train.distributed:
            out = run_on_ranks(work, devices, report)
            lap.adopt(out.timings, out.peak_mb)  # rank 0's phases; each rank's in out.ranks
        else:
            out = compute(work, devices[0], report, phase, lap)
    except Exception as e:
        raise _failed(cfg, store, served, e, getattr(e, "phase", phase.name), devices[0], extra) from e
    produced, scores, clicked = out.produced, out.scores, out.clicked

    # decide and commit
    decision = _decide(scores, served, cfg, produced.kept, clicked)
    record = {
        "mode": produced.mode, "epochs": epochs, "seed": seed, "n_train": len(train_ids), "n_val": len(val_ids),
        "more_labels_for_strict": 0 if decision.strict else labels_for_validation(
            cfg.validation, len(train_ids), len(val_ids), cfg.validation.strict_cases),
        "losses": produced.losses, **decision.as_record(), **(extra or {}),
    }
    if produced.choice is not None:  # dcml.choose: how the partner's model was used, and why
        record["arm"] = produced.choice
    if cfg.interactive.enabled and cfg.interactive.gate_clicks:
        record["click_dice"] = {"clicks": cfg.interactive.gate_clicks,
                                **{k: round(v, 6) for k, v in clicked.items() if v is not None}}
    if producer.incoming_sha256 is not None:
        record["incoming"] = {"file": producer.incoming_file, "sha256": producer.incoming_sha256,
                              **(producer.origin or {})}
    _commit(cfg, store, served, arch, working, produced, producer, decision, record)
    lap("publish_s")
    # in the returned record (train stats), not in the history line
    record["timings"], record["peak_rss_mb"] = lap.laps, lap.peak_mb
    record["cache"], record["precision"] = out.cache, out.precision
    if out.peak_gpu_mb is not None:
        record["peak_gpu_mb"] = out.peak_gpu_mb
    if out.ranks is not None:
        record["ranks"] = out.ranks
    logger.info(f"gcml[{cfg.site}] gate: {decision.reason}; seconds {lap.laps}")
    return record


def _failed(cfg: SiteConfig, store: ModelStore, served: Manifest | None, e: Exception, phase: str,
            device: torch.device, extra: dict[str, Any] | None) -> RoundFailed:
    """Record a round that stopped before its commit (``outcome: failed``) and say what to do about it.

    Nothing served or stored changed (the commit never ran). Out of memory names the settings that
    size a step: crops per case, crop size, batch, and validation's windows.
    """
    amp = precision(cfg, device)
    if is_out_of_memory(e):
        t = cfg.train
        what = "GPU" if device.type == "cuda" else "host"
        msg = (f"out of {what} memory while {phase} on {device} ({amp}): lower train.samples_per_case "
               f"({t.samples_per_case}), roi_size ({list(cfg.roi_size)}) or train.batch_size ({t.batch_size})"
               + (f", or validation.sw_batch_size ({sw_batch_size(cfg, device)})" if phase == "validate" else "")
               + (", or turn train.amp on" if not amp.enabled and device.type == "cuda" else ""))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        msg = f"round failed while {phase}: {type(e).__name__}: {e}"
    logger.error(f"gcml[{cfg.site}] {msg}")
    store.record("failed", **{**(extra or {}), "outcome": "failed", "phase": phase, "reason": msg,
                              "version": served.version if served is not None else None})
    return RoundFailed(msg, phase)


def _decide(scores: dict[str, list[dict[str, float]]], served: Manifest | None, cfg: SiteConfig,
            kept: str, clicked: dict[str, float | None] | None = None) -> GateDecision:
    """The gate; with ``validation.gate: false`` (an ablation) the new working model is served unchecked.

    The decision is on zero-click Dice, as without clicks: a served model never gets worse at auto-segmentation
    because it learned clicks. An interactive site also refuses a winner whose mean Dice after
    ``interactive.gate_clicks`` clicks drops by more than ``validation.max_label_drop`` (docs/design.md, "Clicks").
    """
    decision = select(scores, SERVED if served is not None else None, cfg.validation)
    clicked = clicked or {}
    before, after = clicked.get(SERVED), clicked.get(decision.winner)
    if decision.publish and before is not None and after is not None and after < before - cfg.validation.max_label_drop:
        decision = replace(decision, publish=False, reason=(
            f"{decision.winner} kept back: its Dice after {cfg.interactive.gate_clicks} clicks drops {before - after:.3f} "
            f"({before:.3f} -> {after:.3f}), more than validation.max_label_drop {cfg.validation.max_label_drop}"))
    if not cfg.validation.gate and not decision.publish:
        decision = replace(decision, winner=kept, publish=True, reason=f"gate off: serving {kept} unchecked")
    return decision


def _commit(cfg: SiteConfig, store: ModelStore, served: Manifest | None, arch: str, working: dict[str, Any],
            produced: Produced, producer: Producer, decision: GateDecision, record: dict[str, Any]) -> None:
    """Write the working model, then publish the winner or record the keep; fills in ``record``.

    The working model first: a crash before the publish then loses nothing (the next round gates it
    again). A keep goes on from the candidate with the best paired validation gain (``produced.kept``
    unless another did better). Both happen under the store's lock, and only if the served model is
    still the one this round was gated against: an operator's rollback (or another publish) during the
    round wins, and the round is recorded as superseded instead of undoing it.
    """
    states, mode, origin = produced.states, produced.mode, producer.origin
    if decision.publish and decision.winner == PULLED:  # the partner's model as pulled: served unchanged, adopted
        mode = "adopt"
    step: dict[str, Any] = {"site": cfg.site, "mode": mode, "candidate": decision.winner}
    # a partner the site trained alone beside is no parent; one whose model it serves as pulled is
    if producer.incoming_sha256 is not None and mode in ("dcml", "adopt"):
        step.update(origin or {"incoming_sha256": producer.incoming_sha256})
    new_working = decision.winner if decision.publish else max(
        states, key=lambda k: (decision.evidence[k].gain, k == produced.kept))
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
            return
        info = store.save_working(states[new_working], arch=arch, candidate=new_working, mode=mode,
                                  round_id=record.get("round_id"), base_version=base_version,
                                  rounds_unpublished=unpublished, val_dice=decision.scores[new_working],
                                  start=working.get("start") or {})
        record["working"] = {"from": working["from"], "candidate": new_working, "sha256": info["sha256"],
                             "rounds_unpublished": unpublished}
        step["working_rounds"] = working["rounds_unpublished"]
        if decision.publish:
            start = working.get("start") or {}
            parent_lineage = served.lineage if served is not None else ([start] if start.get("path") else [])
            how, made_by = provenance(mode, decision.winner, (origin or {}).get("peer"))
            man = store.publish(
                states[decision.winner], arch=arch, val_dice=decision.scores[decision.winner],
                n_train=record["n_train"], n_val=record["n_val"], produced_by=how, made_by=made_by, site=cfg.site,
                lineage=_lineage(step, parent_lineage), decision=record, expected_parent=base_version,
                start=start, task=task_of(cfg),
            )
            record["version"] = man.version
        else:
            store.record("keep", version=base_version, **record)
            record["version"] = base_version


def _lineage(step: dict[str, Any], parent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``step`` then the parent's lineage, at most :data:`LINEAGE_DEPTH` steps; the first step (where the
    site's weights started: a bundle or checkpoint) is kept however long the lineage grows."""
    steps = [step, *parent]
    if len(steps) > LINEAGE_DEPTH:
        root = steps[-1] if steps[-1].get("mode") == "init" else None
        steps = steps[:LINEAGE_DEPTH - 1] + [root] if root else steps[:LINEAGE_DEPTH]
    return steps


def adopt(cfg: SiteConfig, store: ModelStore, state: dict[str, torch.Tensor], man: PeerManifest, peer: str,
          origin: dict[str, Any], arch: str, n_val: int, extra: dict[str, Any]) -> RoundRecord:
    """Serve a trusted partner's validated model unchanged, at a site with too few labels to validate.

    The other way a model comes to be served (besides :func:`run_round`'s commit): recorded
    ``validated: false`` until local labels validate it (``gossip.adopt_when_unlabelled``).

    Args:
        extra: more fields for the history record (trigger, round id, gossip attempts).
    """
    how, made_by = provenance("adopt", "incoming", peer)
    published = store.publish(
        state, arch=arch, val_dice={}, n_train=0, n_val=n_val, produced_by=how, made_by=made_by,
        site=cfg.site, lineage=[{"site": cfg.site, "mode": "adopt", **origin}], validated=False, task=task_of(cfg),
        decision={**extra, "mode": "adopt",
                  "reason": f"too few labels to validate: adopted {peer} v{man.version} unvalidated"},
    )
    logger.info(f"gossip[{cfg.site}] adopted {peer} v{man.version} as v{published.version} (unvalidated)")
    return store.history()[-1]
