"""A round that fails changes nothing served, says why, and gives its pending labels back; a second round reuses the cache."""

from __future__ import annotations

import pytest
import torch
from helpers import cases_of

from gcml_app.errors import RoundFailed
from gcml_app.federation.state import GossipState
from gcml_app.rounds import labels_round, run_round
from gcml_app.store import ModelStore


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_second_round_reuses_the_first_rounds_preprocessed_cases(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    first = run_round(cfg, store, cases, epochs=1)
    second = run_round(cfg, store, cases, epochs=1)
    assert (first["cache"]["misses"], first["cache"]["hits"]) == (6, 0)
    assert (second["cache"]["misses"], second["cache"]["hits"], second["cache"]["rebuilt"]) == (0, 6, 0)
    assert second["precision"] == "fp32"  # the CPU path: no autocast


@pytest.mark.parametrize("where, phase", [
    ("gcml_app.rounds.producers.supervised_train", "train"),
    ("gcml_app.rounds.compute.dice_per_case", "validate"),
], ids=["train", "validate"])
def test_out_of_memory_ends_the_round_with_advice_and_changes_nothing(cfg, studies, monkeypatch, where, phase):
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    run_round(cfg, store, cases, epochs=1)
    served, working = store.served(), store.working_info()
    monkeypatch.setattr(where, _oom)
    with pytest.raises(RoundFailed, match=rf"out of host memory while {phase} on cpu \(fp32\): lower "
                                          r"train.samples_per_case \(1\), roi_size \(\[32, 32, 32\]\) or "
                                          r"train.batch_size \(2\)") as e:
        run_round(cfg, store, cases, epochs=1, extra={"round_id": "r-oom"})
    assert e.value.phase == phase
    assert store.served() == served and store.working_info() == working  # nothing served or kept changed
    last = store.history()[-1]
    assert (last["event"], last["outcome"], last["round_id"], last["phase"]) == ("failed", "failed", "r-oom", phase)
    assert last["reason"] == str(e.value) and last["version"] == served.version


def test_any_other_failure_is_recorded_with_its_phase(cfg, studies, monkeypatch):
    store = ModelStore(cfg.state_dir / "models")

    def broken(*a, **k):
        raise ValueError("a label volume that cannot be cropped")

    monkeypatch.setattr("gcml_app.rounds.producers.supervised_train", broken)
    with pytest.raises(RoundFailed, match="round failed while train: ValueError: a label volume that cannot be"):
        run_round(cfg, store, cases_of(studies[0]), epochs=1)
    assert store.served_version() is None and store.history()[-1]["outcome"] == "failed"


def test_a_failed_labels_round_keeps_the_new_labels_pending_and_rearms(cfg, studies, monkeypatch):
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    state = GossipState(cfg.state_dir)
    assert [state.add_pending(c["id"], 3) for c in cases[:3]] == [False, False, True]  # a labels round queued
    monkeypatch.setattr("gcml_app.rounds.producers.supervised_train", _oom)
    with pytest.raises(RoundFailed, match="out of host memory while train"):
        labels_round(cfg, store, cases, epochs=1)
    assert state.pending() == [c["id"] for c in cases[:3]]
    assert store.served_version() is None
    assert state.add_pending(cases[3]["id"], 3) is True  # the next label queues a round again
    monkeypatch.undo()
    labels_round(cfg, store, cases, epochs=1)
    assert state.pending() == [] and store.served_version() == 1
