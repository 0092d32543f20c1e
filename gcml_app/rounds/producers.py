"""Candidate producers: what a round trains, behind one small interface.

A round (:func:`gcml_app.rounds.loop.run_round`) prepares the site's data, scores the served model,
asks its :class:`Producer` for candidates, scores them, lets the gate decide and commits. Only the
producer differs between methods:

- :class:`Local`: the working model trains alone (candidate ``local``);
- :class:`DCML`: the working model and a partner's model train together (candidates ``dcml_local``,
  ``dcml_incoming`` and their parameter ``average``);
- in the simulator, :class:`gcml_app.sim.baselines.Offered`: candidates a federation's central step
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

from gcml_app.config import SiteConfig
from gcml_app.errors import IncomingModelRejected
from gcml_app.federation.payload import verify_weights
from gcml_app.ml.clicks import click_simulator
from gcml_app.ml.dcml import dcml_train, step_budget
from gcml_app.ml.device import Precision
from gcml_app.ml.network import GCMLNet, build_network
from gcml_app.ml.supervised import average_state, supervised_train
from gcml_app.util.files import sha256_bytes

__all__ = ["DCML", "Local", "Produced", "Producer", "RoundInputs", "State", "load_incoming"]

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
                           d.train_incoming)

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
        local, other, losses = dcml_train(inputs.model, other, inputs.loader, d, inputs.epochs, t.lr,
                                          t.weight_decay, inputs.device, inputs.report, inputs.seed, inputs.amp,
                                          unl, steps, click_simulator(cfg, inputs.seed))
        states = {"dcml_local": local.state_dict()}
        if d.train_incoming:
            states["dcml_incoming"] = other.state_dict()
            states["average"] = average_state(states["dcml_local"], states["dcml_incoming"])
        return Produced("dcml", states, "dcml_local", losses)


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
