"""Where a site's first model starts: a MONAI bundle or a checkpoint file (``network.init_from``).

A MONAI bundle (the Model Zoo's layout, what MONAI Label's ``monaibundle`` app serves)::

    BUNDLE/configs/metadata.json          name, version, ...
    BUNDLE/configs/inference.json         (or .yaml, or train.*) holds "network_def": {"_target_": "UNet", ...}
    BUNDLE/models/model.pt                the network's state dict (or model.safetensors)

Nothing in it is trusted to run code:

- weights are read with ``torch.load(weights_only=True)`` (tensors and plain containers only; any other
  pickled object is refused) or safetensors;
- the network is built with ``monai.bundle.ConfigParser`` from the bundle's own ``network_def``, after
  checking that its ``_target_`` is a class of ``monai.networks.nets`` and that neither it nor anything
  it references holds a ``$`` expression (ConfigParser would ``eval`` those) or another ``_target_``.

The backbone takes the weights; every missing, unexpected or mis-shaped key is named, and a partial load
needs ``network.strict: false`` (:func:`load_backbone`).

Example:
    >>> bundle = read_bundle("spleen_ct_segmentation")           # doctest: +SKIP
    >>> net, net_def = bundle.network("network_def", in_channels=1, out_channels=2)
    >>> report = load_backbone(net, read_weights(bundle.weights), strict=True, source=bundle.name)
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file

from gcml_app.errors import InitError
from gcml_app.util.files import sha256_file

__all__ = ["Bundle", "InitError", "LoadReport", "is_bundle", "load_backbone", "read_bundle", "read_weights", "start_of",
           "write_bundle"]

logger = logging.getLogger(__name__)

_CONFIG_NAMES = ("inference", "train")
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_WEIGHT_NAMES = ("model.safetensors", "model.pt", "model.pth")
_WRAPPERS = ("model", "state_dict", "network", "net")  # checkpoints that hold the state dict under one key
_SHOWN = 8  # names listed per kind of mismatch


def is_bundle(path: Path) -> bool:
    return Path(path).is_dir()


@dataclass(frozen=True)
class Bundle:
    """A MONAI bundle folder: its config file, weights file and metadata."""

    root: Path
    config_file: Path
    weights: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.root.name)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    def network_def(self, key: str, in_channels: int, out_channels: int) -> dict[str, Any]:
        """The bundle's network definition with references resolved and the site's I/O channels set.

        Raises:
            InitError: no such key, a ``$`` expression, a nested ``_target_``, or a class outside
                ``monai.networks.nets``.
        """
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        try:
            parser.read_config(str(self.config_file))
            raw = parser.get(key)
        except Exception as e:  # a broken JSON/YAML file: name it
            raise InitError(f"network.init_from: {self.config_file}: unreadable bundle config ({e})") from None
        if not isinstance(raw, dict):
            raise InitError(f"network.init_from: {self.config_file} has no {key!r} mapping (network.net_key); "
                            f"expected e.g. {{\"_target_\": \"UNet\", ...}}")
        net_def = {k: _literal(parser, v, f"{key}.{k}", self.config_file) for k, v in raw.items() if k != "_target_"}
        target = str(raw.get("_target_", ""))
        cls = _network_class(target, self.config_file)
        for k, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if k in net_def:
                net_def[k] = v
        return {"_target_": cls.__name__, **net_def}

    def network(self, key: str, in_channels: int, out_channels: int) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Build the bundle's network (``monai.bundle.ConfigParser``) with the site's I/O channels.

        Returns:
            the network and the checked definition it was built from (part of the architecture fingerprint).
        """
        from monai.bundle import ConfigParser

        net_def = self.network_def(key, in_channels, out_channels)
        try:
            full = {**copy.deepcopy(net_def), "_target_": f"monai.networks.nets.{net_def['_target_']}"}  # no lookup by name
            net = ConfigParser({"network_def": full}).get_parsed_content("network_def")
        except Exception as e:
            raise InitError(f"network.init_from: {self.config_file}: {key} does not build ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return net, net_def


def read_bundle(path: str | Path) -> Bundle:
    """The bundle at ``path``.

    Raises:
        InitError: not a folder, or no config with a network or no weights where MONAI puts them.
    """
    root = Path(path)
    if not root.is_dir():
        raise InitError(f"network.init_from: {root}: not a bundle folder")
    configs = [root / "configs" / f"{n}{s}" for n in _CONFIG_NAMES for s in _CONFIG_SUFFIXES]
    config = next((c for c in configs if c.is_file()), None)
    if config is None:
        raise InitError(f"network.init_from: {root} is not a MONAI bundle: expected configs/inference.json "
                        "(or .yaml, or train.json)")
    weights = next((root / "models" / n for n in _WEIGHT_NAMES if (root / "models" / n).is_file()), None)
    if weights is None:
        raise InitError(f"network.init_from: {root} has no weights: expected models/model.pt or "
                        "models/model.safetensors (TorchScript model.ts is not read)")
    meta: dict[str, Any] = {}
    meta_file = root / "configs" / "metadata.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise InitError(f"network.init_from: {meta_file}: not valid JSON ({e})") from None
    return Bundle(root, config, weights, meta if isinstance(meta, dict) else {})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint: safetensors, or ``torch.load(weights_only=True)``.

    A checkpoint holding its state dict under one of ``model``/``state_dict``/``network``/``net`` is
    unwrapped, and a ``module.`` prefix (``DataParallel``) is removed.

    Raises:
        InitError: unreadable, not tensors only (a pickled object is never loaded), or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise InitError(f"network.init_from: {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            state: Any = st_load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, SafetensorError, OSError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitError(f"network.init_from: {path}: not a tensors-only checkpoint ({first[:200]}); pickled "
                        "objects are never loaded: save the state dict (torch.save(net.state_dict())) or use "
                        "safetensors") from None
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in _WRAPPERS:
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise InitError(f"network.init_from: {path}: found {type(state).__name__}; expected a state dict")
    for wrapper in _WRAPPERS:  # a training checkpoint: {"model": ..., "optimizer": ..., "epoch": ...}
        if not _tensors(state) and isinstance(state.get(wrapper), dict) and _tensors(state[wrapper]):
            state = state[wrapper]
            break
    if not state or not _tensors(state):
        raise InitError(f"network.init_from: {path}: found no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_backbone` did: keys loaded, and every key it could not use, by name."""

    source: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "name: theirs [..] vs ours [..]"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        parts = []
        for what, names in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("mis-shaped", self.mismatched)):
            if names:
                more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
                parts.append(f"{len(names)} {what}: {', '.join(names[:_SHOWN])}{more}")
        return "; ".join(parts)

    def as_record(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "missing": self.missing[:_SHOWN * 4], "unexpected": self.unexpected[:_SHOWN * 4],
                "mismatched": self.mismatched[:_SHOWN * 4]}


def load_backbone(backbone: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool, source: str,
                  guidance: int = 0) -> LoadReport:
    """Load ``state`` into ``backbone``: all of it (``strict``), or the keys whose names and shapes match.

    A state dict of a whole :class:`~gcml_app.ml.network.GCMLNet` (``backbone.*``, ``head.*``) gives its
    backbone; its projection head is not used (the head starts fresh, as from a bundle). With ``guidance``
    click channels (``interactive.enabled``), a bundle trained without them fits exactly: each weight whose
    input dimension lacks exactly those channels gets them as zeros (zero guidance is the bundle's model).

    Raises:
        InitError: ``strict`` and any key missing, unexpected or mis-shaped (each named), or nothing matches.
    """
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    ours = backbone.state_dict()
    if guidance:
        state = {k: torch.cat([v, v.new_zeros((v.shape[0], guidance, *v.shape[2:]))], 1)
                 if k in ours and v.dim() >= 2 and v.shape[1] + guidance == ours[k].shape[1]
                 and v.shape[0] == ours[k].shape[0] and v.shape[2:] == ours[k].shape[2:] else v
                 for k, v in state.items()}
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    mismatched = [f"{k}: theirs {list(state[k].shape)} vs ours {list(v.shape)}" for k, v in ours.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    usable = {k: v for k, v in state.items() if k in ours and tuple(v.shape) == tuple(ours[k].shape)}
    report = LoadReport(source, len(usable), missing, unexpected, mismatched)
    if not usable:
        raise InitError(f"network.init_from: {source}: no weight matches this network ({report.problems()}); "
                        "check network (or use name: bundle to build the bundle's own network)")
    if strict and not report.complete:
        raise InitError(f"network.init_from: {source} does not fit this network: {report.problems()}; set "
                        "network.strict: false to load the matching weights and start the rest fresh")
    bad = [k for k, v in usable.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InitError(f"network.init_from: {source}: non-finite values in {bad[:3]}")
    backbone.load_state_dict({**ours, **{k: v.to(ours[k].dtype) for k, v in usable.items()}})
    if not report.complete:
        logger.warning(f"network.init_from: {source}: loaded {report.loaded} of {len(ours)} weights; "
                       f"{report.problems()} (strict: false)")
    return report


def start_of(init_from: Path) -> dict[str, Any]:
    """Where the weights came from, for the first model's lineage: the bundle's name and version, or the
    checkpoint file, and the weights' sha256."""
    path = Path(init_from)
    if is_bundle(path):
        b = read_bundle(path)
        return {"mode": "init", "bundle": b.name, "bundle_version": b.version, "path": str(path),
                "sha256": sha256_file(b.weights)}
    return {"mode": "init", "checkpoint": path.name, "path": str(path), "sha256": sha256_file(path)}


def _network_class(target: str, where: Path) -> type:
    """The ``monai.networks.nets`` class a bundle's ``_target_`` names (``UNet`` or ``monai.networks.nets.UNet``)."""
    from monai.networks import nets

    name = target.removeprefix("monai.networks.nets.")
    cls = getattr(nets, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise InitError(f"network.init_from: {where}: network _target_ {target!r} refused; expected a network "
                        "class of monai.networks.nets (e.g. UNet, SegResNet, SwinUNETR)")
    return cls


def _literal(parser, value: Any, where: str, config_file: Path, depth: int = 0) -> Any:
    """``value`` with ``@id`` references replaced by the referenced (checked) values: numbers, strings,
    lists and mappings only; a ``$`` expression or a ``_target_`` anywhere is refused."""
    if depth > 16:
        raise InitError(f"network.init_from: {config_file}: {where}: references nest too deep")
    if isinstance(value, str):
        if value.startswith(("$", "%")):
            raise InitError(f"network.init_from: {config_file}: {where} is an expression or macro ({value[:60]!r}); "
                            "expected plain values (a bundle's expressions are never evaluated)")
        if value.startswith("@"):
            ref = value[1:].replace("#", "::")
            try:
                target = parser.get(ref)
            except Exception:
                target = None
            if target is None:
                raise InitError(f"network.init_from: {config_file}: {where} references {value!r}, which is not in the config")
            return _literal(parser, target, f"{where} ({value})", config_file, depth + 1)
        return value
    if isinstance(value, list):
        return [_literal(parser, v, f"{where}[{i}]", config_file, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if "_target_" in value:
            raise InitError(f"network.init_from: {config_file}: {where} builds an object ({value['_target_']!r}); "
                            "expected plain values")
        return {k: _literal(parser, v, f"{where}.{k}", config_file, depth + 1) for k, v in value.items()}
    return value


def write_bundle(folder: str | Path, network_def: dict[str, Any], state: dict[str, torch.Tensor], name: str,
                 version: str, channel_def: dict[int, str] | None = None) -> Path:
    """Write a network and its weights in MONAI's bundle layout (what :func:`read_bundle` reads; the
    simulator's "pretrained" start and the tests use it).

    Args:
        network_def: ``{"_target_": "UNet", "spatial_dims": 3, ...}`` (``configs/inference.json``'s ``network_def``).
        state: the network's state dict (``models/model.pt``, saved with ``torch.save``: tensors only).
        channel_def: output channel -> name, for ``metadata.json``'s ``network_data_format``.

    Returns:
        the bundle folder.
    """
    root = Path(folder)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    meta = {"name": name, "version": version, "monai_version": __import__("monai").__version__,
            "network_data_format": {"outputs": {"pred": {"type": "image", "num_channels": len(channel_def or {}),
                                                         "channel_def": {str(k): v for k, v in (channel_def or {}).items()}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}, indent=2))
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, root / "models" / "model.pt")
    return root
