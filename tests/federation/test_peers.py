"""Peer selection, backoff and scores; shared gossip state; the scheduler's pause flag."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from gcml_app.config import GossipConfig
from gcml_app.federation.peers import REJECT_GAIN, PeerBook, order_peers
from gcml_app.federation.scheduler import Scheduler
from gcml_app.federation.state import GossipState

NAMES = ["site-b", "site-c", "site-d"]


def _g(**kw) -> GossipConfig:
    return GossipConfig(peer_backoff_s=10, peer_backoff_max_s=35, ema=0.5, **kw)


def test_uniform_order_covers_every_peer_evenly(tmp_path):
    book = PeerBook(tmp_path / "p.json")
    rng = random.Random(0)
    firsts = [order_peers(NAMES, book, _g(), rng, now=0)[0][0] for _ in range(3000)]
    counts = [firsts.count(n) for n in NAMES]
    assert all(900 < c < 1100 for c in counts), counts  # 1000 expected each


@pytest.mark.parametrize("epsilon, expected_share", [(0.0, 1.0), (0.3, 0.7 + 0.3 / 3), (1.0, 1 / 3)])
def test_performance_order_prefers_the_best_peer_with_exploration(tmp_path, epsilon, expected_share):
    book = PeerBook(tmp_path / "p.json")
    g = _g(policy="performance", epsilon=epsilon)
    book.credit("site-c", 0.05, g)
    book.credit("site-b", 0.01, g)
    book.credit("site-d", -0.02, g)
    rng = random.Random(1)
    firsts = [order_peers(NAMES, book, g, rng, now=0)[0][0] for _ in range(3000)]
    assert firsts.count("site-c") / 3000 == pytest.approx(expected_share, abs=0.04)
    if epsilon == 0.0:
        assert order_peers(NAMES, book, g, rng, now=0)[0] == ["site-c", "site-b", "site-d"]


def test_performance_order_tries_every_partner_once_before_ranking(tmp_path):
    book = PeerBook(tmp_path / "p.json")
    g = _g(policy="performance", epsilon=0.0)
    book.credit("site-c", 0.05, g)
    book.rejected("site-d", "sha256 mismatch", g)  # refused once: tried, not untried
    firsts = {order_peers(NAMES, book, g, random.Random(i), now=0)[0][0] for i in range(50)}
    assert firsts == {"site-b"}  # the one partner never tried comes first
    book.credit("site-b", -0.01, g)
    assert order_peers(NAMES, book, g, random.Random(0), now=0)[0] == ["site-c", "site-b", "site-d"]


def test_failures_back_off_exponentially_up_to_the_cap(tmp_path):
    book, g = PeerBook(tmp_path / "p.json"), _g()
    waits = []
    for _ in range(4):
        book.failed("site-b", "down", g, now=100.0)
        waits.append(book.get("site-b").backoff_until - 100.0)
    assert waits == [10, 20, 35, 35]
    order, backed = order_peers(NAMES, book, g, random.Random(0), now=120.0)
    assert "site-b" not in order and backed == ["site-b"]
    assert "site-b" in order_peers(NAMES, book, g, random.Random(0), now=136.0)[0]
    book.answered("site-b", now=140.0)
    assert book.get("site-b").failures == 0 and book.get("site-b").reachable is True


def test_rejection_lowers_the_score_but_does_not_back_off(tmp_path):
    book, g = PeerBook(tmp_path / "p.json"), _g()
    book.credit("site-b", 0.04, g)
    book.rejected("site-b", "sha256 mismatch", g, now=5.0)
    rec = book.get("site-b")
    assert rec.score == pytest.approx(0.5 * 0.02 + 0.5 * REJECT_GAIN)
    assert rec.rejections == 1 and rec.backoff_until == 0 and rec.last_error == "sha256 mismatch"


def test_book_round_trips_and_summarises(tmp_path):
    path = tmp_path / "gossip" / "peers.json"
    book = PeerBook(path)
    book.pulled("site-b", "ab" * 32, 3, "site-b", 1234, now=50.0)
    book.failed("site-c", "read timeout", _g(), now=60.0)
    book.save()
    again = PeerBook.open(path)
    rows = {r["name"]: r for r in again.summary(["site-b", "site-c", "site-d"], now=61.0)}
    assert rows["site-b"]["reachable"] is True and rows["site-b"]["last_version"] == 3
    assert rows["site-b"]["bytes_pulled"] == 1234 and rows["site-b"]["last_exchange"] == 50.0
    assert rows["site-c"]["reachable"] is False and rows["site-c"]["backed_off_s"] == 9.0
    assert rows["site-d"]["reachable"] is None


def test_corrupt_book_starts_empty(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    assert PeerBook.open(tmp_path / "p.json").peers == {}


def test_pending_labels_enqueue_once_per_threshold(tmp_path):
    st = GossipState(tmp_path)
    assert [st.add_pending(f"case_{i}", 3) for i in range(5)] == [False, False, True, False, False]
    assert st.add_pending("case_0", 3) is False  # the same case again is not a new label
    assert st.pending() == [f"case_{i}" for i in range(5)]
    with st.training(["case_0", "case_1", "case_2"]):
        assert st.pending() == ["case_3", "case_4"]
        assert st.add_pending("case_5", 3) is True  # re-armed by the round's start
    assert st.pending() == ["case_3", "case_4", "case_5"]  # a round that succeeded learned its three
    assert GossipState(tmp_path).add_pending("case_6", 0) is False  # 0 = never


def test_a_failed_round_gives_its_labels_back_and_rearms(tmp_path):
    st = GossipState(tmp_path)
    assert [st.add_pending(f"case_{i}", 2) for i in range(2)] == [False, True]  # a round is queued
    with pytest.raises(RuntimeError, match="boom"):
        with st.training(["case_0", "case_1"]):
            assert st.pending() == []
            raise RuntimeError("boom")
    assert st.pending() == ["case_0", "case_1"]
    assert st.add_pending("case_2", 2) is True  # re-armed: the next label queues the next round


def test_a_killed_round_gives_its_labels_back_and_rearms(tmp_path):
    """The round's process dies mid-round (SIGKILL: no finally runs); the labels it took are pending again."""
    st = GossipState(tmp_path)
    assert [st.add_pending(f"case_{i}", 2) for i in range(2)] == [False, True]
    code = ("import os, signal, sys; from gcml_app.federation.state import GossipState\n"
            "st = GossipState(sys.argv[1])\n"
            "with st.training(['case_0', 'case_1']):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert "round" in json.loads((tmp_path / "gossip" / "pending.json").read_text())  # the claim it left
    assert st.pending() == ["case_0", "case_1"]
    assert st.add_pending("case_2", 2) is True  # a dead round's queued flag is not kept


def test_a_live_rounds_claim_is_not_folded_back(tmp_path):
    st = GossipState(tmp_path)
    st.add_pending("case_0", 5)
    with st.training(["case_0"]):
        assert GossipState(tmp_path).pending() == []  # another reader (the server) sees the round alive
        st.rearm()
        assert GossipState(tmp_path).pending() == []
    assert st.pending() == []


def test_pending_labels_survive_concurrent_writers(tmp_path):
    st = GossipState(tmp_path)
    threads = [threading.Thread(target=lambda i=i: st.add_pending(f"c{i}", 1000)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(st.pending()) == sorted(f"c{i}" for i in range(40))


def test_pause_flag_persists(tmp_path):
    GossipState(tmp_path).set_paused(True)
    assert GossipState(tmp_path).paused is True
    GossipState(tmp_path).set_paused(False)
    assert GossipState(tmp_path).paused is False


def test_scheduler_ticks_only_while_resumed(tmp_path):
    st = GossipState(tmp_path)
    st.set_paused(True)
    ticks = []
    sched = Scheduler(0.05, 0.2, st, lambda: ticks.append(time.time()) or "started", seed=0)
    sched.start()
    try:
        time.sleep(0.4)
        assert ticks == [] and sched.last_result == "paused"
        st.set_paused(False)
        deadline = time.time() + 5
        while len(ticks) < 3 and time.time() < deadline:
            time.sleep(0.02)
        assert len(ticks) >= 3
        st.set_paused(True)
        time.sleep(0.15)
        n = len(ticks)
        time.sleep(0.4)
        assert len(ticks) == n
    finally:
        sched.stop()
        sched.join(2)
    assert not sched.is_alive()


def test_scheduler_survives_a_failing_start():
    st_calls = []

    def boom():
        st_calls.append(1)
        raise RuntimeError("server busy")

    class Never:
        paused = False

    sched = Scheduler(0.02, 0.0, Never(), boom)
    sched.start()
    time.sleep(0.2)
    sched.stop()
    sched.join(2)
    assert len(st_calls) >= 2 and sched.last_result == "error: server busy"


def test_scheduler_needs_a_positive_interval(tmp_path):
    with pytest.raises(ValueError, match="scheduler interval: found 0; expected > 0 seconds"):
        Scheduler(0, 0.1, GossipState(tmp_path), lambda: "")
