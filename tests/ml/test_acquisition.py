"""The active-learning scores: committee disagreement and MC-dropout entropy, on hand-made predictions."""

from __future__ import annotations

import math

import pytest
import torch

from gcml_app.ml.acquisition import (competence, disagreement, epistemic_entropy, mc_dropout, pair_disagreement, served_entropy,
                                     soft_predict)


def probs(*channels: list[float]) -> torch.Tensor:
    """``(C, 1, 1, N)`` probabilities from one list per channel."""
    return torch.tensor(channels, dtype=torch.float32)[:, None, None, :]


ORGAN = probs([0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0])  # background, organ, lesion over 4 voxels
SHIFTED = probs([1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0])  # organ moved by one voxel
LESION = probs([0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0])  # one organ voxel called lesion
NOTHING = probs([1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0])


@pytest.mark.parametrize("p, q, expected", [
    (ORGAN, ORGAN, 0.0),  # the same prediction
    (ORGAN, NOTHING, 1.0),  # one sees an organ, the other nothing
    (NOTHING, NOTHING, 0.0),  # neither sees anything: no foreground, no disagreement
    (ORGAN, SHIFTED, 0.5),  # organ Dice 2*1/(2+2); the lesion is in neither: not counted
    (ORGAN, LESION, (0.0 + 1 / 3 + 1.0) / 2),  # organ 1 - 2/3, lesion only in one model: 1
    (ORGAN, probs([0, 0, 1, 1], [.5, .5, 0, 0], [.5, .5, 0, 0]), (1 - 2 / 3 + 1.0) / 2),  # soft: organ 2*1/3
])
def test_pair_disagreement(p, q, expected):
    assert pair_disagreement(p, q) == pytest.approx(expected, abs=1e-6)
    assert pair_disagreement(q, p) == pytest.approx(expected, abs=1e-6)  # symmetric


@pytest.mark.parametrize("p, region, expected", [
    (ORGAN, [True] * 4, 0.0),  # certain everywhere
    (probs([1 / 3] * 4, [1 / 3] * 4, [1 / 3] * 4), [True] * 4, 1.0),  # uniform: log C, normalised
    (probs([.5, 1, 1, 1], [.5, 0, 0, 0], [0, 0, 0, 0]), [True, False, False, False], math.log(2) / math.log(3)),
    (ORGAN, [False] * 4, 0.0),  # empty region
])
def test_served_entropy(p, region, expected):
    assert served_entropy(p, torch.tensor(region)[None, None]) == pytest.approx(expected, abs=1e-5)


def test_disagreement_is_the_partners_mean_plus_the_served_entropy_in_the_union_foreground():
    unsure = probs([0, 0, 1, 1], [.6, .6, 0, 0], [.4, .4, 0, 0])
    d = disagreement(unsure, iter([("b", ORGAN), ("c", NOTHING)]))  # a generator: consumed once
    assert set(d.partners) == {"b", "c"} and d.partners["c"] == 1.0
    assert d.partners["b"] == pytest.approx(pair_disagreement(unsure, ORGAN), abs=1e-6)
    assert d.foreground == 2  # the union of every model's foreground
    assert d.entropy == pytest.approx(served_entropy(unsure, torch.tensor([1, 1, 0, 0], dtype=bool)[None, None]), abs=1e-5)
    assert d.score == pytest.approx((d.partners["b"] + 1.0) / 2 + d.entropy, abs=1e-5)
    weighted = disagreement(unsure, [("b", ORGAN), ("c", NOTHING)], competence={"b": 0.8, "c": 0.1})
    assert weighted.partners == d.partners  # what each partner says is unchanged; how much it counts is not
    assert weighted.score == pytest.approx((0.8 * d.partners["b"] + 0.1 * 1.0) / 2 + d.entropy, abs=1e-5)
    alone = disagreement(unsure, [])  # no partner yet: the served model's own entropy
    assert alone.partners == {} and alone.score == pytest.approx(alone.entropy)


def test_agreeing_and_certain_committee_scores_zero():
    d = disagreement(ORGAN, [("b", ORGAN.clone()), ("c", ORGAN.clone())])
    assert d.score == 0.0 and d.partners == {"b": 0.0, "c": 0.0}


class Constant(torch.nn.Module):
    """Dropout in front of a network that ignores its input: every MC sample predicts the same logits."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.drop = torch.nn.Dropout3d(0.0)
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        x = self.drop(x)
        return self.logits[None, :, None, None, None].expand(x.shape[0], -1, *x.shape[2:]).clone()


def test_mc_dropout_turns_on_dropout_in_a_copy_and_refuses_a_network_without_it():
    net = Constant([0.0, 1.0, 2.0]).eval()
    mc = mc_dropout(net, 0.2)
    assert mc.drop.training and mc.drop.p == 0.2 and not mc.training
    assert net.drop.p == 0.0 and not net.drop.training  # the original is untouched
    with pytest.raises(ValueError, match="has no dropout layers.*network.dropout"):
        mc_dropout(torch.nn.Conv3d(1, 3, 1), 0.1)


def test_epistemic_entropy_is_monai_labels_entropy_of_the_mean_prediction():
    logits = [0.0, 1.0, 2.0]
    image = torch.zeros(1, 8, 8, 8)
    p = torch.softmax(torch.tensor(logits), 0)
    expected = float(-(p * p.log()).sum())  # the same prediction every sample: its entropy, at every voxel
    got = epistemic_entropy(Constant(logits), image, (8, 8, 8), samples=3, rate=0.5)
    assert got == pytest.approx(expected, abs=1e-5)


class Flicker(torch.nn.Module):
    """Dropout decides each voxel: kept -> confidently organ, dropped -> confidently background."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.0)

    def forward(self, x):
        kept = self.drop(torch.ones_like(x[:, :1]))  # 1 / (1 - p) where kept, 0 where dropped
        return torch.cat([torch.zeros_like(kept), 10.0 * kept - 5.0], dim=1)


def test_samples_that_disagree_raise_the_epistemic_entropy_to_that_of_a_coin():
    torch.manual_seed(0)
    image = torch.zeros(1, 8, 8, 8)
    steady = epistemic_entropy(Flicker(), image, (8, 8, 8), samples=64, rate=1e-6)  # every voxel kept: organ
    shaken = epistemic_entropy(Flicker(), image, (8, 8, 8), samples=64, rate=0.5)  # organ in half the samples
    assert steady < 0.05 and shaken == pytest.approx(math.log(2), abs=0.03)


def test_soft_predict_gives_probabilities_of_the_whole_volume():
    net = torch.nn.Conv3d(1, 3, 1)
    out = soft_predict(net, torch.randn(1, 12, 10, 8), (8, 8, 8))
    assert out.shape == (3, 12, 10, 8) and out.dtype == torch.float32
    assert torch.allclose(out.sum(0), torch.ones(12, 10, 8), atol=1e-5)


def test_competence_is_each_models_mean_dice_on_the_labelled_cases():
    label = torch.zeros(1, 8, 8, 8, dtype=torch.uint8)
    label[:, :4] = 1  # organ in the first half, no lesion
    cases = [{"image": torch.zeros(1, 8, 8, 8), "label": label}]

    class Fixed(torch.nn.Module):
        def __init__(self, organ):
            super().__init__()
            self.organ = organ

        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, 0] = 1.0
            out[:, 1, : self.organ] = 5.0  # organ in the first `organ` slices
            return out

    got = competence({"right": Fixed(4), "half": Fixed(2), "none": Fixed(0)}, cases, 2, (8, 8, 8))
    # lesion absent from both prediction and truth counts 1.0, as the gate's Dice does
    assert got == pytest.approx({"right": 1.0, "half": (2 * 2 / (2 + 4) + 1.0) / 2, "none": 0.5}, abs=1e-5)
    assert competence({"x": Fixed(4)}, [], 2, (8, 8, 8)) == {"x": 1.0}
