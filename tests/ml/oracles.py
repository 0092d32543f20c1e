"""Test oracles: the DCML losses written the plain way, one direction and one voxel set at a time.

The production code (:mod:`gcml_app.ml.losses`) computes both directions at once and embeds only the
sampled voxels; the tests check it against these readable definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gcml_app.ml.losses import _check_infonce, _check_kl, _check_pair, _weighted_kl, sample_voxels, voxel_weights

__all__ = ["distill_kl", "infonce", "voxel_infonce"]


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
