"""One seed of ``gcml simulate``: the sites' data, cached once, their state folders, and what methods share.

Controls every method keeps (docs/design.md, "Measuring"): round ``r`` of site ``i`` trains from the
seed :meth:`Run.seed_of` gives, and every loader is built after that seed is set; every site's
validation and test cases are the same in every method.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism
from pydantic import ValidationError

from gcml_app.config import ConfigError, SiteConfig
from gcml_app.config.site import format_errors
from gcml_app.ml.clicks import click_curve, click_simulator
from gcml_app.ml.device import precision, sw_batch_size, train_device
from gcml_app.ml.evaluate import dice_per_case, mean_over_cases
from gcml_app.ml.network import build_network
from gcml_app.ml.supervised import proximal, supervised_train
from gcml_app.ml.transforms import train_transforms, val_transforms
from gcml_app.rounds.loop import initial_state, run_round
from gcml_app.rounds.producers import State
from gcml_app.sim.data import SimSite
from gcml_app.store import ModelStore
from gcml_app.util.files import atomic_write

__all__ = ["Node", "Run"]

CLICKS = (0, 1, 3, 5, 10)  # the clicks after which gcml simulate --interactive reports test Dice
NOC = (0.85, 0.9)          # the Dice thresholds whose NoC (clicks needed) it reports
NOC_CAP = 20               # NoC of a case that never reaches the threshold

_TOKEN = "simulated-partner-token"
# what only a deployment has (whom it talks to, how it serves and guards itself): the simulator's own
_DEPLOYMENT_ONLY = ("security", "serve", "finetune")
_DEPLOYMENT_GOSSIP = ("peers", "adopt_from", "ca_bundle", "client_cert", "client_key", "interval_s", "jitter")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _resolve(dcml: dict, raw: dict) -> dict:
    """A method's DCML settings with ``batch_size: "train"`` (``gcml-fullbatch``) read as the config's
    ``train.batch_size``."""
    if dcml.get("batch_size") == "train":
        return {**dcml, "batch_size": raw.get("train", {}).get("batch_size", 2)}
    return dcml


class Node:
    """One site in one method: its config, state folder and store."""

    def __init__(self, site: SimSite, cfg: SiteConfig):
        self.site, self.cfg, self.name = site, cfg, site.name
        self.store = ModelStore(cfg.state_dir / "models")
        self.cases = site.train + site.val
        split = {c["id"]: "train" for c in site.train} | {c["id"]: "val" for c in site.val}
        atomic_write(cfg.state_dir / "split.json", json.dumps(split, indent=1, sort_keys=True).encode())


class Run:
    """One seed of the comparison: the sites' data, cached once, and the operations methods share."""

    def __init__(self, cfg: SiteConfig, sites: list[SimSite], root: Path, seed: int, epochs: int,
                 warmup_epochs: int, transport: str, gate: bool):
        self.base, self.sites, self.root, self.seed = cfg, sites, root, seed
        self.epochs, self.warmup_epochs, self.transport, self.gate = epochs, warmup_epochs, transport, gate
        self.names = [s.name for s in sites]
        self.device = train_device(cfg)
        self.cfgs = {s.name: self.site_cfg(s, root / "warmup") for s in sites}
        self.data = {}
        for s in sites:
            c = self.cfgs[s.name]
            self.data[s.name] = {
                "train": CacheDataset(_files(s.train), train_transforms(c), progress=False),
                "val": CacheDataset(_files(s.val), val_transforms(c), progress=False),
                "test": CacheDataset(_files(s.test), val_transforms(c), progress=False),
            }
        self.model_bytes: dict[str, int] = {}  # what a partner downloads; set from the first published model
        self._test_dice: dict[tuple[str, str], dict[str, float]] = {}  # (site, weights sha256) -> test Dice
        self.spent: dict[str, list[list[dict]]] = {}  # site -> training histories of a central round (its cost)

    def site_cfg(self, site: SimSite, folder: Path, epochs: int = 1, gate: bool | None = None,
                 policy: str | None = None, dcml: dict | None = None, train: dict | None = None) -> SiteConfig:
        """A site's config in ``folder`` for a method: ``epochs`` times ``--epochs`` per round, its gate
        (``None``: ``--gate``), partner policy, DCML and training settings; the site's own ``site.yaml`` on top."""
        raw = self.base.model_dump(mode="json")
        peers = [{"name": n, "url": f"http://127.0.0.1/simulated/{n}", "token": _TOKEN}
                 for n in self.names if n != site.name]
        for key in _DEPLOYMENT_ONLY:  # replaced, not validated against the simulator's site names
            raw.pop(key, None)
        raw["gossip"] = {k: v for k, v in raw.get("gossip", {}).items() if k not in _DEPLOYMENT_GOSSIP}
        raw = _merge(raw, {
            "site": site.name, "state_dir": str(folder / site.name),
            # one preprocessed-case cache for every method of the seed: the phantoms are the same files
            "train": {"epochs": self.epochs * epochs, "cache_dir": str(self.root / "cache"), **(train or {})},
            "validation": {"gate": self.gate if gate is None else gate, "min_cases": 1},
            "gossip": {"peers": peers, "policy": policy or self.base.gossip.policy, "transport": self.transport,
                       "epochs": self.epochs},
            "dcml": _resolve(dcml or {}, raw), **site.settings,
        })
        try:
            return SiteConfig.model_validate(raw)
        except ValidationError as e:
            lines = "; ".join(format_errors(e))
            raise ConfigError(f"site {site.name} of the simulation: {lines}") from None

    def warm_up(self) -> tuple[Path, Node]:
        """Every site's round 0 (``warmup_epochs`` alone, from the round's seed) in ``<root>/warmup``: the
        start the servers' methods copy. Returns that folder and the last site's node."""
        warm = self.root / "warmup"
        shutil.rmtree(warm, ignore_errors=True)
        for i, s in enumerate(self.sites):
            nd = Node(s, self.cfgs[s.name])
            run_round(nd.cfg, nd.store, nd.cases, epochs=self.warmup_epochs,
                      extra={"trigger": "simulate", "stage": "warmup"}, seed=self.seed_of(0, i))
        return warm, nd

    def seed_of(self, r: int, i: int) -> int:
        return self.seed * 100_003 + r * 101 + i

    # ------------------------------------------------------------------ shared operations
    def net(self, state: State | None = None) -> torch.nn.Module:
        net = build_network(self.base)
        if state is not None:
            net.load_state_dict(state)
        return net.to(self.device)

    def loader(self, data) -> DataLoader:
        """A shuffling loader over ``data``, built after the round's seed is set, as :func:`run_round` builds it.

        MONAI's ``DataLoader`` (``num_workers=0``) seeds the random transforms (crops, flips) from
        torch's global generator when it is built, and torch seeds that generator randomly in every
        process: a loader built once and reused would draw crops the round's seed does not control.
        """
        return DataLoader(data, batch_size=self.base.train.batch_size, shuffle=True, num_workers=0)

    def train(self, name: str, state: State, epochs: int, seed: int, prox: tuple[State, float] | None = None) -> State:
        """Supervised passes over a site's training cases from ``state``, with the round's seed.

        Args:
            prox: ``(anchor, weight)``: add Ditto's proximal term (:func:`~gcml_app.ml.supervised.proximal`).
        """
        set_determinism(seed=seed)
        net = self.net(state)
        loader = self.loader(self.data[name]["train"])
        t = self.cfgs[name].train
        penalty = proximal(net, prox[0], prox[1], self.device) if prox is not None else None
        hist = supervised_train(net, loader, epochs, t.lr, t.weight_decay, self.device, penalty=penalty,
                                amp=precision(self.cfgs[name], self.device), clicks=click_simulator(self.cfgs[name], seed))  # the precision site rounds train in
        self.spent.setdefault(name, []).append(hist)
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    def weights(self, names: list[str]) -> list[float]:
        """FedAvg's weights: each site's number of training cases."""
        return [len(self.data[n]["train"]) for n in names]

    def scores(self, name: str, state: State, split: str) -> list[dict[str, float]]:
        c = self.cfgs[name]
        return dice_per_case(self.net(state), self.data[name][split], list(c.labels), c.roi_size,
                             sw_batch_size(c, self.device), c.validation.overlap, self.device,
                             precision(c, self.device))

    def test_dice(self, node: Node) -> dict[str, float]:
        """Test Dice of the site's served model; evaluated once per distinct set of weights (by sha256).

        A keep leaves the served model as it was, and the shared warm-up is served by several methods:
        the evaluation is deterministic, so those are read back instead of run again.
        """
        served = node.store.served()
        key = (node.name, served.sha256)
        if key not in self._test_dice:
            self._test_dice[key] = mean_over_cases(self.scores(node.name, node.store.load(served.version), "test"))
        return self._test_dice[key]

    def click_curve(self, name: str, state: State) -> list[dict]:
        """Per test case of site ``name``: Dice after :data:`CLICKS` simulated clicks and NoC@85/90 (capped at
        :data:`NOC_CAP`), by the DeepEdit/DeepGrow protocol (:func:`~gcml_app.ml.clicks.click_curve`)."""
        c = self.cfgs[name]
        return click_curve(self.net(state), self.data[name]["test"], len(c.labels), c.roi_size, CLICKS, NOC,
                           NOC_CAP, c.interactive.sigma, sw_batch_size(c, self.device), c.validation.overlap,
                           self.device, precision(c, self.device))

    def init_state(self) -> State:
        """The central methods' shared start: the seed's random weights, or ``network.init_from``'s."""
        if self.base.network.init_from is not None:
            return initial_state(self.base)[0]
        torch.manual_seed(self.seed)
        return {k: v.clone() for k, v in build_network(self.base).state_dict().items()}


def _files(cases):
    return [{"image": c["image"], "label": c["label"]} for c in cases]


