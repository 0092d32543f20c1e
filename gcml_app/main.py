"""The GCML MONAI Label app: wires config, datastore, model store, infer and train tasks together.

Start it with::

    monailabel start_server --app gcml_app --studies DIR --conf gcml_config site.yaml \
        --host 127.0.0.1 --uvicorn_app gcml_app.site.server:app
"""

from __future__ import annotations

import gcml_app.site.train_entry  # first: a training subprocess hands its round to the warm trainer or lowers its priority

# isort: split
import atexit
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import gcml_app
from gcml_app.config import CONFIG_ENV, load_config
from gcml_app.errors import ImageRejected
from gcml_app.federation.audit import AuditLog
from gcml_app.federation.peers import PeerBook
from gcml_app.federation.scheduler import Scheduler
from gcml_app.federation.state import GossipState
from gcml_app.ml.split import FixedSplit, labels_for_validation
from gcml_app.ml.cache import cache_root
from gcml_app.site.datastore import GCMLDatastore
from gcml_app.site.edit import GCMLEditInfer, PredictionCache, image_cache, parse_clicks, warm_writer
from gcml_app.site.infer import GCMLSegInfer
from gcml_app.site.disk import disk_usage, sweep_at_start
from gcml_app.site.process import freeze_startup, is_background_process
from gcml_app.site.dicomweb import is_pacs_url, pacs_client
from gcml_app.site.pacs import PacsDatastore
from gcml_app.site.scorebook import ScoreBook, committee, scorable
from gcml_app.site.scoring import DisagreementScoring, DisagreementStrategy, EpistemicScoring, ScoringWatcher
from gcml_app.site.scoring import METHODS as SCORING_METHODS
from gcml_app.site.trainer import GCMLTrain
from gcml_app.site.warm import WarmTrainer
from gcml_app.store import ModelStore
from gcml_app.util.jsonl import clean

logger = logging.getLogger(__name__)

# Infer request parameters that make MONAI Label write to the datastore.
_STORAGE_PARAMS = ("save_label", "label_tag")


class GCMLApp(MONAILabelApp):
    """One site's app: serves its personalized model, trains it through the gate, gossips with partners.

    In the server process it also starts the gossip scheduler, notes new final labels (and queues
    a round at ``finetune.min_new_labels``), and answers ``/gcml/status``. Every round runs as the
    ``gcml`` train task in MONAI Label's training subprocess.

    Args:
        app_dir: this package's folder (MONAI Label's ``--app``).
        studies: the site's studies folder.
        conf: MONAI Label ``--conf`` pairs; ``gcml_config`` is the site YAML (else env ``GCML_CONFIG``).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]):
        path = conf.get("gcml_config") or os.environ.get(CONFIG_ENV)
        self.cfg = load_config(path)  # without a path: the error says how to give one
        self.config_path = Path(path)  # re-read for security settings when it changes (gcml_app.site.server)
        for problem in self.cfg.insecure_settings():  # only reached with security.allow_insecure: true
            logger.warning(f"INSECURE setting allowed by security.allow_insecure: {problem}")
        self.store = ModelStore(self.cfg.state_dir / "models", keep_versions=self.cfg.store.keep_versions)
        self.gossip_state = GossipState(self.cfg.state_dir)
        self.audit = AuditLog(self.cfg.state_dir / "audit.jsonl", self.cfg.security.audit_max_bytes)
        self.scores = ScoreBook(self.cfg.state_dir)  # active-learning scores (gcml_app.site.scoring)
        self.scheduler: Scheduler | None = None
        self.warm_trainer: WarmTrainer | None = None  # server process only (on_init_complete)
        self.scoring_watcher: ScoringWatcher | None = None  # likewise
        self.guard_limiter = None  # set by gcml_app.site.server when the guard is first built
        self._start_lock = threading.Lock()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"GCML ({self.cfg.site})",
            description="Decentralized personalized segmentation (gossip contrastive mutual learning)",
            version=gcml_app.__version__,
            labels=self.cfg.labels,
        )
        # MONAI Label would start every scoring method after each train task, Next Sample and start-up;
        # the scoring watcher starts one only when some score is stale (gcml_app.site.scoring)
        self._auto_update_scoring = False

    def init_datastore(self) -> GCMLDatastore | PacsDatastore:
        """A studies folder (MONAI Label's local datastore) or, for an ``http(s)://.../dicom-web`` studies
        argument, the PACS through MONAI Label's DICOMweb datastore (:mod:`gcml_app.site.pacs`); labels are
        validated either way.

        The PACS cache is ``MONAI_LABEL_DATASTORE_CACHE_PATH`` (or the older ``..._DICOMWEB_CACHE_PATH``),
        default ``<state_dir>/pacs-cache``, a folder per PACS URL under it.
        """
        if is_pacs_url(self.studies):
            self.studies = self.studies.strip().rstrip("/")
            cache = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH).strip()
            ds = PacsDatastore(pacs_client(self.studies), self.cfg.labels,
                               cache_path=cache or self.cfg.state_dir / "pacs-cache",
                               max_cache_bytes=int(self.cfg.store.pacs_cache_max_gb * 2**30))
        else:
            ds = GCMLDatastore(
                self.studies,
                labels=self.cfg.labels,
                extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
        ds.passed_root = cache_root(self.cfg)  # an upload is checked once: rounds find it there
        ds.other_values = self.cfg.other_values
        ds.show_scores(self.scores, lambda: committee(self.cfg, self.store))
        return ds

    def init_infers(self) -> dict[str, InferTask]:
        if not self.cfg.interactive.enabled:
            return {"gcml_seg": GCMLSegInfer(self.cfg, self.store)}
        # one network, two tasks: gcml_seg (zero guidance) leaves its prediction where gcml_edit's clicks start
        # and its image in network space, so the first click after it loads and resamples nothing
        cache, images = PredictionCache(self.cfg.interactive.cache_images), image_cache(self.cfg)
        return {"gcml_seg": GCMLSegInfer(self.cfg, self.store, cache, images),
                "gcml_edit": GCMLEditInfer(self.cfg, self.store, cache, images)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"gcml": GCMLTrain(self.cfg, self.store)}

    def init_strategies(self) -> dict[str, Strategy]:
        # "random" first, the stock Slicer module's default: disagreement did not beat it in gcml simulate
        # --active (docs/design.md, "Which case to label next"); a radiologist picks it in the box
        return {"random": Random(), "first": First(), "disagreement": DisagreementStrategy(self.cfg, self.store),
                "epistemic": Epistemic()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        ranks = is_background_process()  # MONAI Label's scoring subprocess may fork ranks; the server may not
        return {"disagreement": DisagreementScoring(self.cfg, self.store, ranks),
                "epistemic": EpistemicScoring(self.cfg, self.store, ranks)}

    def infer(self, request, datastore=None):
        """Inference on datastore images (or a Slicer upload session) only, and never a label write.

        Stock MONAI Label also accepts any path on the server's disk as ``image`` and stores the
        prediction as a label when asked (``save_label``, ``label_tag``); an annotation client must
        not make the server read files outside the studies folder, nor turn the model's own output
        into a final label that could land in the validation split.

        Raises:
            ImageRejected: ``image`` is not a string naming a datastore image or a file of an upload
                session, or the request asks to store anything.
            ClickRejected: a ``gcml_edit`` click that is not three finite integers, of an unknown label, or
                one too many (the bounds are checked once the image is read).
        """
        if request.get("model") == "gcml_edit" and self.cfg.interactive.enabled:
            parse_clicks(request, self.cfg.guidance_names, self.cfg.interactive.max_clicks)
        stored = sorted(k for k in _STORAGE_PARAMS if k in request and request[k] not in (None, False, ""))
        if stored:
            raise ImageRejected(f"infer parameters {stored} refused: inference never stores labels; submit a "
                                "label through the label upload, where it is validated")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise ImageRejected(f"infer 'image' must be a datastore image id; found a {type(image).__name__}")
        if not (datastore or self.datastore()).get_image_uri(image):
            sessions = getattr(self._sessions, "store_path", None)
            if not (sessions and Path(image).resolve().is_relative_to(Path(sessions).resolve())):
                raise ImageRejected(f"image {clean(image, 120)!r} is not in this site's datastore; expected a "
                                    "datastore image id")
        return super().infer(request, datastore)

    # ---------------------------------------------------------------- gossip triggers (server process)
    def start_round(self, mode: str, trigger: str, enqueue: bool = False, **params: Any) -> tuple[dict | None, str]:
        """Start a round as a MONAI Label training task (its own subprocess).

        Returns:
            ``(task, "")`` with the task's ``id`` and our ``round_id``; ``(None, why)`` when a round
            is already submitted or running and ``enqueue`` is false.
        """
        from monailabel.utils.async_tasks.task import AsyncTask

        with self._start_lock:  # the check and the submit are one step for concurrent requests
            if not enqueue and self.training_busy():
                return None, "a training task is submitted or running"
            round_id = uuid.uuid4().hex[:12]
            task, detail = AsyncTask.run("train", request={"model": "gcml"},
                                         params={"mode": mode, "trigger": trigger, "round_id": round_id, **params},
                                         enqueue=True)
        if task is None:
            return None, detail or "a training task is running"
        return {"task_id": task["id"], "round_id": round_id, "mode": mode, "trigger": trigger}, ""

    @staticmethod
    def training_busy() -> bool:
        """Whether a training task is running or waiting in MONAI Label's queue.

        MONAI Label's own check looks only at running subprocesses, so a task submitted a moment
        ago (not started yet) would let a second one queue behind it.
        """
        from monailabel.utils.async_tasks.utils import processes, tasks

        return bool(processes("train")) or any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("train"))

    def on_init_complete(self):
        super().on_init_complete()
        sweep_at_start(self.cfg, self.store)  # the server process, before any round of its own runs
        # the result writer's first use imports ITK's IO (2.5 s): done now, so the first request is as quick as the rest
        threading.Thread(target=warm_writer, name="gcml-warm-writer", daemon=True).start()
        if self.cfg.train.warm:
            # the environment setting MONAI Label gives its train subprocess
            self.warm_trainer = WarmTrainer(self.cfg.train.nice, env={"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"},
                                            idle=self.cfg.train.sched_idle)
            self.warm_trainer.start()
            atexit.register(self.warm_trainer.stop)
        g = self.cfg.gossip
        if g.interval_s > 0 and g.peers:

            def tick() -> str:
                task, why = self.start_round("gossip", trigger="scheduler")
                return f"started round {task['round_id']}" if task else f"skipped: {why}"

            self.scheduler = Scheduler(g.interval_s, g.jitter, self.gossip_state, tick)
            self.scheduler.start()
            state = "paused" if self.gossip_state.paused else "active"
            logger.info(f"gossip scheduler {state}: every {g.interval_s:g} s +- {g.jitter:.0%}, "
                        f"partners {[p.name for p in g.peers]}")
        if self.cfg.active.poll_s > 0 and self.cfg.active.methods:
            self.scoring_watcher = ScoringWatcher(self)
            self.scoring_watcher.start()
        logger.info(f"{freeze_startup()} start-up objects exempt from garbage collection (no 0.4 s full collections)")

    def on_save_label(self, image_id, label_id):
        """Runs on the event loop: only notes the label and, at ``finetune.min_new_labels``, enqueues a round."""
        saved = getattr(self.datastore(), "last_saved", None)
        if saved != (image_id, "final"):
            return super().on_save_label(image_id, label_id)
        if self.gossip_state.add_pending(image_id, self.cfg.finetune.min_new_labels):
            task, _ = self.start_round("labels", trigger="labels", enqueue=True)
            logger.info(f"{self.cfg.finetune.min_new_labels} new final labels: queued round {task and task['round_id']}")
        return super().on_save_label(image_id, label_id)

    def _working_status(self) -> dict[str, Any] | None:
        """The model rounds keep training; ``rounds_unpublished == 0`` means it is the served one."""
        info = self.store.working_info()
        if info is None:
            return None
        keys = ("updated", "candidate", "mode", "round_id", "base_version", "rounds_unpublished", "val_dice")
        return {k: info.get(k) for k in keys}

    def _validation_status(self) -> dict[str, Any]:
        """How many held-out cases gate each publish, and whether that is enough for a strict decision."""
        v = self.cfg.validation
        split = FixedSplit(self.cfg.state_dir / "split.json", v).assigned()
        n_train, n_val = sum(x == "train" for x in split.values()), sum(x == "val" for x in split.values())
        strict = n_val >= v.strict_cases
        more = 0 if strict else labels_for_validation(v, n_train, n_val, v.strict_cases)
        return {"n_train": n_train, "n_val": n_val, "decision": v.decision, "margin": v.margin,
                "max_label_drop": v.max_label_drop, "strict": strict, "strict_cases": v.strict_cases,
                "more_labels_for_strict": more}

    def _disk_status(self) -> dict[str, Any]:
        """:func:`~gcml_app.site.disk.disk_usage`, measured at most once a minute (a PACS cache walk is not free)."""
        now = time.monotonic()
        memo = getattr(self, "_disk_memo", None)
        if memo is None or now - memo[0] > 60.0:
            ds = self.datastore()
            memo = (now, disk_usage(self.cfg, self.store, ds.cache if isinstance(ds, PacsDatastore) else None))
            self._disk_memo = memo
        return memo[1]

    def _interactive_status(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        it = self.cfg.interactive
        last = next((r for r in reversed(history) if r.get("click_dice")), None)
        out: dict[str, Any] = {"enabled": it.enabled, "gate_clicks": it.gate_clicks,
                               "guidance": self.cfg.guidance_names}
        if last is not None:
            out["last_round"] = {"round_id": last.get("round_id"), "winner": last.get("winner"),
                                 "published": last.get("published"), "zero_click_dice": last.get("mean"),
                                 "click_dice": last["click_dice"]}
        return out

    def _active_status(self) -> dict[str, Any]:
        """What the scores stand on: per method, the last run, how many unlabelled images held here have a
        current score and how many are stale; the top current disagreement cases with each partner's
        disagreement."""
        unlabelled = set(scorable(self.datastore()))  # held here: a PACS site's cached series
        com = committee(self.cfg, self.store)
        book = self.scores
        out: dict[str, Any] = {"methods": self.cfg.active.methods, "served_version": com.served,
                               "partners": {k: v["version"] for k, v in com.partners.items()},
                               "unlabelled": len(unlabelled),
                               "watcher": {"running": bool(self.scoring_watcher and self.scoring_watcher.is_alive()),
                                           "poll_s": self.cfg.active.poll_s,
                                           "last_start": self.scoring_watcher.last if self.scoring_watcher else {}}}
        for m in SCORING_METHODS:
            cur = {i: s for i, s in book.current(m, com).items() if i in unlabelled}
            out[m] = {"current": len(cur), "stale": len(unlabelled) - len(cur), "last_run": book.read()["runs"].get(m)}
            if m == "disagreement":
                top = sorted(cur.items(), key=lambda kv: (-kv[1]["score"], kv[0]))[: self.cfg.active.top]
                out[m]["top"] = [{"id": i, "score": s["score"], "partners": s.get("partners", {}),
                                  "entropy": s.get("entropy"), "computed": s.get("ts")} for i, s in top]
        return out

    def gcml_status(self) -> dict[str, Any]:
        """What ``GET /gcml/status`` returns (the Slicer GCML Federation module shows it)."""
        served = self.store.served()
        history = self.store.history()
        rounds = [r for r in history if r.get("round_id")]
        g = self.cfg.gossip
        sched, wt = self.scheduler, self.warm_trainer
        return {
            "site": self.cfg.site,
            "served": None if served is None else {**asdict(served), "mean_dice": served.mean_dice},
            "versions": self.store.versions(),
            "gossip": {
                "paused": self.gossip_state.paused,
                "policy": g.policy,
                "interval_s": g.interval_s,
                "scheduler": sched is not None and sched.is_alive(),
                "next_round_in_s": round(sched.next_run - time.time(), 1) if sched and sched.next_run else None,
                "last_scheduler_tick": sched.last_result if sched else None,
            },
            "partners": PeerBook.open(self.gossip_state.peers_path).summary([p.name for p in g.peers]),
            "working": self._working_status(),
            "validation": self._validation_status(),
            "pending_labels": len(self.gossip_state.pending()),
            "min_new_labels": self.cfg.finetune.min_new_labels,
            "training": {"running": self.training_busy(), **self._trainers["gcml"].stats(),
                         # rounds fork from it when ready (gcml_app.site.warm); otherwise they start cold
                         "warm_trainer": {"ready": bool(wt and wt.ready()), "pid": wt and wt.pid}},
            "last_round": rounds[-1] if rounds else None,
            # malformed lines (a torn append) that history readers skipped; 0 when the file is whole
            "history_skipped_lines": self.store.skipped_history_lines,
            # a PACS site: URL, cache folder, reachable, the last error, series cached and skipped (with reasons)
            "pacs": ds.pacs_status() if isinstance(ds := self.datastore(), PacsDatastore) else None,
            # bytes by part (models, working, partner models, case cache, PACS cache) with each bound
            "disk": self._disk_status(),
            # active learning: scores for Next Sample, when computed, how many current, the top cases
            "active": self._active_status(),
            # click-to-correct: the models' zero-click and k-click validation Dice of the last round that scored them
            "interactive": self._interactive_status(history),
            "guard": {"tracked_clients": len(self.guard_limiter) if self.guard_limiter is not None else 0,
                      "max_tracked_clients": self.cfg.security.max_tracked_clients},
        }
