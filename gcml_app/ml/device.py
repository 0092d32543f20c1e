"""Where a site computes, and in what precision: the device, mixed precision, cuDNN, window batches.

Pure ML code. Nothing here initialises CUDA on import: the warm trainer (``gcml_app.site.warm``)
imports torch and forks every round from itself, and a CUDA context created before a fork is
unusable in the child. Only the round (the child) calls :func:`setup_device`.

Mixed precision (``train.amp``, docs/design.md "Real-size sites"): ``auto`` is on CUDA only. On a GPU
that supports it the forward passes run in bfloat16 (the exponent range of fp32: no loss scaling);
otherwise in float16, with a :class:`torch.amp.GradScaler`. The losses (DiceCE, the mutual KL and its
softmaxes, InfoNCE) always take fp32 logits (:func:`fp32`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from gcml_app.config import SiteConfig

__all__ = [
    "Precision",
    "fp32",
    "is_out_of_memory",
    "precision",
    "round_devices",
    "setup_device",
    "stitch_device",
    "sw_batch_size",
    "train_device",
]

# Stitching a whole-volume prediction on the GPU is kept to this share of its free memory; beyond it the
# windows still run on the GPU and only the (n + 1)-channel output volume is assembled in host memory.
STITCH_FREE_SHARE = 0.25


def train_device(cfg: SiteConfig) -> torch.device:
    """Where the site trains and validates (``train.device``, ``train.gpu``): ``auto`` is the GPU when there is one."""
    kind = cfg.train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{cfg.train.gpu}") if kind == "cuda" else torch.device("cpu")


def round_devices(cfg: SiteConfig) -> list[torch.device]:
    """The devices one round runs on, one process (rank) each (``train.gpus``); a single device without it.

    ``all`` is every visible GPU (counted without creating a CUDA context, so a fork after it can still use
    them); with ``train.device: cpu``, or ``auto`` on a machine without CUDA, each listed entry is one CPU process.

    Example:
        >>> [str(d) for d in round_devices(cfg)]          # doctest: +SKIP
        ['cuda:0', 'cuda:1']
    """
    gpus = cfg.train.gpus
    if gpus is None:
        return [train_device(cfg)]
    kind = cfg.train.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if gpus == "all":
        gpus = list(range(torch.cuda.device_count())) if kind == "cuda" else [0]
    if kind != "cuda":
        return [torch.device("cpu")] * max(len(gpus), 1)
    return [torch.device(f"cuda:{g}") for g in gpus] or [train_device(cfg)]


def setup_device(cfg: SiteConfig, device: torch.device) -> None:
    """Make ``device`` current and set cuDNN after ``monai.utils.set_determinism`` (which turns autotuning off).

    ``train.deterministic: false`` (the default) autotunes convolutions for the fixed-size crops
    (``cudnn.benchmark``); the CPU path is unaffected. ``train.gpu_memory_fraction`` caps this
    process's share of a GPU that inference shares.
    """
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    torch.backends.cudnn.deterministic = cfg.train.deterministic
    if cfg.train.gpu_memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(cfg.train.gpu_memory_fraction, device)


@dataclass(frozen=True)
class Precision:
    """How a round's forward passes run: ``dtype`` under autocast (``None``: fp32) and whether a grad scaler is needed."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def scaled(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 ones do not."""
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.scaled else None

    def __str__(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")


def precision(cfg: SiteConfig, device: torch.device, dtype: torch.dtype | None = None) -> Precision:
    """The round's precision from ``train.amp``: ``auto`` = mixed on CUDA, fp32 elsewhere.

    Args:
        dtype: force an autocast dtype (tests and the bench run float16 and bfloat16 on purpose).
    """
    amp = cfg.train.amp
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision(device.type)
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16  # CPU autocast runs bfloat16
    return Precision(device.type, dtype)


def fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 (logits out of an autocast forward pass, before any softmax or loss)."""
    return t if t.dtype == torch.float32 else t.float()


def sw_batch_size(cfg: SiteConfig, device: torch.device) -> int:
    """``validation.sw_batch_size``, or when 0 (auto): 1 window at a time on the CPU, 4 on a GPU."""
    n = cfg.validation.sw_batch_size
    return n if n else (4 if device.type == "cuda" else 1)


def stitch_device(device: torch.device, spatial: tuple[int, ...], channels: int) -> torch.device:
    """Where a whole-volume sliding-window output is assembled: on ``device`` if it fits, else the CPU.

    The output, its weight map and the argmax need about ``(channels + 2) * voxels * 4`` bytes; on a
    GPU that must stay under :data:`STITCH_FREE_SHARE` of the free memory (the windows themselves
    always run on ``device``).
    """
    if device.type != "cuda":
        return device
    voxels = 1
    for s in spatial:
        voxels *= int(s)
    free, _ = torch.cuda.mem_get_info(device)
    return device if (channels + 2) * voxels * 4 <= STITCH_FREE_SHARE * free else torch.device("cpu")


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error, whichever class this torch raises it as."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())
