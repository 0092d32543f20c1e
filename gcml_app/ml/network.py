"""The site's segmentation network, built from config (or a MONAI bundle), and its architecture fingerprint.

Pure ML code: no HTTP, no MONAI Label imports.
"""

from __future__ import annotations

import copy
import hashlib
import json

import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNet, UNet

from gcml_app.config import BundleNetConfig, SegResNetConfig, SiteConfig, UNetConfig
from gcml_app.ml.bundle import InitError, read_bundle

__all__ = ["GCMLNet", "arch_fingerprint", "build_backbone", "build_network", "convert_guidance", "default_feature_layer",
           "feature_channels", "fit_state", "other_layout_arch", "network_def", "toggled_interactive"]


class GCMLNet(torch.nn.Module):
    """A MONAI segmentation network with a decoder feature tap and a projection head for DCML.

    ``forward`` returns logits only, so sliding-window inference and MONAI Label use it unchanged;
    ``forward_features`` also returns the tapped decoder features and their L2-normalised embeddings.
    The projection head is part of the state dict: it travels with the model between sites.

    Args:
        backbone: a MONAI segmentation network (``UNet``, ``SegResNet``, a bundle's network).
        feature_channels: channels ``F`` of the tapped decoder features.
        embed_dim: embedding size ``E`` of the projection head.
        feature_layer: dotted name of the backbone module whose output is the tapped features.
        guidance_channels: ``G`` click guidance channels after the image's (``interactive.enabled``; 0: none).
            An input of the image's channels alone gets ``G`` zero channels appended: zero guidance, the
            auto-segmentation, so every whole-volume path (validation, ``gcml_seg``, scoring) runs unchanged.
    """

    def __init__(self, backbone: torch.nn.Module, feature_channels: int, embed_dim: int, feature_layer: str,
                 guidance_channels: int = 0, in_channels: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.feature_layer = feature_layer
        self.guidance_channels = guidance_channels
        self.in_channels = in_channels
        self.head = torch.nn.Sequential(
            torch.nn.Conv3d(feature_channels, feature_channels, kernel_size=1),
            torch.nn.ReLU(),
            torch.nn.Conv3d(feature_channels, embed_dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, C_in, D, H, W)`` (or ``(B, C_in - G, D, H, W)``: zero guidance) -> logits ``(B, C_out, D, H, W)``.

        ``features=True`` returns :meth:`logits_and_features` instead: through ``forward``, so a
        ``DistributedDataParallel`` wrapper sees the pass.
        """
        if features:
            return self.logits_and_features(x)
        return self.backbone(self.with_guidance(x))

    def with_guidance(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with ``G`` zero guidance channels appended when it holds the image's channels only."""
        if self.guidance_channels and self.in_channels is not None and x.shape[1] == self.in_channels - self.guidance_channels:
            return torch.cat([x, x.new_zeros((x.shape[0], self.guidance_channels, *x.shape[2:]))], dim=1)
        return x

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, decoder features and embeddings in one pass.

        Args:
            x: ``(B, C_in, D, H, W)``.

        Returns:
            ``logits (B, C_out, D, H, W)``, ``features (B, F, d, h, w)`` and unit-norm
            ``embeddings (B, E, d, h, w)``; ``(d, h, w)`` is the tapped layer's resolution: ``(D, H, W)``
            for SegResNet's default and ``(D, H, W) / strides[0]`` for UNet's.
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
        handle = self.backbone.get_submodule(self.feature_layer).register_forward_hook(
            lambda _m, _args, out: box.append(_first_tensor(out)))
        try:
            logits = self.backbone(self.with_guidance(x))
        finally:
            handle.remove()
        return logits, box[-1]


def _first_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else next(t for t in out if isinstance(t, torch.Tensor))


def default_feature_layer(backbone: torch.nn.Module) -> str | None:
    """The last decoder features of MONAI's UNet and SegResNet (``None``: no default for this class).

    UNet: ``model.1``, the top-level skip connection, whose output is ``[input-level features, upsampled
    decoder]`` concatenated (``2 * channels[0]`` at ``1 / strides[0]`` resolution). SegResNet: the last
    ``up_layers`` block (``init_filters`` at full resolution), the input of its final convolution.
    """
    if isinstance(backbone, UNet):
        return "model.1"
    if isinstance(backbone, SegResNet):
        return f"up_layers.{len(backbone.up_layers) - 1}"
    return None


def network_def(cfg: SiteConfig) -> dict:
    """``cfg.network`` as MONAI constructor arguments, in a bundle's ``network_def`` form
    (``{"_target_": "UNet", "spatial_dims": 3, ...}``); for ``name: bundle``, the bundle's own, checked."""
    net = cfg.network
    io = {"spatial_dims": 3, "in_channels": cfg.net_in_channels, "out_channels": cfg.out_channels}
    if isinstance(net, UNetConfig):
        return {"_target_": "UNet", **io, "channels": list(net.channels), "strides": list(net.strides),
                "num_res_units": net.num_res_units, "dropout": net.dropout, **net.monai_kwargs()}
    if isinstance(net, SegResNetConfig):
        return {"_target_": "SegResNet", **io, "init_filters": net.init_filters, "blocks_down": list(net.blocks_down),
                "blocks_up": list(net.blocks_up), "dropout_prob": net.dropout or None, **net.monai_kwargs()}
    if isinstance(net, BundleNetConfig):
        return read_bundle(net.init_from).network_def(net.net_key, cfg.net_in_channels, cfg.out_channels)
    raise ValueError(f"network.name: found {net.name!r}; expected 'UNet', 'SegResNet' or 'bundle'")


def build_backbone(cfg: SiteConfig) -> torch.nn.Module:
    """The MONAI network ``cfg.network`` names (for ``name: bundle``, the bundle's own), freshly initialised."""
    net = cfg.network
    if isinstance(net, BundleNetConfig):
        return read_bundle(net.init_from).network(net.net_key, cfg.net_in_channels, cfg.out_channels)[0]
    kwargs = network_def(cfg)
    return {"UNet": UNet, "SegResNet": SegResNet}[kwargs.pop("_target_")](**kwargs)


def _probe(cfg: SiteConfig, backbone: torch.nn.Module) -> tuple[str, int]:
    """The feature layer and its channels ``F``, from a dry run at ``roi_size`` on the meta device (no compute).

    Raises:
        InitError: the layer does not exist, or the network does not map a ``roi_size`` crop to
            ``out_channels`` logits of the same size.
    """
    layer = cfg.network.feature_layer or default_feature_layer(backbone)
    names = [n for n, _ in backbone.named_modules() if n]
    if layer is None or layer not in names:
        found = "no default for " + type(backbone).__name__ if layer is None else f"found {layer!r}"
        raise InitError(f"network.feature_layer: {found}; expected a module of the network, e.g. one of "
                        f"{names[-6:]} (the decoder's last features)")
    probe = copy.deepcopy(backbone).to("meta").eval()
    box: list[torch.Tensor] = []
    probe.get_submodule(layer).register_forward_hook(lambda _m, _a, out: box.append(_first_tensor(out)))
    x = torch.empty(1, cfg.net_in_channels, *cfg.roi_size, device="meta")
    try:
        with torch.no_grad():
            y = _first_tensor(probe(x))
    except Exception as e:
        raise InitError(f"roi_size: found {list(cfg.roi_size)}; the {type(backbone).__name__} network does not take "
                        f"crops of that size ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if tuple(y.shape) != (1, cfg.out_channels, *cfg.roi_size):
        raise InitError(f"network: maps a {list(cfg.roi_size)} crop to logits {list(y.shape[1:])}; expected "
                        f"{[cfg.out_channels, *cfg.roi_size]} (background plus one channel per label)")
    if not box or box[-1].dim() != 5:
        raise InitError(f"network.feature_layer: {layer!r} gives no 3D feature map; expected a decoder layer")
    return layer, int(box[-1].shape[1])


def feature_channels(cfg: SiteConfig) -> int:
    """Channels ``F`` of the tapped decoder features for ``cfg.network``."""
    return _probe(cfg, build_backbone(cfg))[1]


def build_network(cfg: SiteConfig) -> GCMLNet:
    """Build the MONAI network named in ``cfg.network`` with its DCML projection head.

    The weights are the network's fresh initialisation (torch's global generator); a site's *first*
    model takes ``network.init_from``'s instead (:func:`gcml_app.rounds.loop.initial_state`).

    Args:
        cfg: site config; ``input_channels`` and ``out_channels`` (background + labels) set the I/O.

    Returns:
        a :class:`GCMLNet` mapping ``(B, input_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``.

    Raises:
        InitError: a bundle that cannot be built, an unknown ``feature_layer``, or a ``roi_size`` the
            network does not take.

    Example:
        >>> net = build_network(cfg)
        >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """
    backbone = build_backbone(cfg)
    # the dry run depends only on the architecture and the crop size: once per process (a round builds 3-4 networks)
    key = json.dumps([_arch_desc(cfg), cfg.net_in_channels, cfg.out_channels, list(cfg.roi_size)], sort_keys=True)
    if key not in _PROBED:
        _PROBED[key] = _probe(cfg, backbone)
    layer, channels = _PROBED[key]
    return GCMLNet(backbone, channels, cfg.dcml.embed_dim, layer, len(cfg.guidance_names), cfg.net_in_channels)


_PROBED: dict[str, tuple[str, int]] = {}  # architecture -> (feature layer, its channels), see build_network


def arch_fingerprint(cfg: SiteConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """A stable hash of the network config, I/O channels, and every parameter's name, shape and dtype.

    Two sites whose fingerprints match can exchange weights; any change to a layer shape,
    the label set size or the network options changes it.

    Returns:
        ``"sha256:<hex>"``.
    """
    desc = {
        "network": _arch_desc(cfg),
        "embed_dim": cfg.dcml.embed_dim,
        "in": cfg.input_channels,
        "out": cfg.out_channels,
        "params": [[k, list(v.shape), str(v.dtype)] for k, v in sorted(state_dict.items())],
    }
    if cfg.guidance_names:  # only when interactive: a non-interactive site keeps its fingerprint exactly
        desc["guidance"] = cfg.guidance_names
    blob = json.dumps(desc, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def toggled_interactive(cfg: SiteConfig) -> SiteConfig:
    """``cfg`` with ``interactive.enabled`` flipped: the layout a partner on the other side of a rollout has."""
    return cfg.model_copy(update={"interactive": cfg.interactive.model_copy(update={"enabled": not cfg.interactive.enabled})})


def convert_guidance(state: dict[str, torch.Tensor], cfg: SiteConfig) -> dict[str, torch.Tensor]:
    """A partner's weights of the other guidance layout (:func:`toggled_interactive`) in ours, exactly.

    The network's first layer (a convolution; for MONAI's residual UNet also its residual convolution) is
    linear in its input channels, so a model without guidance channels *is* the interactive model whose
    guidance weights are zero, and an interactive model given zero guidance *is* that model with its guidance
    weights removed. Each weight whose input dimension (dim 1) holds the image channels on one side and
    image plus guidance on the other is padded with zeros or cut to the image channels; every other weight
    must have our shape.

    Args:
        state: weights with the other layout (their fingerprint is ``arch_fingerprint(toggled_interactive(cfg), state)``).
        cfg: our config.

    Returns:
        the weights in our layout; zero-guidance outputs equal theirs to float tolerance.

    Raises:
        ValueError: a weight that differs from ours in another way (another architecture).
    """
    ours = build_network(cfg).state_dict()
    c, g = cfg.input_channels, len(cfg.guidance_names) or len(toggled_interactive(cfg).guidance_names)
    out = {}
    for k, v in state.items():
        want = ours.get(k)
        if want is None:
            raise ValueError(f"guidance conversion: weight {k} is not in our network")
        if tuple(v.shape) == tuple(want.shape):
            out[k] = v
        elif v.dim() >= 2 and v.shape[0] == want.shape[0] and v.shape[2:] == want.shape[2:] \
                and {v.shape[1], want.shape[1]} == {c, c + g}:
            if want.shape[1] > v.shape[1]:
                out[k] = torch.cat([v, v.new_zeros((v.shape[0], g, *v.shape[2:]))], dim=1)
            else:
                out[k] = v[:, :c].clone()
        else:
            raise ValueError(f"guidance conversion: weight {k} has shape {list(v.shape)}; expected {list(want.shape)}")
    return out


def other_layout_arch(cfg: SiteConfig) -> str:
    """The fingerprint of our network with the other guidance layout (a site's own model from before it turned
    ``interactive.enabled`` on or off, or a partner's on the other side of that rollout)."""
    alt = toggled_interactive(cfg)
    return arch_fingerprint(alt, build_network(alt).state_dict())


def fit_state(state: dict[str, torch.Tensor], cfg: SiteConfig) -> dict[str, torch.Tensor]:
    """``state`` in our guidance layout: as it is when every shape fits, else converted exactly
    (:func:`convert_guidance`, which refuses another architecture)."""
    ours = build_network(cfg).state_dict()
    if all(k in ours and tuple(v.shape) == tuple(ours[k].shape) for k, v in state.items()):
        return state
    return convert_guidance(state, cfg)


def _arch_desc(cfg: SiteConfig) -> dict:
    """The network config that fixes the architecture (``init_from`` is where weights start, not what they fit);
    for a bundle, its checked network definition instead of its path."""
    net = cfg.network
    if isinstance(net, BundleNetConfig):
        desc = {k: v for k, v in net.arch_desc().items() if k != "net_key"}
        return {**desc, "network_def": network_def(cfg)}
    return net.arch_desc()
