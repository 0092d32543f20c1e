"""Active-learning scores on a real datastore and model store: what is scored, when a score is stale,
and what the ``disagreement`` strategy hands out. The server path (the watcher, ``/info``, Slicer's
``next_sample``) is in ``test_active_server.py``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import pytest
import torch
from helpers import make_studies, write_config
from safetensors.torch import save_file

from gcml_app.config import load_config
from gcml_app.federation.peers import PeerBook
from gcml_app.federation.state import GossipState
from gcml_app.ml.network import arch_fingerprint, build_network
from gcml_app.site.datastore import GCMLDatastore
from gcml_app.site.scorebook import DISAGREEMENT_KEY, EPISTEMIC_KEY, ScoreBook, candidates, committee
from gcml_app.site.scoring import DisagreementScoring, DisagreementStrategy, EpistemicScoring
from gcml_app.store import ModelStore

PARTNERS = ["site-b", "site-c"]


class Site:
    """A site folder: 6 images (3 labelled), a served model and two cached partner models."""

    def __init__(self, root, **active):
        self.studies, _ = make_studies(root, cases=6, labelled=3)
        for i, p in enumerate(sorted(self.studies.glob("case_*.nii.gz"))):  # case_005 is the newest file
            os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
        peers = [{"name": n, "url": f"http://127.0.0.1:{9000 + i}", "token": "t" * 24} for i, n in enumerate(PARTNERS)]
        self.cfg = load_config(write_config(root, gossip={"peers": peers}, active=active))
        self.store = ModelStore(self.cfg.state_dir / "models")
        self.state = GossipState(self.cfg.state_dir)
        self.publish(0)
        for i, n in enumerate(PARTNERS):
            self.cache_partner(n, seed=10 + i, version=1)
        self.ds = GCMLDatastore(str(self.studies), labels=self.cfg.labels, auto_reload=False)
        self.ds.show_scores(ScoreBook(self.cfg.state_dir), lambda: committee(self.cfg, self.store))
        self.unlabelled = sorted(self.ds.get_unlabeled_images())
        self.labelled = sorted(self.ds.get_labeled_images())

    def weights(self, seed):
        torch.manual_seed(seed)
        return build_network(self.cfg).state_dict()

    def publish(self, seed):
        sd = self.weights(seed)
        return self.store.publish(sd, arch=arch_fingerprint(self.cfg, sd), val_dice={"organ": 0.5, "lesion": 0.5},
                                  n_train=3, n_val=1, produced_by="test")

    def cache_partner(self, name, seed, version):
        path = self.state.cached_model(name)
        save_file(self.weights(seed), str(path))
        book = PeerBook.open(self.state.peers_path)
        book.pulled(name, hashlib.sha256(path.read_bytes()).hexdigest(), version, name, path.stat().st_size)
        book.save()

    def score(self, method="disagreement", **request):
        task = (DisagreementScoring if method == "disagreement" else EpistemicScoring)(self.cfg, self.store)
        return task(request, self.ds)

    def next_sample(self):
        return DisagreementStrategy(self.cfg, self.store)({"strategy": "disagreement"}, self.ds)


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path)


def test_scores_are_written_for_unlabelled_images_only_with_the_models_they_came_from(site):
    run = site.score()
    assert run["scored"] == 3 and run["failed"] == 0 and run["partners"] == PARTNERS
    for i in site.unlabelled:
        d = site.ds.get_image_info(i)[DISAGREEMENT_KEY]  # the datastore's image info, as a strategy reads it
        assert set(d["partners"]) == set(PARTNERS) and all(0 <= v <= 1 for v in d["partners"].values())
        assert d["served_version"] == 1 and d["partner_versions"] == {"site-b": 1, "site-c": 1}
        assert d["competence"] == {"site-b": 1.0, "site-c": 1.0}  # no validation case yet: every partner counts
        assert d["score"] == pytest.approx(sum(d["partners"].values()) / 2 + d["entropy"], abs=1e-5)
    for i in site.labelled:
        assert DISAGREEMENT_KEY not in site.ds.get_image_info(i)
    assert set(ScoreBook(site.cfg.state_dir).read()["images"]) == set(site.unlabelled)

    run = site.score("epistemic")
    assert run["scored"] == 3
    info = site.ds.get_image_info(site.unlabelled[0])
    assert info[EPISTEMIC_KEY] > 0 and info["epistemic_ts"] == 1  # MONAI Label's Epistemic strategy reads these


def test_a_second_run_skips_current_scores(site):
    site.score()
    again = site.score()
    assert again["scored"] == 0 and again["skipped_current"] == 3 and again["reason"] == "every score is current"


@pytest.mark.parametrize("change", ["served", "partner"])
def test_scores_are_invalidated_when_the_served_or_a_partner_model_changes(site, change):
    site.score()
    site.score("epistemic")
    before = {i: site.ds.get_image_info(i)[DISAGREEMENT_KEY]["score"] for i in site.unlabelled}
    if change == "served":
        site.publish(1)
    else:
        site.cache_partner("site-c", seed=99, version=2)
    time.sleep(1.1)  # the datastore reads the committee at most once a second
    for i in site.unlabelled:
        info = site.ds.get_image_info(i)
        assert DISAGREEMENT_KEY not in info  # a stale score is never shown ...
        assert (EPISTEMIC_KEY in info) == (change == "partner")  # ... epistemic rests on the served model alone
    res = site.next_sample()  # ... nor used
    assert res["gcml_fallback"].startswith("random") and res["id"] in site.unlabelled
    run = site.score()
    assert run["scored"] == 3  # scored again from the new models
    after = {i: site.ds.get_image_info(i)[DISAGREEMENT_KEY] for i in site.unlabelled}
    assert {i: a["score"] for i, a in after.items()} != before
    if change == "partner":
        assert all(a["partner_versions"]["site-c"] == 2 for a in after.values())
    else:
        assert all(a["served_version"] == 2 for a in after.values())


def test_a_run_scores_at_most_max_images_newest_first_and_the_next_run_goes_on(tmp_path):
    site = Site(tmp_path, max_images=2)
    assert [i for i, _ in candidates(site.ds)] == ["case_005", "case_004", "case_003"]
    assert site.score()["scored"] == 2
    assert set(ScoreBook(site.cfg.state_dir).read()["images"]) == {"case_005", "case_004"}
    run = site.score()
    assert run["scored"] == 1 and run["skipped_current"] == 2


def test_the_strategy_hands_out_the_highest_score_then_the_next_one_while_it_is_reserved(tmp_path):
    site = Site(tmp_path, selection="top")
    site.score()
    scores = {i: site.ds.get_image_info(i)[DISAGREEMENT_KEY]["score"] for i in site.unlabelled}
    order = sorted(scores, key=lambda i: -scores[i])
    first = site.next_sample()
    assert first["id"] == order[0] and first[DISAGREEMENT_KEY]["score"] == scores[order[0]]
    assert set(first[DISAGREEMENT_KEY]["partners"]) == set(PARTNERS)
    # what MONAI Label's /activelearning endpoint records for the case it handed out
    site.ds.update_image_info(first["id"], {"strategy": {"disagreement": {"ts": int(time.time())}}})
    assert site.next_sample()["id"] == order[1]


def test_ties_are_broken_at_random(tmp_path):
    site = Site(tmp_path, selection="top")
    book = ScoreBook(site.cfg.state_dir)
    key = committee(site.cfg, site.store).key("disagreement")
    with book.edit() as b:
        for i in site.unlabelled:
            b["images"][i] = {"disagreement": {"score": 0.5, "key": key}}
    picks = {site.next_sample()["id"] for _ in range(60)}
    assert picks == set(site.unlabelled)


def test_no_unlabelled_image_gives_no_sample(tmp_path):
    site = Site(tmp_path)
    for i in site.unlabelled:
        label = site.studies / "labels" / "final" / f"{site.labelled[0]}.nii.gz"
        site.ds.save_label(i, str(label), "final", {})
    assert site.next_sample() is None


def test_a_corrupt_partner_file_is_left_out_and_the_others_still_score(site):
    site.state.cached_model("site-b").write_bytes(b"not safetensors at all")
    run = site.score()
    assert run["scored"] == 3 and "site-b" in run["partners_left_out"]
    d = site.ds.get_image_info(site.unlabelled[0])[DISAGREEMENT_KEY]
    assert set(d["partners"]) == {"site-c"}


def test_an_unreadable_image_is_recorded_and_not_retried_until_the_models_change(site):
    (site.studies / f"{site.unlabelled[0]}.nii.gz").write_bytes(b"\x1f\x8b broken gzip")
    run = site.score()
    assert run["scored"] == 2 and run["failed"] == 1
    rec = ScoreBook(site.cfg.state_dir).read()["images"][site.unlabelled[0]]["disagreement"]
    assert "error" in rec and "score" not in rec
    assert site.score()["failed"] == 0  # not retried against the same models
    assert DISAGREEMENT_KEY not in site.ds.get_image_info(site.unlabelled[0])


def test_an_image_labelled_since_loses_its_score_at_the_next_run(site):
    site.score()
    gone = site.unlabelled[0]
    site.ds.save_label(gone, str(site.studies / "labels" / "final" / f"{site.labelled[0]}.nii.gz"), "final", {})
    site.score()
    assert gone not in ScoreBook(site.cfg.state_dir).read()["images"]


def test_a_malformed_score_file_is_read_as_empty_and_rewritten_whole(site, caplog):
    book = ScoreBook(site.cfg.state_dir)
    book.path.write_text("{ torn")
    with caplog.at_level(logging.WARNING):
        assert book.read() == {"images": {}, "runs": {}, "competence": {}}
    assert "unreadable" in caplog.text
    assert site.score()["scored"] == 3
    assert set(ScoreBook(site.cfg.state_dir).read()["images"]) == set(site.unlabelled)


def test_nothing_is_scored_before_a_model_is_served(tmp_path):
    site = Site(tmp_path)
    (site.store.root / "served.json").unlink()
    run = site.score()
    assert run["scored"] == 0 and run["reason"] == "no served model yet"


def test_each_partner_counts_as_much_as_it_segments_the_validation_cases_computed_once_per_model(site):
    split = {i: "val" for i in site.labelled[:2]} | {site.labelled[2]: "train"}
    (site.cfg.state_dir / "split.json").write_text(json.dumps(split))
    site.score()
    comp = ScoreBook(site.cfg.state_dir).read()["competence"]
    assert set(comp) == set(PARTNERS) and all(c["n_val"] == 2 and 0.0 <= c["dice"] <= 1.0 for c in comp.values())
    for i in site.unlabelled:
        d = site.ds.get_image_info(i)[DISAGREEMENT_KEY]
        assert d["competence"] == {n: comp[n]["dice"] for n in PARTNERS}
        weighted = sum(d["competence"][n] * d["partners"][n] for n in PARTNERS) / 2
        assert d["score"] == pytest.approx(weighted + d["entropy"], abs=1e-5)
    site.cache_partner("site-c", seed=99, version=2)  # a new partner model is judged again; the other is not
    site.score()
    again = ScoreBook(site.cfg.state_dir).read()["competence"]
    assert again["site-b"] == comp["site-b"] and again["site-c"]["key"] != comp["site-c"]["key"]


def test_proportional_selection_hands_out_cases_in_proportion_to_their_scores(tmp_path):
    site = Site(tmp_path, selection="proportional")
    key = committee(site.cfg, site.store).key("disagreement")
    with ScoreBook(site.cfg.state_dir).edit() as b:
        for i, score in zip(site.unlabelled, (0.0, 1.0, 3.0)):
            b["images"][i] = {"disagreement": {"score": score, "key": key}}
    picks = [site.next_sample()["id"] for _ in range(800)]
    assert site.unlabelled[0] not in picks
    assert abs(picks.count(site.unlabelled[2]) / 800 - 0.75) < 0.06


@pytest.mark.parametrize("bad", ["20", -1, 2.5, True, [3]])
def test_a_malformed_max_images_is_refused_with_a_message_and_nothing_is_scored(site, bad):
    with pytest.raises(ValueError, match="'max_images': found .*expected a positive integer"):
        site.score(max_images=bad)
    assert ScoreBook(site.cfg.state_dir).read()["images"] == {}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["disagreement", "epistemic"])
def test_a_run_on_two_ranks_splits_the_images_and_scores_what_one_process_scores(site, method):
    split = {i: "val" for i in site.labelled[:2]} | {site.labelled[2]: "train"}
    (site.cfg.state_dir / "split.json").write_text(json.dumps(split))  # disagreement weighs partners by competence
    one = site.score(method)
    book = ScoreBook(site.cfg.state_dir)
    before = {i: s[method] for i, s in book.read()["images"].items()}
    book.path.unlink()  # everything stale again
    site.cfg = site.cfg.model_copy(update={"train": site.cfg.train.model_copy(
        update={"gpus": [0, 1], "device": "cpu", "samples_per_case": 2, "num_threads": 1})})
    two = site.score(method)
    assert (two["scored"], two["failed"], two["ranks"]["world"], two["ranks"]["backend"]) == (3, 0, 2, "gloo")
    assert one["scored"] == 3
    after = {i: s[method] for i, s in ScoreBook(site.cfg.state_dir).read()["images"].items()}
    assert set(after) == set(before) == set(site.unlabelled)  # every image scored, by one rank or the other
    assert all(after[i]["score"] > 0 and after[i]["served_version"] == 1 for i in site.unlabelled)
    if method == "disagreement":  # deterministic (epistemic draws its dropout masks at random, in any process)
        assert [after[i]["score"] for i in site.unlabelled] == pytest.approx(
            [before[i]["score"] for i in site.unlabelled], abs=1e-5)
        assert all(after[i]["competence"] == before[i]["competence"] for i in site.unlabelled)
