"""Deep contrastive mutual learning (DCML): losses, one step for two models, and the epoch loop.

Our specification (docs/design.md, "DCML"): the local model L and a trainable copy of an incoming
peer model I train together on the site's labelled cases, each with its own optimizer::

    loss_L = DiceCE(z_L, y) + w(t) lambda_kl KL_trust(z_L <- z_I) + lambda_con InfoNCE(e_L <- e_I)
    loss_I = DiceCE(z_I, y) + w(t) lambda_kl KL_trust(z_I <- z_L) + lambda_con InfoNCE(e_I <- e_L)

``w(t)`` ramps the distillation in over the start of a round (:func:`kl_ramp`); ``KL_trust``
distils only where the teacher agrees with the label, with a bounded foreground up-weighting
(:func:`distill_kl`).

The teacher side of every cross term is detached, so ``loss_L`` reaches only L's parameters and
``loss_I`` only I's. Pure ML code: no HTTP, no MONAI Label imports.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from gcml_app.config import DCMLConfig
from gcml_app.ml.network import GCMLNet

__all__ = [
    "DCMLStep",
    "average_state",
    "dcml_step",
    "dcml_train",
    "distill_kl",
    "foreground_region",
    "infonce",
    "kl_ramp",
    "labels_at",
    "mutual_infonce",
    "mutual_kl",
    "sample_voxels",
    "supervised_step",
    "supervised_train",
    "voxel_infonce",
    "voxel_weights",
]


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: found shapes {tuple(a.shape)} and {tuple(b.shape)}; expected equal shapes "
                         "(the same number of classes and the same spatial size)")


def distill_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    dilation: int = 2,
    mask: str = "agree",
    fg_weight_max: float = 3.0,
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` where the teacher can be trusted.

    The voxel-wise KL is averaged over **all** voxels with weights: 1 for a background voxel,
    ``min(n_bg / n_fg, fg_weight_max)`` for a foreground voxel (labels > 0, dilated by ``dilation``),
    and 0 where ``mask="agree"`` and the teacher's argmax differs from the label. Because the
    untrusted voxels stay in the denominator, a teacher that is wrong on our data pulls in
    proportion to how often it is right. The teacher is detached.

    Args:
        student: logits ``(B, C, D, H, W)`` of the model being trained.
        teacher: logits ``(B, C, D, H, W)`` of the other model.
        labels: ``(B, 1, D, H, W)`` class indices.
        temperature: softening temperature T > 0.
        dilation: foreground dilation in voxels (>= 0).
        mask: ``"agree"`` (distil only where the teacher predicts the label) or ``"none"``.
        fg_weight_max: bound (>= 1) on the foreground up-weighting.

    Returns:
        a scalar; exactly 0 when ``student`` equals ``teacher``.

    Raises:
        ValueError: mismatched shapes or class counts, ``temperature <= 0``, ``dilation < 0``, an
            unknown ``mask`` or ``fg_weight_max < 1``.

    Example:
        >>> distill_kl(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))
        tensor(0.)
    """
    _check_pair(student, teacher, "distill_kl logits")
    _check_kl(temperature, dilation, mask, fg_weight_max, "distill_kl")
    if labels.shape[0] != student.shape[0] or labels.shape[2:] != student.shape[2:]:
        raise ValueError(f"distill_kl: found labels {tuple(labels.shape)} for logits {tuple(student.shape)}; "
                         "expected (B, 1, D, H, W) matching the logits")
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    weights = voxel_weights(labels, dilation, fg_weight_max)
    return _weighted_kl(log_s, log_t, labels, weights, temperature, mask)


def _check_kl(temperature: float, dilation: int, mask: str, fg_weight_max: float, what: str) -> None:
    if temperature <= 0:
        raise ValueError(f"{what}: found temperature={temperature}; expected T > 0")
    if dilation < 0:
        raise ValueError(f"{what}: found dilation={dilation}; expected >= 0")
    if mask not in KL_MASKS:
        raise ValueError(f"{what}: found mask={mask!r}; expected one of {list(KL_MASKS)}")
    if fg_weight_max < 1:
        raise ValueError(f"{what}: found fg_weight_max={fg_weight_max}; expected >= 1")


KL_MASKS = ("agree", "none")


def voxel_weights(labels: torch.Tensor, dilation: int, fg_weight_max: float) -> torch.Tensor:
    """``(B, D, H, W)`` KL weights: 1 on background, ``min(n_bg / n_fg, fg_weight_max)`` on the dilated foreground.

    The ratio is over the whole batch, so the foreground and the background weigh the same in total
    unless that would give a foreground voxel more than ``fg_weight_max`` times a background voxel.
    """
    fg = foreground_region(labels, dilation)[:, 0]
    n_fg = fg.sum()
    n_bg = fg.numel() - n_fg
    ratio = (n_bg / n_fg.clamp(min=1.0)).clamp(min=1.0, max=fg_weight_max)
    return 1.0 + (ratio - 1.0) * fg


def _weighted_kl(log_s: torch.Tensor, log_t: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 temperature: float, mask: str) -> torch.Tensor:
    """``T^2 * sum(w * trust * KL) / sum(w)`` over voxels (teacher detached); see :func:`distill_kl`."""
    log_t = log_t.detach()
    kl = (log_t.exp() * (log_t - log_s)).sum(1)  # (B, D, H, W)
    w = weights
    if mask == "agree":
        # the teacher is right where the label's probability is the largest (a tie counts as right), as a
        # maximum over channel slices: max(1) also computes indices and costs ~4x as much on CPU
        top = functools.reduce(torch.maximum, log_t.unbind(1))
        w = w * (log_t.gather(1, labels.long()).squeeze(1) >= top).to(w.dtype)
    return temperature**2 * (kl * w).sum() / weights.sum()


def mutual_kl(
    z_l: torch.Tensor,
    z_i: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    dilation: int = 2,
    mask: str = "agree",
    fg_weight_max: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of :func:`distill_kl`, sharing the softmaxes and the voxel weights.

    Returns:
        ``(KL(L <- I), KL(I <- L))``: each student gets gradients, each teacher is detached; with
        ``mask="agree"`` each direction trusts only the voxels where its teacher is right.
    """
    _check_pair(z_l, z_i, "mutual_kl logits")
    _check_kl(temperature, dilation, mask, fg_weight_max, "mutual_kl")
    log_l = F.log_softmax(z_l / temperature, dim=1)
    log_i = F.log_softmax(z_i / temperature, dim=1)
    w = voxel_weights(labels, dilation, fg_weight_max)
    return (_weighted_kl(log_l, log_i, labels, w, temperature, mask),
            _weighted_kl(log_i, log_l, labels, w, temperature, mask))


def kl_ramp(step: int, total: int, rampup: float) -> float:
    """The KL weight ``w(t)`` at ``step`` (0-based) of a round of ``total`` steps.

    A sigmoid ramp ``exp(-5 (1 - t)^2)`` with ``t = step / (rampup * total)``, 1 after the ramp
    (Laine & Aila's schedule for consistency terms); ``rampup = 0`` gives 1 from the first step.

    Example:
        >>> [round(kl_ramp(s, 10, 0.5), 3) for s in (0, 2, 5, 9)]
        [0.007, 0.165, 1.0, 1.0]
    """
    if rampup <= 0 or total <= 0:
        return 1.0
    t = min(1.0, step / (rampup * total))
    return math.exp(-5.0 * (1.0 - t) ** 2)


def foreground_region(labels: torch.Tensor, dilation: int) -> torch.Tensor:
    """``(B, 1, D, H, W)`` float mask of ``labels > 0`` dilated by a ``(2 * dilation + 1)^3`` box.

    The box is separable: along each axis in turn, a voxel is set if one within ``dilation`` of it
    is (shifted ORs on a boolean mask; the same result as a box max-pool, about 9x faster on CPU,
    where ``max_pool3d`` also computes indices).
    """
    fg = labels > 0
    for dim in range(2, fg.dim()) if dilation else ():
        out, n = fg.clone(), fg.shape[dim]
        for s in range(1, min(dilation, n - 1) + 1):
            out.narrow(dim, s, n - s).logical_or_(fg.narrow(dim, 0, n - s))
            out.narrow(dim, 0, n - s).logical_or_(fg.narrow(dim, s, n - s))
        fg = out
    return fg.float()


def labels_at(labels: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resample of ``labels (B, 1, D, H, W)`` to the feature grid ``size = (d, h, w)``."""
    if tuple(labels.shape[2:]) == tuple(size):
        return labels
    return F.interpolate(labels.float(), size=size, mode="nearest").long()


def sample_voxels(
    labels: torch.Tensor, samples_per_class: int, generator: torch.Generator | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Class-balanced voxel sampling: up to ``samples_per_class`` voxels of each present class per volume.

    Args:
        labels: ``(B, 1, d, h, w)`` class indices.

    Returns:
        per volume, ``(idx (M,), cls (M,))``: flat voxel indices and their classes.
    """
    out = []
    for y in labels.flatten(1):
        picks = []
        for c in torch.unique(y):
            idx = torch.nonzero(y == c, as_tuple=True)[0]
            if len(idx) > samples_per_class:
                idx = idx[torch.randperm(len(idx), generator=generator, device="cpu")[:samples_per_class].to(idx.device)]
            picks.append(idx)
        idx = torch.cat(picks)
        out.append((idx, y[idx]))
    return out


def infonce(anchors: torch.Tensor, others: torch.Tensor, classes: torch.Tensor, tau: float) -> torch.Tensor | None:
    """InfoNCE over M sampled voxels: anchor i, positive ``others[i]``, negatives ``others[j]`` of other classes.

    Args:
        anchors: ``(M, E)`` unit embeddings of the model being trained.
        others: ``(M, E)`` unit embeddings of the other model at the same voxels (used detached).
        classes: ``(M,)`` class of each voxel.

    Returns:
        the mean loss over anchors that have at least one negative, or ``None`` if none has.
    """
    keep = classes[:, None] != classes[None, :]
    has_neg = keep.any(1)
    if not has_neg.any():
        return None
    sim = anchors @ others.detach().T / tau  # (M, M)
    keep |= torch.eye(len(classes), dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(~keep, float("-inf"))
    target = torch.arange(len(classes), device=sim.device)
    return F.cross_entropy(sim[has_neg], target[has_neg])


def _infonce_both(e_l: torch.Tensor, e_i: torch.Tensor, classes: torch.Tensor, tau: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`infonce` in both directions at once, for M voxels of at least two classes (so every anchor
    has a negative): the same-class mask is built once, as an additive ``-inf`` bias both share."""
    m = len(classes)
    same = classes[:, None] == classes[None, :]
    same.fill_diagonal_(False)  # the positive stays
    bias = torch.zeros(m, m, device=e_l.device, dtype=e_l.dtype).masked_fill_(same, float("-inf"))
    target = torch.arange(m, device=e_l.device)
    loss_l = F.cross_entropy(e_l @ e_i.detach().T / tau + bias, target)
    loss_i = F.cross_entropy(e_i @ e_l.detach().T / tau + bias, target)
    return loss_l, loss_i


def voxel_infonce(
    anchors: torch.Tensor,
    others: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 0.1,
    samples_per_class: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-model voxel InfoNCE with class-balanced sampling.

    In each volume up to ``samples_per_class`` voxels of every present class are sampled. Each
    sampled voxel's anchor embedding (this model) has as positive the other model's embedding at the
    same voxel, and as negatives the other model's embeddings at the sampled voxels of *other*
    classes. The other model is detached. Anchors with no negatives (a volume with one class) are
    left out; with none at all the loss is 0 (still differentiable), never NaN.

    Args:
        anchors: unit embeddings ``(B, E, d, h, w)`` of the model being trained.
        others: unit embeddings ``(B, E, d, h, w)`` of the other model.
        labels: class indices ``(B, 1, d, h, w)`` on the embedding grid (see :func:`labels_at`).
        tau: temperature > 0.
        samples_per_class: voxels sampled per class per volume (>= 1).
        generator: random source for the sampling (for reproducible tests).

    Returns:
        a scalar: the mean of ``-log(exp(a.p/tau) / (exp(a.p/tau) + sum_n exp(a.n/tau)))``.
    """
    _check_pair(anchors, others, "voxel_infonce embeddings")
    _check_infonce(tau, samples_per_class)
    if labels.shape[0] != anchors.shape[0] or labels.shape[2:] != anchors.shape[2:]:
        raise ValueError(f"voxel_infonce: found labels {tuple(labels.shape)} for embeddings {tuple(anchors.shape)}; "
                         "expected (B, 1, d, h, w) on the embedding grid")
    losses = []
    for a, o, (idx, cls) in zip(anchors.flatten(2), others.flatten(2), sample_voxels(labels, samples_per_class, generator)):
        loss = infonce(a[:, idx].T, o[:, idx].T, cls, tau)
        if loss is not None:
            losses.append(loss)
    return torch.stack(losses).mean() if losses else anchors.sum() * 0.0


def _check_infonce(tau: float, samples_per_class: int) -> None:
    if tau <= 0:
        raise ValueError(f"voxel_infonce: found tau={tau}; expected tau > 0")
    if samples_per_class < 1:
        raise ValueError(f"voxel_infonce: found samples_per_class={samples_per_class}; expected >= 1")


def mutual_infonce(
    local: GCMLNet,
    incoming: GCMLNet,
    feats_l: torch.Tensor,
    feats_i: torch.Tensor,
    labels: torch.Tensor,
    cfg: DCMLConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of :func:`voxel_infonce`, embedding only the sampled voxels.

    The projection head is point-wise, so gathering decoder features ``(B, F, d, h, w)`` at the M
    sampled voxels first and embedding those ``(M, F)`` (:meth:`GCMLNet.embed_points`) gives the same
    embeddings as embedding the whole grid, at a fraction of the cost. Both directions use the same
    sampled voxels.

    Returns:
        ``(InfoNCE(L <- I), InfoNCE(I <- L))``.
    """
    _check_infonce(cfg.tau, cfg.samples_per_class)
    y = labels_at(labels, tuple(feats_l.shape[2:]))
    out_l, out_i = [], []
    for fl, fi, (idx, cls) in zip(feats_l.flatten(2), feats_i.flatten(2), sample_voxels(y, cfg.samples_per_class, generator)):
        if len(torch.unique(cls)) < 2:  # one class in this volume: no anchor has a negative
            continue
        # index_select, not fl[:, idx]: its backward is index_add_, several times faster on CPU than index_put_
        e_l = local.embed_points(fl.index_select(1, idx).T)  # (M, E)
        e_i = incoming.embed_points(fi.index_select(1, idx).T)
        loss_l, loss_i = _infonce_both(e_l, e_i, cls, cfg.tau)
        out_l.append(loss_l)
        out_i.append(loss_i)
    if not out_l:
        zero = (feats_l.sum() + feats_i.sum()) * 0.0
        return zero, zero
    return torch.stack(out_l).mean(), torch.stack(out_i).mean()


@dataclass
class DCMLStep:
    """Loss components of one step (floats), for the local (``_l``) and incoming (``_i``) models."""

    seg_l: float
    kl_l: float
    con_l: float
    seg_i: float
    kl_i: float
    con_i: float


def _check_cfg(cfg: DCMLConfig) -> None:
    # DCMLConfig validates YAML input; this also guards objects built with model_construct().
    for name in ("lambda_kl", "lambda_con"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"dcml.{name}: found {getattr(cfg, name)}; expected >= 0")
    for name in ("temperature", "tau"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"dcml.{name}: found {getattr(cfg, name)}; expected > 0")


def supervised_step(model: GCMLNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    seg_loss: Callable | None = None) -> float:
    """One single-model DiceCE step (the baseline DCML is compared with)."""
    seg_loss = seg_loss or DiceCELoss(to_onehot_y=True, softmax=True)
    opt.zero_grad(set_to_none=True)
    loss = seg_loss(model(x), y)
    if torch.isfinite(loss):  # a diverged step is skipped, never applied
        loss.backward()
        opt.step()
    return float(loss.detach())


def supervised_train(
    model: GCMLNet,
    batches: Iterable[Mapping[str, torch.Tensor]],
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    progress: Callable[[dict], None] | None = None,
) -> list[dict[str, float]]:
    """Plain DiceCE training of one model for ``epochs`` passes over ``batches`` (a local round).

    Args:
        batches: re-iterable of ``{"image": (B, C_in, D, H, W), "label": (B, 1, D, H, W)}``.
        progress: called after each epoch with ``{"epoch", "total_epochs", "loss"}``.

    Returns:
        ``[{"seg_l": mean loss}]`` per epoch.
    """
    if epochs < 1:
        raise ValueError(f"supervised_train: found epochs={epochs}; expected >= 1")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        steps = [supervised_step(model, opt, b["image"].to(device), b["label"].to(device), loss_fn) for b in batches]
        history.append({"seg_l": sum(steps) / max(len(steps), 1)})
        if progress:
            progress({"epoch": epoch, "total_epochs": epochs, "loss": history[-1]["seg_l"]})
    return history


def dcml_step(
    local: GCMLNet,
    incoming: GCMLNet,
    opt_l: torch.optim.Optimizer,
    opt_i: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DCMLConfig,
    seg_loss: Callable | None = None,
    generator: torch.Generator | None = None,
    kl_weight: float = 1.0,
) -> DCMLStep:
    """One DCML step: both models forward on ``x``, each loss backpropagates into its own model only.

    Args:
        local, incoming: the two models (same number of output classes).
        opt_l, opt_i: their optimizers; each holds only its own model's parameters.
        x: images ``(B, C_in, D, H, W)``.
        y: labels ``(B, 1, D, H, W)`` with channel indices ``0..C-1``.
        cfg: the DCML weights and temperatures. A zero weight skips its term entirely, so
            ``lambda_kl = lambda_con = 0`` is exactly two independent supervised steps.
        generator: random source of the contrastive voxel sampling.
        kl_weight: the ramp ``w(t)`` in ``[0, 1]`` that multiplies ``lambda_kl`` (see :func:`kl_ramp`).

    Returns:
        the step's loss components (the KL unweighted).
    """
    _check_cfg(cfg)
    seg_loss = seg_loss or DiceCELoss(to_onehot_y=True, softmax=True)
    opt_l.zero_grad(set_to_none=True)
    opt_i.zero_grad(set_to_none=True)
    if cfg.lambda_con:
        z_l, f_l = local.logits_and_features(x)
        z_i, f_i = incoming.logits_and_features(x)
    else:  # no contrastive term: no features needed
        z_l, z_i = local(x), incoming(x)
    _check_pair(z_l, z_i, "dcml_step logits")
    zero = z_l.new_zeros(())
    seg_l, seg_i = seg_loss(z_l, y), seg_loss(z_i, y)
    kl_l = kl_i = con_l = con_i = zero
    if cfg.lambda_kl:
        kl_l, kl_i = mutual_kl(z_l, z_i, y, cfg.temperature, cfg.dilation, cfg.kl_mask, cfg.fg_weight_max)
    if cfg.lambda_con:
        con_l, con_i = mutual_infonce(local, incoming, f_l, f_i, y, cfg, generator)
    w_kl = cfg.lambda_kl * kl_weight
    loss_l = seg_l + w_kl * kl_l + cfg.lambda_con * con_l
    loss_i = seg_i + w_kl * kl_i + cfg.lambda_con * con_i
    # Disjoint graphs: the teacher side of every cross term is detached. A model whose loss is not finite
    # (e.g. a partner model that overflows) skips this step; the other still learns, and never from NaN.
    ok_l, ok_i = bool(torch.isfinite(loss_l)), bool(torch.isfinite(loss_i))
    if ok_l or ok_i:
        ((loss_l if ok_l else zero) + (loss_i if ok_i else zero)).backward()
    if ok_l:
        opt_l.step()
    if ok_i:
        opt_i.step()
    return DCMLStep(*(float(t.detach()) for t in (seg_l, kl_l, con_l, seg_i, kl_i, con_i)))


def dcml_train(
    local: GCMLNet,
    incoming: GCMLNet,
    batches: Iterable[Mapping[str, torch.Tensor]],
    cfg: DCMLConfig,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    progress: Callable[[dict], None] | None = None,
    seed: int = 0,
) -> tuple[GCMLNet, GCMLNet, list[dict[str, float]]]:
    """Train ``local`` and ``incoming`` together for ``epochs`` passes over ``batches``.

    The KL weight ramps up over the first ``cfg.kl_rampup`` of the round's steps (:func:`kl_ramp`);
    the contrastive sampling draws from a generator seeded with ``seed``.

    Args:
        batches: re-iterable of ``{"image": (B, C_in, D, H, W), "label": (B, 1, D, H, W)}`` with a length.
        progress: called after each epoch with ``{"epoch", "total_epochs", **mean loss components}``.
        seed: seed of the voxel-sampling generator.

    Returns:
        both models (trained in place) and the per-epoch mean of every loss component.
    """
    if epochs < 1:
        raise ValueError(f"dcml_train: found epochs={epochs}; expected >= 1")
    opt_l = torch.optim.AdamW(local.parameters(), lr=lr, weight_decay=weight_decay)
    opt_i = torch.optim.AdamW(incoming.parameters(), lr=lr, weight_decay=weight_decay)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    generator = torch.Generator().manual_seed(seed)
    total = epochs * len(batches)
    step = 0
    history = []
    for epoch in range(1, epochs + 1):
        local.train()
        incoming.train()
        steps = []
        for b in batches:
            w = kl_ramp(step, total, cfg.kl_rampup)
            steps.append(dcml_step(local, incoming, opt_l, opt_i, b["image"].to(device), b["label"].to(device), cfg,
                                   seg_loss, generator, w))
            step += 1
        mean = {k: sum(getattr(s, k) for s in steps) / max(len(steps), 1) for k in DCMLStep.__dataclass_fields__}
        history.append({**mean, "kl_weight": round(w * cfg.lambda_kl, 6)})
        if progress:
            progress({"epoch": epoch, "total_epochs": epochs, "loss": mean["seg_l"], **mean})
    return local, incoming, history


def average_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter average of two state dicts of one architecture; non-float buffers are taken from ``a``."""
    if a.keys() != b.keys():
        raise ValueError(f"average_state: key sets differ ({sorted(set(a) ^ set(b))[:3]}...); expected one architecture")
    out = {}
    for k, v in a.items():
        _check_pair(v, b[k], f"average_state {k}")
        out[k] = (v + b[k]) / 2 if v.is_floating_point() else v.clone()
    return out
