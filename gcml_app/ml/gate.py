"""The validation gate ("do no harm"): decide what to serve from per-case validation evidence.

Every candidate is scored on the same fixed validation cases as the served model, case by case
and label by label. A candidate replaces the served model only if, paired case by case,

1. its mean Dice gain over the served model exceeds ``validation.margin``;
2. no label's mean Dice drops by more than ``validation.max_label_drop``; and
3. with ``validation.decision: sign_test``, a one-sided sign test over the cases' gains gives
   ``p <= validation.alpha``.

Of the candidates that pass, the one with the largest mean gain is served. The evidence (every
candidate's per-case deltas, per-label changes, sign-test p) goes into the round record. A
validation set of fewer than ``ceil(log2(1 / alpha))`` cases cannot make a strict decision (a sign
test over n cases reaches ``p = 2^-n`` at best); the decision says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from scipy import stats

from gcml_app.config import ValidationConfig
from gcml_app.ml.evaluate import mean_dice, mean_over_cases

__all__ = ["SERVED", "Evidence", "GateDecision", "paired_bound", "select", "sign_test_p"]

SERVED = "served"

CaseScores = Sequence[Mapping[str, float]]


def sign_test_p(deltas: Sequence[float]) -> float:
    """One-sided sign test: ``P(at least k of n' gains > 0)`` under no effect; ties are dropped.

    Example:
        >>> sign_test_p([0.1, 0.2, 0.05, 0.3, 0.01])
        0.03125
    """
    nonzero = [d for d in deltas if d != 0]
    n, k = len(nonzero), sum(d > 0 for d in nonzero)
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


def paired_bound(model: CaseScores, served: CaseScores, alpha: float, student: bool = False
                 ) -> tuple[float, float, float]:
    """How much better ``model`` is than ``served`` on the same cases, with the upper end of a one-sided interval.

    Returns:
        ``(mean paired gain, its standard error, mean + q * se)`` where ``q`` is the ``1 - alpha`` quantile of
        the normal distribution, or with ``student`` of Student's t with ``n - 1`` degrees of freedom (the
        exact quantile for a mean whose spread is estimated from ``n`` cases; wider with few). Below 0,
        ``model`` is worse at that confidence. One case: no spread, ``se`` is inf.

    Example:
        >>> [round(x, 3) for x in paired_bound([{"a": .5}, {"a": .6}], [{"a": .8}, {"a": .8}], 0.05)]
        [-0.25, 0.05, -0.168]
        >>> round(paired_bound([{"a": .5}, {"a": .6}], [{"a": .8}, {"a": .8}], 0.05, student=True)[2], 3)
        0.066
    """
    deltas = [mean_dice(m) - mean_dice(s) for m, s in zip(model, served)]
    n = len(deltas)
    if n == 0:
        raise ValueError("paired_bound: found no cases; expected the same validation cases for both models")
    gain = sum(deltas) / n
    if n == 1:
        return gain, math.inf, math.inf
    se = math.sqrt(sum((d - gain) ** 2 for d in deltas) / (n - 1) / n)
    q = float(stats.t.ppf(1 - alpha, n - 1)) if student else NormalDist().inv_cdf(1 - alpha)
    return gain, se, gain + q * se


@dataclass(frozen=True)
class Evidence:
    """How one candidate compares with the served model, paired case by case."""

    gain: float  # mean over cases of (candidate - served) mean-over-labels Dice
    deltas: list[float]  # that difference per case
    label_change: dict[str, float]  # per label: candidate mean - served mean
    p: float  # one-sided sign test over ``deltas``
    passed: bool
    why: str

    def as_record(self) -> dict[str, Any]:
        return {"gain": round(self.gain, 6), "deltas": [round(d, 6) for d in self.deltas],
                "label_change": {k: round(v, 6) for k, v in self.label_change.items()}, "p": round(self.p, 6),
                "passed": self.passed, "why": self.why}


def _compare(cand: CaseScores, served: CaseScores, cfg: ValidationConfig) -> Evidence:
    deltas = [mean_dice(c) - mean_dice(s) for c, s in zip(cand, served)]
    gain = sum(deltas) / len(deltas)
    mc, ms = mean_over_cases(cand), mean_over_cases(served)
    change = {k: mc[k] - ms[k] for k in ms}
    p = sign_test_p(deltas)
    drops = {k: -v for k, v in change.items() if -v > cfg.max_label_drop}
    if gain <= cfg.margin:
        why = f"mean paired gain {gain:+.4f} is not above the margin {cfg.margin:g}"
    elif drops:
        worst = max(drops, key=drops.get)
        why = f"label {worst} drops by {drops[worst]:.4f} (more than max_label_drop {cfg.max_label_drop:g})"
    elif cfg.decision == "sign_test" and p > cfg.alpha:
        why = f"sign test p = {p:.3f} over {len(deltas)} cases is above alpha {cfg.alpha:g}"
    else:
        why = f"mean paired gain {gain:+.4f} over {len(deltas)} cases, no label drops more than {cfg.max_label_drop:g}"
        return Evidence(gain, deltas, change, p, True, why)
    return Evidence(gain, deltas, change, p, False, why)


@dataclass(frozen=True)
class GateDecision:
    """The winner among the candidates, whether it replaces the served model, and the evidence."""

    winner: str
    publish: bool
    reason: str
    scores: dict[str, dict[str, float]]  # candidate -> mean Dice per label
    per_case: dict[str, list[dict[str, float]]]  # candidate -> Dice per label per validation case
    evidence: dict[str, Evidence] = field(default_factory=dict)  # candidate (not served) -> comparison
    n_val: int = 0
    strict: bool = True  # enough validation cases for a strict (sign test) decision

    def as_record(self) -> dict[str, Any]:
        return {
            "winner": self.winner,
            "published": self.publish,
            "reason": self.reason,
            "scores": self.scores,
            "mean": {k: round(mean_dice(v), 6) for k, v in self.scores.items()},
            "per_case": {k: [{n: round(x, 6) for n, x in c.items()} for c in v] for k, v in self.per_case.items()},
            "evidence": {k: e.as_record() for k, e in self.evidence.items()},
            "strict": self.strict,
        }


def select(scores: Mapping[str, CaseScores], served: str | None, cfg: ValidationConfig) -> GateDecision:
    """Decide what to serve from every candidate's per-case validation Dice.

    Args:
        scores: candidate name -> ``[{label: dice}]`` per validation case, the same cases in the same
            order for every candidate.
        served: the key of the served model in ``scores``; ``None`` when nothing is served yet
            (then the best mean Dice is published).
        cfg: margin, decision rule, ``alpha`` and ``max_label_drop``.

    Returns:
        the decision; the served model stays unless a candidate passes every rule.

    Raises:
        ValueError: no candidates, no validation cases, candidates scored on different numbers of
            cases or labels, or ``served`` named but missing from ``scores``.
    """
    if not scores:
        raise ValueError("select: found no candidates; expected at least one scored model")
    if served is not None and served not in scores:
        raise ValueError(f"select: served model {served!r} has no score; expected it among {list(scores)}")
    shapes = {k: (len(v), tuple(sorted(v[0])) if v else ()) for k, v in scores.items()}
    if len(set(shapes.values())) != 1 or not next(iter(shapes.values()))[0]:
        raise ValueError(f"select: found (cases, labels) {shapes}; expected every candidate scored on the same "
                         "non-empty validation cases and labels")
    n_val = next(iter(shapes.values()))[0]
    means = {k: mean_over_cases(v) for k, v in scores.items()}
    per_case = {k: [dict(c) for c in v] for k, v in scores.items()}
    strict = n_val >= cfg.strict_cases
    if served is None:
        winner = max(scores, key=lambda k: mean_dice(means[k]))
        reason = f"nothing served yet; {winner} validated at mean Dice {mean_dice(means[winner]):.4f}"
        return GateDecision(winner, True, reason, means, per_case, {}, n_val, strict)
    evidence = {k: _compare(v, scores[served], cfg) for k, v in scores.items() if k != served}
    passed = [k for k, e in evidence.items() if e.passed]
    small = "" if strict else (f" (only {n_val} validation cases: too few for a strict decision, "
                               f"which needs {cfg.strict_cases})")
    if passed:
        winner = max(passed, key=lambda k: evidence[k].gain)
        reason = f"{winner} beats served: {evidence[winner].why}" + small
        return GateDecision(winner, True, reason, means, per_case, evidence, n_val, strict)
    best = max(evidence, key=lambda k: evidence[k].gain, default=None)
    other = f"best candidate {best}: {evidence[best].why}" if best else "no candidate"
    reason = f"kept served model (mean Dice {mean_dice(means[served]):.4f}); {other}" + small
    return GateDecision(served, False, reason, means, per_case, evidence, n_val, strict)
