import pytest

from gcml_app.config import ValidationConfig
from gcml_app.ml.split import FixedSplit


def test_assignments_never_move_as_labels_arrive(tmp_path):
    split = FixedSplit(tmp_path / "split.json", ValidationConfig(fraction=0.25, min_cases=1))
    seen: dict[str, str] = {}
    ids: list[str] = []
    for batch in (["c03", "c01"], ["c02"], ["c07", "c05", "c04"], ["c00", "c06", "c08", "c09"]):
        ids += batch
        train, val = split.assign(ids)
        now = {**{c: "train" for c in train}, **{c: "val" for c in val}}
        assert all(now[c] == s for c, s in seen.items())
        seen = now
    assert len(val) >= 0.25 * len(ids) - 1 and len(val) >= 1
    # A fresh object reading the same file sees the same split.
    assert FixedSplit(tmp_path / "split.json", ValidationConfig()).assign(ids) == (train, val)


@pytest.mark.parametrize(
    "n, fraction, min_cases, n_val",
    [(1, 0.2, 1, 1), (2, 0.2, 1, 1), (5, 0.2, 1, 1), (6, 0.2, 1, 2), (10, 0.2, 3, 3), (10, 0.5, 1, 5)],
)
def test_split_sizes(tmp_path, n, fraction, min_cases, n_val):
    split = FixedSplit(tmp_path / "s.json", ValidationConfig(fraction=fraction, min_cases=min_cases))
    train, val = split.assign(f"case_{i:03d}" for i in range(n))
    assert len(val) == n_val and len(train) == n - n_val


def test_removed_case_keeps_its_place_when_it_returns(tmp_path):
    split = FixedSplit(tmp_path / "s.json", ValidationConfig(fraction=0.5, min_cases=1))
    _, val = split.assign(["a", "b", "c", "d"])
    split.assign([c for c in "abcd" if c != val[0]])
    assert val[0] in split.assign(["a", "b", "c", "d"])[1]
