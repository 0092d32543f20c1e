"""A partner that serves whatever a test tells it to: a real HTTP server on 127.0.0.1.

Used to play the down, slow, corrupt, malicious or unauthorised peer against the real peer client
and the real MONAI Label servers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from gcml_app.federation.task import task_of
from gcml_app.config import SiteConfig
from gcml_app.federation.payload import our_arch
from gcml_app.ml.network import build_network


class Hostile:
    """What the hostile peer answers; tests change these fields between requests.

    Fields:
        body: the model bytes served on ``/gcml/peer/model``.
        manifest: the manifest dict (``None``: derived honestly from ``body``).
        mode: ``normal``, ``truncate`` (announce the full length, send half, close), ``chunked``
            (no Content-Length), ``gzip`` (``Content-Encoding: gzip``), ``hang`` (sleep ``hang_s`` before answering), ``status`` (answer
            ``status`` with a JSON error).
            ``drip`` (send the body ``drip_bytes`` at a time every ``drip_every_s``; the manifest too when
            ``drip_manifest``), ``retry_after`` (503 with ``Retry-After: retry_after_s``).
        token: the bearer token it requires (``None``: any).
    """

    def __init__(self, site: str = "evil"):
        self.site = site
        self.body = b""
        self.manifest: dict | None = None
        self.mode = "normal"
        self.status = 503
        self.hang_s = 30.0
        self.drip_bytes, self.drip_every_s, self.drip_manifest = 1, 1.0, False
        self.retry_after_s = 3600
        self.token: str | None = None
        self.requests: list[tuple[str, dict]] = []
        self.marker: Path | None = None

    task: dict = {}  # the task an honest partner declares (that of the config it was made with)

    def honest_manifest(self, arch: str) -> dict:
        return {"site": self.site, "version": 1, "sha256": hashlib.sha256(self.body).hexdigest(),
                "bytes": len(self.body), "arch": arch, "created": "2026-01-01T00:00:00", "val_dice": {"organ": 0.9},
                "n_train": 5, "n_val": 2, "validated": True, "lineage": [], "task": self.task}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    hostile: Hostile
    arch: str

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        h = self.hostile
        h.requests.append((self.path, dict(self.headers)))
        if h.mode == "hang":
            time.sleep(h.hang_s)
        if h.token is not None and self.headers.get("Authorization") != f"Bearer {h.token}":
            body = b'{"detail": "unknown partner token"}'
            return self._send(403, body, length=len(body))
        if h.mode == "status":
            body = json.dumps({"detail": "hostile says no"}).encode()
            return self._send(h.status, body, length=len(body))
        if h.mode == "retry_after":
            body = b'{"detail": "busy"}'
            self.send_response(503)
            self.send_header("Retry-After", str(h.retry_after_s))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/gcml/peer/manifest":
            man = h.manifest if h.manifest is not None else h.honest_manifest(self.arch)
            body = man if isinstance(man, bytes) else json.dumps(man).encode()
            if h.mode == "drip" and h.drip_manifest:
                return self._drip(body)
            return self._send(200, body, length=len(body))
        if self.path == "/gcml/peer/model" and h.mode == "drip":
            return self._drip(h.body)
        if self.path == "/gcml/peer/model":
            if h.mode == "truncate":
                self._send(200, h.body[: len(h.body) // 2], "application/octet-stream", length=len(h.body))
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            if h.mode == "chunked":
                return self._send(200, h.body, "application/octet-stream")
            if h.mode == "gzip":  # a decompression bomb: small on the wire, huge once decoded
                packed = gzip.compress(h.body)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(packed)))
                self.end_headers()
                self.wfile.write(packed)
                return
            return self._send(200, h.body, "application/octet-stream", length=len(h.body))
        body = b'{"detail": "not found"}'
        self._send(404, body, length=len(body))


    def _drip(self, body: bytes) -> None:
        h = self.hostile
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(0, len(body), h.drip_bytes):
                self.wfile.write(body[i:i + h.drip_bytes])
                self.wfile.flush()
                time.sleep(h.drip_every_s)
        except OSError:  # the client gave up: that is the point
            pass


class HostilePeer:
    """Context manager running a :class:`Hostile` peer on a free loopback port.

    Example:
        >>> with HostilePeer(cfg) as evil:
        ...     evil.h.body = b"..."; url = evil.url
    """

    def __init__(self, cfg: SiteConfig, site: str = "evil"):
        self.h = Hostile(site)
        self.h.body = valid_weights(cfg)
        self.h.task = task_of(cfg)
        handler = type("H", (_Handler,), {"hostile": self.h, "arch": our_arch(cfg)})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HostilePeer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def valid_weights(cfg: SiteConfig, seed: int = 0, **changes) -> bytes:
    """Honest safetensors weights of this site's network (``changes`` edits the state dict)."""
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in build_network(cfg).state_dict().items()}
    for k, v in changes.items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    return st_save(state)


class _Boom:
    """Unpickling this would create ``path``: proof that a payload was (never) unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _Boom(marker)}, protocol=2)


def torch_checkpoint(cfg: SiteConfig) -> bytes:
    """A conventional non-tensor checkpoint: ``torch.save({"epoch", "state_dict", "optimizer"})``."""
    buf = io.BytesIO()
    torch.save({"epoch": 3, "state_dict": build_network(cfg).state_dict(), "optimizer": {"lr": 0.1}}, buf)
    return buf.getvalue()


def _other_arch(cfg: SiteConfig) -> bytes:
    other = cfg.model_copy(update={"network": cfg.network.model_copy(update={"channels": (8, 16, 32)})})
    return valid_weights(other)


def _first_float(cfg: SiteConfig) -> str:
    return next(k for k, v in build_network(cfg).state_dict().items() if v.is_floating_point() and v.numel() > 1)


def _poison(cfg: SiteConfig, value: float) -> bytes:
    key = _first_float(cfg)
    t = build_network(cfg).state_dict()[key].clone()
    t.view(-1)[0] = value
    return valid_weights(cfg, **{key: t})


def _lying_header(cfg: SiteConfig) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 64


def _set(**fields):
    def apply(h: Hostile, cfg: SiteConfig) -> None:
        for k, v in fields.items():
            setattr(h, k, v(cfg) if callable(v) else v)
    return apply


def _manifest(**fields):
    def apply(h: Hostile, cfg: SiteConfig) -> None:
        h.manifest = {**h.honest_manifest(our_arch(cfg)), **fields}
    return apply


def _then(*steps):
    def apply(h: Hostile, cfg: SiteConfig) -> None:
        for s in steps:
            s(h, cfg)
    return apply


# (case id, how the hostile peer misbehaves, the rejection reason)
PAYLOAD_CASES = [
    ("sha-mismatch", _manifest(sha256="0" * 64), r"sha256 mismatch"),
    ("truncated", _set(mode="truncate"), r"truncated model body"),
    ("over-cap", _set(body=lambda cfg: b"\0" * 300_000), r"over the size cap of 200000 bytes"),
    ("longer-than-announced", _then(_manifest(bytes=1000), _set(mode="chunked")), r"passed the limit of 1000 bytes"),
    ("wrong-architecture", _set(body=_other_arch), r"architecture sha256:\w+\.\.\. differs from ours"),
    ("nan-weights", _set(body=lambda cfg: _poison(cfg, float("nan"))), r"non-finite values \(NaN/Inf\)"),
    ("inf-weights", _set(body=lambda cfg: _poison(cfg, float("inf"))), r"non-finite values \(NaN/Inf\)"),
    ("pickle", _set(body=lambda cfg: pickle_payload(Path("/nonexistent"))), r"looks like a pickle; pickled payloads are never loaded"),
    ("torch-checkpoint", _set(body=torch_checkpoint), r"looks like a zip archive \(torch.save checkpoint\)"),
    ("json-not-tensors", _set(body=b'{"weights": [1, 2, 3]}'), r"not a safetensors file"),
    ("lying-safetensors-header", _set(body=_lying_header), r"not a safetensors file"),
    ("missing-tensor", _set(body=lambda cfg: valid_weights(cfg, **{_first_float(cfg): None})), r"architecture .* differs"),
    ("extra-tensor", _set(body=lambda cfg: valid_weights(cfg, extra=torch.zeros(3))), r"architecture .* differs"),
    ("float64-dtype", _set(body=lambda cfg: valid_weights(
        cfg, **{_first_float(cfg): build_network(cfg).state_dict()[_first_float(cfg)].double()})), r"architecture .* differs"),
    ("manifest-not-json", _set(manifest=b"<html>hello</html>"), r"manifest is not valid"),
    ("manifest-bad-site", _manifest(site="../../etc"), r"manifest is not valid"),
    ("manifest-wrong-arch", _manifest(arch="sha256:" + "ab" * 32), r"manifest architecture sha256:abab"),
    ("manifest-deeply-nested", _set(manifest=b"[" * 100_000 + b"]" * 100_000), r"manifest is not valid"),
    ("manifest-endless-lineage", _manifest(lineage=[{"a": [[[[[[[[[[1]]]]]]]]]]}] * 10_000), r"manifest is not valid"),
    ("huge-finite-weights", _set(body=lambda cfg: _scaled(cfg, 3e38)),
     r"weights of magnitude over 10000 \(gossip.max_abs_weight\)"),
]


def _scaled(cfg: SiteConfig, value: float) -> bytes:
    """Every floating weight set to ``value`` (finite, absurd)."""
    return valid_weights(cfg, **{k: torch.full_like(v, value) for k, v in build_network(cfg).state_dict().items()
                                 if v.is_floating_point()})
