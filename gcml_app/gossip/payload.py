"""Checks on model weights that came from outside: tensors only, our architecture, every value finite.

A payload is untrusted bytes. It is parsed only by ``safetensors`` (a JSON header and raw tensor
buffers; no code runs, unlike a pickle), then compared with our architecture fingerprint, then
scanned for NaN/Inf.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from gcml_app.config import SiteConfig
from gcml_app.network import arch_fingerprint, build_network

__all__ = ["our_arch", "verify_weights"]


def our_arch(cfg: SiteConfig) -> str:
    """The architecture fingerprint of this site's network (what a partner's weights must match)."""
    return arch_fingerprint(cfg, build_network(cfg).state_dict())


def verify_weights(data: bytes, cfg: SiteConfig, ours: str | None = None) -> dict[str, torch.Tensor]:
    """Parse and check a weights payload.

    Args:
        data: the payload bytes.
        cfg: this site's config (defines the expected architecture).
        ours: our fingerprint, if already computed (see :func:`our_arch`).

    Returns:
        the state dict ``{name: tensor}``.

    Raises:
        ValueError: the reason, e.g. ``"not a safetensors file (...)"``, ``"architecture ... differs"``,
            ``"non-finite values in [...]"``.
    """
    if data[:2] == b"\x80\x02" or data[:1] == b"\x80" or data[:2] == b"PK":
        kind = "a zip archive (torch.save checkpoint)" if data[:2] == b"PK" else "a pickle"
        raise ValueError(f"not a safetensors file: it looks like {kind}; pickled payloads are never loaded")
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"not a safetensors file ({e})") from None
    if not state:
        raise ValueError("the safetensors file holds no tensors")
    ours = ours or our_arch(cfg)
    theirs = arch_fingerprint(cfg, state)
    if theirs != ours:
        raise ValueError(f"architecture {theirs[:19]}... differs from ours {ours[:19]}...")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"non-finite values (NaN/Inf) in {bad[:3]}")
    return state
