"""Deep contrastive mutual learning (DCML): one step for two models, and the epoch loop.

Our specification (docs/design.md, "DCML"): the local model L and a trainable copy of an incoming
peer model I train together on the site's labelled cases, each with its own optimizer::

    loss_L = DiceCE(z_L, y) + w(t) lambda_kl KL_trust(z_L <- z_I) + lambda_con InfoNCE(e_L <- e_I)
    loss_I = DiceCE(z_I, y) + w(t) lambda_kl KL_trust(z_I <- z_L) + lambda_con InfoNCE(e_I <- e_L)

``w(t)`` ramps the distillation in over the start of a round (:func:`~gcml_app.ml.losses.kl_ramp`);
the two extra terms are :func:`~gcml_app.ml.losses.mutual_kl` and
:func:`~gcml_app.ml.losses.mutual_infonce`. The teacher side of every cross term is detached, so
``loss_L`` reaches only L's parameters and ``loss_I`` only I's. Pure ML code: no HTTP, no MONAI Label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from monai.losses import DiceCELoss

from gcml_app.config import DCMLConfig
from gcml_app.ml.device import Precision, fp32
from gcml_app.ml.losses import _check_pair, kl_ramp, mutual_infonce, mutual_kl
from gcml_app.ml.network import GCMLNet

__all__ = ["DCMLStep", "dcml_step", "dcml_train"]


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
        amp: mixed precision of the two forward passes (:mod:`gcml_app.ml.device`; default fp32). The
            losses, the KL's softmaxes and InfoNCE always run on fp32 logits and features.
        scaler: the float16 gradient scaler shared by both optimizers (``amp.scaler()``), or ``None``.

    Returns:
        the step's loss components (the KL unweighted).
    """
    _check_cfg(cfg)
    seg_loss = seg_loss or DiceCELoss(to_onehot_y=True, softmax=True)
    opt_l.zero_grad(set_to_none=True)
    opt_i.zero_grad(set_to_none=True)
    with (amp or Precision(x.device.type)).autocast():
        if cfg.lambda_con:
            z_l, f_l = local.logits_and_features(x)
            z_i, f_i = incoming.logits_and_features(x)
        else:  # no contrastive term: no features needed
            z_l, z_i = local(x), incoming(x)
    z_l, z_i = fp32(z_l), fp32(z_i)
    if cfg.lambda_con:
        f_l, f_i = fp32(f_l), fp32(f_i)
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
        total = (loss_l if ok_l else zero) + (loss_i if ok_i else zero)
        (scaler.scale(total) if scaler is not None else total).backward()
    for ok, opt in ((ok_l, opt_l), (ok_i, opt_i)):
        if ok and scaler is not None:  # the scaler also skips a step whose scaled gradients overflowed
            scaler.step(opt)
        elif ok:
            opt.step()
    if scaler is not None and (ok_l or ok_i):
        scaler.update()
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
    amp: Precision | None = None,
) -> tuple[GCMLNet, GCMLNet, list[dict[str, float]]]:
    """Train ``local`` and ``incoming`` together for ``epochs`` passes over ``batches``.

    The KL weight ramps up over the first ``cfg.kl_rampup`` of the round's steps (:func:`kl_ramp`);
    the contrastive sampling draws from a generator seeded with ``seed``.

    Args:
        batches: re-iterable of ``{"image": (B, C_in, D, H, W), "label": (B, 1, D, H, W)}`` with a length.
        progress: called after each epoch with ``{"epoch", "total_epochs", **mean loss components}``.
        seed: seed of the voxel-sampling generator.
        amp: mixed precision (default fp32); float16 gets a gradient scaler.

    Returns:
        both models (trained in place) and the per-epoch mean of every loss component.
    """
    if epochs < 1:
        raise ValueError(f"dcml_train: found epochs={epochs}; expected >= 1")
    opt_l = torch.optim.AdamW(local.parameters(), lr=lr, weight_decay=weight_decay)
    opt_i = torch.optim.AdamW(incoming.parameters(), lr=lr, weight_decay=weight_decay)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    generator = torch.Generator().manual_seed(seed)
    amp = amp or Precision(torch.device(device).type)
    scaler = amp.scaler()
    total = epochs * len(batches)
    step = 0
    history = []
    for epoch in range(1, epochs + 1):
        local.train()
        incoming.train()
        steps = []
        for b in batches:
            w = kl_ramp(step, total, cfg.kl_rampup)
            steps.append(dcml_step(local, incoming, opt_l, opt_i, b["image"].to(device, non_blocking=True),
                                   b["label"].to(device, non_blocking=True).long(), cfg, seg_loss, generator, w,
                                   amp, scaler))
            step += 1
        mean = {k: sum(getattr(s, k) for s in steps) / max(len(steps), 1) for k in DCMLStep.__dataclass_fields__}
        history.append({**mean, "kl_weight": round(w * cfg.lambda_kl, 6)})
        if progress:
            progress({"epoch": epoch, "total_epochs": epochs, "loss": mean["seg_l"], **mean})
    return local, incoming, history
