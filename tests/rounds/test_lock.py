"""One round at a time per site, across processes: a second caller is refused with the running round's name,
both attempts are in the history, and a dead holder never blocks the next round."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
from helpers import cases_of

from gcml_app.errors import RoundBusy
from gcml_app.federation.state import GossipState
from gcml_app.rounds import gossip_round, labels_round, run_round
from gcml_app.rounds.lock import one_round, running_round
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow  # trains tiny models in a second process


def _until_running(cfg, deadline_s=60.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while (holder := running_round(cfg.state_dir)) is None or holder.get("round_id") is None:
        assert time.monotonic() < deadline, "the first round never took the lock"
        time.sleep(0.05)
    return holder


def _long_round(cfg, cases, epochs):
    # one torch thread: this process is a fork of one that has run OpenMP regions (libgomp: a fork's own would hang)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_threads": 1})})
    run_round(cfg, ModelStore(cfg.state_dir / "models"), cases, epochs=epochs,
              extra={"trigger": "sync", "round_id": "r-first"})


ENTRIES = [
    # (a second round's entry, its trigger in the refusal record)
    (lambda cfg, store, cases: run_round(cfg, store, cases, epochs=1, extra={"trigger": "train", "round_id": "r-2"}),
     "train"),
    (lambda cfg, store, cases: gossip_round(cfg, store, cases, trigger="scheduler", round_id="r-2"), "scheduler"),
    (lambda cfg, store, cases: labels_round(cfg, store, cases, round_id="r-2"), "labels"),
]


@pytest.mark.parametrize("second, trigger", ENTRIES, ids=["run_round", "gossip_round", "labels_round"])
def test_a_second_process_is_refused_with_the_running_rounds_name_and_both_are_recorded(cfg, studies, second, trigger):
    cases = cases_of(studies[0])
    store = ModelStore(cfg.state_dir / "models")
    GossipState(cfg.state_dir).add_pending("case_000", threshold=0)
    first = multiprocessing.get_context("fork").Process(target=_long_round, args=(cfg, cases, 6))
    first.start()
    try:
        holder = _until_running(cfg)
        assert (holder["round_id"], holder["trigger"], holder["pid"]) == ("r-first", "sync", first.pid)
        with pytest.raises(RoundBusy, match=r"site test-site: round r-first \(trigger sync, pid \d+, started \d+ s "
                                            r"ago\) is running on this state folder; one round at a time"):
            second(cfg, store, cases)
        assert GossipState(cfg.state_dir).pending() == ["case_000"]  # the refused round claimed nothing
    finally:
        first.join(timeout=300)
    assert first.exitcode == 0
    events = [(r["event"], r.get("round_id")) for r in store.history()]
    assert ("busy", "r-2") in events and events[-1][1] == "r-first"  # the refusal, then the first round's decision
    busy = next(r for r in store.history() if r["event"] == "busy")
    assert (busy["outcome"], busy["trigger"], busy["running"]) == ("refused", trigger, "r-first")
    assert running_round(cfg.state_dir) is None
    run_round(cfg, store, cases, epochs=1)  # free again


def test_a_killed_rounds_lock_is_free_for_the_next_round(cfg, studies):
    cases = cases_of(studies[0])
    first = multiprocessing.get_context("fork").Process(target=_long_round, args=(cfg, cases, 200))
    first.start()
    _until_running(cfg)
    os.kill(first.pid, signal.SIGKILL)  # Slicer's Stop, the OOM killer, a power cut
    first.join()
    assert running_round(cfg.state_dir) is None
    store = ModelStore(cfg.state_dir / "models")
    run_round(cfg, store, cases, epochs=1, extra={"round_id": "r-next"})
    assert store.history()[-1]["round_id"] == "r-next"


def test_one_process_nests_its_own_entries_but_refuses_a_second_thread(cfg):
    store = ModelStore(cfg.state_dir / "models")
    seen = []
    with one_round(cfg, store, "test", "r-outer"):
        with one_round(cfg, store, "test", "r-inner"):  # gossip_round -> run_round: the same round
            assert running_round(cfg.state_dir)["round_id"] == "r-outer"

        def other():
            try:
                with one_round(cfg, store, "thread", "r-thread"):
                    seen.append("ran")
            except RoundBusy as e:
                seen.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(seen) == 1 and "round r-outer (trigger test" in seen[0]
    with one_round(cfg, store, "test", "r-after"):  # released
        pass
