"""DCML's unlabelled term: the confident mutual KL on images without a label, and the compute budget."""

import copy

import pytest
import torch
from test_dcml import data, pair, site

from gcml_app.ml.dcml import FORWARD_COST, dcml_step, dcml_train, step_budget
from gcml_app.ml.losses import unlabelled_kl


def logits(probs):
    """``(1, C, 1, 1, n)`` logits whose softmax at every voxel is ``probs`` (C values)."""
    p = torch.tensor(probs, dtype=torch.float32)
    return p.log().view(1, -1, 1, 1, 1).expand(1, -1, 1, 1, 4).clone()


def test_two_models_that_agree_give_zero_and_no_label_is_needed():
    cfg = site()
    a, _ = pair(cfg)
    x, _ = data()
    z = a(x)
    kl_l, kl_i = unlabelled_kl(z, z.clone(), confidence=0.0)
    assert kl_l.item() == pytest.approx(0.0, abs=1e-7) and kl_i.item() == pytest.approx(0.0, abs=1e-7)


# teacher's probabilities, threshold, whether the student (uniform) is pulled
CONFIDENCE = [
    ([0.95, 0.03, 0.02], 0.9, True),
    ([0.85, 0.10, 0.05], 0.9, False),
    ([0.85, 0.10, 0.05], 0.8, True),
    ([0.4, 0.3, 0.3], 0.0, True),  # confidence 0: everywhere
    ([0.4, 0.3, 0.3], 0.5, False),
]


@pytest.mark.parametrize("teacher, confidence, pulled", CONFIDENCE)
def test_a_voxel_distils_only_where_its_teacher_is_confident(teacher, confidence, pulled):
    student = logits([1 / 3] * 3).requires_grad_()
    kl_s, kl_t = unlabelled_kl(student, logits(teacher), temperature=1.0, confidence=confidence)
    assert (kl_s.item() > 1e-4) is pulled
    kl_s.backward()
    assert (student.grad.abs().sum().item() > 0) is pulled
    if confidence > 1 / 3:  # a uniform student is not confident enough to teach
        assert kl_t.item() == pytest.approx(0.0, abs=1e-7)


def test_unconfident_voxels_stay_in_the_denominator():
    sure, unsure = logits([0.96, 0.02, 0.02]), logits([0.5, 0.3, 0.2])
    half = torch.cat([sure[..., :2], unsure[..., :2]], dim=-1)  # half the voxels confident
    student = logits([1 / 3] * 3)
    full, _ = unlabelled_kl(student, sure, temperature=1.0)
    halved, _ = unlabelled_kl(student, half, temperature=1.0)
    assert halved.item() == pytest.approx(full.item() / 2, rel=1e-5)


def test_the_teacher_side_is_detached():
    a, b = torch.randn(1, 3, 4, 4, 4, requires_grad=True), torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    kl_a, _ = unlabelled_kl(a, b, confidence=0.0)
    kl_a.backward()
    assert a.grad.abs().sum() > 0 and b.grad is None


@pytest.mark.parametrize("confidence", [-0.1, 1.0])
def test_a_confidence_outside_0_1_is_refused(confidence):
    z = torch.zeros(1, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="confidence=.*expected 0 <= confidence < 1"):
        unlabelled_kl(z, z, confidence=confidence)


def test_a_dcml_step_learns_from_unlabelled_crops_without_their_labels():
    cfg = site(lambda_kl=0.0, lambda_con=0.0, lambda_unl=1.0, confidence=0.0, kl_rampup=0.0)
    x, y = data()
    x_u, _ = data(seed=5)
    runs = {}
    for name, extra in (("labelled", None), ("unlabelled", x_u)):
        a, b = pair(cfg)
        opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
        step = dcml_step(a, b, opt_a, opt_b, x, y, cfg.dcml, x_u=extra)
        runs[name] = (step, a)
    assert runs["labelled"][0].unl_l == 0.0
    assert runs["unlabelled"][0].unl_l > 0 and runs["unlabelled"][0].unl_i > 0
    assert runs["unlabelled"][0].seg_l == pytest.approx(runs["labelled"][0].seg_l)  # same labelled crops
    moved = [not torch.equal(p, q) for p, q in zip(runs["labelled"][1].parameters(), runs["unlabelled"][1].parameters())]
    assert any(moved)  # the unlabelled crops changed the update


def test_lambda_unl_zero_ignores_unlabelled_crops_exactly():
    cfg = site(lambda_unl=0.0)
    x, y = data()
    states = []
    for extra in (None, data(seed=5)[0]):
        a, b = pair(cfg)
        torch.manual_seed(0)
        dcml_step(a, b, torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1), x, y,
                  cfg.dcml, generator=torch.Generator().manual_seed(0), x_u=extra)
        states.append(a.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k])


def test_a_frozen_teacher_is_never_changed_and_the_local_model_still_learns():
    cfg = site(train_incoming=False)
    a, b = pair(cfg)
    before_a, before_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    x, y = data()
    batches = [{"image": x, "label": y}] * 2
    unl = [{"image": data(seed=3)[0]}]
    a, b, history = dcml_train(a, b, batches, cfg.dcml, epochs=2, lr=0.01, unlabelled=unl, steps=3)
    assert all(torch.equal(v, before_b[k]) for k, v in b.state_dict().items())
    assert any(not torch.equal(v, before_a[k]) for k, v in a.state_dict().items())
    assert [h["steps"] for h in history] == [2, 1]  # 3 steps: the second pass stops early
    assert all(h["seg_i"] == 0.0 for h in history)


# epochs, labelled batches, batch size, unlabelled batch, train incoming -> steps
BUDGETS = [
    (4, 6, 2, 0, True, 24),  # labelled only: epochs x batches, two models trained
    (4, 6, 2, 1, True, 16),  # a third more images per step: two thirds of the steps
    (4, 6, 2, 2, True, 12),
    (4, 6, 2, 0, False, 36),  # a frozen teacher costs a forward pass: 1.5x the steps
    (4, 6, 2, 1, False, 24),
    (1, 1, 2, 1, True, 1),  # never 0
]


@pytest.mark.parametrize("epochs, batches, batch, unl, train_incoming, steps", BUDGETS)
def test_the_step_budget_costs_two_models_labelled_passes(epochs, batches, batch, unl, train_incoming, steps):
    assert step_budget(epochs, batches, batch, unl, train_incoming) == steps
    per_step = (batch + unl) * (2 if train_incoming else 1 + FORWARD_COST)
    assert abs(steps * per_step - 2 * epochs * batches * batch) <= per_step / 2 or steps == 1
