"""The hostile-input sweep against a real server: every input gets a clear refusal, and nothing
served or stored changes. Plus the guard's rate limit and the start-up refusal of insecure settings.

Raw ``http.client`` requests send paths exactly as written (no client-side ``..`` clean-up).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
from pathlib import Path

import pytest
from helpers import make_studies, write_config
from hostile import valid_weights
from safetensors.torch import load as st_load

from gcml_app.config import ConfigError, SecurityConfig, load_config
from gcml_app.federation.payload import our_arch
from gcml_app.site.guard import Guard, hash_token
from gcml_app.site.launch import SiteServer
from gcml_app.store import ModelStore

TOKEN = "partner-token-for-the-sweep-0000"


# ---------------------------------------------------------------- rate limit (guard alone)
def test_failed_token_attempts_are_rate_limited_per_address():
    g = Guard(SecurityConfig(max_failed_auth=3, failed_auth_window_s=60,
                             peer_tokens=({"id": "b", "sha256": hash_token(TOKEN)},)))
    path = "/gcml/peer/model"
    seen = [g.check("GET", path, "198.51.100.7", "Bearer guess-%d" % i, now=100.0 + i).status for i in range(3)]
    assert seen == [403, 403, 403]
    v = g.check("GET", path, "198.51.100.7", f"Bearer {TOKEN}", now=104.0)  # even the right token now
    assert v.status == 429 and v.retry_after == 57 and "too many failed partner-token attempts" in v.reason
    assert g.check("GET", path, "198.51.100.8", f"Bearer {TOKEN}", now=104.0).status == 0  # others unaffected
    assert g.check("GET", path, "198.51.100.7", None, now=130.0).status == 429  # blocked tries are not counted
    assert g.check("GET", path, "198.51.100.7", None, now=160.5).status == 401  # 100 left the 60 s window
    v = g.check("GET", path, "198.51.100.7", f"Bearer {TOKEN}", now=160.6)  # 101, 102, 160.5: blocked again
    assert v.status == 429 and v.retry_after == 1
    assert g.check("GET", path, "198.51.100.7", f"Bearer {TOKEN}", now=161.5).status == 0


# ---------------------------------------------------------------- insecure settings refuse to start
INSECURE = [
    ({"security": {"annotation_networks": ["0.0.0.0/0"]}}, r"security.annotation_networks: found \['0.0.0.0/0'\]; "
     r"everyone could download images"),
    ({"gossip": {"peers": [{"name": "b", "url": "http://10.2.3.4:8000", "token": "t" * 20}]}},
     r"gossip.peers.0.url: found 'http://10.2.3.4:8000'; tokens and weights would cross the network unencrypted"),
    ({"serve": {"host": "0.0.0.0"}}, r"serve.host: found '0.0.0.0' \(every interface\) with no partner tokens"),
]


@pytest.mark.parametrize("overrides, message", INSECURE)
def test_insecure_settings_refuse_to_start_unless_allowed(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message + r".*\(or set security.allow_insecure: true to start anyway\)"):
        load_config(write_config(tmp_path, **overrides))
    sec = {**overrides.get("security", {}), "allow_insecure": True}
    cfg = load_config(write_config(tmp_path, **{**overrides, "security": sec}))
    assert len(cfg.insecure_settings()) == 1


def test_loopback_http_and_https_partners_are_fine(tmp_path):
    peers = [{"name": "b", "url": "http://127.0.0.1:8002", "token": "t" * 20},
             {"name": "c", "url": "https://site-c.example.org:8443", "token": "t" * 20}]
    assert load_config(write_config(tmp_path, gossip={"peers": peers})).insecure_settings() == []


# ---------------------------------------------------------------- the sweep on a real server
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    studies, _ = make_studies(root, cases=4, labelled=3)
    config = write_config(root, security={"peer_tokens": [{"id": "site-b", "sha256": hash_token(TOKEN)}],
                                          "max_failed_auth": 5, "failed_auth_window_s": 600})
    cfg = load_config(config)
    store = ModelStore(cfg.state_dir / "models")
    store.publish(st_load(valid_weights(cfg)), arch=our_arch(cfg), val_dice={"organ": 0.5, "lesion": 0.5},
                  n_train=2, n_val=1, produced_by="local")
    with SiteServer(config, studies, log=root / "server.log") as server:
        yield {"url": server.url, "host": server.host, "port": server.port, "store": store, "studies": studies}


def _snapshot(site) -> tuple:
    studies: Path = site["studies"]
    files = sorted((str(p.relative_to(studies)), hashlib.sha256(p.read_bytes()).hexdigest())
                   for p in studies.rglob("*") if p.is_file() and p.name != "datastore_v2.json")
    store = site["store"]
    return files, store.served_version(), store.read_bytes(store.served_version()), store.versions()


def _raw(site, method, path, headers=None, body=None, timeout=30):
    conn = http.client.HTTPConnection(site["host"], site["port"], timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}
SWEEP = [
    # (method, path, headers, expected status, text the body must contain)
    ("GET", "/gcml/peer/model/../../datastore/dataset", AUTH, 403, "partner tokens reach only /gcml/peer/*"),
    ("GET", "/gcml/peer/%2e%2e/%2e%2e/datastore/dataset", AUTH, 403, "partner tokens reach only"),
    ("GET", "/gcml/peer/..%2f..%2fdatastore%2fdataset", AUTH, 403, "partner tokens reach only"),
    ("GET", "/gcml/peer/manifest/../model", AUTH, 403, "partner tokens reach only"),
    ("POST", "/gcml/peer/manifest", AUTH, 405, "Method Not Allowed"),
    ("PUT", "/gcml/peer/model", AUTH, 405, "Method Not Allowed"),
    ("DELETE", "/gcml/peer/model", AUTH, 405, "Method Not Allowed"),
    ("PATCH", "/model/gcml_seg", {}, 405, "Method Not Allowed"),
    ("POST", "/gcml/rollback/..%2f..%2fetc%2fpasswd", {}, 404, "Not Found"),
    ("POST", "/gcml/rollback/-1", {}, 404, "version -1 does not exist"),
    ("GET", "/gcml/history?round=../../../../etc/passwd", {}, 200, "[]"),
    ("GET", "/datastore/image?image=../../../../etc/passwd", {}, 404, "Image NOT Found"),
    ("GET", "/datastore/image?image=/etc/passwd", {}, 404, "Image NOT Found"),
    ("POST", "/infer/gcml_seg?image=/etc/passwd", {}, 422, "image '/etc/passwd' is not in this site's datastore"),
    ("POST", "/infer/gcml_seg?image=../../../../etc/hostname", {}, 422, "is not in this site's datastore"),
    ("GET", "/datastore/label?label=../../../../etc/passwd&tag=final", {}, 404, ""),
    ("PUT", "/model/gcml_seg", {}, 403, "models change only through the validation gate"),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, path, headers, status, text", SWEEP)
def test_hostile_request_is_refused_and_nothing_changes(site, method, path, headers, status, text):
    before = _snapshot(site)
    got, body = _raw(site, method, path, headers)
    assert got == status, body
    assert text in body and "root:" not in body
    assert _snapshot(site) == before


@pytest.mark.slow
def test_oversized_headers_are_refused_and_the_server_keeps_serving(site):
    before = _snapshot(site)
    try:
        status, _ = _raw(site, "GET", "/gcml/peer/manifest", {**AUTH, "X-Filler": "a" * 200_000})
        assert status in (400, 413, 431)
    except (ConnectionError, http.client.HTTPException, OSError):
        pass  # the server may close the connection instead of answering
    assert _raw(site, "GET", "/gcml/status")[0] == 200 and _snapshot(site) == before


@pytest.mark.slow
def test_slow_clients_do_not_block_anyone(site):
    before = _snapshot(site)
    socks = []
    for _ in range(40):  # slowloris: many connections that trickle a request and never finish it
        s = socket.create_connection((site["host"], site["port"]), timeout=5)
        s.sendall(b"POST /gcml/sync HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        socks.append(s)
    try:
        t0 = time.monotonic()
        for _ in range(3):
            for s in socks:
                s.sendall(b" ")
            status, body = _raw(site, "GET", "/gcml/peer/manifest", AUTH, timeout=10)
            assert status == 200 and json.loads(body)["version"] == before[1]
        assert time.monotonic() - t0 < 30
    finally:
        for s in socks:
            s.close()
    assert _snapshot(site) == before


@pytest.mark.slow
def test_token_brute_force_gets_429_with_retry_after(site):
    conn = http.client.HTTPConnection(site["host"], site["port"], timeout=10)
    codes = []
    for i in range(7):
        conn.request("GET", "/gcml/peer/manifest", headers={"Authorization": f"Bearer guess-{i}"})
        r = conn.getresponse()
        codes.append(r.status)
        body, retry = r.read(), r.getheader("Retry-After")
    conn.close()
    assert codes == [403] * 5 + [429] * 2
    assert int(retry) > 500 and b"too many failed partner-token attempts from 127.0.0.1" in body
    assert _raw(site, "GET", "/gcml/status")[0] == 200  # the annotation side is not locked out


def test_audit_lines_are_escaped_cut_and_the_file_rotated_at_its_cap(tmp_path):
    from gcml_app.federation.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=8192)
    forged = "/x\n{\"kind\": \"pull\", \"verdict\": \"pulled\"}" + "a" * 15_000
    for i in range(1000):
        log.write("request", client="198.51.100.7", path=forged, status=403)
    assert (tmp_path / "audit.jsonl").stat().st_size <= 8192
    assert (tmp_path / "audit.jsonl.1").stat().st_size <= 8192
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert all(json.loads(line)["kind"] == "request" for line in lines)
    assert all(len(json.loads(line)["path"]) < 400 for line in lines)
    with open(tmp_path / "audit.jsonl", "ab") as f:
        f.write(b'{"kind": "requ')  # torn
    log.write("request", client="198.51.100.8", path="/info/", status=403)
    tail = log.tail(1000)
    assert tail[-1]["client"] == "198.51.100.8" and log.skipped_lines == 1
