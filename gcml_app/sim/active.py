"""``gcml simulate --active``: which cases to label, measured as test Dice against the number of labels.

Each site starts with ``start`` labelled training cases and a pool of cases whose labels the
simulator holds back. Every round, each site first "labels" ``k`` pool cases its strategy chooses
(the simulator reveals their labels, as a radiologist would draw them), then runs the servers' gossip
round (:func:`~gcml_app.rounds.gossip.gossip_round`, with in-memory partners) on all its labels.

Strategies, scored exactly as the servers score (:mod:`gcml_app.ml.acquisition`):

- ``random``: MONAI Label's default, a uniform draw from the pool;
- ``epistemic``: MONAI Label's MC-dropout entropy of the served model (``active.mc_samples`` passes);
- ``disagreement``: the served model against the partner models gossip cached in the site's own state
  folder (:func:`~gcml_app.site.scorebook.load_models`), each weighted by its Dice on the site's validation
  cases; before any partner model is cached, the served model's entropy alone.

Controls: every strategy starts from the same per-site warm-up on the same ``start`` cases, the same
validation and test cases, the same round seeds and partner-choice seeds; only the cases labelled differ.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from tqdm import tqdm

from gcml_app.config import SiteConfig
from gcml_app.ml.acquisition import competence, disagreement, draw_proportional, epistemic_entropy, soft_predict
from gcml_app.ml.device import precision, sw_batch_size
from gcml_app.ml.evaluate import mean_dice
from gcml_app.ml.transforms import image_transforms
from gcml_app.rounds.gossip import gossip_round
from gcml_app.sim.data import SimSite
from gcml_app.sim.partner import MemoryPartner
from gcml_app.sim.run import Node, Run
from gcml_app.site.scorebook import committee, load_models
from gcml_app.util.files import atomic_write

__all__ = ["STRATEGIES", "choose", "labels_to_reach", "simulate_active", "summarize_active"]

STRATEGIES = ("random", "epistemic", "disagreement")


def _score(strategy: str, node: Node, images: dict[str, torch.Tensor], val, device: torch.device) -> dict[str, float]:
    """Each pool image's score under ``strategy`` with the site's served model (and cached partner models,
    weighted by their competence on the site's validation cases ``val``, as the server's scoring does)."""
    cfg = node.cfg
    com = committee(cfg, node.store)
    served, partners, _ = load_models(cfg, node.store, com if strategy == "disagreement" else replace(com, partners={}),
                                      device)
    args = (cfg.roi_size, sw_batch_size(cfg, device), cfg.validation.overlap, device, precision(cfg, device),
            cfg.out_channels)
    weights = competence(partners, val, len(cfg.labels), *args[:-1]) if partners else {}
    out = {}
    for cid, image in images.items():
        if strategy == "epistemic":
            out[cid] = epistemic_entropy(served, image, cfg.roi_size, cfg.active.mc_samples, cfg.active.mc_dropout,
                                         *args[1:])
        else:
            p = soft_predict(served, image, *args)
            out[cid] = disagreement(p, ((n, soft_predict(net, image, *args)) for n, net in partners.items()),
                                    weights).score
    return out


def choose(strategy: str, pool: list[str], k: int, rng: random.Random, scores: dict[str, float] | None = None,
           selection: str = "top") -> list[str]:
    """``k`` case ids of ``pool``: at random, the ``k`` highest ``scores`` (ties at random), or drawn one by
    one with probability proportional to their scores (``selection="proportional"``).

    Example:
        >>> choose("disagreement", ["a", "b", "c"], 2, random.Random(0), {"a": 0.1, "b": 0.9, "c": 0.5})
        ['b', 'c']
    """
    if strategy == "random" or scores is None:
        return rng.sample(pool, min(k, len(pool)))
    if selection == "proportional":
        left, out = list(pool), []
        while left and len(out) < k:
            out.append(draw_proportional(left, [scores[c] for c in left], rng))
            left.remove(out[-1])
        return out
    jitter = {c: rng.random() for c in pool}  # ties broken at random, as the server's strategy does
    return sorted(pool, key=lambda c: (-scores[c], jitter[c]))[:k]


def _run_strategy(run: Run, strategy: str, pools: dict[str, list[dict]], k: int, rounds: int, warm: Path,
                  emit) -> None:
    folder = run.root / strategy
    shutil.rmtree(folder, ignore_errors=True)
    nodes: dict[str, Node] = {}
    for s in run.sites:
        cfg = run.site_cfg(s, folder)
        shutil.copytree(warm / s.name, cfg.state_dir)
        nodes[s.name] = Node(s, cfg)
    load = Compose(image_transforms(run.base))
    images = {n: {c["id"]: load({"image": c["image"]})["image"].as_tensor() for c in pools[n]} for n in nodes}
    left = {n: [c["id"] for c in pools[n]] for n in nodes}
    by_id = {n: {c["id"]: c for c in pools[n]} for n in nodes}
    picks = {n: random.Random(run.seed * 7919 + i) for i, n in enumerate(nodes)}  # the same draws in every strategy
    gossip_rng = {n: random.Random(run.seed * 1000 + i) for i, n in enumerate(nodes)}
    partner = {n: MemoryPartner(n, nd.store, run.transport) for n, nd in nodes.items()}
    emit(strategy, 0, {n: (run.test_dice(nd), len(nd.site.train), 0.0) for n, nd in nodes.items()})
    for r in range(1, rounds + 1):
        scoring_s = {}
        for n, nd in nodes.items():
            t0 = time.perf_counter()
            scores = None if strategy == "random" else _score(strategy, nd, {c: images[n][c] for c in left[n]},
                                                               run.data[n]["val"], run.device)
            # active.selection is the disagreement strategy's; MONAI Label's Epistemic takes the top score
            chosen = choose(strategy, left[n], k, picks[n], scores,
                            nd.cfg.active.selection if strategy == "disagreement" else "top")
            scoring_s[n] = time.perf_counter() - t0
            left[n] = [c for c in left[n] if c not in chosen]
            new = [by_id[n][c] for c in chosen]
            nd.site = replace(nd.site, train=nd.site.train + new)  # the radiologist's labels, revealed
            nd.cases = nd.site.train + nd.site.val
            split = json.loads((nd.cfg.state_dir / "split.json").read_text())
            split.update({c["id"]: "train" for c in new})  # labelled for training, never for validation
            atomic_write(nd.cfg.state_dir / "split.json", json.dumps(split, indent=1, sort_keys=True).encode())
        for i, (n, nd) in enumerate(nodes.items()):
            gossip_round(nd.cfg, nd.store, nd.cases, trigger="simulate", round_id=f"r{r}", rng=gossip_rng[n],
                         connect=partner.__getitem__, seed=run.seed_of(r, i))
        emit(strategy, r, {n: (run.test_dice(nd), len(nd.site.train), round(scoring_s[n], 3))
                           for n, nd in nodes.items()})


def run_active_seed(cfg: SiteConfig, sites: list[SimSite], out: Path, seed: int, strategies: list[str], rounds: int,
                    k: int, start: int, epochs: int, warmup_epochs: int, transport: str, gate: bool,
                    threads: int = 0, position: int = 0) -> list[dict[str, Any]]:
    """Every strategy on one seed's sites (each site: ``start`` labelled cases, the rest of its training cases the pool)."""
    if threads:
        torch.set_num_threads(threads)
    pools = {s.name: s.train[start:] for s in sites}
    sites = [replace(s, train=s.train[:start], unlabelled=[]) for s in sites]
    run = Run(cfg, sites, out / "runs" / f"seed{seed}", seed, epochs, warmup_epochs, transport, gate)
    warm, _ = run.warm_up()
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(strategies) * rounds, desc=f"seed {seed}", unit="round", position=position, leave=True)

    def emit(strategy, r, per_site):
        for n, (dice, labels, scoring_s) in per_site.items():
            rows.append({"seed": seed, "strategy": strategy, "round": r, "site": n, "labels": labels,
                         "test_mean": round(mean_dice(dice), 4), **{f"test_{k}": round(v, 4) for k, v in dice.items()},
                         "scoring_s": scoring_s})
        if r > 0:
            bar.set_postfix(strategy=strategy, round=r)
            bar.update()

    for s in strategies:
        _run_strategy(run, s, pools, k, rounds, warm, emit)
    bar.close()
    return rows


def labels_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The labels at which a rising ``[(labels, Dice)]`` curve first reaches ``target`` (linear between points).

    Example:
        >>> labels_to_reach([(2, 0.5), (4, 0.7), (6, 0.8)], 0.75)
        5.0
    """
    for (l0, d0), (l1, d1) in zip(curve, curve[1:]):
        if d0 >= target:
            return float(l0)
        if d1 >= target:
            return l0 + (l1 - l0) * (target - d0) / (d1 - d0)
    return float(curve[-1][0]) if curve and curve[-1][1] >= target else None


def summarize_active(rows: list[dict[str, Any]], strategies: list[str], names: list[str], rounds: int) -> dict[str, Any]:
    """Per strategy: Dice against labels (mean over sites and seeds, and per site), the labels each needs to
    reach ``random``'s final mean Dice, and per site its worst shortfall against ``random`` at equal labels
    (in units of the two strategies' pooled seed-std there, ``sqrt((std_s^2 + std_random^2) / 2)``)."""

    def cell(s, r, site=None):
        xs = [x["test_mean"] for x in rows if x["strategy"] == s and x["round"] == r and (site is None or x["site"] == site)]
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    def seed_means(s, r):
        by = {}
        for x in rows:
            if x["strategy"] == s and x["round"] == r:
                by.setdefault(x["seed"], []).append(x["test_mean"])
        return [statistics.fmean(v) for _, v in sorted(by.items())]

    labels = {r: statistics.fmean(x["labels"] for x in rows if x["round"] == r) for r in range(rounds + 1)}
    out: dict[str, Any] = {"labels": [labels[r] for r in range(rounds + 1)]}
    final_random = cell("random", rounds)[0] if "random" in strategies else None
    for s in strategies:
        curve = [(labels[r], cell(s, r)[0]) for r in range(rounds + 1)]
        row: dict[str, Any] = {"mean": [round(d, 4) for _, d in curve],
                               "seed_std": [round(statistics.stdev(seed_means(s, r)), 4) if len(seed_means(s, r)) > 1
                                            else 0.0 for r in range(rounds + 1)],
                               "per_site": {n: [round(cell(s, r, n)[0], 4) for r in range(rounds + 1)] for n in names},
                               "scoring_s_per_round": round(statistics.fmean(
                                   x["scoring_s"] for x in rows if x["strategy"] == s and x["round"] > 0), 3)}
        if final_random is not None:
            need = labels_to_reach(curve, final_random)
            row["labels_to_reach_random_final"] = None if need is None else round(need, 2)
            row["label_fraction_of_random"] = None if need is None else round(need / labels[rounds], 3)
        if "random" in strategies and s != "random":
            worst = {}
            for n in names:
                margins = []
                for r in range(1, rounds + 1):
                    mean_s, std_s = cell(s, r, n)
                    mean_r, std_r = cell("random", r, n)
                    pooled = math.sqrt((std_s ** 2 + std_r ** 2) / 2)  # the two strategies' seed-std at that site
                    margins.append((mean_s - mean_r) / pooled if pooled > 0 else (0.0 if mean_s >= mean_r else -math.inf))
                worst[n] = round(min(margins), 3)
            row["worst_vs_random_in_std"] = worst
            row["never_below_random_by_one_std"] = all(v >= -1.0 for v in worst.values())
        out[s] = row
    return out


def plot_active(summary: dict[str, Any], strategies: list[str], names: list[str], out: Path) -> None:
    """``active.png``: test Dice against labels per site and on the mean (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean", *names]
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.4 * rows_n), squeeze=False)
    x = summary["labels"]
    for ax, p in zip(axes.flat, panels):
        for s in strategies:
            y = summary[s]["mean"] if p == "mean" else summary[s]["per_site"][p]
            ax.plot(x, y, marker="o", ms=3, label=s, lw=2 if s == "disagreement" else 1.2)
        if p == "mean" and "random" in strategies:
            ax.axhline(summary["random"]["mean"][-1], color="grey", lw=0.8, ls=":", label="random, final")
        ax.set_title("mean over sites" if p == "mean" else p, fontsize=10)
        ax.set_xlabel("labelled training cases per site")
        ax.set_ylabel("served model, test Dice")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Which case to label next: test Dice against labels (mean over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "active.png", dpi=100)
    plt.close(fig)


def simulate_active(cfg: SiteConfig, sites_of_seed, out: str | Path, *, strategies: list[str] | None = None,
                    rounds: int = 6, k: int = 2, start: int = 2, epochs: int = 4, warmup_epochs: int = 20,
                    seeds: int = 3, transport: str = "float32", gate: bool = True, jobs: int = 1,
                    scenario: str = "") -> dict[str, Any]:
    """Run the active-learning comparison; write ``active.json``, ``active.csv`` and ``active.png``.

    Args:
        sites_of_seed: ``seed -> [SimSite]`` whose training cases are the ``start`` labelled ones
            followed by the pool (at least ``k * rounds`` more).

    Raises:
        ValueError: an unknown strategy, or a pool too small for ``k * rounds`` labels.
    """
    strategies = strategies or list(STRATEGIES)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"strategies: found {strategies}; expected a non-empty list from {list(STRATEGIES)}")
    if k < 1 or rounds < 1 or start < 1:
        raise ValueError(f"k, rounds, start: found {k}, {rounds}, {start}; expected at least 1 each")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    site_lists = {s: sites_of_seed(s) for s in range(seeds)}
    for site in site_lists[0]:
        if len(site.train) < start + k * rounds:
            raise ValueError(f"site {site.name}: found {len(site.train)} training cases; expected at least "
                             f"{start + k * rounds} ({start} to start with, {k} labelled in each of {rounds} rounds)")
    t0 = time.perf_counter()
    args = [(cfg, site_lists[s], out, s, strategies, rounds, k, start, epochs, warmup_epochs, transport, gate)
            for s in range(seeds)]
    if jobs > 1 and seeds > 1:
        import multiprocessing as mp
        import os

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            parts = list(ex.map(run_active_seed, *zip(*args), [threads] * seeds, range(seeds)))
    else:
        parts = [run_active_seed(*a) for a in args]
    rows = [r for p in parts for r in p]
    names = [s.name for s in site_lists[0]]
    summary = summarize_active(rows, strategies, names, rounds)
    result = {"config": {"scenario": scenario, "sites": names, "strategies": strategies, "rounds": rounds, "k": k,
                         "start": start, "pool": {s.name: len(s.train) - start for s in site_lists[0]},
                         "epochs": epochs, "warmup_epochs": warmup_epochs, "seeds": seeds, "gate": gate,
                         "active": cfg.active.model_dump(mode="json"),
                         "cases": {s.name: {"val": len(s.val), "test": len(s.test)} for s in site_lists[0]}},
              "seconds": round(time.perf_counter() - t0, 1), "summary": summary, "rows": rows}
    (out / "active.json").write_text(json.dumps(result, indent=1))
    with open(out / "active.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for x in rows for k in x)))
        w.writeheader()
        w.writerows(rows)
    plot_active(summary, strategies, names, out)
    return result
