"""The site's segmentation network, built from config, and its architecture fingerprint.

Pure ML code: no HTTP, no MONAI Label imports.
"""

from __future__ import annotations

import hashlib
import json

import torch
from monai.networks.nets import SegResNet, UNet

from gcml_app.config import SegResNetConfig, SiteConfig, UNetConfig

__all__ = ["arch_fingerprint", "build_network"]


def build_network(cfg: SiteConfig) -> torch.nn.Module:
    """Build the MONAI network named in ``cfg.network``.

    Args:
        cfg: site config; ``input_channels`` and ``out_channels`` (background + labels) set the I/O.

    Returns:
        a module mapping ``(B, input_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``.

    Example:
        >>> net = build_network(cfg)
        >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """
    net = cfg.network
    if isinstance(net, UNetConfig):
        return UNet(
            spatial_dims=3,
            in_channels=cfg.input_channels,
            out_channels=cfg.out_channels,
            channels=net.channels,
            strides=net.strides,
            num_res_units=net.num_res_units,
            dropout=net.dropout,
        )
    if isinstance(net, SegResNetConfig):
        return SegResNet(
            spatial_dims=3,
            in_channels=cfg.input_channels,
            out_channels=cfg.out_channels,
            init_filters=net.init_filters,
            blocks_down=net.blocks_down,
            blocks_up=net.blocks_up,
            dropout_prob=net.dropout or None,
        )
    raise ValueError(f"network.name: found {net.name!r}; expected 'UNet' or 'SegResNet'")


def arch_fingerprint(cfg: SiteConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """A stable hash of the network config, I/O channels, and every parameter's name, shape and dtype.

    Two sites whose fingerprints match can exchange weights; any change to a layer shape,
    the label set size or the network options changes it.

    Returns:
        ``"sha256:<hex>"``.
    """
    desc = {
        "network": cfg.network.model_dump(mode="json"),
        "in": cfg.input_channels,
        "out": cfg.out_channels,
        "params": [[k, list(v.shape), str(v.dtype)] for k, v in sorted(state_dict.items())],
    }
    blob = json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
