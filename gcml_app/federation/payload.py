"""Model weights on the wire: encoding (float32 or float16 transport) and the checks on what comes in.

A payload is untrusted bytes. It is parsed only by ``safetensors`` (a JSON header and raw tensor
buffers; no code runs, unlike a pickle), then compared with our architecture fingerprint, then
scanned for NaN/Inf.

Float16 transport halves the bytes: floating tensors are cast to float16 by the sender and back to
float32 by the receiver, a relative error of at most 2^-11 per weight (float16's 10-bit mantissa,
round to nearest). Only float16 is widened; any other dtype must match ours exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from gcml_app.config import SiteConfig
from gcml_app.ml.network import arch_fingerprint, build_network, convert_guidance, other_layout_arch, toggled_interactive

__all__ = ["TRANSPORTS", "accepted_archs", "encode_weights", "manifest_body", "our_arch", "verify_weights"]

TRANSPORTS = ("float32", "float16")


def encode_weights(state: dict[str, torch.Tensor], transport: str = "float32", **metadata: str) -> bytes:
    """Serialize a state dict for a partner (safetensors).

    Args:
        state: ``{name: tensor}``; float32 tensors are sent as ``transport``.
        transport: ``"float32"`` or ``"float16"`` (half the bytes).
        metadata: strings stored in the safetensors header (e.g. ``arch``), as one JSON value, so
            the same weights always encode to the same bytes.

    Raises:
        ValueError: an unknown ``transport``.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport: found {transport!r}; expected one of {list(TRANSPORTS)}")
    wire = torch.float16 if transport == "float16" else None
    tensors = {k: (v.detach().to("cpu").to(wire) if wire is not None and v.dtype == torch.float32 else v.detach().to("cpu"))
               .contiguous() for k, v in state.items()}
    # One header key: safetensors writes several metadata keys in hash order, which would give the same
    # weights a different sha256 (and ETag) on every encoding.
    return st_save(tensors, metadata={"gcml": json.dumps({"transport": transport, **metadata}, sort_keys=True)})


def manifest_body(site: str, m: Any, sha256: str, size: int, transport: str,
                  task: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``GET /gcml/peer/manifest`` answers for the served version ``m`` (a store manifest).

    ``sha256`` and ``size`` are those of the payload partners download (after ``transport`` encoding);
    ``task`` is the version's task (:mod:`gcml_app.federation.task`), or ``task`` for a version stored
    before manifests held it (the site's config then names it; the store refuses a label change).
    """
    return {"site": site, "version": m.version, "sha256": sha256, "bytes": size, "arch": m.arch,
            "transport": transport, "created": m.created, "val_dice": m.val_dice, "n_train": m.n_train,
            "n_val": m.n_val, "validated": m.validated, "lineage": m.lineage, "task": m.task or task or {}}


def our_arch(cfg: SiteConfig) -> str:
    """The architecture fingerprint of this site's network (what a partner's weights must match)."""
    return arch_fingerprint(cfg, build_network(cfg).state_dict())


def accepted_archs(cfg: SiteConfig, ours: str | None = None) -> tuple[str, str]:
    """Our fingerprint and that of the same network with the other guidance layout (interactive or not): a
    partner on either side of an ``interactive.enabled`` rollout converts exactly (:func:`convert_guidance`)."""
    return ours or our_arch(cfg), other_layout_arch(cfg)


def verify_weights(data: bytes | Path, cfg: SiteConfig, ours: str | None = None) -> dict[str, torch.Tensor]:
    """Parse and check a weights payload.

    Args:
        data: the payload bytes, or the file holding them (read without a second copy in memory).
        cfg: this site's config (defines the expected architecture).
        ours: our fingerprint, if already computed (see :func:`our_arch`).

    Returns:
        the state dict ``{name: tensor}``.

    Raises:
        ValueError: the reason, e.g. ``"not a safetensors file (...)"``, ``"architecture ... differs"``,
            ``"non-finite values in [...]"``, ``"weights of magnitude ... in [...]"``.
    """
    path = data if isinstance(data, Path) else None
    if path is not None:
        with open(path, "rb") as f:
            data = f.read(16)
    # A safetensors file is an 8-byte header length, then a JSON header. Name the usual impostors.
    if data[8:9] != b"{" and (data[:1] == b"\x80" or data[:2] == b"PK"):
        kind = "a zip archive (torch.save checkpoint)" if data[:2] == b"PK" else "a pickle"
        raise ValueError(f"not a safetensors file: it looks like {kind}; pickled payloads are never loaded")
    try:
        state = st_load_file(str(path)) if path is not None else st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ValueError(f"not a safetensors file ({e})") from None
    if not state:
        raise ValueError("the safetensors file holds no tensors")
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}  # float16 transport
    ours = ours or our_arch(cfg)
    theirs = arch_fingerprint(cfg, state)
    if theirs != ours:
        if arch_fingerprint(toggled_interactive(cfg), state) != other_layout_arch(cfg):
            raise ValueError(f"architecture {theirs[:19]}... differs from ours {ours[:19]}...")
        state = convert_guidance(state, cfg)  # the other guidance layout: exact (gcml_app.ml.network)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"non-finite values (NaN/Inf) in {bad[:3]}")
    # Finite but absurd weights (e.g. every one 3e38) overflow the first convolution into NaN losses.
    # A trained network's weights are O(1); gossip.max_abs_weight is far above that and far below overflow.
    limit = cfg.gossip.max_abs_weight
    huge = [k for k, v in state.items() if v.is_floating_point() and v.numel() and v.abs().max() > limit]
    if huge:
        raise ValueError(f"weights of magnitude over {limit:g} (gossip.max_abs_weight) in {huge[:3]}")
    return state
