"""The losses DCML adds to supervised training: the trusted, region-balanced KL and the voxel InfoNCE.

Our specification (docs/design.md, "DCML"): ``KL_trust(z_L <- z_I)`` distils only where the teacher
agrees with the label, with a bounded foreground up-weighting; ``InfoNCE(e_L <- e_I)`` contrasts a
voxel's embedding in one model with the other model's embeddings of the same voxel (positive) and of
voxels of other classes (negatives). Both are computed in both directions at once, sharing the
softmaxes, the voxel weights and the sampled voxels; the teacher side of every term is detached.
Pure ML code: no HTTP, no MONAI Label imports.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from gcml_app.config import DCMLConfig
from gcml_app.ml.distributed import global_sum, world
from gcml_app.ml.network import GCMLNet

__all__ = ["KL_MASKS", "foreground_region", "kl_ramp", "labels_at", "mutual_infonce", "mutual_kl", "sample_voxels",
           "teacher_dice", "unlabelled_kl", "voxel_weights"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: found shapes {tuple(a.shape)} and {tuple(b.shape)}; expected equal shapes "
                         "(the same number of classes and the same spatial size)")


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
    n_fg = global_sum(fg.sum())  # the batch is every rank's crops (the same number on each)
    n_bg = fg.numel() * world() - n_fg
    ratio = (n_bg / n_fg.clamp(min=1.0)).clamp(min=1.0, max=fg_weight_max)
    return 1.0 + (ratio - 1.0) * fg


def _weighted_kl(log_s: torch.Tensor, log_t: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 temperature: float, mask: str) -> torch.Tensor:
    """``T^2 * sum(w * trust * KL) / sum(w)`` over voxels (teacher detached); see :func:`mutual_kl`."""
    log_t = log_t.detach()
    kl = (log_t.exp() * (log_t - log_s)).sum(1)  # (B, D, H, W)
    w = weights
    if mask == "agree":
        # the teacher is right where the label's probability is the largest (a tie counts as right), as a
        # maximum over channel slices: max(1) also computes indices and costs ~4x as much on CPU
        top = functools.reduce(torch.maximum, log_t.unbind(1))
        w = w * (log_t.gather(1, labels.long()).squeeze(1) >= top).to(w.dtype)
    return temperature**2 * (kl * w).sum() / _normaliser(weights.sum())


def _normaliser(total: torch.Tensor) -> torch.Tensor:
    """A loss's denominator over the step's batch. With several ranks: the sum over every rank's crops, divided by
    the number of ranks, because DDP averages the ranks' gradients; so the ranks' gradients together are the
    one-device loss's. On one device: ``total`` itself."""
    return total if world() == 1 else global_sum(total) / world()


def mutual_kl(
    z_l: torch.Tensor,
    z_i: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    dilation: int = 2,
    mask: str = "agree",
    fg_weight_max: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` in both directions, where each teacher is trusted.

    The voxel-wise KL is averaged over **all** voxels with weights (:func:`voxel_weights`): 1 for a
    background voxel, ``min(n_bg / n_fg, fg_weight_max)`` for a foreground voxel (labels > 0,
    dilated by ``dilation``), and 0 where ``mask="agree"`` and the teacher's argmax differs from the
    label. Because the untrusted voxels stay in the denominator, a teacher that is wrong on our data
    pulls in proportion to how often it is right. The softmaxes and the weights are shared.

    Args:
        z_l, z_i: logits ``(B, C, D, H, W)`` of the local and the incoming model.
        labels: ``(B, 1, D, H, W)`` class indices.
        temperature: softening temperature T > 0.
        dilation: foreground dilation in voxels (>= 0).
        mask: ``"agree"`` (distil only where the teacher predicts the label) or ``"none"``.
        fg_weight_max: bound (>= 1) on the foreground up-weighting.


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


def unlabelled_kl(
    z_l: torch.Tensor,
    z_i: torch.Tensor,
    temperature: float = 2.0,
    confidence: float = 0.9,
    dilation: int = 2,
    fg_weight_max: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mutual KL of :func:`mutual_kl` on images *without* a label, where each teacher is confident.

    No label says where a teacher is right, so its confidence does: a voxel distils only where the
    teacher's top class probability (at temperature 1) is at least ``confidence`` (FixMatch's
    pseudo-label threshold, Sohn et al. 2020; 0.9 as in semi-supervised segmentation). The region
    balance of :func:`voxel_weights` uses the two models' mean prediction in place of the label
    (both detached). As in :func:`mutual_kl`, the unconfident voxels stay in the denominator, so a
    teacher that is unsure of our images pulls in proportion to how sure it is. Two models that agree
    give 0.

    Args:
        z_l, z_i: logits ``(B, C, D, H, W)`` of the local and the incoming model on the same unlabelled crops.
        temperature: softening temperature T > 0 of the KL.
        confidence: in ``[0, 1)``; 0 distils everywhere.

    Returns:
        ``(KL(L <- I), KL(I <- L))``, each teacher detached.
    """
    _check_pair(z_l, z_i, "unlabelled_kl logits")
    _check_kl(temperature, dilation, "none", fg_weight_max, "unlabelled_kl")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"unlabelled_kl: found confidence={confidence}; expected 0 <= confidence < 1")
    log_l = F.log_softmax(z_l / temperature, dim=1)
    log_i = F.log_softmax(z_i / temperature, dim=1)
    with torch.no_grad():
        p_l, p_i = F.softmax(z_l.detach(), dim=1), F.softmax(z_i.detach(), dim=1)
        pseudo = (p_l + p_i).argmax(1, keepdim=True)
        w = voxel_weights(pseudo, dilation, fg_weight_max)
        sure_l = (p_l.amax(1) >= confidence).to(w.dtype)  # where L may teach I
        sure_i = (p_i.amax(1) >= confidence).to(w.dtype)

    def kl(log_s, log_t, sure):
        log_t = log_t.detach()
        return temperature**2 * ((log_t.exp() * (log_t - log_s)).sum(1) * w * sure).sum() / _normaliser(w.sum())

    return kl(log_l, log_i, sure_i), kl(log_i, log_l, sure_l)


def teacher_dice(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How right a model is on the labelled crops: the mean hard Dice of its argmax over the foreground classes
    present in ``labels`` (a scalar in [0, 1], no gradient; 1 when no foreground class is present).

    DCML's unlabelled term scales each teacher's pull by this: its Dice on our labelled crops estimates how
    right it is on our unlabelled images (the same scanner and patients), where a confident teacher can be
    confidently wrong (a partner's model on a contrast it has never seen).

    Args:
        z: logits ``(B, C, D, H, W)``.
        labels: ``(B, 1, D, H, W)`` class indices.
    """
    with torch.no_grad():
        pred, y = z.argmax(1), labels[:, 0]
        if world() > 1:  # counted over every rank's crops
            counts = global_sum(torch.stack([torch.stack([((pred == c) & (y == c)).sum(), (pred == c).sum(),
                                                          (y == c).sum()]) for c in range(1, z.shape[1])]).float())
            dice = [2 * i / (p + t) for i, p, t in counts if t > 0]
        else:
            dice = [2 * ((pred == c) & (y == c)).sum() / ((pred == c).sum() + (y == c).sum())
                    for c in range(1, z.shape[1]) if bool((y == c).any())]
        return torch.stack(dice).mean().float() if dice else z.new_ones((), dtype=torch.float32)


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
    """Cross-model voxel InfoNCE in both directions, embedding only the sampled voxels.

    In each volume up to ``cfg.samples_per_class`` voxels of every present class are sampled
    (:func:`sample_voxels`). Each sampled voxel's anchor embedding (one model) has as positive the
    other model's embedding at the same voxel, and as negatives the other model's embeddings at the
    sampled voxels of *other* classes (detached). A volume with one class is left out; with none left
    the loss is 0 (still differentiable), never NaN.

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
    if world() > 1:  # the mean over every rank's volumes that have two classes
        volumes = _normaliser(feats_l.new_tensor(float(len(out_l))))
    if not out_l:
        zero = (feats_l.sum() + feats_i.sum()) * 0.0
        if world() > 1:  # under DDP every trained parameter needs a gradient on every rank, the head's too
            zero = zero + 0.0 * (local.embed_points(feats_l.flatten(2)[0, :, :1].T).sum()
                                 + incoming.embed_points(feats_i.flatten(2)[0, :, :1].T).sum())
        return zero, zero
    if world() > 1:
        return torch.stack(out_l).sum() / volumes, torch.stack(out_i).sum() / volumes
    return torch.stack(out_l).mean(), torch.stack(out_i).mean()
