"""``gcml bench --ddp N``: the same round on one rank and on N ranks (``train.gpus``), on realistic-size volumes.

Synthetic CT-like volumes (:func:`~gcml_app.sim.scale.write_ct_studies`, generated here) at 144 x 144 x 112
after resampling, the deployment network (``sample_configs/deployment.yaml``) on 96\\ :sup:`3` crops. Each
run is a first round at a fresh site, in a fresh process, with a cold case cache: so the load phase is the
preprocessing (split across the ranks), the training is one device's step budget, and the validation
scores the candidate on every validation case (split across the ranks). On the CPU each rank gets
``cores // N`` torch threads, the one-rank run the same, so the ratio is what the extra ranks add; a third
run gives one process every core's threads (what a CPU site runs without ``train.gpus``). On GPUs each rank
is a device (NCCL).

Per run: wall seconds of the round, its phases (rank 0's), steps and crops, crops per second, seconds per
training step, validation seconds per case and model, preprocessing seconds per case, the ranks'
start-up and whether they ended with equal weights. ``ddp.json`` holds both runs and their ratios
(N ranks against one, in one run of the bench); ``ddp.png`` draws each phase side by side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gcml_app.sim.device_step import DEPLOYMENT_NETWORK
from gcml_app.sim.scale import fresh_round, write_ct_studies

__all__ = ["DDP_SIZE", "ddp_bench", "plot_ddp"]

DDP_SIZE = (144, 144, 112)  # x, y, z at 1 mm: scale.py's MR-like volume
_QUICK = {"shape": (48, 48, 40), "roi": 32, "cases": 6,
          "network": {"name": "UNet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}
_REAL = {"shape": DDP_SIZE, "roi": 96, "cases": 10, "network": DEPLOYMENT_NETWORK}

def _site(state: Path, spec: dict[str, Any], ranks: int, threads: int, device: str) -> dict[str, Any]:
    return {
        "site": "ddp", "labels": {"organ": 1, "lesion": 2}, "spacing": [1.0, 1.0, 1.0],
        "roi_size": [spec["roi"]] * 3, "intensity": {"mode": "range", "a_min": -200, "a_max": 300},
        "network": spec["network"], "state_dir": str(state),
        "train": {"epochs": 1, "batch_size": 2, "samples_per_case": max(2, ranks), "warm": False, "device": device,
                  "num_threads": threads, "gpus": list(range(ranks)) if ranks > 1 else None, "seed": 0},
        "validation": {"fraction": 0.4, "min_cases": 1},
    }


def _run(site: dict[str, Any], cases: list[dict[str, str]]) -> dict[str, Any]:
    rec = fresh_round(site, cases, "ddp bench")
    t, losses = rec["timings"], rec["losses"]
    steps = sum(e["steps"] for e in losses)
    crops = sum(e["crop_passes"] for e in losses)
    n = rec["n_train"] + rec["n_val"]
    return {
        "wall_s": rec["wall_s"], "timings": t, "n_train": rec["n_train"], "n_val": rec["n_val"], "steps": steps,
        "crops": crops, "crops_per_s": round(crops / t["train_s"], 3), "step_s": round(t["train_s"] / steps, 3),
        "validate_s_per_case": round(t["validate_s"] / rec["n_val"] / rec["scored"], 3),
        "load_s_per_case": round(t["load_s"] / n, 3), "precision": rec["precision"],
        "ranks": {k: v for k, v in (rec["ranks"] or {}).items() if k != "per_rank"} or None,
        "per_rank_train_s": [r["timings"]["train_s"] for r in (rec["ranks"] or {}).get("per_rank", [])],
    }


def ddp_bench(out: str | Path, ranks: int = 2, quick: bool = False) -> dict[str, Any]:
    """One round on one rank, then on ``ranks`` ranks, at the same data and seed; writes ``ddp.json`` and ``ddp.png``.

    Args:
        ranks: ranks of the second run (GPUs when this machine has that many, else CPU processes).
        quick: tiny volumes and network (seconds, for tests): the ratios then measure overheads, not scaling.

    Returns:
        ``{"one": run, "many": run, "ratio": {...}, ...}``; a ratio above 1 is the N-rank run doing better.

    Raises:
        ValueError: fewer than 2 ranks.
    """
    if ranks < 2:
        raise ValueError(f"gcml bench --ddp: found {ranks} ranks; expected at least 2 (it compares N ranks with one)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = _QUICK if quick else _REAL
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus >= ranks else "cpu"
    cores = len(os.sched_getaffinity(0))
    threads = 0 if device == "cuda" else max(1, cores // ranks)
    cases = write_ct_studies(out / "ddp-data", spec["shape"], spec["cases"])
    plan = [("one", 1, threads), ("many", ranks, threads)]
    if device == "cpu" and threads * ranks > threads:  # what one process gets from every core: today's default
        plan.append(("one_all_threads", 1, threads * ranks))
    runs = {}
    for name, n, t in tqdm(plan, desc="ddp bench", unit="run"):
        state = out / f"ddp-state-{name}"
        if state.exists():
            import shutil

            shutil.rmtree(state)  # a first round with a cold cache, every time
        runs[name] = _run(_site(state, spec, n, t, device), cases)
    one, many = runs["one"], runs["many"]
    result = {
        "ranks": ranks, "device": device, "backend": "nccl" if device == "cuda" else "gloo", "cores": cores,
        "threads_per_rank": threads or None, "shape_xyz_1mm": list(spec["shape"]), "roi_size": [spec["roi"]] * 3,
        "cases": spec["cases"], "network": spec["network"], "quick": quick, "one": one, "many": many,
        "ratio": {
            "crops_per_s": round(many["crops_per_s"] / one["crops_per_s"], 3),
            "validate_s_per_case": round(one["validate_s_per_case"] / many["validate_s_per_case"], 3),
            "load_s_per_case": round(one["load_s_per_case"] / many["load_s_per_case"], 3),
            "round_wall_s": round(one["wall_s"] / many["wall_s"], 3),
        },
        "target_ratio": 1.6,
    }
    if "one_all_threads" in runs:  # N ranks of cores/N threads against one process with all the cores' threads
        whole = result["one_all_threads"] = runs["one_all_threads"]
        result["ratio_to_one_process_all_threads"] = {
            "crops_per_s": round(many["crops_per_s"] / whole["crops_per_s"], 3),
            "validate_s_per_case": round(whole["validate_s_per_case"] / many["validate_s_per_case"], 3),
            "round_wall_s": round(whole["wall_s"] / many["wall_s"], 3),
        }
    (out / "ddp.json").write_text(json.dumps(result, indent=2))
    plot_ddp(result, out / "ddp.png")
    return result


def plot_ddp(result: dict[str, Any], path: Path) -> None:
    """Each phase of the round on one rank beside the same on N ranks (seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ["load_s", "train_s", "validate_s", "publish_s"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, (name, label) in enumerate((("one", "1 rank"), ("many", f"{result['ranks']} ranks"))):
        t = result[name]["timings"]
        ax.bar([j + (i - 0.5) * width for j in range(len(phases))], [t.get(p, 0.0) for p in phases], width,
               label=f"{label}: round {result[name]['wall_s']:.1f} s")
    ax.set_xticks(range(len(phases)), [p.removesuffix("_s") for p in phases])
    ax.set_ylabel("seconds")
    r = result["ratio"]
    ax.set_title(f"one round, {result['device']} ({result['backend']}): crops/s x{r['crops_per_s']:.2f}, "
                 f"validation x{r['validate_s_per_case']:.2f}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
