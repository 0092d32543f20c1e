"""A real server whose rounds run on two ranks (train.gpus with train.device: cpu: two gloo processes), driven like
3D Slicer drives it: Train, the round's stats, and Stop ending every rank."""

import os
import signal
import subprocess
import sys

import psutil
import pytest
from helpers import TINY, make_studies, train, until, write_config
from monailabel.client import MONAILabelClient

from gcml_app.site.client import SiteClient
from gcml_app.site.launch import SiteServer, free_port
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def test_train_gcml_runs_on_two_ranks_and_stop_ends_them_all(tmp_path):
    studies, _ = make_studies(tmp_path, cases=6, labelled=5)
    config = write_config(tmp_path, state_dir=str(tmp_path / "state"), train={
        **TINY["train"], "samples_per_case": 2, "num_threads": 1, "device": "cpu", "gpus": [0, 1]})
    srv = SiteServer(config, studies, port=free_port(), log=tmp_path / "server.log")
    srv.spawn()
    srv.wait_ready()
    try:
        site, client = SiteClient(srv.url), MONAILabelClient(srv.url)
        wt = until(lambda: (w := site.status()["training"]["warm_trainer"])["ready"] and w, 120, "warm trainer ready")

        # Slicer's Train button: /train/gcml, the round forked warm, its two ranks forked from it
        status = train(client, epochs=2)
        assert status["status"] == "DONE", status.get("details")
        last = site.train_stats()["last_round"]
        assert last["start"] == "warm" and last["version"] == 1
        assert (last["ranks"]["world"], last["ranks"]["backend"], last["ranks"]["same_weights"]) == (2, "gloo", True)
        assert [r["device"] for r in last["ranks"]["per_rank"]] == ["cpu", "cpu"]
        assert ModelStore(tmp_path / "state" / "models").served_version() == 1
        assert site.status()["served"]["version"] == 1

        # Slicer's Stop mid-round: the round's process and both ranks end; nothing served changes
        client.train_start("gcml", {"epochs": 10_000})
        until(lambda: len(_descendants(wt["pid"])) >= 3, 60, "the round and its two ranks started")
        until(lambda: (site.train_stats().get("epoch") or 0) >= 1, 120, "the long round's first epoch")
        client.train_stop()
        until(lambda: not _descendants(wt["pid"]), 30, "the stopped round's process and ranks gone")
        assert site.status()["training"]["running"] is False
        assert site.status()["served"]["version"] == 1
    finally:
        srv.stop()


def test_train_gcml_on_a_site_of_two_machines_runs_node_1s_rank_in_the_round(tmp_path):
    """train.distributed: the server is node 0; `gcml node` (a process standing for the second machine, sharing
    state_dir) runs rank 1 of the round that Slicer's Train starts."""
    studies, _ = make_studies(tmp_path, cases=6, labelled=5)
    secret = {"GCML_NODES_SECRET": "n" * 40}
    config = write_config(tmp_path, state_dir=str(tmp_path / "state"), train={
        **TINY["train"], "samples_per_case": 2, "num_threads": 1, "device": "cpu", "gpus": [0],
        "distributed": {"nodes": 2, "node_rank": 0, "rendezvous": f"127.0.0.1:{free_port()}",
                        "token_env": "GCML_NODES_SECRET"}})
    node_log = tmp_path / "node.log"
    with open(node_log, "w") as log:
        node = subprocess.Popen([sys.executable, "-m", "gcml_app.cli",
                                 "node", "--config", str(config), "--node-rank", "1"], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **secret}, start_new_session=True)
    srv = SiteServer(config, studies, port=free_port(), log=tmp_path / "server.log", env=secret)
    srv.spawn()
    srv.wait_ready()
    try:
        site, client = SiteClient(srv.url), MONAILabelClient(srv.url)
        status = train(client, epochs=2)
        assert status["status"] == "DONE", status.get("details")
        last = site.train_stats()["last_round"]
        assert last["version"] == 1 and (last["ranks"]["world"], last["ranks"]["same_weights"]) == (2, True)
        assert "ranks 1..1 of 2" in node_log.read_text()
        assert site.status()["served"]["version"] == 1
    finally:
        srv.stop()
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=30)
