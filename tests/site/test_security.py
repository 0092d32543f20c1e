"""Partner tokens over their lifecycle (rotation, revocation without restart) and the audit trail,
on a real MONAI Label server; ``gcml token new``."""

from __future__ import annotations

import json
import time

import pytest
import requests
import yaml
from helpers import TINY, make_studies, until, write_config
from hostile import HostilePeer, _poison, valid_weights
from safetensors.torch import load as st_load

from gcml_app.cli import main
from gcml_app.config import SiteConfig, load_config
from gcml_app.federation.payload import our_arch
from gcml_app.site.client import SiteClient
from gcml_app.site.guard import Guard, hash_token
from gcml_app.site.launch import SiteServer
from gcml_app.store import ModelStore

OLD, NEW = "old-token-for-site-b-0000000000", "new-token-for-site-b-1111111111"


def test_token_ids_and_partners():
    g = Guard(SiteConfig.model_validate({**TINY, "state_dir": "/tmp/x", "security": {"peer_tokens": [
        {"id": "b-2026q3", "peer": "site-b", "sha256": hash_token(OLD)},
        {"id": "b-2026q4", "peer": "site-b", "sha256": hash_token(NEW)},
        {"id": "site-c", "sha256": hash_token("c" * 30)}]}}).security)
    assert g.identify(OLD) == ("site-b", "b-2026q3") and g.identify(NEW) == ("site-b", "b-2026q4")
    assert g.identify("c" * 30) == ("site-c", "site-c") and g.identify("nope") is None
    v = g.check("GET", "/gcml/peer/model", "203.0.113.1", f"Bearer {NEW}")
    assert (v.status, v.peer, v.token_id) == (0, "site-b", "b-2026q4")


def test_token_new_prints_the_token_once_and_its_hash(capsys):
    assert main(["token", "new", "--peer", "site-b", "--id", "site-b-q4"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[1].strip()
    line = next(x for x in out if x.strip().startswith("- {id: site-b-q4"))
    assert yaml.safe_load(line.strip()[2:]) == {"id": "site-b-q4", "peer": "site-b", "sha256": hash_token(token)}
    assert len(token) >= 40
    with pytest.raises(SystemExit):
        main(["token", "new", "--peer", "../etc"])


def _tokens(config, entries):
    raw = yaml.safe_load(config.read_text())
    raw["security"] = {"peer_tokens": entries}
    config.write_text(yaml.safe_dump(raw))


def _get(url, path, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(url + path, headers=headers, timeout=10)


@pytest.mark.slow
def test_rotation_revocation_without_restart_and_the_audit_trail(tmp_path):
    studies, _ = make_studies(tmp_path, cases=4, labelled=0)
    probe = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "probe")})
    with HostilePeer(probe, site="site-b") as partner:
        config = write_config(tmp_path, gossip={"peers": [{"name": "site-b", "url": partner.url, "token": "x" * 20}],
                                                "interval_s": 0, "retries": 0, "adopt_from": ["site-b"]})
        _tokens(config, [{"id": "b-old", "peer": "site-b", "sha256": hash_token(OLD)}])
        cfg = load_config(config)
        with SiteServer(config, studies, log=tmp_path / "server.log") as server:
            url, pid = server.url, server.proc.pid
            ModelStore(cfg.state_dir / "models").publish(
                st_load(valid_weights(cfg)), arch=our_arch(cfg), val_dice={}, n_train=0, n_val=0,
                produced_by="adopted:site-c", validated=False)  # no labels yet: the site may adopt again
            model = _get(url, "/gcml/peer/model", OLD)
            assert model.status_code == 200
            assert _get(url, "/gcml/peer/manifest", NEW).status_code == 403

            # rotation: both valid during the overlap
            _tokens(config, [{"id": "b-old", "peer": "site-b", "sha256": hash_token(OLD)},
                             {"id": "b-new", "peer": "site-b", "sha256": hash_token(NEW)}])
            until(lambda: _get(url, "/gcml/peer/manifest", NEW).status_code == 200)
            assert _get(url, "/gcml/peer/manifest", OLD).status_code == 200
            # revocation: the old one stops working, no restart
            _tokens(config, [{"id": "b-new", "peer": "site-b", "sha256": hash_token(NEW)}])
            until(lambda: _get(url, "/gcml/peer/manifest", OLD).status_code == 403)
            assert _get(url, "/gcml/peer/manifest", NEW).status_code == 200
            # a broken YAML keeps the previous tokens (and says so in the log)
            good = config.read_text()
            config.write_text(good.replace("peer_tokens:", "peer_tokens: [unclosed"))
            time.sleep(0.3)
            assert _get(url, "/gcml/peer/manifest", NEW).status_code == 200
            assert _get(url, "/gcml/peer/manifest", OLD).status_code == 403
            config.write_text(good)
            assert server.proc.pid == pid and server.proc.poll() is None

            # refusals are audited too
            assert _get(url, "/gcml/peer/model").status_code == 401
            assert requests.put(url + "/model/gcml_seg", files={"file": ("m", b"0")}, timeout=10).status_code == 403

            # pulls: one accepted (cold start adopts), one refused (NaN weights)
            site = SiteClient(url)
            assert site.round()["mode"] == "adopt"
            partner.h.body = _poison(cfg, float("nan"))
            assert site.round()["outcome"] == "no_model"

            audit = site._json("GET", "/gcml/audit", params={"limit": 1000})
            text = (cfg.state_dir / "audit.jsonl").read_text()
    assert OLD not in text and NEW not in text and "x" * 20 not in text  # no token text, ever
    requests_ = [a for a in audit if a["kind"] == "request"]
    first = requests_[0]
    assert (first["path"], first["status"], first["peer"], first["token_id"]) == ("/gcml/peer/model", 200, "site-b", "b-old")
    assert first["bytes"] == len(model.content) and first["sha256"] == model.headers["ETag"].strip('"')
    assert any(a["token_id"] == "b-new" and a["status"] == 200 for a in requests_)
    assert any(a["peer"] == "anonymous" and a["status"] == 403 and a["reason"] == "unknown partner token"
               for a in requests_)
    assert any(a["peer"] == "anonymous" and a["status"] == 401 and a["path"] == "/gcml/peer/model" for a in requests_)
    assert any(a["method"] == "PUT" and a["status"] == 403 and "validation gate" in a["reason"] for a in requests_)
    pulls = [a for a in audit if a["kind"] == "pull"]
    assert [p["verdict"] for p in pulls] == ["pulled", "rejected"]
    assert pulls[0]["peer"] == "site-b" and len(pulls[0]["sha256"]) == 64 and pulls[0]["bytes"] > 0
    assert "non-finite values" in pulls[1]["reason"] and pulls[1]["version"] == 1
    assert all(json.loads(line) for line in text.splitlines())
