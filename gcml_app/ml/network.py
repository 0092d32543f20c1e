"""The site's segmentation network, built from config, and its architecture fingerprint.

Pure ML code: no HTTP, no MONAI Label imports.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNet, UNet

from gcml_app.config import SegResNetConfig, SiteConfig, UNetConfig

__all__ = ["GCMLNet", "arch_fingerprint", "build_network", "feature_channels"]


class GCMLNet(torch.nn.Module):
    """A MONAI segmentation network with a decoder feature tap and a projection head for DCML.

    ``forward`` returns logits only, so sliding-window inference and MONAI Label use it unchanged;
    ``forward_features`` also returns the tapped decoder features and their L2-normalised embeddings.
    The projection head is part of the state dict: it travels with the model between sites.

    Args:
        backbone: a MONAI ``UNet`` or ``SegResNet``.
        feature_channels: channels ``F`` of the tapped decoder features.
        embed_dim: embedding size ``E`` of the projection head.
    """

    def __init__(self, backbone: torch.nn.Module, feature_channels: int, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Sequential(
            torch.nn.Conv3d(feature_channels, feature_channels, kernel_size=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(feature_channels, embed_dim, kernel_size=1),
        )

    def _tap(self) -> torch.nn.Module:
        """The module whose *input* is the last decoder feature map."""
        if isinstance(self.backbone, UNet):
            return self.backbone.model[2]  # top-level up layer: input is [skip, upsampled] concatenated
        return self.backbone.conv_final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, D, H, W)`` -> logits ``(B, C_out, D, H, W)``."""
        return self.backbone(x)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, decoder features and embeddings in one pass.

        Args:
            x: ``(B, C_in, D, H, W)``.

        Returns:
            ``logits (B, C_out, D, H, W)``, ``features (B, F, d, h, w)`` and unit-norm
            ``embeddings (B, E, d, h, w)``; ``(d, h, w)`` is ``(D, H, W)`` for SegResNet and
            ``(D, H, W) / strides[0]`` for UNet.
        """
        logits, feats = self.logits_and_features(x)
        return logits, feats, self.embed(feats)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``(B, E, ...)`` of decoder features ``(B, F, ...)`` (any 3 spatial dims).

        The head is point-wise (1x1x1 convolutions); for gathered voxels use :meth:`embed_points`.
        """
        return torch.nn.functional.normalize(self.head(feats), dim=1)

    def embed_points(self, feats: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings ``(M, E)`` of the features ``(M, F)`` of M gathered voxels.

        The same head and parameters as :meth:`embed`, run as linear maps over channels: on CPU a
        1x1x1 ``Conv3d`` over ``(1, F, M, 1, 1)`` falls onto a slow convolution path whose backward
        was half of the contrastive term's cost.
        """
        h = feats
        for layer in self.head:
            h = F.linear(h, layer.weight.flatten(1), layer.bias) if isinstance(layer, torch.nn.Conv3d) else layer(h)
        return F.normalize(h, dim=1)

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, C_out, D, H, W)`` and decoder features ``(B, F, d, h, w)``, without the head."""
        box: list[torch.Tensor] = []
        handle = self._tap().register_forward_pre_hook(lambda _m, args: box.append(args[0]))
        try:
            logits = self.backbone(x)
        finally:
            handle.remove()
        return logits, box[0]


def feature_channels(cfg: SiteConfig) -> int:
    """Channels ``F`` of the tapped decoder features for ``cfg.network``."""
    net = cfg.network
    return 2 * net.channels[0] if isinstance(net, UNetConfig) else net.init_filters


def build_network(cfg: SiteConfig) -> GCMLNet:
    """Build the MONAI network named in ``cfg.network`` with its DCML projection head.

    Args:
        cfg: site config; ``input_channels`` and ``out_channels`` (background + labels) set the I/O.

    Returns:
        a :class:`GCMLNet` mapping ``(B, input_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``.

    Example:
        >>> net = build_network(cfg)
        >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """
    net = cfg.network
    if isinstance(net, UNetConfig):
        backbone = UNet(
            spatial_dims=3,
            in_channels=cfg.input_channels,
            out_channels=cfg.out_channels,
            channels=net.channels,
            strides=net.strides,
            num_res_units=net.num_res_units,
            dropout=net.dropout,
        )
    elif isinstance(net, SegResNetConfig):
        backbone = SegResNet(
            spatial_dims=3,
            in_channels=cfg.input_channels,
            out_channels=cfg.out_channels,
            init_filters=net.init_filters,
            blocks_down=net.blocks_down,
            blocks_up=net.blocks_up,
            dropout_prob=net.dropout or None,
        )
    else:
        raise ValueError(f"network.name: found {net.name!r}; expected 'UNet' or 'SegResNet'")
    return GCMLNet(backbone, feature_channels(cfg), cfg.dcml.embed_dim)


def arch_fingerprint(cfg: SiteConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """A stable hash of the network config, I/O channels, and every parameter's name, shape and dtype.

    Two sites whose fingerprints match can exchange weights; any change to a layer shape,
    the label set size or the network options changes it.

    Returns:
        ``"sha256:<hex>"``.
    """
    desc = {
        "network": cfg.network.model_dump(mode="json"),
        "embed_dim": cfg.dcml.embed_dim,
        "in": cfg.input_channels,
        "out": cfg.out_channels,
        "params": [[k, list(v.shape), str(v.dtype)] for k, v in sorted(state_dict.items())],
    }
    blob = json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()
