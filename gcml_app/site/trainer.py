"""The ``gcml`` train task: MONAI Label's adapter for a round (:mod:`gcml_app.rounds.loop`).

Runs in MONAI Label's training subprocess. Progress goes to a small JSON file that ``stats()``
reads in the server process (Slicer polls it through ``/info``), and to the task log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from gcml_app.config import SiteConfig
from gcml_app.errors import LabelRejected
from gcml_app.federation.state import GossipState
from gcml_app.ml.cache import cache_root
from gcml_app.rounds import SyncRequest, gossip_round, labels_round, run_round
from gcml_app.site.labels import PassedLabels, conform_label
from gcml_app.site.process import STARTED_ENV, is_training_process, lower_priority, process_started
from gcml_app.store import ModelStore
from gcml_app.util.files import atomic_write
from gcml_app.util.jsonl import finite

__all__ = ["GCMLTrain", "labelled_cases", "unlabelled_images"]

logger = logging.getLogger(__name__)

def labelled_cases(datastore: Datastore, cfg: SiteConfig) -> list[dict[str, str]]:
    """Cases with a final label that fits its image and the task; others are skipped with a log line.

    A label is checked (:func:`~gcml_app.site.labels.conform_label`: geometry, values) once per
    content (:class:`~gcml_app.site.labels.PassedLabels`): uploads as they are stored, and here only
    files that did not pass before (placed in the datastore by other means, or replaced).

    Returns:
        ``[{"id", "image", "label"}]`` sorted by id.
    """
    passed = PassedLabels(cache_root(cfg), cfg.labels, cfg.other_values)
    cases = []
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL.value)):
        image = datastore.get_image_uri(image_id)
        label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL.value)
        try:
            if (image, label) not in passed:
                conform_label(image, label, cfg.labels, other_values=cfg.other_values)
                passed.add(image, label)
        except (LabelRejected, OSError) as e:
            logger.warning(f"skipping case {image_id}: its final label is unusable: {e}")
            continue
        cases.append({"id": image_id, "image": image, "label": label})
    passed.save(prune=True)  # it saw every final label: the memos keep only the files present
    return cases


def unlabelled_images(datastore: Datastore) -> list[dict[str, str]]:
    """The datastore's images without a final label, for DCML's unlabelled term: ``[{"id", "image"}]`` by id.

    Only images already on this server: a PACS datastore lists its cached series (``local_image_uri``)
    and never fetches one for this. A round draws a random subset (``dcml.unlabelled_max_cases``).
    """
    local = getattr(datastore, "local_image_uri", datastore.get_image_uri)
    out = []
    for image_id in sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value)):
        uri = local(image_id)
        if uri and os.path.isfile(uri):
            out.append({"id": image_id, "image": uri})
    return out


MODES = ("local", "dcml", "gossip", "labels")


class GCMLTrain(TrainTask):
    """MONAI Label adapter for a round (runs in MONAI Label's training subprocess).

    Request keys:

    - ``mode``: ``local`` (fine-tune alone), ``dcml`` (with ``incoming``: a model file inside the
      state folder), ``gossip`` (pull a partner's model, DCML, gate; see
      :func:`gcml_app.rounds.gossip.gossip_round`) or ``labels`` (the round new labels trigger);
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
        return finite(stats)  # /info is strict JSON: one diverged loss must not lock Slicer out

    def _write_stats(self, stats: dict[str, Any]) -> None:
        atomic_write(self.stats_path, json.dumps(finite(stats), allow_nan=False).encode())

    def _parse(self, request: dict[str, Any]) -> tuple[str, SyncRequest]:
        mode = request.get("mode", "local")
        if mode not in MODES:
            raise ValueError(f"train request 'mode': found {mode!r}; expected one of {list(MODES)}")
        if (mode == "dcml") != bool(request.get("incoming")):
            raise ValueError(
                f"train request: found mode={mode!r}, incoming={request.get('incoming')!r}; expected 'incoming' "
                "(a model file in the state folder) with mode 'dcml' and only then"
            )
        partners = [p.name for p in self.cfg.gossip.peers]
        return mode, SyncRequest.parse({k: request[k] for k in ("peers", "epochs") if k in request}, partners)

    def _round(self, mode: str, sync: SyncRequest, request: dict[str, Any], cases, unlabelled,
               progress) -> dict[str, Any]:
        round_id, epochs = request.get("round_id"), sync.epochs
        if mode == "gossip":
            return gossip_round(self.cfg, self.store, cases, trigger=str(request.get("trigger", "train")),
                                round_id=round_id, request=sync, progress=progress, unlabelled=unlabelled)
        if mode == "labels":
            return labels_round(self.cfg, self.store, cases, epochs=epochs, progress=progress, round_id=round_id,
                                unlabelled=unlabelled)
        extra = {"trigger": str(request.get("trigger", "train"))} | ({"round_id": round_id} if round_id else {})
        return run_round(self.cfg, self.store, cases, epochs=epochs or self.cfg.train.epochs,
                         incoming=request.get("incoming"), progress=progress, extra=extra, unlabelled=unlabelled)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        mode, sync = self._parse(request)
        epochs = sync.epochs
        if is_training_process():  # MONAI Label's training subprocess (already lowered when main.py was imported;
            # this covers a task object called there another way): yield the CPU to the server's inference
            # requests. Never the server itself, where a run_sync request runs.
            lower_priority(self.cfg.train.nice, self.cfg.train.sched_idle)
        start = time.time()
        # MONAI Label started the train subprocess -> here: interpreter or warm fork, imports, app, datastore
        startup = {"startup_s": round(start - process_started(), 3),
                   "start": "warm" if STARTED_ENV in os.environ else "cold"} if is_training_process() else {}
        served = self.store.served()
        base = {"start_ts": int(start), "mode": mode,
                "best_metric": round(served.mean_dice, 4) if served else 0.0}
        self._write_stats({**base, "epoch": 0, "total_epochs": epochs or 0})

        def progress(p: dict[str, Any]) -> None:
            self._write_stats({**base, **p})

        try:
            cases = labelled_cases(datastore, self.cfg)
            unlabelled = unlabelled_images(datastore) if self.cfg.dcml.lambda_unl > 0 and mode != "local" else []
            record = {**startup, **self._round(mode, sync, request, cases, unlabelled, progress)}
        except Exception as e:
            GossipState(self.cfg.state_dir).rearm()  # a failed round never swallows the new-labels trigger
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
