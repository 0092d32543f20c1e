"""``gcml simulate --active``: what each strategy labels, the summary's arithmetic, and a tiny real run."""

from __future__ import annotations

import json
import random

import pytest

from gcml_app.cli import main
from gcml_app.sim.active import choose, labels_to_reach, summarize_active
from gcml_app.sim.data import MIX_EVERY, scenario_sites


@pytest.mark.parametrize("strategy, scores, expected", [
    ("disagreement", {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}, ["b", "d"]),
    ("epistemic", {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.0}, ["a", "c"]),
    ("disagreement", {"a": 0.5, "b": 0.5, "c": 0.1, "d": 0.9}, None),  # d, then one of the tied a and b
])
def test_choose_takes_the_top_scores(strategy, scores, expected):
    got = choose(strategy, list(scores), 2, random.Random(0), scores)
    if expected is None:
        assert got[0] == "d" and got[1] in {"a", "b"}
    else:
        assert got == expected


def test_proportional_selection_draws_in_proportion_to_the_scores_without_repeats():
    rng = random.Random(0)
    scores = {"a": 0.0, "b": 1.0, "c": 3.0}
    firsts = [choose("disagreement", list(scores), 1, rng, scores, "proportional")[0] for _ in range(4000)]
    assert "a" not in firsts and abs(firsts.count("c") / 4000 - 0.75) < 0.03
    both = choose("disagreement", list(scores), 3, rng, scores, "proportional")
    assert sorted(both) == ["a", "b", "c"]  # a score of 0 is drawn once nothing else is left
    assert choose("disagreement", list("xyz"), 2, rng, dict.fromkeys("xyz", 0.0), "proportional") != []


def test_choose_at_random_draws_from_the_pool_without_repeats():
    rng = random.Random(1)
    got = choose("random", list("abcdef"), 3, rng)
    assert len(set(got)) == 3 and set(got) <= set("abcdef")
    assert choose("random", ["a"], 3, rng) == ["a"]  # a pool smaller than k: all of it


@pytest.mark.parametrize("curve, target, expected", [
    ([(2, 0.5), (4, 0.7), (6, 0.8)], 0.75, 5.0),
    ([(2, 0.5), (4, 0.7), (6, 0.8)], 0.5, 2.0),
    ([(2, 0.5), (4, 0.7), (6, 0.8)], 0.8, 6.0),
    ([(2, 0.5), (4, 0.7), (6, 0.8)], 0.9, None),  # never reached
    ([(2, 0.5), (4, 0.9), (6, 0.8)], 0.85, 3.75),  # the first crossing
])
def test_labels_to_reach(curve, target, expected):
    assert labels_to_reach(curve, target) == (None if expected is None else pytest.approx(expected))


def _rows(strategy, dice_by_round_and_seed, site="s"):
    return [{"seed": seed, "strategy": strategy, "round": r, "site": site, "labels": 2 + 2 * r, "test_mean": d,
             "scoring_s": 0.0}
            for r, per_seed in enumerate(dice_by_round_and_seed) for seed, d in enumerate(per_seed)]


def test_the_summary_gives_labels_to_reach_random_and_the_worst_shortfall_in_seed_std():
    rows = (_rows("random", [[0.5, 0.5], [0.6, 0.7], [0.8, 0.8]])
            + _rows("disagreement", [[0.5, 0.5], [0.7, 0.8], [0.8, 0.9]]))
    s = summarize_active(rows, ["random", "disagreement"], ["s"], 2)
    assert s["labels"] == [2, 4, 6] and s["random"]["mean"] == [0.5, 0.65, 0.8]
    assert s["random"]["labels_to_reach_random_final"] == 6.0 and s["random"]["label_fraction_of_random"] == 1.0
    # disagreement: 0.75 at 4 labels, 0.85 at 6; random's final 0.8 is reached half way: 5 labels
    assert s["disagreement"]["labels_to_reach_random_final"] == pytest.approx(5.0)
    assert s["disagreement"]["label_fraction_of_random"] == pytest.approx(5 / 6, abs=1e-3)
    assert s["disagreement"]["never_below_random_by_one_std"] is True
    worse = summarize_active(_rows("random", [[0.5, 0.5], [0.7, 0.8], [0.8, 0.8]])
                             + _rows("disagreement", [[0.5, 0.5], [0.5, 0.6], [0.8, 0.8]]),
                             ["random", "disagreement"], ["s"], 2)
    # at 4 labels: 0.55 against 0.75, pooled seed-std 0.0707: -2.83 std
    assert worse["disagreement"]["worst_vs_random_in_std"]["s"] == pytest.approx(-2.828, abs=1e-3)
    assert worse["disagreement"]["never_below_random_by_one_std"] is False


def test_mixed_scanners_sites_hold_one_case_in_four_from_a_partners_scanner(tmp_path):
    import SimpleITK as sitk

    sites = scenario_sites(tmp_path, "mixed-scanners", seed=0, train=8)
    assert [s.name for s in sites] == ["site-s1", "site-s2", "site-t2", "site-ct"]
    ct = sites[3]
    cases = ct.train + ct.val + ct.test
    spacing = [sitk.ReadImage(c["image"]).GetSpacing()[2] for c in cases]  # ct's z is 2.0 mm, s2's 1.5 mm
    assert [k for k, z in enumerate(spacing) if z != 2.0] == [k for k in range(len(cases)) if k % MIX_EVERY == 3]


@pytest.mark.slow
def test_simulate_active_labels_k_cases_a_round_for_every_strategy(tmp_path, capsys):
    out = tmp_path / "act"
    rc = main(["simulate", "--active", "--scenario", "semantic-shift", "--seeds", "1", "--rounds", "2", "--k", "1",
               "--epochs", "1", "--warmup-epochs", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "active.json").read_text())
    assert (out / "active.png").stat().st_size > 0 and (out / "active.csv").is_file()
    assert res["config"]["pool"] == {"site-a": 4, "site-b": 4, "site-c": 4}  # --pool 0: 2 k rounds
    rows = res["rows"]
    assert len(rows) == 3 * 3 * 3  # strategies x rounds 0-2 x sites
    assert {(r["round"], r["labels"]) for r in rows} == {(0, 2), (1, 3), (2, 4)}
    for strategy in ("random", "epistemic", "disagreement"):
        for site in ("site-a", "site-b", "site-c"):
            split = json.loads((out / "runs" / "seed0" / strategy / site / "split.json").read_text())
            pool_ids = {c for c, v in split.items() if v == "train"}
            assert len(pool_ids) == 4  # the 2 it started with and 1 labelled in each round, all for training
            assert sum(v == "val" for v in split.values()) == 3  # validation never changes
        # round 0 is the shared warm-up: every strategy starts from the same served models
        assert [r["test_mean"] for r in rows if r["strategy"] == strategy and r["round"] == 0] == \
            [r["test_mean"] for r in rows if r["strategy"] == "random" and r["round"] == 0]
    printed = capsys.readouterr().out
    assert "to reach random's final" in printed and "disagreement" in printed
