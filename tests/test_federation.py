"""Three real MONAI Label servers on loopback gossiping, plus a down, a hanging and a hostile partner.

Site A's partners: site-b, site-c (real servers), ``dead`` (nothing listens), ``hang`` (accepts and
never answers) and ``evil`` (a test HTTP server that serves whatever a case tells it to). Rounds are
started over HTTP (``POST /gcml/sync``) and run in MONAI Label's training subprocess, as in production.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time

import pytest
import requests
import SimpleITK as sitk
from helpers import TINY, running, write_federation
from hostile import PAYLOAD_CASES, HostilePeer, valid_weights
from monailabel.client import MONAILabelClient

from gcml_app.config import SiteConfig, load_config
from gcml_app.federation.state import GossipState
from gcml_app.site.client import SiteClient
from gcml_app.site.launch import free_port
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    probe = SiteConfig.model_validate({**TINY, "state_dir": str(root / "probe")})
    with HostilePeer(probe, site="evil") as evil, HostilePeer(probe, site="hang") as hang:
        hang.h.mode, hang.h.hang_s = "hang", 60.0
        extra = {"site-a": [
            {"name": "evil", "url": evil.url, "token": "token-for-evil-0000"},
            {"name": "hang", "url": hang.url, "token": "token-for-hang-0000"},
            {"name": "dead", "url": f"http://127.0.0.1:{free_port()}", "token": "token-for-dead-0000"},
        ]}
        sites = write_federation(root, extra_peers=extra, finetune={"min_new_labels": 2},
                                 gossip_for={"site-c": {"transport": "float16"}},
                                 gossip={"max_model_bytes": 200_000, "read_timeout_s": 2, "interval_s": 2})
        for s in sites.values():  # the scheduler starts paused; the last test resumes it
            s["cfg"] = load_config(s["config"])
            GossipState(s["cfg"].state_dir).set_paused(True)
        with running(sites, root) as servers:
            for n, s in sites.items():
                s["site"] = SiteClient(s["url"])
                s["client"] = MONAILabelClient(s["url"])
                s["store"] = ModelStore(s["cfg"].state_dir / "models")
                s["server"] = servers[n]
            yield {"sites": sites, "evil": evil, "root": root}


def _served_bytes(store: ModelStore) -> tuple[int | None, str | None, bytes]:
    v = store.served_version()
    return v, None if v is None else hashlib.sha256(store.read_bytes(v)).hexdigest(), \
        (store.root / "served.json").read_bytes() if v else b""


def _peer_get(url, path, token, **headers):
    return requests.get(url + path, headers={"Authorization": f"Bearer {token}", **headers}, timeout=10)


def test_warm_up_then_a_full_round_at_each_site(fed):
    sites = fed["sites"]
    for n in SITES:
        rec = sites[n]["site"].round()
        assert rec["stage"] == "warmup" and rec["event"] == "publish" and rec["version"] == 1, rec
    pulled = {}
    for i, n in enumerate(SITES):
        s, partner = sites[n], SITES[(i + 1) % 3]
        before = s["store"].served_version()
        their = _peer_get(sites[partner]["url"], "/gcml/peer/manifest", s["tokens"][partner]).json()
        assert their["transport"] == ("float16" if partner == "site-c" else "float32")
        rec = s["site"].round(peers=[partner])
        assert rec["mode"] == "dcml" and rec["trigger"] == "sync"
        assert set(rec["scores"]) == {"served", "dcml_local", "dcml_incoming", "average"}
        assert all(set(v) == {"organ", "lesion"} for v in rec["scores"].values())
        g = rec["gossip"]
        assert g["peer"] == partner and g["peer_version"] == their["version"] and g["bytes_pulled"] == their["bytes"]
        assert rec["incoming"]["peer_sha256"] == their["sha256"]
        if rec["published"]:
            assert rec["event"] == "publish" and s["store"].served_version() == before + 1
            man = s["store"].served()
            assert man.lineage[0] == {**man.lineage[0], "site": n, "mode": "dcml", "peer": partner,
                                      "peer_version": their["version"], "peer_sha256": their["sha256"]}
            assert man.produced_by == f"gossip:{partner}:{rec['winner']}"
            assert rec["evidence"][rec["winner"]]["passed"] and rec["evidence"][rec["winner"]]["gain"] > 0
            assert rec["working"]["candidate"] == rec["winner"] and rec["working"]["rounds_unpublished"] == 0
        else:
            assert rec["event"] == "keep" and s["store"].served_version() == before
            assert not any(e["passed"] for e in rec["evidence"].values())  # no candidate cleared the gate
            assert rec["working"]["rounds_unpublished"] >= 1  # ... and the training went into the working model
        assert all(len(v) == rec["n_val"] for v in rec["per_case"].values())
        pulled[partner] = g["bytes_pulled"]
        status = s["site"].status()
        assert status["working"]["rounds_unpublished"] == rec["working"]["rounds_unpublished"]
        assert status["validation"]["n_val"] == rec["n_val"] and status["validation"]["strict"] is False
        row = next(r for r in status["partners"] if r["name"] == partner)
        assert row["reachable"] is True and row["last_version"] == their["version"] and row["rounds"] == 1
        assert status["last_round"]["round_id"] == rec["round_id"]
    # site-c serves float16: about half the bytes of a float32 model of the same network
    assert 0.45 < pulled["site-c"] / pulled["site-a"] < 0.6


def test_unchanged_peer_model_is_not_downloaded_again(fed):
    a, b = fed["sites"]["site-a"], fed["sites"]["site-b"]
    a["site"].round(peers=["site-b"])  # holds site-b's current model after this, pulled or not
    rec = a["site"].round(peers=["site-b"])
    # nothing downloaded; the round still trains, with the partner model it holds
    g = rec["gossip"]
    assert rec["mode"] == "dcml" and g["cached"] is True and g["bytes_pulled"] == 0 and rec["incoming"]["cached"]
    assert g["attempts"] == [{**g["attempts"][0], "peer": "site-b", "outcome": "unchanged"}]

    token = a["tokens"]["site-b"]
    full = _peer_get(b["url"], "/gcml/peer/model", token)
    etag = full.headers["ETag"]
    assert full.status_code == 200 and etag == f'"{hashlib.sha256(full.content).hexdigest()}"'
    again = _peer_get(b["url"], "/gcml/peer/model", token, **{"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == etag
    other = _peer_get(b["url"], "/gcml/peer/model", token, **{"If-None-Match": '"' + "0" * 64 + '"'})
    assert other.status_code == 200 and other.content == full.content


def test_down_and_hanging_peers_are_skipped_and_the_site_keeps_serving(fed):
    a = fed["sites"]["site-a"]
    served = a["store"].served_version()
    task = a["site"].sync(peers=["dead", "hang", "site-c"])
    busy = requests.post(a["url"] + "/gcml/sync", timeout=10)
    assert busy.status_code == 409 and "a round is already running" in busy.json()["detail"]
    versions = []
    while not versions or len(versions) < 3:  # infer while the round waits on the hanging peer
        _, params = a["client"].infer("gcml_seg", "case_007", {})
        versions.append(params["gcml_model_version"])
    assert versions[0] == served
    rec = a["site"].wait(task, timeout=300)
    outcomes = [(x["peer"], x["outcome"]) for x in rec["gossip"]["attempts"]]
    assert outcomes == [("dead", "unavailable"), ("hang", "unavailable"), ("site-c", "pulled")]
    assert "unreachable at http://127.0.0.1:" in rec["gossip"]["attempts"][0]["reason"]
    assert "read timeout after 2 s" in rec["gossip"]["attempts"][1]["reason"]

    rec = a["site"].round(peers=["dead"])
    assert rec["outcome"] == "no_model" and "dead unavailable (unreachable at" in rec["reason"]
    row = next(r for r in a["site"].status()["partners"] if r["name"] == "dead")
    assert row["reachable"] is False and row["failures"] == 2


REQUIRED = ["sha-mismatch", "truncated", "over-cap", "wrong-architecture", "nan-weights", "inf-weights", "pickle",
            "torch-checkpoint", "lying-safetensors-header"]


@pytest.mark.parametrize("case, misbehave, reason", [c for c in PAYLOAD_CASES if c[0] in REQUIRED],
                         ids=REQUIRED)
def test_hostile_payload_is_rejected_and_the_served_model_is_byte_identical(fed, case, misbehave, reason):
    a, h = fed["sites"]["site-a"], fed["evil"].h
    if a["store"].served_version() is None:  # whatever ran before (or nothing): this case needs a served model
        assert a["site"].round(peers=["evil"])["stage"] == "warmup"
    h.body, h.manifest, h.mode = valid_weights(a["cfg"]), None, "normal"
    misbehave(h, a["cfg"])
    before = _served_bytes(a["store"])
    rec = a["site"].round(peers=["evil"])
    assert rec["outcome"] == "no_model"
    (attempt,) = rec["gossip"]["attempts"]
    assert attempt["peer"] == "evil" and attempt["outcome"] == "rejected"
    assert re.search(reason, attempt["reason"]), attempt["reason"]
    assert _served_bytes(a["store"]) == before
    assert not (a["cfg"].state_dir / "gossip" / "peers" / "evil.safetensors").exists()
    _, params = a["client"].infer("gcml_seg", "case_007", {})
    assert params["gcml_model_version"] == before[0]


ONLY_PEER_SURFACE = [
    ("GET", "/datastore/dataset"), ("GET", "/datastore/image?image=case_000"), ("GET", "/datastore/?output=all"),
    ("POST", "/infer/gcml_seg?image=case_000"), ("GET", "/model/gcml_seg"), ("POST", "/gcml/sync"),
    ("GET", "/gcml/status"), ("POST", "/train/gcml"), ("GET", "/logs/"), ("GET", "/info/"),
]


@pytest.mark.parametrize("method, path", ONLY_PEER_SURFACE)
def test_peer_token_reaches_only_the_peer_surface(fed, method, path):
    a, b = fed["sites"]["site-a"], fed["sites"]["site-b"]
    token = b["tokens"]["site-a"]  # what site-b presents to site-a
    r = requests.request(method, a["url"] + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 403 and r.json() == {"detail": "partner tokens reach only /gcml/peer/*"}


def test_peer_surface_needs_a_valid_token_and_model_upload_is_refused(fed):
    a, b = fed["sites"]["site-a"], fed["sites"]["site-b"]
    url = a["url"] + "/gcml/peer/manifest"
    assert requests.get(url, timeout=10).status_code == 401
    r = requests.get(url, headers={"Authorization": "Bearer guessed-token-123456"}, timeout=10)
    assert r.status_code == 403 and r.json()["detail"] == "unknown partner token"
    ok = _peer_get(a["url"], "/gcml/peer/manifest", b["tokens"]["site-a"])
    assert ok.status_code == 200 and ok.json()["site"] == "site-a" and ok.json()["version"] == a["store"].served_version()

    before = _served_bytes(a["store"])
    r = requests.put(a["url"] + "/model/gcml_seg", files={"file": ("m.pt", b"\0" * 100)}, timeout=10)
    assert r.status_code == 403 and "only through the validation gate" in r.json()["detail"]
    assert requests.delete(a["url"] + "/model/gcml_seg", timeout=10).status_code == 403
    assert _served_bytes(a["store"]) == before


def test_gcml_sync_command_runs_one_round(fed):
    a = fed["sites"]["site-a"]
    n = len(a["store"].history())
    out = subprocess.run([sys.executable, "-m", "gcml_app.cli", "sync", "--config", str(a["config"]),
                          "--peer", "site-b", "--peer", "site-c"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    line = out.stdout.strip()
    assert line.startswith("site-a: round ") and "\n" not in line
    rid = line.split()[2].rstrip(":")
    (rec,) = [r for r in a["store"].history()[n:] if r.get("round_id") == rid]
    assert rec["trigger"] == "sync"

    bad = subprocess.run([sys.executable, "-m", "gcml_app.cli", "sync", "--config", str(a["config"]),
                          "--peer", "nobody"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "HTTP 422" in bad.stdout and "expected a non-empty list of" in bad.stdout


def test_rollback_over_http_serves_the_older_version(fed):
    a = fed["sites"]["site-a"]
    if a["store"].served_version() == 1:  # make sure there is something to roll back from
        a["site"].round(peers=["site-b"], epochs=3)
    r = requests.post(a["url"] + "/gcml/rollback/999", timeout=10)
    assert r.status_code == 404 and "version 999 does not exist" in r.json()["detail"]
    r = requests.post(a["url"] + "/gcml/rollback/1", params={"reason": "radiologist prefers v1"}, timeout=10)
    assert r.status_code == 200 and r.json()["version"] == 1
    _, params = a["client"].infer("gcml_seg", "case_007", {})
    assert params["gcml_model_version"] == 1
    assert a["site"].status()["served"]["version"] == 1
    last = a["site"].history(limit=1)[0]
    assert last["event"] == "rollback" and last["reason"] == "radiologist prefers v1"


def _upload_truth(s, case, tmp_path):
    truth = sitk.ReadImage(str(s["truth"] / f"{case}.nii.gz"))
    path = tmp_path / f"{case}.nii.gz"
    sitk.WriteImage(truth, str(path))
    s["client"].save_label(case, str(path), "final",
                           {"label_info": [{"name": "organ", "idx": 1}, {"name": "lesion", "idx": 2}]})


def test_new_final_labels_enqueue_a_dcml_round_with_the_cached_peer_model(fed, tmp_path):
    a = fed["sites"]["site-a"]
    n = len(a["store"].history())
    _upload_truth(a, "case_006", tmp_path)
    assert a["site"].status()["pending_labels"] == 1
    _upload_truth(a, "case_007", tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        recs = [r for r in a["store"].history()[n:] if r.get("trigger") == "labels"]
        if recs:
            break
        time.sleep(1)
    (rec,) = recs
    assert rec["mode"] == "dcml" and rec["incoming"]["cached"] is True
    assert rec["incoming"]["peer"] in {"site-b", "site-c"}
    assert rec["n_train"] + rec["n_val"] == 8
    assert a["site"].status()["pending_labels"] == 0


def _scheduled(store):
    return [r for r in store.history() if r.get("trigger") == "scheduler"]


def _idle(site, timeout=300):
    deadline = time.monotonic() + timeout
    while site.status()["training"]["running"]:
        assert time.monotonic() < deadline, "a round did not finish"
        time.sleep(0.5)


def test_pause_stops_scheduled_rounds_resume_restarts_them_and_pause_survives_restart(fed):
    a = fed["sites"]["site-a"]
    status = a["site"].status()
    assert status["gossip"]["paused"] is True and status["gossip"]["scheduler"] is True
    _idle(a["site"])
    n = len(_scheduled(a["store"]))
    time.sleep(5)  # 2.5 intervals while paused
    assert len(_scheduled(a["store"])) == n

    assert requests.post(a["url"] + "/gcml/resume", timeout=10).json() == {"paused": False}
    deadline = time.monotonic() + 300
    while len(_scheduled(a["store"])) == n:
        assert time.monotonic() < deadline, "no scheduled round after resume"
        time.sleep(0.5)
    assert requests.post(a["url"] + "/gcml/pause", timeout=10).json() == {"paused": True}
    _idle(a["site"])
    m = len(_scheduled(a["store"]))
    time.sleep(5)
    assert len(_scheduled(a["store"])) == m and not a["site"].status()["training"]["running"]

    a["server"].stop()
    a["server"].spawn().wait_ready()
    assert a["site"].status()["gossip"]["paused"] is True
