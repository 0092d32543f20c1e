"""``gcml simulate``: a controlled, multi-seed comparison of GCML with local training and FL baselines.

Every site of every method is a real site state folder (model store, working model, fixed split,
partner book, cached partner models), and every site round of every method is the servers' own
:func:`~gcml_app.rounds.loop.run_round`: the same scoring, gate and commit. The methods
(:mod:`gcml_app.sim.methods`) differ only in what the round gates: ``local`` and ``local2x`` train
alone, the gossip methods go through :func:`~gcml_app.rounds.gossip.gossip_round` with an in-memory
partner (:class:`~gcml_app.sim.partner.MemoryPartner`) in place of HTTP (manifest, payload encoding
and every payload check are the servers'), and the baselines no server runs (FedAvg, FedAvg+FT,
Ditto, pooled) make their candidates in a central step on the same training step.

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
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gcml_app.config import SiteConfig
from gcml_app.federation.payload import encode_weights
from gcml_app.ml.evaluate import mean_dice
from gcml_app.sim.data import SimSite
from gcml_app.sim.methods import ARMS, DEFAULT_METHODS
from gcml_app.sim.pretrain import pretrained_bundle
from gcml_app.sim import tables
from gcml_app.sim.report import plot, plot_clicks, summarize_clicks, summarize_plateau, summarize_rows
from gcml_app.sim.run import CLICKS, NOC, Node, Run
from gcml_app.store import ModelStore

__all__ = ["ARMS", "run_seed", "simulate"]

# MONAI warns on every image reader it builds that an optional GPU DICOM decoder is missing: noise here.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
_TOKEN = "simulated-partner-token"


def _run_method(run: Run, name: str, rounds: int, warm: Path, emit) -> None:
    """One method on one seed's sites, in fresh site folders (the servers' methods start from the warm-up)."""
    method = ARMS[name]
    folder = run.root / name
    shutil.rmtree(folder, ignore_errors=True)
    nodes = {}
    for s in run.sites:
        cfg = run.site_cfg(s, folder, method.epochs, method.gate, method.policy, method.dcml, method.train)
        if method.shares_warmup:  # the shared warm-up: store, working model, split
            shutil.copytree(warm / s.name, cfg.state_dir)
        nodes[s.name] = Node(s, cfg)
    method.run(run, name, nodes, rounds, emit)


# ---------------------------------------------------------------------------------------- one seed
def run_seed(cfg: SiteConfig, sites: list[SimSite], out: Path, seed: int, methods: list[str], rounds: int,
             epochs: int, warmup_epochs: int, transport: str, gate: bool, threads: int = 0,
             position: int = 0, pretrain_epochs: int = 0, validation: bool = False,
             ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every method on one seed's sites; returns the result rows and the model's payload bytes.

    Args:
        pretrain_epochs: above 0, every site starts from a bundle trained that long at a separate
            site (:func:`~gcml_app.sim.pretrain.pretrained_bundle`) instead of random weights.
        validation: each row also carries ``val_mean``, the served model's mean validation Dice (what a
            site itself can see, for ``--until-plateau``).
    """
    if threads:
        torch.set_num_threads(threads)
    if pretrain_epochs:
        bundle = pretrained_bundle(cfg, out / "runs" / f"seed{seed}" / "pretrain", seed, pretrain_epochs)
        cfg = cfg.model_copy(update={"network": cfg.network.model_copy(update={"init_from": bundle})})
    run = Run(cfg, sites, out / "runs" / f"seed{seed}", seed, epochs, warmup_epochs, transport, gate)
    warm, nd = run.warm_up()
    served = nd.store.served()  # the payload sizes of the servers' peer surface (float32: the stored file)
    run.model_bytes = {"float32": served.bytes,
                       "float16": len(encode_weights(nd.store.load(served.version), "float16", arch=served.arch))}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(methods) * rounds, desc=f"seed {seed}", unit="round", position=position, leave=True)
    t = [time.perf_counter()]

    def emit(method, r, per_site):
        now = time.perf_counter()
        for n, (dice, sent, received, published, cost) in per_site.items():
            rows.append({"seed": seed, "method": method, "round": r, "site": n,
                         "test_mean": round(mean_dice(dice), 4), **{f"test_{k}": round(v, 4) for k, v in dice.items()},
                         "bytes_sent": sent, "bytes_received": received, "published": published,
                         "train_steps": cost["steps"], "crop_passes": cost["crop_passes"],
                         "seconds": round((now - t[0]) / len(per_site), 2)})
            models = run.root / method / n / "models"
            store = ModelStore(models) if validation or (models / "history.jsonl").exists() else None
            if validation:
                served = store.served()
                rows[-1]["val_mean"] = round(mean_dice(served.val_dice), 4) if served else 0.0
            if r > 0 and store is not None and "arm" in (last := (store.history() or [{}])[-1]):
                rows[-1]["arm"] = last["arm"]["arm"]  # dcml.choose: how the partner's model was used
        t[0] = now
        if r > 0:
            bar.set_postfix(method=method, round=r)
            bar.update()

    for m in methods:
        _run_method(run, m, rounds, warm, emit)
        if cfg.interactive.enabled:  # what a radiologist feels: the final served models, clicked
            for s in sites:
                store = ModelStore(run.root / m / s.name / "models")
                curve = run.click_curve(s.name, store.load(store.served_version()))
                rows.append({"seed": seed, "method": m, "round": "clicks", "site": s.name,
                             **{f"clicks_{k}": round(float(np.mean([c["dice"][k] for c in curve])), 4) for k in CLICKS},
                             **{f"noc{round(t * 100)}": round(float(np.mean([c["noc"][t] for c in curve])), 2)
                                for t in NOC}})
    bar.close()
    return rows, run.model_bytes


# ---------------------------------------------------------------------------------------- all seeds
def simulate(cfg: SiteConfig, sites_of_seed, out: str | Path, *, methods: list[str] | None = None, rounds: int = 8,
             epochs: int = 5, warmup_epochs: int = 20, seeds: int = 3, transport: str = "float32", gate: bool = True,
             jobs: int = 1, scenario: str = "", pretrain_epochs: int = 0, until_plateau: int = 0,
             provenance: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the comparison for ``seeds`` seeds; write results.json/csv/md and plots; return the results.

    Args:
        cfg: the federation's shared settings (network, transforms, training, DCML, gate).
        sites_of_seed: ``seed -> [SimSite]`` (synthetic data is drawn anew per seed; real data is fixed).
        jobs: seeds run in parallel processes (each with ``cpu_count / jobs`` torch threads).
        pretrain_epochs: above 0 (``--init pretrained``), every site starts from a "Model Zoo bundle"
            trained that many epochs at a separate synthetic site (:mod:`gcml_app.sim.pretrain`).
        until_plateau: above 0, also each method's plateau (``rounds`` is then the maximum): the round its
            mean validation Dice stopped rising by more than ``validation.margin`` for this many rounds, and
            its test Dice there (:func:`~gcml_app.sim.report.summarize_plateau`).
        provenance: the command, commit and date that head ``results.md`` (:func:`~gcml_app.sim.tables.provenance`;
            default: this checkout's commit, the command unknown).

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
            parts = list(ex.map(run_seed, *zip(*args), [threads] * seeds, range(seeds), [pretrain_epochs] * seeds,
                                [until_plateau > 0] * seeds))
    else:
        parts = [run_seed(*a, pretrain_epochs=pretrain_epochs, validation=until_plateau > 0) for a in args]
    rows = [r for p, _ in parts for r in p]
    click_rows = [r for r in rows if r["round"] == "clicks"]
    rows = [r for r in rows if r["round"] != "clicks"]
    model_bytes = parts[0][1]
    names = [s.name for s in site_lists[0]]
    result = {
        "config": {"scenario": scenario, "sites": names, "rounds": rounds, "methods": methods, "epochs": epochs,
                   "warmup_epochs": warmup_epochs, "seeds": seeds, "pretrain_epochs": pretrain_epochs,
                   "init": "pretrained" if pretrain_epochs else "random", "transport": transport, "gate": gate,
                   "cases": {s.name: {"train": len(s.train), "val": len(s.val), "test": len(s.test)}
                             for s in site_lists[0]},
                   "network": cfg.network.model_dump(mode="json"), "roi_size": list(cfg.roi_size),
                   "dcml": cfg.dcml.model_dump(mode="json"), "validation": cfg.validation.model_dump(mode="json")},
        "model_bytes": model_bytes,
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summarize_rows(rows, methods, names, rounds),
        "rows": rows,
    }
    if until_plateau:
        result["plateau"] = summarize_plateau(rows, methods, names, cfg.validation.margin, until_plateau)
    if click_rows:
        result["clicks"] = summarize_clicks(click_rows, methods, names)
        result["click_rows"] = click_rows
        plot_clicks(result["clicks"], methods, names, out)
    result["provenance"] = provenance or {**tables.provenance([]), "command": "simulate() called from Python"}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(tables.results_markdown(result, result["provenance"]))
    with open(out / "results.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for x in rows for k in x))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot(rows, methods, names, rounds, result["summary"], out)
    return result


