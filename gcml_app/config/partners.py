"""The sections of whom a site talks to and how: partners and gossip, peer tokens and security, TLS, serving."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gcml_app.config.base import SiteName, _Strict

__all__ = ["GossipConfig", "PeerConfig", "PeerTokenConfig", "SecurityConfig", "ServeConfig", "TLSConfig"]


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
    accept: tuple[Literal["spacing", "intensity", "roi_size"], ...] = Field(
        (), description="task differences a partner may have (docs/design.md, \"The task\"): its images "
        "never move, only its weights, so another spacing or intensity window can still teach; labels and "
        "input channels must always match")
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
    gpu: int | None = Field(None, ge=0, description="CUDA device index inference runs on; default train.gpu "
                            "(set another to keep annotation fast while a round trains)")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


