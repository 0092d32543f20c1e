"""A real site tried as an attacker would: from outside its annotation network, from inside through a
browser, through forged forwarding headers, with bombs, and as a stalling or absurd partner.

The site's annotation network is ``127.0.0.3/32``: the radiologist's Slicer connects from 127.0.0.3,
an outsider from 127.0.0.2, and a local proxy or ssh tunnel from 127.0.0.1 (forging forwarding
headers). After every refusal the datastore, the store and the served weights are checked unchanged.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import struct
import time

import pytest
import requests
from helpers import TINY, bound_to, make_studies, write_config
from hostile import HostilePeer, _scaled, valid_weights
from monailabel.client import MONAILabelClient

from gcml_app.config import SiteConfig, load_config
from gcml_app.site.client import SiteClient
from gcml_app.site.guard import hash_token
from gcml_app.site.launch import SiteServer, SourceAddressAdapter
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow

INSIDE, OUTSIDE, PROXY = "127.0.0.3", "127.0.0.2", "127.0.0.1"
PARTNER = "partner-token-" + "p" * 24
AUDIT_CAP = 256 * 1024
MAX_CLIENTS = 100
DEADLINE_S = 6


def _session(address: str) -> requests.Session:
    s = requests.Session()
    s.mount("http://", SourceAddressAdapter(address))
    return s


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacker")
    studies, _ = make_studies(root, cases=6, labelled=5)
    probe = SiteConfig.model_validate({**TINY, "state_dir": str(root / "probe")})
    with HostilePeer(probe, site="evil") as evil:
        config = write_config(
            root, state_dir=str(root / "state"),
            security={"annotation_networks": [f"{INSIDE}/32"], "max_tracked_clients": MAX_CLIENTS,
                      "audit_max_bytes": AUDIT_CAP, "peer_tokens": [{"id": "site-b", "sha256": hash_token(PARTNER)}]},
            gossip={"peers": [{"name": "evil", "url": evil.url, "token": "e" * 24}], "interval_s": 0, "epochs": 1,
                    "warmup_epochs": 2, "retries": 1, "backoff_factor": 0.1, "connect_timeout_s": 2,
                    "read_timeout_s": 3, "pull_deadline_s": DEADLINE_S, "peer_backoff_s": 0, "peer_backoff_max_s": 2},
        )
        cfg = load_config(config)
        server = SiteServer(config, studies, log=root / "server.log", client_address=INSIDE,
                            extra_args=("--root_path", "/site-a"))
        with server:
            inside = SiteClient(server.url, session=_session(INSIDE))
            assert inside.round()["stage"] == "warmup"
            yield {"url": server.url, "server": server, "cfg": cfg, "store": ModelStore(cfg.state_dir / "models"),
                   "studies": studies, "inside": inside, "evil": evil, "root": root}


def _snapshot(site) -> tuple:
    """What no refused request may change: served version and bytes, versions, labels on disk, history length."""
    store = site["store"]
    v = store.served_version()
    labels = sorted(p.name for p in (site["studies"] / "labels").rglob("*") if p.is_file())
    return v, store.read_bytes(v), store.versions(), labels, len(store.history())


def _get(site, address: str, path: str, **kw) -> requests.Response:
    return _session(address).request(kw.pop("method", "GET"), site["url"] + path, timeout=30, **kw)


# ---------------------------------------------------------------- who is asking
REFUSED = [
    # (source, method, path, headers, status, detail)
    (OUTSIDE, "GET", "/datastore/?output=all", {}, 403, "outside the annotation network"),
    (OUTSIDE, "GET", "/datastore/image?image=case_000", {"Authorization": f"Bearer {PARTNER}"}, 403,
     "partner tokens reach only /gcml/peer/*"),
    (PROXY, "GET", "/datastore/?output=all", {"X-Forwarded-For": INSIDE}, 403, "accepted only from security.trusted_proxies"),
    (PROXY, "GET", "/datastore/?output=all", {"X-Real-IP": INSIDE}, 403, "accepted only from security.trusted_proxies"),
    (PROXY, "GET", "/datastore/?output=all", {"Forwarded": f"for={INSIDE}"}, 403, "accepted only from"),
    (PROXY, "POST", "/gcml/pause", {"X-Forwarded-For": INSIDE}, 403, "accepted only from"),
    (PROXY, "GET", "/gcml/peer/manifest", {"X-Forwarded-For": INSIDE, "Authorization": f"Bearer {PARTNER}"}, 403,
     "accepted only from"),
    (INSIDE, "GET", "/datastore/image?image=case_000", {"Origin": "https://evil.example", "Host": "evil.example"}, 403,
     "cross-origin request from https://evil.example refused"),
    (INSIDE, "GET", "/datastore/image?image=case_000", {"Host": "evil.example"}, 403, "is not a name of this server"),
    (INSIDE, "POST", "/gcml/pause", {"Origin": "https://evil.example"}, 403, "cross-origin"),
    (INSIDE, "POST", "/gcml/rollback/1", {"Origin": "null"}, 403, "cross-origin"),
    (INSIDE, "OPTIONS", "/gcml/pause", {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
     403, "cross-origin"),
    # the server runs under --root_path /site-a: the guard decides on the path as routed, so this is still a model upload
    (INSIDE, "PUT", "/model/gcml_seg", {}, 403, "models change only through the validation gate"),
]


@pytest.mark.parametrize("source, method, path, headers, status, detail", REFUSED)
def test_refused_requests_change_nothing(site, source, method, path, headers, status, detail):
    before = _snapshot(site)
    kw = {"files": {"file": ("m.safetensors", b"0" * 64)}} if method == "PUT" else {}
    r = _get(site, source, path, method=method, headers=headers, **kw)
    assert r.status_code == status and detail in r.json()["detail"], r.text
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    assert _snapshot(site) == before
    assert site["inside"].status()["gossip"]["paused"] is False


def test_the_same_requests_pass_from_inside_and_partners_pass_from_anywhere(site):
    assert _get(site, INSIDE, "/datastore/?output=all").status_code == 200
    assert _get(site, INSIDE, "/info/", headers={"Host": "localhost:8000"}).status_code == 200
    for source in (OUTSIDE, PROXY):
        r = _get(site, source, "/gcml/peer/manifest", headers={"Authorization": f"Bearer {PARTNER}", "Host": "x.example"})
        assert r.status_code == 200 and r.json()["version"] == site["store"].served_version()


def test_forged_addresses_do_not_dodge_the_failed_token_limit(site):
    codes = [_get(site, OUTSIDE, "/gcml/peer/manifest", headers={"Authorization": f"Bearer wrong-{i}"}).status_code
             for i in range(site["cfg"].security.max_failed_auth + 1)]
    assert codes[-1] == 429
    forged = _get(site, PROXY, "/gcml/peer/manifest", headers={"Authorization": f"Bearer {PARTNER}",
                                                               "X-Forwarded-For": "198.51.100.1"})
    assert forged.status_code == 403  # a proxy on the host cannot claim a fresh address either


def test_a_websocket_from_outside_is_refused(site):
    port = int(site["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(OUTSIDE, 0)) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        answer = s.recv(4096).split(b"\r\n", 1)[0]
    assert b" 403 " in answer + b" ", answer


# ---------------------------------------------------------------- what the radiologist's client may send
def _label_bomb(path, shape=(2048, 2048, 2048), members=160) -> None:
    """A NIfTI-1 .nii.gz of ``members`` gzip members: ~64 kB each on disk, 64 MiB each decoded."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 2, 8)  # uint8
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform_code 0, sform_code 1
    struct.pack_into("<12f", hdr, 280, -1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 1, 0)
    hdr[344:348] = b"n+1\0"
    zeros = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(bytes(hdr) + b"\0" * 4))
        f.writelines(zeros for _ in range(members))


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def test_a_label_bomb_is_refused_before_it_is_decoded(site, tmp_path):
    bomb = tmp_path / "bomb.nii.gz"
    _label_bomb(bomb)
    assert 9e6 < bomb.stat().st_size < 12e6
    before, rss = _snapshot(site), _peak_rss_mb(site["server"].proc.pid)
    shape = r"label shape \(2048, 2048, 2048\) does not match image shape \(32, 32, 32\)"
    with bound_to(INSIDE), pytest.raises(Exception, match=shape):
        MONAILabelClient(site["url"]).save_label("case_005", str(bomb), tag="final")
    assert _peak_rss_mb(site["server"].proc.pid) - rss < 100
    assert _snapshot(site) == before


@pytest.mark.parametrize("params, detail", [
    ({"image": ["/etc/hostname"]}, r"must be a datastore image id; found a list"),
    ({"save_label": True, "label_tag": "final"}, r"infer parameters \[\W*label_tag\W+save_label\W*\] refused"),
    ({"label_tag": "final"}, r"infer parameters \[\W*label_tag\W*\] refused: inference never stores labels"),
])
def test_infer_cannot_read_outside_the_datastore_or_store_labels(site, params, detail):
    before = _snapshot(site)
    with bound_to(INSIDE), pytest.raises(Exception, match=detail):
        MONAILabelClient(site["url"]).infer("gcml_seg", "case_005", params)
    assert _snapshot(site) == before


# ---------------------------------------------------------------- partners that stall or send absurd things
@pytest.mark.parametrize("setup, reason", [
    ({"mode": "drip", "drip_bytes": 1, "drip_every_s": 1.0}, "transfer too slow|pull deadline of 6 s passed"),
    ({"mode": "retry_after", "retry_after_s": 3600}, "manifest: HTTP 503 busy"),
    ({"manifest": b"[" * 200_000 + b"]" * 200_000}, "manifest is not valid"),
    ({"body_fn": lambda cfg: _scaled(cfg, 3e38)}, r"weights of magnitude over 10000"),
])
def test_a_hostile_partner_is_refused_within_the_deadline_and_info_keeps_answering(site, setup, reason):
    h = site["evil"].h
    h.mode, h.manifest, h.body = "normal", None, valid_weights(site["cfg"], seed=7)
    for k, v in setup.items():
        if k == "body_fn":
            h.body = v(site["cfg"])
        else:
            setattr(h, k, v)
    before = _snapshot(site)
    t0 = time.monotonic()
    rec = site["inside"].round(peers=["evil"], timeout=120)
    assert rec["outcome"] == "no_model"
    (attempt,) = [a for a in rec["gossip"]["attempts"] if a["peer"] == "evil"]
    assert attempt["outcome"] in ("unavailable", "rejected")
    assert re.search(reason, attempt["reason"]), attempt["reason"]
    assert time.monotonic() - t0 < DEADLINE_S + 5 + 25  # + the round's own start-up (a subprocess)
    assert attempt.get("seconds", 0) < DEADLINE_S + 5
    assert _get(site, INSIDE, "/info/").status_code == 200
    assert _snapshot(site)[:4] == before[:4]


# ---------------------------------------------------------------- floods leave bounded traces
def test_ten_thousand_refusals_leave_bounded_logs_and_tables(site):
    path = "/datastore/" + "a" * 15_000 + "%0a" + '{"kind": "pull", "verdict": "pulled"}'
    for i in range(10_000):
        s = _session(f"127.1.{i // 250}.{i % 250 + 1}")  # 10,000 different addresses (all loopback on Linux)
        if i % 2:
            r = s.get(site["url"] + "/gcml/peer/manifest?" + "q" * 15_000, headers={"Authorization": "Bearer nope"},
                      timeout=30)
            assert r.status_code in (403, 429)
        else:
            assert s.get(site["url"] + path, timeout=30).status_code == 403
        s.close()
    state = site["cfg"].state_dir
    audit = state / "audit.jsonl"
    assert audit.stat().st_size <= AUDIT_CAP
    lines = audit.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: none forged, none torn
    assert all(r["kind"] in ("request", "pull") for r in records)
    assert all(r.get("peer") == "evil" for r in records if r["kind"] == "pull")  # the forged pull line is not there
    assert max(len(r.get("path", "")) for r in records) < 400
    status = site["inside"].status()
    assert status["guard"]["tracked_clients"] <= MAX_CLIENTS == status["guard"]["max_tracked_clients"]
    log = site["root"] / "server.log"
    assert all(len(line) < 2000 for line in log.read_text(errors="replace").splitlines())
