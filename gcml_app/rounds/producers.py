"""Candidate producers: what a round trains, behind one small interface.

A round (:func:`gcml_app.rounds.loop.run_round`) prepares the site's data, scores the served model,
asks its :class:`Producer` for candidates, scores them, lets the gate decide and commits. Only the
producer differs between methods:

- :class:`Local`: the working model trains alone (candidate ``local``);
- :class:`DCML`: the working model and a partner's model train together (candidates ``dcml_local``,
  ``dcml_incoming`` and their parameter ``average``); with ``dcml.choose`` the round first scores the
  partner's model on the site's validation cases and :func:`choose_arm` picks mutual learning, a frozen
  teacher or :class:`Alone` (docs/design.md, "Choosing how a partner's model is used");
- in the simulator, :class:`gcml_app.sim.methods.Offered`: candidates a federation's central step
  made (FedAvg's average, Ditto's personal model, the pooled model), gated and committed the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader

from gcml_app.config import DCMLConfig, SiteConfig, ValidationConfig
from gcml_app.errors import IncomingModelRejected
from gcml_app.federation.payload import verify_weights
from gcml_app.ml.clicks import click_simulator
from gcml_app.ml.dcml import dcml_train, step_budget
from gcml_app.ml.device import Precision
from gcml_app.ml.gate import CaseScores, paired_bound
from gcml_app.ml.network import GCMLNet, build_network
from gcml_app.ml.supervised import average_state, supervised_train
from gcml_app.util.files import sha256_bytes

__all__ = ["ARMS", "PULLED", "Alone", "Choice", "DCML", "Local", "Produced", "Producer", "RoundInputs", "State",
           "choose_arm", "load_incoming"]

State = dict[str, torch.Tensor]


@dataclass
class RoundInputs:
    """What a producer gets from the round: the working model, on the device, and the training batches.

    ``loader`` is ``None`` for a producer that does not train (:attr:`Producer.trains` false).
    """

    cfg: SiteConfig
    model: GCMLNet
    loader: DataLoader | None
    epochs: int
    device: torch.device
    seed: int
    report: Callable[[dict[str, Any]], None]
    amp: Precision | None = None  # mixed precision of the training passes (gcml_app.ml.device); None = fp32
    unlabelled: DataLoader | None = None  # crops of the site's unlabelled images, for a producer that uses them


@dataclass
class Produced:
    """A producer's answer.

    Args:
        mode: the round's mode in its record (``local``, ``dcml``, a baseline's name).
        states: candidate name -> weights, in the order they are scored.
        kept: the candidate the working model continues from when the gate keeps the served model and
            two candidates tie on paired gain.
        losses: per-epoch loss components (empty for a producer that does not train).
    """

    mode: str
    states: dict[str, State]
    kept: str
    losses: list[dict[str, float]] = field(default_factory=list)
    choice: dict[str, Any] | None = None  # with dcml.choose: the arm, the measurement and why (Choice.as_record)


ARMS = ("mutual", "teacher", "alone")
PULLED = "pulled"  # the candidate that is the partner's model as pulled (dcml.pulled_candidate)


@dataclass(frozen=True)
class Choice:
    """How a DCML round uses the partner's model, from its paired Dice against the served model on the site's
    validation cases (:func:`choose_arm`)."""

    arm: str  # one of ARMS
    gain: float  # mean paired Dice, partner - served
    se: float  # its standard error
    upper: float  # gain + z(1 - validation.alpha) * se
    cases: int  # validation cases the partner was scored on (its forward passes)
    why: str

    def as_record(self) -> dict[str, Any]:
        return {"arm": self.arm, "gain": round(self.gain, 6), "se": round(self.se, 6) if self.se < 1e9 else None,
                "upper": round(self.upper, 6) if abs(self.upper) < 1e9 else None, "scored_cases": self.cases,
                "why": self.why}


def choose_arm(partner: CaseScores, served: CaseScores, v: ValidationConfig, d: DCMLConfig | None = None
               ) -> Choice:
    """The arm of a DCML round, from the partner's and the served model's per-case Dice on the same cases.

    ``upper`` is the upper end of a one-sided ``1 - validation.alpha`` interval on the partner's mean paired
    gain (the gate's confidence). Unless the partner is shown worse (``upper < 0``), mutual learning: both
    models train, as DCML always did. Shown worse, the site's model takes the whole budget: distilled from the
    partner as a frozen teacher that only answers forward passes (``d.shown_worse: teacher``, the default)
    or alone (``shown_worse: alone``). Shown worse by more than ``validation.max_label_drop`` (the drop the gate
    never lets a served label take), alone in either case. Few cases give a wide interval, so a site with
    little validation evidence keeps mutual learning. With ``d.mutual_bar: mean`` the partner counts as
    worse when its mean paired gain is below 0 (a partner worse in the estimate, shown or not): mutual
    learning only beside a partner at least as good on our cases. ``d.interval``: the interval's quantile,
    the normal's (``normal``) or Student's t with ``n - 1`` degrees of freedom (``student``).
    ``d`` defaults to ``DCMLConfig()``.
    """
    d = d or DCMLConfig()
    gain, se, upper = paired_bound(partner, served, v.alpha, student=d.interval == "student")
    quantile = " (Student's t)" if d.interval == "student" else ""
    band = (f"partner - served {gain:+.4f}, upper bound {upper:+.4f} at alpha {v.alpha:g}{quantile} over "
            f"{len(served)} cases")
    if d.mutual_bar == "mean":
        if gain >= 0:
            return Choice("mutual", gain, se, upper, len(served), f"{band}: at least as good, both models train")
        worse = "worse in the mean"
    elif upper >= 0:
        return Choice("mutual", gain, se, upper, len(served), f"{band}: not shown worse, both models train")
    else:
        worse = "shown worse"
    if d.shown_worse == "teacher" and upper >= -v.max_label_drop:
        return Choice("teacher", gain, se, upper, len(served), f"{band}: {worse}, the partner only teaches")
    far = f"worse by more than max_label_drop {v.max_label_drop:g}" if d.shown_worse == "teacher" else worse
    return Choice("alone", gain, se, upper, len(served), f"{band}: {far}, the site trains alone")


class Producer(ABC):
    """Makes a round's candidates from its inputs (see the module docstring).

    Attributes:
        trains: whether the round must build its training batches for this producer.
        origin: where an incoming model came from (``{"peer", "peer_site", "peer_version", ...}``): it
            goes into the round record and the published model's lineage. ``None``: no incoming model.
        incoming_sha256: the incoming model's sha256, when there is one.
        incoming_file: the name of the file it was read from (in the round record).
    """

    trains: bool = True
    origin: dict[str, Any] | None = None
    incoming_sha256: str | None = None
    incoming_file: str | None = None

    @abstractmethod
    def produce(self, inputs: RoundInputs) -> Produced:
        """Train (or fetch) the candidates; ``inputs.model`` may be trained in place."""

    def batch_size(self, cfg: SiteConfig) -> int:
        """Labelled images per training step (the round's loader): ``train.batch_size``."""
        return cfg.train.batch_size

    def unlabelled_images(self, cfg: SiteConfig, epochs: int, batches: int) -> int:
        """How many of the site's unlabelled images the round's steps use (the round draws that many): none."""
        return 0


class Local(Producer):
    """The working model alone: supervised DiceCE passes over the site's training cases."""

    def produce(self, inputs: RoundInputs) -> Produced:
        t = inputs.cfg.train
        losses = supervised_train(inputs.model, inputs.loader, inputs.epochs, t.lr, t.weight_decay, inputs.device,
                                  inputs.report, amp=inputs.amp, clicks=click_simulator(inputs.cfg, inputs.seed))
        return Produced("local", {"local": inputs.model.state_dict()}, "local", losses)


class DCML(Producer):
    """The working model and a partner's model trained together (DCML, :func:`~gcml_app.ml.dcml.dcml_train`),
    on the labelled crops and on crops of the site's unlabelled images, for a budget of steps that costs
    what two models' labelled passes cost (:func:`~gcml_app.ml.dcml.step_budget`). With
    ``dcml.train_incoming: false`` the partner's model only teaches: one candidate, ``dcml_local``.

    Args:
        state: the partner's weights, already checked (:func:`load_incoming`, or the gossip client's
            checks when the bytes arrived this round).
        sha256: the sha256 of the file those weights came from.
        origin: where they came from (see :attr:`Producer.origin`).
        file: the name of that file, for the round record.
    """

    def __init__(self, state: State, sha256: str, origin: dict[str, Any] | None = None, file: str | None = None):
        self.state, self.incoming_sha256, self.origin, self.incoming_file = state, sha256, origin, file
        self.train_incoming: bool | None = None  # None: dcml.train_incoming
        self.choice: Choice | None = None

    def for_arm(self, choice: Choice) -> Producer:
        """This round's producer for ``choice``: itself (mutual), a frozen-teacher copy, or :class:`Alone`."""
        if choice.arm == "alone":
            return Alone(self, choice)
        arm = DCML(self.state, self.incoming_sha256, self.origin, self.incoming_file)
        arm.train_incoming = None if choice.arm == "mutual" else False  # mutual: as configured
        arm.choice = choice
        return arm

    def _trains_incoming(self, cfg: SiteConfig) -> bool:
        return cfg.dcml.train_incoming if self.train_incoming is None else self.train_incoming

    @classmethod
    def from_file(cls, path: str | Path, cfg: SiteConfig, ours: str | None = None,
                  origin: dict[str, Any] | None = None) -> DCML:
        """A partner model stored in the site's state folder (a cached pull, a train request's ``incoming``)."""
        state, sha256 = load_incoming(path, cfg, ours)
        return cls(state, sha256, origin, Path(path).name)

    def batch_size(self, cfg: SiteConfig) -> int:
        """``dcml.batch_size``, default half of ``train.batch_size`` (at least 1): each of the two models then
        makes as many optimizer steps as ``local2x``'s one model, for the same compute."""
        return cfg.dcml.batch_size or max(1, cfg.train.batch_size // 2)

    def steps(self, cfg: SiteConfig, epochs: int, batches: int, unlabelled: bool) -> int:
        """The round's steps (:func:`~gcml_app.ml.dcml.step_budget`), with or without unlabelled crops."""
        d = cfg.dcml
        return step_budget(epochs, batches, self.batch_size(cfg), d.unlabelled_batch if unlabelled else 0,
                           self._trains_incoming(cfg))

    def unlabelled_images(self, cfg: SiteConfig, epochs: int, batches: int) -> int:
        """One ``dcml.unlabelled_batch`` per step with ``dcml.lambda_unl > 0``, at most ``unlabelled_max_cases``."""
        d = cfg.dcml
        if d.lambda_unl <= 0:
            return 0
        return min(d.unlabelled_max_cases, self.steps(cfg, epochs, batches, True) * d.unlabelled_batch)

    def produce(self, inputs: RoundInputs) -> Produced:
        cfg, t, d = inputs.cfg, inputs.cfg.train, inputs.cfg.dcml
        other = build_network(cfg)
        other.load_state_dict(self.state)
        other.to(inputs.device)
        unl = inputs.unlabelled  # the round drew some only if unlabelled_images() asked for them
        steps = self.steps(cfg, inputs.epochs, len(inputs.loader), unl is not None)
        trains = self._trains_incoming(cfg)
        if trains != d.train_incoming:
            d = d.model_copy(update={"train_incoming": trains})
        local, other, losses = dcml_train(inputs.model, other, inputs.loader, d, inputs.epochs, t.lr,
                                          t.weight_decay, inputs.device, inputs.report, inputs.seed, inputs.amp,
                                          unl, steps, click_simulator(cfg, inputs.seed))
        states = {"dcml_local": local.state_dict()}
        if trains:
            states["dcml_incoming"] = other.state_dict()
            states["average"] = average_state(states["dcml_local"], states["dcml_incoming"])
        return Produced("dcml", states, "dcml_local", losses, self.choice and self.choice.as_record())


class Alone(Producer):
    """A DCML round whose partner :func:`choose_arm` found far worse: the working model trains alone for twice
    the epochs in ``train.batch_size`` (the round re-batches DCML's crops), which is ``local2x``'s image passes
    and optimizer steps. The partner's origin stays on the producer for the round record; the model's lineage
    does not name it."""

    def __init__(self, dcml: DCML, choice: Choice):
        self.origin, self.incoming_sha256, self.incoming_file = dcml.origin, dcml.incoming_sha256, dcml.incoming_file
        self.choice = choice

    def produce(self, inputs: RoundInputs) -> Produced:
        t = inputs.cfg.train
        losses = supervised_train(inputs.model, inputs.loader, 2 * inputs.epochs, t.lr, t.weight_decay, inputs.device,
                                  inputs.report, amp=inputs.amp, clicks=click_simulator(inputs.cfg, inputs.seed))
        return Produced("local", {"local": inputs.model.state_dict()}, "local", losses, self.choice.as_record())


def load_incoming(path: str | Path, cfg: SiteConfig, ours: str | None = None) -> tuple[State, str]:
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
