"""Device, precision and window-batch choices, and a mixed-precision DCML step (run on the CPU here)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY

from gcml_app.config import SiteConfig
from gcml_app.ml import device as dev
from gcml_app.ml.dcml import dcml_step
from gcml_app.ml.network import build_network
from gcml_app.ml.supervised import supervised_step


def _cfg(**train) -> SiteConfig:
    return SiteConfig.model_validate({**TINY, "train": {**TINY["train"], **train}})


@pytest.mark.parametrize("amp, kind, bf16, want", [
    ("auto", "cpu", False, "fp32"),
    ("off", "cuda", True, "fp32"),
    ("auto", "cuda", True, "bfloat16"),
    ("auto", "cuda", False, "float16"),
    ("on", "cpu", False, "bfloat16"),
])
def test_precision_follows_train_amp_and_the_device(monkeypatch, amp, kind, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    p = dev.precision(_cfg(amp=amp), torch.device(kind))
    assert str(p) == want
    assert p.scaled == (want == "float16")  # only float16 needs a gradient scaler


@pytest.mark.parametrize("device, gpu, cuda, want", [
    ("auto", 0, False, "cpu"),
    ("auto", 1, True, "cuda:1"),
    ("cuda", 2, True, "cuda:2"),
    ("cpu", 1, True, "cpu"),
])
def test_train_device_is_the_configured_gpu(monkeypatch, device, gpu, cuda, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert str(dev.train_device(_cfg(device=device, gpu=gpu))) == want


@pytest.mark.parametrize("configured, kind, want", [(0, "cpu", 1), (0, "cuda", 4), (3, "cuda", 3), (2, "cpu", 2)])
def test_window_batches_are_sized_to_the_device(configured, kind, want):
    cfg = SiteConfig.model_validate({**TINY, "validation": {"sw_batch_size": configured}})
    assert dev.sw_batch_size(cfg, torch.device(kind)) == want


@pytest.mark.parametrize("error, want", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. Out of memory"), True),
    (RuntimeError("shapes do not match"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised_whatever_class_it_comes_as(error, want):
    assert dev.is_out_of_memory(error) is want


def test_stitching_stays_on_the_cpu_for_a_cpu_round():
    assert dev.stitch_device(torch.device("cpu"), (512, 512, 300), 3) == torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-scaled"])
def test_a_mixed_precision_dcml_step_is_finite_and_updates_both_models(dtype):
    cfg = _cfg(amp="on")
    amp = dev.precision(cfg, torch.device("cpu"), dtype=dtype)
    torch.manual_seed(0)
    local, incoming = build_network(cfg), build_network(cfg)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (local, incoming)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (local, incoming)]
    x = torch.randn(2, 1, 32, 32, 32)
    y = (x > 0.5).to(torch.long)
    scaler = amp.scaler()
    assert (scaler is not None) == (dtype == torch.float16)
    step = dcml_step(local, incoming, *opts, x, y, cfg.dcml, amp=amp, scaler=scaler)
    assert all(torch.isfinite(torch.tensor(v)) for v in vars(step).values())
    for m, b in zip((local, incoming), before):
        assert any(not torch.equal(v, b[k]) for k, v in m.state_dict().items() if v.is_floating_point())
        assert all(v.dtype == b[k].dtype for k, v in m.state_dict().items())  # weights stay fp32


def test_a_mixed_precision_supervised_step_matches_fp32_closely():
    cfg = _cfg(amp="on")
    x = torch.randn(2, 1, 32, 32, 32)
    y = (x > 0.5).to(torch.long)
    losses = []
    for amp in (None, dev.precision(cfg, torch.device("cpu"))):
        torch.manual_seed(0)
        net = build_network(cfg)
        losses.append(supervised_step(net, torch.optim.AdamW(net.parameters()), x, y, amp=amp))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
