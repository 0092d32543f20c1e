"""The guard's decision table, and the middleware answering for it (raw ASGI calls)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gcml_app.config import SecurityConfig
from gcml_app.site.guard import Guard, GuardMiddleware, hash_token
from gcml_app.site.limits import RefusalDigest
from gcml_app.util.jsonl import clean

PARTNER = "partner-token-" + "x" * 20
ENV_PARTNER = "env-partner-token-" + "y" * 20


@pytest.fixture
def guard():
    sec = SecurityConfig(annotation_networks=("10.1.0.0/16", "127.0.0.0/8"),
                         peer_tokens=({"id": "site-b", "sha256": hash_token(PARTNER)},
                                      {"id": "site-c", "env": "GCML_TEST_TOKEN_C"}))
    return Guard(sec, env={"GCML_TEST_TOKEN_C": ENV_PARTNER})


B = f"Bearer {PARTNER}"
CASES = [
    # (method, path, client, authorization, status, reason or peer)
    ("GET", "/gcml/peer/manifest", "203.0.113.9", B, 0, "site-b"),
    ("GET", "/gcml/peer/model", "203.0.113.9", f"Bearer {ENV_PARTNER}", 0, "site-c"),
    ("GET", "/gcml/peer/model", "10.1.2.3", B, 0, "site-b"),
    ("GET", "/gcml/peer/manifest", "203.0.113.9", None, 401, "a partner token is required"),
    ("GET", "/gcml/peer/manifest", "127.0.0.1", None, 401, "a partner token is required"),
    ("GET", "/gcml/peer/manifest", "203.0.113.9", "Bearer wrong", 403, "unknown partner token"),
    ("GET", "/gcml/peer/manifest", "203.0.113.9", "Basic dXNlcjpwYXNz", 401, "a partner token is required"),
    ("GET", "/datastore/dataset", "203.0.113.9", B, 403, "partner tokens reach only /gcml/peer/*"),
    ("GET", "/datastore/dataset", "127.0.0.1", B, 403, "partner tokens reach only /gcml/peer/*"),
    ("GET", "/datastore/image", "10.1.2.3", B, 403, "partner tokens reach only"),
    ("POST", "/infer/gcml_seg", "10.1.2.3", B, 403, "partner tokens reach only"),
    ("POST", "/gcml/sync", "127.0.0.1", B, 403, "partner tokens reach only"),
    ("GET", "/gcml/status", "127.0.0.1", B, 403, "partner tokens reach only"),
    ("GET", "/gcml/peer/../datastore/dataset", "127.0.0.1", B, 403, "partner tokens reach only"),
    ("GET", "/datastore/dataset", "203.0.113.9", None, 403, "outside the annotation network"),
    ("GET", "/info/", "192.168.1.1", None, 403, "outside the annotation network"),
    ("GET", "/info/", None, None, 403, "outside the annotation network"),
    ("GET", "/info/", "not-an-ip", None, 403, "outside the annotation network"),
    ("GET", "/info/", "10.1.200.7", None, 0, None),
    ("GET", "/info/", "::ffff:10.1.0.5", None, 0, None),
    ("GET", "/datastore/dataset", "127.0.0.1", None, 0, None),
    ("POST", "/gcml/sync", "127.0.0.1", None, 0, None),
    ("PUT", "/model/gcml_seg", "127.0.0.1", None, 403, "models change only through the validation gate"),
    ("DELETE", "/model/gcml_seg", "10.1.2.3", None, 403, "models change only through the validation gate"),
    ("PUT", "/model/gcml_seg", "203.0.113.9", B, 403, "models change only through the validation gate"),
    ("GET", "/model/gcml_seg", "203.0.113.9", B, 403, "partner tokens reach only"),
]


@pytest.mark.parametrize("method, path, client, auth, status, expect", CASES)
def test_guard_decision_table(guard, method, path, client, auth, status, expect):
    v = guard.check(method, path, client, auth)
    assert v.status == status
    if status == 0:
        assert v.peer == expect
    else:
        assert expect in v.reason


def test_unset_env_token_is_not_a_valid_token():
    g = Guard(SecurityConfig(peer_tokens=({"id": "c", "env": "GCML_TEST_UNSET"},)), env={})
    assert g.check("GET", "/gcml/peer/model", "127.0.0.1", "Bearer ").status == 401
    assert g.identify("") is None and g.identify("anything") is None


def _call(middleware, method, path, client, headers=(), root_path="", body=(b"",), caps=None):
    sent, reached = [], []
    chunks = list(body)

    async def app(scope, receive, send):
        reached.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": len(chunks) > 1}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": path, "client": (client, 1234) if client else None,
             "headers": [(k.encode(), v.encode()) for k, v in headers], "root_path": root_path}
    asyncio.run(GuardMiddleware(app, lambda: middleware, upload_caps=lambda: caps or {})(scope, receive, send))
    return sent, reached


def test_middleware_answers_refusals_itself_and_passes_the_rest(guard):
    sent, reached = _call(guard, "GET", "/datastore/dataset", "203.0.113.9")
    assert not reached and sent[0]["status"] == 403
    assert json.loads(sent[1]["body"]) == {"detail": "only /gcml/peer/* is reachable from outside the annotation network"}

    sent, reached = _call(guard, "GET", "/gcml/peer/model", "203.0.113.9")
    assert sent[0]["status"] == 401 and (b"www-authenticate", b'Bearer realm="gcml-peer"') in sent[0]["headers"]

    sent, reached = _call(guard, "GET", "/gcml/peer/model", "203.0.113.9", [("Authorization", B)])
    assert sent[0]["status"] == 200 and reached[0]["state"]["gcml_peer"] == "site-b"


def test_middleware_refuses_when_the_guard_cannot_decide():
    def broken():
        raise RuntimeError("config not loaded")

    sent = []

    async def send(msg):
        sent.append(msg)

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("reached the app")

    scope = {"type": "http", "method": "GET", "path": "/info/", "client": ("127.0.0.1", 1), "headers": []}
    asyncio.run(GuardMiddleware(app, broken)(scope, None, send))
    assert sent[0]["status"] == 503


# ---------------------------------------------------------------- addresses, browsers, websockets (hostile cases)
@pytest.fixture
def proxied():
    return Guard(SecurityConfig(annotation_networks=("10.9.0.0/16",), trusted_proxies=("192.0.2.10/32",),
                                cors_origins=("https://viewer.hospital.example",), allowed_hosts=("site-a.example",),
                                peer_tokens=({"id": "site-b", "sha256": hash_token(PARTNER)},)))


INSIDE = "10.9.0.5"
HOSTILE = [
    # (headers, tcp peer, method, path, status, reason)
    ({"x-forwarded-for": INSIDE}, "127.0.0.1", "GET", "/datastore/", 403, "accepted only from security.trusted_proxies"),
    ({"x-real-ip": INSIDE}, "127.0.0.1", "GET", "/datastore/", 403, "accepted only from security.trusted_proxies"),
    ({"forwarded": f"for={INSIDE}"}, "127.0.0.1", "GET", "/datastore/", 403, "accepted only from"),
    ({"x-forwarded-for": INSIDE}, "203.0.113.9", "GET", "/gcml/peer/manifest", 403, "accepted only from"),
    ({"x-forwarded-for": INSIDE}, INSIDE, "GET", "/info/", 403, "accepted only from"),  # even from inside
    ({"x-forwarded-for": INSIDE}, "192.0.2.10", "GET", "/info/", 0, INSIDE),  # our proxy says who it was
    ({"x-forwarded-for": f"{INSIDE}, 203.0.113.9"}, "192.0.2.10", "GET", "/info/", 403, "outside the annotation"),
    ({"x-forwarded-for": "203.0.113.9, 10.9.0.5"}, "192.0.2.10", "GET", "/info/", 0, INSIDE),  # right-most hop
    ({"forwarded": f'for="{INSIDE}";proto=https'}, "192.0.2.10", "GET", "/info/", 0, INSIDE),
    ({"x-forwarded-for": "evil\n"}, "192.0.2.10", "GET", "/info/", 403, "invalid address"),
    ({}, "192.0.2.10", "GET", "/info/", 403, "outside the annotation"),  # the proxy itself is not inside
    ({"host": "evil.example"}, INSIDE, "GET", "/datastore/image", 403, "is not a name of this server"),
    ({"host": "site-a.example:8000"}, INSIDE, "GET", "/datastore/image", 0, INSIDE),
    ({"host": "10.9.0.1:8000"}, INSIDE, "GET", "/datastore/image", 0, INSIDE),  # an address is never rebound
    ({"host": "[::1]:8000"}, INSIDE, "GET", "/datastore/image", 0, INSIDE),
    ({"host": "evil.example"}, "203.0.113.9", "GET", "/gcml/peer/model", 0, "203.0.113.9"),  # token-only surface
    ({"origin": "https://evil.example", "host": "site-a.example"}, INSIDE, "GET", "/datastore/image", 403,
     "cross-origin request from https://evil.example refused"),
    ({"origin": "https://evil.example", "host": "site-a.example"}, INSIDE, "POST", "/gcml/rollback/1", 403,
     "cross-origin"),
    ({"origin": "https://evil.example", "host": "site-a.example"}, INSIDE, "OPTIONS", "/gcml/pause", 403,
     "cross-origin"),
    ({"origin": "null", "host": "site-a.example"}, INSIDE, "POST", "/gcml/pause", 403, "cross-origin"),
    ({"origin": "https://viewer.hospital.example", "host": "site-a.example"}, INSIDE, "POST", "/gcml/pause", 0,
     INSIDE),
    ({"origin": "http://site-a.example", "host": "site-a.example"}, INSIDE, "POST", "/gcml/pause", 0, INSIDE),
    ({"sec-fetch-site": "cross-site", "host": "site-a.example"}, INSIDE, "POST", "/gcml/pause", 403, "cross-site"),
]


@pytest.mark.parametrize("headers, peer, method, path, status, expect", HOSTILE)
def test_forwarding_host_and_origin_table(proxied, headers, peer, method, path, status, expect):
    auth = B if path.startswith("/gcml/peer/") else None
    v = proxied.check(method, path, peer, auth, headers=headers)
    assert v.status == status, v.reason
    assert (v.client == expect) if status == 0 else (expect in v.reason)


@pytest.mark.parametrize("peer, path, status", [
    (INSIDE, "/ws", 0), ("203.0.113.9", "/ws", 403), ("203.0.113.9", "/gcml/peer/model", 403), (INSIDE, "/gcml/peer/model", 403),
])
def test_websockets_only_from_inside(proxied, peer, path, status):
    auth = B if path.startswith("/gcml/peer/") else None
    v = proxied.check("GET", path, peer, auth, headers={}, websocket=True)
    assert v.status == status and (status == 0 or "websockets are served only inside" in v.reason)


def test_failure_limiter_is_bounded_and_counts_ipv6_per_64():
    sec = SecurityConfig(max_failed_auth=3, failed_auth_window_s=60, max_tracked_clients=100)
    g = Guard(sec)
    for i in range(20_000):  # 20,000 IPv6 sources, all in different /64s
        g.check("GET", "/gcml/peer/model", f"2001:db8:{i // 65536:x}:{i % 65536:x}::1", "Bearer x", now=float(i) / 100)
    assert len(g.limiter) <= 100
    # one host rotating through its /64 is one client
    for i in range(3):
        assert g.check("GET", "/gcml/peer/model", f"2001:db8:ffff:1::{i + 1:x}", "Bearer x", now=500.0).status == 403
    v = g.check("GET", "/gcml/peer/model", "2001:db8:ffff:1::99", f"Bearer {PARTNER}", now=500.5)
    assert v.status == 429 and "2001:db8:ffff:1::/64" in v.reason


def test_refusals_are_folded_per_client_and_minute():
    digest = RefusalDigest(period_s=60, max_clients=50)
    assert digest.note("198.51.100.1", 0.0) == (True, 0)
    assert [digest.note("198.51.100.1", t)[0] for t in (1.0, 2.0, 3.0)] == [False, False, False]
    assert digest.note("198.51.100.2", 3.0) == (True, 0)
    assert digest.note("198.51.100.1", 4.0, "401") == (True, 0)  # another kind of refusal is logged on its own
    assert digest.note("198.51.100.1", 61.0) == (True, 3)
    for i in range(1000):
        digest.note(f"198.51.{i // 256}.{i % 256}", 100.0)
    assert len(digest._seen) <= 50


@pytest.mark.parametrize("text, expect", [
    ("/info/", "/info/"),
    ("/x\n{\"kind\": \"pull\"}", "/x\\n{\"kind\": \"pull\"}"),
    ("/a\x1b[31m", "/a\\x1b[31m"),
    ("/" + "a" * 15000, "/" + "a" * 199 + "...[15001 chars]"),
])
def test_clean_escapes_control_characters_and_cuts(text, expect):
    assert clean(text) == expect


@pytest.mark.parametrize("path, root_path, status", [
    ("/prefix/model/gcml_seg", "/prefix", 403),  # PUT /prefix/model/... is a model upload as routed
    ("/prefix/gcml/peer/model", "/prefix", 401),  # the peer surface is found under the prefix
    ("/model/gcml_seg", "", 403),
])
def test_middleware_decides_on_the_path_as_routed_under_root_path(guard, path, root_path, status):
    sent, reached = _call(guard, "PUT" if "model/gcml" in path else "GET", path, "203.0.113.9", root_path=root_path)
    assert sent[0]["status"] == status and not reached


@pytest.mark.parametrize("headers, body, status", [
    ([("content-length", "5000")], [b"x" * 5000], 413),  # declared too large: refused before reading
    ([], [b"x" * 600, b"x" * 600, b""], 413),  # chunked past the cap: refused, the app never sees it
    ([], [b"x" * 600, b"x" * 300, b""], 200),
])
def test_label_uploads_are_capped(guard, headers, body, status):
    sent, reached = _call(guard, "PUT", "/datastore/label", "127.0.0.1", headers, body=body,
                          caps={"/datastore/label": 1024})
    assert sent[0]["status"] == status and bool(reached) == (status == 200)
    if status == 413:
        assert "over the limit of 1024 bytes (security.max_upload_bytes)" in json.loads(sent[1]["body"])["detail"]


def test_a_websocket_from_outside_is_closed_before_accept(guard):
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(msg):
        sent.append(msg)

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("reached the app")

    scope = {"type": "websocket", "path": "/ws", "client": ("203.0.113.9", 1), "headers": []}
    asyncio.run(GuardMiddleware(app, lambda: guard)(scope, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]
