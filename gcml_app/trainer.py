"""The ``gcml`` train task: a local round (fine-tune, validate, gate, publish) on the site's final labels.

Runs in MONAI Label's training subprocess. Progress goes to a small JSON file that ``stats()``
reads in the server process (Slicer polls it through ``/info``), and to the task log.
"""

from __future__ import annotations

import json
import logging
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
from gcml_app.errors import NotEnoughLabels
from gcml_app.evaluate import dice_per_label, mean_dice
from gcml_app.gate import SERVED, select
from gcml_app.labels import LabelRejected, conform_label
from gcml_app.network import arch_fingerprint, build_network
from gcml_app.split import FixedSplit
from gcml_app.store import ModelStore, atomic_write
from gcml_app.transforms import train_transforms, val_transforms

__all__ = ["GCMLTrain", "labelled_cases", "run_local_round"]

logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


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


def run_local_round(
    cfg: SiteConfig,
    store: ModelStore,
    cases: list[dict[str, str]],
    epochs: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune the served model (or a fresh one) on the train split, validate, gate and publish.

    Args:
        cfg: site config.
        store: the site's model store.
        cases: ``[{"id", "image", "label"}]`` with validated final labels.
        epochs: overrides ``cfg.train.epochs``.
        progress: called with ``{"epoch", "total_epochs", "loss"}`` after each epoch.

    Returns:
        the round record (split sizes, losses, every candidate's Dice, the gate's decision, version).

    Raises:
        NotEnoughLabels: fewer than ``validation.min_cases`` validation cases or no training case.
    """
    epochs = epochs or cfg.train.epochs
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
    if served is not None:
        model.load_state_dict(store.load(served.version))
    model.to(device)
    arch = arch_fingerprint(cfg, model.state_dict())
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
    if served is not None:
        scores[SERVED] = evaluate(model)

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    losses = []
    for epoch in range(1, epochs + 1):
        model.train()
        total, n = 0.0, 0
        for batch in loader:
            x, y = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        losses.append(total / max(n, 1))
        logger.info(f"gcml[{cfg.site}] epoch {epoch}/{epochs} loss {losses[-1]:.4f}")
        if progress:
            progress({"epoch": epoch, "total_epochs": epochs, "loss": losses[-1]})

    scores["local"] = evaluate(model)
    decision = select(scores, served=SERVED if served is not None else None)
    record: dict[str, Any] = {
        "mode": "local",
        "epochs": epochs,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "losses": [round(x, 6) for x in losses],
        **decision.as_record(),
    }
    if decision.publish:
        man = store.publish(
            model.state_dict(), arch=arch, val_dice=scores["local"], n_train=len(train_ids), n_val=len(val_ids),
            produced_by="local", site=cfg.site, decision=record,
        )
        record["version"] = man.version
    else:
        store.record("keep", version=served.version if served else None, **record)
        record["version"] = served.version if served else None
    logger.info(f"gcml[{cfg.site}] gate: {decision.reason}")
    return record


class GCMLTrain(TrainTask):
    """MONAI Label adapter for :func:`run_local_round`; request key ``epochs`` overrides the config.

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
        return {"epochs": self.cfg.train.epochs}

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

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        epochs = request.get("epochs", self.cfg.train.epochs)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 10_000:
            raise ValueError(f"train request 'epochs': found {epochs!r}; expected an integer from 1 to 10000")
        start = time.time()
        served = self.store.served()
        base = {"start_ts": int(start), "best_metric": round(served.mean_dice, 4) if served else 0.0}
        self._write_stats({**base, "epoch": 0, "total_epochs": epochs})

        def progress(p: dict[str, Any]) -> None:
            self._write_stats({**base, **p})

        cases = labelled_cases(datastore, self.cfg)
        try:
            record = run_local_round(self.cfg, self.store, cases, epochs=epochs, progress=progress)
        except Exception as e:
            self._write_stats({**base, "epoch": 0, "total_epochs": epochs, "total_time": round(time.time() - start, 2),
                               "error": str(e)})
            raise
        after = self.store.served()
        self._write_stats({
            **base, "epoch": epochs, "total_epochs": epochs, "total_time": round(time.time() - start, 2),
            "loss": record["losses"][-1], "best_metric": round(after.mean_dice, 4) if after else 0.0,
            "last_round": record,
        })
        return record
