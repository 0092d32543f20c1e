"""HTTP client for a partner's peer surface: its manifest, then its weights, checked before use.

Every partner is untrusted. A pull enforces, in order:

1. one wall-clock deadline for the whole pull (``gossip.pull_deadline_s``), within which connect and
   read timeouts, retries with exponential backoff (idempotent GETs only) and ``Retry-After`` waits
   (only those shorter than ``gossip.peer_backoff_max_s`` and the time left) all fit; a transfer
   slower than ``gossip.min_rate_bytes_s`` is abandoned;
2. TLS verification (system CAs or ``gossip.ca_bundle``), and ``Accept-Encoding: identity`` (no
   decompression of what a partner sends);
3. a manifest that parses, names a sha256 and size, our task (labels in order, channels, spacing,
   intensity, ROI; :mod:`.task`) and our architecture;
4. a size cap enforced while streaming (never more than ``max_model_bytes`` read) to a temporary
   file, hashed on the way, so a pull holds about one copy of the model in memory;
5. the body's sha256 equal to the manifest's;
6. a tensor-only parse, our architecture fingerprint, finite values of plausible magnitude (:mod:`.payload`).

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
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import torch
import urllib3
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

import gcml_app
from gcml_app.config import SITE_NAME_PATTERN, GossipConfig, PeerConfig, SiteConfig
from gcml_app.errors import NothingToShare, PayloadRejected, PeerUnavailable
from gcml_app.federation.payload import accepted_archs, verify_weights
from gcml_app.federation.task import task_differences, task_of

__all__ = ["PeerClient", "PeerManifest", "Pulled", "check_manifest", "check_payload"]

logger = logging.getLogger(__name__)

MANIFEST_PATH = "/gcml/peer/manifest"
MODEL_PATH = "/gcml/peer/model"
_MANIFEST_MAX_BYTES = 1 << 20
_RATE_GRACE_S = 5.0  # seconds before the minimum transfer rate applies (TCP slow start, a busy partner)


class PeerManifest(BaseModel):
    """What a partner says it serves (``GET /gcml/peer/manifest``); checked before any weights move."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    site: str = Field(pattern=SITE_NAME_PATTERN)
    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)
    arch: str = Field(max_length=80)
    transport: str = Field("float32", max_length=16)
    created: str = Field("", max_length=40)
    val_dice: dict[str, float] = Field({}, max_length=256)
    n_train: int = 0
    n_val: int = 0
    validated: bool = True
    lineage: list[dict[str, Any]] = Field([], max_length=64)
    task: dict[str, Any] = Field({}, max_length=16)


@dataclass(frozen=True)
class Pulled:
    """A verified payload: the file holding it (the caller moves or deletes it), its tensors, transfer figures."""

    manifest: PeerManifest
    path: Path
    state: dict[str, torch.Tensor]
    bytes_received: int
    fetch_s: float
    verify_s: float


class _Deadline:
    """The wall clock of one pull."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _retry_class(deadline: _Deadline, cap: float) -> type[Retry]:
    class _Retry(Retry):
        """urllib3's Retry that waits out a ``Retry-After`` only when it ends before ``cap`` and the pull's
        deadline; a longer one is not waited for (the partner counts as unavailable this round)."""

        def sleep_for_retry(self, response=None) -> bool:
            wait = self.get_retry_after(response) if response is not None else None
            if wait is None or wait > min(cap, deadline.left() - 1.0):
                return False  # not worth waiting for: the short backoff, and the round moves on
            time.sleep(max(0.0, wait))
            return True

    return _Retry


def _session(gossip: GossipConfig, deadline: _Deadline) -> requests.Session:
    retry = _retry_class(deadline, gossip.peer_backoff_max_s)(
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
    session.headers["Accept-Encoding"] = "identity"  # a partner's body is never decompressed
    return session


class PeerClient:
    """Talks to one partner's ``/gcml/peer/*`` surface.

    Args:
        peer: the partner (URL and how to find our token for it).
        gossip: timeouts, deadline, retries, size cap and CA bundle.
        spool: where a model body is written while it arrives (default: the system's temporary folder).

    The pull deadline starts when the client is made: one client is one pull.
    """

    def __init__(self, peer: PeerConfig, gossip: GossipConfig, spool: str | Path | None = None):
        self.peer = peer
        self.gossip = gossip
        self.spool = spool
        self.deadline = _Deadline(gossip.pull_deadline_s)
        self.session = _session(gossip, self.deadline)
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
        left = self.deadline.left()
        if left <= 0:
            raise PeerUnavailable(name, f"pull deadline of {self.deadline.seconds:g} s passed (gossip.pull_deadline_s)")
        timeout = (min(self.timeout[0], left), min(self.timeout[1], left))
        try:
            r = self.session.get(self.peer.url + path, timeout=timeout, stream=True, allow_redirects=False,
                                 verify=self.verify, headers={"Authorization": f"Bearer {token}", **(headers or {})})
        except requests.exceptions.SSLError as e:
            raise PeerUnavailable(name, f"TLS verification failed for {self.peer.url}: {e}") from None
        except requests.exceptions.ConnectTimeout:
            raise PeerUnavailable(name, f"connect timeout after {timeout[0]:g} s to {self.peer.url}") from None
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as e:
            text = str(e)
            if "Read timed out" in text or isinstance(e, requests.exceptions.ReadTimeout):
                raise PeerUnavailable(name, f"read timeout after {timeout[1]:g} s from {self.peer.url}") from None
            raise PeerUnavailable(name, f"unreachable at {self.peer.url} ({_short(text)})") from None
        except requests.RequestException as e:
            raise PeerUnavailable(name, f"request to {self.peer.url} failed ({_short(str(e))})") from None
        if r.status_code in (401, 403):
            detail = _detail(r)
            r.close()
            raise PeerUnavailable(name, f"refused our token: HTTP {r.status_code} {detail}")
        return r

    def _read(self, r: requests.Response, cap: int, what: str, sink: Callable[[bytes], Any]) -> int:
        """Stream ``r``'s body into ``sink``: at most ``cap`` bytes, as they arrive, never decompressed,
        within the pull's deadline and above the minimum rate. A watchdog shuts the socket when the
        deadline passes or the rate falls too low, so even a partner that drips or stalls cannot hold us."""
        name, g = self.peer.name, self.gossip
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise PayloadRejected(name, f"{what} of {declared} bytes (Content-Length) is over the limit of {cap} bytes")
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise PayloadRejected(name, f"{what} sent with Content-Encoding {_short(encoding, 20)!r}; we asked for "
                                        "identity and never decompress a partner's body")
        n, t0, why = 0, time.monotonic(), []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.25):
                elapsed = time.monotonic() - t0
                if self.deadline.left() <= 0:
                    why.append(f"pull deadline of {self.deadline.seconds:g} s passed during the {what} body "
                               f"({n} bytes received; gossip.pull_deadline_s)")
                elif elapsed > _RATE_GRACE_S and n / elapsed < g.min_rate_bytes_s:
                    why.append(f"{what} transfer too slow: {n} bytes in {elapsed:.1f} s, under "
                               f"{g.min_rate_bytes_s:g} B/s (gossip.min_rate_bytes_s)")
                else:
                    continue
                _shutdown(r)
                return

        watchdog = threading.Thread(target=watch, daemon=True, name=f"gcml-pull-{name}")
        watchdog.start()
        try:
            while chunk := r.raw.read1(1 << 16, decode_content=False):
                n += len(chunk)
                if n > cap:
                    raise PayloadRejected(name, f"{what} body passed the limit of {cap} bytes; download aborted")
                sink(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            if not why:
                if "timed out" in str(e).lower():
                    raise PeerUnavailable(name, f"read timeout after {self.timeout[1]:g} s during the {what} body") from None
                raise PayloadRejected(name, f"truncated {what} body: the connection broke ({_short(str(e))})") from None
        finally:
            done.set()
            watchdog.join()
        if why:
            raise PeerUnavailable(name, why[0])
        return n

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
            chunks: list[bytes] = []
            self._read(r, _MANIFEST_MAX_BYTES, "manifest", chunks.append)
        try:
            return PeerManifest.model_validate(json.loads(b"".join(chunks)))
        except (ValueError, ValidationError, RecursionError) as e:  # deep nesting: RecursionError
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
        check_manifest(name, manifest, cfg, ours)
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
            fd, tmp = tempfile.mkstemp(prefix=f".pull-{name}.", suffix=".safetensors", dir=self.spool)
            path, digest = Path(tmp), hashlib.sha256()
            try:
                with os.fdopen(fd, "wb") as f:
                    def sink(chunk: bytes) -> None:
                        digest.update(chunk)
                        f.write(chunk)

                    self._read(r, min(cap, manifest.bytes), "model", sink)
                return check_payload(name, manifest, path, cfg, ours, time.perf_counter() - t0, digest.hexdigest())
            except BaseException:
                path.unlink(missing_ok=True)
                raise


def check_payload(peer: str, manifest: PeerManifest, path: Path, cfg: SiteConfig, ours: str,
                  fetch_s: float = 0.0, sha256: str | None = None) -> Pulled:
    """The checks on a received body in ``path``, whatever carried it: full size, sha256, tensors only, our
    architecture, finite and plausible values.

    Args:
        sha256: the body's digest if it was computed while receiving (else it is computed here).

    Raises:
        PayloadRejected: the reason, naming ``peer``.
    """
    check_manifest(peer, manifest, cfg, ours)
    size = path.stat().st_size
    if size > cfg.gossip.max_model_bytes:
        raise PayloadRejected(peer, f"model of {size} bytes is over the size cap of {cfg.gossip.max_model_bytes} bytes")
    if size < manifest.bytes:
        raise PayloadRejected(peer, f"truncated model body: {size} of {manifest.bytes} bytes")
    t0 = time.perf_counter()
    digest = sha256 or _file_sha256(path)
    if digest != manifest.sha256:
        raise PayloadRejected(peer, f"sha256 mismatch: body {digest[:12]}... vs manifest {manifest.sha256[:12]}...")
    try:
        state = verify_weights(path, cfg, ours)
    except ValueError as e:
        raise PayloadRejected(peer, str(e)) from None
    return Pulled(manifest, path, state, size, fetch_s, time.perf_counter() - t0)


def check_manifest(peer: str, manifest: PeerManifest, cfg: SiteConfig, ours: str) -> None:
    """Refuse a partner whose task (:mod:`gcml_app.federation.task`) or architecture differs from ours,
    before any weights move; the message names each difference.

    Raises:
        PayloadRejected: e.g. ``"task differs: labels: ours [organ, lesion], site-b [lesion, organ]"``.
    """
    diffs = task_differences(task_of(cfg), manifest.task, peer, cfg.gossip.accept)
    if diffs:
        raise PayloadRejected(peer, "task differs: " + "; ".join(diffs))
    if manifest.arch != ours and manifest.arch not in accepted_archs(cfg, ours):
        raise PayloadRejected(peer, f"manifest architecture {manifest.arch[:19]}... differs from ours {ours[:19]}... "
                                    "(same task, another network: network settings differ)")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shutdown(r: requests.Response) -> None:
    """Shut the socket under a streamed response, so a read blocked on it returns now."""
    fp = getattr(getattr(getattr(r.raw, "_fp", None), "fp", None), "raw", None)  # http.client -> SocketIO
    for sock in (getattr(fp, "_sock", None), getattr(r.raw.connection, "sock", None)):
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


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
