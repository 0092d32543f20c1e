"""Two synthetic sites: N rounds of DCML with the partner's model vs N rounds of local fine-tuning.

Both arms run the real round code (:func:`gcml_app.trainer.run_round`: fixed split, gate, store)
with the same epochs per round, so the local model takes the same number of optimizer steps; DCML
also trains the incoming copy (about twice the compute). Round 1 is a local warm-up in both arms.
Each site's served model is scored on its own validation split and on held-out test cases.

    gcml dcml-compare --out dcml-compare --rounds 4 --epochs 5 --styles a,b

writes ``compare.json``, ``compare.csv`` and ``compare.png``, and times a DCML step against a
single-model supervised step on the same batch.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gcml_app.config import SiteConfig
from gcml_app.dcml import dcml_step, supervised_step
from gcml_app.evaluate import dice_per_label, mean_dice
from gcml_app.network import build_network
from gcml_app.sim.phantoms import LABELS, write_studies
from gcml_app.store import ModelStore
from gcml_app.trainer import run_round
from gcml_app.transforms import val_transforms

__all__ = ["compare", "step_cost"]


def _site_cfg(name: str, state_dir: Path, seed: int) -> SiteConfig:
    return SiteConfig.model_validate({
        "site": name,
        "labels": LABELS,
        "roi_size": [32, 32, 32],
        "network": {"name": "UNet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "train": {"batch_size": 2, "samples_per_case": 2, "lr": 0.003, "seed": seed},
        "validation": {"fraction": 0.25, "min_cases": 2},
        "dcml": {"samples_per_class": 128},
        "state_dir": str(state_dir),
    })


def _cases(folder: Path) -> list[dict[str, str]]:
    return [{"id": p.name.split(".")[0], "image": str(folder / p.name), "label": str(p)}
            for p in sorted((folder / "labels" / "final").glob("*.nii.gz"))]


def _test_dice(cfg: SiteConfig, store: ModelStore, test_cases: list[dict[str, str]]) -> dict[str, float]:
    net = build_network(cfg)
    net.load_state_dict(store.load(store.served_version()))
    data = [val_transforms(cfg)({"image": c["image"], "label": c["label"]}) for c in test_cases]
    return dice_per_label(net, data, list(cfg.labels), cfg.roi_size)


def step_cost(cfg: SiteConfig, repeats: int = 10) -> dict[str, float]:
    """Seconds per DCML step and per single-model supervised step on the same batch, and their ratio."""
    torch.manual_seed(0)
    x = torch.randn(cfg.train.batch_size, cfg.input_channels, *cfg.roi_size)
    y = torch.randint(0, cfg.out_channels, (cfg.train.batch_size, 1, *cfg.roi_size))
    a, b = build_network(cfg), build_network(cfg)
    oa, ob = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    s = copy.deepcopy(a)
    os_ = torch.optim.AdamW(s.parameters())
    for _ in range(2):  # warm-up
        dcml_step(a, b, oa, ob, x, y, cfg.dcml)
        supervised_step(s, os_, x, y)
    t = {"dcml": 0.0, "supervised": 0.0}
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        dcml_step(a, b, oa, ob, x, y, cfg.dcml)
        t["dcml"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        supervised_step(s, os_, x, y)
        t["supervised"] += time.perf_counter() - t0
    return {"dcml_s": t["dcml"] / repeats, "supervised_s": t["supervised"] / repeats,
            "ratio": t["dcml"] / t["supervised"]}


def compare(out: str | Path, rounds: int = 4, epochs: int = 5, styles: tuple[str, str] = ("a", "b"),
            cases: int = 12, test_cases: int = 6, seed: int = 0) -> dict[str, Any]:
    """Run both arms on two fresh synthetic sites; returns (and writes) the results."""
    if rounds < 2:
        raise ValueError(f"rounds: found {rounds}; expected >= 2 (round 1 is the local warm-up)")
    out = Path(out)
    shutil.rmtree(out / "work", ignore_errors=True)
    data = {}
    for st in styles:
        full = write_studies(out / "work" / f"data-{st}", st, cases=cases + test_cases, seed=seed)
        studies = out / "work" / f"studies-{st}"
        (studies / "labels" / "final").mkdir(parents=True)
        for c in _cases(full)[:cases]:
            shutil.copy(c["image"], studies)
            shutil.copy(c["label"], studies / "labels" / "final")
        data[st] = {"train": _cases(studies), "test": _cases(full)[cases:]}

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=2 * rounds * len(styles), desc="rounds", unit="round")
    for arm in ("local", "dcml"):
        sites = {st: _site_cfg(f"site-{st}", out / "work" / arm / st, seed) for st in styles}
        stores = {st: ModelStore(c.state_dir / "models") for st, c in sites.items()}
        for r in range(1, rounds + 1):
            # Every site pulls its partner's model as served at the start of the round.
            snapshot = {}
            if arm == "dcml" and r > 1:
                for st, store in stores.items():
                    path = out / "work" / arm / f"served-{st}-r{r}.safetensors"
                    path.write_bytes(store.read_bytes(store.served_version()))
                    snapshot[st] = path
            for st, cfg in sites.items():
                incoming = None
                if snapshot:
                    partner = next(p for p in styles if p != st)
                    incoming = cfg.state_dir / "peers" / f"{partner}-r{r}.safetensors"
                    incoming.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(snapshot[partner], incoming)
                t0 = time.perf_counter()
                rec = run_round(cfg, stores[st], data[st]["train"], epochs=epochs, incoming=incoming)
                served = stores[st].served()
                test = _test_dice(cfg, stores[st], data[st]["test"])
                rows.append({
                    "arm": arm, "site": st, "round": r, "winner": rec["winner"], "published": rec["published"],
                    "served_version": served.version, "val_dice": round(served.mean_dice, 4),
                    "test_dice": round(mean_dice(test), 4), **{f"test_{k}": round(v, 4) for k, v in test.items()},
                    "seconds": round(time.perf_counter() - t0, 2),
                })
                bar.update()
    bar.close()
    small = _site_cfg("cost", out / "work" / "cost", seed)
    large = small.model_copy(update={
        "roi_size": (64, 64, 64),
        "network": small.network.model_copy(update={"channels": (16, 32, 64, 128), "strides": (2, 2, 2)}),
    })
    cost = {"small_unet_32": step_cost(small), "unet_16_128_roi_64": step_cost(large, repeats=5)}
    result = {"rounds": rounds, "epochs": epochs, "styles": list(styles), "cases": cases, "test_cases": test_cases,
              "rows": rows, "step_cost": cost}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, styles, out / "compare.png")
    return result


def _plot(rows, styles, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(styles), figsize=(5 * len(styles), 4), sharey=True)
    for ax, st in zip(axes, styles):
        for arm, colour in (("local", "tab:gray"), ("dcml", "tab:blue")):
            pts = [r for r in rows if r["arm"] == arm and r["site"] == st]
            ax.plot([r["round"] for r in pts], [r["test_dice"] for r in pts], "o-", color=colour, label=f"{arm} (test)")
            ax.plot([r["round"] for r in pts], [r["val_dice"] for r in pts], "--", color=colour, alpha=0.6,
                    label=f"{arm} (validation)")
        ax.set_title(f"site-{st}: served model, mean Dice")
        ax.set_xlabel("round (1 = local warm-up)")
        ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice (organ, lesion)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
