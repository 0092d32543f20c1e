"""Clicks: the guidance signal, simulated clicks, refinement around clicks, the layout conversion (pure ML)."""

import hashlib

import numpy as np
import pytest
import torch
from helpers import TINY

from gcml_app.config import SiteConfig
from gcml_app.ml.clicks import (ClickSimulator, click_windows, clicks_reaching, guidance_signal, largest_error_click,
                                refine)
from gcml_app.ml.network import arch_fingerprint, build_network, convert_guidance, fit_state, toggled_interactive


def _cfg(enabled: bool, **net) -> SiteConfig:
    network = net if net.get("name") == "SegResNet" else {**TINY["network"], **net}
    return SiteConfig.model_validate({**TINY, "network": network, "interactive": {"enabled": enabled}})


# ---------------------------------------------------------------- the guidance signal
@pytest.mark.parametrize("clicks, channel, voxel, expected", [
    ([(1, (5, 5, 5))], 1, (5, 5, 5), 1.0),                      # 1 at the click
    ([(1, (5, 5, 5))], 0, (5, 5, 5), 0.0),                      # only in the click's channel
    ([(1, (5, 5, 5))], 1, (5, 5, 8), float(np.exp(-9 / 18))),   # a Gaussian of sigma 3
    ([(1, (5, 5, 5))], 1, (5, 5, 19), 0.0),                     # cut beyond 4 sigma
    ([(2, (5, 5, 5)), (2, (5, 5, 7))], 2, (5, 5, 7), 1.0),      # the maximum over a channel's clicks
    ([(0, (-3, 5, 5))], 0, (0, 5, 5), float(np.exp(-9 / 18))),  # a click outside the window reaches in
])
def test_guidance_signal(clicks, channel, voxel, expected):
    g = guidance_signal(clicks, 3, (20, 20, 20), sigma=3.0)
    assert g.shape == (3, 20, 20, 20) and float(g.max()) <= 1.0
    assert float(g[(channel, *voxel)]) == pytest.approx(expected, abs=1e-6)


def test_guidance_signal_refuses_an_unknown_channel():
    with pytest.raises(ValueError, match="found channel 3; expected 0..2"):
        guidance_signal([(3, (1, 1, 1))], 3, (4, 4, 4))


def test_the_evaluation_click_is_at_the_centre_of_the_largest_error():
    label = np.zeros((20, 20, 20), np.int64)
    label[2:5, 2:5, 2:5] = 1          # a small missed organ (27 voxels)
    label[10:17, 10:17, 10:17] = 1    # a large missed organ (343 voxels): the click goes here
    pred = np.zeros_like(label)
    pred[0, 0, 0:3] = 2               # a false positive: a background click, but smaller
    assert largest_error_click(pred, label, 3) == (1, (13, 13, 13))
    pred = label.copy()
    pred[0:6, 0:6, 15:20] = 2         # now the largest error is a false positive (150 voxels)
    assert largest_error_click(pred, label, 3)[0] == 0
    assert largest_error_click(label, label, 3) is None


@pytest.mark.parametrize("on_device", [False, True], ids=["scipy", "torch (a GPU's path)"])
def test_every_clicked_item_of_a_batch_gets_seeds_and_the_rest_zero_guidance(on_device):
    net = build_network(_cfg(True))
    x = torch.randn(4, 1, 32, 32, 32)
    y = torch.zeros(4, 1, 32, 32, 32, dtype=torch.long)
    y[:, :, 8:20, 8:20, 8:20] = 1
    y[:, :, 12:15, 12:15, 12:15] = 2
    xg = ClickSimulator(3, 1.0, 1, 3.0, seed=0, on_device=on_device)(net, x, y)
    assert xg.shape == (4, 4, 32, 32, 32) and torch.equal(xg[:, :1], x)
    assert (xg[:, 1:].amax(dim=(2, 3, 4)) == 1).all()  # every item, every class present got a seed click
    lesion = xg[:, 3, 8:20, 8:20, 8:20]  # a lesion click lies in the lesion: its peak of 1 is there
    assert (lesion[:, 4:7, 4:7, 4:7].amax(dim=(1, 2, 3)) == 1).all()
    again = ClickSimulator(3, 1.0, 1, 3.0, seed=0, on_device=on_device)(net, x, y)
    assert torch.equal(xg, again)  # deterministic per seed
    assert torch.equal(ClickSimulator(3, 0.0, 1, 3.0)(net, x, y)[:, 1:], torch.zeros(4, 3, 32, 32, 32))
    share = ClickSimulator(3, 0.5, 0, 3.0, seed=1, on_device=on_device)
    clicked = [bool(share(net, x[:1], y[:1])[:, 1:].any()) for _ in range(200)]
    assert 0.4 < np.mean(clicked) < 0.6


def _blob(shape, box):
    m = np.zeros(shape, bool)
    m[box] = True
    return m


def _two_blobs():
    m = _blob((20, 24, 28), np.s_[2:6, 3:9, 4:8])
    m[12:19, 15:22, 20:27] = True
    return m


@pytest.mark.parametrize("name, mask", [
    ("a blob inside", _blob((20, 24, 28), np.s_[5:12, 6:15, 7:20])),
    ("a blob touching two faces of the volume", _blob((20, 24, 28), np.s_[0:9, 10:24, 3:11])),
    ("two blobs far apart (their box holds much that is not the mask)", _two_blobs()),
    ("one voxel", _blob((20, 24, 28), np.s_[7, 8, 9])),
    ("the whole volume", np.ones((20, 24, 28), bool)),
    ("random speckle", np.random.default_rng(3).random((20, 24, 28)) < 0.4),
    ("nothing", np.zeros((20, 24, 28), bool)),
])
def test_edge_distance_on_the_bounding_box_equals_the_whole_volumes(name, mask):
    """scipy on the mask's box, and PyTorch's brute force (what a GPU runs), both equal scipy on the whole."""
    from scipy import ndimage

    from gcml_app.ml.clicks import _edge_distance, _edge_distance_on_device

    whole = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    assert np.array_equal(_edge_distance(mask), whole), name
    on_device = _edge_distance_on_device(torch.from_numpy(mask), chunk=5000)  # small blocks: the chunking runs
    assert on_device.dtype == torch.float64 and np.array_equal(on_device.numpy(), whole), name


def test_clicks_drawn_on_the_device_fall_inside_with_probability_by_distance_from_the_edge():
    from gcml_app.ml.clicks import _edge_distance, _sample_on_device

    mask = _blob((16, 16, 16), np.s_[2:13, 3:12, 4:14])
    dist = _edge_distance(mask)
    gen = torch.Generator().manual_seed(0)
    draws = [_sample_on_device(torch.from_numpy(mask), gen) for _ in range(3000)]
    assert all(mask[d] for d in draws)
    seen = np.array([dist[d] for d in draws])
    expected = (dist**2).sum() / dist.sum()  # the mean distance of a voxel drawn with probability by distance
    assert abs(seen.mean() - expected) < 0.03 * expected and seen.mean() > dist[mask].mean() + 0.3


def test_simulated_clicks_are_those_of_deepedits_recipe_written_plainly():
    """The simulator's clicks against the recipe computed the plain way (whole-volume distance transforms,
    np.unique, torch's argmax), from the same seed: the same clicks, so the interactive runs stay comparable."""
    from scipy import ndimage

    def sample(mask, rng):
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1].ravel()
        return tuple(int(i) for i in np.unravel_index(rng.choice(dist.size, p=dist / dist.sum()), mask.shape))

    torch.manual_seed(0)
    net = build_network(_cfg(True)).eval()
    x = torch.randn(3, 1, 32, 32, 32)
    y = torch.zeros(3, 1, 32, 32, 32, dtype=torch.long)
    y[:, :, 8:20, 8:20, 8:20] = 1
    y[1:, :, 12:15, 12:15, 12:15] = 2  # item 0 has no lesion
    sim = ClickSimulator(3, 1.0, 2, 3.0, seed=5)
    got = sim(net, x, y)

    rng = np.random.default_rng(5)
    rng.random(3)  # the draw of which items are clicked
    labels = y[:, 0].numpy()
    clicks = [[(int(c), sample(labels[i] == c, rng)) for c in np.unique(labels[i])] for i in range(3)]
    for _ in range(2):
        with torch.no_grad():
            g = torch.stack([guidance_signal(c, 3, (32, 32, 32)) for c in clicks])
            pred = net(torch.cat([x, g], 1)).argmax(1).numpy()
        for i in range(3):
            clicks[i] += [(c, sample((labels[i] == c) & (pred[i] != c), rng)) for c in range(3)
                          if ((labels[i] == c) & (pred[i] != c)).any()]
    want = torch.cat([x, torch.stack([guidance_signal(c, 3, (32, 32, 32)) for c in clicks])], 1)
    assert sum(map(len, clicks)) > 8 and torch.equal(got, want)


# ---------------------------------------------------------------- refinement around clicks
class _Follows(torch.nn.Module):
    """A stand-in network for one piece (refine's merge): predicts the base segmentation of the *image* (a
    threshold), and wherever a guidance channel exceeds 0.5, that channel's class."""

    guidance_channels = 3

    def forward(self, x):
        logits = torch.stack([0.5 - x[:, 0], x[:, 0] - 0.5, torch.zeros_like(x[:, 0]) - 1], 1) * 4
        g = x[:, 1:]
        return torch.where(g > 0.5, g * 100, logits)


def test_refine_adds_a_clicked_organ_removes_a_clicked_false_positive_and_leaves_the_rest():
    image = torch.zeros(1, 48, 48, 48)
    image[0, 30:40, 30:40, 30:40] = 1.0        # an organ the image shows: the base has it
    base = (image > 0.5).to(torch.uint8)
    base[0, 2:5, 2:5, 2:5] = 1                 # a false positive far away
    model = _Follows()

    out = refine(model, image, base, [(1, (10, 10, 40))], (32, 32, 32), sigma=3.0)
    added = out[0] != base[0]
    assert added[10, 10, 40] and int(added.sum()) > 0  # the clicked voxel's blob became organ
    assert out[0, 2:5, 2:5, 2:5].eq(1).all()         # untouched far from the click (inside its window, too)

    out = refine(model, image, base, [(0, (3, 3, 3))], (32, 32, 32), sigma=3.0)
    assert out[0, 2:5, 2:5, 2:5].eq(0).all()          # the background click removed the false positive
    assert torch.equal(out[0, 30:40, 30:40, 30:40], base[0, 30:40, 30:40, 30:40])
    assert torch.equal(refine(model, image, base, [], (32, 32, 32)), base)


@pytest.mark.parametrize("clicks, shape, roi, expected", [
    ([(1, (20, 20, 20))], (64, 64, 64), (32, 32, 32), [(4, 4, 4)]),
    ([(1, (20, 20, 20)), (1, (25, 20, 20))], (64, 64, 64), (32, 32, 32), [(4, 4, 4)]),  # in the first's centre
    ([(1, (20, 20, 20)), (1, (50, 20, 20))], (64, 64, 64), (32, 32, 32), [(4, 4, 4), (32, 4, 4)]),
    ([(1, (1, 1, 1))], (16, 64, 64), (32, 32, 32), [(0, 0, 0)]),  # a volume smaller than the ROI
])
def test_click_windows(clicks, shape, roi, expected):
    assert click_windows(clicks, shape, roi) == expected


@pytest.mark.parametrize("clicks, origin, expected", [
    ([(1, (20, 20, 20))], (4, 4, 4), [(1, (20, 20, 20))]),
    ([(1, (47, 20, 20))], (4, 4, 4), [(1, (47, 20, 20))]),    # 12 = 4 sigma past the window's last voxel (35)
    ([(1, (48, 20, 20))], (4, 4, 4), []),                     # 13 past: its signal is exactly zero there
    ([(0, (20, 20, 20)), (1, (5, 5, 5)), (2, (60, 60, 60))], (4, 4, 4), [(0, (20, 20, 20)), (1, (5, 5, 5))]),
])
def test_clicks_reaching_a_window(clicks, origin, expected):
    assert list(clicks_reaching(clicks, origin, (32, 32, 32), 3.0)) == expected
    signal = guidance_signal(clicks, 3, (32, 32, 32), origin, 3.0)
    assert torch.equal(signal, guidance_signal(expected, 3, (32, 32, 32), origin, 3.0))  # the window's whole input


class _Cache(dict):
    def put(self, key, value):
        self[key] = value


def test_a_window_cache_gives_the_same_answers_and_runs_only_the_windows_a_new_click_reaches():
    torch.manual_seed(0)
    net = build_network(_cfg(True)).eval()
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(1))
    image = torch.rand(1, 64, 64, 64)
    base = (image[:1] > 0.5).to(torch.uint8)
    session = [(1, (10, 10, 10)), (1, (12, 10, 10)), (0, (50, 50, 50)), (1, (10, 50, 30)), (0, (52, 50, 50))]
    cache = _Cache()
    ran = []
    for n in range(1, len(session) + 1):  # Slicer sends every click so far with each request
        before = len(calls)
        cached = refine(net, image, base, session[:n], (32, 32, 32), 3.0, windows=cache, key=("ct", 1))
        ran.append(len(calls) - before)
        assert torch.equal(cached, refine(net, image, base, session[:n], (32, 32, 32), 3.0))
    # 1: a window; 2: beside the first, its window again; 3, 4: a new place each; 5: beside the third
    assert ran == [1, 1, 1, 1, 1] and len(click_windows(session, (64, 64, 64), (32, 32, 32))) == 3
    before = len(calls)
    refine(net, image, base, session, (32, 32, 32), 3.0, windows=cache, key=("ct", 2))  # another version: all again
    assert len(calls) - before == 3


# ---------------------------------------------------------------- layouts: with and without guidance
@pytest.mark.parametrize("net", [{}, {"num_res_units": 0}, {"name": "SegResNet", "init_filters": 8,
                                                            "blocks_down": [1, 1], "blocks_up": [1]}])
def test_conversion_between_layouts_is_exact_on_the_zero_click_output(net):
    plain, inter = _cfg(False, **net), _cfg(True, **net)
    torch.manual_seed(0)
    a = build_network(plain).eval()
    b = build_network(inter).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        b.load_state_dict(convert_guidance(a.state_dict(), inter))  # without guidance -> interactive
        assert torch.allclose(a(x), b(x), atol=1e-5)
        assert torch.allclose(b(x), b(torch.cat([x, torch.zeros(2, 3, 32, 32, 32)], 1)))  # padding is zero guidance
        for p in b.parameters():  # a trained interactive model, with non-zero guidance weights
            p.add_(torch.randn_like(p) * 0.01)
        a.load_state_dict(convert_guidance(b.state_dict(), plain))  # interactive -> without guidance
        assert torch.allclose(a(x), b(x), atol=1e-5)
    assert fit_state(a.state_dict(), inter).keys() == b.state_dict().keys()


def test_conversion_refuses_another_architecture_by_name():
    other = build_network(_cfg(False, channels=[4, 8, 32])).state_dict()
    with pytest.raises(ValueError, match=r"guidance conversion: weight backbone\..* has shape"):
        convert_guidance(other, _cfg(True))


def test_interactive_off_keeps_todays_network_and_fingerprint_exactly():
    off = _cfg(False)
    assert off == SiteConfig.model_validate(TINY).model_copy(update={"interactive": off.interactive})
    state = build_network(off).state_dict()
    # the fingerprint of TINY before interactive existed (commit 6ade86b), recomputed from scratch
    assert arch_fingerprint(off, state) == "sha256:55ad8737d088abe0606014ca7b317ffe2e75f4827bf820488ce624bda9f95b09"
    assert arch_fingerprint(SiteConfig.model_validate(TINY), state) == arch_fingerprint(off, state)
    on = toggled_interactive(off)
    assert arch_fingerprint(on, build_network(on).state_dict()) != arch_fingerprint(off, state)
    torch.manual_seed(0)
    w = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(build_network(off).state_dict().items())))
    torch.manual_seed(0)
    w2 = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in
                                 sorted(build_network(SiteConfig.model_validate(TINY)).state_dict().items())))
    assert w.hexdigest() == w2.hexdigest()


# ---------------------------------------------------------------- partners across the rollout
def test_a_partner_without_guidance_is_accepted_and_converted_and_another_layout_refused_by_name():
    from gcml_app.federation.payload import accepted_archs, encode_weights, verify_weights
    from gcml_app.federation.task import task_differences, task_of

    ours, theirs = _cfg(True), _cfg(False)
    plain = build_network(theirs).state_dict()
    fp = arch_fingerprint(theirs, plain)
    assert fp in accepted_archs(ours)
    state = verify_weights(encode_weights(plain, arch=fp), ours)
    assert state.keys() == build_network(ours).state_dict().keys()
    assert all(tuple(v.shape) == tuple(build_network(ours).state_dict()[k].shape) for k, v in state.items())
    assert task_differences(task_of(ours), task_of(theirs), "site-b") == []  # with and without guidance convert
    two = SiteConfig.model_validate({**TINY, "input_channels": 2, "interactive": {"enabled": True}})
    with pytest.raises(ValueError, match="architecture .* differs from ours"):
        verify_weights(encode_weights(build_network(two).state_dict()), ours)
    assert task_differences(task_of(ours), task_of(two), "site-b") == ["input_channels: ours 1, site-b 2"]
    other = {**task_of(ours), "guidance": ["background", "lesion", "organ"]}
    assert "guidance: ours ['background', 'organ', 'lesion'], site-b ['background', 'lesion', 'organ']" in \
        task_differences(task_of(ours), other, "site-b")


def test_a_bundle_without_guidance_starts_an_interactive_site_as_the_bundle_model():
    from gcml_app.ml.bundle import load_backbone

    plain, inter = _cfg(False), _cfg(True)
    torch.manual_seed(1)
    bundle = build_network(plain).backbone.eval()
    net = build_network(inter).eval()
    with pytest.raises(Exception, match="does not fit this network: 2 mis-shaped"):
        load_backbone(net.backbone, bundle.state_dict(), True, "bundle")
    report = load_backbone(net.backbone, bundle.state_dict(), True, "bundle", guidance=3)
    assert report.complete
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), bundle(x), atol=1e-5)
