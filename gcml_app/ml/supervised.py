"""One model, supervised: the DiceCE step and epoch loop every method trains with, and parameter averages.

The local round, the FedAvg, Ditto and pooled baselines of ``gcml simulate`` and the bench's
reference step all train through :func:`supervised_train` / :func:`supervised_step`; FedAvg and
DCML's ``average`` candidate average through :func:`average_state`. Pure ML code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import torch
from monai.losses import DiceCELoss

from gcml_app.ml.device import Precision, fp32
from gcml_app.ml.distributed import all_true, global_mean, parallel, world
from gcml_app.ml.losses import _check_pair
from gcml_app.ml.network import GCMLNet

__all__ = ["average_state", "proximal", "supervised_step", "supervised_train"]

State = Mapping[str, torch.Tensor]


def supervised_step(model: GCMLNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    seg_loss: Callable | None = None, penalty: Callable[[], torch.Tensor] | None = None,
                    amp: Precision | None = None, scaler: torch.amp.GradScaler | None = None) -> float:
    """One single-model DiceCE step (plus ``penalty()``, e.g. Ditto's :func:`proximal` term).

    Args:
        x: images ``(B, C_in, D, H, W)``.
        y: labels ``(B, 1, D, H, W)`` with channel indices ``0..C-1``.
        amp: mixed precision of the forward pass (default fp32); the loss takes fp32 logits.
        scaler: float16's gradient scaler (``amp.scaler()``), or ``None``.

    Returns:
        the step's loss; a loss that is not finite is returned and never applied.
    """
    seg_loss = seg_loss or DiceCELoss(to_onehot_y=True, softmax=True)
    opt.zero_grad(set_to_none=True)
    with (amp or Precision(x.device.type)).autocast():
        z = model(x)
    loss = seg_loss(fp32(z), y)
    if penalty is not None:
        loss = loss + penalty()
    if all_true(bool(torch.isfinite(loss)))[0]:  # a diverged step is skipped (on every rank), never applied
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return float(loss.detach())


def proximal(model: GCMLNet, anchor: State, weight: float,
             device: str | torch.device = "cpu") -> Callable[[], torch.Tensor]:
    """``weight / 2 * ||v - anchor||^2`` over ``model``'s parameters (Ditto's pull towards the global model)."""
    ref = {k: v.to(device) for k, v in anchor.items()}
    params = dict(model.named_parameters())
    return lambda: weight / 2 * sum(((p - ref[k]) ** 2).sum() for k, p in params.items())


def supervised_train(
    model: GCMLNet,
    batches: Iterable[Mapping[str, torch.Tensor]],
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    progress: Callable[[dict], None] | None = None,
    max_steps: int | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    amp: Precision | None = None,
    clicks: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Plain DiceCE training of one model for ``epochs`` passes over ``batches`` (AdamW).

    Args:
        batches: re-iterable of ``{"image": (B, C_in, D, H, W), "label": (B, 1, D, H, W)}``; with several
            ranks, each rank's share of the crops (:func:`~gcml_app.ml.transforms.crop_transforms`).
        progress: called after each epoch with ``{"epoch", "total_epochs", "loss"}``.
        max_steps: stop after this many steps (the pooled baseline's step budget), even mid-epoch.
        penalty: added to every step's loss (see :func:`supervised_step`).
        amp: mixed precision (default fp32); float16 gets a gradient scaler.
        clicks: an interactive site's :class:`~gcml_app.ml.clicks.ClickSimulator`, which appends each batch's
            guidance channels (simulated clicks on the model's own errors, or zero guidance).

    Returns:
        ``[{"seg_l": mean loss, "steps", "crop_passes"}]`` per epoch (crops trained on by all ranks: the cost).
    """
    if epochs < 1:
        raise ValueError(f"supervised_train: found epochs={epochs}; expected >= 1")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    amp = amp or Precision(torch.device(device).type)
    scaler = amp.scaler()
    history, done = [], 0
    with parallel(model, head=False) as net:  # several ranks: DDP, each rank on its share of every step's crops
        for epoch in range(1, epochs + 1):
            net.train()
            steps, crops = [], 0
            for b in batches:
                if max_steps is not None and done >= max_steps:
                    break
                x, y = b["image"].to(device, non_blocking=True), b["label"].to(device, non_blocking=True).long()
                if clicks is not None:
                    x = clicks(model, x, y)
                steps.append(supervised_step(net, opt, x, y, loss_fn, penalty, amp, scaler))
                crops += len(b["image"]) * world()
                done += 1
            seg_l = global_mean([sum(steps) / max(len(steps), 1)])[0]
            history.append({"seg_l": seg_l, "steps": len(steps), "crop_passes": crops})
            if progress:
                progress({"epoch": epoch, "total_epochs": epochs, "loss": history[-1]["seg_l"]})
    return history


def average_state(*states: State, weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Parameter average of state dicts of one architecture; non-float buffers are taken from the first.

    Args:
        states: two or more state dicts with the same keys and shapes.
        weights: one per state (FedAvg: the sites' training cases); default equal.

    Raises:
        ValueError: fewer than two states, another number of weights, or key sets or shapes that differ.

    Example:
        >>> average_state({"w": torch.ones(2)}, {"w": torch.zeros(2)})["w"]
        tensor([0.5000, 0.5000])
    """
    if len(states) < 2:
        raise ValueError(f"average_state: found {len(states)} state dicts; expected at least 2")
    weights = [1.0] * len(states) if weights is None else list(weights)
    if len(weights) != len(states):
        raise ValueError(f"average_state: found {len(weights)} weights for {len(states)} state dicts; "
                         "expected one each")
    first = states[0]
    for other in states[1:]:
        if first.keys() != other.keys():
            raise ValueError(f"average_state: key sets differ ({sorted(set(first) ^ set(other))[:3]}...); "
                             "expected one architecture")
    total = sum(weights)
    out = {}
    for k, v in first.items():
        for other in states[1:]:
            _check_pair(v, other[k], f"average_state {k}")
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        out[k] = functools.reduce(torch.add, (s[k].float() * (w / total) for s, w in zip(states, weights))).to(v.dtype)
    return out
