"""The whole site YAML: :class:`SiteConfig` and :func:`load_config`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gcml_app.config.base import CONFIG_ENV, ConfigError, IntTriple, SiteName, Triple, _Strict
from gcml_app.config.learning import (
    ActiveConfig,
    DCMLConfig,
    FinetuneConfig,
    IntensityConfig,
    InteractiveConfig,
    NetworkConfig,
    TrainConfig,
    UNetConfig,
    ValidationConfig,
)
from gcml_app.config.partners import GossipConfig, SecurityConfig, ServeConfig

__all__ = ["SiteConfig", "StoreConfig", "load_config"]


class StoreConfig(_Strict):
    """What the site keeps on disk (docs/design.md, "Disk").

    Model versions beyond ``keep_versions`` are pruned after each publish and at start-up, except the
    rollback targets: the served version, its last ``keep_versions`` ancestors and the site's first
    version (what it started from). The PACS cache holds at most ``pacs_cache_max_gb`` of image
    volumes, least recently used evicted first; labels and SEG references are never evicted.
    """

    keep_versions: int = Field(10, ge=1, description="newest model versions kept, besides the rollback targets")
    pacs_cache_max_gb: float = Field(100.0, gt=0.0, description="bound on the cached PACS image volumes")


_OTHER_VALUES = ("refuse", "background")


class SiteConfig(_Strict):
    """Everything one site's GCML app needs; see ``sample_configs/site_a.yaml`` for a documented example."""

    site: SiteName
    labels: dict[str, int]
    other_values: Literal["refuse", "background"] = Field(
        "refuse", description="YAML labels.other_values: a label file's values that are no task label are refused "
        "(refuse) or read as background at training and validation (background; the file is unchanged)")
    input_channels: int = Field(1, ge=1)
    spacing: Triple = (1.0, 1.0, 1.0)
    roi_size: IntTriple = (32, 32, 32)
    intensity: IntensityConfig = IntensityConfig()
    network: NetworkConfig = UNetConfig()
    train: TrainConfig = TrainConfig()
    validation: ValidationConfig = ValidationConfig()
    dcml: DCMLConfig = DCMLConfig()
    gossip: GossipConfig = GossipConfig()
    security: SecurityConfig = SecurityConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    active: ActiveConfig = ActiveConfig()
    interactive: InteractiveConfig = InteractiveConfig()
    serve: ServeConfig = ServeConfig()
    store: StoreConfig = StoreConfig()
    state_dir: Path = Path("gcml_state")

    @model_validator(mode="before")
    @classmethod
    def _label_policy(cls, raw: Any) -> Any:
        """``labels.other_values`` (YAML) is not a label: it becomes :attr:`other_values`."""
        if isinstance(raw, dict) and isinstance(raw.get("labels"), dict) and "other_values" in raw["labels"]:
            labels = dict(raw["labels"])
            policy = labels.pop("other_values")
            if policy not in _OTHER_VALUES:
                raise ValueError(f"labels.other_values: found {policy!r}; expected one of {list(_OTHER_VALUES)}")
            raw = {**raw, "labels": labels, "other_values": policy}
        return raw

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("found no labels; expected at least one 'name: index' with index >= 1")
        bad = {k: i for k, i in v.items() if i < 1 or i > 255}
        if bad:
            raise ValueError(f"found {bad}; expected indices between 1 and 255 (0 is background)")
        if len(set(v.values())) != len(v):
            raise ValueError(f"found {v}; expected each label to have its own index")
        if any(k.lower() == "background" for k in v):
            raise ValueError("found 'background'; expected only foreground labels (background is 0)")
        return dict(sorted(v.items(), key=lambda kv: kv[1]))

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: Triple) -> Triple:
        if any(s <= 0 for s in v):
            raise ValueError(f"found {list(v)}; expected three positive spacings in mm")
        return v

    @model_validator(mode="after")
    def _roi(self) -> SiteConfig:
        k = self.network.downsample
        if any(r < 1 or r % k for r in self.roi_size):
            raise ValueError(
                f"roi_size: found {list(self.roi_size)}; expected positive sizes divisible by {k}, "
                f"the total downsampling of network {self.network.name}"
            )
        return self

    @model_validator(mode="after")
    def _secure(self) -> SiteConfig:
        problems = self.insecure_settings()
        if problems and not self.security.allow_insecure:
            raise ValueError("; ".join(problems) + " (or set security.allow_insecure: true to start anyway)")
        return self

    def insecure_settings(self) -> list[str]:
        """What would expose patient data or partner tokens; each refuses start-up unless allowed."""
        problems = self.security.insecure()
        for i, peer in enumerate(self.gossip.peers):
            host = re.sub(r"^http://\[?([^/\]]*?)\]?(:\d+)?(/.*)?$", r"\1", peer.url)
            if peer.url.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
                problems.append(f"gossip.peers.{i}.url: found {peer.url!r}; tokens and weights would cross the "
                                "network unencrypted; expected https://")
        if self.serve.host in ("0.0.0.0", "::", "") and not self.security.peer_tokens:
            problems.append(f"serve.host: found {self.serve.host!r} (every interface) with no partner tokens; "
                            "expected the annotation network's address")
        return problems

    @property
    def guidance_names(self) -> list[str]:
        """The guidance channels' names in order (``background`` then the labels); empty when not interactive."""
        return ["background", *self.labels] if self.interactive.enabled else []

    @property
    def net_in_channels(self) -> int:
        """Network input channels: the image's plus, when interactive, one guidance channel per output channel."""
        return self.input_channels + len(self.guidance_names)

    @property
    def out_channels(self) -> int:
        """Network output channels: background plus one per label, in index order."""
        return len(self.labels) + 1


def format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        loc = re.sub(r"\.(UNet|SegResNet|bundle)\b", "", loc)
        msg = e["msg"].removeprefix("Value error, ")
        found = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: found unknown key; expected one of the documented keys (see sample_configs/)")
        elif e["type"] == "missing" and isinstance(e["loc"][-1], int):
            parent = loc.rsplit(".", 1)[0]
            lines.append(f"{parent}: found {found!r}; expected {e['loc'][-1] + 1} values")
        elif e["type"] == "missing":
            lines.append(f"{loc}: missing; expected a value")
        elif e["type"] == "union_tag_invalid":
            tags = e["ctx"]["expected_tags"]
            lines.append(f"{loc}.name: found {e['ctx']['tag']!r}; expected one of {tags}")
        elif "found" in msg:
            lines.append(f"{loc or '<root>'}: {msg}")
        else:
            msg = msg.removeprefix("Input should be ").removeprefix("input should be ")
            msg = msg.removeprefix("String should have ").replace("String should match", "a string matching")
            lines.append(f"{loc or '<root>'}: found {found!r}; expected {msg}")
    return lines


def load_config(path: str | os.PathLike | None = None) -> SiteConfig:
    """Load and validate a site YAML.

    Args:
        path: the YAML file; ``None`` reads the path from the ``GCML_CONFIG`` environment variable.

    Returns:
        the validated config; a relative ``state_dir`` is resolved against the YAML's folder.

    Raises:
        ConfigError: the file is missing, is not YAML, or any value is invalid; the message names
            every bad key path with the value found and what was expected.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no site config: pass --conf gcml_config PATH or set {CONFIG_ENV}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"site config {path}: file not found")
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"site config {path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"site config {path}: found {type(raw).__name__}; expected a mapping of keys")
    try:
        cfg = SiteConfig.model_validate(raw)
    except ValidationError as e:
        lines = "\n".join(f"  - {line}" for line in format_errors(e))
        raise ConfigError(f"gcml config error in {path}:\n{lines}") from None
    if not cfg.state_dir.is_absolute():
        cfg = cfg.model_copy(update={"state_dir": (path.parent / cfg.state_dir).resolve()})
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: SiteConfig, base: Path) -> SiteConfig:
    """Certificate, key and ``network.init_from`` paths relative to the YAML's folder, made absolute."""

    def fix(model, *keys):
        upd = {k: (base / getattr(model, k)).resolve() for k in keys
               if getattr(model, k) is not None and not getattr(model, k).is_absolute()}
        return model.model_copy(update=upd)

    gossip = fix(cfg.gossip, "ca_bundle", "client_cert", "client_key")
    serve = cfg.serve
    if serve.tls is not None:
        serve = serve.model_copy(update={"tls": fix(serve.tls, "certfile", "keyfile", "ca_certs")})
    return cfg.model_copy(update={"gossip": gossip, "serve": serve, "network": fix(cfg.network, "init_from")})
