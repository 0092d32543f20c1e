"""``gcml bench --scale``: a round's memory and time against the number of cases, on realistic-size volumes.

Synthetic CT-like volumes (generated here, never downloaded): an air background, a body of soft
tissue with noise, an organ and a lesion, stored as int16 NIfTI at an anisotropic scanner spacing
(0.8 x 0.8 x 1.6 mm) so every case is resampled to the site's 1 mm, as a hospital's are.

For each volume size and each dataset size N, two local rounds run, each in a fresh process (so the
peak resident memory is that round's alone): the first preprocesses every case into the case cache,
the second reuses it. Per round: the peak memory above the process's start, and seconds per case for
loading, training and validation. ``scale.json`` holds every round and the fitted memory per added
case (and on a GPU, the DCML step at the deployment network on 96^3 crops, AMP on and off);
``scale.png`` plots memory and time against N.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from gcml_app.config import SiteConfig
from gcml_app.sim.device_step import DEPLOYMENT_NETWORK, step_check

__all__ = ["SCALE_SIZES", "ct_volume", "fresh_round", "plot_scale", "scale_bench", "write_ct_studies"]

# (name, voxels at 1 mm after resampling): CT-like (5.9 M voxels) and MR-like
SCALE_SIZES = {"ct-192x192x160": (192, 192, 160), "mr-144x144x112": (144, 144, 112)}
QUICK_SIZES = {"small-64x64x48": (64, 64, 48)}
NATIVE_SPACING = (0.8, 0.8, 1.6)  # x, y, z in mm: resampled to 1 mm by the round


def ct_volume(shape_1mm: tuple[int, int, int], seed: int) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic CT and its label at ``NATIVE_SPACING``; ``shape_1mm`` is (x, y, z) once resampled to 1 mm.

    Returns:
        ``(image int16 HU, label uint8 {0, 1 organ, 2 lesion})`` with the same geometry.
    """
    rng = np.random.default_rng(seed)
    size = [max(8, round(n / s)) for n, s in zip(shape_1mm, NATIVE_SPACING)]
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in size[::-1]), indexing="ij")
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    body = (x / 0.9) ** 2 + (y / 0.75) ** 2 <= 1
    hu[body] = 30.0
    c = rng.uniform(-0.3, 0.3, 3)
    r = rng.uniform(0.2, 0.3, 3)
    organ = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
    hu[organ] = 80.0
    lesion = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= (0.4 * r.min()) ** 2
    hu[lesion] = 140.0
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    label = np.zeros(x.shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    out = []
    for arr in (hu.astype(np.int16), label):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(NATIVE_SPACING)
        out.append(img)
    return out[0], out[1]


def write_ct_studies(folder: Path, shape_1mm: tuple[int, int, int], n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` synthetic CTs with final labels in a MONAI Label studies layout; returns the round's cases."""
    labels = folder / "labels" / "final"
    labels.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        name = f"ct_{i:03d}.nii.gz"
        if not (labels / name).exists():
            image, label = ct_volume(shape_1mm, seed + i)
            sitk.WriteImage(image, str(folder / name), useCompression=True)
            sitk.WriteImage(label, str(labels / name), useCompression=True)
        cases.append({"id": name.split(".")[0], "image": str(folder / name), "label": str(labels / name)})
    return cases


def _site(state: Path, roi: int, network: dict[str, Any], epochs: int) -> dict[str, Any]:
    return {
        "site": "scale", "labels": {"organ": 1, "lesion": 2}, "spacing": [1.0, 1.0, 1.0],
        "roi_size": [roi] * 3, "intensity": {"mode": "range", "a_min": -200, "a_max": 300},
        "network": network, "state_dir": str(state),
        "train": {"epochs": epochs, "batch_size": 2, "samples_per_case": 2, "warm": False},
        "validation": {"fraction": 0.2, "min_cases": 1},
    }


_ROUND = """
import json, sys, time
from gcml_app.config import SiteConfig
from gcml_app.rounds import run_round
from gcml_app.store import ModelStore
cfg = SiteConfig.model_validate(json.loads(sys.argv[1]))
cases = json.loads(sys.argv[2])
t = time.perf_counter()
rec = run_round(cfg, ModelStore(cfg.state_dir / "models"), cases)
wall = time.perf_counter() - t
keep = ("n_train", "n_val", "timings", "peak_rss_mb", "cache", "precision", "peak_gpu_mb", "published", "losses",
        "ranks")
print("ROUND " + json.dumps({**{k: rec.get(k) for k in keep}, "scored": len(rec["scores"]), "wall_s": round(wall, 3)}))
"""


def fresh_round(site: dict[str, Any], cases: list[dict[str, str]], what: str = "scale") -> dict[str, Any]:
    """One :func:`~gcml_app.rounds.run_round` of ``site`` (a YAML's content) in a fresh process, so its memory
    and threads are its own: the record's figures (timings, memory, cache, losses, ranks), ``scored`` (models
    scored on every validation case) and ``wall_s``.

    Raises:
        RuntimeError: the round failed, with the end of its stderr.
    """
    done = subprocess.run([sys.executable, "-c", _ROUND, json.dumps(site), json.dumps(cases)],
                          capture_output=True, text=True, timeout=7200)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROUND ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"{what} round failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(line[6:])


def _run_round(site: dict[str, Any], cases: list[dict[str, str]]) -> dict[str, Any]:
    rec = fresh_round(site, cases)
    peaks = rec["peak_rss_mb"]
    rec["above_start_mb"] = round(max(peaks.values()) - peaks["before_round"], 1)
    t = rec["timings"]
    n = rec["n_train"] + rec["n_val"]
    scored = rec["scored"]  # models scored on every validation case: the candidate, and the served one after round 1
    rec["per_case_s"] = {"load": round(t["load_s"] / n, 3), "train": round(t["train_s"] / rec["n_train"], 3),
                         "validate": round(t["validate_s"] / rec["n_val"] / scored, 3)}
    return rec


_SCORE = """
import json, resource, sys, time, torch
from monai.transforms import Compose
from gcml_app.config import SiteConfig
from gcml_app.ml.acquisition import disagreement, epistemic_entropy, soft_predict
from gcml_app.ml.network import build_network
from gcml_app.ml.transforms import image_transforms
cfg = SiteConfig.model_validate(json.loads(sys.argv[1]))
nets = []
for seed in range(1 + int(sys.argv[3])):  # the served model and the partners
    torch.manual_seed(seed)
    nets.append(build_network(cfg).eval())
mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = mb()  # the process's peak before the image: imports and networks
t0 = time.perf_counter()
image = torch.as_tensor(Compose(image_transforms(cfg))({"image": sys.argv[2]})["image"])
load_s, load_mb = time.perf_counter() - t0, mb() - start
args = (cfg.roi_size, 1, cfg.validation.overlap, "cpu", None, cfg.out_channels)
t0 = time.perf_counter()
p = soft_predict(nets[0], image, *args)
disagreement(p, ((str(i), soft_predict(n, image, *args)) for i, n in enumerate(nets[1:])))
dis_s, dis_mb = time.perf_counter() - t0, mb() - start
del p
t0 = time.perf_counter()
epistemic_entropy(nets[0], image, cfg.roi_size, cfg.active.mc_samples, cfg.active.mc_dropout, *args[1:])
print("SCORE " + json.dumps({"voxels": int(image[0].numel()), "load_s": round(load_s, 2), "load_peak_above_mb": round(load_mb),
                             "disagreement_s": round(dis_s, 2), "disagreement_peak_above_mb": round(dis_mb),
                             "epistemic_s": round(time.perf_counter() - t0, 2),
                             "epistemic_peak_above_mb": round(mb() - start)}))
"""


def scoring_cost(site: dict[str, Any], image: str, partners: int = 3) -> dict[str, Any]:
    """One unlabelled image scored as the site's scoring process does, on the CPU in a fresh process: its
    load, ``disagreement`` against ``partners`` partner models and ``epistemic`` (seconds, and the process's
    peak memory above its start, imports and networks: the scores hold two probability volumes, whatever
    the number of partners; a peak is a running maximum, so each includes the ones before it)."""
    done = subprocess.run([sys.executable, "-c", _SCORE, json.dumps(site), image, str(partners)],
                          capture_output=True, text=True, timeout=7200)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SCORE ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"scale scoring failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return {"partners": partners, "torch_threads": torch.get_num_threads(), **json.loads(line[6:])}


def _slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares MB per added case."""
    return round(float(np.polyfit(np.array(xs, float), np.array(ys, float), 1)[0]), 2) if len(xs) > 1 else 0.0


def augment_cost(roi: int, draws: int) -> dict[str, float]:
    """Seconds one training crop of ``roi``³ spends in ``train.augment: scanner`` on one CPU thread (the
    loader's background thread; ``train.num_workers`` processes divide it): the mean and p95 over ``draws``
    crops at the recipe's probabilities, and every transform firing at once."""
    from monai.transforms import Compose

    from gcml_app.ml.transforms import augment_transforms

    cfg = SiteConfig.model_validate({"site": "bench", "state_dir": "unused", "labels": {"organ": 1},
                                     "roi_size": [roi] * 3})
    g = torch.Generator().manual_seed(0)
    crop = {"image": torch.randn(1, roi, roi, roi, generator=g),
            "label": (torch.rand(1, roi, roi, roi, generator=g) > 0.8).to(torch.uint8)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def timed(chain: Compose, n: int) -> list[float]:
            chain.set_random_state(0)
            out = []
            for _ in range(n):
                t = time.perf_counter()
                chain(dict(crop))
                out.append(time.perf_counter() - t)
            return out

        recipe = timed(Compose(augment_transforms(cfg)), draws)
        every = Compose(augment_transforms(cfg))
        for t in every.transforms:
            if hasattr(t, "prob"):
                t.prob = 1.0
        worst = timed(every, max(1, draws // 5))
    finally:
        torch.set_num_threads(threads)
    return {"roi": roi, "s_per_crop": round(float(np.mean(recipe)), 4),
            "p95_s": round(float(np.percentile(recipe, 95)), 4), "all_fire_s": round(float(np.mean(worst)), 4)}


def scale_bench(out: str | Path, quick: bool = False) -> dict[str, Any]:
    """Run the scale rounds; write ``scale.json`` and ``scale.png`` in ``out``.

    Args:
        quick: small volumes and N in {2, 4} (the test suite's check that the bench runs).

    Returns:
        ``{"sizes": {name: {"voxels", "rounds": [...], "mb_per_case_first", "mb_per_case_second",
        "second_over_first_load"}}, "scoring": {"voxels", "disagreement_s", ...}, "augment": [{"roi",
        "s_per_crop", "p95_s", "all_fire_s"}], ...}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK_SIZES if quick else SCALE_SIZES
    ns = [3, 5] if quick else [6, 12, 24]
    network = {"name": "UNet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
    roi = 32 if quick else 64
    result: dict[str, Any] = {"ns": ns, "roi_size": roi, "network": network, "epochs": 1,
                              "native_spacing_mm": list(NATIVE_SPACING), "sizes": {}}
    bar = tqdm(total=len(sizes) * len(ns) * 2, desc="scale", unit="round")
    for name, shape in sizes.items():
        cases = write_ct_studies(out / "data" / name, shape, max(ns))
        rounds = []
        for n in ns:
            state = out / "runs" / name / f"n{n}"
            for which in ("first", "second"):
                bar.set_postfix(size=name, n=n, round=which)
                rec = _run_round(_site(state, roi, network, 1), cases[:n])
                rounds.append({"n": n, "round": which, **rec})
                bar.update()
        first = [r for r in rounds if r["round"] == "first"]
        second = [r for r in rounds if r["round"] == "second"]
        voxels = int(np.prod(shape))
        result["sizes"][name] = {
            "voxels": voxels, "rounds": rounds,
            "mb_per_case_first": _slope(ns, [r["above_start_mb"] for r in first]),
            "mb_per_case_second": _slope(ns, [r["above_start_mb"] for r in second]),
            "second_over_first_load": round(
                sum(r["timings"]["load_s"] for r in second) / sum(r["timings"]["load_s"] for r in first), 3),
            "cache_mb_per_case": round(second[-1]["cache"]["bytes"] / ns[-1] / 1e6, 1),
        }
    bar.close()
    # the largest size: what the background scoring of one unlabelled image costs there
    name = next(iter(sizes))
    image = write_ct_studies(out / "data" / name, sizes[name], 1)[0]["image"]  # written above: read back
    result["scoring"] = {"size": name, **scoring_cost(_site(out / "runs" / "scoring", roi, network, 1), image)}
    result["augment"] = [augment_cost(r, 5 if quick else 40) for r in ((32,) if quick else (96, 128))]
    if torch.cuda.is_available():  # the step at the deployment network and 96^3 crops, AMP on and off
        cfg = SiteConfig.model_validate(_site(out / "step", 96, DEPLOYMENT_NETWORK, 1))
        result["dcml_step"] = {k: step_check(cfg, on, 5) for k, on in (("amp_on", True), ("amp_off", False))}
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    plot_scale(result, out / "scale.png")
    return result


def plot_scale(result: dict[str, Any], path: Path) -> None:
    """Memory above the start and seconds per case against N, per volume size and round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in result["sizes"].items():
        for which, style in (("first", "-o"), ("second", "--s")):
            rs = [r for r in s["rounds"] if r["round"] == which]
            ns = [r["n"] for r in rs]
            ax_m.plot(ns, [r["above_start_mb"] for r in rs], style, label=f"{name} {which} round")
            for key, color in (("load", "C0"), ("train", "C1"), ("validate", "C2")):
                ax_t.plot(ns, [r["per_case_s"][key] for r in rs], style, color=color,
                          label=f"{key} ({which})" if name == next(iter(result["sizes"])) else None)
    ax_m.set(xlabel="labelled cases N", ylabel="round peak memory above its start (MB)",
             title="memory against the datastore's size")
    ax_t.set(xlabel="labelled cases N", ylabel="seconds per case", title="time per case")
    ax_m.legend(fontsize=7)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
