import pytest

from gcml_app.errors import NotEnoughLabels
from gcml_app.store import ModelStore
from gcml_app.trainer import run_round


def cases_of(studies, n=None):
    labels = sorted((studies / "labels" / "final").glob("*.nii.gz"))[:n]
    return [{"id": p.name.split(".")[0], "image": str(studies / p.name), "label": str(p)} for p in labels]


@pytest.mark.slow
def test_round_publishes_first_model_then_gates_against_it(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    seen = []
    rec = run_round(cfg, store, cases_of(studies[0]), epochs=2, progress=seen.append)
    assert [p["epoch"] for p in seen] == [1, 2] and all(p["total_epochs"] == 2 for p in seen)
    assert rec["published"] and rec["version"] == 1 and store.served_version() == 1
    assert (rec["n_train"], rec["n_val"]) == (4, 2)
    assert set(rec["scores"]) == {"local"} and set(rec["scores"]["local"]) == {"organ", "lesion"}
    man = store.served()
    assert man.val_dice == rec["scores"]["local"] and man.produced_by == "local" and man.n_val == 2

    rec2 = run_round(cfg, store, cases_of(studies[0]), epochs=1)
    assert set(rec2["scores"]) == {"served", "local"}
    # the served model is re-scored on the same validation cases it was published with
    assert rec2["scores"]["served"] == pytest.approx(man.val_dice, abs=1e-5)
    assert store.served_version() == (2 if rec2["published"] else 1)
    assert store.history()[-1]["event"] == ("publish" if rec2["published"] else "keep")


def test_too_few_labels_is_a_clear_error(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    with pytest.raises(NotEnoughLabels, match=r"0 train and 1 validation; need at least 1 train and 1 validation"):
        run_round(cfg, store, cases_of(studies[0], 1), epochs=1)
    assert store.served_version() is None and store.history() == []


def _peer_file(cfg, seed=7, name="peer.safetensors", mutate=None):
    import torch
    from safetensors.torch import save_file

    from gcml_app.network import build_network

    torch.manual_seed(seed)
    state = build_network(cfg).state_dict()
    if mutate:
        state = mutate(state)
    path = cfg.state_dir / "peers" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.slow
def test_dcml_round_scores_every_candidate_and_records_losses(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    run_round(cfg, store, cases_of(studies[0]), epochs=2)
    rec = run_round(cfg, store, cases_of(studies[0]), epochs=2, incoming=_peer_file(cfg))
    assert rec["mode"] == "dcml"
    assert set(rec["scores"]) == {"served", "dcml_local", "dcml_incoming", "average"}
    assert len(rec["losses"]) == 2 and {"seg_l", "kl_l", "con_l", "seg_i", "kl_i", "con_i"} <= set(rec["losses"][0])
    assert rec["losses"][0]["kl_l"] > 0 and rec["losses"][0]["con_l"] > 0
    assert rec["incoming"]["file"] == "peer.safetensors" and len(rec["incoming"]["sha256"]) == 64
    last = store.history()[-1]
    assert last["event"] == ("publish" if rec["published"] else "keep") and last["mode"] == "dcml"
    if rec["published"]:
        assert store.served().produced_by == f"dcml:{rec['winner']}"
        assert store.served().lineage[0]["incoming_sha256"] == rec["incoming"]["sha256"]


def _junk(path):
    path.write_bytes(b"\x80\x04pickle")
    return path


def _nan(state):
    k = next(k for k, v in state.items() if v.is_floating_point())
    state[k] = state[k].clone().fill_(float("nan"))
    return state


INCOMING_BAD = [
    (lambda cfg, tmp: tmp / "outside.safetensors", r"expected a file inside"),
    (lambda cfg, tmp: _peer_file(cfg, mutate=_nan), r"non-finite values \(NaN/Inf\) in"),
    (lambda cfg, tmp: _peer_file(cfg, mutate=lambda s: {k: v for k, v in list(s.items())[1:]}), r"architecture .* differs"),
    (lambda cfg, tmp: _junk(cfg.state_dir / "junk.safetensors"), r"not a safetensors file"),
]


@pytest.mark.parametrize("make, message", INCOMING_BAD)
def test_bad_incoming_model_is_rejected_before_anything_changes(cfg, studies, tmp_path, make, message):
    from gcml_app.errors import IncomingModelRejected

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    store = ModelStore(cfg.state_dir / "models")
    path = make(cfg, tmp_path)
    with pytest.raises(IncomingModelRejected, match=message):
        run_round(cfg, store, cases_of(studies[0]), epochs=1, incoming=path)
    assert store.served_version() is None and store.history() == []
