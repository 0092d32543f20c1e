"""Active learning at a site: scores for "Next Sample", kept current in the background (docs/design.md,
"Which case to label next").

- :class:`DisagreementScoring` and :class:`EpistemicScoring` are MONAI Label scoring methods (as
  upstream's ``EpistemicScoring``): they run in MONAI Label's scoring subprocess at the training
  priority, score the datastore's unlabelled images (a PACS site: its cached series) newest first, at
  most ``active.max_images`` a run, and skip images whose score is current.
- A score is current while the models it was computed from are: the served version and, for
  ``disagreement``, the sha256 of every cached partner model (:class:`~gcml_app.site.scorebook.Committee`). Anything else is
  stale: never shown, never used, scored again.
- Scores live in ``<state_dir>/active/scores.json`` (:class:`~gcml_app.site.scorebook.ScoreBook`), written by the scoring
  process alone under a lock, and appear in the datastore's image info (``GET /datastore/image/info``,
  what strategies read) through :meth:`~gcml_app.site.scorebook.ScoreBook.info_of`. They are not written into MONAI Label's
  datastore JSON: the server rewrites that file whole on every label save, and a subprocess holding
  an older copy would lose a label's record.
- :class:`DisagreementStrategy` (``disagreement``): the highest current score first, ties by random;
  MONAI Label's ``random`` when no image has a current score. MONAI Label's own ``Epistemic`` reads
  ``epistemic_entropy``.
- :class:`ScoringWatcher` (server process): every ``active.poll_s`` seconds, when some unlabelled image
  lacks a current score and no training or scoring task runs, it starts one scoring task.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.random import Random

from gcml_app.config import SiteConfig
from gcml_app.ml.acquisition import competence, disagreement, draw_proportional, epistemic_entropy, soft_predict
from gcml_app.ml.device import precision, round_devices, sw_batch_size
from gcml_app.ml.distributed import barrier, gather_cases, rank, share
from gcml_app.ml.transforms import image_transforms, val_transforms
from gcml_app.rounds.ranks import launch
from gcml_app.site.scorebook import DISAGREEMENT_KEY, Committee, ScoreBook, candidates, committee, load_models, scorable
from gcml_app.site.process import is_background_process, lower_priority
from gcml_app.store import ModelStore
from gcml_app.util.jsonl import clean

__all__ = ["DisagreementScoring", "DisagreementStrategy", "EpistemicScoring", "ScoringWatcher"]

logger = logging.getLogger(__name__)

METHODS = ("disagreement", "epistemic")


# ---------------------------------------------------------------------------------------- scoring methods
class _Scoring(ScoringMethod):
    """One scoring run of ``method`` (see the module docstring); subclasses score one image.

    Args:
        ranks: with ``train.gpus``, score on one rank per device (:func:`~gcml_app.rounds.ranks.launch`); false in
            the server's own process, whose threads a fork would copy mid-work (a ``run_sync`` request runs there).
    """

    method = ""

    def __init__(self, cfg: SiteConfig, store: ModelStore, description: str, ranks: bool = True):
        super().__init__(description)
        self.cfg, self.store, self.ranks = cfg, store, ranks
        self.book = ScoreBook(cfg.state_dir)
        self.device = torch.device("cpu")  # where this process scores: set by each run (or each rank)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "max_images": self.cfg.active.max_images}

    def _score(self, models, image: torch.Tensor, com: Committee) -> dict[str, Any]:
        """One image's record (``score`` and its parts) from ``models`` (:func:`load_models`)."""
        raise NotImplementedError

    def _inputs(self, datastore: Datastore) -> Any:
        """What :meth:`_prepare` reads from the datastore, as plain data a rank can be given (default: nothing)."""
        return None

    def _prepare(self, models, com: Committee, inputs: Any) -> None:
        """Anything a run needs once before its images (default: nothing); ``inputs`` from :meth:`_inputs`."""

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        """Score up to ``max_images`` unlabelled images whose score is stale; returns the run's summary."""
        if is_background_process():  # MONAI Label's scoring subprocess: behind inference (never the server
            # itself, which runs a scoring request with run_sync=true)
            lower_priority(self.cfg.train.nice, self.cfg.train.sched_idle)
            if self.cfg.train.num_threads:
                torch.set_num_threads(self.cfg.train.num_threads)
        t0 = time.time()
        com = committee(self.cfg, self.store)
        cap = request.get("max_images") or self.cfg.active.max_images
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"scoring request 'max_images': found {clean(cap, 40)!r}; expected a positive integer")
        pool = candidates(datastore)
        stale = self.book.stale(self.method, com, [i for i, _ in pool])
        todo = stale[:cap]
        summary: dict[str, Any] = {"method": self.method, "started": round(t0, 3), "unlabelled": len(pool),
                                   "served_version": com.served, "partners": sorted(com.partners),
                                   "scored": 0, "failed": 0, "skipped_current": len(pool) - len(stale)}
        if com.served is None or not todo:
            summary["reason"] = "no served model yet" if com.served is None else "every score is current"
            return self._finish(summary, pool, t0)
        uris, inputs, devices = dict(pool), self._inputs(datastore), round_devices(self.cfg)
        if not self.ranks:  # never fork ranks from the server's own process (a run_sync request runs there)
            devices = devices[:1]
        if len(devices) > 1:  # train.gpus: the images split over the devices, one rank each
            got, started = launch(_scoring_rank, (self, todo, uris, com, inputs), devices, self.cfg,
                                  lambda out: json.loads((out / "scoring.json").read_text()))
            summary.update(got, ranks={"world": len(devices), **started})
        else:
            summary.update(self._run(devices[0], todo, uris, com, inputs))
        return self._finish(summary, pool, t0)

    def _run(self, device: torch.device, todo: list[str], uris: dict[str, str], com: Committee,
             inputs: Any) -> dict[str, Any]:
        """Load the models on ``device``, prepare, score this rank's share of ``todo`` (all of it on one device);
        the run's counts over every rank. Rank 0 prepares first (a partner's competence is computed once and kept
        in the book); the others then read it."""
        self.device = device
        models = load_models(self.cfg, self.store, com, device)
        if rank() == 0:
            self._prepare(models, com, inputs)
        barrier()
        if rank() != 0:
            self._prepare(models, com, inputs)  # what rank 0 computed, from the book
        counts = gather_cases([self._score_images(models, share(todo), uris, com)])
        return {"partners_left_out": models[2], "scored": sum(c[0] for c in counts),
                "failed": sum(c[1] for c in counts)}

    def _score_images(self, models, todo: list[str], uris: dict[str, str], com: Committee) -> tuple[int, int]:
        """Score each image of ``todo`` and write its record into the book at once; ``(scored, failed)``."""
        load = Compose(image_transforms(self.cfg))
        scored = failed = 0
        for image_id in todo:
            t1 = time.time()
            try:
                image = load({"image": uris[image_id]})["image"]
                rec = {**self._score(models, image.as_tensor() if hasattr(image, "as_tensor") else image, com),
                       "served_version": com.served}
                scored += 1
            except Exception as e:  # an unreadable image is recorded, not retried, until the models change
                rec = {"error": clean(f"{type(e).__name__}: {e}", 300)}
                failed += 1
                logger.warning(f"scoring {self.method}: {image_id}: {rec['error']}")
            rec.update(key=com.key(self.method), ts=round(time.time(), 3), seconds=round(time.time() - t1, 3))
            with self.book.edit() as book:
                book["images"].setdefault(image_id, {})[self.method] = rec
        return scored, failed

    def _finish(self, summary: dict[str, Any], pool: list[tuple[str, str]], t0: float) -> dict[str, Any]:
        unlabelled = {i for i, _ in pool}
        summary["seconds"] = round(time.time() - t0, 3)
        with self.book.edit() as book:
            # a score is for an unlabelled image: one labelled (or removed) since loses it
            book["images"] = {i: s for i, s in book["images"].items() if i in unlabelled}
            book["runs"][self.method] = summary
        logger.info(f"scoring {self.method}: {summary}")
        return summary

    def _predict(self, net, image):
        c, device = self.cfg, self.device
        return soft_predict(net, image, c.roi_size, sw_batch_size(c, device), c.validation.overlap, device,
                            precision(c, device), c.out_channels)


class DisagreementScoring(_Scoring):
    """``disagreement``: the served model against every cached partner model (:func:`~gcml_app.ml.acquisition.disagreement`)."""

    method = "disagreement"

    def __init__(self, cfg: SiteConfig, store: ModelStore, ranks: bool = True):
        super().__init__(cfg, store, "Where the served model and the partners' models disagree (GCML)", ranks)

    competence: dict[str, float] = {}

    def _inputs(self, datastore):
        """The site's validation cases (the gate's held-out labels): ``[{"id", "image", "label"}]``."""
        from gcml_app.ml.split import FixedSplit
        from gcml_app.site.trainer import labelled_cases

        split = FixedSplit(self.cfg.state_dir / "split.json", self.cfg.validation).assigned()
        return [c for c in labelled_cases(datastore, self.cfg) if split.get(c["id"]) == "val"]

    def _prepare(self, models, com, val):
        """Each partner's competence on this site's validation cases ``val``, computed once per partner model
        and validation set and kept in the score book."""
        val_key = ",".join(sorted(c["id"] for c in val))
        known = self.book.read().get("competence") or {}
        todo = {n: net for n, net in models[1].items()
                if (known.get(n) or {}).get("key") != f"{com.partners[n]['sha256']}|{val_key}"}
        if todo:
            load = val_transforms(self.cfg)
            c, device = self.cfg, self.device
            cases = ({"image": torch.as_tensor(x["image"]), "label": torch.as_tensor(x["label"])}
                     for x in (load({"image": v["image"], "label": v["label"]}) for v in val))
            got = competence(todo, cases, len(c.labels), c.roi_size, sw_batch_size(c, device), c.validation.overlap,
                             device, precision(c, device))
            with self.book.edit() as book:
                comp = book.setdefault("competence", {})
                for n, value in got.items():
                    comp[n] = {"dice": value, "n_val": len(val), "key": f"{com.partners[n]['sha256']}|{val_key}"}
            known = self.book.read().get("competence") or {}
        self.competence = {n: known[n]["dice"] for n in models[1]}

    def _score(self, models, image, com):
        served, partners, _ = models
        p = self._predict(served, image)
        d = disagreement(p, ((n, self._predict(net, image)) for n, net in partners.items()), self.competence)
        return {"score": d.score, "partners": d.partners, "entropy": d.entropy, "foreground": d.foreground,
                "competence": {n: self.competence.get(n, 1.0) for n in partners},
                "partner_versions": {n: com.partners[n]["version"] for n in partners}}


class EpistemicScoring(_Scoring):
    """``epistemic``: MONAI Label's MC-dropout entropy of the served model, for a site without partners."""

    method = "epistemic"

    def __init__(self, cfg: SiteConfig, store: ModelStore, ranks: bool = True):
        super().__init__(cfg, store, "Epistemic uncertainty of the served model by MC dropout (MONAI Label's score)",
                         ranks)

    def _score(self, models, image, com):
        c, device = self.cfg, self.device
        score = epistemic_entropy(models[0], image, c.roi_size, c.active.mc_samples, c.active.mc_dropout,
                                  sw_batch_size(c, device), c.validation.overlap, device, precision(c, device),
                                  c.out_channels)
        return {"score": score, "samples": c.active.mc_samples}


def _scoring_rank(rank: int, device: torch.device, out: Path, store, post, scoring: _Scoring, todo: list[str],
                  uris: dict[str, str], com: Committee, inputs: Any) -> None:
    """One rank of a scoring run on several devices (:meth:`_Scoring._run`); rank 0 writes the run's counts for the
    process that started the ranks."""
    store.set(f"phase/{rank}", "score")
    got = scoring._run(device, todo, uris, com, inputs)
    if rank == 0:
        (out / "scoring.json").write_text(json.dumps(got))


# ---------------------------------------------------------------------------------------- the strategy
class DisagreementStrategy(Strategy):
    """``disagreement``: the unlabelled image with the highest current score, ties by random (or, with
    ``active.selection: proportional``, one drawn with probability proportional to its score); an image
    this strategy handed out within ``active.reserve_s`` waits; with no current score, MONAI Label's ``random``."""

    def __init__(self, cfg: SiteConfig, store: ModelStore):
        super().__init__("Where the site's model and its partners' models disagree most (GCML)")
        self.cfg, self.store = cfg, store
        self.book = ScoreBook(cfg.state_dir)
        self.rng = random.Random()

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        name = request.get("strategy", "disagreement")
        now = time.time()
        com = committee(self.cfg, self.store)
        scores = self.book.current("disagreement", com)

        def free(i: str) -> bool:
            served_ts = ((datastore.get_image_info(i).get("strategy") or {}).get(name) or {}).get("ts", 0)
            return now - served_ts >= self.cfg.active.reserve_s

        scored = [i for i in images if i in scores and free(i)]
        if not scored:
            res = Random()(request, datastore) or {}
            return {**res, "gcml_fallback": "random: no unlabelled image has a current disagreement score"}
        if self.cfg.active.selection == "proportional":
            pick = draw_proportional(sorted(scored), [scores[i]["score"] for i in sorted(scored)], self.rng)
        else:
            best = max(scores[i]["score"] for i in scored)
            pick = self.rng.choice(sorted(i for i in scored if scores[i]["score"] == best))
        # as in the image's info, which MONAI Label's /activelearning answer carries too
        return {"id": pick, DISAGREEMENT_KEY: {k: v for k, v in scores[pick].items() if k != "key"}}


# ---------------------------------------------------------------------------------------- the watcher
class ScoringWatcher(threading.Thread):
    """Server process: starts a scoring task when an unlabelled image lacks a current score and nothing
    trains or scores (the round's models are the ones to score with, and inference keeps the CPU).

    Args:
        app: the :class:`~gcml_app.main.GCMLApp` (its datastore, store and task queue).
    """

    def __init__(self, app):
        super().__init__(name="gcml-scoring-watcher", daemon=True)
        self.app = app
        self.stop_event = threading.Event()
        self.last: dict[str, Any] = {}

    def due(self) -> list[str]:
        """Methods with stale scores for some unlabelled image (none while nothing is served)."""
        cfg = self.app.cfg
        com = committee(cfg, self.app.store)
        if com.served is None:
            return []
        ids = list(scorable(self.app.datastore()))
        book = ScoreBook(cfg.state_dir)
        return [m for m in cfg.active.methods if book.stale(m, com, ids)]

    def tick(self) -> str:
        """One look: start one scoring task if due; returns what it did."""
        from monailabel.utils.async_tasks.task import AsyncTask
        from monailabel.utils.async_tasks.utils import processes, tasks

        # a task submitted a moment ago is not a process yet: its status says it is coming
        scoring = bool(processes("scoring")) or any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("scoring"))
        if self.app.training_busy() or scoring:
            return "busy"
        due = self.due()
        if not due:
            return "current"
        task, why = AsyncTask.run("scoring", request={"method": due[0]}, enqueue=False)
        self.last = {"ts": time.time(), "method": due[0], "task": task and task.get("id"), "why": why or ""}
        return f"started {due[0]}" if task else f"not started: {why}"

    def run(self) -> None:
        while not self.stop_event.wait(self.app.cfg.active.poll_s):
            try:
                self.tick()
            except Exception:  # the watcher must outlive any one look
                logger.exception("scoring watcher")
