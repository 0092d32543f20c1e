"""The warm trainer (:mod:`gcml_app.site.warm`): rounds forked from an imported process, relayed through
MONAI Label's own train subprocess, with a cold start whenever it cannot serve."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import struct
import threading

import psutil
import pytest
from helpers import TINY, make_studies, train, until, write_config
from monailabel.client import MONAILabelClient

from gcml_app.site import warm
from gcml_app.site.client import SiteClient
from gcml_app.site.launch import SiteServer, free_port


def _fake_trainer(path, answer: bytes | None):
    """A Unix socket that reads one request and answers ``answer`` (``None``: closes at once)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    seen = {}

    def serve():
        conn, _ = srv.accept()
        with conn:
            seen["request"] = warm._recv(conn)
            if answer is not None:
                conn.sendall(answer)
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, seen


@pytest.mark.parametrize("answer,rc,out", [
    (b"epoch 1/2\nepoch 2/2\n" + warm._EXIT + b"0\n", 0, b"epoch 1/2\nepoch 2/2\n"),
    (b"Traceback ...\n" + warm._EXIT + b"1\n", 1, b"Traceback ...\n"),
    (warm._EXIT + b"3\n", 3, b""),
    (warm._COLD, None, b""),
    (None, None, b""),
    (b"epoch 1/2\n", 1, b"epoch 1/2\nwarm trainer: the round's process ended without an exit status (killed?)\n"),
], ids=["done", "error", "status-only", "declined", "closed", "killed"])
def test_relay_passes_output_and_status_or_asks_for_a_cold_start(tmp_path, answer, rc, out):
    t, seen = _fake_trainer(tmp_path / "sock", answer)
    buf = io.BytesIO()
    argv = ["/x/monailabel/interfaces/utils/app.py", "-m", "train", "-r", "{}"]
    assert warm.relay(str(tmp_path / "sock"), argv, out=buf) == rc
    t.join(5)
    assert buf.getvalue() == out
    assert seen["request"]["argv"] == argv


def test_relay_without_a_listening_trainer_starts_cold(tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "sock"))  # bound, never listening: a dead trainer's socket
    assert warm.relay(str(tmp_path / "sock"), ["app.py", "-m", "train"], out=io.BytesIO()) is None
    assert warm.relay(str(tmp_path / "missing"), ["app.py", "-m", "train"], out=io.BytesIO()) is None
    stale.close()


@pytest.mark.parametrize("tmpdir_len", [10, 150])
def test_the_socket_lives_in_a_private_folder_with_a_path_a_unix_socket_can_bind(tmp_path, monkeypatch, tmpdir_len):
    import tempfile

    base = tmp_path / ("d" * max(1, tmpdir_len - len(str(tmp_path)) - 1))
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    trainer = warm.WarmTrainer(nice=10)
    try:
        assert (trainer.folder.stat().st_mode & 0o777) == 0o700
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(trainer.path))  # raises for a path over 107 bytes
    finally:
        trainer.stop()
    assert not trainer.folder.exists()


def _site(tmp_path, **train_overrides) -> SiteServer:
    studies, _ = make_studies(tmp_path, cases=6, labelled=5)
    config = write_config(tmp_path, state_dir=str(tmp_path / "state"), train={**TINY["train"], **train_overrides})
    srv = SiteServer(config, studies, port=free_port(), log=tmp_path / "server.log")
    srv.spawn()
    srv.wait_ready()
    return srv


def _round_children(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children() if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_rounds_fork_from_the_warm_trainer_stop_with_slicer_and_survive_its_death(tmp_path):
    srv = _site(tmp_path)
    try:
        site, client = SiteClient(srv.url), MONAILabelClient(srv.url)
        wt = until(lambda: (w := site.status()["training"]["warm_trainer"])["ready"] and w, 120, "warm trainer ready")
        assert psutil.Process(wt["pid"]).nice() == TINY["train"].get("nice", 10)
        assert os.sched_getscheduler(wt["pid"]) == os.SCHED_IDLE  # train.sched_idle, on by default
        # the server's OpenMP threads sleep between regions (serve_main); the trainer's keep OpenMP's default
        assert "OMP_WAIT_POLICY" not in psutil.Process(wt["pid"]).environ()

        # malformed requests on its socket are refused and logged; it goes on serving rounds
        path = next(a for a in psutil.Process(wt["pid"]).cmdline() if a.endswith("sock"))
        for raw in (b"\xff\xff\xff\xff", struct.pack("!I", 9) + b"not json!", struct.pack("!I", 2) + b"[]"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                s.sendall(raw)
                assert s.recv(64) == b""  # closed without running anything

        # Slicer's Train button: the round runs warm, through MONAI Label's train task
        status = train(client)
        assert status["status"] == "DONE"
        last = site.train_stats()["last_round"]
        assert last["start"] == "warm" and last["version"] == 1
        assert any("gcml[test-site] gate:" in line for line in status["details"])  # the round's log, relayed

        # Slicer's Stop: MONAI Label kills the relay; the forked round ends with it
        client.train_start("gcml", {"epochs": 10_000})
        until(lambda: _round_children(wt["pid"]), 60, "a round forked")
        until(lambda: (site.train_stats().get("epoch") or 0) >= 1, 120, "the long round's first epoch")
        client.train_stop()
        until(lambda: not _round_children(wt["pid"]), 30, "the stopped round's process gone")
        assert site.status()["training"]["running"] is False
        assert site.status()["served"]["version"] == 1

        # the warm trainer dies: rounds start cold, and it comes back with a new process
        os.kill(wt["pid"], signal.SIGKILL)
        until(lambda: not site.status()["training"]["warm_trainer"]["ready"], 30, "death noticed")
        assert train(client)["status"] == "DONE"
        assert site.train_stats()["last_round"]["start"] == "cold"
        again = until(lambda: (w := site.status()["training"]["warm_trainer"])["ready"] and w, 120, "restarted")
        assert again["pid"] != wt["pid"]
        assert train(client)["status"] == "DONE"
        assert site.train_stats()["last_round"]["start"] == "warm"
    finally:
        srv.stop()
    log = (tmp_path / "server.log").read_text()
    assert "restarting it in" in log
    assert "warm trainer: request refused (request of 4294967295 bytes refused)" in log
    assert "warm trainer: request refused (request without a command line)" in log
    assert re.search(r"\d{6,} start-up objects exempt from garbage collection", log)  # the server's, frozen


@pytest.mark.slow
def test_warm_false_runs_every_round_cold_without_a_warm_trainer(tmp_path):
    srv = _site(tmp_path, warm=False)
    try:
        site = SiteClient(srv.url)
        assert site.status()["training"]["warm_trainer"] == {"ready": False, "pid": None}
        assert train(MONAILabelClient(srv.url))["status"] == "DONE"
        last = site.train_stats()["last_round"]
        assert last["start"] == "cold" and last["startup_s"] > 0
        assert not [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                    if "gcml_app.site.warm" in " ".join(p.cmdline())]
    finally:
        srv.stop()
