"""The guard's decision table, and the middleware answering for it (raw ASGI calls)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gcml_app.config import SecurityConfig
from gcml_app.gossip.guard import Guard, GuardMiddleware, hash_token

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
    assert g.peer_of("") is None and g.peer_of("anything") is None


def _call(middleware, method, path, client, headers=()):
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": path, "client": (client, 1234) if client else None,
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(GuardMiddleware(app, lambda: middleware)(scope, receive, send))
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
