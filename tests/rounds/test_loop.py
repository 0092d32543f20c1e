import json
import os

import pytest
import torch
from helpers import TINY, cases_of, write_config

from gcml_app.errors import NotEnoughLabels
from gcml_app.rounds.loop import run_round
from gcml_app.store import ModelStore


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
    assert man.made_by == {"mode": "local", "candidate": "local", "peer": None}  # what the Slicer module reads

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

    from gcml_app.ml.network import build_network

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


# ---------------------------------------------------------------- working model vs served model
def _site(tmp_path, **validation):
    from helpers import write_config

    from gcml_app.config import load_config

    return load_config(write_config(tmp_path / "site", validation={"fraction": 0.2, "min_cases": 1, **validation}))


def _weights_sha(state):
    import hashlib

    return hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(state.items()))).hexdigest()


@pytest.mark.slow
def test_a_keep_leaves_the_working_model_advanced_and_the_next_round_starts_there(tmp_path, studies):
    cfg = _site(tmp_path, margin=0.99)  # no candidate can clear this margin: every later round keeps
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    first = run_round(cfg, store, cases, epochs=1)
    assert first["published"] and first["working"]["from"] == "fresh"
    v1 = store.load(1)
    second = run_round(cfg, store, cases, epochs=1)
    assert not second["published"] and store.served_version() == 1
    assert "is not above the margin 0.99" in second["reason"]
    assert second["working"] == {"from": "working", "candidate": "local", "sha256": store.working()[1]["sha256"],
                                 "rounds_unpublished": 1}
    working, info = store.working()
    assert _weights_sha(working) != _weights_sha(v1)  # the keep did not throw the round's training away
    assert info["base_version"] == 1 and info["rounds_unpublished"] == 1

    # the next round trains from the working model, not from the served one
    marked = {k: v + 0.01 if v.is_floating_point() else v for k, v in working.items()}
    store.save_working(marked, **{k: info[k] for k in ("arch", "base_version", "rounds_unpublished")})
    slow = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-12})})
    third = run_round(slow, store, cases, epochs=1)
    assert third["working"]["rounds_unpublished"] == 2
    after, _ = store.working()
    for k, v in marked.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_crash_between_working_model_and_publish_loses_neither(tmp_path, studies, monkeypatch):
    cfg = _site(tmp_path, margin=0.0, max_label_drop=1.0)
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    run_round(cfg, store, cases, epochs=1)
    served_bytes = store.read_bytes(1)

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(ModelStore, "publish", crash)  # dies after the working model is written
    monkeypatch.setattr(ModelStore, "record", crash)
    with pytest.raises(OSError, match="disk gone"):
        run_round(cfg, store, cases, epochs=1)
    monkeypatch.undo()
    assert store.served_version() == 1 and store.read_bytes(1) == served_bytes  # served intact
    advanced = store.working()
    assert advanced is not None and advanced[1]["rounds_unpublished"] in (0, 1)
    rec = run_round(cfg, store, cases, epochs=1)
    assert rec["working"]["from"] == "working"  # the crashed round's training was kept

    # a crash while writing the working model leaves the old one and the served model as they were
    before = store.working()[1]["sha256"]
    import gcml_app.store as store_mod

    def torn(path, data):
        raise OSError("no space left on device")

    monkeypatch.setattr(store_mod, "atomic_write", torn)
    with pytest.raises(OSError, match="no space left"):
        run_round(cfg, store, cases, epochs=1)
    monkeypatch.undo()
    assert store.working()[1]["sha256"] == before and store.served_version() == rec["version"]


def test_rollback_restarts_the_working_model_from_that_version(tmp_path):
    store = ModelStore(tmp_path / "state" / "models")
    a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    for s in (a, b):
        store.publish(s, arch="sha256:x", val_dice={"organ": 0.5}, n_train=1, n_val=1, produced_by="local")
    store.save_working({"w": torch.full((3,), 7.0)}, arch="sha256:x", base_version=2, rounds_unpublished=3)
    store.rollback(1, reason="regression")
    working, info = store.working()
    assert torch.equal(working["w"], a["w"]) and info["base_version"] == 1 and info["rounds_unpublished"] == 0


def test_an_unreadable_working_model_is_ignored_with_a_warning(tmp_path, caplog):
    store = ModelStore(tmp_path / "state" / "models")
    store.working_path.write_bytes(b"\x00\x01 torn")
    with caplog.at_level("WARNING"):
        assert store.working() is None
    assert "working model" in caplog.text and "unreadable" in caplog.text


@pytest.mark.slow
def test_a_rollback_during_a_round_survives_the_round(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    run_round(cfg, store, cases_of(studies[0]), epochs=1)
    w1 = store.load(1)
    store.publish(w1, arch=store.served().arch, val_dice={"organ": 0.1, "lesion": 0.1}, n_train=4, n_val=2,
                  produced_by="test")  # v2 is served when the round starts
    operator = ModelStore(cfg.state_dir / "models")  # the server process's own store object

    def roll_back_once(p):
        if operator.served_version() == 2:
            operator.rollback(1, reason="operator")

    rec = run_round(cfg, store, cases_of(studies[0]), epochs=2, progress=roll_back_once)
    assert store.served_version() == 1 and store.versions() == [1, 2]
    assert rec["superseded_by"] == 1 and "served model changed during the round (v2 -> v1)" in rec["reason"]
    assert [r["event"] for r in store.history()][-2:] == ["rollback", "superseded"]
    working, info = store.working()
    assert info["base_version"] == 1 and info["produced_by"] == "rollback to v1"  # the rollback's reset stands
    torch.testing.assert_close(working, w1)


@pytest.mark.parametrize("argv,expected", [
    (["/x/site-packages/monailabel/interfaces/utils/app.py", "-m", "train", "-r", "{}"], True),
    (["/x/site-packages/monailabel/interfaces/utils/app.py", "-m", "infer", "-r", "{}"], False),
    (["/x/site-packages/monailabel/main.py", "start_server", "-m", "train"], False),
    (["/x/bin/gcml", "serve"], False),
    ([], False),
], ids=["train-task", "other-task", "server", "cli", "no-argv"])
def test_only_monailabels_train_subprocess_counts_as_the_training_process(argv, expected):
    from gcml_app.site.process import is_training_process

    assert is_training_process(argv) is expected


@pytest.mark.parametrize("sched_idle", [True, False])
def test_training_process_lowers_its_priority_when_main_py_is_imported(tmp_path, sched_idle):
    """Before torch, MONAI and MONAI Label are imported, at the YAML's train.nice and, with train.sched_idle,
    under SCHED_IDLE: every thread it has by then (later ones inherit it from theirs)."""
    import subprocess
    import sys

    config = write_config(tmp_path, train={**TINY["train"], "nice": 7, "sched_idle": sched_idle})
    script = ("import os, sys, threading; sys.argv = ['/x/monailabel/interfaces/utils/app.py', '-m', 'train']; "
              "early = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True); early.start(); "
              "import gcml_app.site.train_entry; "
              "idle = [os.sched_getscheduler(t) == os.SCHED_IDLE for t in (0, early.native_id)]; "
              "print(os.nice(0), 'torch' in sys.modules, 'monai' in sys.modules, *idle)")

    def run(env):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        return out.stdout.split()

    idle = str(sched_idle)
    assert run({"GCML_CONFIG": str(config)}) == ["7", "False", "False", idle, idle]
    assert run({"MONAI_LABEL_APP_CONF": json.dumps({"gcml_config": str(config)})}) == ["7", "False", "False", idle, idle]


@pytest.mark.parametrize("phases, readings, expected", [
    # ru_maxrss can read a little lower than before (the kernel's high-water mark is updated lazily)
    ([("load_s", None), ("validate_s", None), ("train_s", None)], [100.0, 120.0, 119.9, 130.0],
     {"before_round": 100.0, "load": 120.0, "validate": 120.0, "train": 130.0}),
    # a round: validation is timed in two parts, and each part's memory has its own name, in time order
    ([("load_s", None), ("validate_s", "validate_served"), ("train_s", None), ("validate_s", "validate_candidates"),
      ("publish_s", None)], [658.4, 674.4, 786.6, 784.8, 790.0, 786.6],
     {"before_round": 658.4, "load": 674.4, "validate_served": 786.6, "train": 786.6, "validate_candidates": 790.0,
      "publish": 790.0}),
])
def test_the_rounds_memory_by_phase_is_in_time_order_and_never_steps_back(monkeypatch, phases, readings, expected):
    from gcml_app.rounds import compute as rounds

    readings = iter(readings)
    monkeypatch.setattr(rounds, "_peak_rss_mb", lambda: next(readings))
    lap = rounds.Laps()
    for name, peak in phases:
        lap(name, peak)
    assert lap.peak_mb == expected and list(lap.peak_mb) == list(expected)


def test_the_first_working_model_is_the_bundles_and_its_lineage_starts_there(tmp_path, studies):
    from monai.networks.nets import UNet

    from gcml_app.config import SiteConfig
    from gcml_app.ml.bundle import write_bundle
    from gcml_app.rounds.producers import Produced, Producer

    class Untrained(Producer):  # the round's start, scored and committed unchanged
        def produce(self, inputs):
            return Produced("local", {"local": inputs.model.state_dict()}, "local")

    net_def = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2],
               "num_res_units": 1, "norm": "batch"}
    torch.manual_seed(11)
    net = UNet(**net_def)
    bundle = write_bundle(tmp_path / "b", {"_target_": "UNet", **net_def}, net.state_dict(), name="b", version="2.0")
    cfg = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "state"),
                                     "network": {"name": "bundle", "init_from": str(bundle)}})
    store = ModelStore(cfg.state_dir / "models")
    rec = run_round(cfg, store, cases_of(studies[0]), producer=Untrained())
    assert rec["published"] and rec["working"]["from"] == "init"
    working, info = store.working()
    assert all(torch.equal(working[f"backbone.{k}"], v) for k, v in net.state_dict().items())
    assert info["start"]["bundle"] == "b" and store.served().lineage[-1]["bundle_version"] == "2.0"


def test_a_site_whose_labels_were_reordered_does_not_go_on_from_its_served_model(tmp_path, studies):
    from gcml_app.config import SiteConfig
    from gcml_app.errors import RoundFailed

    cfg = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "state"), "train": {**TINY["train"], "epochs": 1}})
    store = ModelStore(cfg.state_dir / "models")
    run_round(cfg, store, cases_of(studies[0]))
    swapped = cfg.model_copy(update={"labels": {"lesion": 1, "organ": 2}})  # same shapes: the same architecture
    with pytest.raises(RoundFailed, match=r"while prepare: StoreError: served v1 was trained for labels "
                                          r"\[\['organ', 1\], \['lesion', 2\]\]; the config now gives \[\['lesion', 1\], "
                                          r"\['organ', 2\]\]"):
        run_round(swapped, store, cases_of(studies[0]))
    assert store.served_version() == 1 and store.history()[-1]["outcome"] == "failed"


@pytest.mark.slow
def test_a_dcml_round_learns_from_unlabelled_images_at_the_compute_of_a_labelled_round(cfg, studies):
    from gcml_app.ml.dcml import step_budget

    cfg = cfg.model_copy(update={"dcml": cfg.dcml.model_copy(update={"lambda_unl": 0.25, "confidence": 0.0})})
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    run_round(cfg, store, cases, epochs=1)
    peer = _peer_file(cfg)
    broken = studies[0] / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    pool = [{"id": i, "image": str(studies[0] / f"{i}.nii.gz")} for i in ("case_006", "case_007", "broken")]
    with_pool = run_round(cfg, store, cases, epochs=2, incoming=peer, unlabelled=pool)
    alone = run_round(cfg, store, cases, epochs=2, incoming=peer)
    n_train, batch = with_pool["n_train"], max(1, cfg.train.batch_size // 2)  # DCML's half batches
    assert with_pool["cache"]["unlabelled"] == 2  # the unreadable image is left out, the round goes on
    assert sum(h["steps"] for h in with_pool["losses"]) == step_budget(2, n_train // batch, batch, 1) < \
        sum(h["steps"] for h in alone["losses"]) == step_budget(2, n_train // batch, batch, 0)
    assert any(h["unl_l"] > 0 and h["unl_i"] > 0 for h in with_pool["losses"])
    assert alone["cache"]["unlabelled"] == 0 and all(h["unl_l"] == 0 for h in alone["losses"])
    # the same compute: crop passes within one step's worth of each other
    cost = [sum(h["crop_passes"] for h in r["losses"]) for r in (with_pool, alone)]
    assert abs(cost[0] - cost[1]) <= 2 * (batch + 1) * cfg.train.samples_per_case
