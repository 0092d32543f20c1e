"""One round on several devices: a process per device in a ``torch.distributed`` group (docs/design.md,
"Several devices").

:func:`run_on_ranks` is called by :func:`~gcml_app.rounds.loop.run_round` when ``train.gpus`` names more
than one device; :func:`launch`, the part that starts and watches the ranks, also runs a scoring run's
ranks (:mod:`gcml_app.site.scoring`). The round's own process stays out of the group: it hosts the rendezvous store
(on one machine a ``FileStore`` in the round's folder and the group on the loopback interface: no port at all,
nothing reachable from the network; across machines a ``TCPStore`` on ``train.distributed.rendezvous``,
:mod:`gcml_app.rounds.nodes`), starts one rank per device with
``torch.multiprocessing``, relays rank 0's progress, and reads back what rank 0 wrote. It alone then
decides and commits: the ranks never touch the model store.

- **Start.** CPU ranks (gloo) of one thread each are forks of the round's process: milliseconds,
  nothing to import. CPU ranks of several threads, and GPU ranks (NCCL), start with ``spawn``: a fresh
  interpreter each (the imports, a few seconds once per round). A fork of a process that has run an
  OpenMP parallel region (PyTorch's CPU kernels, GNU libgomp) hangs in its own first parallel region,
  and a rank of one thread never opens one. A CUDA driver initialised before a fork is unusable in the
  child, and the round's process has asked it how many devices there are.
- **Faults.** A rank that raises, dies or is killed ends the group: ``ProcessContext.join`` terminates the
  others (SIGTERM, then SIGKILL after :data:`GRACE_S`). A rank that hangs leaves the others waiting in a
  collective until ``train.rank_timeout_s``; they raise, and the same follows. Each rank dies with the
  round's process (``PR_SET_PDEATHSIG``), so Slicer's Stop, which kills that process, ends every rank.
  The round then fails as any failed round does: recorded, nothing served changed, labels still pending.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import importlib
import json
import logging
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from gcml_app.config import SiteConfig
from gcml_app.rounds.compute import Computed, Phase, RoundWork, compute
from gcml_app.rounds.nodes import NodeRefused, announce, check_proofs, pack
from gcml_app.rounds.producers import Produced

__all__ = ["GRACE_S", "RankFailed", "join_round", "launch", "run_on_ranks"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_spawn = importlib.import_module("torch.multiprocessing.spawn")  # the module: torch.multiprocessing.spawn is a function

POLL_S = 0.25  # how often the round's process looks at its ranks (and relays progress)
GRACE_S = 5.0  # after one rank fails, how long the others get to end before SIGTERM, then again before SIGKILL
_PR_SET_PDEATHSIG = 1


class RankFailed(RuntimeError):
    """A rank raised, died or stopped answering: the round fails. ``phase`` is where that rank was."""

    def __init__(self, message: str, phase: str):
        super().__init__(message)
        self.phase = phase


def run_on_ranks(work: RoundWork, devices: list[torch.device],
                 report: Callable[[dict[str, Any]], None] | None = None) -> Computed:
    """Run :func:`~gcml_app.rounds.compute.compute` in one process per device and return rank 0's result.

    Args:
        work: what the round computes (every rank gets the same).
        devices: one per rank on this machine: GPUs (NCCL) or CPU processes (gloo). With
            ``train.distributed``, as many again on each other node (:func:`~gcml_app.rounds.nodes.serve_node`).
        report: called in this process with rank 0's per-epoch progress.

    Returns:
        rank 0's :class:`~gcml_app.rounds.compute.Computed`, with ``ranks``: the world size, backend, how the
        ranks started and in how many seconds, and per rank its machine (host name), device, phase timings,
        peak memory, cache figures and the sha256 of its candidates' weights (``same_weights``: they all agree).

    Raises:
        ValueError: ``train.samples_per_case`` does not split over the devices.
        RankFailed: a rank raised, died or timed out; every rank's process has ended.
    """
    cfg = work.cfg
    if cfg.train.distributed and cfg.train.distributed.node_rank:
        raise ValueError(f"train.distributed.node_rank: found {cfg.train.distributed.node_rank} in a round; rounds run "
                         "on node 0, the MONAI Label server (run gcml node on the others)")
    world = len(devices) * (cfg.train.distributed.nodes if cfg.train.distributed else 1)
    if cfg.train.samples_per_case % world:  # train.gpus: all, on a machine with more GPUs than that
        raise ValueError(f"train.samples_per_case: found {cfg.train.samples_per_case} for {world} devices; expected a "
                         f"multiple of {world} (each case's crops are dealt out over the devices)")
    done, started = launch(_round_rank, (work,), devices, cfg, _read, report, work=work)
    done.ranks = {"world": world, **started, **done.ranks}
    logger.info(f"round on {world} ranks ({started['backend']}, {started['start']}): ranks ready in "
                f"{started['start_s']} s")
    return done


def launch(target: Callable[..., None], args: tuple, devices: list[torch.device], cfg: SiteConfig,
           read: Callable[[Path], T], report: Callable[[dict[str, Any]], None] | None = None,
           work: RoundWork | None = None) -> tuple[T, dict[str, Any]]:
    """``target(rank, device, out, store, post, *args)`` in one process per device, in one ``torch.distributed`` group.

    The group is initialised before ``target`` runs (NCCL on GPUs, gloo on CPUs, every wait bounded by
    ``train.rank_timeout_s``) and destroyed after; a CPU rank gets ``train.num_threads`` torch threads, by
    default the machine's cores shared out (one each on a 2-core machine with 2 ranks). ``out`` is a
    temporary folder in ``state_dir`` where rank 0 leaves its result, read by ``read(out)`` here before the
    folder goes; ``store`` is the rendezvous store (a rank
    sets ``phase/<rank>`` there for the message of a failure); ``post`` (rank 0 only, else ``None``) sends a
    progress dict to ``report`` in this process.

    With ``work`` and ``train.distributed``, the group spans the site's nodes: the store listens on
    ``train.distributed.rendezvous``, ``work`` is packed into ``out`` and announced
    (:mod:`gcml_app.rounds.nodes`), and this machine's ranks (0 to ``len(devices) - 1``) join the group only
    once every other node has proved it holds the shared secret.

    Returns:
        ``read(out)`` and how the ranks started: ``{"backend", "start", "start_s"}``.

    Raises:
        RankFailed: a rank raised, died or timed out; every rank's process has ended.
    """
    local, timeout_s = len(devices), cfg.train.rank_timeout_s
    nodes = cfg.train.distributed if work is not None else None
    world = local * (nodes.nodes if nodes else 1)
    threads, backend, method = _how(cfg, devices)
    timeout = timedelta(seconds=timeout_s)
    launched = time.time()
    with tempfile.TemporaryDirectory(dir=cfg.state_dir, prefix=".ranks-") as out:
        # one machine: a file in the round's folder, no socket at all; several: node 0's configured endpoint
        where = ("tcp", *nodes.address()) if nodes else ("file", str(Path(out) / ".store"))
        store = _store(where, timeout, master=True)
        try:
            where = ("tcp", where[1], store.port) if nodes else where
            nonce = announce(store, Path(out), pack(work, Path(out)), cfg, local) if nodes else None
            if not nodes:
                store.set("go", "1")
            procs = mp.start_processes(_rank_entry, nprocs=local, join=False, start_method=method, args=(
                world, 0, backend, where, devices, out, os.getpid(), timeout_s, threads, target, args))
            relayed, admitted = 0, nodes is None
            try:
                while not procs.join(timeout=POLL_S, grace_period=GRACE_S):
                    admitted = admitted or _admit(store, nonce, cfg, time.time() - launched)
                    relayed = _relay(store, relayed, report)
            except _spawn.ProcessException as e:
                raise _failure(e, procs.processes, store, world, timeout_s) from None
            except BaseException:  # this process is stopping (Ctrl-C, an error here): so do its ranks
                for p in procs.processes:
                    if p.is_alive():
                        p.kill()
                raise
            finally:
                _drop_error_files(procs)
            _relay(store, relayed, report)
            result = read(Path(out))
            ready = [float(store.get(f"ready/{r}")) for r in range(world)]
        finally:  # a TCP store's server thread ends now, in this process: never left to a traceback, then a fork's
            del store  # collector
    return result, {"backend": backend, "start": method, "start_s": round(max(ready) - launched, 3)}


def _store(where: tuple, timeout: timedelta, master: bool = False) -> dist.Store:
    """The round's rendezvous store: ``("file", path)`` on one machine, ``("tcp", host, port)`` across machines
    (``master``: this process serves it)."""
    if where[0] == "file":
        store = dist.FileStore(where[1], -1)
        store.set_timeout(timeout)
        return store
    _, host, port = where
    return dist.TCPStore(host, port, is_master=master, timeout=timeout, wait_for_workers=False)


def _how(cfg: SiteConfig, devices: list[torch.device]) -> tuple[int, str, str]:
    """A CPU rank's torch threads, the backend and the start method of this machine's ranks."""
    threads = cfg.train.num_threads or max(1, len(os.sched_getaffinity(0)) // len(devices))
    backend = "nccl" if devices[0].type == "cuda" else "gloo"
    method = "spawn" if devices[0].type == "cuda" or threads > 1 else "fork"  # see the module's docstring
    return threads, backend, method


def _admit(store: dist.Store, nonce: str, cfg: SiteConfig, waited_s: float) -> bool:
    """Let this machine's ranks join once every other node has proved itself (``True``: done)."""
    try:
        if check_proofs(store, nonce, cfg):
            store.set("go", "1")
            return True
    except NodeRefused as e:
        raise RankFailed(f"{e}: the round did not start", "prepare") from None
    if waited_s > cfg.train.rank_timeout_s:
        d = cfg.train.distributed
        missing = [k for k in range(1, d.nodes) if not store.check([f"node/{k}"])]
        raise RankFailed(f"node(s) {missing} did not join within train.rank_timeout_s = {cfg.train.rank_timeout_s:g} s "
                         f"(is gcml node running there, with rendezvous {d.rendezvous} and the same state_dir?)",
                         "prepare")
    return False


def join_round(work: RoundWork, devices: list[torch.device], first: int, world: int, host: str, port: int,
               folder: Path, cfg: SiteConfig) -> None:
    """Another node's share of a round (:func:`~gcml_app.rounds.nodes.serve_node`): ranks ``first`` onwards, one
    per device, in the group node 0's round hosts at ``host:port``. They leave nothing but their part of the
    collectives; one that fails is named in the store for node 0's message.

    Raises:
        RankFailed: one of this node's ranks raised or died; every one of them has ended.
    """
    threads, backend, method = _how(cfg, devices)
    procs = mp.start_processes(_rank_entry, nprocs=len(devices), join=False, start_method=method, args=(
        world, first, backend, ("tcp", host, port), devices, str(folder), os.getpid(), cfg.train.rank_timeout_s,
        threads, _round_rank, (work,)))
    try:
        while not procs.join(timeout=POLL_S, grace_period=GRACE_S):
            pass
    except _spawn.ProcessException as e:
        ended = {first + i: p.exitcode for i, p in enumerate(procs.processes) if p.exitcode not in (0, None)}
        with contextlib.suppress(Exception):  # node 0's store may be gone already
            client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=5))
            for r, code in ended.items():
                if code != -signal.SIGTERM and not client.check([f"error/{r}"]):
                    client.set(f"error/{r}", json.dumps({"error": _ended(code), "comms": False}))
        raise RankFailed(f"ranks {sorted(ended)} ended: {e}", "train") from None
    except BaseException:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
        raise
    finally:
        _drop_error_files(procs)


def _drop_error_files(procs: _spawn.ProcessContext) -> None:
    """Delete the files through which ``start_processes`` hands a rank's exception to this process
    (``pytorch-errorfile-*.pickle`` in the temporary folder): torch reads them and leaves them."""
    for f in procs.error_files:
        with contextlib.suppress(OSError):
            os.unlink(f)


def _ended(code: int) -> str:
    return f"ended: terminated by signal {signal.Signals(-code).name}" if code < 0 else f"ended: exit status {code}"


def _rank_entry(index: int, world: int, first: int, backend: str, where: tuple, devices: list[torch.device],
                out: str, parent: int, timeout_s: float, threads: int, target: Callable[..., None],
                args: tuple) -> None:
    """One rank (``first + index``): die with the process that started it, wait for the round's go-ahead, join
    the group (on one machine over the loopback interface only), run ``target``, leave the group."""
    # A fork inherits the parent's objects, garbage included (a finished round's rendezvous store, say, still
    # held by a traceback): its garbage collection must never run their destructors here. A TCPStore's joins
    # its server thread, which does not exist in a fork: the rank would wait forever. Frozen, the collector
    # leaves every inherited object alone; what the rank allocates itself is collected as usual.
    gc.freeze()
    _die_with(parent)
    rank, device = first + index, devices[index]
    timeout = timedelta(seconds=timeout_s)
    client = _store(where, timeout)
    if where[0] == "file":  # one machine: gloo's and NCCL's own sockets on loopback, never on the site's network
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    client.set(f"phase/{rank}", "start")
    client.wait(["go"])  # several machines: until every node has proved itself
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, store=dist.PrefixStore("group", client), rank=rank, world_size=world,
                            timeout=timeout)
    try:
        client.set(f"ready/{rank}", repr(time.time()))
        target(rank, device, Path(out), client, _progress(client) if rank == 0 else None, *args)
    except Exception as e:  # for the failure's message: this rank's own error, or one a lost peer caused
        with contextlib.suppress(Exception):
            client.set(f"error/{rank}", json.dumps({"error": f"{type(e).__name__}: {e}", "comms": _is_comms(e)}))
        raise
    finally:
        dist.destroy_process_group()


def _round_rank(rank: int, device: torch.device, out: Path, client: dist.Store,
                post: Callable[[dict[str, Any]], None] | None, work: RoundWork) -> None:
    """A round's rank: :func:`~gcml_app.rounds.compute.compute`, then (rank 0) the result for the round's process."""
    world = dist.get_world_size()
    phase = Phase(lambda name: client.set(f"phase/{rank}", name))
    phase("prepare")
    done = compute(work, device, post, phase)
    mine = {"host": socket.gethostname(), "device": str(device), "timings": done.timings,
            "peak_rss_mb": max(done.peak_mb.values()), "cache": done.cache,
            "weights_sha256": _digest(done.produced.states)}
    every: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(every, mine)
    if rank == 0:
        same = len({r["weights_sha256"] for r in every}) == 1
        if not same:
            logger.error(f"ranks ended with different weights: {[r['weights_sha256'][:12] for r in every]}")
        done.ranks = {"same_weights": same, "per_rank": every}
        _write(out, done)


def _die_with(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when the round's process ends (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: a stopped round's ranks then end at their next collective
        pass
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def _progress(client: dist.Store) -> Callable[[dict[str, Any]], None]:
    """Rank 0's progress, numbered in the store for the round's process to relay."""
    count = [0]

    def post(p: dict[str, Any]) -> None:
        client.set(f"progress/{count[0]}", json.dumps(p))
        count[0] = client.add("progress", 1)

    return post


def _relay(store: dist.Store, seen: int, report: Callable[[dict[str, Any]], None] | None) -> int:
    """Pass the progress posted since ``seen`` to ``report``; returns how many have been relayed."""
    n = store.add("progress", 0)
    for i in range(seen, n):
        if report:
            report(json.loads(store.get(f"progress/{i}")))
    return n


def _is_comms(e: Exception) -> bool:
    """Whether ``e`` is the group's own error: a collective that timed out or lost a peer (the effect of another
    rank's fault, not a fault of this rank)."""
    return isinstance(e, getattr(dist, "DistError", ())) or bool(_COMMS.search(str(e)))


_COMMS = re.compile(r"gloo|nccl|connection (closed|reset)|broken pipe|timed out|timeout", re.IGNORECASE)


def _errors(store: dist.Store, world: int) -> dict[int, dict[str, Any]]:
    """The errors the ranks left in the store: rank -> ``{"error", "comms"}``."""
    return {r: json.loads(store.get(f"error/{r}")) for r in range(world) if store.check([f"error/{r}"])}


def _failure(e: Exception, procs: list, store: dist.Store, world: int, timeout_s: float) -> RankFailed:
    """What went wrong, in one line: which rank, in which phase, and the error it raised or how it ended.

    When one rank fails the others fail too, a moment later, in their collectives; whichever the join saw
    first, the message names the cause: a rank's own error first, else a rank that died without one (killed),
    else the timeout of a rank that waited for one that stopped answering.
    """
    errors = _errors(store, world)
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    own = [r for r, x in errors.items() if not x["comms"]]
    died = [r for r, c in codes.items() if r not in errors and c not in (0, None, -signal.SIGTERM)]
    if not own and not died and world > len(procs):  # another node names its own ranks' ends a moment later
        deadline = time.monotonic() + GRACE_S
        while not own and time.monotonic() < deadline:
            time.sleep(POLL_S)
            errors = _errors(store, world)
            own = [r for r, x in errors.items() if not x["comms"]]
    if own:
        i = own[0]
        what = errors[i]["error"] if errors[i]["error"].startswith("ended:") else f"raised {errors[i]['error']}"
    elif died:
        i, code = died[0], codes[died[0]]
        what = _ended(code)
    else:
        i = e.error_index
        cause = errors[i]["error"] if i in errors else next(
            (ln.strip() for ln in reversed(str(e).splitlines()) if ln.strip()), type(e).__name__)
        if re.search(r"timed out|timeout", cause, re.IGNORECASE):  # not a RuntimeError's "time"
            cause += f" (another rank stopped answering for train.rank_timeout_s = {timeout_s:g} s)"
        elif world > len(procs):
            cause += " (a rank on another node stopped: see that node's gcml node log)"
        what = f"raised {cause}"
    phase = store.get(f"phase/{i}").decode() if store.check([f"phase/{i}"]) else "start"
    return RankFailed(f"rank {i} of {world} {what} while {phase}", "prepare" if phase == "start" else phase)


def _digest(states: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over every candidate's tensors, in order: equal on every rank when DDP kept them in step."""
    h = hashlib.sha256()
    for name, state in states.items():
        h.update(name.encode())
        for k, v in state.items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()


def _write(out: Path, done: Computed) -> None:
    """Rank 0's result for the round's process: each candidate as safetensors, the rest as JSON."""
    names = list(done.produced.states)
    for i, name in enumerate(names):
        state = {k: v.detach().cpu().contiguous() for k, v in done.produced.states[name].items()}
        save_file(state, str(out / f"{i}.safetensors"))
    p = done.produced
    meta = {"names": names, "mode": p.mode, "kept": p.kept, "losses": p.losses, "choice": p.choice,
            "scores": done.scores, "clicked": done.clicked, "cache": done.cache, "timings": done.timings,
            "peak_mb": done.peak_mb, "precision": done.precision, "peak_gpu_mb": done.peak_gpu_mb, "ranks": done.ranks}
    (out / "result.json").write_text(json.dumps(meta))


def _read(out: Path) -> Computed:
    meta = json.loads((out / "result.json").read_text())
    states = {name: load_file(str(out / f"{i}.safetensors")) for i, name in enumerate(meta["names"])}
    produced = Produced(meta["mode"], states, meta["kept"], meta["losses"], meta["choice"])
    return Computed(produced, meta["scores"], meta["clicked"], meta["cache"], meta["timings"], meta["peak_mb"],
                    meta["precision"], meta["peak_gpu_mb"], meta["ranks"])
