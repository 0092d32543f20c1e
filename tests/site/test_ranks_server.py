"""A real server whose rounds run on two ranks (train.gpus with train.device: cpu: two gloo processes), driven like
3D Slicer drives it: Train, the round's stats, and Stop ending every rank."""

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
