import copy
import math

import pytest
import torch
from helpers import TINY
from oracles import distill_kl, voxel_infonce

from gcml_app.config import DCMLConfig, SiteConfig
from gcml_app.ml.dcml import dcml_step, dcml_train
from gcml_app.ml.losses import kl_ramp, labels_at, voxel_weights
from gcml_app.ml.network import build_network
from gcml_app.ml.supervised import average_state, supervised_step

NETS = {
    "unet": {"name": "UNet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "segresnet": {"name": "SegResNet", "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
}


def site(net="unet", **dcml):
    return SiteConfig.model_validate({**TINY, "network": NETS[net], "dcml": {"samples_per_class": 32, **dcml}})


def data(seed=0, size=(16, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(2, 1, *size, dtype=torch.long)
    y[:, :, 4:12, 4:12, 4:12] = 1
    y[:, :, 6:9, 6:9, 6:9] = 2
    x = y.float() + 0.3 * torch.randn(2, 1, *size, generator=g)
    return x, y


def pair(cfg, seed_l=0, seed_i=1):
    torch.manual_seed(seed_l)
    a = build_network(cfg)
    torch.manual_seed(seed_i)
    return a, build_network(cfg)


# ---------------------------------------------------------------- feature taps
@pytest.mark.parametrize("net, scale", [("unet", 2), ("segresnet", 1)])
@pytest.mark.parametrize("size", [(16, 16, 16), (32, 16, 24)])
def test_feature_tap_shapes(net, scale, size):
    cfg = site(net, embed_dim=12)
    model = build_network(cfg)
    logits, feats, emb = model.forward_features(torch.zeros(2, 1, *size))
    grid = tuple(s // scale for s in size)
    assert logits.shape == (2, 3, *size)
    assert feats.shape[2:] == grid and emb.shape == (2, 12, *grid)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, *grid))
    torch.testing.assert_close(model(torch.zeros(2, 1, *size)), logits)  # forward = logits of the same pass


@pytest.mark.parametrize("net", ["unet", "segresnet"])
def test_embed_points_is_the_head_at_those_voxels_with_the_same_gradients(net):
    from gcml_app.ml.network import feature_channels

    cfg = site(net, embed_dim=12)
    model = build_network(cfg)
    feats = torch.randn(2, feature_channels(cfg), 3, 4, 5, requires_grad=True)
    grid = model.embed(feats).flatten(2).transpose(1, 2).reshape(-1, 12)  # (2 * 60, E)
    points = model.embed_points(feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1]))
    torch.testing.assert_close(points, grid)
    w = torch.randn_like(points)
    g_grid = torch.autograd.grad((grid * w).sum(), [feats, *model.head.parameters()])
    g_points = torch.autograd.grad((points * w).sum(), [feats, *model.head.parameters()])
    for a, b in zip(g_points, g_grid):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- KL
@pytest.mark.parametrize("mask", ["agree", "none"])
def test_kl_is_zero_for_identical_models_and_positive_otherwise(mask):
    cfg = site()
    a, b = pair(cfg)
    x, y = data()
    za = a(x)
    assert distill_kl(za, za.clone(), y, mask=mask).item() == pytest.approx(0.0, abs=1e-7)
    assert distill_kl(za, copy.deepcopy(a)(x), y, mask=mask).item() == pytest.approx(0.0, abs=1e-7)
    assert distill_kl(za, b(x), y, mask="none").item() > 1e-4


def _one_voxel(teacher_class: int, label: int):
    """Student: uniform; teacher: confident in ``teacher_class`` at voxel (0, 0, 0) only; label there ``label``."""
    s = torch.zeros(1, 2, 4, 4, 4, requires_grad=True)
    t = torch.zeros(1, 2, 4, 4, 4, requires_grad=True)
    with torch.no_grad():
        t[:, teacher_class, 0, 0, 0] = 5.0
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    y[..., 0, 0, 0] = label
    return s, t, y


_P = torch.softmax(torch.tensor([0.0, 5.0]), 0)
_KL_V = float((_P * (_P / 0.5).log()).sum())  # KL of that voxel at T = 1

KL_CASES = [
    # (teacher class, label, mask, fg_weight_max, expected KL)
    (1, 1, "agree", 3.0, 3 * _KL_V / (63 + 3)),  # teacher right on a foreground voxel: weight min(63, 3)
    (1, 1, "agree", 100.0, 63 * _KL_V / (63 + 63)),  # unbounded: the foreground weighs as much as the background
    (1, 0, "agree", 3.0, 0.0),  # teacher wrong there: not distilled (the voxel stays in the denominator)
    (1, 0, "none", 3.0, _KL_V / 64),  # no mask: distilled like any background voxel
    (0, 1, "agree", 3.0, 0.0),  # teacher says background on a lesion voxel: not distilled
]


@pytest.mark.parametrize("teacher_class, label, mask, bound, expected", KL_CASES)
def test_kl_trusts_only_a_right_teacher_with_bounded_foreground_weight(teacher_class, label, mask, bound, expected):
    s, t, y = _one_voxel(teacher_class, label)
    kl = distill_kl(s, t, y, temperature=1.0, dilation=0, mask=mask, fg_weight_max=bound)
    assert kl.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    kl.backward()
    assert t.grad is None and s.grad is not None  # the teacher is detached
    assert (s.grad.abs().sum().item() > 0) == (expected > 0)  # a wrong teacher does not pull the student


def test_a_teacher_wrong_everywhere_gives_no_kl_gradient():
    x, y = data()
    student = torch.randn(2, 3, *y.shape[2:], requires_grad=True)
    wrong = torch.nn.functional.one_hot((y[:, 0] + 1) % 3, 3).permute(0, 4, 1, 2, 3).float() * 10
    distill_kl(student, wrong, y).backward()
    assert student.grad.abs().max().item() == 0.0
    assert distill_kl(student, wrong, y, mask="none").item() > 0


@pytest.mark.parametrize("n_fg, bound, fg_weight", [(1, 3.0, 3.0), (32, 3.0, 1.0), (16, 3.0, 3.0), (16, 10.0, 48 / 16)])
def test_voxel_weights_balance_foreground_up_to_the_bound(n_fg, bound, fg_weight):
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    y.view(-1)[:n_fg] = 1
    w = voxel_weights(y, 0, bound)
    assert w.view(-1)[:n_fg].unique().tolist() == [pytest.approx(fg_weight)]
    assert w.view(-1)[n_fg:].unique().tolist() == [1.0]
    assert w.max().item() <= bound


@pytest.mark.parametrize("rampup", [0.0, 0.1, 0.3, 1.0])
def test_kl_ramp_rises_from_near_zero_to_one(rampup):
    total = 50
    w = [kl_ramp(s, total, rampup) for s in range(total)]
    assert all(a <= b for a, b in zip(w, w[1:]))  # never decreases
    assert all(0.0 < v <= 1.0 for v in w)
    assert all(v == 1.0 for s, v in enumerate(w) if s >= rampup * total)  # full weight after the ramp
    if rampup:
        assert w[0] == pytest.approx(math.exp(-5))


def test_the_ramp_scales_the_kl_in_a_dcml_step():
    cfg = site(lambda_con=0.0, kl_mask="none")
    x, y = data()
    grads = {}
    for w in (0.0, 1.0):
        a, b = pair(cfg)
        oa, ob = torch.optim.SGD(a.parameters(), lr=0.0), torch.optim.SGD(b.parameters(), lr=0.0)
        step = dcml_step(a, b, oa, ob, x, y, cfg.dcml, kl_weight=w)
        grads[w] = torch.cat([p.grad.flatten() for p in a.backbone.parameters()])
        assert step.kl_l > 0  # the KL is reported unweighted
    a, _ = pair(cfg)
    oa = torch.optim.SGD(a.parameters(), lr=0.0)
    supervised_step(a, oa, x, y)
    torch.testing.assert_close(grads[0.0], torch.cat([p.grad.flatten() for p in a.backbone.parameters()]))  # w = 0: supervised
    assert not torch.allclose(grads[0.0], grads[1.0])


# ---------------------------------------------------------------- InfoNCE
def test_infonce_lower_for_class_aligned_embeddings_than_shuffled():
    g = torch.Generator().manual_seed(0)
    _, y = data()
    proto = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    aligned = proto[y[:, 0]].permute(0, 4, 1, 2, 3)  # (B, E, D, H, W), one prototype per class
    aligned = torch.nn.functional.normalize(aligned + 0.1 * torch.randn(aligned.shape, generator=g), dim=1)
    perm = torch.randperm(y.numel(), generator=g)
    shuffled_y = y.flatten()[perm].view_as(y)
    l_aligned = voxel_infonce(aligned, aligned.clone(), y, tau=0.1, samples_per_class=64, generator=g)
    l_shuffled = voxel_infonce(aligned, aligned.clone(), shuffled_y, tau=0.1, samples_per_class=64, generator=g)
    assert l_aligned.item() < l_shuffled.item()


@pytest.mark.parametrize(
    "labels",
    [
        torch.zeros(2, 1, 8, 8, 8, dtype=torch.long),  # only background: no negatives anywhere
        torch.cat([torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8, 8)]).long(),  # one class per volume
        torch.cat([torch.zeros(1, 1, 8, 8, 8), (torch.rand(1, 1, 8, 8, 8) > 0.5).float()]).long(),  # class 2 absent
    ],
)
def test_infonce_with_absent_classes_is_finite(labels):
    e = torch.nn.functional.normalize(torch.randn(2, 8, 8, 8, 8), dim=1).requires_grad_()
    loss = voxel_infonce(e, e.detach().clone(), labels, samples_per_class=16)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(e.grad).all()


def test_labels_at_feature_grid():
    y = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    y[..., :4, :, :] = 2
    out = labels_at(y, (4, 4, 4))
    assert out.shape == (1, 1, 4, 4, 4) and set(out.unique().tolist()) == {0, 2}


# ---------------------------------------------------------------- the step
@pytest.mark.parametrize("net", ["unet", "segresnet"])
def test_zero_weights_equal_two_independent_supervised_steps(net):
    cfg = site(net, lambda_kl=0.0, lambda_con=0.0)
    a, b = pair(cfg)
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    x, y = data()
    opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)
    oa, ob, oa2, ob2 = opt(a), opt(b), opt(a2), opt(b2)
    dcml_step(a, b, oa, ob, x, y, cfg.dcml)
    supervised_step(a2, oa2, x, y)
    supervised_step(b2, ob2, x, y)
    for m, ref in ((a, a2), (b, b2)):
        for (k, p), q in zip(m.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("net", ["unet", "segresnet"])
def test_gradients_reach_every_parameter_of_both_models(net):
    cfg = site(net)
    a, b = pair(cfg)
    x, y = data()
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.0), torch.optim.SGD(b.parameters(), lr=0.0)
    dcml_step(a, b, oa, ob, x, y, cfg.dcml)
    for m in (a, b):
        missing = [k for k, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
        assert not missing


def test_one_optimizer_never_changes_the_other_model():
    cfg = site()
    a, b = pair(cfg)
    x, y = data()
    oa, ob = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    before_a, before_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    z_a, _, e_a = a.forward_features(x)
    z_b, _, e_b = b.forward_features(x)
    loss_a = distill_kl(z_a, z_b, y, mask="none") + voxel_infonce(e_a, e_b, labels_at(y, e_a.shape[2:]))
    loss_a.backward()
    assert all(p.grad is None for p in b.parameters())  # the teacher side is detached
    oa.step()
    ob.step()
    assert any(not torch.equal(p, before_a[k]) for k, p in a.state_dict().items())
    assert all(torch.equal(p, before_b[k]) for k, p in b.state_dict().items())


def test_dcml_train_returns_loss_components_per_epoch():
    cfg = site()
    a, b = pair(cfg)
    x, y = data()
    seen = []
    _, _, hist = dcml_train(a, b, [{"image": x, "label": y}] * 2, cfg.dcml, epochs=3, lr=1e-2, progress=seen.append)
    assert len(hist) == 3 and set(hist[0]) == {"seg_l", "kl_l", "con_l", "seg_i", "kl_i", "con_i", "unl_l", "unl_i",
                                               "kl_weight", "steps", "crop_passes"}
    assert [(h["steps"], h["crop_passes"]) for h in hist] == [(2, 8.0)] * 3  # 2 steps of 2 crops through 2 models
    assert hist[0]["kl_weight"] < hist[-1]["kl_weight"] == cfg.dcml.lambda_kl  # ramped up within the round
    assert [s["epoch"] for s in seen] == [1, 2, 3]
    assert hist[-1]["seg_l"] < hist[0]["seg_l"] and hist[-1]["seg_i"] < hist[0]["seg_i"]


# ---------------------------------------------------------------- bad arguments
BAD = [
    (lambda: distill_kl(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)),
     r"distill_kl logits: found shapes \(1, 3, 4, 4, 4\) and \(1, 2, 4, 4, 4\); expected equal shapes"),
    (lambda: distill_kl(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), 0.0),
     r"found temperature=0.0; expected T > 0"),
    (lambda: distill_kl(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 2, 4, 4)),
     r"found labels \(1, 1, 2, 4, 4\) for logits"),
    (lambda: distill_kl(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), mask="some"),
     r"found mask='some'; expected one of \['agree', 'none'\]"),
    (lambda: distill_kl(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4),
                        fg_weight_max=0.5), r"found fg_weight_max=0.5; expected >= 1"),
    (lambda: voxel_infonce(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2), tau=-1),
     r"found tau=-1; expected tau > 0"),
    (lambda: voxel_infonce(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 8, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)),
     r"voxel_infonce embeddings: found shapes"),
    (lambda: dcml_step(*pair(site()), None, None, *data(), DCMLConfig.model_construct(lambda_kl=-1.0, lambda_con=0.1,
                                                                                       temperature=2.0, tau=0.1)),
     r"dcml.lambda_kl: found -1.0; expected >= 0"),
    (lambda: average_state({"w": torch.zeros(2)}, {"w": torch.zeros(3)}), r"average_state w: found shapes"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("overrides, message", [
    ({"lambda_con": -0.1}, r"dcml.lambda_con: found -0.1; expected greater than or equal to 0"),
    ({"temperature": 0}, r"dcml.temperature: found 0; expected greater than 0"),
])
def test_bad_dcml_config(tmp_path, overrides, message):
    from helpers import write_config

    from gcml_app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, dcml=overrides))


def test_average_state():
    avg = average_state({"w": torch.ones(2), "n": torch.tensor(3)}, {"w": torch.zeros(2), "n": torch.tensor(5)})
    torch.testing.assert_close(avg["w"], torch.full((2,), 0.5))
    assert avg["n"].item() == 3


@pytest.mark.parametrize("dilation", [0, 1, 2])
def test_foreground_region_is_a_box_dilation(dilation):
    from gcml_app.ml.losses import foreground_region

    y = torch.zeros(1, 1, 9, 9, 9, dtype=torch.long)
    y[..., 4, 4, 4] = 1
    fg = foreground_region(y, dilation)
    k = 2 * dilation + 1
    ref = torch.nn.functional.max_pool3d((y > 0).float(), k, 1, dilation) if dilation else (y > 0).float()
    assert torch.equal(fg, ref) and fg.sum().item() == k**3


@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("shape", [(2, 1, 12, 9, 7), (1, 1, 3, 16, 2)])
def test_foreground_region_equals_a_box_max_pool_on_random_labels(dilation, shape):
    from gcml_app.ml.losses import foreground_region

    y = (torch.rand(shape, generator=torch.Generator().manual_seed(dilation)) > 0.97).long() * 2
    k = 2 * dilation + 1
    ref = torch.nn.functional.max_pool3d(y.float().clamp(max=1), k, 1, dilation)
    assert torch.equal(foreground_region(y, dilation), ref)


def test_fused_mutual_terms_equal_the_reference_losses():
    from gcml_app.ml.losses import mutual_infonce, mutual_kl

    cfg = site()
    a, b = pair(cfg)
    x, y = data()
    z_a, f_a, e_a = a.forward_features(x)
    z_b, f_b, e_b = b.forward_features(x)
    kl_a, kl_b = mutual_kl(z_a, z_b, y, 2.0, 2, "agree", 3.0)
    torch.testing.assert_close(kl_a, distill_kl(z_a, z_b, y, 2.0, 2, "agree", 3.0))
    torch.testing.assert_close(kl_b, distill_kl(z_b, z_a, y, 2.0, 2, "agree", 3.0))
    con_a, con_b = mutual_infonce(a, b, f_a, f_b, y, cfg.dcml, torch.Generator().manual_seed(5))
    for con, (e, o) in ((con_a, (e_a, e_b)), (con_b, (e_b, e_a))):
        ref = voxel_infonce(e, o, labels_at(y, e_a.shape[2:]), cfg.dcml.tau, cfg.dcml.samples_per_class,
                            torch.Generator().manual_seed(5))
        torch.testing.assert_close(con, ref, rtol=1e-4, atol=1e-5)


def test_an_absurd_partner_model_never_makes_the_local_model_non_finite():
    cfg = site()
    a, b = pair(cfg)
    with torch.no_grad():
        for p in b.parameters():
            p.fill_(3e38)  # finite, absurd: overflows in the first convolution
    x, y = data()
    oa, ob = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    before = copy.deepcopy(a.state_dict())
    out = dcml_step(a, b, oa, ob, x, y, cfg.dcml)
    assert not math.isfinite(out.seg_i)
    assert all(torch.isfinite(p).all() for p in a.state_dict().values())
    # the local model's loss went through the incoming model's logits (KL): that step is skipped, not applied
    assert not math.isfinite(out.kl_l) or any(not torch.equal(p, before[k]) for k, p in a.state_dict().items())
