"""What a round computes before its decision: prepare the data, score the served model, produce and score
the candidates, on one device or in every rank of a ``torch.distributed`` group.

:func:`~gcml_app.rounds.loop.run_round` hands a :class:`RoundWork` to :func:`compute` in its own process
(one device), or to :func:`gcml_app.rounds.ranks.run_on_ranks`, which runs :func:`compute` in one process
per device (docs/design.md, "Several devices"). In a group, every rank builds its share of the case
cache, trains through ``DistributedDataParallel`` on its share of every step's crops
(:mod:`gcml_app.ml.distributed`) and scores its share of the validation cases; the per-case tables are
gathered, so every rank, and the decision, sees the table one device would compute.
"""

from __future__ import annotations

import contextlib
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, ThreadDataLoader
from monai.utils import set_determinism

from gcml_app.config import SiteConfig
from gcml_app.ml.cache import CachedCases, CaseCache
from gcml_app.ml.clicks import click_curve
from gcml_app.ml.device import Precision, precision, setup_device, sw_batch_size
from gcml_app.ml.distributed import barrier, gather_cases, rank, share, world
from gcml_app.ml.evaluate import dice_per_case
from gcml_app.ml.gate import SERVED
from gcml_app.ml.network import GCMLNet, build_network, fit_state
from gcml_app.ml.transforms import crop_transforms, unlabelled_crop_transforms
from gcml_app.rounds.producers import DCML, PULLED, Produced, Producer, RoundInputs, choose_arm

__all__ = ["Computed", "Laps", "Phase", "RoundWork", "compute", "rng_state"]

State = dict[str, torch.Tensor]
Progress = Callable[[dict[str, Any]], None]


@dataclass
class RoundWork:
    """Everything a round computes from, decided before any training: picklable, so a rank can be spawned with it.

    Args:
        start: the working model's weights the round starts from.
        served: the served model's weights as stored (:func:`compute` fits them to this network), or ``None``.
        unlabelled: the site's images without a final label, for a producer that learns from them.
        rng: the random generators' states (:func:`rng_state`) where the round's process left them, after
            seeding and building what it needed: :func:`compute` goes on from there, so a round draws the
            same batches in this process or in every rank, and as it always has.
    """

    cfg: SiteConfig
    cases: list[dict[str, str]]
    train_ids: list[str]
    val_ids: list[str]
    producer: Producer
    start: State
    served: State | None
    epochs: int
    seed: int
    unlabelled: list[dict[str, str]] = field(default_factory=list)
    rng: dict[str, Any] | None = None


def rng_state() -> dict[str, Any]:
    """The CPU random generators' states: torch's, NumPy's and Python's (what ``set_determinism`` seeds)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}


def _restore(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["random"])


@contextlib.contextmanager
def _draws_nothing(start: dict[str, Any] | None = None) -> Iterator[None]:
    """What runs inside leaves the CPU random generators as it found them (from ``start``, a :func:`rng_state`,
    when given: the block then draws as it would have there)."""
    now = rng_state()
    if start is not None:
        _restore(start)
    try:
        yield
    finally:
        _restore(now)


@dataclass
class Computed:
    """What the decision needs, and how the computing went.

    ``scores``: model name (``served`` and each candidate) -> Dice per label per validation case;
    ``clicked``: the mean Dice after ``interactive.gate_clicks`` clicks (``None`` off). ``ranks``: with
    several devices, each rank's timings, peak memory and cache figures, and whether their weights agree.
    """

    produced: Produced
    scores: dict[str, list[dict[str, float]]]
    clicked: dict[str, float | None]
    cache: dict[str, Any]
    timings: dict[str, float]
    peak_mb: dict[str, float]
    precision: str
    peak_gpu_mb: float | None = None
    ranks: dict[str, Any] | None = None


class Phase:
    """The phase a round is in (``prepare``, ``validate``, ``train``), for the message of a failed round;
    ``publish`` also tells the process that started the ranks (through their rendezvous store)."""

    def __init__(self, publish: Callable[[str], None] | None = None):
        self.name, self._publish = "prepare", publish

    def __call__(self, name: str) -> None:
        self.name = name
        if self._publish:
            self._publish(name)


@dataclass
class _Data:
    """A round's cases, read lazily from the site's preprocessed-case cache (:class:`~gcml_app.ml.cache.CaseCache`).

    ``val`` holds one validation case in memory at a time (this rank's share of them); ``loader`` draws the
    training crops from the cached entries (precomputed crop centres) in a background thread, or in
    ``train.num_workers`` worker processes, while the model trains: the same batches on every rank,
    each training on its share. ``unlabelled`` draws crops of a random subset of the site's unlabelled
    images, for a producer that learns from them (DCML with ``dcml.lambda_unl``).
    """

    cfg: SiteConfig
    val: CachedCases
    loader: DataLoader | None
    device: torch.device
    amp: Precision
    cache: dict[str, Any]
    unlabelled: DataLoader | None = None
    loader_rng: dict[str, Any] | None = None  # the random generators' states as ``loader`` was built

    @classmethod
    def prepare(cls, work: RoundWork, device: torch.device, amp: Precision) -> _Data:
        cfg, producer = work.cfg, work.producer
        by_id = {c["id"]: c for c in work.cases}
        trains = producer.trains
        t, pin, batch = cfg.train, device.type == "cuda", producer.batch_size(cfg)
        wanted = producer.unlabelled_images(cfg, work.epochs, -(-len(work.train_ids) // batch)) if trains else 0
        unl = _unlabelled_draw(work.unlabelled, wanted, work.seed)
        cache = CaseCache(cfg)
        cases = [by_id[i] for i in [*work.val_ids, *(work.train_ids if trains else [])]] + unl
        if world() > 1:  # the preprocessing split: each rank builds its share, then every rank reads them all
            cache.prepare(share(cases), evict=False)
            barrier()
        # one call: every case of the round is pinned before anything is evicted (by rank 0 alone)
        entries = cache.prepare(cases, evict=rank() == 0)
        labelled, unl = entries[:len(entries) - len(unl)], [e for e in entries[len(entries) - len(unl):] if e]
        val = CachedCases(share(labelled[:len(work.val_ids)]))
        loader = unlabelled = drawn = None
        if trains:  # built after the round's seed is set: MONAI's DataLoader seeds the random crops from it
            train = Dataset(CachedCases(labelled[len(work.val_ids):], indices=True), crop_transforms(cfg))
            drawn = rng_state()
            loader = _loader(train, batch, t.num_workers, pin)
            if unl:
                unlabelled = _loader(Dataset(CachedCases(unl), unlabelled_crop_transforms(cfg)),
                                     cfg.dcml.unlabelled_batch, 0, pin)
        return cls(cfg, val, loader, device, amp, {**cache.stats.as_record(), "unlabelled": len(unl)}, unlabelled,
                   drawn)

    def loader_for(self, producer: Producer) -> DataLoader | None:
        """The training crops in ``producer``'s batch: the prepared loader, or the same crops re-batched when
        the round's choice changed the producer (:class:`~gcml_app.rounds.producers.Alone` takes
        ``train.batch_size``, DCML's half). Re-batched from the random state the prepared loader was built in,
        it is the loader a round of that producer would have built: the same crops in the same batches."""
        batch = producer.batch_size(self.cfg)
        if self.loader is None or self.loader.batch_size == batch:
            return self.loader
        with _draws_nothing(self.loader_rng):
            return _loader(self.loader.dataset, batch, self.cfg.train.num_workers, self.device.type == "cuda")

    def score(self, model: GCMLNet) -> list[dict[str, float]]:
        """Dice per label of every validation case (sliding window), each rank scoring its share."""
        v = self.cfg.validation
        return gather_cases(dice_per_case(model, self.val, list(self.cfg.labels), self.cfg.roi_size,
                                          sw_batch_size(self.cfg, self.device), v.overlap, self.device, self.amp))

    def click_score(self, model: GCMLNet) -> float | None:
        """Mean Dice over the validation cases after ``interactive.gate_clicks`` simulated clicks (the evaluation
        protocol of :func:`~gcml_app.ml.clicks.click_curve`); ``None`` when the site is not interactive."""
        it, v = self.cfg.interactive, self.cfg.validation
        if not it.enabled or not it.gate_clicks:
            return None
        rows = gather_cases(click_curve(
            model, self.val, len(self.cfg.labels), self.cfg.roi_size, (it.gate_clicks,), sigma=it.sigma,
            sw_batch_size=sw_batch_size(self.cfg, self.device), overlap=v.overlap, device=self.device, amp=self.amp))
        return sum(r["dice"][it.gate_clicks] for r in rows) / max(len(rows), 1)


def _loader(data: Dataset, batch_size: int, workers: int, pin: bool) -> DataLoader:
    """Shuffled batches of ``data``: in ``workers`` processes, or (0) in one background thread."""
    if workers:
        return DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin)
    return ThreadDataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, pin_memory=pin)


def _unlabelled_draw(pool: list[dict[str, str]], k: int, seed: int) -> list[dict[str, str]]:
    """The unlabelled images a round trains on: ``k`` of ``pool`` (as many as there are, if fewer), a
    random subset by the round's seed."""
    k = min(k, len(pool))
    pool = sorted(pool, key=lambda c: c["id"])
    return [{"id": c["id"], "image": c["image"]} for c in random.Random(seed).sample(pool, k)] if k else []


def compute(work: RoundWork, device: torch.device, report: Progress | None = None,
            phase: Phase | None = None, lap: Laps | None = None) -> Computed:
    """Prepare the data, score the served model, produce the candidates and score them, on ``device``.

    In a process group every rank calls this with the same ``work`` (and its own device): the round's
    seed then draws the same batches everywhere. Only what the models compute is here; the decision and
    the commit stay with :func:`~gcml_app.rounds.loop.run_round`.

    Args:
        report: called with ``{"epoch", "total_epochs", "loss", ...}`` after each epoch.
        phase: told each phase as it starts.
        lap: the round's :class:`Laps` so far (a new one by default).
    """
    cfg, phase, lap = work.cfg, phase or Phase(), lap or Laps()
    set_determinism(seed=work.seed)
    if work.rng is not None:  # where the round's process left its draws
        _restore(work.rng)
    setup_device(cfg, device)
    amp = precision(cfg, device)
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: no draws
        model = build_network(cfg)
    model.load_state_dict(work.start)
    model.to(device)
    data = _Data.prepare(work, device, amp)
    lap("load_s")

    phase("validate")
    scores: dict[str, list[dict[str, float]]] = {}
    clicked: dict[str, float | None] = {}
    probe = pulled = None
    producer = work.producer
    if work.served is not None:
        probe = build_network(cfg).to(device)
        probe.load_state_dict(fit_state(work.served, cfg))
        scores[SERVED] = data.score(probe)
        clicked[SERVED] = data.click_score(probe)
        if cfg.dcml.choose and isinstance(producer, DCML):  # how to use the partner: from its Dice on our cases
            with _draws_nothing():  # the choice only looks: the arm it picks draws what it would draw alone
                state = fit_state(producer.state, cfg)
                probe.load_state_dict(state)
                partner = data.score(probe)
                if cfg.dcml.pulled_candidate:  # the partner's model as pulled: a candidate, already scored
                    pulled = (state, partner, data.click_score(probe))
            producer = producer.for_arm(choose_arm(partner, scores[SERVED], cfg.validation, cfg.dcml))
    lap("validate_s", peak="validate_served")

    phase("train")
    produced = producer.produce(RoundInputs(cfg, model, data.loader_for(producer), work.epochs, device, work.seed,
                                            report or (lambda p: None), amp, data.unlabelled))
    lap("train_s")
    phase("validate")
    probe = probe or build_network(cfg).to(device)
    for name, state in produced.states.items():
        probe.load_state_dict(state)
        scores[name] = data.score(probe)
        clicked[name] = data.click_score(probe)
    if pulled is not None:
        produced.states[PULLED], scores[PULLED], clicked[PULLED] = pulled
    lap("validate_s", peak="validate_candidates")
    gpu = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return Computed(produced, scores, clicked, data.cache, lap.laps, lap.peak_mb, str(amp), gpu)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB; Linux reports ``ru_maxrss`` in kB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Laps:
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

    def adopt(self, laps: dict[str, float], peak_mb: dict[str, float]) -> None:
        """Take the phases another process timed (rank 0 of a round on several devices); the next lap starts now."""
        self.laps, self.peak_mb, self.t = {**laps}, {**peak_mb}, time.perf_counter()
