"""A round on several devices: real torch.distributed ranks (gloo, two CPU processes), their results and their faults."""

import gc
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from helpers import TINY, cases_of, no_ranks_left, write_config

from gcml_app.config import load_config
from gcml_app.errors import RoundFailed
from gcml_app.ml.cache import CachedCases, CaseCache
from gcml_app.ml.evaluate import dice_per_case
from gcml_app.ml.network import build_network
from gcml_app.rounds.loop import run_round, split_of
from gcml_app.rounds.ranks import launch
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow  # every test trains models in several processes


def _site(tmp_path, name="site", gpus=(0, 1), **train):
    """The tiny site on two CPU ranks (train.device: cpu maps each listed device to a gloo process)."""
    cfg = {**TINY["train"], "samples_per_case": 2, "num_threads": 1, "device": "cpu",
           "gpus": list(gpus) if gpus else None, **train}
    return load_config(write_config(tmp_path / name, train=cfg))


def test_two_ranks_gate_on_the_table_one_process_computes_and_end_with_equal_weights(tmp_path, studies):
    cfg = _site(tmp_path)
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    seen = []
    rec = run_round(cfg, store, cases, epochs=2, progress=seen.append)
    assert [p["epoch"] for p in seen] == [1, 2]  # rank 0's progress, relayed
    ranks = rec["ranks"]
    assert (ranks["world"], ranks["backend"], ranks["start"], ranks["same_weights"]) == (2, "gloo", "fork", True)
    assert len({r["weights_sha256"] for r in ranks["per_rank"]}) == 1 and all(r["timings"] for r in ranks["per_rank"])
    assert rec["losses"][-1]["crop_passes"] == 4 * 2  # the one-device budget: 4 training cases x 2 crops, all ranks

    # one process scores the published model on the same validation cases: the gate's table, to the digit
    _, val_ids, _ = split_of(cfg, cases)
    by_id = {c["id"]: c for c in cases}
    model = build_network(cfg)
    model.load_state_dict(store.load(rec["version"]))
    val = CachedCases(CaseCache(cfg).prepare([by_id[i] for i in val_ids]))
    one = dice_per_case(model, val, list(cfg.labels), cfg.roi_size, 1, cfg.validation.overlap, torch.device("cpu"))
    assert rec["per_case"]["local"] == [{k: round(v, 6) for k, v in c.items()} for c in one]

    # a DCML round: both models in their own DDP, the partner's side of every cross term detached
    torch.manual_seed(7)
    from safetensors.torch import save_file
    peer = cfg.state_dir / "peers" / "peer.safetensors"
    peer.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in build_network(cfg).state_dict().items()}, str(peer))
    rec2 = run_round(cfg, store, cases, epochs=2, incoming=peer)
    assert rec2["mode"] == "dcml" and rec2["ranks"]["same_weights"]
    assert set(rec2["per_case"]) == {"served", "dcml_local", "dcml_incoming", "average"}
    assert rec2["per_case"]["served"] == rec["per_case"]["local"]  # the served model, scored again across ranks
    no_ranks_left()


def test_a_round_on_two_ranks_is_reproducible_and_spends_one_devices_budget(tmp_path, studies):
    cases = cases_of(studies[0])
    recs, served = [], []
    for name, gpus in (("a", (0, 1)), ("b", (0, 1)), ("one", None)):
        cfg = _site(tmp_path, name, gpus)
        store = ModelStore(cfg.state_dir / "models")
        recs.append(run_round(cfg, store, cases, epochs=2))
        served.append(store.served().sha256)
    a, b, one = recs
    assert served[0] == served[1] and a["per_case"] == b["per_case"] and a["losses"] == b["losses"]
    # the one-device budget: as many steps, each over as many crops (the ranks' shares together)
    assert [(e["steps"], e["crop_passes"]) for e in a["losses"]] == [(e["steps"], e["crop_passes"]) for e in one["losses"]]


def test_ranks_of_several_threads_start_as_fresh_interpreters(tmp_path, studies):
    """A fork of a process that has run OpenMP regions hangs in its own first one (GNU libgomp): a CPU rank of
    more than one thread (a many-core CPU server) is spawned instead, and the round completes."""
    torch.ones(1 << 20).sum()  # this process has run OpenMP regions (so has any round's process)
    cfg = _site(tmp_path, num_threads=2)
    rec = run_round(cfg, ModelStore(cfg.state_dir / "models"), cases_of(studies[0]), epochs=1)
    assert (rec["ranks"]["start"], rec["ranks"]["same_weights"]) == ("spawn", True)
    no_ranks_left()


def _raise_on_rank_1(*args, **kwargs):
    if dist.get_rank() == 1:
        raise ValueError("a fault in rank 1")
    return _STEP(*args, **kwargs)


def _killed_on_rank_1(*args, **kwargs):
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return _STEP(*args, **kwargs)


def _hang_on_rank_1(*args, **kwargs):
    if dist.get_rank() == 1:
        time.sleep(3600)
    return _STEP(*args, **kwargs)


def _oom_on_rank_1(*args, **kwargs):
    if dist.get_rank() == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _STEP(*args, **kwargs)


from gcml_app.ml import supervised  # noqa: E402

_STEP = supervised.supervised_step

FAULTS = [
    # (the fault in rank 1's first training step, train.rank_timeout_s, the failed round's reason: the cause,
    # whichever rank the join saw fail first, since rank 0 then fails too in its collective)
    (_raise_on_rank_1, 60, r"rank 1 of 2 raised ValueError: a fault in rank 1 while train"),
    (_killed_on_rank_1, 60, r"rank 1 of 2 ended: terminated by signal SIGKILL while train"),
    (_hang_on_rank_1, 5, r"rank 0 of 2 raised .*(?i:timed out|timeout).*another rank stopped answering for "
                         r"train.rank_timeout_s = 5 s.* while train"),
    (_oom_on_rank_1, 60, r"out of host memory while train on cpu \(fp32\): lower train.samples_per_case \(2\)"),
]


@pytest.mark.parametrize("fault, timeout, reason", FAULTS, ids=["raises", "killed", "hangs", "out-of-memory"])
def test_a_rank_that_fails_fails_the_round_and_changes_nothing(tmp_path, studies, monkeypatch, fault, timeout, reason):
    cfg = _site(tmp_path)
    store = ModelStore(cfg.state_dir / "models")
    cases = cases_of(studies[0])
    run_round(cfg, store, cases, epochs=1)  # the default timeout: a slow machine's first round is not the fault
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"rank_timeout_s": timeout})})
    served, working = store.served(), store.working_info()
    monkeypatch.setattr(supervised, "supervised_step", fault)  # the ranks are forks: they inherit the fault
    errorfiles = set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*"))
    t = time.monotonic()
    with pytest.raises(RoundFailed, match=reason) as e:
        run_round(cfg, store, cases, epochs=1, extra={"round_id": "r-fault"})
    assert time.monotonic() - t < timeout + 30  # bounded: a timeout at most, then the others' grace period
    assert e.value.phase == "train"
    assert store.served() == served and store.working_info() == working
    last = store.history()[-1]
    assert (last["event"], last["outcome"], last["round_id"], last["phase"]) == ("failed", "failed", "r-fault", "train")
    assert not list(cfg.state_dir.glob(".ranks-*"))  # rank 0's result folder is gone with the round
    assert set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*")) == errorfiles  # and torch's error file
    no_ranks_left()


@pytest.mark.timeout(60)  # the failure this guards against is a rank that waits forever
def test_a_rank_never_collects_what_the_parent_left_behind(tmp_path):
    """A fork inherits the parent's garbage: a finished round's rendezvous store held in a reference cycle (by a
    failed round's traceback, in the server or a test session). Collected in the rank, its destructor would
    join a server thread that does not exist there, forever."""
    cfg = _site(tmp_path)
    cfg.state_dir.mkdir(parents=True)
    gc.disable()  # keep the parent's own collector from freeing it first
    try:
        left = [dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)]
        left.append(left)  # a cycle: only a collector frees it
        del left
        result, started = launch(_collect, (), [torch.device("cpu")] * 2, cfg, lambda out: (out / "ok").read_text())
    finally:
        gc.enable()
    assert result == "collected" and started["backend"] == "gloo"
    no_ranks_left()


def test_one_machines_ranks_listen_on_no_network_interface(tmp_path):
    """The round's rendezvous is a file and the group talks over loopback: while every rank is up, no process of
    the round listens on an address another machine could reach."""
    cfg = _site(tmp_path)
    cfg.state_dir.mkdir(parents=True)
    before = _listening_in(os.getpid())  # what this test process had already (an earlier test's leftovers)
    result, _ = launch(_listening, (os.getpid(), before), [torch.device("cpu")] * 2, cfg,
                       lambda out: (out / "listening").read_text())
    listening = result.split()
    assert listening, "the ranks' own sockets were not seen"  # gloo's pairs listen: the probe sees them
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip in listening), listening
    no_ranks_left()


def _listening_in(pid: int) -> set[tuple[str, int]]:
    """Listening addresses of ``pid`` and its descendants."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _listening(rank, device, out, client, post, parent, before):
    dist.barrier()  # every rank in the group, its sockets open
    if rank == 0:
        (out / "listening").write_text(" ".join(ip for ip, _ in _listening_in(parent) - before))
    dist.barrier()


def _collect(rank, device, out, client, post):
    gc.collect()
    dist.barrier()
    if rank == 0:
        (out / "ok").write_text("collected")


def test_ranks_die_with_the_rounds_process(tmp_path, studies):
    """Slicer's Stop kills the round's process: its ranks must not outlive it (PR_SET_PDEATHSIG)."""
    import multiprocessing

    cfg = _site(tmp_path)
    cases = cases_of(studies[0])

    def round_process():
        run_round(cfg, ModelStore(cfg.state_dir / "models"), cases, epochs=50)

    proc = multiprocessing.get_context("fork").Process(target=round_process)
    proc.start()
    deadline = time.monotonic() + 60
    while len(ranks := psutil.Process(proc.pid).children()) < 2:
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks outlived the round's process: {[p.pid for p in alive]}"
