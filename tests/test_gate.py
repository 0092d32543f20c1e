import pytest

from gcml_app.gate import SERVED, select

CASES = [
    # (scores, served key, winner, publish)
    ({SERVED: {"a": 0.5}, "local": {"a": 0.6}}, SERVED, "local", True),
    ({SERVED: {"a": 0.6}, "local": {"a": 0.5}}, SERVED, SERVED, False),
    ({SERVED: {"a": 0.5}, "local": {"a": 0.5}}, SERVED, SERVED, False),  # a tie keeps the served model
    ({SERVED: {"a": 0.5, "b": 0.7}, "local": {"a": 0.9, "b": 0.2}}, SERVED, SERVED, False),  # mean over labels
    ({SERVED: {"a": 0.5}, "x": {"a": 0.7}, "y": {"a": 0.8}}, SERVED, "y", True),
    ({"local": {"a": 0.1}}, None, "local", True),  # nothing served yet
]


@pytest.mark.parametrize("scores, served, winner, publish", CASES)
def test_select(scores, served, winner, publish):
    d = select(scores, served)
    assert (d.winner, d.publish) == (winner, publish)
    assert d.as_record()["scores"] == scores


def test_reasons_are_readable():
    assert "beats served 0.5000" in select({SERVED: {"a": 0.5}, "local": {"a": 0.6}}).reason
    assert "kept served model" in select({SERVED: {"a": 0.5}, "local": {"a": 0.5}}).reason


@pytest.mark.parametrize(
    "scores, served, message",
    [({}, SERVED, "found no candidates"), ({"local": {"a": 1.0}}, SERVED, "served model 'served' has no score")],
)
def test_bad_input(scores, served, message):
    with pytest.raises(ValueError, match=message):
        select(scores, served)
