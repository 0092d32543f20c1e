"""A round over several machines (train.distributed): the signed work files, the node's checks, and real rounds
with a second node (`gcml node`, a separate process on loopback standing for another machine)."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist
from helpers import TINY, cases_of, no_ranks_left, until, write_config

from gcml_app.config import ConfigError, load_config
from gcml_app.errors import RoundFailed
from gcml_app.ml.network import build_network
from gcml_app.rounds.compute import RoundWork, rng_state
from gcml_app.rounds.loop import run_round
from gcml_app.rounds.nodes import NodeRefused, announce, check_proofs, pack, prove, unpack, verify
from gcml_app.rounds.producers import DCML, Alone, Choice, Local
from gcml_app.store import ModelStore

SECRET = "s" * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site(tmp_path, name="site", distributed=None, gpus=(0,), **train):
    cfg = {**TINY["train"], "samples_per_case": 2, "num_threads": 1, "device": "cpu", "gpus": list(gpus),
           **({"distributed": distributed} if distributed else {}), **train}
    return write_config(tmp_path / name, train=cfg)


def _nodes(port, **over):
    return {"nodes": 2, "node_rank": 0, "rendezvous": f"127.0.0.1:{port}", "token_env": "GCML_NODES_SECRET", **over}


CONFIGS = [  # (train.distributed and train overrides, the error)
    (_nodes(29400, node_rank=2), {}, r"node_rank: found 2; expected 0 to 1 for 2 nodes"),
    (_nodes(29400, rendezvous="pacs.local"), {}, r"rendezvous: found 'pacs.local'; expected host:port"),
    (_nodes(29400, rendezvous="h:99999"), {}, r"rendezvous: found 'h:99999'; expected host:port with a port of "
                                               r"1-65535"),
    (_nodes(29400, nodes=1), {}, r"nodes.*greater than or equal to 2"),
    (_nodes(29400, nodes=3), {"samples_per_case": 4}, r"samples_per_case: found 4 with 1 gpus on each of 3 nodes; "
                                                      r"expected a multiple of 3"),
]


@pytest.mark.parametrize("distributed, train, message", CONFIGS)
def test_a_bad_distributed_section_names_the_key_and_what_it_expects(tmp_path, distributed, train, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_site(tmp_path, distributed=distributed, **train))


@pytest.mark.parametrize("value, message", [(None, "GCML_NODES_SECRET .* is not set"),
                                            ("short", "GCML_NODES_SECRET .* is shorter than 32 characters")])
def test_the_shared_secret_must_be_set_and_long(tmp_path, monkeypatch, value, message):
    cfg = load_config(_site(tmp_path, distributed=_nodes(29400)))
    monkeypatch.delenv("GCML_NODES_SECRET", raising=False)
    if value:
        monkeypatch.setenv("GCML_NODES_SECRET", value)
    with pytest.raises(KeyError, match=message):
        cfg.train.distributed.secret()


def _work(cfg, producer):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    start = build_network(cfg).state_dict()
    return RoundWork(cfg, [{"id": "c0", "image": "/x/c0.nii.gz", "label": "/x/l/c0.nii.gz"}], ["c0"], ["c0"], producer,
                     start, {k: v + 1 for k, v in start.items()}, 3, 11, [{"id": "u0", "image": "/x/u0.nii.gz"}],
                     rng_state())


def _dcml(cfg):
    return DCML(build_network(cfg).state_dict(), "ab" * 32, {"peer": "site-b", "peer_version": 4}, "in.safetensors")


PRODUCERS = [
    ("local", lambda cfg: Local()),
    ("dcml", _dcml),
    ("alone", lambda cfg: Alone(_dcml(cfg), Choice("alone", -0.3, 0.01, -0.28, 5, "far worse"))),
]


@pytest.mark.parametrize("kind, make", PRODUCERS, ids=[p[0] for p in PRODUCERS])
def test_the_work_crosses_as_json_and_safetensors_and_comes_back_whole(tmp_path, kind, make):
    cfg = load_config(_site(tmp_path))
    work = _work(cfg, make(cfg))
    folder = tmp_path / ".ranks-x"
    folder.mkdir()
    pack(work, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["work.json", "work.safetensors"]  # no pickle anywhere
    back = unpack(folder)
    assert back.cfg == cfg and (back.cases, back.train_ids, back.val_ids, back.unlabelled, back.epochs, back.seed) == (
        work.cases, work.train_ids, work.val_ids, work.unlabelled, work.epochs, work.seed)
    for a, b in ((work.start, back.start), (work.served, back.served)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(back.producer) is type(work.producer)
    for attr in ("incoming_sha256", "origin", "incoming_file", "choice", "train_incoming"):
        assert getattr(back.producer, attr, None) == getattr(work.producer, attr, None), attr
    if kind == "dcml":
        assert all(torch.equal(work.producer.state[k], back.producer.state[k]) for k in work.producer.state)
    # the random streams go on from the same place
    draws = []
    for rng in (work.rng, back.rng):
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["random"])
        draws.append((torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()))
    assert draws[0] == draws[1]


def _announced(tmp_path, monkeypatch):
    monkeypatch.setenv("GCML_NODES_SECRET", SECRET)
    cfg = load_config(_site(tmp_path, distributed=_nodes(_free_port())))
    folder = cfg.state_dir / ".ranks-abc"
    folder.mkdir(parents=True)
    digest = pack(_work(cfg, Local()), folder)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    nonce = announce(store, folder, digest, cfg, 1)
    return cfg, store, json.loads(store.get("work")), folder, nonce


def _tampered_json(folder):
    meta = json.loads((folder / "work.json").read_text())
    meta["epochs"] = 1000
    (folder / "work.json").write_text(json.dumps(meta))


REFUSALS = [  # (what goes wrong, the node's refusal)
    (lambda a, f, mp: mp.setenv("GCML_NODES_SECRET", "t" * 40), r"MAC does not verify with GCML_NODES_SECRET"),
    (lambda a, f, mp: a.update(folder="../../etc"), r"work folder '../../etc'; expected a round's .ranks-\* folder"),
    (lambda a, f, mp: a.update(nodes=3), r"a round of 3 nodes x 1 ranks; this node's train.distributed.nodes is 2"),
    (lambda a, f, mp: _tampered_json(f), r"work in .* differs from what node 0 announced"),
    (lambda a, f, mp: a.update(epochs=9), None),  # a key the MAC does not cover and nothing reads: harmless
]


def test_an_announcement_that_is_not_an_object_is_refused(tmp_path, monkeypatch):
    cfg, *_ = _announced(tmp_path, monkeypatch)
    with pytest.raises(NodeRefused, match="an announcement of type list; expected a JSON object"):
        verify(["work"], cfg)


@pytest.mark.parametrize("spoil, message", REFUSALS, ids=["secret", "folder", "nodes", "tampered", "extra-key"])
def test_a_node_runs_only_work_it_can_verify(tmp_path, monkeypatch, spoil, message):
    cfg, store, announced, folder, _ = _announced(tmp_path, monkeypatch)
    spoil(announced, folder, monkeypatch)
    if message is None:
        assert verify(announced, cfg) == (folder, 1)
    else:
        with pytest.raises(NodeRefused, match=message):
            verify(announced, cfg)


def test_node_0_admits_only_nodes_that_prove_the_secret(tmp_path, monkeypatch):
    cfg, store, announced, _, nonce = _announced(tmp_path, monkeypatch)
    node1 = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "distributed": cfg.train.distributed.model_copy(update={"node_rank": 1})})})
    assert check_proofs(store, nonce, cfg) is False  # node 1 not there yet
    monkeypatch.setenv("GCML_NODES_SECRET", "t" * 40)
    prove(store, announced, node1)  # with another secret
    monkeypatch.setenv("GCML_NODES_SECRET", SECRET)
    with pytest.raises(NodeRefused, match="node 1's proof does not verify with GCML_NODES_SECRET"):
        check_proofs(store, nonce, cfg)
    prove(store, announced, node1)
    assert check_proofs(store, nonce, cfg) is True


def _start_node(config, secret=SECRET, rounds=1):
    """``gcml node`` for node 1, once it waits for rounds (its imports done: a round's short timeout is not spent
    on them)."""
    env = {**os.environ, "GCML_NODES_SECRET": secret, "PYTHONUNBUFFERED": "1"}
    with open(config.parent / "node.log", "w") as log:  # the node keeps its own descriptor
        node = subprocess.Popen([sys.executable, "-m", "gcml_app.cli", "node", "--config", str(config), "--node-rank",
                                 "1", "--rounds", str(rounds)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    until(lambda: "waiting for rounds" in (config.parent / "node.log").read_text(), timeout=120, what="node 1 up")
    return node


@pytest.mark.slow
def test_two_nodes_compute_what_two_ranks_on_one_machine_compute(tmp_path, studies, monkeypatch):
    """World 2 either way, same seed: the same batches, the same gate table, the same published weights."""
    monkeypatch.setenv("GCML_NODES_SECRET", SECRET)
    cases = cases_of(studies[0])
    one_machine = load_config(_site(tmp_path, "one", gpus=(0, 1)))
    ref = run_round(one_machine, ModelStore(one_machine.state_dir / "models"), cases, epochs=2)

    config = _site(tmp_path, "two", distributed=_nodes(_free_port()))
    node = _start_node(config)
    try:
        cfg = load_config(config)
        store = ModelStore(cfg.state_dir / "models")
        rec = run_round(cfg, store, cases, epochs=2)
        assert node.wait(timeout=60) == 0, (config.parent / "node.log").read_text()
    finally:
        _stop(node)
    assert (rec["ranks"]["world"], rec["ranks"]["same_weights"]) == (2, True)
    assert [r["host"] for r in rec["ranks"]["per_rank"]] == [socket.gethostname()] * 2  # which machine each ran on
    assert rec["per_case"] == ref["per_case"] and rec["losses"] == ref["losses"]
    assert rec["ranks"]["per_rank"][0]["weights_sha256"] == ref["ranks"]["per_rank"][0]["weights_sha256"]
    assert store.served().sha256 == ModelStore(one_machine.state_dir / "models").served().sha256
    assert "ranks 1..1 of 2" in (config.parent / "node.log").read_text()
    assert not list(cfg.state_dir.glob(".ranks-*"))
    no_ranks_left()


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_a_node_with_another_secret_never_joins_and_the_round_fails_changing_nothing(tmp_path, studies, monkeypatch):
    monkeypatch.setenv("GCML_NODES_SECRET", SECRET)
    config = _site(tmp_path, "site", distributed=_nodes(_free_port()), rank_timeout_s=8)
    cfg = load_config(config)
    store = ModelStore(cfg.state_dir / "models")
    node = _start_node(config, secret="t" * 40)
    try:
        with pytest.raises(RoundFailed, match=r"node\(s\) \[1\] did not join within train.rank_timeout_s = 8 s "
                                              r"\(is gcml node running there"):
            run_round(cfg, store, cases_of(studies[0]), epochs=1)
        refused = "round refused: the announcement's MAC does not verify"
        until(lambda: refused in (config.parent / "node.log").read_text(), timeout=30, what="the node's refusal")
    finally:
        _stop(node)
    assert store.served() is None and store.history()[-1]["outcome"] == "failed"
    no_ranks_left()


@pytest.mark.slow
def test_a_node_that_dies_mid_round_fails_the_round_and_leaves_no_rank(tmp_path, studies, monkeypatch):
    """Its machine goes away (the node and its ranks killed): node 0's rank sees its peer gone and the round fails
    as a failed round, the served model unchanged."""
    monkeypatch.setenv("GCML_NODES_SECRET", SECRET)
    config = _site(tmp_path, "site", distributed=_nodes(_free_port()), rank_timeout_s=30)
    cfg = load_config(config)
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    node = _start_node(config, rounds=2)
    failed = []
    try:
        run_round(cfg, store, cases, epochs=1)
        served = store.served()

        def second():
            with pytest.raises(RoundFailed) as e:
                run_round(cfg, store, cases, epochs=200)
            failed.append(e.value)

        t = threading.Thread(target=second)
        t.start()
        until(lambda: (config.parent / "node.log").read_text().count("ranks 1..1 of 2") == 2, timeout=60,
              what="node 1 in the second round")
        until(lambda: len(psutil.Process(node.pid).children()) == 1, timeout=30, what="node 1's rank")
        time.sleep(2)  # well into training
        os.killpg(node.pid, signal.SIGKILL)
        t.join(timeout=120)
        assert not t.is_alive(), "the round did not end after its other node died"
    finally:
        _stop(node)
    assert re.search(r"rank 0 of 2 raised .*\(a rank on another node stopped: see that node's gcml node log\) while "
                     r"train", str(failed[0])), failed[0]
    assert store.served() == served and store.history()[-1]["outcome"] == "failed"
    assert not list(cfg.state_dir.glob(".ranks-*"))
    no_ranks_left()




NODE_CLI = [  # (gcml node's arguments after --config, whether the YAML has train.distributed, the secret, the error)
    (["--node-rank", "1"], False, SECRET, r"has no train.distributed section \(nodes, node_rank, rendezvous"),
    (["--node-rank", "5"], True, SECRET, r"--node-rank 5: .*node_rank: found 5; expected 0 to 1 for 2 nodes"),
    ([], True, SECRET, r"gcml node runs on nodes 1.. of train.distributed; node 0 is the MONAI Label server"),
    (["--node-rank", "1"], True, None, r"environment variable GCML_NODES_SECRET .* is not set"),
]


@pytest.mark.parametrize("args, distributed, secret, message", NODE_CLI, ids=["no-section", "rank", "node-0", "secret"])
def test_gcml_node_refuses_to_start_with_a_clear_message(tmp_path, monkeypatch, capsys, args, distributed, secret,
                                                         message):
    from gcml_app.cli import main

    monkeypatch.delenv("GCML_NODES_SECRET", raising=False)
    if secret:
        monkeypatch.setenv("GCML_NODES_SECRET", secret)
    config = _site(tmp_path, distributed=_nodes(_free_port()) if distributed else None)
    assert main(["node", "--config", str(config), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_gcml_serve_refuses_to_start_node_0_without_the_secret(tmp_path, monkeypatch, capsys):
    from gcml_app.cli import main

    monkeypatch.delenv("GCML_NODES_SECRET", raising=False)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("the server started without the secret"))
    config = _site(tmp_path, distributed=_nodes(_free_port()))
    assert main(["serve", "--config", str(config), "--studies", str(tmp_path)]) == 2  # before it execs the server
    assert "gcml serve: environment variable GCML_NODES_SECRET (train.distributed's shared secret) is not set" in (
        capsys.readouterr().err)

