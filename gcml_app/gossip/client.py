"""HTTP client for a partner's peer surface: its manifest, then its weights, checked before use.

Every partner is untrusted. A pull enforces, in order:

1. connect and read timeouts, and retries with exponential backoff on idempotent GETs only;
2. TLS verification (system CAs or ``gossip.ca_bundle``);
3. a manifest that parses, names a sha256 and size, and our architecture;
4. a size cap enforced while streaming (never more than ``max_model_bytes`` read);
5. the body's sha256 equal to the manifest's;
6. a tensor-only parse, our architecture fingerprint, and finite values (:mod:`.payload`).

Failures raise :class:`~gcml_app.errors.PeerUnavailable` (the partner did not answer usefully) or
:class:`~gcml_app.errors.PayloadRejected` (it answered with something we refuse), each with the
peer's name and the reason.

Example:
    >>> client = PeerClient(cfg.gossip.peers[0], cfg.gossip)
    >>> man = client.manifest()
    >>> pulled = client.fetch(man, cfg, ours=our_arch(cfg))
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import requests
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

import gcml_app
from gcml_app.config import GossipConfig, PeerConfig, SiteConfig
from gcml_app.errors import NothingToShare, PayloadRejected, PeerUnavailable
from gcml_app.gossip.payload import verify_weights

__all__ = ["PeerClient", "PeerManifest", "Pulled", "check_payload"]

logger = logging.getLogger(__name__)

MANIFEST_PATH = "/gcml/peer/manifest"
MODEL_PATH = "/gcml/peer/model"
_MANIFEST_MAX_BYTES = 1 << 20


class PeerManifest(BaseModel):
    """What a partner says it serves (``GET /gcml/peer/manifest``); checked before any weights move."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    site: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)
    arch: str = Field(max_length=80)
    transport: str = Field("float32", max_length=16)
    created: str = Field("", max_length=40)
    val_dice: dict[str, float] = {}
    n_train: int = 0
    n_val: int = 0
    validated: bool = True
    lineage: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Pulled:
    """A verified payload: its bytes, tensors and transfer figures."""

    manifest: PeerManifest
    data: bytes
    state: dict[str, torch.Tensor]
    bytes_received: int
    fetch_s: float
    verify_s: float


def _session(gossip: GossipConfig) -> requests.Session:
    retry = Retry(
        total=gossip.retries,
        connect=gossip.retries,
        read=gossip.retries,
        status=gossip.retries,
        backoff_factor=gossip.backoff_factor,
        status_forcelist=(429, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = str(gossip.ca_bundle) if gossip.ca_bundle else True
    if gossip.client_cert:  # mutual TLS: partners that require a client certificate get ours
        session.cert = (str(gossip.client_cert), str(gossip.client_key)) if gossip.client_key else str(gossip.client_cert)
    session.headers["User-Agent"] = f"gcml-app/{gcml_app.__version__}"
    return session


class PeerClient:
    """Talks to one partner's ``/gcml/peer/*`` surface.

    Args:
        peer: the partner (URL and how to find our token for it).
        gossip: timeouts, retries, size cap and CA bundle.
    """

    def __init__(self, peer: PeerConfig, gossip: GossipConfig):
        self.peer = peer
        self.gossip = gossip
        self.session = _session(gossip)
        self.timeout = (gossip.connect_timeout_s, gossip.read_timeout_s)
        # Passed with every request: requests lets REQUESTS_CA_BUNDLE override a session's CA.
        self.verify = self.session.verify

    def close(self) -> None:
        self.session.close()

    def _get(self, path: str, headers: dict[str, str] | None = None) -> requests.Response:
        name = self.peer.name
        try:
            token = self.peer.bearer()
        except KeyError as e:
            raise PeerUnavailable(name, f"no token: {e.args[0]}") from None
        try:
            r = self.session.get(self.peer.url + path, timeout=self.timeout, stream=True, allow_redirects=False,
                                 verify=self.verify, headers={"Authorization": f"Bearer {token}", **(headers or {})})
        except requests.exceptions.SSLError as e:
            raise PeerUnavailable(name, f"TLS verification failed for {self.peer.url}: {e}") from None
        except requests.exceptions.ConnectTimeout:
            raise PeerUnavailable(name, f"connect timeout after {self.timeout[0]:g} s to {self.peer.url}") from None
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as e:
            text = str(e)
            if "Read timed out" in text or isinstance(e, requests.exceptions.ReadTimeout):
                raise PeerUnavailable(name, f"read timeout after {self.timeout[1]:g} s from {self.peer.url}") from None
            raise PeerUnavailable(name, f"unreachable at {self.peer.url} ({_short(text)})") from None
        except requests.RequestException as e:
            raise PeerUnavailable(name, f"request to {self.peer.url} failed ({_short(str(e))})") from None
        if r.status_code in (401, 403):
            detail = _detail(r)
            r.close()
            raise PeerUnavailable(name, f"refused our token: HTTP {r.status_code} {detail}")
        return r

    def manifest(self) -> PeerManifest:
        """``GET /gcml/peer/manifest``, parsed and validated.

        Raises:
            NothingToShare: it answered 404: no model published yet.
            PeerUnavailable: down, timed out, or token refused.
            PayloadRejected: the answer is not a valid manifest.
        """
        r = self._get(MANIFEST_PATH)
        with r:
            if r.status_code == 404:
                raise NothingToShare(self.peer.name, f"no published model yet ({_detail(r) or 'HTTP 404'})")
            if r.status_code != 200:
                raise PeerUnavailable(self.peer.name, f"manifest: HTTP {r.status_code} {_detail(r)}")
            body = _read_capped(r, _MANIFEST_MAX_BYTES, self.peer.name, "manifest", self.timeout[1])
        try:
            return PeerManifest.model_validate(json.loads(body))
        except (ValueError, ValidationError) as e:
            raise PayloadRejected(self.peer.name, f"manifest is not valid: {_short(str(e), 300)}") from None

    def fetch(self, manifest: PeerManifest, cfg: SiteConfig, ours: str, etag: str | None = None) -> Pulled | None:
        """``GET /gcml/peer/model`` and verify it against ``manifest`` and our architecture.

        Args:
            manifest: the partner's manifest from :meth:`manifest`.
            cfg: our site config.
            ours: our architecture fingerprint.
            etag: the sha256 we already hold from this partner; sent as ``If-None-Match``.

        Returns:
            the verified payload, or ``None`` when the partner answered 304 (we already hold it).

        Raises:
            PeerUnavailable: down, timed out or an HTTP error.
            PayloadRejected: wrong architecture, over the size cap, truncated, sha256 mismatch,
                not a tensor-only safetensors file, or non-finite values.
        """
        name = self.peer.name
        cap = self.gossip.max_model_bytes
        if manifest.arch != ours:
            raise PayloadRejected(name, f"manifest architecture {manifest.arch[:19]}... differs from ours {ours[:19]}...")
        if manifest.bytes > cap:
            raise PayloadRejected(name, f"model of {manifest.bytes} bytes is over the size cap of {cap} bytes")
        t0 = time.perf_counter()
        r = self._get(MODEL_PATH, {"If-None-Match": f'"{etag}"'} if etag else None)
        with r:
            if r.status_code == 304:
                return None
            if r.status_code != 200:
                raise PeerUnavailable(name, f"model: HTTP {r.status_code} {_detail(r)}")
            # Never read more than the manifest announced (and never more than the cap).
            data = _read_capped(r, min(cap, manifest.bytes), name, "model", self.timeout[1])
        return check_payload(name, manifest, data, cfg, ours, time.perf_counter() - t0)


def check_payload(peer: str, manifest: PeerManifest, data: bytes, cfg: SiteConfig, ours: str,
                  fetch_s: float = 0.0) -> Pulled:
    """The checks on a received body, whatever carried it: full size, sha256, tensors only, our architecture, finite.

    Raises:
        PayloadRejected: the reason, naming ``peer``.
    """
    if manifest.arch != ours:
        raise PayloadRejected(peer, f"manifest architecture {manifest.arch[:19]}... differs from ours {ours[:19]}...")
    if len(data) > cfg.gossip.max_model_bytes:
        raise PayloadRejected(peer, f"model of {len(data)} bytes is over the size cap of {cfg.gossip.max_model_bytes} bytes")
    if len(data) < manifest.bytes:
        raise PayloadRejected(peer, f"truncated model body: {len(data)} of {manifest.bytes} bytes")
    t0 = time.perf_counter()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise PayloadRejected(peer, f"sha256 mismatch: body {digest[:12]}... vs manifest {manifest.sha256[:12]}...")
    try:
        state = verify_weights(data, cfg, ours)
    except ValueError as e:
        raise PayloadRejected(peer, str(e)) from None
    return Pulled(manifest, data, state, len(data), fetch_s, time.perf_counter() - t0)


def _read_capped(r: requests.Response, cap: int, peer: str, what: str, read_timeout: float) -> bytes:
    """Read a streamed body, refusing it as soon as it passes ``cap`` bytes."""
    declared = r.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise PayloadRejected(peer, f"{what} of {declared} bytes (Content-Length) is over the limit of {cap} bytes")
    chunks, n = [], 0
    try:
        for chunk in r.iter_content(chunk_size=1 << 16):
            n += len(chunk)
            if n > cap:
                raise PayloadRejected(peer, f"{what} body passed the limit of {cap} bytes; download aborted")
            chunks.append(chunk)
    except requests.exceptions.ConnectionError as e:
        text = str(e)
        if "timed out" in text.lower():
            raise PeerUnavailable(peer, f"read timeout after {read_timeout:g} s during the {what} body") from None
        raise PayloadRejected(peer, f"truncated {what} body: the connection broke ({_short(text)})") from None
    except requests.exceptions.ChunkedEncodingError as e:
        raise PayloadRejected(peer, f"truncated {what} body: the connection broke ({_short(str(e))})") from None
    return b"".join(chunks)


def _detail(r: requests.Response) -> str:
    """The ``detail`` of a small JSON error body (at most 4 KiB are read)."""
    try:
        return _short(str(json.loads(r.raw.read(4096, decode_content=True)).get("detail", "")))
    except Exception as e:  # only decorates a message; a broken error body must not mask the status
        logger.debug(f"could not read the error body of HTTP {r.status_code}: {e}")
        return ""


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."
