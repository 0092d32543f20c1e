"""Deep contrastive mutual learning (DCML): one step for two models, and the epoch loop.

Our specification (docs/design.md, "DCML"): the local model L and a trainable copy of an incoming
peer model I train together on the site's labelled cases, each with its own optimizer::

    loss_L = DiceCE(z_L, y) + w(t) lambda_kl KL_trust(z_L <- z_I) + lambda_con InfoNCE(e_L <- e_I)
    loss_I = DiceCE(z_I, y) + w(t) lambda_kl KL_trust(z_I <- z_L) + lambda_con InfoNCE(e_I <- e_L)

``w(t)`` ramps the distillation in over the start of a round (:func:`~gcml_app.ml.losses.kl_ramp`);
the two extra terms are :func:`~gcml_app.ml.losses.mutual_kl` and
:func:`~gcml_app.ml.losses.mutual_infonce`. On crops of the site's unlabelled images each loss adds
``w(t) lambda_unl Dice_teacher KL_conf`` (:func:`~gcml_app.ml.losses.unlabelled_kl`, where the teacher
is confident), scaled by the teacher's Dice on the step's labelled crops
(:func:`~gcml_app.ml.losses.teacher_dice`). The teacher side of every
cross term is detached, so ``loss_L`` reaches only L's parameters and ``loss_I`` only I's. With
``train_incoming: false`` I is a frozen teacher and only ``loss_L`` trains.

A round's steps are budgeted (:func:`step_budget`) so that it costs two models' labelled passes,
whatever it adds: the compute of ``local2x``. Pure ML code: no HTTP, no MONAI Label.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss

from gcml_app.config import DCMLConfig
from gcml_app.ml.device import Precision, fp32
from gcml_app.ml.distributed import all_true, global_mean, parallel, unwrap, world
from gcml_app.ml.losses import _check_pair, kl_ramp, mutual_infonce, mutual_kl, teacher_dice, unlabelled_kl
from gcml_app.ml.network import GCMLNet

__all__ = ["FORWARD_COST", "DCMLStep", "dcml_step", "dcml_train", "step_budget"]

FORWARD_COST = 1 / 3
"""A forward pass alone, in units of a training pass (forward and backward: the backward costs about twice
the forward; Kaplan et al. 2020)."""


@dataclass
class DCMLStep:
    """Loss components of one step (floats), for the local (``_l``) and incoming (``_i``) models."""

    seg_l: float
    kl_l: float
    con_l: float
    seg_i: float
    kl_i: float
    con_i: float
    unl_l: float = 0.0
    unl_i: float = 0.0


def step_budget(epochs: int, batches: int, batch_size: int, unlabelled_batch: int = 0,
                train_incoming: bool = True) -> int:
    """DCML steps of a round that cost what ``epochs`` labelled passes of two models cost (``local2x``).

    A step trains the local model on ``batch_size + unlabelled_batch`` images' crops, and trains the
    incoming model on them too (cost 1 each) or, with ``train_incoming`` false, only runs it forward
    (:data:`FORWARD_COST`). The budget is ``2 * epochs * batches * batch_size`` image-passes.

    Example:
        >>> step_budget(4, 6, 2), step_budget(4, 6, 2, unlabelled_batch=1), step_budget(4, 6, 2, 0, False)
        (24, 16, 36)
    """
    per_step = (batch_size + unlabelled_batch) * (1 + (1.0 if train_incoming else FORWARD_COST))
    return max(1, round(2 * epochs * batches * batch_size / per_step))


def _check_cfg(cfg: DCMLConfig) -> None:
    # DCMLConfig validates YAML input; this also guards objects built with model_construct().
    for name in ("lambda_kl", "lambda_con"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"dcml.{name}: found {getattr(cfg, name)}; expected >= 0")
    for name in ("temperature", "tau"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"dcml.{name}: found {getattr(cfg, name)}; expected > 0")


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
    amp: Precision | None = None,
    scaler: torch.amp.GradScaler | None = None,
    x_u: torch.Tensor | None = None,
) -> DCMLStep:
    """One DCML step: both models forward on ``x`` (and ``x_u``), each loss backpropagates into its own model only.

    Args:
        local, incoming: the two models (same number of output classes); with several ranks, their
            :func:`~gcml_app.ml.distributed.parallel` wrappers (a frozen teacher is never wrapped).
        opt_l, opt_i: their optimizers; each holds only its own model's parameters.
        x: images ``(B, C_in, D, H, W)``.
        y: labels ``(B, 1, D, H, W)`` with channel indices ``0..C-1``.
        cfg: the DCML weights and temperatures. A zero weight skips its term entirely, so
            ``lambda_kl = lambda_con = 0`` is exactly two independent supervised steps.
        generator: random source of the contrastive voxel sampling.
        kl_weight: the ramp ``w(t)`` in ``[0, 1]`` that multiplies ``lambda_kl`` (see :func:`kl_ramp`).
        amp: mixed precision of the two forward passes (:mod:`gcml_app.ml.device`; default fp32). The
            losses, the KL's softmaxes and InfoNCE always run on fp32 logits and features.
        scaler: the float16 gradient scaler shared by both optimizers (``amp.scaler()``), or ``None``.
        x_u: crops of unlabelled images ``(B_u, C_in, D, H, W)``, or ``None``: with ``cfg.lambda_unl``
            they add the confident mutual KL, in the same forward pass as ``x``.
        opt_i: ``None`` with ``cfg.train_incoming`` false: ``incoming`` is a frozen teacher, run
            without gradients in eval mode; only ``loss_L`` trains.

    Returns:
        the step's loss components (the KLs unweighted).
    """
    _check_cfg(cfg)
    seg_loss = seg_loss or DiceCELoss(to_onehot_y=True, softmax=True)
    frozen = opt_i is None
    opt_l.zero_grad(set_to_none=True)
    if not frozen:
        opt_i.zero_grad(set_to_none=True)
    n = x.shape[0]
    unl = x_u is not None and cfg.lambda_unl > 0
    xx = torch.cat([x, x_u]) if unl else x
    with (amp or Precision(x.device.type)).autocast():
        z_l, f_l = local(xx, features=True) if cfg.lambda_con else (local(xx), None)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            z_i, f_i = incoming(xx, features=True) if cfg.lambda_con else (incoming(xx), None)
    z_l, z_i = fp32(z_l), fp32(z_i)
    _check_pair(z_l, z_i, "dcml_step logits")
    if unl:
        (z_l, z_lu), (z_i, z_iu) = z_l.split([n, len(x_u)]), z_i.split([n, len(x_u)])
    if cfg.lambda_con:  # features of the labelled crops only: InfoNCE needs their classes
        f_l, f_i = fp32(f_l[:n]), fp32(f_i[:n])
    zero = z_l.new_zeros(())
    seg_l = seg_loss(z_l, y)
    seg_i = zero if frozen else seg_loss(z_i, y)
    kl_l = kl_i = con_l = con_i = unl_l = unl_i = zero
    if cfg.lambda_kl:
        kl_l, kl_i = mutual_kl(z_l, z_i, y, cfg.temperature, cfg.dilation, cfg.kl_mask, cfg.fg_weight_max)
    if cfg.lambda_con:
        con_l, con_i = mutual_infonce(unwrap(local), unwrap(incoming), f_l, f_i, y, cfg, generator)
    if unl:  # each teacher's pull scaled by its Dice on this step's labelled crops
        unl_l, unl_i = unlabelled_kl(z_lu, z_iu, cfg.temperature, cfg.confidence, cfg.dilation, cfg.fg_weight_max)
        unl_l, unl_i = unl_l * teacher_dice(z_i, y), unl_i * teacher_dice(z_l, y)
    w_kl, w_unl = cfg.lambda_kl * kl_weight, cfg.lambda_unl * kl_weight
    loss_l = seg_l + w_kl * kl_l + cfg.lambda_con * con_l + w_unl * unl_l
    loss_i = seg_i + w_kl * kl_i + cfg.lambda_con * con_i + w_unl * unl_i
    # Disjoint graphs: the teacher side of every cross term is detached. A model whose loss is not finite
    # (e.g. a partner model that overflows) skips this step; the other still learns, and never from NaN.
    ok_l, ok_i = all_true(bool(torch.isfinite(loss_l)), not frozen and bool(torch.isfinite(loss_i)))
    if ok_l or ok_i:
        total = (loss_l if ok_l else zero) + (loss_i if ok_i else zero)
        (scaler.scale(total) if scaler is not None else total).backward()
    for ok, opt in ((ok_l, opt_l), (ok_i, opt_i)):
        if ok and scaler is not None:  # the scaler also skips a step whose scaled gradients overflowed
            scaler.step(opt)
        elif ok:
            opt.step()
    if scaler is not None and (ok_l or ok_i):
        scaler.update()
    return DCMLStep(*(float(t.detach()) for t in (seg_l, kl_l, con_l, seg_i, kl_i, con_i, unl_l, unl_i)))


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
    amp: Precision | None = None,
    unlabelled: Iterable[Mapping[str, torch.Tensor]] | None = None,
    steps: int | None = None,
    clicks: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[GCMLNet, GCMLNet, list[dict[str, float]]]:
    """Train ``local`` and ``incoming`` together for ``steps`` steps (default ``epochs`` passes over ``batches``).

    The KL weights ramp up over the first ``cfg.kl_rampup`` of the round's steps (:func:`kl_ramp`);
    the contrastive sampling draws from a generator seeded with ``seed``.

    Args:
        batches: re-iterable of ``{"image": (B, C_in, D, H, W), "label": (B, 1, D, H, W)}`` with a length; with
            several ranks, each rank's share of the crops (:func:`~gcml_app.ml.transforms.crop_transforms`), both
            models in their own ``DistributedDataParallel``.
        progress: called after each pass over ``batches`` with ``{"epoch", "total_epochs", **mean loss
            components}``.
        seed: seed of the voxel-sampling generator.
        amp: mixed precision (default fp32); float16 gets a gradient scaler.
        unlabelled: re-iterable of ``{"image": (B_u, C_in, D, H, W)}``, cycled: one batch beside each
            labelled batch (``cfg.lambda_unl``); ``None``: labelled crops only.
        steps: the round's steps (:func:`step_budget`); the last pass over ``batches`` may stop early.
        clicks: an interactive site's :class:`~gcml_app.ml.clicks.ClickSimulator`: each batch gets its guidance
            channels from the local model's errors, and both models train on the same guided input.

    Returns:
        both models (trained in place; ``incoming`` unchanged with ``cfg.train_incoming`` false) and, per
        pass, the mean of every loss component, the steps and the crop passes (the cost: a crop through
        one model forward and backward is 1, forward alone :data:`FORWARD_COST`).
    """
    if epochs < 1:
        raise ValueError(f"dcml_train: found epochs={epochs}; expected >= 1")
    total = steps or epochs * len(batches)
    passes = -(-total // max(len(batches), 1))
    opt_l = torch.optim.AdamW(local.parameters(), lr=lr, weight_decay=weight_decay)
    opt_i = torch.optim.AdamW(incoming.parameters(), lr=lr, weight_decay=weight_decay) if cfg.train_incoming else None
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    generator = torch.Generator().manual_seed(seed)
    amp = amp or Precision(torch.device(device).type)
    scaler = amp.scaler()
    unl = _cycle(unlabelled) if unlabelled is not None and cfg.lambda_unl > 0 else None
    per_crop = 1 + (1.0 if cfg.train_incoming else FORWARD_COST)  # both models' passes over one crop
    step = 0
    history = []
    head = cfg.lambda_con > 0  # InfoNCE trains the projection heads
    with parallel(local, head) as net_l, (parallel(incoming, head) if cfg.train_incoming
                                          else contextlib.nullcontext(incoming)) as net_i:
        for epoch in range(1, passes + 1):
            net_l.train()
            net_i.train(cfg.train_incoming)
            done, crops = [], 0.0
            for b in batches:
                if step == total:
                    break
                w = kl_ramp(step, total, cfg.kl_rampup)
                x_u = next(unl)["image"].to(device, non_blocking=True) if unl is not None else None
                x, y = b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True).long()
                if clicks is not None:
                    x = clicks(local, x, y)
                    x_u = local.with_guidance(x_u) if x_u is not None else None  # unlabelled crops: zero guidance
                done.append(dcml_step(net_l, net_i, opt_l, opt_i, x, y, cfg, seg_loss, generator, w, amp, scaler, x_u))
                crops += (len(b["image"]) + (len(x_u) if x_u is not None else 0)) * per_crop * world()
                step += 1
            names = list(DCMLStep.__dataclass_fields__)
            mean = dict(zip(names, global_mean([sum(getattr(d, k) for d in done) / max(len(done), 1) for k in names])))
            history.append({**mean, "kl_weight": round(w * cfg.lambda_kl, 6), "steps": len(done),
                            "crop_passes": round(crops, 2)})
            if progress:
                progress({"epoch": epoch, "total_epochs": passes, "loss": mean["seg_l"], **mean})
    return local, incoming, history


def _cycle(batches: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[Mapping[str, torch.Tensor]]:
    """``batches`` over and over (a fresh pass each time: a shuffling loader reshuffles)."""
    for _ in itertools.count():
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("dcml_train: the unlabelled batches are empty")
