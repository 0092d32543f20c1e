"""``gcml simulate``: GCML against local training, FedAvg, GML and pooled training, in one process.

Every method runs on the same sites, splits and seeds, from the same per-site warm-up models, with
the same local epochs per round (equal optimizer steps for each site's model). The code is the
servers' code: :func:`gcml_app.trainer.train_supervised`, :func:`gcml_app.dcml.dcml_train`, the gate
(:func:`gcml_app.gate.select`), partner choice (:func:`gcml_app.gossip.peers.order_peers`) and the
wire format (:func:`gcml_app.gossip.payload.encode_weights` / ``verify_weights``); only HTTP is left out.

Methods (one round each):

- ``local``: every site fine-tunes its own model alone;
- ``fedavg``: every site trains the global model, uploads it; the server averages weighted by training
  cases and every site downloads the average (traffic: 2 x sites x model bytes per round);
- ``gml``: every site pulls one partner's model (uniform choice) and trains both by mutual learning
  without the contrastive term (``lambda_con = 0``); it keeps its own side, no gate;
- ``gcml``: the same with full DCML and the validation gate (served, DCML-L, DCML-I, average);
- ``pooled``: one model on every site's training cases (the upper reference; it moves data, not models).

Per method, round and site: test Dice per label (sliding window on the site's held-out test cases)
and the bytes the site sent and received. Round 0 is the shared warm-up.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism
from tqdm import tqdm

from gcml_app.config import SiteConfig
from gcml_app.dcml import average_state, dcml_train
from gcml_app.evaluate import dice_per_label, mean_dice
from gcml_app.gate import SERVED, select
from gcml_app.gossip.payload import encode_weights, our_arch, verify_weights
from gcml_app.gossip.peers import PeerBook, order_peers
from gcml_app.network import build_network
from gcml_app.sim.data import SimSite
from gcml_app.trainer import train_supervised
from gcml_app.transforms import train_transforms, val_transforms

__all__ = ["METHODS", "Federation", "simulate"]

State = dict[str, torch.Tensor]


@dataclass
class _Data:
    """A site's cached datasets and training loader."""

    site: SimSite
    train: CacheDataset
    val: CacheDataset
    test: CacheDataset
    loader: DataLoader


class Federation:
    """The sites' data and the operations every method is built from.

    Args:
        cfg: one site config for all sites (network, transforms, train, dcml, gossip settings).
        sites: the sites and their splits.
        transport: wire dtype of every model exchange (``float32`` or ``float16``).
        seed: seeds every (round, site) step, so all methods draw the same batches there.
    """

    def __init__(self, cfg: SiteConfig, sites: list[SimSite], transport: str = "float32", seed: int = 0):
        self.cfg, self.sites, self.transport, self.seed = cfg, sites, transport, seed
        self.device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.names = [s.name for s in sites]
        self.arch = our_arch(cfg)
        self.data = {}
        for s in sites:
            train = CacheDataset(self._files(s.train), train_transforms(cfg), progress=False)
            self.data[s.name] = _Data(
                s, train, CacheDataset(self._files(s.val), val_transforms(cfg), progress=False),
                CacheDataset(self._files(s.test), val_transforms(cfg), progress=False),
                DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True, num_workers=0),
            )
        pooled = CacheDataset([f for s in sites for f in self._files(s.train)], train_transforms(cfg), progress=False)
        self.pooled_loader = DataLoader(pooled, batch_size=cfg.train.batch_size, shuffle=True, num_workers=0)

    @staticmethod
    def _files(cases):
        return [{"image": c["image"], "label": c["label"]} for c in cases]

    def _seed(self, r: int, i: int) -> None:
        set_determinism(seed=self.seed * 100_003 + r * 101 + i)

    def _net(self, state: State | None = None) -> torch.nn.Module:
        net = build_network(self.cfg)
        if state is not None:
            net.load_state_dict(state)
        return net.to(self.device)

    def init_state(self) -> State:
        torch.manual_seed(self.seed)
        return {k: v.clone() for k, v in build_network(self.cfg).state_dict().items()}

    def train(self, state: State, loader: DataLoader, epochs: int, r: int, i: int) -> State:
        """Supervised DiceCE fine-tuning, as a site's local round does."""
        self._seed(r, i)
        net = self._net(state)
        train_supervised(net, loader, self.cfg, epochs, self.device, None)
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    def mutual(self, local: State, incoming: State, site: str, epochs: int, r: int, i: int,
               contrastive: bool) -> tuple[State, State]:
        """DCML (or, without the contrastive term, GML's mutual learning) of two models on one site."""
        self._seed(r, i)
        dcfg = self.cfg.dcml if contrastive else self.cfg.dcml.model_copy(update={"lambda_con": 0.0})
        a, b, _ = dcml_train(self._net(local), self._net(incoming), self.data[site].loader, dcfg, epochs,
                             self.cfg.train.lr, self.cfg.train.weight_decay, self.device, None)
        return ({k: v.detach().cpu() for k, v in a.state_dict().items()},
                {k: v.detach().cpu() for k, v in b.state_dict().items()})

    def dice(self, state: State, site: str, split: str = "test") -> dict[str, float]:
        v = self.cfg.validation
        ds = getattr(self.data[site], split)
        return dice_per_label(self._net(state), ds, list(self.cfg.labels), self.cfg.roi_size, v.sw_batch_size,
                              v.overlap, self.device)

    def send(self, state: State) -> bytes:
        return encode_weights(state, self.transport, arch=self.arch)

    def receive(self, data: bytes) -> State:
        """The receiving side's checks (tensors only, our architecture, finite), as in a real pull."""
        return verify_weights(data, self.cfg, self.arch)


Traffic = dict[str, dict[str, int]]
Method = Callable[[Federation, dict[str, State], int, random.Random], tuple[dict[str, State], Traffic, int]]
"""One round: ``(new states, per-site bytes sent/received, bytes moved over the network)``."""


def _no_traffic(names):
    return {n: {"sent": 0, "received": 0} for n in names}


def _local(fed: Federation, states, r, rng):
    e = fed.cfg.train.epochs
    return ({n: fed.train(states[n], fed.data[n].loader, e, r, i) for i, n in enumerate(fed.names)},
            _no_traffic(fed.names), 0)


def _fedavg(fed: Federation, states, r, rng):
    traffic = _no_traffic(fed.names)
    uploads, weights = [], []
    for i, n in enumerate(fed.names):
        trained = fed.train(states[n], fed.data[n].loader, fed.cfg.train.epochs, r, i)
        wire = fed.send(trained)
        traffic[n]["sent"] += len(wire)
        uploads.append(fed.receive(wire))
        weights.append(len(fed.data[n].site.train))
    total = sum(weights)
    glob = {k: sum(u[k].float() * (w / total) for u, w in zip(uploads, weights)).to(uploads[0][k].dtype)
            for k in uploads[0]}
    wire = fed.send(glob)
    out = {}
    for n in fed.names:
        traffic[n]["received"] += len(wire)
        out[n] = fed.receive(wire)
    moved = sum(t["sent"] + t["received"] for t in traffic.values())  # every byte goes through the server
    return out, traffic, moved


def _gossip(contrastive: bool, gate: bool) -> Method:
    def round_(fed: Federation, states, r, rng):
        traffic = _no_traffic(fed.names)
        wire = {n: fed.send(states[n]) for n in fed.names}  # every site serves its model as of the round start
        out = {}
        for i, n in enumerate(fed.names):
            others = [p for p in fed.names if p != n]
            peer = order_peers(others, PeerBook(Path("unused")), fed.cfg.gossip, rng)[0][0]
            traffic[peer]["sent"] += len(wire[peer])
            traffic[n]["received"] += len(wire[peer])
            local, incoming = fed.mutual(states[n], fed.receive(wire[peer]), n, fed.cfg.train.epochs, r, i, contrastive)
            if not gate:
                out[n] = local
                continue
            cands = {SERVED: states[n], "dcml_local": local, "dcml_incoming": incoming,
                     "average": average_state(local, incoming)}
            winner = select({k: fed.dice(s, n, "val") for k, s in cands.items()}, served=SERVED).winner
            out[n] = cands[winner]
        return out, traffic, sum(t["received"] for t in traffic.values())
    return round_


def _pooled(fed: Federation, states, r, rng):
    glob = fed.train(states[fed.names[0]], fed.pooled_loader, fed.cfg.train.epochs, r, 0)
    return {n: glob for n in fed.names}, _no_traffic(fed.names), 0


METHODS: dict[str, Method] = {
    "local": _local,
    "fedavg": _fedavg,
    "gml": _gossip(contrastive=False, gate=False),
    "gcml": _gossip(contrastive=True, gate=True),
    "pooled": _pooled,
}


def simulate(fed: Federation, rounds: int, methods: list[str], out: str | Path,
             warmup_epochs: int | None = None) -> dict[str, Any]:
    """Run every method for ``rounds`` rounds from the same warm-up; write results.json/csv and plots.

    Returns:
        the results (see the README for the schema).

    Raises:
        ValueError: an unknown method or ``rounds < 1``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: found {methods}; expected a non-empty list from {list(METHODS)}")
    if rounds < 1:
        raise ValueError(f"rounds: found {rounds}; expected at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = fed.names
    warm = warmup_epochs or fed.cfg.train.epochs
    init = fed.init_state()
    t0 = time.perf_counter()
    warmup = {n: fed.train(init, fed.data[n].loader, warm, 0, i) for i, n in enumerate(names)}
    # pooled warms up on all data, so that it stays the all-data reference from round 0
    pooled0 = fed.train(init, fed.pooled_loader, warm, 0, 0)
    warm_dice = {n: fed.dice(warmup[n], n) for n in names}
    pooled_dice = {n: fed.dice(pooled0, n) for n in names}
    model_bytes = {t: len(encode_weights(init, t, arch=fed.arch)) for t in ("float32", "float16")}
    rows: list[dict[str, Any]] = []
    moved: dict[str, list[int]] = {}  # bytes over the network per round, per method

    def add(method, r, n, dice, traffic, seconds):
        rows.append({"method": method, "round": r, "site": n, "test_mean": round(mean_dice(dice), 4),
                     **{f"test_{k}": round(v, 4) for k, v in dice.items()}, "bytes_sent": traffic["sent"],
                     "bytes_received": traffic["received"], "seconds": round(seconds, 2)})

    bar = tqdm(total=rounds * len(methods), desc="simulate", unit="round")
    for m in methods:
        states = {n: pooled0 for n in names} if m == "pooled" else dict(warmup)
        for n in names:
            add(m, 0, n, pooled_dice[n] if m == "pooled" else warm_dice[n], {"sent": 0, "received": 0}, 0.0)
        rng = random.Random(fed.seed)
        moved[m] = [0]
        for r in range(1, rounds + 1):
            t = time.perf_counter()
            states, traffic, nbytes = METHODS[m](fed, states, r, rng)
            dt = time.perf_counter() - t
            moved[m].append(nbytes)
            for n in names:
                add(m, r, n, fed.dice(states[n], n), traffic[n], dt / len(names))
            bar.set_postfix(method=m, round=r)
            bar.update()
    bar.close()

    summary = {}
    for m in methods:
        last = {x["site"]: x["test_mean"] for x in rows if x["method"] == m and x["round"] == rounds}
        summary[m] = {
            "final_mean": round(sum(last.values()) / len(last), 4),
            "final_worst": min(last.values()),
            "worst_site": min(last, key=last.get),
            "per_site": last,
            "bytes_per_round": moved[m][1:],
            "total_bytes": sum(moved[m]),
            "seconds": round(sum(x["seconds"] for x in rows if x["method"] == m), 1),
        }
    result = {
        "config": {"sites": names, "rounds": rounds, "methods": methods, "epochs": fed.cfg.train.epochs,
                   "warmup_epochs": warm, "transport": fed.transport, "seed": fed.seed,
                   "cases": {s.name: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for s in fed.sites},
                   "network": fed.cfg.network.model_dump(mode="json"), "roi_size": list(fed.cfg.roi_size)},
        "model_bytes": model_bytes,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for x in rows for k in x))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    _plot(rows, moved, methods, rounds, out)
    return result


def _plot(rows, moved, methods, rounds, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for m in methods:
        per_round = [[x["test_mean"] for x in rows if x["method"] == m and x["round"] == r] for r in range(rounds + 1)]
        a.plot(range(rounds + 1), [sum(v) / len(v) for v in per_round], "o-", label=m)
        b.plot(range(rounds + 1), [min(v) for v in per_round], "o-", label=m)
    for ax, title in ((a, "mean over sites"), (b, "worst site")):
        ax.set_title(f"test Dice, {title}")
        ax.set_xlabel("round (0 = local warm-up)")
        ax.set_xticks(range(rounds + 1))
        ax.grid(alpha=0.3)
    a.set_ylabel("mean Dice over labels")
    a.legend()
    fig.tight_layout()
    fig.savefig(out / "dice_vs_round.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        xs = [sum(moved[m][: r + 1]) / 1e6 for r in range(rounds + 1)]
        ys = []
        for r in range(rounds + 1):
            rr = [x["test_mean"] for x in rows if x["method"] == m and x["round"] == r]
            ys.append(sum(rr) / len(rr))
        ax.plot(xs, ys, "o-", label=m)
    ax.set_xlabel("bytes moved in the federation (MB, cumulative)")
    ax.set_ylabel("mean test Dice over sites")
    ax.set_title("accuracy vs communication")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dice_vs_bytes.png", dpi=100)
    plt.close(fig)
