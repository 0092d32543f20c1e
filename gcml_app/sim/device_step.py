"""The DCML step at a site's deployment size on its device: time, peak GPU memory, and that it learns.

Shared by ``gcml bench --gpu`` (:mod:`gcml_app.sim.gpucheck`) and ``gcml bench --scale`` on a GPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gcml_app.config import SiteConfig
from gcml_app.ml.dcml import dcml_step
from gcml_app.ml.device import precision, setup_device, train_device
from gcml_app.ml.network import build_network

__all__ = ["DEPLOYMENT_NETWORK", "peak_gpu_mb", "reset_gpu_peak", "step_check"]

# sample_configs/deployment.yaml's network
DEPLOYMENT_NETWORK = {"name": "UNet", "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}


def peak_gpu_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def step_check(cfg: SiteConfig, amp_on: bool, steps: int) -> dict[str, Any]:
    """``steps`` timed DCML steps of ``cfg``'s network on one batch of ``roi_size`` crops, AMP on or off.

    Returns:
        ``{"precision", "step_s" (median), "loss_finite", "both_updated", "losses", "peak_gpu_mb"}``.
    """
    device = train_device(cfg)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": "on" if amp_on else "off"})})
    setup_device(cfg, device)
    amp = precision(cfg, device)
    torch.manual_seed(0)
    local, incoming = build_network(cfg).to(device), build_network(cfg).to(device)
    before = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (local, incoming)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (local, incoming)]
    scaler = amp.scaler()
    b = cfg.train.batch_size
    x = torch.randn(b, cfg.input_channels, *cfg.roi_size, device=device)
    y = (x > 1.0).long() + (x > 2.0).long()
    reset_gpu_peak(device)
    times, last = [], None
    for i in range(steps + 1):  # the first step warms up cuDNN's autotuner and is not timed
        t = time.perf_counter()
        last = dcml_step(local, incoming, *opts, x, y, cfg.dcml, amp=amp, scaler=scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t)
    losses = vars(last)
    updated = [any(not torch.equal(v, b0[k]) for k, v in m.state_dict().items() if v.is_floating_point())
               for m, b0 in zip((local, incoming), before)]
    return {"precision": str(amp), "step_s": round(sorted(times)[len(times) // 2], 4), "steps": steps,
            "loss_finite": all(torch.isfinite(torch.tensor(v)).item() for v in losses.values()),
            "both_updated": all(updated), "losses": {k: round(v, 4) for k, v in losses.items()},
            "peak_gpu_mb": peak_gpu_mb(device)}
