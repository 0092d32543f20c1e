"""Validation Dice per label with sliding-window inference (pure ML code)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

__all__ = ["dice_per_label", "mean_dice"]


@torch.no_grad()
def dice_per_label(
    model: torch.nn.Module,
    cases: Iterable[Mapping[str, torch.Tensor]],
    label_names: list[str],
    roi_size: tuple[int, int, int],
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Mean Dice per label over whole validation volumes.

    Args:
        model: maps ``(1, C_in, D, H, W)`` to logits ``(1, n + 1, D, H, W)``.
        cases: dicts with ``image (C_in, D, H, W)`` and ``label (1, D, H, W)`` in channels ``0..n``.
        label_names: names of channels ``1..n``.

    Returns:
        ``{name: dice}``; a label absent from both prediction and truth of a case counts as 1.0.
    """
    model.eval()
    n = len(label_names) + 1
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    for case in cases:
        image = case["image"][None].to(device)
        label = case["label"][None].to(device)
        logits = sliding_window_inference(image, roi_size, sw_batch_size, model, overlap=overlap)
        pred = logits.argmax(1, keepdim=True)
        metric(one_hot(pred, n), one_hot(label.long(), n))
    scores = metric.aggregate()
    return {name: float(s) for name, s in zip(label_names, scores.tolist())}


def mean_dice(scores: Mapping[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else 0.0
