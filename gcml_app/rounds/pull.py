"""Pulling a partner's model for a round: ask partners in order until one gives a new model that passes every check.

Transport is the partner's (:class:`Partner`: HTTP on servers, in memory in the simulator); the
checks are the gossip client's (:func:`gcml_app.federation.client.check_payload`), done once, on the
received bytes. Each try is one attempt record, one update of the partner book and one audit line.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gcml_app.config import SiteConfig
from gcml_app.errors import NothingToShare, PayloadRejected, PeerUnavailable
from gcml_app.federation.audit import AuditLog
from gcml_app.federation.client import PeerClient, PeerManifest, Pulled
from gcml_app.federation.peers import PeerBook
from gcml_app.federation.state import GossipState
from gcml_app.util.jsonl import clean

__all__ = ["Connect", "Got", "Partner", "http", "pull_first"]

logger = logging.getLogger(__name__)


class Partner(Protocol):
    """What a round needs of a partner: its manifest, then its verified weights (see :class:`PeerClient`)."""

    def manifest(self) -> PeerManifest: ...

    def fetch(self, manifest: PeerManifest, cfg: SiteConfig, ours: str, etag: str | None = None) -> Pulled | None: ...

    def close(self) -> None: ...


Connect = Callable[[str], Partner]
"""Partner name -> a :class:`Partner` to talk to (HTTP on servers, in memory in the simulator)."""


def http(cfg: SiteConfig) -> Connect:
    """Partners over HTTP(S), at the URLs of ``gossip.peers``."""
    peers = {p.name: p for p in cfg.gossip.peers}
    spool = GossipState(cfg.state_dir).cache  # bodies arrive beside the cache they are moved into
    return lambda name: PeerClient(peers[name], cfg.gossip, spool=spool)


@dataclass(frozen=True)
class Got:
    """A partner's new model: checked, and moved into the site's cache at ``path``."""

    peer: str
    manifest: PeerManifest
    pulled: Pulled
    path: Path


def pull_first(cfg: SiteConfig, order: list[str], book: PeerBook, state: GossipState, ours: str,
               validated_only: bool, connect: Connect) -> tuple[Got | None, list[dict[str, Any]]]:
    """Ask partners in ``order`` until one gives a new model that passes every check.

    Args:
        validated_only: skip partners whose model is unvalidated (a site adopting a model unchanged).

    Returns:
        the first new model (``None`` if no partner had one) and one attempt record per partner asked.
    """
    urls = {p.name: p.url for p in cfg.gossip.peers}
    audit = AuditLog(cfg.state_dir / "audit.jsonl", cfg.security.audit_max_bytes)
    attempts: list[dict[str, Any]] = []
    for name in order:
        attempt, got, man = _ask(cfg, name, connect, book, state, ours, validated_only)
        attempts.append(attempt)
        book.save()
        audit.write("pull", peer=name, url=urls.get(name, name), verdict=attempt["outcome"],
                    reason=attempt.get("reason", ""), version=man.version if man else None,
                    sha256=man.sha256 if man else None, bytes=attempt.get("bytes", 0))
        if got is not None:
            return got, attempts
    return None, attempts


def _ask(cfg: SiteConfig, name: str, connect: Connect, book: PeerBook, state: GossipState, ours: str,
         validated_only: bool) -> tuple[dict[str, Any], Got | None, PeerManifest | None]:
    """One partner: its manifest, then (when new) its checked weights; the partner book learns the outcome."""
    client = connect(name)
    t0 = time.perf_counter()
    man = None
    try:
        man = client.manifest()
        held = book.get(name).last_sha256
        cached = state.cached_model(name)
        if man.sha256 == held and cached.exists():
            book.answered(name)
            return {"peer": name, "outcome": "unchanged", "version": man.version,
                    "reason": f"v{man.version} ({man.sha256[:12]}) is the model we pulled last time"}, None, man
        if validated_only and not man.validated:
            book.answered(name)
            return {"peer": name, "outcome": "skipped", "version": man.version,
                    "reason": "its model is unvalidated; only validated models are adopted"}, None, man
        pulled = client.fetch(man, cfg, ours, etag=held if cached.exists() else None)
        if pulled is None:  # 304: it still serves what we hold, though its manifest said otherwise
            book.answered(name)
            return {"peer": name, "outcome": "unchanged", "version": man.version,
                    "reason": "HTTP 304: the model is the one we hold"}, None, man
        os.replace(pulled.path, cached)  # the verified file itself: no second copy
        book.pulled(name, man.sha256, man.version, man.site, pulled.bytes_received)
        logger.info(f"gossip[{cfg.site}] pulled {name} v{man.version}: {pulled.bytes_received} bytes "
                    f"in {pulled.fetch_s:.2f} s, verified in {pulled.verify_s:.2f} s")
        return ({"peer": name, "outcome": "pulled", "version": man.version, "bytes": pulled.bytes_received,
                 "fetch_s": round(pulled.fetch_s, 3), "verify_s": round(pulled.verify_s, 3)},
                Got(name, man, pulled, cached), man)
    except NothingToShare as e:
        book.answered(name)
        return {"peer": name, "outcome": "nothing_yet", "reason": e.reason}, None, man
    except PeerUnavailable as e:
        book.failed(name, e.reason, cfg.gossip)
        logger.warning(f"gossip[{cfg.site}] {e}")
        return {"peer": name, "outcome": "unavailable", "reason": e.reason,
                "seconds": round(time.perf_counter() - t0, 2)}, None, man
    except PayloadRejected as e:
        book.rejected(name, e.reason, cfg.gossip)
        logger.warning(f"gossip[{cfg.site}] rejected payload: {e}")
        return {"peer": name, "outcome": "rejected", "reason": e.reason}, None, man
    except Exception as e:  # whatever a partner sends must not end our round: refuse it, ask the next one
        reason = f"unexpected {type(e).__name__} while checking its answer: {clean(e, 200)}"
        book.rejected(name, reason, cfg.gossip)
        logger.exception(f"gossip[{cfg.site}] {name}: {reason}")
        return {"peer": name, "outcome": "rejected", "reason": reason}, None, man
    finally:
        client.close()
