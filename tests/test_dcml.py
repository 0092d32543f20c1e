import copy

import pytest
import torch
from helpers import TINY

from gcml_app.config import DCMLConfig, SiteConfig
from gcml_app.dcml import (
    average_state,
    dcml_step,
    dcml_train,
    labels_at,
    region_balanced_kl,
    supervised_step,
    voxel_infonce,
)
from gcml_app.network import build_network

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


# ---------------------------------------------------------------- KL
def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    cfg = site()
    a, b = pair(cfg)
    x, y = data()
    za = a(x)
    assert region_balanced_kl(za, za.clone(), y).item() == pytest.approx(0.0, abs=1e-7)
    assert region_balanced_kl(za, copy.deepcopy(a)(x), y).item() == pytest.approx(0.0, abs=1e-7)
    assert region_balanced_kl(za, b(x), y).item() > 1e-4


def test_kl_balances_regions_and_detaches_teacher():
    s = torch.zeros(1, 2, 4, 4, 4, requires_grad=True)
    t = torch.zeros(1, 2, 4, 4, 4, requires_grad=True)
    with torch.no_grad():
        t[:, 1, 0, 0, 0] = 5.0  # the teacher disagrees at one foreground voxel only
    y = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    y[..., 0, 0, 0] = 1
    kl = region_balanced_kl(s, t, y, temperature=1.0, dilation=0)
    # one differing voxel out of a 1-voxel foreground counts half the loss, not 1/64 of it
    p = torch.softmax(torch.tensor([0.0, 5.0]), 0)
    expected = 0.5 * float((p * (p / 0.5).log()).sum())
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    kl.backward()
    assert t.grad is None and s.grad is not None


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
    opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)  # noqa: E731
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
    loss_a = region_balanced_kl(z_a, z_b, y) + voxel_infonce(e_a, e_b, labels_at(y, e_a.shape[2:]))
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
    assert len(hist) == 3 and set(hist[0]) == {"seg_l", "kl_l", "con_l", "seg_i", "kl_i", "con_i"}
    assert [s["epoch"] for s in seen] == [1, 2, 3]
    assert hist[-1]["seg_l"] < hist[0]["seg_l"] and hist[-1]["seg_i"] < hist[0]["seg_i"]


# ---------------------------------------------------------------- bad arguments
BAD = [
    (lambda: region_balanced_kl(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)),
     r"region_balanced_kl logits: found shapes \(1, 3, 4, 4, 4\) and \(1, 2, 4, 4, 4\); expected equal shapes"),
    (lambda: region_balanced_kl(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), 0.0),
     r"found temperature=0.0; expected T > 0"),
    (lambda: region_balanced_kl(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 2, 4, 4)),
     r"found labels \(1, 1, 2, 4, 4\) for logits"),
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
    from gcml_app.dcml import foreground_region

    y = torch.zeros(1, 1, 9, 9, 9, dtype=torch.long)
    y[..., 4, 4, 4] = 1
    fg = foreground_region(y, dilation)
    k = 2 * dilation + 1
    ref = torch.nn.functional.max_pool3d((y > 0).float(), k, 1, dilation) if dilation else (y > 0).float()
    assert torch.equal(fg, ref) and fg.sum().item() == k**3


def test_fused_mutual_terms_equal_the_reference_losses():
    from gcml_app.dcml import mutual_infonce, mutual_kl

    cfg = site()
    a, b = pair(cfg)
    x, y = data()
    z_a, f_a, e_a = a.forward_features(x)
    z_b, f_b, e_b = b.forward_features(x)
    kl_a, kl_b = mutual_kl(z_a, z_b, y, 2.0, 2)
    torch.testing.assert_close(kl_a, region_balanced_kl(z_a, z_b, y, 2.0, 2))
    torch.testing.assert_close(kl_b, region_balanced_kl(z_b, z_a, y, 2.0, 2))
    con_a, _ = mutual_infonce(a, b, f_a, f_b, y, cfg.dcml, torch.Generator().manual_seed(5))
    ref = voxel_infonce(e_a, e_b, labels_at(y, e_a.shape[2:]), cfg.dcml.tau, cfg.dcml.samples_per_class,
                        torch.Generator().manual_seed(5))
    torch.testing.assert_close(con_a, ref, rtol=1e-4, atol=1e-5)
