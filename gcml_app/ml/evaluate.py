"""Validation Dice per case and per label with sliding-window inference (pure ML code)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

__all__ = ["dice_per_case", "mean_dice", "mean_over_cases"]

CaseScores = list[dict[str, float]]
"""Dice per label for each case, in case order: ``[{label: dice}, ...]``."""


@torch.no_grad()
def dice_per_case(
    model: torch.nn.Module,
    cases: Iterable[Mapping[str, torch.Tensor]],
    label_names: list[str],
    roi_size: tuple[int, int, int],
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    device: str | torch.device = "cpu",
) -> CaseScores:
    """Dice per label of every whole volume (what the gate pairs candidates on).

    Args:
        model: maps ``(1, C_in, D, H, W)`` to logits ``(1, n + 1, D, H, W)``.
        cases: dicts with ``image (C_in, D, H, W)`` and ``label (1, D, H, W)`` in channels ``0..n``.
        label_names: names of channels ``1..n``.

    Returns:
        ``[{name: dice}]`` per case; a label absent from both prediction and truth of a case counts as 1.0.
    """
    model.eval()
    n = len(label_names) + 1
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    out = []
    for case in cases:
        image = case["image"][None].to(device)
        label = case["label"][None].to(device)
        logits = sliding_window_inference(image, roi_size, sw_batch_size, model, overlap=overlap)
        pred = logits.argmax(1, keepdim=True)
        scores = metric(one_hot(pred, n), one_hot(label.long(), n))[0]
        out.append({name: float(s) for name, s in zip(label_names, scores.tolist())})
    return out


def mean_over_cases(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """``{label: mean Dice over cases}`` of :func:`dice_per_case` scores."""
    if not per_case:
        return {}
    return {k: sum(c[k] for c in per_case) / len(per_case) for k in per_case[0]}


def mean_dice(scores: Mapping[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else 0.0
