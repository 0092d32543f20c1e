"""``gcml simulate``: a controlled, multi-seed comparison of GCML with local training and FL baselines.

Every site of every method is a real site state folder (model store, working model, fixed split,
partner book, cached partner models). The methods that hospitals run go through the servers' own
round code (:mod:`gcml_app.rounds.loop`): ``local`` and ``local2x`` through :func:`run_round`, every
gossip method through :func:`gossip_round` with an in-memory partner (:class:`MemoryPartner`) in
place of HTTP; manifest, payload encoding and every payload check are the servers'. The baselines
that no server runs (FedAvg, FedAvg+FT, Ditto, pooled) are built from the same training step and
are served through the same gate (:func:`gcml_app.ml.gate.select`).

Controls (docs/design.md, "Measuring"):

- every site model gets the same optimizer steps per round in every method (``--epochs`` passes
  over the site's training cases), except ``local2x`` (twice: the compute of DCML's two models)
  and Ditto (a global and a personal model, also twice); ``pooled`` is reported step-matched (the
  mean site's steps) and epoch-matched (``--epochs`` passes over everyone's cases);
- round ``r`` of site ``i`` draws its batches from the same seed in every method;
- one gate policy for every method (``--gate on|off``); ``gcml-nogate`` is the ablation;
- gossip methods and ``local`` start from the same per-site warm-up (``--warmup-epochs``);
  FedAvg, Ditto and pooled start from one shared initialisation and get the warm-up's steps as
  their own first rounds, so that round 0 costs every method the same.

Per seed, method, round and site: the *served* model's test Dice per label on the site's held-out
test cases, and the bytes the site sent and received.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from tqdm import tqdm

from gcml_app.config import SiteConfig
from gcml_app.errors import NothingToShare
from gcml_app.federation.client import PeerManifest, Pulled, check_payload
from gcml_app.federation.payload import encode_weights, manifest_body
from gcml_app.ml.dcml import supervised_step, supervised_train
from gcml_app.ml.evaluate import dice_per_case, mean_dice, mean_over_cases
from gcml_app.ml.gate import SERVED, select
from gcml_app.ml.network import arch_fingerprint, build_network
from gcml_app.ml.transforms import train_transforms, val_transforms
from gcml_app.rounds.loop import gossip_round, run_round
from gcml_app.sim.data import SimSite
from gcml_app.store import ModelStore
from gcml_app.util.files import atomic_write, sha256_bytes

__all__ = ["ARMS", "Arm", "MemoryPartner", "simulate"]

State = dict[str, torch.Tensor]
# MONAI warns on every image reader it builds that an optional GPU DICOM decoder is missing: noise here.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
_TOKEN = "simulated-partner-token"
DITTO_LAMBDA = 0.1  # Ditto's proximal weight (Li et al. 2021 tune it in {0.01, 0.1, 1, 2}; 0.1 is their common pick)


@dataclass(frozen=True)
class Arm:
    """One method of the comparison.

    Args:
        kind: ``round`` (the servers' local round), ``gossip`` (the servers' gossip round),
            ``fedavg``, ``ditto`` or ``pooled``.
        epochs: multiple of ``--epochs`` per round (``local2x``: 2).
        dcml: DCML settings changed for this arm (ablations).
        policy: partner choice of gossip arms (``None``: the config's, by default ``performance``).
        gate: ``False`` serves every round's model unchecked whatever ``--gate`` says.
        serve: FedAvg: ``global`` (the average) or ``local`` (the site's fine-tuned copy: FedAvg+FT).
        pooled: ``steps`` (the mean site's steps per round) or ``epochs`` (passes over all cases).
    """

    kind: str
    epochs: int = 1
    dcml: dict = field(default_factory=dict)
    policy: str | None = None
    gate: bool | None = None
    serve: str = "global"
    pooled: str = "steps"


ARMS: dict[str, Arm] = {
    "local": Arm("round"),
    "local2x": Arm("round", epochs=2),
    "fedavg": Arm("fedavg"),
    "fedavg-ft": Arm("fedavg", serve="local"),
    "ditto": Arm("ditto"),
    # GML as in the group's earlier papers: plain mutual KL, no contrastive term, no trust mask or ramp
    "gml": Arm("gossip", dcml={"lambda_con": 0.0, "kl_mask": "none", "kl_rampup": 0.0, "fg_weight_max": 1.0}),
    "gcml": Arm("gossip"),  # the product's defaults: performance partner choice, DCML, gate
    "gcml-uniform": Arm("gossip", policy="uniform"),
    "gcml-nokl": Arm("gossip", dcml={"lambda_kl": 0.0}),
    "gcml-nocon": Arm("gossip", dcml={"lambda_con": 0.0}),
    "gcml-nogate": Arm("gossip", gate=False),
    "pooled": Arm("pooled"),
    "pooled-epochs": Arm("pooled", pooled="epochs"),
}
DEFAULT_METHODS = list(ARMS)


class MemoryPartner:
    """A partner site in the same process: what its server's peer surface would answer, without HTTP.

    The manifest and the payload are built as ``GET /gcml/peer/manifest`` and ``/gcml/peer/model``
    build them; the received bytes go through the client's checks (:func:`check_payload`).
    """

    def __init__(self, name: str, store: ModelStore, transport: str):
        self.name, self.store, self.transport = name, store, transport

    def _payload(self, version: int) -> bytes:
        if self.transport == "float32":
            return self.store.read_bytes(version)
        return encode_weights(self.store.load(version), self.transport, arch=self.store.manifest(version).arch)

    def manifest(self) -> PeerManifest:
        m = self.store.served()
        if m is None:
            raise NothingToShare(self.name, "no published model yet")
        data = self._payload(m.version)
        return PeerManifest.model_validate(manifest_body(self.name, m, sha256_bytes(data), len(data), self.transport))

    def fetch(self, manifest: PeerManifest, cfg: SiteConfig, ours: str, etag: str | None = None) -> Pulled | None:
        if etag is not None and etag == manifest.sha256:
            return None
        t0 = time.perf_counter()
        spool = cfg.state_dir / "gossip"
        spool.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".pull-{self.name}.", dir=spool)
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload(manifest.version))
        try:
            return check_payload(self.name, manifest, Path(tmp), cfg, ours, time.perf_counter() - t0)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        pass


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


class _Node:
    """One site in one method: its config, state folder and store."""

    def __init__(self, site: SimSite, cfg: SiteConfig):
        self.site, self.cfg, self.name = site, cfg, site.name
        self.store = ModelStore(cfg.state_dir / "models")
        self.cases = site.train + site.val
        split = {c["id"]: "train" for c in site.train} | {c["id"]: "val" for c in site.val}
        atomic_write(cfg.state_dir / "split.json", json.dumps(split, indent=1, sort_keys=True).encode())


class _Run:
    """One seed of the comparison: the sites' data, cached once, and the operations methods share."""

    def __init__(self, cfg: SiteConfig, sites: list[SimSite], root: Path, seed: int, epochs: int,
                 warmup_epochs: int, transport: str, gate: bool):
        self.base, self.sites, self.root, self.seed = cfg, sites, root, seed
        self.epochs, self.warmup_epochs, self.transport, self.gate = epochs, warmup_epochs, transport, gate
        self.names = [s.name for s in sites]
        self.device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.cfgs = {s.name: self.site_cfg(s, root / "warmup", Arm("round")) for s in sites}
        self.data = {}
        for s in sites:
            c = self.cfgs[s.name]
            self.data[s.name] = {
                "train": CacheDataset(_files(s.train), train_transforms(c), progress=False),
                "val": CacheDataset(_files(s.val), val_transforms(c), progress=False),
                "test": CacheDataset(_files(s.test), val_transforms(c), progress=False),
            }
        self.arch = arch_fingerprint(cfg, build_network(cfg).state_dict())
        self.model_bytes: dict[str, int] = {}  # what a partner downloads; set from the first published model
        self._test_dice: dict[tuple[str, str], dict[str, float]] = {}  # (site, weights sha256) -> test Dice

    def site_cfg(self, site: SimSite, folder: Path, arm: Arm) -> SiteConfig:
        raw = self.base.model_dump(mode="json")
        peers = [{"name": n, "url": f"http://127.0.0.1/simulated/{n}", "token": _TOKEN}
                 for n in self.names if n != site.name]
        raw = _merge(raw, {
            "site": site.name, "state_dir": str(folder / site.name),
            "train": {"epochs": self.epochs * arm.epochs},
            "validation": {"gate": self.gate if arm.gate is None else arm.gate, "min_cases": 1},
            "gossip": {"peers": peers, "policy": arm.policy or self.base.gossip.policy, "transport": self.transport,
                       "epochs": self.epochs},
            "dcml": arm.dcml, **site.settings,
        })
        return SiteConfig.model_validate(raw)

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

    def train(self, name: str, state: State, epochs: int, seed: int, prox: State | None = None) -> State:
        """Supervised passes over a site's training cases (Ditto: plus its proximal term to ``prox``)."""
        set_determinism(seed=seed)
        net = self.net(state)
        loader = self.loader(self.data[name]["train"])
        t = self.cfgs[name].train
        if prox is None:
            supervised_train(net, loader, epochs, t.lr, t.weight_decay, self.device)
        else:
            _ditto_train(net, loader, epochs, t.lr, prox, self.device)
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    def scores(self, name: str, state: State, split: str) -> list[dict[str, float]]:
        c = self.cfgs[name]
        return dice_per_case(self.net(state), self.data[name][split], list(c.labels), c.roi_size,
                             c.validation.sw_batch_size, c.validation.overlap, self.device)

    def serve(self, node: _Node, state: State, produced_by: str) -> bool:
        """The gate for methods no server runs: the same :func:`select` on the same validation cases."""
        served = node.store.served()
        scores = {"candidate": self.scores(node.name, state, "val")}
        if served is not None:
            scores[SERVED] = self.scores(node.name, node.store.load(served.version), "val")
        d = select(scores, SERVED if served is not None else None, node.cfg.validation)
        if d.publish or not node.cfg.validation.gate:
            node.store.publish(state, arch=self.arch, val_dice=d.scores["candidate"], n_train=len(node.site.train),
                               n_val=len(node.site.val), produced_by=produced_by, site=node.name)
            return True
        node.store.record("keep", version=served.version, **d.as_record())
        return False

    def test_dice(self, node: _Node) -> dict[str, float]:
        """Test Dice of the site's served model; evaluated once per distinct set of weights (by sha256).

        A keep leaves the served model as it was, and the shared warm-up is served by several methods:
        the evaluation is deterministic, so those are read back instead of run again.
        """
        served = node.store.served()
        key = (node.name, served.sha256)
        if key not in self._test_dice:
            self._test_dice[key] = mean_over_cases(self.scores(node.name, node.store.load(served.version), "test"))
        return self._test_dice[key]

    def init_state(self) -> State:
        torch.manual_seed(self.seed)
        return {k: v.clone() for k, v in build_network(self.base).state_dict().items()}


def _files(cases):
    return [{"image": c["image"], "label": c["label"]} for c in cases]


def _ditto_train(net, loader, epochs: int, lr: float, anchor: State, device) -> None:
    """Ditto's personal update: DiceCE plus ``DITTO_LAMBDA / 2 * ||v - w_global||^2``."""
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    ref = {k: v.to(device) for k, v in anchor.items()}
    params = dict(net.named_parameters())
    for _ in range(epochs):
        net.train()
        for b in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(b["image"].to(device)), b["label"].to(device))
            loss = loss + DITTO_LAMBDA / 2 * sum(((p - ref[k]) ** 2).sum() for k, p in params.items())
            loss.backward()
            opt.step()


def _average(states: list[State], weights: list[float]) -> State:
    total = sum(weights)
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype)
            for k in states[0]}


# ---------------------------------------------------------------------------------------- one method
def _run_arm(run: _Run, method: str, rounds: int, warm: Path, emit) -> None:
    arm = ARMS[method]
    folder = run.root / method
    shutil.rmtree(folder, ignore_errors=True)
    nodes = {}
    for s in run.sites:
        cfg = run.site_cfg(s, folder, arm)
        if arm.kind in ("round", "gossip"):  # the shared warm-up: store, working model, split
            shutil.copytree(warm / s.name, cfg.state_dir)
        nodes[s.name] = _Node(s, cfg)
    if arm.kind == "round":
        _rounds_local(run, nodes, rounds, emit, method)
    elif arm.kind == "gossip":
        _rounds_gossip(run, nodes, rounds, emit, method)
    else:
        _rounds_central(run, nodes, rounds, emit, method, arm)


def _rounds_local(run: _Run, nodes, rounds, emit, method):
    emit(method, 0, {n: (run.test_dice(nd), 0, 0, True) for n, nd in nodes.items()})
    for r in range(1, rounds + 1):
        out = {}
        for i, (n, nd) in enumerate(nodes.items()):
            rec = run_round(nd.cfg, nd.store, nd.cases, extra={"trigger": "simulate", "round_id": f"r{r}"},
                            seed=run.seed_of(r, i))
            out[n] = (run.test_dice(nd), 0, 0, rec["published"])
        emit(method, r, out)


def _rounds_gossip(run: _Run, nodes, rounds, emit, method):
    emit(method, 0, {n: (run.test_dice(nd), 0, 0, True) for n, nd in nodes.items()})
    rngs = {n: random.Random(run.seed * 1000 + i) for i, n in enumerate(nodes)}
    partner = {n: MemoryPartner(n, nd.store, run.transport) for n, nd in nodes.items()}
    for r in range(1, rounds + 1):
        sent = dict.fromkeys(nodes, 0)
        got = {}
        for i, (n, nd) in enumerate(nodes.items()):
            rec = gossip_round(nd.cfg, nd.store, nd.cases, trigger="simulate", round_id=f"r{r}", rng=rngs[n],
                               connect=partner.__getitem__, seed=run.seed_of(r, i))
            g = rec.get("gossip") or {}
            for a in g.get("attempts", []):
                sent[a["peer"]] += a.get("bytes", 0)
            got[n] = (g.get("bytes_pulled", rec.get("bytes_pulled", 0)), bool(rec.get("published")))
        emit(method, r, {n: (run.test_dice(nd), sent[n], got[n][0], got[n][1]) for n, nd in nodes.items()})


def _rounds_central(run: _Run, nodes, rounds, emit, method, arm: Arm):
    """FedAvg (+FT), Ditto and pooled: one shared initialisation, the warm-up's steps as their first rounds."""
    names = list(nodes)
    weights = [len(nodes[n].site.train) for n in names]
    glob = run.init_state()
    personal = dict.fromkeys(names, glob)
    mb = run.model_bytes[run.transport]
    steps_per_epoch = [math.ceil(len(run.data[n]["train"]) / run.base.train.batch_size) for n in names]
    mean_steps = round(sum(steps_per_epoch) / len(names))
    pooled = torch.utils.data.ConcatDataset([run.data[n]["train"] for n in names]) if arm.kind == "pooled" else None

    def one_round(r: int, epochs: int) -> dict[str, State]:
        nonlocal glob
        if arm.kind == "pooled":
            set_determinism(seed=run.seed_of(r, 0))
            net = run.net(glob)
            loader = run.loader(pooled)
            steps = mean_steps * epochs if arm.pooled == "steps" else len(loader) * epochs
            _train_steps(net, loader, steps, run.base.train.lr, run.base.train.weight_decay, run.device)
            glob = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            return dict.fromkeys(names, glob)
        local = {n: run.train(n, glob, epochs, run.seed_of(r, i)) for i, n in enumerate(names)}
        if arm.kind == "ditto":
            for i, n in enumerate(names):
                personal[n] = run.train(n, personal[n], epochs, run.seed_of(r, i) + 7, prox=glob)
        glob = _average([local[n] for n in names], weights)
        if arm.kind == "ditto":
            return dict(personal)
        return local if arm.serve == "local" else dict.fromkeys(names, glob)

    # round 0: the warm-up's budget, spent by this method from the shared initialisation
    warm_rounds = max(1, math.ceil(run.warmup_epochs / run.epochs))
    for w in range(warm_rounds):
        cands = one_round(-(w + 1), run.epochs)
    for n, nd in nodes.items():
        nd.store.publish(cands[n], arch=run.arch, val_dice={}, n_train=len(nd.site.train), n_val=len(nd.site.val),
                         produced_by=f"{method}:warmup", site=n)
    emit(method, 0, {n: (run.test_dice(nd), 0, 0, True) for n, nd in nodes.items()})
    traffic = 0 if arm.kind == "pooled" else mb
    for r in range(1, rounds + 1):
        cands = one_round(r, run.epochs)
        out = {}
        for n, nd in nodes.items():
            published = run.serve(nd, cands[n], method)
            out[n] = (run.test_dice(nd), traffic, traffic, published)
        emit(method, r, out)


def _train_steps(net, loader, steps: int, lr: float, weight_decay: float, device) -> None:
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    done = 0
    while done < steps:
        for b in loader:
            supervised_step(net, opt, b["image"].to(device), b["label"].to(device), loss_fn)
            done += 1
            if done >= steps:
                return


# ---------------------------------------------------------------------------------------- one seed
def run_seed(cfg: SiteConfig, sites: list[SimSite], out: Path, seed: int, methods: list[str], rounds: int,
             epochs: int, warmup_epochs: int, transport: str, gate: bool, threads: int = 0,
             position: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every method on one seed's sites; returns the result rows and the model's payload bytes."""
    if threads:
        torch.set_num_threads(threads)
    run = _Run(cfg, sites, out / "runs" / f"seed{seed}", seed, epochs, warmup_epochs, transport, gate)
    warm = run.root / "warmup"
    shutil.rmtree(warm, ignore_errors=True)
    for i, s in enumerate(sites):
        nd = _Node(s, run.cfgs[s.name])
        run_round(nd.cfg, nd.store, nd.cases, epochs=warmup_epochs, extra={"trigger": "simulate", "stage": "warmup"},
                  seed=run.seed_of(0, i))
    served = nd.store.served()  # the payload sizes of the servers' peer surface (float32: the stored file)
    run.model_bytes = {"float32": served.bytes,
                       "float16": len(encode_weights(nd.store.load(served.version), "float16", arch=served.arch))}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(methods) * rounds, desc=f"seed {seed}", unit="round", position=position, leave=True)
    t = [time.perf_counter()]

    def emit(method, r, per_site):
        now = time.perf_counter()
        for n, (dice, sent, received, published) in per_site.items():
            rows.append({"seed": seed, "method": method, "round": r, "site": n,
                         "test_mean": round(mean_dice(dice), 4), **{f"test_{k}": round(v, 4) for k, v in dice.items()},
                         "bytes_sent": sent, "bytes_received": received, "published": published,
                         "seconds": round((now - t[0]) / len(per_site), 2)})
        t[0] = now
        if r > 0:
            bar.set_postfix(method=method, round=r)
            bar.update()

    for m in methods:
        _run_arm(run, m, rounds, warm, emit)
    bar.close()
    return rows, run.model_bytes


# ---------------------------------------------------------------------------------------- all seeds
def simulate(cfg: SiteConfig, sites_of_seed, out: str | Path, *, methods: list[str] | None = None, rounds: int = 8,
             epochs: int = 5, warmup_epochs: int = 20, seeds: int = 3, transport: str = "float32", gate: bool = True,
             jobs: int = 1, scenario: str = "") -> dict[str, Any]:
    """Run the comparison for ``seeds`` seeds; write results.json/csv and plots; return the results.

    Args:
        cfg: the federation's shared settings (network, transforms, training, DCML, gate).
        sites_of_seed: ``seed -> [SimSite]`` (synthetic data is drawn anew per seed; real data is fixed).
        jobs: seeds run in parallel processes (each with ``cpu_count / jobs`` torch threads).

    Raises:
        ValueError: an unknown method, ``rounds < 1`` or ``seeds < 1``.
    """
    methods = methods or DEFAULT_METHODS
    unknown = [m for m in methods if m not in ARMS]
    if unknown or not methods:
        raise ValueError(f"methods: found {methods}; expected a non-empty list from {list(ARMS)}")
    if rounds < 1 or seeds < 1:
        raise ValueError(f"rounds, seeds: found {rounds}, {seeds}; expected at least 1 each")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    site_lists = {s: sites_of_seed(s) for s in range(seeds)}
    args = [(cfg, site_lists[s], out, s, methods, rounds, epochs, warmup_epochs, transport, gate) for s in range(seeds)]
    if jobs > 1 and seeds > 1:
        import multiprocessing as mp
        import os

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            parts = list(ex.map(run_seed, *zip(*args), [threads] * seeds, range(seeds)))
    else:
        parts = [run_seed(*a) for a in args]
    rows = [r for p, _ in parts for r in p]
    model_bytes = parts[0][1]
    names = [s.name for s in site_lists[0]]
    result = {
        "config": {"scenario": scenario, "sites": names, "rounds": rounds, "methods": methods, "epochs": epochs,
                   "warmup_epochs": warmup_epochs, "seeds": seeds, "transport": transport, "gate": gate,
                   "cases": {s.name: {"train": len(s.train), "val": len(s.val), "test": len(s.test)}
                             for s in site_lists[0]},
                   "network": cfg.network.model_dump(mode="json"), "roi_size": list(cfg.roi_size),
                   "dcml": cfg.dcml.model_dump(mode="json"), "validation": cfg.validation.model_dump(mode="json")},
        "model_bytes": model_bytes,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summarize_rows(rows, methods, names, rounds),
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for x in rows for k in x))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    _plot(rows, methods, names, rounds, result["summary"], out)
    return result


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize_rows(rows: list[dict], methods: list[str], names: list[str], rounds: int) -> dict[str, Any]:
    """Per method: final test Dice per site (mean, std over seeds), the site mean, bytes, and the paired
    difference to ``local`` per site (mean, std, seeds won)."""
    final = {(r["method"], r["site"], r["seed"]): r["test_mean"] for r in rows if r["round"] == rounds}
    seeds = sorted({r["seed"] for r in rows})
    out = {}
    for m in methods:
        per_site = {}
        for n in names:
            xs = [final[(m, n, s)] for s in seeds]
            mu, sd = _mean_std(xs)
            per_site[n] = {"mean": round(mu, 4), "std": round(sd, 4), "values": xs}
            if "local" in methods:
                d = [final[(m, n, s)] - final[("local", n, s)] for s in seeds]
                dm, ds = _mean_std(d)
                per_site[n]["vs_local"] = {"mean": round(dm, 4), "std": round(ds, 4), "wins": sum(x > 0 for x in d),
                                           "ties": sum(x == 0 for x in d), "n": len(d)}
        site_means = [statistics.fmean(final[(m, n, s)] for n in names) for s in seeds]
        mu, sd = _mean_std(site_means)
        moved = [sum(r["bytes_received"] for r in rows if r["method"] == m and r["seed"] == s and r["round"] > 0)
                 for s in seeds]
        pub = [r["published"] for r in rows if r["method"] == m and r["round"] > 0]
        out[m] = {"mean": round(mu, 4), "std": round(sd, 4), "worst_site": min(names, key=lambda n: per_site[n]["mean"]),
                  "per_site": per_site, "bytes_received_per_seed": round(statistics.fmean(moved)),
                  "published_fraction": round(sum(pub) / max(len(pub), 1), 3)}
    return out


def _plot(rows, methods, names, rounds, summary, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(m, key="test_mean"):
        return [statistics.fmean(x[key] for x in rows if x["method"] == m and x["round"] == r) for r in range(rounds + 1)]

    palette = plt.get_cmap("tab20").colors  # one colour per method, the same in every panel
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for m in methods:
        style = "-" if m.startswith(("gcml", "gml")) else "--"
        axes[0].plot(range(rounds + 1), curve(m), style, marker="o", ms=3, label=m, color=color[m])
    axes[0].set_title("served model, test Dice (mean over sites and seeds)")
    axes[0].set_xlabel("round (0 = warm-up)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ps = summary[m]["per_site"]
        axes[1].bar([i + j * width for i in range(len(names))], [ps[n]["mean"] for n in names], width,
                    yerr=[ps[n]["std"] for n in names], label=m, capsize=1, color=color[m])
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    axes[1].set_title(f"final test Dice per site (mean +- std over seeds, round {rounds})")
    lo = min(summary[m]["per_site"][n]["mean"] for m in methods for n in names)
    axes[1].set_ylim(max(0.0, lo - 0.1), 1.0)
    axes[1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "dice_vs_round.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        per_round = [statistics.fmean(sum(x["bytes_received"] for x in rows if x["method"] == m and x["round"] == r
                                          and x["seed"] == s) for s in {x["seed"] for x in rows}) for r in range(rounds + 1)]
        xs = [sum(per_round[: r + 1]) / 1e6 for r in range(rounds + 1)]
        ax.plot(xs, curve(m), "o-", ms=3, label=m, color=color[m])
    ax.set_xlabel("MB received by the sites (cumulative; pooled moves data, not models)")
    ax.set_ylabel("mean test Dice")
    ax.set_title("accuracy vs communication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_bytes.png", dpi=100)
    plt.close(fig)
