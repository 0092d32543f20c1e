"""Site configuration: one YAML per site, loaded once into a validated :class:`SiteConfig`.

A bad value fails at start-up with its key path, the value found and what was expected::

    gcml config error in site.yaml:
      - network.channels: found [8, 16] with strides [2, 2]; expected len(strides) == len(channels) - 1

Example:
    >>> cfg = load_config("sample_configs/site_a.yaml")
    >>> cfg.labels
    {'organ': 1, 'lesion': 2}
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "CONFIG_ENV",
    "SITE_NAME_PATTERN",
    "ConfigError",
    "DCMLConfig",
    "FinetuneConfig",
    "GossipConfig",
    "IntensityConfig",
    "NetworkConfig",
    "PeerConfig",
    "PeerTokenConfig",
    "SecurityConfig",
    "SegResNetConfig",
    "ServeConfig",
    "SiteConfig",
    "TLSConfig",
    "TrainConfig",
    "UNetConfig",
    "ValidationConfig",
    "check_site_name",
    "load_config",
]

CONFIG_ENV = "GCML_CONFIG"
SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # site, partner and token names (YAML, manifests, CLI)
_NAME = re.compile(SITE_NAME_PATTERN)


def check_site_name(v: str) -> str:
    """``v`` if it is a valid site name.

    Raises:
        ValueError: what was found and what a name may hold.
    """
    if not _NAME.match(v):
        raise ValueError(f"found {v!r}; expected 1-64 characters of letters, digits, '.', '_' or '-'")
    return v


SiteName = Annotated[str, AfterValidator(check_site_name)]
"""A site or partner name: it appears in URLs, file names and logs."""


class ConfigError(ValueError):
    """A site YAML that cannot be used; the message lists every bad key with what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class IntensityConfig(_Strict):
    """How image intensities are normalised before the network.

    ``zscore``: per-channel (x - mean) / std over the volume.
    ``range``: clip to [a_min, a_max] and scale linearly to [b_min, b_max] (CT-style windows).
    """

    mode: Literal["zscore", "range"] = "zscore"
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0

    @model_validator(mode="after")
    def _window(self) -> IntensityConfig:
        if self.mode == "range" and not self.a_min < self.a_max:
            raise ValueError(f"found a_min={self.a_min}, a_max={self.a_max}; expected a_min < a_max")
        return self


class UNetConfig(_Strict):
    """MONAI ``UNet``: ``channels[i]`` features at level i, downsampled by ``strides[i]``."""

    name: Literal["UNet"] = "UNet"
    channels: tuple[Annotated[int, Field(ge=1)], ...] = (16, 32, 64, 128)
    strides: tuple[Annotated[int, Field(ge=1)], ...] = (2, 2, 2)
    num_res_units: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _levels(self) -> UNetConfig:
        if len(self.channels) < 2 or len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"found channels={list(self.channels)} with strides={list(self.strides)}; "
                "expected at least 2 channels and len(strides) == len(channels) - 1"
            )
        return self

    @property
    def downsample(self) -> int:
        """Total downsampling factor; ROI sizes must be divisible by it."""
        f = 1
        for s in self.strides:
            f *= s
        return f


class SegResNetConfig(_Strict):
    """MONAI ``SegResNet``: ``init_filters`` doubled at each of ``len(blocks_down)`` levels."""

    name: Literal["SegResNet"]
    init_filters: int = Field(8, ge=1)
    blocks_down: tuple[Annotated[int, Field(ge=1)], ...] = (1, 2, 2, 4)
    blocks_up: tuple[Annotated[int, Field(ge=1)], ...] = (1, 1, 1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _levels(self) -> SegResNetConfig:
        if self.init_filters % 8:
            raise ValueError(
                f"found init_filters={self.init_filters}; expected a multiple of 8 (SegResNet's group norm uses 8 groups)"
            )
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(
                f"found blocks_down={list(self.blocks_down)} with blocks_up={list(self.blocks_up)}; "
                "expected len(blocks_up) == len(blocks_down) - 1"
            )
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.blocks_down) - 1)


NetworkConfig = Annotated[Union[UNetConfig, SegResNetConfig], Field(discriminator="name")]


class TrainConfig(_Strict):
    """How the site trains: its working model's supervised passes, and the settings every round shares
    (batches, crops, optimizer, seed, device, threads, priority, warm start)."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(2, ge=1)
    samples_per_case: int = Field(2, ge=1, description="random ROI crops drawn from each case per epoch")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0, description="torch CPU threads in the training process; 0 = torch default")
    nice: int = Field(10, ge=0, le=19, description="CPU niceness of the training process, so inference stays fast")
    warm: bool = Field(True, description="keep a warm trainer process (imports done) that rounds fork from, instead "
                       "of a fresh interpreter per round (gcml_app.site.warm); costs its resident memory")


class ValidationConfig(_Strict):
    """The site's held-out labels that gate every publish (docs/design.md, "The gate").

    A case is assigned to validation once, when it is first seen, and never moves.
    ``min_cases`` validation cases are filled first; after that a case joins validation
    when the split would otherwise fall below ``fraction``.

    The gate compares each candidate with the served model case by case (paired Dice deltas): a
    candidate publishes only if its mean paired gain exceeds ``margin`` (``decision: margin``), or
    if in addition a one-sided sign test over the cases gives ``p <= alpha``
    (``decision: sign_test``), and no label's mean Dice drops by more than ``max_label_drop``.
    A sign test over n cases can reach ``p = 2^-n`` at best, so fewer than
    ``ceil(log2(1 / alpha))`` validation cases cannot support a strict decision; ``/gcml/status``
    says so and how many more labels would.
    """

    fraction: float = Field(0.2, gt=0.0, lt=1.0)
    min_cases: int = Field(1, ge=1)
    sw_batch_size: int = Field(1, ge=1)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    decision: Literal["margin", "sign_test"] = "margin"
    margin: float = Field(0.005, ge=0.0, lt=1.0, description="mean paired Dice gain a candidate must exceed")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="sign test level (decision: sign_test)")
    max_label_drop: float = Field(0.02, ge=0.0, le=1.0, description="largest mean Dice drop allowed on any label")
    gate: bool = Field(True, description="false serves every round's new working model unchecked (ablations only)")

    @property
    def strict_cases(self) -> int:
        """Validation cases a one-sided sign test needs to reach ``alpha``: ``ceil(log2(1/alpha))``."""
        import math

        return max(1, math.ceil(math.log2(1.0 / self.alpha) - 1e-9))


class DCMLConfig(_Strict):
    """Deep contrastive mutual learning (docs/design.md, "DCML"); every weight is configurable.

    ``loss_L = DiceCE(L) + w(t) lambda_kl T^2 KL_trust(I || L) + lambda_con InfoNCE(L <- I)``, symmetric for I.

    - ``lambda_kl * T^2`` is the weight of the distillation term relative to the supervised loss;
      the default 0.25 * 2^2 = 1 makes a voxel's KL weigh as much as its cross-entropy.
    - ``w(t)`` ramps from 0 to 1 over the first ``kl_rampup`` of a round's steps (a sigmoid ramp,
      ``exp(-5 (1 - t)^2)``), so a partner's model does not pull ours before both have adapted.
    - ``kl_mask: agree`` distils only at voxels where the teacher's prediction equals the label
      (``none``: every voxel); the mean is over all voxels, so a teacher that is wrong on our data
      pulls proportionally less.
    - Foreground voxels (labels > 0, dilated by ``dilation``) weigh ``min(n_bg / n_fg, fg_weight_max)``
      times a background voxel: balanced, but bounded.
    """

    lambda_kl: float = Field(0.25, ge=0.0)
    lambda_con: float = Field(0.1, ge=0.0)
    temperature: float = Field(2.0, gt=0.0, description="T of the mutual KL")
    kl_rampup: float = Field(0.3, ge=0.0, le=1.0, description="fraction of a round's steps over which the KL ramps up")
    kl_mask: Literal["agree", "none"] = Field("agree", description="distil where the teacher agrees with the label")
    fg_weight_max: float = Field(3.0, ge=1.0, description="bound on the foreground up-weighting of the KL")
    tau: float = Field(0.1, gt=0.0, description="InfoNCE temperature")
    samples_per_class: int = Field(
        128, ge=1, description="anchor voxels sampled per class per volume (128: the setting gcml simulate validates)")
    dilation: int = Field(2, ge=0, description="voxels the foreground region is dilated by for the KL balance")
    embed_dim: int = Field(32, ge=2, description="projection head output size")


def _exactly_one(what: str, **options: str | None) -> None:
    """Raise unless exactly one of two alternative keys (e.g. ``token`` / ``token_env``) is set."""
    (a, va), (b, vb) = options.items()
    if (va is None) == (vb is None):
        raise ValueError(f"{what}: found {'both' if va else 'neither'} of {a} and {b}; expected exactly one")


class PeerConfig(_Strict):
    """A partner site we pull models from.

    The bearer token we present to it comes from ``token_env`` (an environment variable of the
    server process; recommended) or ``token`` (plain text in this file; demos only).
    """

    name: SiteName
    url: str
    token: str | None = Field(None, min_length=16)
    token_env: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", v):
            raise ValueError(f"found {v!r}; expected an http(s)://host:port URL of the partner's MONAI Label server")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_token(self) -> PeerConfig:
        _exactly_one(f"peer {self.name!r}", token=self.token, token_env=self.token_env)
        return self

    def bearer(self) -> str:
        """The token to present; raises ``KeyError`` naming the variable when ``token_env`` is unset."""
        if self.token is not None:
            return self.token
        value = os.environ.get(self.token_env or "")
        if not value:
            raise KeyError(f"environment variable {self.token_env} (the token for peer {self.name}) is not set")
        return value


class GossipConfig(_Strict):
    """Peer-to-peer rounds: which partners, how often, how a peer is chosen, what a payload may be."""

    peers: tuple[PeerConfig, ...] = ()
    policy: Literal["uniform", "performance"] = Field(
        "performance", description="partner choice: by the validation gain each partner brought, or uniform")
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="performance policy: chance of a uniform pick")
    ema: float = Field(0.3, gt=0.0, le=1.0, description="performance policy: weight of the newest Dice gain")
    interval_s: float = Field(3600.0, ge=0.0, description="scheduler period; 0 turns the scheduler off")
    jitter: float = Field(0.1, ge=0.0, lt=1.0, description="each wait is interval_s * (1 +- jitter)")
    epochs: int = Field(5, ge=1, description="DCML epochs per gossip round")
    warmup_epochs: int = Field(20, ge=1, description="local epochs before a site's first gossip round")
    adopt_when_unlabelled: bool = True
    adopt_from: tuple[SiteName, ...] = Field(
        (), description="partners whose validated model a site with too few labels may serve unvalidated")
    transport: Literal["float32", "float16"] = Field("float32", description="dtype of the weights we serve to partners")
    max_model_bytes: int = Field(256 * 2**20, ge=1024)
    connect_timeout_s: float = Field(5.0, gt=0.0)
    read_timeout_s: float = Field(60.0, gt=0.0)
    pull_deadline_s: float = Field(600.0, gt=0.0, description="wall-clock limit of one pull (manifest + model)")
    min_rate_bytes_s: float = Field(
        10_000.0, ge=0.0, description="a model transfer slower than this (after 5 s) is abandoned")
    max_abs_weight: float = Field(1e4, gt=0.0, description="a partner weight of larger magnitude is refused")
    retries: int = Field(2, ge=0, le=10)
    backoff_factor: float = Field(0.5, ge=0.0)
    peer_backoff_s: float = Field(60.0, ge=0.0, description="first wait after a peer fails; doubles per failure")
    peer_backoff_max_s: float = Field(3600.0, ge=0.0)
    ca_bundle: Path | None = Field(None, description="CA file to verify partners' TLS certificates")
    client_cert: Path | None = Field(None, description="our certificate for partners that require mutual TLS")
    client_key: Path | None = None

    @model_validator(mode="after")
    def _unique(self) -> GossipConfig:
        names = [p.name for p in self.peers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"found peers named {dup} more than once; expected unique peer names")
        unknown = [n for n in self.adopt_from if n not in names]
        if unknown:
            raise ValueError(f"adopt_from: found {unknown}; expected names of configured peers {names}")
        return self


class PeerTokenConfig(_Strict):
    """A token a partner presents to us: its sha256 (hex) or an environment variable holding the token.

    ``id`` names the token (it appears in the audit log); ``peer`` is the partner it belongs to
    (default: the id). Several tokens of one partner may be valid at once, for rotation: add the new
    one, let the partner switch, remove the old one. The server re-reads ``security`` when the YAML
    changes, so adding or revoking a token needs no restart (``gcml token new`` makes one).
    """

    id: SiteName
    peer: SiteName | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    env: str | None = None

    @property
    def partner(self) -> str:
        return self.peer or self.id

    @model_validator(mode="after")
    def _one(self) -> PeerTokenConfig:
        _exactly_one(f"token {self.id!r}", sha256=self.sha256, env=self.env)
        return self


class SecurityConfig(_Strict):
    """Who may reach what (docs/design.md, "Security").

    Clients inside ``annotation_networks`` reach everything MONAI Label serves; everyone else reaches
    only ``/gcml/peer/*``, and only with one of ``peer_tokens``.
    """

    annotation_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    peer_tokens: tuple[PeerTokenConfig, ...] = ()
    max_failed_auth: int = Field(10, ge=1, description="failed partner-token attempts per client address ...")
    failed_auth_window_s: float = Field(300.0, gt=0.0, description="... within this window, then 429")
    trusted_proxies: tuple[str, ...] = Field(
        (), description="CIDRs of reverse proxies whose Forwarded / X-Forwarded-For / X-Real-IP are believed; "
                        "from anyone else such headers are refused")
    cors_origins: tuple[str, ...] = Field(
        (), description="browser origins (scheme://host[:port]) allowed cross-origin; Slicer needs none")
    allowed_hosts: tuple[str, ...] | None = Field(
        None, description="Host names the server answers to (DNS rebinding); default the machine's names, "
                          "localhost, serve.host and any IP address")
    max_tracked_clients: int = Field(10_000, ge=16, description="bound of every per-client table of the guard")
    audit_max_bytes: int = Field(16 * 2**20, ge=4096, description="audit.jsonl is rotated to audit.jsonl.1 here")
    max_upload_bytes: int = Field(64 * 2**20, ge=1024, description="largest label upload accepted")
    allow_insecure: bool = Field(False, description="start even with the insecure settings listed in the docs")

    @field_validator("annotation_networks", "trusted_proxies")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"found {net!r}; expected a CIDR such as 10.1.0.0/16") from None
        return v

    def insecure(self) -> list[str]:
        """Settings that would expose the site: an annotation network that covers every address."""
        wide = [n for n in self.annotation_networks if ipaddress.ip_network(n, strict=False).prefixlen == 0]
        return [f"security.annotation_networks: found {wide}; everyone could download images, labels and the "
                "dataset zip; expected the annotation network's own CIDRs"] if wide else []


class FinetuneConfig(_Strict):
    """Rounds triggered by new labels from Slicer."""

    min_new_labels: int = Field(5, ge=0, description="new final labels that enqueue a round; 0 = never")
    epochs: int | None = Field(None, ge=1, description="epochs of that round; default train.epochs")


class TLSConfig(_Strict):
    """HTTPS for this site's server (``gcml certs`` makes a trial CA and site certificates).

    ``client_certs: required`` is mutual TLS: every client (partners, and Slicer on the same port)
    must present a certificate signed by ``ca_certs``; ``optional`` checks one when presented.
    """

    certfile: Path
    keyfile: Path
    ca_certs: Path
    client_certs: Literal["none", "optional", "required"] = "required"


class ServeConfig(_Strict):
    """Where this site's MONAI Label server listens (``gcml serve`` and ``gcml sync`` use it)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    tls: TLSConfig | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


class SiteConfig(_Strict):
    """Everything one site's GCML app needs; see ``sample_configs/site_a.yaml`` for a documented example."""

    site: SiteName
    labels: dict[str, int]
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
    serve: ServeConfig = ServeConfig()
    state_dir: Path = Path("gcml_state")

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
    def out_channels(self) -> int:
        """Network output channels: background plus one per label, in index order."""
        return len(self.labels) + 1


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        loc = re.sub(r"\.(UNet|SegResNet)\b", "", loc)
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
        lines = "\n".join(f"  - {line}" for line in _format_errors(e))
        raise ConfigError(f"gcml config error in {path}:\n{lines}") from None
    if not cfg.state_dir.is_absolute():
        cfg = cfg.model_copy(update={"state_dir": (path.parent / cfg.state_dir).resolve()})
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: SiteConfig, base: Path) -> SiteConfig:
    """Certificate and key paths relative to the YAML's folder, made absolute."""

    def fix(model, *keys):
        upd = {k: (base / getattr(model, k)).resolve() for k in keys
               if getattr(model, k) is not None and not getattr(model, k).is_absolute()}
        return model.model_copy(update=upd)

    gossip = fix(cfg.gossip, "ca_bundle", "client_cert", "client_key")
    serve = cfg.serve
    if serve.tls is not None:
        serve = serve.model_copy(update={"tls": fix(serve.tls, "certfile", "keyfile", "ca_certs")})
    return cfg.model_copy(update={"gossip": gossip, "serve": serve})
