"""Who may reach what on a site's MONAI Label server (docs/design.md, "Security").

Stock MONAI Label without Keycloak serves every endpoint (images, labels, a zip of the labelled
dataset, model upload) to anyone who can reach it. The guard sits in front of all of it:

==========================================  ==========================================
request                                     answer
==========================================  ==========================================
``PUT``/``DELETE /model/...`` (anyone)      403: models change only through the gate
``/gcml/peer/*`` without a token            401
``/gcml/peer/*`` with an unknown token      403
``/gcml/peer/*`` after too many of those    429 (``security.max_failed_auth`` per client address
                                            within ``failed_auth_window_s``), ``Retry-After``
``/gcml/peer/*`` with a partner's token     passed on (from any network)
anything else with a partner's token        403: partner tokens reach only ``/gcml/peer/*``
anything else from outside the annotation   403
networks (``security.annotation_networks``)
anything else from inside                   passed on (MONAI Label as usual)
==========================================  ==========================================

Tokens are compared as sha256 digests with :func:`hmac.compare_digest` against every configured
token (no early exit), so timing does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gcml_app.config import SecurityConfig

__all__ = ["PEER_PATHS", "FailureLimiter", "Guard", "GuardMiddleware", "Verdict", "hash_token"]

logger = logging.getLogger(__name__)

PEER_PATHS = frozenset({"/gcml/peer/manifest", "/gcml/peer/model"})


def hash_token(token: str) -> str:
    """The hex sha256 that ``security.peer_tokens[].sha256`` holds for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Verdict:
    """``status`` 0 passes the request on; otherwise the refusal and its reason. ``peer`` is the token's id."""

    status: int
    reason: str = ""
    peer: str | None = None
    token_id: str | None = None
    retry_after: int | None = None


class FailureLimiter:
    """Failed partner-token attempts per client address in a sliding window (kept across guard rebuilds)."""

    def __init__(self):
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float, window: float) -> list[float]:
        kept = [t for t in self._fails.get(client, []) if now - t < window]
        if kept:
            self._fails[client] = kept
        else:
            self._fails.pop(client, None)
        return kept

    def retry_after(self, client: str, limit: int, window: float, now: float) -> int | None:
        """Seconds until ``client`` may try again, or ``None`` if it is not blocked."""
        with self._lock:
            recent = self._recent(client, now, window)
            return max(1, int(recent[-limit] + window - now) + 1) if len(recent) >= limit else None

    def fail(self, client: str, now: float) -> None:
        with self._lock:
            self._fails.setdefault(client, []).append(now)


class Guard:
    """The access decision for one request.

    Args:
        security: annotation networks and partner tokens.
        env: where ``peer_tokens[].env`` tokens are read (default ``os.environ``).
    """

    def __init__(self, security: SecurityConfig, env: dict[str, str] | None = None,
                 limiter: FailureLimiter | None = None):
        env = os.environ if env is None else env
        self.security = security
        self.limiter = limiter or FailureLimiter()
        self.networks = [ipaddress.ip_network(n, strict=False) for n in security.annotation_networks]
        self.tokens: list[tuple[str, str, bytes]] = []  # (partner, token id, sha256 digest)
        for t in security.peer_tokens:
            if t.sha256:
                self.tokens.append((t.partner, t.id, bytes.fromhex(t.sha256)))
            elif env.get(t.env or ""):
                self.tokens.append((t.partner, t.id, bytes.fromhex(hash_token(env[t.env]))))
            else:
                logger.warning(f"peer token {t.id!r}: environment variable {t.env} is not set; that partner cannot pull")

    def identify(self, token: str | None) -> tuple[str, str] | None:
        """``(partner, token id)`` of a valid token, else ``None``; every known token is compared."""
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for peer, token_id, known in self.tokens:
            if hmac.compare_digest(digest, known) and found is None:
                found = (peer, token_id)
        return found

    def peer_of(self, token: str | None) -> str | None:
        """The partner whose token this is, or ``None``."""
        who = self.identify(token)
        return who[0] if who else None

    def inside(self, host: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def check(self, method: str, path: str, client: str | None, authorization: str | None,
              now: float | None = None) -> Verdict:
        """Decide one request; see the module table."""
        now = time.monotonic() if now is None else now
        token = None
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip() or None
        who = self.identify(token)
        peer, token_id = who if who else (None, None)
        if method in ("PUT", "DELETE") and (path == "/model" or path.startswith("/model/")):
            return Verdict(403, "models change only through the validation gate; uploads to /model are refused")
        if path in PEER_PATHS:
            source = client or "unknown"
            sec = self.security
            wait = self.limiter.retry_after(source, sec.max_failed_auth, sec.failed_auth_window_s, now)
            if wait is not None:
                return Verdict(429, f"too many failed partner-token attempts from {source}; retry in {wait} s",
                               retry_after=wait)
            if token is None:
                self.limiter.fail(source, now)
                return Verdict(401, "a partner token is required (Authorization: Bearer <token>)")
            if peer is None:
                self.limiter.fail(source, now)
                return Verdict(403, "unknown partner token")
            return Verdict(0, peer=peer, token_id=token_id)
        if peer is not None:
            return Verdict(403, "partner tokens reach only /gcml/peer/*", peer=peer, token_id=token_id)
        if not self.inside(client):
            return Verdict(403, "only /gcml/peer/* is reachable from outside the annotation network")
        return Verdict(0)


class GuardMiddleware:
    """ASGI middleware applying a :class:`Guard` to every HTTP request, and auditing the partner link.

    Args:
        app: the wrapped ASGI app.
        guard: a callable returning the current :class:`Guard` (re-built when the site YAML changes).
        audit: called with one dict per request to ``/gcml/peer/*`` and per refused request.
    """

    def __init__(self, app: Any, guard: Callable[[], Guard], audit: Callable[[dict[str, Any]], None] | None = None):
        self.app = app
        self.guard = guard
        self.audit = audit

    def _audit(self, entry: dict[str, Any]) -> None:
        if self.audit is None:
            return
        try:
            self.audit(entry)
        except Exception:  # the request was answered; only its audit line is lost, and we say so
            logger.exception(f"audit: could not record {entry}")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = (scope.get("client") or (None, None))[0]
        try:
            verdict = self.guard().check(scope["method"], scope["path"], client, headers.get("authorization"))
        except Exception:  # a guard that cannot decide refuses
            logger.exception("guard failed; refusing the request")
            verdict = Verdict(503, "access control is not ready")
        entry = {"client": client, "peer": verdict.peer or "anonymous", "token_id": verdict.token_id,
                 "method": scope["method"], "path": scope["path"]}
        if verdict.status == 0:
            scope.setdefault("state", {})["gcml_peer"] = verdict.peer
            if scope["path"] not in PEER_PATHS:
                return await self.app(scope, receive, send)
            seen = {"status": None, "bytes": 0, "sha256": None}

            async def watch(msg: dict) -> None:
                if msg["type"] == "http.response.start":
                    seen["status"] = msg["status"]
                    for k, v in msg.get("headers", []):
                        if k.lower() == b"etag":
                            seen["sha256"] = v.decode("latin-1").strip('"')
                elif msg["type"] == "http.response.body":
                    seen["bytes"] += len(msg.get("body", b""))
                await send(msg)

            try:
                await self.app(scope, receive, watch)
            finally:
                self._audit({**entry, **seen})
            return
        logger.warning(f"guard: {verdict.status} {scope['method']} {scope['path']} from {client}: {verdict.reason}")
        body = json.dumps({"detail": verdict.reason}).encode()
        extra = [(b"www-authenticate", b'Bearer realm="gcml-peer"')] if verdict.status == 401 else []
        if verdict.retry_after:
            extra.append((b"retry-after", str(verdict.retry_after).encode()))
        await send({"type": "http.response.start", "status": verdict.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
        self._audit({**entry, "status": verdict.status, "bytes": len(body), "sha256": None, "reason": verdict.reason})
