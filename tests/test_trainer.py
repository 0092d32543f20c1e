import pytest

from gcml_app.errors import NotEnoughLabels
from gcml_app.store import ModelStore
from gcml_app.trainer import run_local_round


def cases_of(studies, n=None):
    labels = sorted((studies / "labels" / "final").glob("*.nii.gz"))[:n]
    return [{"id": p.name.split(".")[0], "image": str(studies / p.name), "label": str(p)} for p in labels]


@pytest.mark.slow
def test_round_publishes_first_model_then_gates_against_it(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    seen = []
    rec = run_local_round(cfg, store, cases_of(studies[0]), epochs=2, progress=seen.append)
    assert [p["epoch"] for p in seen] == [1, 2] and all(p["total_epochs"] == 2 for p in seen)
    assert rec["published"] and rec["version"] == 1 and store.served_version() == 1
    assert (rec["n_train"], rec["n_val"]) == (4, 2)
    assert set(rec["scores"]) == {"local"} and set(rec["scores"]["local"]) == {"organ", "lesion"}
    man = store.served()
    assert man.val_dice == rec["scores"]["local"] and man.produced_by == "local" and man.n_val == 2

    rec2 = run_local_round(cfg, store, cases_of(studies[0]), epochs=1)
    assert set(rec2["scores"]) == {"served", "local"}
    # the served model is re-scored on the same validation cases it was published with
    assert rec2["scores"]["served"] == pytest.approx(man.val_dice, abs=1e-5)
    assert store.served_version() == (2 if rec2["published"] else 1)
    assert store.history()[-1]["event"] == ("publish" if rec2["published"] else "keep")


def test_too_few_labels_is_a_clear_error(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    with pytest.raises(NotEnoughLabels, match=r"0 train and 1 validation; need at least 1 train and 1 validation"):
        run_local_round(cfg, store, cases_of(studies[0], 1), epochs=1)
    assert store.served_version() is None and store.history() == []
