"""GCMLFederationLib (the Slicer module's plain-Python part): status model, poller, client.

The status model runs on recorded ``/gcml/status`` and ``/gcml/history`` answers (``tests/data``);
the client runs against a real GCML MONAI Label server and against a down / hanging / foreign one.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import TINY, make_studies, write_config
from hostile import HostilePeer, valid_weights
from safetensors.torch import load as st_load

from gcml_app.config import SiteConfig, load_config
from gcml_app.federation.payload import our_arch
from gcml_app.rounds.record import provenance
from gcml_app.site.launch import SiteServer, free_port
from gcml_app.store import ModelStore

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "slicer_extension" / "GCMLFederation"))

from GCMLFederationLib import (  # noqa: E402
    FederationClient,
    FederationError,
    Poller,
    active_rows,
    active_text,
    dice_series,
    interactive_text,
    labels_text,
    partner_rows,
    published_how,
    rollback_choices,
    round_rows,
    served_text,
    server_url_from_settings,
    training_text,
    working_text,
)

DATA = Path(__file__).parents[1] / "data"
NOW = 1795700024.8 + 150  # 150 s after the recorded last exchange with site-b


@pytest.fixture
def status():
    return json.loads((DATA / "gcml_status.json").read_text())


@pytest.fixture
def history():
    return json.loads((DATA / "gcml_history.json").read_text())


# ---------------------------------------------------------------- status model on recorded answers
def test_served_text_says_version_how_and_dice(status, history):
    assert served_text(status, history) == (
        "site-a serves v3, published 2026-11-26T13:33:21+0000 by rollback from v4: radiologist prefers v3\n"
        "validation Dice: lesion 0.714, organ 0.916 (mean 0.815, 2 held-out cases)"
    )


@pytest.mark.parametrize("start, line", [
    ({"mode": "init", "bundle": "spleen_ct_segmentation", "bundle_version": "0.5.7"},
     "started from bundle spleen_ct_segmentation 0.5.7"),
    ({"mode": "init", "checkpoint": "site_model.pt"}, "started from checkpoint site_model.pt"),
    ({"mode": "fresh"}, None),
])
def test_served_text_says_which_bundle_the_site_started_from(status, history, start, line):
    lines = served_text({**status, "served": {**status["served"], "start": start}}, history).splitlines()
    assert (lines[1] == line) if line else (len(lines) == 2 and lines[1].startswith("validation Dice"))


def test_served_text_before_any_model_and_when_unvalidated(status):
    assert served_text({"site": "site-x", "served": None}) == (
        "site-x: no model published yet (auto-segmentation answers 'no trained model yet')")
    adopted = {**status, "served": {**status["served"], "validated": False, "val_dice": {},
                                    "produced_by": "adopted:site-b"}}
    assert served_text(adopted, []).endswith("by adopted from site-b (unvalidated)\nnot validated on this site's labels yet")


@pytest.mark.parametrize("produced_by, expected", [
    ("local", "local fine-tune"),
    ("gossip:site-b:dcml_local", "round with site-b (our model after DCML)"),
    ("gossip:site-c:average", "round with site-c (average of both)"),
    ("gossip:site-c:dcml_incoming", "round with site-c (partner model after DCML)"),
    ("adopted:site-b", "adopted from site-b (unvalidated)"),
    ("dcml:average", "DCML round (average of both)"),
    ("", "unknown"),
])
def test_published_how(produced_by, expected):
    assert published_how(produced_by) == expected


@pytest.mark.parametrize("mode, candidate, peer, expected", [
    ("local", "local", None, "local fine-tune"),
    ("dcml", "dcml_local", "site-b", "round with site-b (our model after DCML)"),
    ("dcml", "average", "site-c", "round with site-c (average of both)"),
    ("adopt", "incoming", "site-b", "adopted from site-b (unvalidated)"),
    ("dcml", "average", None, "DCML round (average of both)"),
])
def test_published_how_reads_the_structured_form_that_the_round_writes(mode, candidate, peer, expected):
    """The server's :func:`provenance` gives both forms; the Slicer Lib reads the structured one, and the
    one-line form it falls back on (older servers) reads the same."""
    produced_by, made_by = provenance(mode, candidate, peer)
    assert published_how("something unparseable", made_by=made_by) == expected
    assert published_how(produced_by) == expected


def test_dice_series_has_every_published_version_per_label_and_mean(history):
    s = dice_series(history)
    assert list(s) == ["lesion", "organ", "mean"]
    assert [v for v, _ in s["mean"]] == [1, 2, 3, 4]
    assert s["organ"][2] == (3, pytest.approx(0.91639, abs=1e-4))
    assert s["mean"][3][1] == pytest.approx(0.88201, abs=1e-4)
    assert dice_series([]) == {}


def test_round_rows_newest_first(history):
    rows = round_rows(history, n=3)
    assert rows[0] == {"time": "2026-11-26T13:45:10+0000", "trigger": "sync", "peer": "site-c, site-b",
                       "result": "rejected: site-c: sha256 mismatch: body 5b1c0e9f2a77... vs manifest 124a31c594c6...",
                       "bytes": "-"}
    assert rows[1]["result"] == "kept v4 (best 0.874 <= 0.882)" and rows[1]["peer"] == "site-b"
    assert rows[1]["trigger"] == "scheduler" and rows[1]["bytes"] == "148.3 kB"
    assert rows[2]["result"] == "published v4 (our model after DCML 0.882 > 0.815)" and rows[2]["peer"] == "site-c"
    assert len(round_rows(history)) == 6  # the rollback is not a round


@pytest.mark.parametrize("arm, gain, peer", [
    ("alone", -0.411, "site-b (trained alone; -41.1 Dice points)"),
    ("teacher", -0.02, "site-b (distilled from it; -2.0 Dice points)"),
    ("mutual", 0.013, "site-b (mutual learning; +1.3 Dice points)"),
    (None, None, "site-b"),                                       # a server without dcml.choose
])
def test_a_round_row_names_how_the_partners_model_was_used(history, arm, gain, peer):
    from gcml_app.rounds.record import ARM_WORDS
    from GCMLFederationLib import model

    assert model._ARMS == ARM_WORDS  # the Slicer module's words are the server's
    kept = {**next(r for r in history if r.get("event") == "keep")}
    if arm:
        kept["arm"] = {"arm": arm, "gain": gain, "reason": "..."}
    assert round_rows([kept])[0]["peer"] == peer


def test_a_failed_round_shows_why_beside_the_others(history):
    oom = ("out of GPU memory while train on cuda:0 (bfloat16): lower train.samples_per_case (4), "
           "roi_size ([96, 96, 96]) or train.batch_size (2)")
    failed = {"event": "failed", "outcome": "failed", "phase": "train", "reason": oom, "time": "2026-11-26T14:00:00+0000",
              "trigger": "labels", "round_id": "abc", "version": 4}
    rows = round_rows([*history, failed], n=2)
    assert rows[0]["result"] == f"failed: {oom}" and rows[0]["trigger"] == "labels" and rows[0]["peer"] == "-"
    assert rows[1] == round_rows(history, n=1)[0]


def test_partner_rows(status):
    rows = partner_rows(status, now=NOW)
    assert rows[0] == {"name": "site-b", "reachable": "yes", "last_exchange": "2 min ago", "score": "+0.041",
                       "note": "last pulled v1"}
    assert rows[1] == {"name": "site-c", "reachable": "no", "last_exchange": "2 min ago", "score": "+0.026",
                       "note": "skipped for 95 s more (read timeout after 60 s from http://127.0.0.1:8003)"}


_HEAD = "2 labels submitted since the last training; a round starts at 5"
_PACS = {"url": "http://pacs/dicom-web", "reachable": True, "last_error": None, "cached_series": 7, "skipped": {}}


@pytest.mark.parametrize("pacs,text", [
    (None, _HEAD),
    (_PACS, _HEAD),
    ({**_PACS, "reachable": False, "last_error": "QIDO series: connection failed"},
     _HEAD + "\nPACS unreachable (QIDO series: connection failed): the 7 cached series still work; new series and "
     "label submissions wait until it answers"),
    ({**_PACS, "skipped": {"1.2.3": "mixed orientation", "1.2.4": "SOP class ..."}},
     _HEAD + "\n2 PACS series skipped as unusable (reasons in /gcml/status)"),
], ids=["folder-site", "pacs-up", "pacs-down", "pacs-skipped"])
def test_labels_text_says_when_the_pacs_does_not_answer(status, pacs, text):
    strict = {**status, "validation": {**status["validation"], "strict": True}, "pacs": pacs}
    assert labels_text(strict) == text


def test_labels_and_training_texts(status):
    assert labels_text(status) == (
        "2 labels submitted since the last training; a round starts at 5\n"
        "only 2 held-out validation cases: too few for a strict publish decision (needs 5); "
        "about 13 more labels would make it one")
    strict = {**status, "validation": {**status["validation"], "strict": True}}
    assert labels_text(strict) == "2 labels submitted since the last training; a round starts at 5"
    assert labels_text({"pending_labels": 1, "min_new_labels": 0}) == (
        "1 label submitted since the last training (automatic rounds on new labels are off)")
    assert training_text(status) == ("round running (gossip): epoch 2/5, loss 0.413", 40)
    idle = {"training": {"running": False}, "gossip": {"paused": True}}
    assert training_text(idle) == ("idle; gossip paused (Resume restarts scheduled rounds)", None)
    idle["gossip"] = {"paused": False, "scheduler": True, "next_round_in_s": 1830}
    assert training_text(idle) == ("idle; next scheduled round in 30 min", None)


@pytest.mark.parametrize("working, text", [
    (None, "working model: none yet (the first round starts it)"),
    ({"rounds_unpublished": 0}, "working model: the served model (the last round published it)"),
    ({"rounds_unpublished": 1, "val_dice": {}}, "working model: 1 round of training not yet published; it is served"),
])
def test_working_text(working, text):
    assert working_text({"working": working}).startswith(text)


def test_working_text_of_the_recorded_status(status):
    assert working_text(status) == (
        "working model: 2 rounds of training not yet published, validation mean Dice 0.811; "
        "it is served once it beats the served model on the held-out cases")


def test_rollback_choices_exclude_the_served_version(status, history):
    assert rollback_choices(status, history) == [
        (4, "v4: mean Dice 0.882, round with site-c (our model after DCML)"),
        (2, "v2: mean Dice 0.786, round with site-b (our model after DCML)"),
        (1, "v1: mean Dice 0.650, local fine-tune"),
    ]


def test_server_url_prefers_the_monai_label_module_setting():
    settings = {"MONAILabel/serverUrl": "http://10.1.2.3:8000", "GCMLFederation/serverUrl": "http://x:1"}
    assert server_url_from_settings(settings.get) == "http://10.1.2.3:8000"
    assert server_url_from_settings({"GCMLFederation/serverUrl": "http://x:1 "}.get) == "http://x:1"
    assert server_url_from_settings({}.get) == ""


# ---------------------------------------------------------------- poller
def test_poller_fetches_in_the_background_once_per_interval():
    clock = [0.0]
    gate = threading.Event()
    calls = []

    def fetch():
        calls.append(clock[0])
        gate.wait(5)
        return len(calls)

    p = Poller(fetch, interval_s=5, clock=lambda: clock[0])
    assert p.tick() is True and p.busy
    assert p.tick(force=True) is False  # one fetch at a time
    assert p.take() is None  # nothing finished; take never waits
    gate.set()
    p.wait()
    assert p.take() == (1, None) and p.take() is None
    clock[0] = 4.0
    assert p.tick() is False
    clock[0] = 5.0
    assert p.tick() is True
    p.wait()
    assert p.take() == (2, None)


def test_poller_hands_over_errors():
    def fetch():
        raise FederationError("cannot reach the GCML server at http://x: refused")

    p = Poller(fetch, interval_s=1)
    p.tick()
    p.wait()
    result, error = p.take()
    assert result is None and "cannot reach" in str(error)
    with pytest.raises(ValueError, match="interval_s: found 0; expected a positive number of seconds"):
        Poller(fetch, interval_s=0)


# ---------------------------------------------------------------- client: bad input and bad servers
@pytest.mark.parametrize("url, timeout, message", [
    ("127.0.0.1:8000", 5, r"server URL: found '127.0.0.1:8000'; expected http\(s\)://host:port"),
    ("ftp://host:1", 5, r"server URL: found 'ftp://host:1'"),
    ("", 5, r"server URL: found ''"),
    ("http://host:1", 0, r"timeout: found 0; expected a positive number of seconds"),
])
def test_client_checks_its_arguments(url, timeout, message):
    with pytest.raises(ValueError, match=message):
        FederationClient(url, timeout=timeout)


def test_client_server_down():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(FederationError, match=rf"cannot reach the GCML server at {url}: .*[Cc]onnection refused") as e:
        FederationClient(url, timeout=2).status()
    assert e.value.status is None


def test_client_hanging_server_times_out(tmp_path):
    with HostilePeer(SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path)})) as hang:
        hang.h.mode, hang.h.hang_s = "hang", 5.0
        with pytest.raises(FederationError, match=r"did not answer within 0.5 s"):
            FederationClient(hang.url, timeout=0.5).status()


def test_client_on_a_server_without_the_gcml_app(tmp_path):
    with HostilePeer(SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path)})) as other:
        with pytest.raises(FederationError, match="HTTP 404: no /gcml/status here: is this a MONAI Label server "
                                                  "running the GCML app") as e:
            FederationClient(other.url).status()
        assert e.value.status == 404


def test_client_rollback_checks_the_version():
    client = FederationClient("http://127.0.0.1:1")
    for bad in (0, -3, "2", True, 1.5):
        with pytest.raises(ValueError, match="rollback version: found .*; expected a positive integer"):
            client.rollback(bad)


# ---------------------------------------------------------------- client against a real GCML server
@pytest.mark.slow
def test_client_against_a_real_site(tmp_path):
    studies, _ = make_studies(tmp_path, cases=6, labelled=5)
    probe = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "probe")})
    with HostilePeer(probe, site="site-b") as partner:
        config = write_config(tmp_path, gossip={"peers": [{"name": "site-b", "url": partner.url, "token": "x" * 20}],
                                                "interval_s": 0, "warmup_epochs": 1, "epochs": 1},
                              finetune={"min_new_labels": 3})
        cfg = load_config(config)
        with SiteServer(config, studies, log=tmp_path / "server.log") as server:
            client = FederationClient(server.url, timeout=10)
            status = client.status()
            assert status["site"] == "test-site" and status["served"] is None
            assert [r["name"] for r in partner_rows(status)] == ["site-b"] and partner_rows(status)[0]["reachable"] == "not tried"
            assert labels_text(status) == (
                "0 labels submitted since the last training; a round starts at 3\nonly 0 held-out validation cases: "
                "too few for a strict publish decision (needs 5); about 21 more labels would make it one")
            assert status["validation"] == {"n_train": 0, "n_val": 0, "decision": "margin", "margin": 0.005,
                                            "max_label_drop": 0.02, "strict": False, "strict_cases": 5,
                                            "more_labels_for_strict": 21}
            assert status["working"] is None

            task = client.sync()
            assert set(task) >= {"task_id", "round_id"}
            with pytest.raises(FederationError, match="HTTP 409: a round is already running") as e:
                client.sync()
            assert e.value.status == 409
            deadline = time.monotonic() + 300
            while not [r for r in client.history() if r.get("round_id") == task["round_id"]]:
                assert time.monotonic() < deadline, "the round never recorded a decision"
                time.sleep(1)
            while client.status()["training"]["running"]:
                time.sleep(0.5)
            history = client.history()
            assert history[-1]["stage"] == "warmup" and client.status()["served"]["version"] == 1
            assert round_rows(history)[0]["result"].startswith("published v1 (local model")
            assert served_text(client.status(), history).startswith("test-site serves v1, published ")

            ModelStore(cfg.state_dir / "models").publish(
                st_load(valid_weights(cfg, seed=5)), arch=our_arch(cfg), val_dice={"organ": 0.5, "lesion": 0.5},
                n_train=4, n_val=1, produced_by="local")
            assert client.status()["served"]["version"] == 2
            assert [v for v, _ in rollback_choices(client.status(), client.history())] == [1]
            assert client.rollback(1, reason="from the Slicer module")["version"] == 1
            assert client.status()["served"]["version"] == 1
            assert served_text(client.status(), client.history()).split(" by ")[1].startswith(
                "rollback from v2: from the Slicer module")
            with pytest.raises(FederationError, match=r"HTTP 404: version 9 does not exist; known versions: \[1, 2\]"):
                client.rollback(9)

            assert client.pause() == {"paused": True} and client.status()["gossip"]["paused"] is True
            assert training_text(client.status())[0] == "idle; gossip paused (Resume restarts scheduled rounds)"
            assert client.resume() == {"paused": False} and client.status()["gossip"]["paused"] is False


# ---------------------------------------------------------------- what to label next
ACTIVE = {"served_version": 4, "partners": {"site-c": 1, "site-b": 3}, "unlabelled": 20,
          "disagreement": {"current": 18, "stale": 2, "last_run": {"started": NOW - 180},
                           "top": [{"id": "case_017", "score": 0.8123, "partners": {"site-b": 0.31, "site-c": 0.72}},
                                   {"id": "case_003", "score": 0.4, "partners": {}}]},
          "epistemic": {"current": 0, "stale": 20, "last_run": None}}


@pytest.mark.parametrize("active, rows", [
    (ACTIVE, [{"case": "case_017", "score": "0.812", "partners": "site-c 0.72, site-b 0.31"},
              {"case": "case_003", "score": "0.400", "partners": "none yet (the model's own doubt)"}]),
    ({**ACTIVE, "disagreement": {"current": 0, "stale": 20, "top": []}}, []),
    (None, []),  # a server from before active learning
])
def test_active_rows_list_the_top_cases_with_the_partners_that_disagree_most_first(active, rows):
    assert active_rows({"active": active} if active else {}) == rows


@pytest.mark.parametrize("active, lines", [
    (ACTIVE, ["scores from v4 and site-b v3, site-c v1",
              "disagreement: 18 of 20 unlabelled cases scored, 2 waiting; last run 3 min ago",
              "epistemic: 0 of 20 unlabelled cases scored, 20 waiting; last run never"]),
    ({**ACTIVE, "served_version": None, "partners": {}}, ["no model served yet: Next Sample picks at random"]),
    ({**ACTIVE, "partners": {}}, ["scores from v4 and no partner model yet"]),
    (None, ["this server does not rank cases for labelling (GCML app before active learning)"]),
])
def test_active_text_says_how_current_the_scores_are(active, lines):
    text = active_text({"active": active} if active else {}, now=NOW).splitlines()
    assert text[:len(lines)] == lines


@pytest.mark.parametrize("interactive, expected", [
    (None, "click to correct: off (interactive.enabled in the site YAML turns on gcml_edit)"),
    ({"enabled": True, "gate_clicks": 3}, "click to correct: on (gcml_edit); no round has scored clicks yet"),
    ({"enabled": True, "gate_clicks": 3, "last_round": {"winner": "local", "zero_click_dice": {"served": 0.8, "local": 0.85},
                                                          "click_dice": {"clicks": 3, "served": 0.86, "local": 0.9}}},
     "click to correct: on (gcml_edit); the served model's validation mean Dice 0.800 with no click, 0.860 after 3 "
     "simulated clicks"),
    ({"enabled": True, "gate_clicks": 3, "last_round": {"winner": "local", "zero_click_dice": {"local": 0.5},
                                                          "click_dice": {"clicks": 3, "local": 0.6}}},
     "click to correct: on (gcml_edit); the local model's validation mean Dice 0.500 with no click, 0.600 after 3 "
     "simulated clicks"),
])
def test_interactive_text(interactive, expected):
    assert interactive_text({"interactive": interactive} if interactive else {}) == expected
