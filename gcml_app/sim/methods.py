"""The methods ``gcml simulate`` compares: one small interface, every site round through the servers' loop.

Every method is a :class:`Method`; its :meth:`Method.run` drives one seed's sites for ``rounds``
rounds. Whatever the method, each site's round ends in :func:`~gcml_app.rounds.loop.run_round`:
the same scoring, the same gate and the same commit as a hospital's server.

- :class:`ServerLocal` (``local``, ``local2x``): the servers' local round (:class:`~gcml_app.rounds.producers.Local`);
- :class:`Gossip` (``gcml``, its ablations, ``gml``): the servers' gossip round with an in-memory partner;
- :class:`Central` baselines that no server runs, built on the same training step
  (:func:`~gcml_app.ml.supervised.supervised_train`) and the same average
  (:func:`~gcml_app.ml.supervised.average_state`): :class:`FedAvg` (``fedavg``, ``fedavg-ft``),
  :class:`Ditto` and :class:`Pooled` (``pooled``, ``pooled-epochs``). Their central step makes each
  site's candidate, which the site's round gates as an :class:`Offered` candidate.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.utils import set_determinism

from gcml_app.ml.clicks import click_simulator
from gcml_app.ml.device import precision
from gcml_app.ml.supervised import average_state, supervised_train
from gcml_app.rounds.gossip import gossip_round
from gcml_app.rounds.loop import run_round
from gcml_app.rounds.producers import Produced, Producer, RoundInputs, State
from gcml_app.sim.partner import MemoryPartner
from gcml_app.sim.run import Node, Run

__all__ = ["ARMS", "DEFAULT_METHODS", "Central", "Ditto", "FedAvg", "Gossip", "Method", "Offered", "Pooled",
           "ServerLocal", "cost_of"]

Emit = Callable[[str, int, dict[str, tuple[dict[str, float], int, int, bool, dict[str, float]]]], None]
"""``emit(method, round, {site: (test Dice per label, bytes sent, bytes received, published, cost)})``; the cost
is the round's training at that site, ``{"steps", "crop_passes"}`` (:func:`cost_of`; 0 at round 0, the warm-up
every method spends alike)."""
NO_COST = {"steps": 0, "crop_passes": 0.0}


def cost_of(*histories: list[dict[str, float]]) -> dict[str, float]:
    """What training histories spent: optimizer steps and crop passes (one crop through one model forward and
    backward; :func:`~gcml_app.ml.dcml.dcml_train` counts both of its models)."""
    epochs = [h for hist in histories for h in hist or []]
    return {"steps": sum(int(h.get("steps", 0)) for h in epochs),
            "crop_passes": round(sum(float(h.get("crop_passes", 0)) for h in epochs), 2)}
DITTO_LAMBDA = 0.1  # Ditto's proximal weight (Li et al. 2021 tune it in {0.01, 0.1, 1, 2}; 0.1 is their common pick)


class Offered(Producer):
    """Candidates made outside the round (a federation's central step): the round only scores and gates them.

    Args:
        mode: the method's name; the one candidate is named after it.
        state: the candidate's weights.
    """

    trains = False

    def __init__(self, mode: str, state: State):
        self.mode, self.state = mode, state

    def produce(self, inputs: RoundInputs) -> Produced:
        return Produced(self.mode, {self.mode: self.state}, self.mode)


@dataclass(frozen=True)
class Method(ABC):
    """One method of the comparison.

    Args:
        epochs: multiple of ``--epochs`` per round (``local2x``: 2).
        dcml: DCML settings changed for this method (ablations).
        train: training settings changed for this method (``augment``: the augmentation ablation).
        policy: partner choice of gossip methods (``None``: the config's, by default ``performance``).
        gate: ``False`` serves every round's model unchecked whatever ``--gate`` says.

    Attributes:
        kind: what the method is, for reports (``round``, ``gossip``, ``fedavg``, ``ditto``, ``pooled``).
        shares_warmup: starts from the per-site warm-up (the servers' methods); otherwise from one
            shared initialisation, with the warm-up's steps as its own first rounds.
    """

    epochs: int = 1
    dcml: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    policy: str | None = None
    gate: bool | None = None
    kind = ""
    shares_warmup = True

    @abstractmethod
    def run(self, run: Run, name: str, nodes: dict[str, Node], rounds: int, emit: Emit) -> None:
        """Rounds 0 (what the warm-up left) to ``rounds`` of one seed's sites, each reported through ``emit``."""


@dataclass(frozen=True)
class ServerLocal(Method):
    """The servers' local round: each site's working model trains alone."""

    kind = "round"

    def run(self, run, name, nodes, rounds, emit):
        emit(name, 0, {n: (run.test_dice(nd), 0, 0, True, NO_COST) for n, nd in nodes.items()})
        for r in range(1, rounds + 1):
            out = {}
            for i, (n, nd) in enumerate(nodes.items()):
                rec = run_round(nd.cfg, nd.store, nd.cases, extra={"trigger": "simulate", "round_id": f"r{r}"},
                                seed=run.seed_of(r, i))
                out[n] = (run.test_dice(nd), 0, 0, rec["published"], cost_of(rec.get("losses")))
            emit(name, r, out)


@dataclass(frozen=True)
class Gossip(Method):
    """The servers' gossip round, with in-memory partners serving what their peer surface would."""

    kind = "gossip"

    def run(self, run, name, nodes, rounds, emit):
        emit(name, 0, {n: (run.test_dice(nd), 0, 0, True, NO_COST) for n, nd in nodes.items()})
        rngs = {n: random.Random(run.seed * 1000 + i) for i, n in enumerate(nodes)}
        partner = {n: MemoryPartner(n, nd.store, run.transport) for n, nd in nodes.items()}
        for r in range(1, rounds + 1):
            sent = dict.fromkeys(nodes, 0)
            got = {}
            for i, (n, nd) in enumerate(nodes.items()):
                rec = gossip_round(nd.cfg, nd.store, nd.cases, trigger="simulate", round_id=f"r{r}", rng=rngs[n],
                                   connect=partner.__getitem__, seed=run.seed_of(r, i), unlabelled=nd.site.unlabelled)
                g = rec.get("gossip") or {}
                for a in g.get("attempts", []):
                    sent[a["peer"]] += a.get("bytes", 0)
                got[n] = (g.get("bytes_pulled", 0), bool(rec.get("published")), cost_of(rec.get("losses")))
            emit(name, r, {n: (run.test_dice(nd), sent[n], *got[n]) for n, nd in nodes.items()})


@dataclass
class Federated:
    """A central method's state between rounds: the global model and each site's personal model (Ditto)."""

    glob: State
    personal: dict[str, State]


@dataclass(frozen=True)
class Central(Method):
    """A baseline with a central step: it makes every site's candidate, then each site's round gates it.

    Round 0 spends the warm-up's budget from one shared initialisation (``max(1, warmup / epochs)``
    central rounds), so that round 0 costs every method the same.
    """

    shares_warmup = False
    moves_models = True  # each round every site sends and receives one model (pooled moves data instead)

    @abstractmethod
    def fit(self, run: Run, names: list[str], fed: Federated, r: int, epochs: int) -> dict[str, State]:
        """One central round ``r``: update ``fed``; return each site's candidate."""

    def run(self, run, name, nodes, rounds, emit):
        names = list(nodes)
        glob = run.init_state()
        fed = Federated(glob, dict.fromkeys(names, glob))
        warm_rounds = max(1, math.ceil(run.warmup_epochs / run.epochs))
        for w in range(warm_rounds):
            cands = self.fit(run, names, fed, -(w + 1), run.epochs)
        self._serve(run, name, nodes, cands, 0, {"stage": "warmup"})
        emit(name, 0, {n: (run.test_dice(nd), 0, 0, True, NO_COST) for n, nd in nodes.items()})
        traffic = run.model_bytes[run.transport] if self.moves_models else 0
        for r in range(1, rounds + 1):
            run.spent.clear()
            cands = self.fit(run, names, fed, r, run.epochs)
            published = self._serve(run, name, nodes, cands, r, {"round_id": f"r{r}"})
            emit(name, r, {n: (run.test_dice(nd), traffic, traffic, published[n], cost_of(*run.spent.get(n, [])))
                           for n, nd in nodes.items()})

    @staticmethod
    def _serve(run: Run, name: str, nodes: dict[str, Node], cands: dict[str, State], r: int,
               extra: dict[str, Any]) -> dict[str, bool]:
        """Each site's round on its candidate: scored, gated and committed as on a server."""
        out = {}
        for i, (n, nd) in enumerate(nodes.items()):
            rec = run_round(nd.cfg, nd.store, nd.cases, Offered(name, cands[n]),
                            extra={"trigger": "simulate", **extra}, seed=run.seed_of(r, i))
            out[n] = bool(rec["published"])
        return out


@dataclass(frozen=True)
class FedAvg(Central):
    """FedAvg (McMahan et al. 2017): local passes from the global model, averaged by training cases.

    Args:
        serve: ``global`` (the average) or ``local`` (the site's fine-tuned copy: FedAvg+FT).
    """

    serve: str = "global"
    kind = "fedavg"

    def fit(self, run, names, fed, r, epochs):
        local = {n: run.train(n, fed.glob, epochs, run.seed_of(r, i)) for i, n in enumerate(names)}
        fed.glob = average_state(*(local[n] for n in names), weights=run.weights(names))
        return local if self.serve == "local" else dict.fromkeys(names, fed.glob)


@dataclass(frozen=True)
class Ditto(Central):
    """Ditto (Li et al. 2021): FedAvg's global model, and a personal model pulled towards it, served."""

    kind = "ditto"

    def fit(self, run, names, fed, r, epochs):
        local = {n: run.train(n, fed.glob, epochs, run.seed_of(r, i)) for i, n in enumerate(names)}
        for i, n in enumerate(names):
            seed = run.seed_of(r, i) + 7
            fed.personal[n] = run.train(n, fed.personal[n], epochs, seed, prox=(fed.glob, DITTO_LAMBDA))
        fed.glob = average_state(*(local[n] for n in names), weights=run.weights(names))
        return dict(fed.personal)


@dataclass(frozen=True)
class Pooled(Central):
    """One model on every site's cases (the privacy-free upper reference).

    Args:
        budget: ``steps`` (the mean site's steps per round) or ``epochs`` (passes over all cases).
    """

    budget: str = "steps"
    kind = "pooled"
    moves_models = False

    def fit(self, run, names, fed, r, epochs):
        pooled = torch.utils.data.ConcatDataset([run.data[n]["train"] for n in names])
        steps_per_epoch = [math.ceil(len(run.data[n]["train"]) / run.base.train.batch_size) for n in names]
        set_determinism(seed=run.seed_of(r, 0))
        net = run.net(fed.glob)
        loader = run.loader(pooled)
        steps = round(sum(steps_per_epoch) / len(names)) * epochs if self.budget == "steps" else len(loader) * epochs
        t = run.base.train
        hist = supervised_train(net, loader, math.ceil(steps / len(loader)), t.lr, t.weight_decay, run.device,
                                max_steps=steps, amp=precision(run.base, run.device),
                                clicks=click_simulator(run.base, run.seed_of(r, 0)))
        share = [{k: v / len(names) for k, v in cost_of(hist).items()}]  # one model for all: each site its share
        for n in names:
            run.spent.setdefault(n, []).append(share)
        fed.glob = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        return dict.fromkeys(names, fed.glob)


ARMS: dict[str, Method] = {
    "local": ServerLocal(),
    "local2x": ServerLocal(epochs=2),
    "local2x-noaug": ServerLocal(epochs=2, train={"augment": "flip"}),  # the augmentation ablation of the rival
    "fedavg": FedAvg(),
    "fedavg-ft": FedAvg(serve="local"),
    "ditto": Ditto(),
    # GML as in the group's earlier papers: plain mutual KL, no contrastive term, no trust mask or ramp
    "gml": Gossip(dcml={"lambda_con": 0.0, "kl_mask": "none", "kl_rampup": 0.0, "fg_weight_max": 1.0}),
    "gcml": Gossip(),  # the product's defaults: performance partner choice, DCML, gate
    "gcml-uniform": Gossip(policy="uniform"),
    "gcml-nokl": Gossip(dcml={"lambda_kl": 0.0}),
    "gcml-nocon": Gossip(dcml={"lambda_con": 0.0}),
    "gcml-nogate": Gossip(gate=False),
    "gcml-noaug": Gossip(train={"augment": "flip"}),  # the flip alone, as before train.augment
    "gcml-unl": Gossip(dcml={"lambda_unl": 0.25}),  # and the unlabelled term, at the same compute
    "gcml-fullbatch": Gossip(dcml={"batch_size": "train"}),  # train.batch_size per step: half local2x's steps
    "gcml-teacher": Gossip(dcml={"train_incoming": False}),  # the partner's model only teaches: 1.5x the crops
    "pooled": Pooled(),
    "pooled-epochs": Pooled(budget="epochs"),
    # dcml.choose off: mutual learning every round, as GCML did before the choice became the default
    "gcml-mutual": Gossip(dcml={"choose": False}),
    # dcml.pulled_candidate: the partner's model as pulled is a candidate too (served unchanged if it wins)
    "gcml-pulled": Gossip(dcml={"pulled_candidate": True}),
    # dcml.shown_worse: alone: a partner shown worse on our cases never teaches; the site trains alone
    "gcml-alone": Gossip(dcml={"shown_worse": "alone"}),
    # dcml.mutual_bar: mean: mutual learning only beside a partner at least as good on our cases in the mean
    "gcml-mean": Gossip(dcml={"mutual_bar": "mean"}),
    # dcml.interval: student: the choice's interval from Student's t (n - 1 degrees of freedom), not the normal
    "gcml-t": Gossip(dcml={"interval": "student"}),
}
# run when named (--methods); the default run: the 18 above
OPT_IN = ("gcml-mutual", "gcml-pulled", "gcml-alone", "gcml-mean", "gcml-t")
DEFAULT_METHODS = [m for m in ARMS if m not in OPT_IN]
