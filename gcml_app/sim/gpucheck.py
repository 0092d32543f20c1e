"""``gcml bench --gpu``: what a hospital runs first on its server, in a few minutes -> ``gpu_check.json``.

Three checks, each with its figures:

- ``dcml_step``: DCML steps at the deployment network (``sample_configs/deployment.yaml``: UNet
  16..256) on 96^3 crops, mixed precision on and off: losses finite, both models updated, seconds
  per step and peak GPU memory;
- ``round``: one full local round (preprocess, train, validate, publish) on 8 realistic-size cases
  (:mod:`gcml_app.sim.scale`, 192 x 192 x 160 at 1 mm), through :func:`~gcml_app.rounds.run_round`;
- ``infer``: ``gcml_seg`` (the MONAI Label infer task Slicer calls) on one such volume with the
  published model: seconds and peak GPU memory.

On a machine without a GPU the same checks run on the CPU path at reduced sizes (48^3 crops, a
smaller network, 128 x 128 x 96 volumes, ``reduced: true`` in the JSON), so the script itself is
checked everywhere; CI never needs a GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from gcml_app.config import SiteConfig
from gcml_app.ml.device import train_device
from gcml_app.sim.device_step import DEPLOYMENT_NETWORK, peak_gpu_mb, reset_gpu_peak, step_check
from gcml_app.sim.scale import write_ct_studies

__all__ = ["gpu_check"]

REDUCED_NETWORK = {"name": "UNet", "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}


def _cfg(state: Path, gpu: bool, amp: str = "auto") -> SiteConfig:
    return SiteConfig.model_validate({
        "site": "gpu-check", "labels": {"organ": 1, "lesion": 2}, "spacing": [1.0, 1.0, 1.0],
        "roi_size": [96] * 3 if gpu else [48] * 3, "intensity": {"mode": "range", "a_min": -200, "a_max": 300},
        "network": DEPLOYMENT_NETWORK if gpu else REDUCED_NETWORK, "state_dir": str(state),
        "train": {"epochs": 1, "batch_size": 2, "samples_per_case": 2, "amp": amp, "warm": False},
        "validation": {"fraction": 0.25, "min_cases": 2},
    })


def gpu_check(out: str | Path, steps: int = 5) -> dict[str, Any]:
    """Run the three checks; write ``gpu_check.json`` in ``out``.

    Returns:
        ``{"device", "gpu", "reduced", "dcml_step": {"amp_on", "amp_off"}, "round", "infer", "ok"}``.
    """
    from gcml_app.rounds import run_round
    from gcml_app.site.infer import GCMLSegInfer
    from gcml_app.store import ModelStore

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    cfg = _cfg(out / "state", gpu)
    device = train_device(cfg)
    res: dict[str, Any] = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if gpu else None,
                           "reduced": not gpu, "torch": torch.__version__, "roi_size": list(cfg.roi_size),
                           "network": cfg.network.model_dump(mode="json")}
    res["dcml_step"] = {"amp_on": step_check(cfg, True, steps), "amp_off": step_check(cfg, False, steps)}
    on, off = res["dcml_step"]["amp_on"], res["dcml_step"]["amp_off"]
    res["dcml_step"]["amp_speedup"] = round(off["step_s"] / on["step_s"], 2)

    shape = (192, 192, 160) if gpu else (128, 128, 96)
    cases = write_ct_studies(out / "data", shape, 8)
    store = ModelStore(cfg.state_dir / "models")
    reset_gpu_peak(device)
    t = time.perf_counter()
    rec = run_round(cfg, store, cases)
    res["round"] = {"wall_s": round(time.perf_counter() - t, 2), "volume_1mm": list(shape), "cases": len(cases),
                    "n_train": rec["n_train"], "n_val": rec["n_val"], "published": rec["published"],
                    "timings": rec["timings"], "peak_rss_mb": rec["peak_rss_mb"], "cache": rec["cache"],
                    "precision": rec["precision"], "peak_gpu_mb": rec.get("peak_gpu_mb")}

    task = GCMLSegInfer(cfg, store)
    reset_gpu_peak(device)
    t = time.perf_counter()
    label, result = task({"image": cases[0]["image"], "device": "cuda" if gpu else "cpu"})
    res["infer"] = {"wall_s": round(time.perf_counter() - t, 2), "model_version": result.get("gcml_model_version"),
                    "peak_gpu_mb": peak_gpu_mb(device), "label_written": bool(label) and Path(label).exists()}
    res["ok"] = bool(on["loss_finite"] and on["both_updated"] and off["loss_finite"] and off["both_updated"]
                     and res["round"]["published"] and res["infer"]["label_written"])
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    return res
