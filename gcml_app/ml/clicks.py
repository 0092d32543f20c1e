"""Clicks: the guidance signal, simulated clicks for training and evaluation, and refinement around clicks.

Pure ML code (docs/design.md, "Clicks"). A click is ``(channel, (d, h, w))``: a guidance channel
(``0`` background, ``1..n`` the labels in index order, the network's output channels) and a voxel of
the image *in network space* (after orientation and spacing). An interactive network takes the image
plus one guidance channel per output channel; a click's signal is a Gaussian of radius ``sigma`` voxels
with 1 at the click (DeepEdit's), the maximum over a channel's clicks, and exactly zero 4 sigma away.

- :class:`ClickSimulator` gives a training batch its guidance, as DeepEdit's ``Interaction`` does: with
  probability ``click_probability`` per item (every item of the batch, not the first only), seed clicks
  from the label, then rounds of clicks on the model's own errors (forward passes without gradient).
- :func:`refine` answers clicks without a whole-volume pass: the network runs on ``roi_size`` windows
  around the clicks (never a whole-volume resize), and a change is kept only where it is connected to a
  click's neighbourhood, so far from every click the result *is* the auto-segmentation. A window's
  prediction depends only on the image there and the clicks whose signal reaches it, so with a window
  cache a new click costs only the windows it reaches.
- :func:`click_curve` is the evaluation protocol of the DeepEdit and DeepGrow papers: each click at the
  centre of the largest remaining error, deterministic; Dice after k clicks and NoC (clicks to a Dice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage

from gcml_app.ml.device import Precision
from gcml_app.ml.evaluate import channel_argmax, dice_of, predict

__all__ = ["Click", "ClickSimulator", "click_curve", "click_simulator", "click_windows", "clicks_reaching",
           "guidance_signal", "largest_error_click", "refine"]

Click = tuple[int, tuple[int, int, int]]
"""``(guidance channel, (d, h, w))`` in network space; channel 0 is background."""


def guidance_signal(clicks: Iterable[Click], channels: int, shape: Sequence[int], origin: Sequence[int] = (0, 0, 0),
                    sigma: float = 3.0, device: str | torch.device = "cpu") -> torch.Tensor:
    """The guidance channels of a window: per channel, the maximum over its clicks of a Gaussian, 1 at the click.

    Args:
        clicks: clicks in volume coordinates (a click outside the window still reaches into it).
        channels: ``G``, the guidance channels (background plus labels).
        shape: the window's ``(D, H, W)``; ``origin`` its first voxel in the volume.
        sigma: the Gaussian's radius in voxels; the signal is cut to zero beyond ``4 sigma``.

    Returns:
        ``(G, D, H, W)`` float32 in ``[0, 1]``.

    Example:
        >>> guidance_signal([(1, (2, 2, 2))], 2, (5, 5, 5))[1, 2, 2, 2]
        tensor(1.)
    """
    g = torch.zeros((channels, *shape), dtype=torch.float32, device=device)
    r = int(math.ceil(4 * sigma))
    for c, p in clicks:
        if not 0 <= c < channels:
            raise ValueError(f"guidance_signal: found channel {c}; expected 0..{channels - 1}")
        lo = [max(0, int(p[i]) - origin[i] - r) for i in range(3)]
        hi = [min(shape[i], int(p[i]) - origin[i] + r + 1) for i in range(3)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        axes = [torch.arange(lo[i], hi[i], device=device, dtype=torch.float32) - (int(p[i]) - origin[i])
                for i in range(3)]
        d2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
        blob = torch.exp(-d2 / (2 * sigma**2))
        region = g[c, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        torch.maximum(region, blob, out=region)
    return g


def _error_regions(pred, label, n_out: int) -> list[tuple[int, Any]]:
    """``[(channel, voxels of that class the prediction misses)]`` for the channels with errors (numpy arrays or
    tensors alike)."""
    return [(c, m) for c in range(n_out) if (m := (label == c) & (pred != c)).any()]


def _edge_distance(mask: np.ndarray) -> np.ndarray:
    """Each voxel's distance to the nearest voxel outside ``mask`` (outside the volume counts as outside); 0 off it.

    Computed on the mask's bounding box grown by one voxel: every voxel around the box is outside the mask,
    and moving a point outside the box onto the box's surface only brings it closer, so the distances are
    those of the whole volume, at the cost of the box (an error region is often a small part of a crop).
    """
    dist = np.zeros(mask.shape, np.float64)
    axes = range(mask.ndim)
    spans = [np.flatnonzero(mask.any(axis=tuple(b for b in axes if b != a))) for a in axes]
    if not spans[0].size:
        return dist
    box = tuple(slice(int(r[0]), int(r[-1]) + 1) for r in spans)
    dist[box] = ndimage.distance_transform_edt(np.pad(mask[box], 1))[1:-1, 1:-1, 1:-1]
    return dist


def _sample_in(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A voxel of ``mask`` drawn with probability proportional to its distance from the mask's edge (DeepEdit)."""
    dist = _edge_distance(mask).ravel()
    p = dist / dist.sum()
    return tuple(int(i) for i in np.unravel_index(rng.choice(dist.size, p=p), mask.shape))


def _edge_distance_on_device(mask: torch.Tensor, chunk: int = 2**25) -> torch.Tensor:
    """:func:`_edge_distance` with PyTorch where ``mask`` is (a GPU): the exact Euclidean distance transform.

    Separable, one axis at a time: ``f(i) = min_j f(j) + (i - j)^2`` over each line, taken by brute force
    (``n^2`` a line of ``n`` voxels: 0.1 GFLOP for a 96³ box, a few milliseconds on a GPU) in float64, so the
    squared distances are exact integers and their square roots equal scipy's bit for bit (tested on the CPU).

    Args:
        mask: ``(D, H, W)`` bool on any device.
        chunk: the most elements one brute-force block holds (2^25 float64: 256 MB).
    """
    dist = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    spans = [torch.nonzero(mask.any(dim=tuple(b for b in range(3) if b != a))).flatten() for a in range(3)]
    if not spans[0].numel():
        return dist
    box = tuple(slice(int(r[0]), int(r[-1]) + 1) for r in spans)
    f = torch.nn.functional.pad(mask[box], (1, 1, 1, 1, 1, 1))
    f = torch.where(f, torch.inf, 0.0).to(torch.float64)  # squared distance to outside: 0 there, unknown inside
    for axis in range(3):
        f = f.movedim(axis, -1).contiguous()
        n = f.shape[-1]
        i = torch.arange(n, dtype=torch.float64, device=f.device)
        sq = (i[:, None] - i[None, :]) ** 2
        lines = f.reshape(-1, n)
        out = torch.empty_like(lines)
        step = max(1, chunk // (n * n))
        for s in range(0, lines.shape[0], step):
            out[s:s + step] = (lines[s:s + step, None, :] + sq).amin(-1)
        f = out.reshape(f.shape).movedim(-1, axis)
    dist[box] = f.sqrt()[1:-1, 1:-1, 1:-1]
    return dist


def _sample_on_device(mask: torch.Tensor, generator: torch.Generator) -> tuple[int, int, int]:
    """:func:`_sample_in` where ``mask`` is, with ``generator``: the same distribution, drawn by inverting the
    cumulative distances at one uniform number."""
    dist = _edge_distance_on_device(mask).flatten()
    cdf = dist.cumsum(0)
    u = torch.rand((), generator=generator, device=dist.device, dtype=torch.float64) * cdf[-1]
    k = min(int(torch.searchsorted(cdf, u, right=True)), dist.numel() - 1)
    return tuple(int(i) for i in np.unravel_index(k, tuple(mask.shape)))


def _present(label: np.ndarray | torch.Tensor) -> list[int]:
    """The classes present in an integer label volume, in order (np.unique's, without its sort)."""
    if isinstance(label, torch.Tensor):
        return torch.bincount(label.flatten()).nonzero().flatten().tolist()
    return np.flatnonzero(np.bincount(label.ravel())).tolist()


def largest_error_click(pred: np.ndarray, label: np.ndarray, n_out: int) -> Click | None:
    """The evaluation click: at the centre (farthest from its edge) of the largest connected error region.

    An error region of channel ``c`` is a connected set of voxels whose truth is ``c`` and whose prediction is
    not (``c = 0``: a false positive, answered with a background click). Ties go to the lower channel and the
    first voxel, so the protocol is deterministic.

    Args:
        pred, label: ``(D, H, W)`` integer volumes in channels ``0..n_out-1``.

    Returns:
        the click, or ``None`` when the prediction is perfect.
    """
    best: tuple[int, int, np.ndarray] | None = None
    for c, mask in _error_regions(pred, label, n_out):
        comps, n = ndimage.label(mask)
        sizes = np.bincount(comps.ravel())[1:]
        k = int(sizes.argmax())
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), c, comps == k + 1)
    if best is None:
        return None
    _, c, comp = best
    return c, tuple(int(i) for i in np.unravel_index(int(_edge_distance(comp).argmax()), comp.shape))


class ClickSimulator:
    """Simulated clicks for a training batch (DeepEdit's recipe, on every item of the batch).

    Each item carries clicks with probability ``click_probability``, else zero guidance. A clicked item
    gets one seed click per class present in its label crop (background included), drawn inside the class
    with probability proportional to the distance from its edge; then ``train_clicks`` times, the model
    predicts with the guidance so far (no gradient, eval mode) and each class it misses gets a click in its
    error region, drawn the same way.

    Args:
        channels: ``G = n_out``, the guidance channels.
        click_probability, train_clicks, sigma: ``interactive`` settings.
        seed: the round's seed (a generator of its own: the crops' random stream is untouched).

    Example:
        >>> sim = ClickSimulator(3, 0.5, 1, 3.0, seed=0)
        >>> x_g = sim(model, x, y)  # (B, C_in, D, H, W) -> (B, C_in + 3, D, H, W)
    """

    def __init__(self, channels: int, click_probability: float, train_clicks: int, sigma: float, seed: int = 0,
                 on_device: bool | None = None):
        if not 0.0 <= click_probability <= 1.0:
            raise ValueError(f"ClickSimulator: found click_probability={click_probability}; expected 0..1")
        self.channels, self.p, self.rounds, self.sigma = channels, click_probability, train_clicks, sigma
        self.rng = np.random.default_rng(seed)
        self.on_device = on_device
        self.forward_passes = 0  # crops passed forward without gradient (the cost of the simulation)

    def _signal(self, clicks: list[list[Click]], like: torch.Tensor) -> torch.Tensor:
        shape = like.shape[2:]
        return torch.stack([guidance_signal(c, self.channels, shape, sigma=self.sigma, device=like.device)
                            for c in clicks]).to(like.dtype)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x (B, C_in, D, H, W)`` and ``y (B, 1, D, H, W)`` -> ``(B, C_in + G, D, H, W)``.

        On a GPU (``on_device``, default: where ``x`` is CUDA) the clicks are drawn there: the same exact
        distances and distribution, with a torch generator seeded from the simulator's own. On the CPU, scipy
        and numpy draw them (the clicks of the recorded runs).
        """
        b = x.shape[0]
        use = self.rng.random(b) < self.p
        clicks: list[list[Click]] = [[] for _ in range(b)]
        if not use.any():
            return torch.cat([x, x.new_zeros((b, self.channels, *x.shape[2:]))], dim=1)
        here = self.on_device if self.on_device is not None else x.device.type == "cuda"
        if here:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(int(self.rng.integers(2**62)))
            labels = y[:, 0].detach().long()

            def draw(mask):
                return _sample_on_device(mask, generator)
        else:
            labels = y[:, 0].detach().to("cpu", torch.int64).numpy()

            def draw(mask):
                return _sample_in(mask, self.rng)
        for i in np.flatnonzero(use):
            clicks[i] = [(c, draw(labels[i] == c)) for c in _present(labels[i])]
        idx = torch.as_tensor(np.flatnonzero(use), device=x.device)
        for _ in range(self.rounds):
            was_training = model.training
            model.eval()
            with torch.no_grad():
                pred = model(torch.cat([x[idx], self._signal([clicks[i] for i in idx.tolist()], x)], dim=1))
            model.train(was_training)
            self.forward_passes += len(idx)
            pred = [channel_argmax(z) if here else channel_argmax(z.cpu()).numpy() for z in pred]
            for j, i in enumerate(idx.tolist()):
                clicks[i] += [(c, draw(m)) for c, m in _error_regions(pred[j], labels[i], self.channels)]
        return torch.cat([x, self._signal(clicks, x)], dim=1)


def click_simulator(cfg, seed: int) -> ClickSimulator | None:
    """The round's :class:`ClickSimulator` for a site config (``None``: ``interactive.enabled`` is off)."""
    it = cfg.interactive
    if not it.enabled:
        return None
    return ClickSimulator(cfg.out_channels, it.click_probability, it.train_clicks, it.sigma, seed)


def click_windows(clicks: Sequence[Click], shape: Sequence[int], roi: Sequence[int]) -> list[tuple[int, int, int]]:
    """Origins of ``roi`` windows that hold every click in their central half, greedily, in click order.

    A window is centred on a click and moved inside the volume; a later click already in the central half
    of a window (a quarter ROI from each of its sides, or the volume's edge) needs no window of its own.
    """
    origins: list[tuple[int, int, int]] = []

    def covered(p, o):
        return all((o[i] + roi[i] // 4 <= p[i] or o[i] == 0) and (p[i] < o[i] + roi[i] - roi[i] // 4
                   or o[i] + roi[i] >= shape[i]) for i in range(3))

    for _, p in clicks:
        if any(covered(p, o) for o in origins):
            continue
        origins.append(tuple(int(min(max(0, p[i] - roi[i] // 2), max(0, shape[i] - roi[i]))) for i in range(3)))
    return origins


def clicks_reaching(clicks: Sequence[Click], origin: Sequence[int], roi: Sequence[int],
                    sigma: float) -> tuple[Click, ...]:
    """The clicks whose guidance signal reaches the window at ``origin`` (their ``4 sigma`` box meets it), sorted.

    The window's whole input, and so its prediction, is the image there plus the signal of these clicks
    (:func:`guidance_signal` is exactly zero beyond ``4 sigma``): with the same image, network and these
    clicks, the window's prediction is the same, whatever other clicks the request carries.
    """
    r = int(math.ceil(4 * sigma))
    return tuple(sorted((int(c), tuple(int(v) for v in p)) for c, p in clicks
                        if all(origin[i] - r <= p[i] < origin[i] + roi[i] + r for i in range(3))))


class _Windows(Protocol):
    def get(self, key: tuple) -> Any: ...

    def put(self, key: tuple, value: Any) -> None: ...


@torch.no_grad()
def refine(model: torch.nn.Module, image: torch.Tensor, base: torch.Tensor, clicks: Sequence[Click],
           roi_size: Sequence[int], sigma: float = 3.0, device: str | torch.device = "cpu",
           amp: Precision | None = None, windows: _Windows | None = None, key: tuple = ()) -> torch.Tensor:
    """The segmentation after ``clicks``: the network on windows around them, merged into ``base`` near them.

    Each window (:func:`click_windows`) is ``roi_size`` at network spacing, holds the image and the guidance
    of *every* click, and is predicted in one forward pass. A voxel whose prediction differs from ``base`` is
    kept only if its connected region of changes reaches within ``3 sigma`` of a click: a foreground click in
    a missed organ adds the organ, a background click on a false positive removes it, and a change far from
    every click (a window's edge) is dropped, so there the result equals ``base``.

    Slicer sends every click so far with each request; with ``windows`` (a cache with ``get``/``put``) a
    window whose reaching clicks (:func:`clicks_reaching`) are unchanged is not run again, so a new click
    costs the windows its signal reaches, not all of them. The answer is the same with or without it.

    Args:
        model: an interactive network, ``(1, C_in + G, *roi)`` -> logits ``(1, G, *roi)``.
        image: ``(C_in, D, H, W)`` in network space.
        base: ``(1, D, H, W)`` the zero-click prediction (channels ``0..G-1``).
        clicks: in network space.
        windows: window predictions ``(d, h, w)`` uint8 by ``(*key, origin, reaching clicks)``.
        key: what else a window's prediction depends on: the image, the network's version, the device.

    Returns:
        ``(1, D, H, W)`` uint8 on ``base``'s device.
    """
    if not clicks:
        return base.clone()
    device = torch.device(device)
    shape = tuple(image.shape[1:])
    roi = [int(r) for r in roi_size]
    channels = int(getattr(model, "guidance_channels", 0) or 0)
    if channels < 1:
        raise ValueError("refine: the network has no guidance channels; expected interactive.enabled")
    amp = amp or Precision(device.type)
    new = base[0].clone()
    touched = torch.zeros(shape, dtype=torch.bool, device=base.device)
    box_lo, box_hi = list(shape), [0, 0, 0]
    for o in click_windows(clicks, shape, roi):
        hi = [min(shape[i], o[i] + roi[i]) for i in range(3)]
        sl = tuple(slice(o[i], hi[i]) for i in range(3))
        win = [hi[i] - o[i] for i in range(3)]
        reach = clicks_reaching(clicks, o, roi, sigma)  # the window's input: the image and these clicks' signal
        wkey = (*key, tuple(roi), float(sigma), o, reach)
        pred = windows.get(wkey) if windows is not None else None
        if pred is None:
            x = torch.zeros((1, image.shape[0] + channels, *roi), dtype=torch.float32, device=device)
            x[0, :image.shape[0], :win[0], :win[1], :win[2]] = image[(slice(None), *sl)].to(device, torch.float32)
            x[0, image.shape[0]:] = guidance_signal(reach, channels, roi, o, sigma, device)
            with amp.autocast():
                z = model(x)
            pred = channel_argmax(z[0, :, :win[0], :win[1], :win[2]]).to(base.device)
            if windows is not None:
                windows.put(wkey, pred)
        new[sl] = pred
        touched[sl] = True
        box_lo = [min(box_lo[i], o[i]) for i in range(3)]
        box_hi = [max(box_hi[i], hi[i]) for i in range(3)]
    box = tuple(slice(box_lo[i], box_hi[i]) for i in range(3))
    diff = ((new[box] != base[0][box]) & touched[box]).cpu().numpy()
    out = base.clone()
    if not diff.any():
        return out
    comps, _ = ndimage.label(diff)
    near = np.zeros_like(diff)
    r = int(math.ceil(3 * sigma))
    for _, p in clicks:
        q = [p[i] - box_lo[i] for i in range(3)]
        lo = [max(0, q[i] - r) for i in range(3)]
        hi = [min(diff.shape[i], q[i] + r + 1) for i in range(3)]
        if all(a < b for a, b in zip(lo, hi)):
            near[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    keep_ids = np.unique(comps[near & diff])
    keep = torch.from_numpy(np.isin(comps, keep_ids[keep_ids > 0])).to(base.device)
    region = out[0][box]
    region[keep] = new[box][keep]
    return out


def click_curve(model: torch.nn.Module, cases: Iterable[Mapping[str, torch.Tensor]], n_labels: int,
                roi_size: Sequence[int], clicks: Sequence[int] = (0, 1, 3, 5, 10), noc: Sequence[float] = (),
                cap: int = 20, sigma: float = 3.0, sw_batch_size: int = 1, overlap: float = 0.25,
                device: str | torch.device = "cpu", amp: Precision | None = None) -> list[dict]:
    """Dice after k simulated clicks, and clicks needed to reach a Dice (NoC), per case.

    The protocol of the DeepEdit and DeepGrow papers: start from the zero-click prediction; each click is at
    the centre of the largest remaining error (:func:`largest_error_click`), the segmentation is recomputed
    from all clicks so far (:func:`refine`, what ``gcml_edit`` answers). Deterministic for a model and case.

    Args:
        cases: ``image (C_in, D, H, W)`` and ``label (1, D, H, W)`` in channels ``0..n_labels``.
        clicks: the k at which Dice is reported (0: the auto-segmentation).
        noc: Dice thresholds (e.g. ``(0.85, 0.9)``) whose NoC is counted, up to ``cap`` clicks (``cap`` when
            not reached).

    Returns:
        per case ``{"dice": {k: mean Dice over labels}, "noc": {threshold: clicks}}``.
    """
    model.eval()
    n_out = n_labels + 1
    horizon = max([*clicks, cap if noc else 0])
    out = []
    for case in cases:
        image, label = case["image"], case["label"]
        base = predict(model, image, tuple(roi_size), sw_batch_size, overlap, device, amp, n_out).cpu()
        truth = label.to("cpu")
        lab = truth[0].numpy().astype(np.int64)
        pred, placed, curve = base, [], []
        curve.append(float(np.mean(dice_of(pred, truth, n_labels))))
        for _ in range(horizon):
            click = largest_error_click(pred[0].numpy().astype(np.int64), lab, n_out)
            if click is not None:
                placed.append(click)
                pred = refine(model, image, base, placed, roi_size, sigma, device, amp).cpu()
            curve.append(float(np.mean(dice_of(pred, truth, n_labels))))
        row = {"dice": {k: curve[k] for k in clicks},
               "noc": {t: next((k for k, d in enumerate(curve[:cap + 1]) if d >= t), cap) for t in noc}}
        out.append(row)
    return out
