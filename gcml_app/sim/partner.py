"""A partner site in the same process, for ``gcml simulate``: what its peer surface would answer, without HTTP."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from gcml_app.config import SiteConfig
from gcml_app.errors import NothingToShare
from gcml_app.federation.client import PeerManifest, Pulled, check_payload
from gcml_app.federation.payload import encode_weights, manifest_body
from gcml_app.store import ModelStore
from gcml_app.util.files import sha256_bytes

__all__ = ["MemoryPartner"]


class MemoryPartner:
    """A partner site in the same process: what its server's peer surface would answer, without HTTP.

    The manifest and the payload are built as ``GET /gcml/peer/manifest`` and ``/gcml/peer/model``
    build them; the received bytes go through the client's checks (:func:`check_payload`).
    """

    def __init__(self, name: str, store: ModelStore, transport: str):
        self.name, self.store, self.transport = name, store, transport

    def _payload(self, version: int) -> bytes:
        if self.transport == "float32":
            return self.store.read_bytes(version)
        return encode_weights(self.store.load(version), self.transport, arch=self.store.manifest(version).arch)

    def manifest(self) -> PeerManifest:
        m = self.store.served()
        if m is None:
            raise NothingToShare(self.name, "no published model yet")
        data = self._payload(m.version)
        return PeerManifest.model_validate(manifest_body(self.name, m, sha256_bytes(data), len(data), self.transport))

    def fetch(self, manifest: PeerManifest, cfg: SiteConfig, ours: str, etag: str | None = None) -> Pulled | None:
        if etag is not None and etag == manifest.sha256:
            return None
        t0 = time.perf_counter()
        spool = cfg.state_dir / "gossip"
        spool.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".pull-{self.name}.", dir=spool)
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload(manifest.version))
        try:
            return check_payload(self.name, manifest, Path(tmp), cfg, ours, time.perf_counter() - t0)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        pass
