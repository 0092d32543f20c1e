"""dcml.choose: how a DCML round uses the partner's model, chosen from its Dice on the site's own validation cases;
every arm at local2x's compute."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import cases_of
from safetensors.torch import save_file

from gcml_app.config import DCMLConfig, ValidationConfig
from gcml_app.ml.dcml import FORWARD_COST
from gcml_app.ml.network import build_network
from gcml_app.rounds.loop import run_round
from gcml_app.rounds.producers import DCML, choose_arm
from gcml_app.store import ModelStore

SERVED = [0.80, 0.75, 0.85, 0.70, 0.78, 0.82]


def _cases(offsets):
    return [{"organ": s + o, "lesion": s + o} for s, o in zip(SERVED, offsets)]


MUCH_WORSE = [-0.40, -0.35, -0.45, -0.38, -0.42, -0.36]
A_LITTLE_WORSE = [-0.012, -0.008, -0.010, -0.011, -0.009, -0.010]
SIMILAR = [-0.03, 0.02, -0.01, 0.03, -0.02, 0.01]
BETTER = [0.05, 0.04, 0.06, 0.05, 0.03, 0.07]
SIMILAR_BELOW = [-0.03, 0.02, -0.02, 0.03, -0.02, 0.01]  # mean -0.0017: worse in the mean, not shown worse

CHOICES = [
    # (the partner's Dice per case minus the served model's, dcml.shown_worse, the arm, words of its reason);
    # dcml.mutual_bar: bound (the default) here, mean in MEAN_BAR below
    (MUCH_WORSE, "teacher", "alone", "worse by more than max_label_drop 0.02, the site trains alone"),
    (A_LITTLE_WORSE, "teacher", "teacher", "shown worse, the partner only teaches"),
    (SIMILAR, "teacher", "mutual", "not shown worse"),
    (BETTER, "teacher", "mutual", "not shown worse"),
    ([-0.40], "teacher", "mutual", "over 1 cases: not shown worse"),  # one case: no spread, no evidence
    (MUCH_WORSE, "alone", "alone", "shown worse, the site trains alone"),
    (A_LITTLE_WORSE, "alone", "alone", "shown worse, the site trains alone"),  # never a teacher
    (SIMILAR, "alone", "mutual", "not shown worse"),
    (BETTER, "alone", "mutual", "not shown worse"),
]

MEAN_BAR = [
    # (offsets, dcml.mutual_bar, dcml.shown_worse, the arm, words of its reason): with the mean bar a partner
    # worse in the mean, shown or not, no longer learns mutually
    (MUCH_WORSE, "mean", "teacher", "alone", "worse by more than max_label_drop 0.02, the site trains alone"),
    (A_LITTLE_WORSE, "mean", "teacher", "teacher", "worse in the mean, the partner only teaches"),
    (SIMILAR_BELOW, "bound", "teacher", "mutual", "not shown worse"),  # the default bar, for contrast
    (SIMILAR_BELOW, "mean", "teacher", "teacher", "worse in the mean, the partner only teaches"),
    (BETTER, "mean", "teacher", "mutual", "at least as good, both models train"),
    ([-0.40], "mean", "teacher", "teacher", "over 1 cases: worse in the mean, the partner only teaches"),  # se inf
    (SIMILAR_BELOW, "mean", "alone", "alone", "worse in the mean, the site trains alone"),
    (BETTER, "mean", "alone", "mutual", "at least as good, both models train"),
]


@pytest.mark.parametrize("offsets, shown_worse, arm, why", CHOICES, ids=[
    "much-worse", "a-little-worse", "similar", "better", "one-case",
    "alone-much-worse", "alone-a-little-worse", "alone-similar", "alone-better"])
def test_the_arm_follows_the_partners_paired_dice_and_its_spread(offsets, shown_worse, arm, why):
    choice = choose_arm(_cases(offsets), _cases([0.0] * len(offsets)), ValidationConfig(),
                        DCMLConfig(shown_worse=shown_worse))
    assert choice.arm == arm and why in choice.why
    assert choice.gain == pytest.approx(sum(offsets) / len(offsets)) and choice.cases == len(offsets)


@pytest.mark.parametrize("offsets, bar, shown_worse, arm, why", MEAN_BAR, ids=[
    "much-worse", "a-little-worse", "similar-below-bound-bar", "similar-below", "better", "one-case",
    "alone-similar-below", "alone-better"])
def test_with_the_mean_bar_only_a_partner_at_least_as_good_learns_mutually(offsets, bar, shown_worse, arm, why):
    choice = choose_arm(_cases(offsets), _cases([0.0] * len(offsets)), ValidationConfig(),
                        DCMLConfig(shown_worse=shown_worse, mutual_bar=bar))
    assert choice.arm == arm and why in choice.why


SPREAD_WORSE = [-0.06, 0.01, -0.03, -0.02]  # 4 cases, mean -0.025, se 0.014
SPREAD_FAR = [-0.11, -0.01, -0.07, -0.05]  # 4 cases, mean -0.06, se 0.021

INTERVALS = [
    # (offsets, dcml.interval, the arm, the upper bound): q = 1.645 (normal) or 2.353 (t, 3 degrees of freedom)
    (SPREAD_WORSE, "normal", "teacher", -0.0013),
    (SPREAD_WORSE, "student", "mutual", +0.0090),
    (SPREAD_FAR, "normal", "alone", -0.0258),
    (SPREAD_FAR, "student", "teacher", -0.0110),
]


@pytest.mark.parametrize("offsets, interval, arm, upper", INTERVALS, ids=[
    "worse-normal", "worse-student", "far-normal", "far-student"])
def test_students_t_widens_the_interval_that_four_cases_give(offsets, interval, arm, upper):
    choice = choose_arm(_cases(offsets), _cases([0.0] * len(offsets)), ValidationConfig(),
                        DCMLConfig(interval=interval))
    assert choice.arm == arm and choice.upper == pytest.approx(upper, abs=2e-4)
    assert ("(Student's t)" in choice.why) == (interval == "student")


@pytest.mark.parametrize("arm", ["mutual", "teacher", "alone"])
def test_every_arm_spends_local2xs_image_passes(cfg, arm):
    epochs, batches = 4, 6  # the round's loader at DCML's batch (half of train.batch_size)
    dcml = DCML({}, "0" * 64)
    b = dcml.batch_size(cfg)
    local2x = 2 * epochs * batches * b  # local2x's one model: twice the epochs over the same images
    if arm == "alone":
        passes = 2 * epochs * batches * b  # Alone: the working model, twice the epochs
    else:
        choice = choose_arm(_cases([0.0] * 6 if arm == "mutual" else [-0.01] * 5 + [-0.011]),
                            _cases([0.0] * 6), ValidationConfig())
        assert choice.arm == arm
        producer = dcml.for_arm(choice)
        per_step = b * (1 + (1.0 if arm == "mutual" else FORWARD_COST))
        passes = producer.steps(cfg, epochs, batches, False) * per_step
    assert passes == pytest.approx(local2x, rel=0.05)


def test_the_alone_arm_trains_in_local2xs_batch_not_dcmls_half(cfg):
    from monai.data import ThreadDataLoader

    from gcml_app.rounds.compute import _Data
    from gcml_app.rounds.producers import Alone

    crops = list(range(12))
    dcml = DCML({}, "0" * 64)
    data = _Data(cfg, None, ThreadDataLoader(crops, batch_size=dcml.batch_size(cfg)), torch.device("cpu"), None, {})
    choice = choose_arm(_cases([-0.4] * 6), _cases([0.0] * 6), ValidationConfig())
    assert data.loader_for(dcml) is data.loader  # mutual: the prepared loader as it is
    alone = data.loader_for(dcml.for_arm(choice))
    assert isinstance(dcml.for_arm(choice), Alone) and dcml.batch_size(cfg) < cfg.train.batch_size
    assert alone.batch_size == cfg.train.batch_size and sorted(x for b in alone for x in b.tolist()) == crops


def _partner(cfg, state):
    path = cfg.state_dir / "peers" / "peer.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.slow
def test_a_round_trains_alone_beside_a_far_worse_partner_and_mutually_with_an_equal_one(tmp_path, studies):
    from helpers import write_config

    from gcml_app.config import load_config

    cfg = load_config(write_config(tmp_path / "site", dcml={"choose": True}))
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    run_round(cfg, store, cases, epochs=3)

    torch.manual_seed(11)  # an untrained network: far worse on our cases
    rec = run_round(cfg, store, cases, epochs=1, incoming=_partner(cfg, build_network(cfg).state_dict()))
    assert rec["arm"]["arm"] == "alone" and rec["arm"]["scored_cases"] == 2, rec["arm"]
    assert set(rec["per_case"]) == {"served", "local"} and len(rec["losses"]) == 2  # twice the epochs, alone
    assert rec["incoming"]["sha256"]  # the partner is on record, measured
    if rec["published"]:
        assert store.served().made_by["peer"] is None  # and no parent of the published model

    rec = run_round(cfg, store, cases, epochs=1, incoming=_partner(cfg, store.load(store.served_version())))
    assert rec["arm"]["arm"] == "mutual" and rec["arm"]["gain"] == 0.0  # our own model: not shown worse
    assert set(rec["per_case"]) == {"served", "dcml_local", "dcml_incoming", "average"}


def test_with_the_rule_off_a_dcml_round_records_no_arm(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    run_round(cfg, store, cases, epochs=1)
    rec = run_round(cfg, store, cases, epochs=1, incoming=_partner(cfg, build_network(cfg).state_dict()))
    assert "arm" not in rec and rec["mode"] == "dcml"


@pytest.mark.parametrize("arm, words", [("mutual", "mutual learning"), ("teacher", "distilled from it"),
                                        ("alone", "trained alone")])
@pytest.mark.parametrize("event, start", [("publish", "published v3: "), ("keep", "kept v2: ")])
def test_the_round_line_names_the_arm_and_the_partners_gap(arm, words, event, start):
    """What ``gcml sync`` and the demo print: how the partner's model was used, and why (its measured gap)."""
    from gcml_app.rounds import summarize

    rec = {"event": event, "published": event == "publish", "version": 3 if event == "publish" else 2,
           "winner": "local", "mean": {"served": 0.8, "local": 0.85},
           "gossip": {"peer": "site-b", "peer_version": 4, "attempts": []},
           "arm": {"arm": arm, "gain": -0.124, "se": 0.02, "upper": -0.09, "scored_cases": 4, "why": "..."}}
    line = summarize(rec)
    assert line.startswith(start + f"gossip with site-b v4 ({words}; partner -12.4 Dice points on our cases), ")


def _site_and_twin(tmp_path, studies, epochs, dcml, twin_dcml):
    """A tiny site after one round of ``epochs``, and a copy of it (state folder and all) with ``twin_dcml``."""
    from helpers import write_config

    from gcml_app.config import load_config

    cfg = load_config(write_config(tmp_path / "site", dcml=dcml))
    cases = cases_of(studies[0])
    run_round(cfg, ModelStore(cfg.state_dir / "models"), cases, epochs=epochs)
    shutil.copytree(tmp_path / "site", tmp_path / "twin")
    return cfg, load_config(write_config(tmp_path / "twin", dcml=twin_dcml)), cases


@pytest.mark.slow
def test_a_round_alone_is_exactly_local2xs_round_from_the_same_start_and_seed(tmp_path, studies):
    # The choice only looks (the partner's Dice on our cases): it draws nothing, so a site whose partners bring
    # nothing trains exactly as it would alone at the same compute, and a comparison with local2x is paired.
    cfg, twin, cases = _site_and_twin(tmp_path, studies, 3, {"choose": True}, {"choose": True})
    torch.manual_seed(11)  # an untrained network: far worse on our cases
    far = _partner(twin, build_network(twin).state_dict())

    alone = run_round(twin, ModelStore(twin.state_dir / "models"), cases, epochs=1, incoming=far, seed=77)
    local2x = run_round(cfg, ModelStore(cfg.state_dir / "models"), cases, epochs=2, seed=77)
    assert alone["arm"]["arm"] == "alone"
    assert alone["losses"] == local2x["losses"] and alone["per_case"] == local2x["per_case"]


@pytest.mark.slow
def test_a_partner_model_better_on_our_cases_is_a_candidate_as_pulled_and_served_unchanged(tmp_path, studies,
                                                                                           monkeypatch):
    from gcml_app.rounds.producers import Produced

    # a weak served model; its twin is the partner
    cfg, twin, cases = _site_and_twin(tmp_path, studies, 1, {"choose": True, "pulled_candidate": True}, {})
    store = ModelStore(cfg.state_dir / "models")
    run_round(twin, ModelStore(twin.state_dir / "models"), cases, epochs=12)  # the partner trains longer
    strong = ModelStore(twin.state_dir / "models").working()[0]
    # the round's training makes nothing better than what it starts from: only the pulled model can win
    monkeypatch.setattr(DCML, "produce", lambda self, inputs: Produced("dcml", {
        "dcml_local": {k: v.clone() for k, v in inputs.model.state_dict().items()}}, "dcml_local", [],
        self.choice.as_record()))

    rec = run_round(cfg, store, cases, epochs=1, incoming=_partner(cfg, strong),
                    origin={"peer": "site-b", "peer_version": 7})
    assert rec["arm"]["arm"] == "mutual" and rec["arm"]["gain"] > 0.005, rec["arm"]
    partner_mean = [sum(c.values()) / len(c) for c in rec["per_case"]["pulled"]]
    served_mean = [sum(c.values()) / len(c) for c in rec["per_case"]["served"]]
    assert sum(partner_mean) / len(partner_mean) - sum(served_mean) / len(served_mean) == pytest.approx(
        rec["arm"]["gain"], abs=1e-5)  # the choice's scores are the candidate's
    assert rec["winner"] == "pulled" and rec["published"], rec["reason"]
    man = store.served()
    assert man.made_by == {"mode": "adopt", "candidate": "pulled", "peer": "site-b"}
    assert man.produced_by == "adopted:site-b" and man.lineage[0]["peer"] == "site-b"
    served = store.load(man.version)
    assert all(torch.equal(served[k], strong[k]) for k in strong)  # unchanged: the partner's weights
