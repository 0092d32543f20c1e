"""Which unlabelled image teaches most: committee disagreement and MC-dropout entropy (pure ML code).

Both scores are functions of whole-volume softmax predictions by sliding windows
(:func:`soft_predict`), computed one model at a time so that at most two ``(C, D, H, W)`` probability
volumes are in memory whatever the number of partners.

- :func:`disagreement`: the site's served model against each partner model (docs/design.md, "Which
  case to label next"): ``1 - soft Dice`` per label inside the pair's union foreground, averaged over
  partners weighted by their :func:`competence` on the site's own labelled cases, plus the served
  model's normalised entropy inside everyone's union foreground.
- :func:`epistemic_entropy`: MONAI Label's ``epistemic_entropy`` (its ``EpistemicScoring``): the
  entropy of the mean of ``T`` dropout passes, averaged over the volume.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from monai.inferers import sliding_window_inference

from gcml_app.ml.device import Precision, stitch_device
from gcml_app.ml.evaluate import dice_of

__all__ = ["Disagreement", "competence", "disagreement", "draw_proportional", "epistemic_entropy", "mc_dropout", "pair_disagreement",
           "served_entropy", "soft_predict"]

_EPS = 1e-6


@torch.no_grad()
def soft_predict(model: torch.nn.Module, image: torch.Tensor, roi_size: tuple[int, int, int], sw_batch_size: int = 1,
                 overlap: float = 0.25, device: str | torch.device = "cpu", amp: Precision | None = None,
                 n_out: int | None = None) -> torch.Tensor:
    """Softmax probabilities of one whole volume by sliding windows (the model's mode is left as it is).

    Args:
        image: ``(C_in, D, H, W)``.

    Returns:
        ``(n_out, D, H, W)`` float32 on the stitching device (:func:`~gcml_app.ml.device.stitch_device`).
    """
    device = torch.device(device)
    out_device = stitch_device(device, tuple(image.shape[1:]), n_out or 4)
    amp = amp or Precision(device.type)
    with amp.autocast():
        logits = sliding_window_inference(image[None].to(device), roi_size, sw_batch_size, model, overlap=overlap,
                                          sw_device=device, device=out_device)
    return torch.softmax(logits[0].float(), dim=0)


def pair_disagreement(p: torch.Tensor, q: torch.Tensor) -> float:
    """``1 - soft Dice`` of two predictions, per foreground label inside their union foreground, averaged.

    Args:
        p, q: ``(C, D, H, W)`` probabilities (channel 0 background).

    Returns:
        a value in ``[0, 1]``: 0 when they agree (or neither sees any foreground), 1 when their
        foregrounds are disjoint. A label neither model predicts anywhere counts as agreement.

    Example:
        >>> p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, :, None, None]  # 2 channels, 2 voxels
        >>> pair_disagreement(p, p), pair_disagreement(p, p.flip(1))
        (0.0, 1.0)
    """
    region = (p.argmax(0) > 0) | (q.argmax(0) > 0)
    if not bool(region.any()):
        return 0.0
    ps, qs = p[1:, region], q[1:, region]  # (C-1, |R|)
    both = (ps * qs).sum(1)
    mass = ps.sum(1) + qs.sum(1)
    seen = mass > _EPS
    if not bool(seen.any()):
        return 0.0
    dice = 2 * both[seen] / mass[seen]
    return float((1.0 - dice).clamp(0.0, 1.0).mean())


def served_entropy(p: torch.Tensor, region: torch.Tensor) -> float:
    """The mean entropy of ``p`` inside ``region``, normalised by ``log C`` to ``[0, 1]`` (0 for an empty region).

    Args:
        p: ``(C, D, H, W)`` probabilities; region: ``(D, H, W)`` bool.
    """
    if not bool(region.any()):
        return 0.0
    pr = p[:, region]
    return float((-torch.special.xlogy(pr, pr).sum(0)).mean() / math.log(p.shape[0]))


@dataclass
class Disagreement:
    """One image's disagreement score and its parts.

    Attributes:
        score: ``sum_j c_j partners[j] / J + entropy`` (``entropy`` alone without partners); higher teaches more.
        partners: ``{partner: 1 - soft Dice against the served model}``.
        entropy: the served model's normalised entropy inside the union foreground of every model.
        foreground: voxels in that union (0: no model sees anything there).
    """

    score: float
    partners: dict[str, float] = field(default_factory=dict)
    entropy: float = 0.0
    foreground: int = 0


def disagreement(served: torch.Tensor, partners: Iterable[tuple[str, torch.Tensor]],
                 competence: Mapping[str, float] | None = None) -> Disagreement:
    """Score one image from the served model's and each partner's prediction of it.

    ``score = sum_j c_j d_j / J + entropy``: each partner's disagreement counts as much as that partner
    segments this site's own labelled cases correctly (``c_j``, its mean Dice there, in ``[0, 1]``); a
    partner that fails on this site's scanner disagrees by noise and counts for little.

    Args:
        served: ``(C, D, H, W)`` probabilities of the served model.
        partners: ``(name, (C, D, H, W) probabilities)``, consumed one at a time (a generator that
            predicts lazily keeps only two volumes in memory).
        competence: ``{partner: c_j}``; a partner not in it counts fully (1).
    """
    competence = competence or {}
    region = served.argmax(0) > 0
    per: dict[str, float] = {}
    for name, q in partners:
        per[name] = round(pair_disagreement(served, q), 6)
        region |= q.argmax(0) > 0
        del q
    entropy = served_entropy(served, region)
    mean = sum(competence.get(n, 1.0) * d for n, d in per.items()) / len(per) if per else 0.0
    return Disagreement(round(mean + entropy, 6), per, round(entropy, 6), int(region.sum()))


def competence(models: Mapping[str, torch.nn.Module], cases: Iterable[Mapping[str, torch.Tensor]], n_labels: int,
               roi_size: tuple[int, int, int], sw_batch_size: int = 1, overlap: float = 0.25,
               device: str | torch.device = "cpu", amp: Precision | None = None) -> dict[str, float]:
    """Each model's mean Dice (over labels, then cases) on this site's labelled cases: how far its
    disagreement with the served model can be trusted here (:func:`disagreement`).

    Args:
        cases: dicts with ``image (C_in, D, H, W)`` and ``label (1, D, H, W)`` (channels ``0..n_labels``),
            read once for all models.

    Returns:
        ``{name: c}`` in ``[0, 1]``; every model 1.0 when there is no case (nothing to judge by).
    """
    sums = dict.fromkeys(models, 0.0)
    n = 0
    for case in cases:
        n += 1
        for name, net in models.items():
            pred = soft_predict(net, case["image"], roi_size, sw_batch_size, overlap, device, amp, n_labels + 1)
            sums[name] += sum(dice_of(pred.argmax(0, keepdim=True), case["label"].to(pred.device), n_labels)) / n_labels
    return {k: round(v / n, 6) if n else 1.0 for k, v in sums.items()}


def mc_dropout(model: torch.nn.Module, rate: float) -> torch.nn.Module:
    """A copy of ``model`` in eval mode whose dropout layers are active, each at least at ``rate``.

    Raises:
        ValueError: the network has no dropout layers (MC dropout has nothing to sample).
    """
    net = copy.deepcopy(model).eval()
    drops = [m for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if not drops:
        raise ValueError(f"epistemic scoring: the {type(model).__name__} network has no dropout layers; expected a "
                         "network built with dropout (network.dropout), or use the disagreement score")
    for m in drops:
        m.p = max(float(m.p), rate)
        m.train()
    return net


@torch.no_grad()
def epistemic_entropy(model: torch.nn.Module, image: torch.Tensor, roi_size: tuple[int, int, int], samples: int,
                      rate: float, sw_batch_size: int = 1, overlap: float = 0.25,
                      device: str | torch.device = "cpu", amp: Precision | None = None,
                      n_out: int | None = None) -> float:
    """MONAI Label's epistemic score of one image: the entropy of the mean of ``samples`` MC-dropout
    predictions, summed over channels and averaged over voxels (``EpistemicScoring.entropy_volume``).

    Args:
        image: ``(C_in, D, H, W)``; rate: see :func:`mc_dropout`.
    """
    net = mc_dropout(model, rate)
    mean = None
    for _ in range(samples):
        p = soft_predict(net, image, roi_size, sw_batch_size, overlap, device, amp, n_out)
        mean = p if mean is None else mean.add_(p)
    mean = mean / samples
    return round(float((-torch.special.xlogy(mean, mean).sum(0)).mean()), 6)


def draw_proportional(items: list[str], scores: list[float], rng: random.Random) -> str:
    """One of ``items``, drawn with probability proportional to its score (uniform when every score is 0).

    Top-k over noisy scores concentrates labels on whatever the scores over-rate; drawing in proportion
    keeps the preference and some of random sampling's coverage (Kirsch et al. 2023, "Stochastic
    batch acquisition", power acquisition with exponent 1).
    """
    weights = [max(0.0, float(s)) for s in scores]
    if not any(weights):
        return rng.choice(items)
    return rng.choices(items, weights=weights)[0]
