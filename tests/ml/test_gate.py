import pytest

from gcml_app.config import ValidationConfig
from gcml_app.ml.gate import SERVED, select, sign_test_p


def cases(*rows):
    """Per-case scores from ``(organ, lesion)`` pairs."""
    return [{"organ": o, "lesion": les} for o, les in rows]


BASE = cases((0.80, 0.50), (0.70, 0.40), (0.90, 0.60), (0.60, 0.30), (0.75, 0.45))
UP = cases((0.85, 0.55), (0.75, 0.45), (0.95, 0.65), (0.65, 0.35), (0.80, 0.50))  # +0.05 on every case and label
MARGIN = ValidationConfig(margin=0.01, max_label_drop=0.02)
SIGN = ValidationConfig(margin=0.0, decision="sign_test", alpha=0.05, max_label_drop=0.02)

DECISIONS = [
    # (scores, served key, config, winner, publish, reason fragment)
    ({SERVED: BASE, "local": UP}, SERVED, MARGIN, "local", True, "mean paired gain +0.0500 over 5 cases"),
    ({SERVED: UP, "local": BASE}, SERVED, MARGIN, SERVED, False, "is not above the margin 0.01"),
    ({SERVED: BASE, "local": BASE}, SERVED, MARGIN, SERVED, False, "gain +0.0000 is not above"),  # a tie keeps
    # a tiny gain below the margin keeps the served model
    ({SERVED: BASE, "local": [{k: v + 0.004 for k, v in c.items()} for c in BASE]}, SERVED, MARGIN, SERVED, False,
     "+0.0040 is not above the margin 0.01"),
    # the organ rises a lot, the lesion drops: the mean improves but the per-label rule refuses it
    ({SERVED: BASE, "x": [{"organ": c["organ"] + 0.2, "lesion": c["lesion"] - 0.05} for c in BASE]}, SERVED, MARGIN,
     SERVED, False, "label lesion drops by 0.0500 (more than max_label_drop 0.02)"),
    # of two passing candidates, the larger paired gain wins
    ({SERVED: BASE, "x": UP, "y": [{k: v + 0.1 for k, v in c.items()} for c in BASE]}, SERVED, MARGIN, "y", True,
     "y beats served"),
    # one big case and four losses: the mean gain passes the margin, the sign test does not
    ({SERVED: BASE, "x": [{k: v + (0.5 if i == 0 else -0.01) for k, v in c.items()} for i, c in enumerate(BASE)]},
     SERVED, ValidationConfig(margin=0.0, max_label_drop=1.0), "x", True, "mean paired gain"),
    ({SERVED: BASE, "x": [{k: v + (0.5 if i == 0 else -0.01) for k, v in c.items()} for i, c in enumerate(BASE)]},
     SERVED, SIGN.model_copy(update={"max_label_drop": 1.0}), SERVED, False, "sign test p = 0.969 over 5 cases"),
    ({SERVED: BASE, "local": UP}, SERVED, SIGN, "local", True, "beats served"),  # 5 of 5 better: p = 1/32
    ({"local": BASE}, None, MARGIN, "local", True, "nothing served yet"),
]


@pytest.mark.parametrize("scores, served, cfg, winner, publish, reason", DECISIONS)
def test_paired_decision(scores, served, cfg, winner, publish, reason):
    d = select(scores, served, cfg)
    assert (d.winner, d.publish) == (winner, publish)
    assert reason in d.reason
    rec = d.as_record()
    assert rec["per_case"].keys() == scores.keys() and len(rec["per_case"][winner]) == len(BASE)
    if served:
        assert set(rec["evidence"]) == set(scores) - {SERVED}  # every candidate's evidence is recorded
        assert all(len(e["deltas"]) == len(BASE) for e in rec["evidence"].values())
        passed = {k for k, e in rec["evidence"].items() if e["passed"]}
        assert (winner in passed) if publish else not passed


def test_evidence_holds_the_per_case_deltas_and_label_changes():
    ev = select({SERVED: BASE, "local": UP}, SERVED, MARGIN).evidence["local"]
    assert ev.deltas == pytest.approx([0.05] * 5) and ev.gain == pytest.approx(0.05)
    assert ev.label_change == pytest.approx({"organ": 0.05, "lesion": 0.05}) and ev.p == pytest.approx(1 / 32)


@pytest.mark.parametrize("n_val, alpha, strict", [(4, 0.05, False), (5, 0.05, True), (3, 0.2, True), (2, 0.2, False)])
def test_a_small_validation_set_is_reported_as_not_strict(n_val, alpha, strict):
    cfg = ValidationConfig(alpha=alpha)
    d = select({SERVED: BASE[:n_val], "local": UP[:n_val]}, SERVED, cfg)
    assert d.strict == strict and d.as_record()["strict"] == strict
    assert ("too few for a strict decision" in d.reason) != strict


@pytest.mark.parametrize("deltas, p", [([0.1] * 5, 1 / 32), ([0.1, -0.1], 0.75), ([0, 0, 0.2], 0.5), ([], 1.0),
                                       ([-0.1] * 3, 1.0)])
def test_sign_test(deltas, p):
    assert sign_test_p(deltas) == pytest.approx(p)


@pytest.mark.parametrize(
    "scores, served, message",
    [({}, SERVED, "found no candidates"),
     ({"local": BASE}, SERVED, "served model 'served' has no score"),
     ({SERVED: BASE, "local": BASE[:3]}, SERVED, r"expected every candidate scored on the same non-empty validation"),
     ({SERVED: [], "local": []}, SERVED, r"expected every candidate scored on the same non-empty validation")],
)
def test_bad_input(scores, served, message):
    with pytest.raises(ValueError, match=message):
        select(scores, served, MARGIN)
