"""Who may reach what on a site's MONAI Label server (docs/design.md, "Security").

Stock MONAI Label without Keycloak serves every endpoint (images, labels, a zip of the labelled
dataset, model upload) to anyone who can reach it, allows every browser origin with credentials,
and (through uvicorn) believes ``X-Forwarded-For`` from loopback. The guard sits in front of all
of it and decides on the TCP peer's address:

==========================================  ==========================================
request                                     answer
==========================================  ==========================================
forwarding headers (``Forwarded``,          403 unless the TCP peer is in
``X-Forwarded-For``, ``X-Real-IP``)         ``security.trusted_proxies``; from a trusted
                                            proxy the client is the nearest untrusted hop
a websocket                                 refused unless from inside
``Origin`` other than the request's own     403 unless listed in ``security.cors_origins``
and not a partner path                      (Slicer is not a browser and sends none)
``Host`` not one of the server's names      403 (DNS rebinding); ``security.allowed_hosts``,
(not a partner path)                        default the machine's names, loopback and IP literals
``PUT``/``DELETE /model/...`` (anyone)      403: models change only through the gate
``/gcml/peer/*`` without a token            401
``/gcml/peer/*`` with an unknown token      403
``/gcml/peer/*`` after too many of those    429 (``security.max_failed_auth`` per client address,
                                            IPv6 per /64, within ``failed_auth_window_s``)
``/gcml/peer/*`` with a partner's token     passed on (from any network)
anything else with a partner's token        403: partner tokens reach only ``/gcml/peer/*``
anything else from outside the annotation   403
networks (``security.annotation_networks``)
anything else from inside                   passed on (MONAI Label as usual)
==========================================  ==========================================

Paths are decided as routed (under ``root_path``). Tokens are compared as sha256 digests with
:func:`hmac.compare_digest` against every configured token (no early exit), so timing does not
reveal how much of a guess was right. Every table the guard keeps per client address is bounded
(``security.max_tracked_clients``, least recently seen dropped first), and refusals are logged and
audited once per client and kind of refusal per minute, with a count of the ones folded in
(:class:`~gcml_app.site.limits.RefusalDigest`). The bounded tables are in :mod:`gcml_app.site.limits`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette._utils import get_route_path

from gcml_app.config import SecurityConfig
from gcml_app.site.limits import FailureLimiter, RefusalDigest, client_key
from gcml_app.util.jsonl import clean

__all__ = ["FORWARDING_HEADERS", "PEER_PATHS", "Guard", "GuardMiddleware", "Verdict", "hash_token"]

logger = logging.getLogger(__name__)

PEER_PATHS = frozenset({"/gcml/peer/manifest", "/gcml/peer/model"})
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def hash_token(token: str) -> str:
    """The hex sha256 that ``security.peer_tokens[].sha256`` holds for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _machine_names() -> tuple[str, ...]:
    """This machine's host name and FQDN (looked up once: the FQDN may need a DNS answer)."""
    return socket.gethostname().lower(), socket.getfqdn().lower()


def _host(text: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]:port`` or a quoted ``"[v6]:port"`` (a bare IPv6 stays whole)."""
    text = text.strip().strip('"').lower()
    if text.startswith("["):
        return text[1:].split("]")[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(_host(text or ""))
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip


@dataclass(frozen=True)
class Verdict:
    """``status`` 0 passes the request on; otherwise the refusal and its reason. ``peer`` is the token's id."""

    status: int
    reason: str = ""
    peer: str | None = None
    token_id: str | None = None
    retry_after: int | None = None
    client: str | None = None


class Guard:
    """The access decision for one request.

    Args:
        security: annotation networks, trusted proxies, browser origins, host names, partner tokens.
        env: where ``peer_tokens[].env`` tokens are read (default ``os.environ``).
        limiter: failed-token counts to share across rebuilds.
        served_hosts: extra names this server answers to (``serve.host``).
    """

    def __init__(self, security: SecurityConfig, env: dict[str, str] | None = None,
                 limiter: FailureLimiter | None = None, served_hosts: tuple[str, ...] = ()):
        env = os.environ if env is None else env
        self.security = security
        self.limiter = limiter or FailureLimiter(security.max_tracked_clients)
        self.networks = [ipaddress.ip_network(n, strict=False) for n in security.annotation_networks]
        self.proxies = [ipaddress.ip_network(n, strict=False) for n in security.trusted_proxies]
        self.origins = {o.rstrip("/").lower() for o in security.cors_origins}
        if security.allowed_hosts is not None:
            self.hosts = {h.lower() for h in security.allowed_hosts}
        else:
            self.hosts = {"localhost", *_machine_names(), *(h.lower() for h in served_hosts)}
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

    def inside(self, host: str | None) -> bool:
        ip = _ip(host)
        return ip is not None and any(ip in net for net in self.networks)

    def _trusted_proxy(self, ip) -> bool:
        return ip is not None and any(ip in net for net in self.proxies)

    def client_address(self, peer: str | None, headers: dict[str, str]) -> tuple[str | None, str]:
        """The client a request comes from: the TCP ``peer``, or behind a trusted proxy the nearest
        untrusted hop its forwarding headers name. ``(None, why)`` when those headers are refused."""
        present = [h for h in FORWARDING_HEADERS if h in headers]
        if not present:
            return peer, ""
        if not self._trusted_proxy(_ip(peer)):
            return None, (f"forwarding headers ({', '.join(present)}) are accepted only from security.trusted_proxies; "
                          f"{clean(peer, 64)} is not one")
        if "x-forwarded-for" in headers:
            hops = headers["x-forwarded-for"].split(",")
        elif "forwarded" in headers:
            hops = [part.split("=", 1)[1] for el in headers["forwarded"].split(",") for part in el.split(";")
                    if part.strip().lower().startswith("for=")]
        else:
            hops = [headers["x-real-ip"]]
        for hop in reversed(hops):  # the right-most hops were added by our own proxies
            ip = _ip(hop)
            if ip is None:
                return None, f"forwarding header names an invalid address {clean(hop, 64)!r}"
            if not self._trusted_proxy(ip):
                return str(ip), ""
        return str(_ip(peer)), ""

    def host_allowed(self, host: str | None) -> bool:
        """Whether the ``Host`` header names this server: an IP literal, or one of :attr:`hosts`."""
        if host is None:
            return True  # not a browser (every browser sends Host)
        name = _host(host)
        return "*" in self.hosts or name in self.hosts or _ip(name) is not None

    def check(self, method: str, path: str, client: str | None, authorization: str | None,
              now: float | None = None, *, headers: dict[str, str] | None = None, scheme: str = "http",
              websocket: bool = False) -> Verdict:
        """Decide one request; see the module table.

        Args:
            method, path: the request line (``path`` as routed, without ``root_path``).
            client: the TCP peer's address.
            authorization: the ``Authorization`` header.
            headers: every request header, lower-case names (``Host``, ``Origin``, forwarding headers).
            scheme: ``http`` or ``https`` (for same-origin requests).
            websocket: the request is a websocket handshake.
        """
        now = time.monotonic() if now is None else now
        headers = headers or {}
        client, why = self.client_address(client, headers)
        if why:
            return Verdict(403, why)
        token = None
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip() or None
        who = self.identify(token)
        peer, token_id = who if who else (None, None)
        sec = self.security
        if websocket and not (self.inside(client) and peer is None and path not in PEER_PATHS):
            return Verdict(403, "websockets are served only inside the annotation network", client=client)
        if method in ("PUT", "DELETE") and (path == "/model" or path.startswith("/model/")):
            return Verdict(403, "models change only through the validation gate; uploads to /model are refused",
                           client=client)
        origin = headers.get("origin")
        if origin is not None:
            own = f"{scheme}://{headers.get('host', '')}".lower()
            if origin.rstrip("/").lower() not in self.origins and origin.lower() != own:
                return Verdict(403, f"cross-origin request from {clean(origin, 80)} refused (security.cors_origins)",
                               client=client)
        if path in PEER_PATHS:
            source = client or "unknown"
            wait = self.limiter.retry_after(source, sec.max_failed_auth, sec.failed_auth_window_s, now)
            if wait is not None:
                return Verdict(429, f"too many failed partner-token attempts from {client_key(source)}; "
                               f"retry in {wait} s", retry_after=wait, client=client)
            if token is None:
                self.limiter.fail(source, now, sec.max_failed_auth, sec.failed_auth_window_s)
                return Verdict(401, "a partner token is required (Authorization: Bearer <token>)", client=client)
            if peer is None:
                self.limiter.fail(source, now, sec.max_failed_auth, sec.failed_auth_window_s)
                return Verdict(403, "unknown partner token", client=client)
            return Verdict(0, peer=peer, token_id=token_id, client=client)
        if not self.host_allowed(headers.get("host")):
            return Verdict(403, f"Host {clean(headers['host'], 80)!r} is not a name of this server "
                           "(security.allowed_hosts)", client=client)
        if peer is not None:
            return Verdict(403, "partner tokens reach only /gcml/peer/*", peer=peer, token_id=token_id, client=client)
        if not self.inside(client):
            return Verdict(403, "only /gcml/peer/* is reachable from outside the annotation network", client=client)
        if method not in _SAFE_METHODS and origin is None and headers.get("sec-fetch-site") == "cross-site":
            return Verdict(403, "cross-site request refused", client=client)
        return Verdict(0, client=client)


class GuardMiddleware:
    """ASGI middleware applying a :class:`Guard` to every HTTP and websocket request, capping label
    uploads, and auditing the partner link.

    Args:
        app: the wrapped ASGI app.
        guard: a callable returning the current :class:`Guard` (re-built when the site YAML changes).
        audit: called with one dict per request to ``/gcml/peer/*`` and per logged refusal.
        upload_caps: path -> largest request body in bytes (label uploads).
    """

    def __init__(self, app: Any, guard: Callable[[], Guard], audit: Callable[[dict[str, Any]], None] | None = None,
                 upload_caps: Callable[[], dict[str, int]] | None = None):
        self.app = app
        self.guard = guard
        self.audit = audit
        self.upload_caps = upload_caps or (dict)
        self.digest = RefusalDigest()

    def _audit(self, entry: dict[str, Any]) -> None:
        if self.audit is None:
            return
        try:
            self.audit(entry)
        except Exception:  # the request was answered; only its audit line is lost, and we say so
            logger.exception(f"audit: could not record a {entry.get('status')} for {entry.get('path')}")

    async def _refuse(self, scope: dict, receive: Callable, send: Callable, status: int, reason: str,
                      extra: list[tuple[bytes, bytes]] = ()) -> int:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; a close before accept is answered with HTTP 403
            await send({"type": "websocket.close", "code": 1008})
            return 0
        body = json.dumps({"detail": reason}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
        return len(body)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", []):
            name, value = k.decode("latin-1").lower(), v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        tcp_peer = (scope.get("client") or (None, None))[0]
        method = scope.get("method", "GET")
        path = get_route_path(scope)
        try:
            verdict = self.guard().check(method, path, tcp_peer, headers.get("authorization"), headers=headers,
                                         scheme=scope.get("scheme", "http"), websocket=scope["type"] == "websocket")
        except Exception:  # a guard that cannot decide refuses
            logger.exception("guard failed; refusing the request")
            verdict = Verdict(503, "access control is not ready")
        client = verdict.client or tcp_peer
        entry = {"client": clean(client, 64), "peer": verdict.peer or "anonymous", "token_id": verdict.token_id,
                 "method": clean(method, 16), "path": clean(path)}
        if verdict.status == 0:
            cap = self.upload_caps().get(path) if method in ("PUT", "POST") else None
            if cap is not None:
                declared = headers.get("content-length", "")
                if declared.isdigit() and int(declared) > cap:
                    return await self._refused(scope, receive, send, entry, Verdict(
                        413, f"upload of {declared} bytes is over the limit of {cap} bytes "
                             "(security.max_upload_bytes)", client=client))
                receive = await _buffered(receive, cap)
                if receive is None:
                    return await self._refused(scope, receive, send, entry, Verdict(
                        413, f"upload is over the limit of {cap} bytes (security.max_upload_bytes)", client=client))
            scope.setdefault("state", {})["gcml_peer"] = verdict.peer
            if path not in PEER_PATHS:
                return await self.app(scope, receive, send)
            seen = {"status": None, "bytes": 0, "sha256": None}

            async def watch(msg: dict) -> None:
                if msg["type"] == "http.response.start":
                    seen["status"] = msg["status"]
                    for k, v in msg.get("headers", []):
                        if k.lower() == b"etag":
                            seen["sha256"] = clean(v.decode("latin-1").strip('"'), 64)
                elif msg["type"] == "http.response.body":
                    seen["bytes"] += len(msg.get("body", b""))
                await send(msg)

            try:
                await self.app(scope, receive, watch)
            finally:
                self._audit({**entry, **seen})
            return
        return await self._refused(scope, receive, send, entry, verdict)

    async def _refused(self, scope, receive, send, entry: dict[str, Any], verdict: Verdict) -> None:
        extra = [(b"www-authenticate", b'Bearer realm="gcml-peer"')] if verdict.status == 401 else []
        if verdict.retry_after:
            extra.append((b"retry-after", str(verdict.retry_after).encode()))
        n = await self._refuse(scope, receive, send, verdict.status, verdict.reason, extra)
        # one kind of refusal: its status and the start of its reason (the rest may name variable things)
        log, folded = self.digest.note(entry["client"], time.monotonic(), f"{verdict.status} {verdict.reason[:32]}")
        if log:
            more = f" (+{folded} more refusals of this client folded in)" if folded else ""
            logger.warning(f"guard: {verdict.status} {entry['method']} {entry['path']} from {entry['client']}: "
                           f"{clean(verdict.reason, 300)}{more}")
            self._audit({**entry, "status": verdict.status, "bytes": n, "sha256": None,
                         "reason": clean(verdict.reason, 300), "folded": folded})


async def _buffered(receive: Callable, cap: int) -> Callable | None:
    """The whole request body read now (at most ``cap`` bytes), replayed to the app; ``None`` over the cap."""
    messages, n = [], 0
    while True:
        msg = await receive()
        messages.append(msg)
        if msg["type"] != "http.request":
            break
        n += len(msg.get("body", b""))
        if n > cap:
            return None
        if not msg.get("more_body"):
            break
    replay = iter(messages)

    async def wrapped() -> dict:
        return next(replay, None) or await receive()

    return wrapped
