"""The ``gcml`` train task: a round (local fine-tune or DCML with an incoming model, validate, gate, publish).

Runs in MONAI Label's training subprocess. Progress goes to a small JSON file that ``stats()``
reads in the server process (Slicer polls it through ``/info``), and to the task log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from gcml_app.config import SiteConfig
from gcml_app.dcml import average_state, dcml_train, supervised_step
from gcml_app.errors import IncomingModelRejected, NotEnoughLabels
from gcml_app.evaluate import dice_per_label
from gcml_app.gate import SERVED, select
from gcml_app.gossip.payload import verify_weights
from gcml_app.labels import LabelRejected, conform_label
from gcml_app.network import arch_fingerprint, build_network
from gcml_app.split import FixedSplit
from gcml_app.store import ModelStore, StoreError, atomic_write, sha256_bytes
from gcml_app.transforms import train_transforms, val_transforms

__all__ = ["GCMLTrain", "labelled_cases", "load_incoming", "run_round", "train_supervised"]

logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
LINEAGE_DEPTH = 32  # lineage steps kept in a manifest, newest first


def labelled_cases(datastore: Datastore, cfg: SiteConfig) -> list[dict[str, str]]:
    """Cases with a final label that fits its image and the task; others are skipped with a log line.

    Returns:
        ``[{"id", "image", "label"}]`` sorted by id.
    """
    cases = []
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL.value)):
        image = datastore.get_image_uri(image_id)
        label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL.value)
        try:
            conform_label(image, label, cfg.labels)
        except LabelRejected as e:
            logger.warning(f"skipping case {image_id}: its final label is unusable: {e}")
            continue
        cases.append({"id": image_id, "image": image, "label": label})
    return cases


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


def run_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    epochs: int | None = None,
    incoming: str | Path | None = None,
    progress: Progress | None = None,
    origin: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One round: train, score every candidate on the validation split, gate, publish the winner.

    Without ``incoming`` this fine-tunes the served model (or a fresh one) alone; the candidates are
    ``served`` and ``local``. With ``incoming`` it runs DCML with that model; the candidates are
    ``served``, ``dcml_local``, ``dcml_incoming`` and ``average`` (their parameter mean).

    Args:
        cfg: site config.
        store: the site's model store.
        cases: ``[{"id", "image", "label"}]`` with validated final labels.
        epochs: overrides ``cfg.train.epochs``.
        incoming: a peer model file (see :func:`load_incoming`).
        progress: called with ``{"epoch", "total_epochs", "loss", ...}`` after each epoch.
        origin: where ``incoming`` came from (``{"peer", "peer_site", "peer_version", ...}``); it goes
            into the published model's lineage.
        extra: more fields for the round record (trigger, gossip attempts, bytes pulled, ...).

    Returns:
        the round record (mode, split sizes, per-epoch losses, every candidate's Dice, decision, version).

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
    set_determinism(seed=cfg.train.seed)

    served = store.served()
    model = build_network(cfg)
    arch = arch_fingerprint(cfg, model.state_dict())
    peer = load_incoming(incoming, cfg, arch) if incoming is not None else None
    if served is not None:
        if served.arch != arch:
            raise StoreError(
                f"served v{served.version} was trained for another network (architecture {served.arch[:19]}...; "
                f"the config now gives {arch[:19]}...): restore the old network settings or use a new state_dir"
            )
        model.load_state_dict(store.load(served.version))
    model.to(device)
    names = list(cfg.labels)

    def files(ids):
        return [{"image": by_id[i]["image"], "label": by_id[i]["label"]} for i in ids]

    val_data = CacheDataset(files(val_ids), val_transforms(cfg), progress=False)
    train_data = CacheDataset(files(train_ids), train_transforms(cfg), progress=False)
    loader = DataLoader(train_data, batch_size=cfg.train.batch_size, shuffle=True, num_workers=0)

    def evaluate(m):
        v = cfg.validation
        return dice_per_label(m, val_data, names, cfg.roi_size, v.sw_batch_size, v.overlap, device)

    scores: dict[str, dict[str, float]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    lap("load_s")
    if served is not None:
        scores[SERVED] = evaluate(model)
    lap("validate_s")

    if peer is None:
        mode = "local"
        losses = train_supervised(model, loader, cfg, epochs, device, report)
        states["local"] = model.state_dict()
    else:
        mode = "dcml"
        other = build_network(cfg)
        other.load_state_dict(peer[0])
        other.to(device)
        model, other, losses = dcml_train(model, other, loader, cfg.dcml, epochs, cfg.train.lr,
                                          cfg.train.weight_decay, device, report)
        states["dcml_local"] = model.state_dict()
        states["dcml_incoming"] = other.state_dict()
        states["average"] = average_state(states["dcml_local"], states["dcml_incoming"])
    lap("train_s")
    probe = build_network(cfg).to(device)
    for name, state in states.items():
        probe.load_state_dict(state)
        scores[name] = evaluate(probe)
    lap("validate_s")

    decision = select(scores, served=SERVED if served is not None else None)
    record: dict[str, Any] = {
        "mode": mode,
        "epochs": epochs,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "losses": losses,
        **decision.as_record(),
        **(extra or {}),
    }
    step: dict[str, Any] = {"site": cfg.site, "mode": mode, "candidate": decision.winner}
    if peer is not None:
        record["incoming"] = {"file": Path(incoming).name, "sha256": peer[1], **(origin or {})}
        step.update(origin or {"incoming_sha256": peer[1]})
    if decision.publish:
        parent_lineage = served.lineage if served is not None else []
        man = store.publish(
            states[decision.winner], arch=arch, val_dice=scores[decision.winner], n_train=len(train_ids),
            n_val=len(val_ids), produced_by=_produced_by(mode, decision.winner, origin), site=cfg.site,
            lineage=[step, *parent_lineage][:LINEAGE_DEPTH], decision=record,
        )
        record["version"] = man.version
    else:
        store.record("keep", version=served.version if served else None, **record)
        record["version"] = served.version if served else None
    lap("publish_s")
    record["timings"] = lap.laps  # in the returned record (train stats), not in the history line
    logger.info(f"gcml[{cfg.site}] gate: {decision.reason}; seconds {lap.laps}")
    return record


class _Laps:
    """Wall seconds per phase of a round: ``laps("train_s")`` adds the time since the previous call."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.t, 3)
        self.t = now


def _produced_by(mode: str, winner: str, origin: dict[str, Any] | None) -> str:
    """``"local"``, ``"dcml:average"``, ``"gossip:site-b:dcml_local"``, ..."""
    if mode == "local":
        return "local"
    if origin and origin.get("peer"):
        return f"gossip:{origin['peer']}:{winner}"
    return f"{mode}:{winner}"


def train_supervised(model, loader, cfg: SiteConfig, epochs: int, device, progress: Progress | None) -> list[dict]:
    """Plain DiceCE fine-tuning; returns ``[{"seg_l": mean loss}]`` per epoch."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    losses = []
    for epoch in range(1, epochs + 1):
        model.train()
        steps = [supervised_step(model, opt, b["image"].to(device), b["label"].to(device), loss_fn) for b in loader]
        losses.append({"seg_l": sum(steps) / max(len(steps), 1)})
        if progress:
            progress({"epoch": epoch, "total_epochs": epochs, "loss": losses[-1]["seg_l"]})
    return losses


MODES = ("local", "dcml", "gossip", "labels")


class GCMLTrain(TrainTask):
    """MONAI Label adapter for a round (runs in MONAI Label's training subprocess).

    Request keys:

    - ``mode``: ``local`` (fine-tune alone), ``dcml`` (with ``incoming``: a model file inside the
      state folder), ``gossip`` (pull a partner's model, DCML, gate; see
      :func:`gcml_app.gossip.round.gossip_round`) or ``labels`` (the round new labels trigger);
    - ``epochs``: overrides the configured epochs of that mode;
    - ``peers``: for ``gossip``, partners to ask in this order;
    - ``trigger``, ``round_id``: kept in the round record.

    Args:
        cfg: site config.
        store: the site's model store.
    """

    def __init__(self, cfg: SiteConfig, store: ModelStore):
        super().__init__(f"GCML round for site {cfg.site}: fine-tune, validate on held-out labels, publish if better")
        self.cfg = cfg
        self.store = store
        self.stats_path = Path(cfg.state_dir) / "train_stats.json"

    def config(self) -> dict[str, Any]:
        return {"epochs": self.cfg.train.epochs, "mode": "local"}

    def stats(self) -> dict[str, Any]:
        """Read by the server (``/info``); written only by the training subprocess."""
        try:
            stats = json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            stats = {}
        served = self.store.served()
        stats["served_version"] = served.version if served else None
        stats.setdefault("best_metric", round(served.mean_dice, 4) if served else 0.0)
        return stats

    def _write_stats(self, stats: dict[str, Any]) -> None:
        atomic_write(self.stats_path, json.dumps(stats).encode())

    def _parse(self, request: dict[str, Any]) -> tuple[str, int | None]:
        mode = request.get("mode", "local")
        if mode not in MODES:
            raise ValueError(f"train request 'mode': found {mode!r}; expected one of {list(MODES)}")
        if (mode == "dcml") != bool(request.get("incoming")):
            raise ValueError(
                f"train request: found mode={mode!r}, incoming={request.get('incoming')!r}; expected 'incoming' "
                "(a model file in the state folder) with mode 'dcml' and only then"
            )
        epochs = request.get("epochs")
        if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 10_000):
            raise ValueError(f"train request 'epochs': found {epochs!r}; expected an integer from 1 to 10000")
        peers = request.get("peers")
        if peers is not None and (not isinstance(peers, list) or not all(isinstance(p, str) for p in peers)):
            raise ValueError(f"train request 'peers': found {peers!r}; expected a list of partner names")
        return mode, epochs

    def _round(self, mode: str, epochs: int | None, request: dict[str, Any], cases, progress) -> dict[str, Any]:
        from gcml_app.gossip.round import gossip_round, labels_round  # the gossip layer imports this module

        round_id = request.get("round_id")
        if mode == "gossip":
            return gossip_round(self.cfg, self.store, cases, trigger=str(request.get("trigger", "train")),
                                round_id=round_id, peers=request.get("peers"), epochs=epochs, progress=progress)
        if mode == "labels":
            return labels_round(self.cfg, self.store, cases, epochs=epochs, progress=progress, round_id=round_id)
        extra = {"trigger": str(request.get("trigger", "train"))} | ({"round_id": round_id} if round_id else {})
        return run_round(self.cfg, self.store, cases, epochs=epochs or self.cfg.train.epochs,
                         incoming=request.get("incoming"), progress=progress, extra=extra)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        mode, epochs = self._parse(request)
        # This is MONAI Label's training subprocess: yield the CPU to the server's inference requests.
        lower = self.cfg.train.nice - os.nice(0)
        if lower > 0:
            os.nice(lower)
        start = time.time()
        served = self.store.served()
        base = {"start_ts": int(start), "mode": mode,
                "best_metric": round(served.mean_dice, 4) if served else 0.0}
        self._write_stats({**base, "epoch": 0, "total_epochs": epochs or 0})

        def progress(p: dict[str, Any]) -> None:
            self._write_stats({**base, **p})

        cases = labelled_cases(datastore, self.cfg)
        try:
            record = self._round(mode, epochs, request, cases, progress)
        except Exception as e:
            self._write_stats({**base, "epoch": 0, "total_epochs": epochs or 0,
                               "total_time": round(time.time() - start, 2), "error": str(e)})
            raise
        after = self.store.served()
        losses = record.get("losses") or [{}]
        done = record.get("epochs", 0)
        self._write_stats({
            **base, "epoch": done, "total_epochs": done, "total_time": round(time.time() - start, 2),
            "loss": losses[-1].get("seg_l"), "best_metric": round(after.mean_dice, 4) if after else 0.0,
            "last_round": record,
        })
        return record
