"""The gossip round in-process: warm-up, cold-start adoption, skips and attempts, against a real HTTP partner.

The partner is ``tests/hostile.py``'s server playing an *honest* peer (valid weights, honest
manifest), so every branch of the round is reached without starting MONAI Label.
"""

from __future__ import annotations

import pytest
from helpers import TINY, cases_of, make_studies
from hostile import HostilePeer, valid_weights
from safetensors.torch import load as st_load

from gcml_app.config import SiteConfig
from gcml_app.federation.payload import our_arch
from gcml_app.federation.peers import PeerBook
from gcml_app.federation.state import GossipState
from gcml_app.rounds import SyncRequest, gossip_round, labels_round, summarize
from gcml_app.site.launch import free_port
from gcml_app.store import ModelStore


def _site(tmp_path, peers, **kw) -> tuple[SiteConfig, ModelStore]:
    g = {"peers": peers, "epochs": 1, "warmup_epochs": 1, "connect_timeout_s": 1, "read_timeout_s": 1,
         "retries": 0, "peer_backoff_s": 30, "adopt_from": [p["name"] for p in peers], **kw}
    cfg = SiteConfig.model_validate({**TINY, "gossip": g, "state_dir": str(tmp_path / "state")})
    return cfg, ModelStore(cfg.state_dir / "models")


@pytest.fixture
def partner(tmp_path):
    probe = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "probe")})
    with HostilePeer(probe, site="site-b") as peer:
        yield peer


def _peer(url, name="site-b"):
    return {"name": name, "url": url, "token": "x" * 20}


def test_cold_start_adopts_a_validated_partner_model_unvalidated(tmp_path, partner):
    cfg, store = _site(tmp_path, [_peer(partner.url)])
    rec = gossip_round(cfg, store, [], trigger="sync")
    assert rec["mode"] == "adopt" and rec["event"] == "publish" and store.served_version() == 1
    man = store.served()
    assert man.validated is False and man.produced_by == "adopted:site-b" and man.val_dice == {}
    assert man.made_by == {"mode": "adopt", "candidate": "incoming", "peer": "site-b"}
    assert man.lineage == [{"site": "test-site", "mode": "adopt", "peer": "site-b", "peer_site": "site-b",
                            "peer_version": 1, "peer_sha256": partner.h.honest_manifest("")["sha256"]}]
    assert store.read_bytes(1) != b"" and summarize(rec).startswith("adopted v1 unvalidated from site-b")


def test_cold_start_never_adopts_an_unvalidated_model(tmp_path, partner):
    cfg, store = _site(tmp_path, [_peer(partner.url)])
    partner.h.manifest = {**partner.h.honest_manifest(our_arch(cfg)), "validated": False}
    rec = gossip_round(cfg, store, [])
    assert rec["outcome"] == "no_model" and store.served_version() is None
    (attempt,) = rec["gossip"]["attempts"]  # attempts and bytes pulled are under "gossip", trained or not
    assert attempt["outcome"] == "skipped" and "only validated models are adopted" in attempt["reason"]


def test_adoption_can_be_turned_off(tmp_path, partner):
    cfg, store = _site(tmp_path, [_peer(partner.url)], adopt_when_unlabelled=False)
    rec = gossip_round(cfg, store, [])
    assert rec["outcome"] == "skipped" and "not enough labels to validate" in rec["reason"]
    assert store.served_version() is None


@pytest.mark.slow
def test_enough_labels_warm_up_then_dcml_and_never_unvalidated(tmp_path, partner):
    studies, _ = make_studies(tmp_path, cases=6, labelled=6)
    cfg, store = _site(tmp_path, [_peer(partner.url)])
    cases = cases_of(studies)
    # an adopted, unvalidated model is served; with enough labels the round validates everything
    store.publish(st_load(valid_weights(cfg, seed=3)), arch=our_arch(cfg), val_dice={}, n_train=0, n_val=0,
                  produced_by="adopted:site-b", validated=False)
    rec = gossip_round(cfg, store, cases, trigger="sync")
    assert rec["mode"] == "dcml" and set(rec["scores"]) == {"served", "dcml_local", "dcml_incoming", "average"}
    assert store.served().validated is True
    assert all(m.validated for m in map(store.manifest, store.versions()[1:]))

    fresh_cfg, fresh = _site(tmp_path / "fresh", [_peer(partner.url)])
    rec = gossip_round(fresh_cfg, fresh, cases_of(studies))
    assert rec["stage"] == "warmup" and rec["mode"] == "local" and fresh.served().validated is True


def test_round_tries_the_next_partner_and_backs_off_the_dead_one(tmp_path, partner):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg, store = _site(tmp_path, [_peer(dead, "dead"), _peer(partner.url)])
    rec = gossip_round(cfg, store, [], request=SyncRequest(["dead", "site-b"]))
    assert [(a["peer"], a["outcome"]) for a in rec["gossip"]["attempts"]] == [("dead", "unavailable"), ("site-b", "pulled")]
    book = PeerBook.open(GossipState(cfg.state_dir).peers_path)
    assert book.get("dead").failures == 1 and book.get("dead").backoff_until > 0
    assert book.get("site-b").bytes_pulled == len(partner.h.body)

    # the next policy-ordered round skips the backed-off partner and finds site-b unchanged
    rec = gossip_round(cfg, store, [])
    outcomes = {a["peer"]: a["outcome"] for a in rec["gossip"]["attempts"]}
    assert outcomes == {"site-b": "unchanged", "dead": "backed_off"} and rec["gossip"]["bytes_pulled"] == 0


def test_unknown_requested_partner_is_refused(tmp_path, partner):
    cfg, store = _site(tmp_path, [_peer(partner.url)])
    with pytest.raises(ValueError, match=r"sync request: found peers \['nobody'\]; expected a non-empty list of "
                                         r"configured partners"):
        gossip_round(cfg, store, [], request=SyncRequest(["nobody"]))


def test_no_partners_configured(tmp_path):
    cfg, store = _site(tmp_path, [])
    assert gossip_round(cfg, store, [])["outcome"] == "no_peers"


def test_labels_round_skips_cleanly_without_enough_labels(tmp_path):
    cfg, store = _site(tmp_path, [])
    GossipState(cfg.state_dir).add_pending("case_000", 1)
    rec = labels_round(cfg, store, [])
    assert rec["event"] == "labels" and rec["outcome"] == "skipped" and "not enough labels" in rec["reason"]


def test_a_round_without_training_leaves_pending_labels_pending(tmp_path, partner):
    cfg, store = _site(tmp_path, [_peer(partner.url)], adopt_when_unlabelled=False)
    state = GossipState(cfg.state_dir)
    state.add_pending("case_000", 5)
    state.add_pending("case_001", 5)
    rec = gossip_round(cfg, store, [{"id": "case_000", "image": "x", "label": "y"}])
    assert rec["outcome"] == "skipped" and state.pending() == ["case_000", "case_001"]


def test_adoption_only_from_partners_listed_in_adopt_from(tmp_path, partner):
    with HostilePeer(SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "probe-c")}), site="site-c") as c:
        cfg, store = _site(tmp_path, [_peer(partner.url), _peer(c.url, "site-c")], adopt_from=["site-c"])
        rec = gossip_round(cfg, store, [], request=SyncRequest(["site-b", "site-c"]))
        assert rec["mode"] == "adopt" and store.served().produced_by == "adopted:site-c"
        assert [a["peer"] for a in rec["gossip"]["attempts"]] == ["site-c"] and not partner.h.requests
    cfg, store = _site(tmp_path / "none", [_peer(partner.url)], adopt_from=[])
    rec = gossip_round(cfg, store, [])
    assert rec["outcome"] == "skipped" and "gossip.adopt_from names no partner" in rec["reason"]
    assert store.served_version() is None and not partner.h.requests
