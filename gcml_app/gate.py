"""The validation gate ("do no harm"): choose what to serve from validated candidates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gcml_app.evaluate import mean_dice

__all__ = ["SERVED", "GateDecision", "select"]

SERVED = "served"


@dataclass(frozen=True)
class GateDecision:
    """The winner among the candidates, whether it replaces the served model, and why."""

    winner: str
    publish: bool
    reason: str
    scores: dict[str, dict[str, float]]

    def as_record(self) -> dict:
        return {
            "winner": self.winner,
            "published": self.publish,
            "reason": self.reason,
            "scores": self.scores,
            "mean": {k: round(mean_dice(v), 6) for k, v in self.scores.items()},
        }


def select(scores: Mapping[str, Mapping[str, float]], served: str | None = SERVED) -> GateDecision:
    """Pick the candidate with the best mean validation Dice.

    Args:
        scores: candidate name -> Dice per label, all on the same validation cases.
        served: the key of the served model in ``scores``; ``None`` when nothing is served yet.

    Returns:
        the decision; the served model wins ties, so a candidate publishes only by beating it.

    Raises:
        ValueError: no candidates, or ``served`` named but missing from ``scores``.
    """
    if not scores:
        raise ValueError("select: found no candidates; expected at least one scored model")
    if served is not None and served not in scores:
        raise ValueError(f"select: served model {served!r} has no score; expected it among {list(scores)}")
    means = {k: mean_dice(v) for k, v in scores.items()}
    order = ([served] if served is not None else []) + [k for k in scores if k != served]
    winner = max(order, key=lambda k: means[k])  # max keeps the first of equals: the served model
    if served is None:
        reason = f"nothing served yet; {winner} validated at mean Dice {means[winner]:.4f}"
    elif winner == served:
        best_other = max((k for k in order if k != served), key=lambda k: means[k], default=None)
        other = f"best candidate {best_other} {means[best_other]:.4f}" if best_other else "no candidate"
        reason = f"kept served model (mean Dice {means[served]:.4f}); {other} did not beat it"
    else:
        reason = f"{winner} mean Dice {means[winner]:.4f} beats served {means[served]:.4f}"
    return GateDecision(winner, winner != served, reason, {k: dict(v) for k, v in scores.items()})
