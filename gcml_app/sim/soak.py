"""``gcml bench --soak MINUTES``: a site's working day, compressed: everything at once for a given time,
then a check that nothing was lost -> ``soak.json``, ``soak.png``.

Two real servers on loopback (site-a under load, its partner site-b) from the sample configs. The partner
stands for another hospital's machine, so it runs at the lowest CPU weight
(:func:`gcml_app.site.launch.lowest_weight`): its rounds and scoring are not site-a's load. For the whole run:

- ``clients`` Slicer-like clients (``monailabel.client``, a seeded think time between calls), each
  looping: ``/info``, next sample, ``gcml_seg`` on it, save its final label (a new case while any
  is unlabelled, then a correction of one already saved); with ``interactive``, site-a serves ``gcml_edit``
  too and each client clicks 1-3 times on the case before saving (in the organ, then on background, each
  request carrying every click so far, as Slicer sends them), while its partner stays without clicks (a
  consortium half-way through turning them on);
- rounds: the new labels queue them (``finetune.min_new_labels``), the scheduler gossips every
  ``interval_s``, the scoring watcher scores; from a shell, ``gcml status`` every minute and ``gcml sync``
  every few minutes (the real CLI, as cron would run it);
- the partner is stopped and started again half-way;
- every 5 s: RSS and open file descriptors of the server and of its warm trainer, and the state folder's
  size on disk.

At the end (after the last round ends): every label a client saved is in the datastore with the voxels it
uploaded, the datastore JSON is valid, every round is in the history as done, refused or failed with a
reason, and the served model's bytes match its manifest. Latency is reported per call (p50, p95), with
``gcml_seg``'s p95 against its idle p95, measured first on the quiet site as one radiologist meets it: a
pause between calls, the images in turn (calls back to back on one image, which keep the CPU's threads
and caches warm, are reported beside it); with ``interactive``, a click's p95 likewise, against one click a
second over the images after their ``gcml_seg`` on the quiet site; memory as the server's RSS growth over the
last half of the run. Figures are ratios and growths within one run: these machines are noisy.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import SimpleITK as sitk
import yaml
from monailabel.client.client import MONAILabelClientException

from gcml_app.config import load_config
from gcml_app.sim.phantoms import write_studies
from gcml_app.sim.sample import site_yamls
from gcml_app.site.client import ParamsClient, SiteClient
from gcml_app.site.launch import SiteServer, free_port, start_together
from gcml_app.store import ModelStore

__all__ = ["soak_bench"]

TARGETS = {"seg_p95_ratio": 2.0, "edit_p95_ratio": 2.0, "rss_growth_last_half": 0.05, "labels_lost": 0,
           "corrupt_files": 0}
# Seconds a client spends on a case (uniform): a radiologist correcting an auto-segmentation takes minutes;
# the soak compresses that about tenfold (--quick: a stress far beyond a real day, for the test).
THINK_S = (4.0, 12.0)
THINK_QUICK_S = (0.5, 2.0)
SAMPLE_S = 5.0
IDLE_PAUSE_S = 1.0  # between idle calls: long enough for the server's threads to go idle, as after a think


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _summary(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "p50_s": round(_pct(xs, 0.5), 4), "p95_s": round(_pct(xs, 0.95), 4)}


class _Log:
    """Every call's ``(t, kind, seconds, error kind or None)``, from all threads."""

    def __init__(self, t0: float):
        self.t0, self.calls, self.lock = t0, [], threading.Lock()

    def timed(self, kind: str, fn, *args):
        t = time.monotonic()
        err = None
        try:
            return fn(*args)
        except MONAILabelClientException as e:
            err = f"http {e.status_code}" if e.status_code else type(e).__name__
        except Exception as e:  # a client's fault is counted, never ends the soak
            err = type(e).__name__
        finally:
            with self.lock:
                self.calls.append((round(t - self.t0, 3), kind, round(time.monotonic() - t, 4), err))
        return None


def _clicks(label: Path, rng: random.Random, n: int) -> list[dict[str, list[list[int]]]]:
    """``n`` requests of a click session on ``label``'s case, as Slicer sends them (every click so far, IJK of
    the image): an organ click first, then background and organ in turn, each at a random voxel of that class."""
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))  # (z, y, x)
    where = {"organ": np.argwhere(a == 1), "background": np.argwhere(a == 0)}
    so_far: dict[str, list[list[int]]] = {"organ": [], "background": []}
    out = []
    for k in range(n):
        name = "organ" if k % 2 == 0 else "background"
        z, y, x = (int(v) for v in where[name][rng.randrange(len(where[name]))])
        so_far[name] = [*so_far[name], [x, y, z]]
        out.append({**so_far, "label": "organ"})
    return out


def _client(url: str, ids: list[str], truth: dict[str, Path], saved: dict[str, int], lock: threading.Lock,
            log: _Log, stop: threading.Event, seed: int, think: tuple[float, float], interactive: bool) -> None:
    """One radiologist: info, next sample, auto-segmentation, (``interactive``: 1-3 clicks,) save its label;
    ``think`` seconds (uniform) correcting each case, a third of that between cases."""
    rng, client = random.Random(seed), ParamsClient(url)
    while not stop.is_set():
        log.timed("info", client.info)
        sample = log.timed("next_sample", client.next_sample, "random", {})
        image = sample.get("id") if isinstance(sample, dict) else None
        if image not in truth:  # every image labelled: correct one already saved
            with lock:
                image = rng.choice(sorted(saved)) if saved else rng.choice(ids)
        log.timed("gcml_seg", client.infer, "gcml_seg", image, {})
        if interactive:
            for params in _clicks(truth[image], rng, rng.randint(1, 3)):
                stop.wait(rng.uniform(*think) / 4)  # looking where to click
                log.timed("gcml_edit", client.infer, "gcml_edit", image, params)
        stop.wait(rng.uniform(*think))  # looking at it, correcting it
        if log.timed("save_label", client.save_label, image, str(truth[image]), "final", {}) is not None:
            with lock:
                saved[image] = saved.get(image, 0) + 1
        stop.wait(rng.uniform(*think) / 3)


def _shell(config: Path, log: _Log, stop: threading.Event, status_s: float, sync_s: float) -> None:
    """Site IT from a shell: ``gcml status`` every ``status_s``, ``gcml sync`` every ``sync_s`` (the real CLI)."""
    gcml = [sys.executable, "-m", "gcml_app.cli"]
    next_sync = time.monotonic() + sync_s / 2
    while not stop.wait(status_s):
        log.timed("gcml status", _cli, [*gcml, "status", "--config", str(config)], (0,))
        if time.monotonic() >= next_sync:
            next_sync += sync_s
            # 0: the round ran; 1 with "refused": a round was already running (MONAI Label's queue, the round lock)
            log.timed("gcml sync", _cli, [*gcml, "sync", "--config", str(config), "--timeout", "900"], (0, 1))


def _cli(cmd: list[str], ok: tuple[int, ...]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if p.returncode not in ok or (p.returncode == 1 and "refused" not in p.stdout):
        raise RuntimeError(f"{' '.join(cmd[3:5])} exited {p.returncode}: {p.stdout[-300:]} {p.stderr[-300:]}")
    return p.stdout


def _sampler(server: SiteServer, site: SiteClient, state: Path, stop: threading.Event, t0: float,
             out: list[dict[str, Any]]) -> None:
    """Every :data:`SAMPLE_S`: the server's and the warm trainer's RSS (MB) and open descriptors; state on disk."""
    while not stop.wait(SAMPLE_S):
        row: dict[str, Any] = {"t": round(time.monotonic() - t0, 1)}
        try:
            p = psutil.Process(server.proc.pid)
            row.update(server_rss_mb=round(p.memory_info().rss / 2**20, 1), server_fds=p.num_fds())
            warm = site.status()["training"].get("warm_trainer") or {}
            if warm.get("pid"):
                w = psutil.Process(warm["pid"])
                row.update(warm_rss_mb=round(w.memory_info().rss / 2**20, 1), warm_fds=w.num_fds())
        except Exception as e:  # a sample lost (the server busy answering) is a gap in a line, not a failure
            row["error"] = type(e).__name__
        row["state_mb"] = round(sum(f.stat().st_size for f in state.rglob("*") if f.is_file()) / 2**20, 2)
        out.append(row)


def _setup(work: Path, pool: int, quick: bool, interactive: bool = False
           ) -> tuple[dict[str, Path], dict[str, int], Path, dict[str, Path]]:
    """Both sites' studies and YAMLs; site-a: 8 labelled cases and ``pool`` unlabelled, whose true labels
    the clients upload; with ``interactive``, site-a's clicks on."""
    ports = {s: free_port() for s in ("site-a", "site-b", "site-c")}
    for s in ("site-a", "site-b"):
        shutil.rmtree(work / s, ignore_errors=True)
    configs = site_yamls(work, ports, warmup_epochs=2 if quick else 10, gossip_epochs=1 if quick else 2)
    raw = yaml.safe_load(configs["site-a"].read_text())
    raw["gossip"]["interval_s"] = 60 if quick else 180  # the scheduler gossips during the soak
    raw["finetune"] = {**raw.get("finetune", {}), "min_new_labels": 4, "epochs": 1 if quick else 2}
    if interactive:
        raw["interactive"] = {**raw.get("interactive", {}), "enabled": True}
    configs["site-a"].write_text(yaml.safe_dump(raw, sort_keys=False))
    full = write_studies(work / "full-a", "a", cases=8 + pool, seed=0)
    studies = work / "site-a" / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    truth = {}
    for i, img in enumerate(sorted(full.glob("case_*.nii.gz"))):
        shutil.copy(img, studies / img.name)
        label = full / "labels" / "final" / img.name
        if i < 8:
            shutil.copy(label, studies / "labels" / "final" / img.name)
        else:
            truth[img.name.split(".")[0]] = label
    write_studies(work / "site-b" / "studies", "b", cases=10, labelled=8, seed=1)
    return configs, ports, studies, truth


def soak_bench(out: str | Path, minutes: float = 20.0, clients: int = 4, seed: int = 0,
               quick: bool = False, interactive: bool = False) -> dict[str, Any]:
    """Run the soak for ``minutes`` with ``clients`` clients (``interactive``: clicking too); write
    ``out/soak.json`` and ``soak.png``."""
    out = Path(out).resolve()
    work = out / "work"
    pool = 12 if quick else 60
    configs, ports, studies, truth = _setup(work, pool, quick, interactive)
    servers = {s: SiteServer(configs[s], studies if s == "site-a" else work / s / "studies", port=ports[s],
                             log=work / s / "server.log", elsewhere=s == "site-b") for s in ("site-a", "site-b")}
    result: dict[str, Any] = {"minutes": minutes, "clients": clients, "seed": seed, "quick": quick,
                              "interactive": interactive,
                              "think_s": THINK_QUICK_S if quick else THINK_S, "targets": TARGETS}
    stop, lock = threading.Event(), threading.Lock()
    saved: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    try:
        start_together(servers.values())
        a, b = SiteClient(servers["site-a"].url), SiteClient(servers["site-b"].url)
        a.round()  # each site serves a model before the day starts
        b.round()
        _wait_quiet(servers.values())
        idle, idle_warm = _idle(servers["site-a"].url, sorted(truth), 10 if quick else 30)
        idle_edit = _idle_clicks(servers["site-a"].url, truth, 10 if quick else 30, seed) if interactive else []

        t0 = time.monotonic()
        log = _Log(t0)
        threads = [threading.Thread(target=_client, daemon=True, args=(
            servers["site-a"].url, sorted(truth), truth, saved, lock, log, stop, seed * 1000 + k,
            THINK_QUICK_S if quick else THINK_S, interactive))
            for k in range(clients)]
        threads.append(threading.Thread(target=_shell, daemon=True, args=(
            configs["site-a"], log, stop, 20.0 if quick else 60.0, 60.0 if quick else 300.0)))
        threads.append(threading.Thread(target=_sampler, daemon=True, args=(
            servers["site-a"], a, load_config(configs["site-a"]).state_dir, stop, t0, samples)))
        for t in threads:
            t.start()
        stop.wait(minutes * 30)  # half-way: the partner restarts (an update, a reboot)
        servers["site-b"].stop()
        restart = {"t": round(time.monotonic() - t0, 1)}
        servers["site-b"].spawn().wait_ready()
        restart["down_s"] = round(time.monotonic() - t0 - restart["t"], 1)
        result["partner_restart"] = restart
        stop.wait(max(0.0, minutes * 60 - (time.monotonic() - t0)))
        stop.set()
        for t in threads:
            t.join(timeout=1200)
        result["load_s"] = round(time.monotonic() - t0, 1)
        _wait_idle(a)
        result["checks"] = _checks(configs["site-a"], studies, truth, saved)
    finally:
        stop.set()
        for srv in servers.values():
            srv.stop()
    result.update(_figures(log.calls, idle, samples, idle_edit))
    result["idle_seg_back_to_back"] = _summary(idle_warm)
    result["calls_raw"] = len(log.calls)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({**result, "samples": samples}, indent=1))
    (out / "soak_calls.csv").write_text("t,kind,seconds,error\n" + "".join(
        f"{t},{k},{s},{e or ''}\n" for t, k, s, e in log.calls))
    plot(result, log.calls, samples, out / "soak.png")
    return result


def _idle(url: str, images: list[str], n: int) -> tuple[list[float], list[float]]:
    """``gcml_seg`` seconds on the quiet site: ``n`` calls over ``images`` in turn with a pause between
    them (the baseline), then ``n`` back to back on one image."""
    client = ParamsClient(url)
    client.infer("gcml_seg", images[0], {})
    paced, warm = [], []
    for k in range(n):
        time.sleep(IDLE_PAUSE_S)
        t = time.perf_counter()
        client.infer("gcml_seg", images[k % len(images)], {})
        paced.append(time.perf_counter() - t)
    for _ in range(n):
        t = time.perf_counter()
        client.infer("gcml_seg", images[0], {})
        warm.append(time.perf_counter() - t)
    return paced, warm


def _idle_clicks(url: str, truth: dict[str, Path], n: int, seed: int) -> list[float]:
    """A click's seconds on the quiet site: ``gcml_seg`` on each image in turn (not timed), then one click on
    it after a pause, ``n`` times."""
    client, rng, images = ParamsClient(url), random.Random(seed), sorted(truth)
    out = []
    for k in range(n):
        image = images[k % len(images)]
        client.infer("gcml_seg", image, {})
        time.sleep(IDLE_PAUSE_S)
        t = time.perf_counter()
        client.infer("gcml_edit", image, _clicks(truth[image], rng, 1)[0])
        out.append(time.perf_counter() - t)
    return out


def _wait_quiet(servers, timeout: float = 300.0) -> None:
    """Until no server runs a MONAI Label task subprocess (a round's relay, a scoring run) for 3 s in a
    row: the idle baseline is measured on a quiet machine."""
    deadline, quiet_since = time.monotonic() + timeout, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 3.0:
        busy = False
        for srv in servers:
            for child in psutil.Process(srv.proc.pid).children(recursive=True):
                try:
                    busy |= "monailabel.interfaces.utils.app" in " ".join(child.cmdline())
                except psutil.Error:
                    pass
        if busy:
            quiet_since = time.monotonic()
        time.sleep(0.5)


def _wait_idle(site: SiteClient, timeout: float = 1200.0) -> None:
    """Until no round runs or waits (the last one the load queued ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and site.status()["training"]["running"]:
        time.sleep(2)


def _checks(config: Path, studies: Path, truth: dict[str, Path], saved: dict[str, int]) -> dict[str, Any]:
    """Nothing lost: every saved label stored with its voxels, the JSON valid, every round on record, the
    served model's bytes as its manifest says."""
    cfg = load_config(config)
    objects = json.loads((studies / "datastore_v2.json").read_text())["objects"]  # raises if torn
    lost = [i for i in saved if "final" not in objects.get(i, {}).get("labels", {})]
    corrupt = []
    for i in saved:
        path = studies / "labels" / "final" / f"{i}.nii.gz"
        try:
            same = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(truth[i]))))
        except RuntimeError:
            same = False
        if not same:
            corrupt.append(i)
    store = ModelStore(cfg.state_dir / "models")
    served = store.served()
    store.read_bytes(served.version)  # StoreError if the bytes differ from the manifest
    history = store.history()
    rounds = [r for r in history if r.get("event") not in ("rollback",)]
    outcome = Counter(r.get("outcome") or r.get("event") for r in rounds)
    unexplained = [r for r in rounds if r.get("outcome") in ("failed", "refused") and not r.get("reason")]
    return {"labels_saved": len(saved), "label_saves": sum(saved.values()), "labels_lost": len(lost),
            "lost": lost, "corrupt_files": len(corrupt), "corrupt": corrupt, "datastore_json_valid": True,
            "rounds": len(rounds), "rounds_by_outcome": dict(outcome), "rounds_without_reason": len(unexplained),
            "served_version": served.version, "served_verifies": True}


def _figures(calls: list[tuple], idle: list[float], samples: list[dict[str, Any]],
             idle_edit: list[float] = ()) -> dict[str, Any]:
    by = defaultdict(list)
    errors: Counter = Counter()
    for _, kind, s, err in calls:
        if err is None:
            by[kind].append(s)
        else:
            errors[f"{kind}: {err}"] += 1
    latency = {k: _summary(v) for k, v in sorted(by.items())}
    idle95 = _pct(idle, 0.95)
    fig = {"latency": latency, "errors": dict(errors),
           "idle_seg": _summary(idle),
           "seg_p95_ratio": round(_pct(by["gcml_seg"], 0.95) / idle95, 3) if by["gcml_seg"] else None}
    if idle_edit:
        fig["idle_edit"] = _summary(list(idle_edit))
        fig["edit_p95_ratio"] = (round(_pct(by["gcml_edit"], 0.95) / _pct(list(idle_edit), 0.95), 3)
                                 if by["gcml_edit"] else None)
    rss = [(r["t"], r["server_rss_mb"]) for r in samples if "server_rss_mb" in r]
    if len(rss) >= 4:
        half = rss[len(rss) // 2:]
        fig["server_rss_mb"] = {"start": rss[0][1], "half": half[0][1], "end": rss[-1][1], "max": max(m for _, m in rss)}
        fig["rss_growth_last_half"] = round(half[-1][1] / half[0][1] - 1, 4)
    fds = [r["server_fds"] for r in samples if "server_fds" in r]
    if len(fds) >= 4:
        half = fds[len(fds) // 2:]
        fig["server_fds"] = {"start": fds[0], "half": half[0], "end": fds[-1], "max": max(fds),
                             "median_first_half": statistics.median(fds[:len(fds) // 2]),
                             "median_last_half": statistics.median(half)}
    warm = [r["warm_rss_mb"] for r in samples if "warm_rss_mb" in r]
    if warm:
        fig["warm_rss_mb"] = {"start": warm[0], "end": warm[-1], "max": max(warm)}
    return fig


def plot(result: dict[str, Any], calls: list[tuple], samples: list[dict[str, Any]], path: Path) -> None:
    """Latency of each call over time, and the server's and warm trainer's memory and descriptors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for kind in sorted({k for _, k, _, _ in calls}):
        pts = [(t / 60, s) for t, k, s, e in calls if k == kind and e is None]
        if pts:
            ax1.scatter(*zip(*pts), s=4, label=kind)
    errs = [(t / 60, s) for t, _, s, e in calls if e is not None]
    if errs:
        ax1.scatter(*zip(*errs), s=14, marker="x", color="red", label="error")
    ax1.set_yscale("log")
    ax1.set_ylabel("call seconds")
    ax1.legend(fontsize=7, ncol=4)
    ax1.set_title(f"soak: {result['clients']} clients, {result['minutes']:g} min; gcml_seg p95 "
                  f"{result.get('seg_p95_ratio')}x idle")
    for key, label in (("server_rss_mb", "server RSS"), ("warm_rss_mb", "warm trainer RSS")):
        pts = [(r["t"] / 60, r[key]) for r in samples if key in r]
        if pts:
            ax2.plot(*zip(*pts), label=label)
    ax2.set_ylabel("MB")
    ax2.legend(fontsize=8)
    for key, label in (("server_fds", "server fds"), ("warm_fds", "warm trainer fds")):
        pts = [(r["t"] / 60, r[key]) for r in samples if key in r]
        if pts:
            ax3.plot(*zip(*pts), label=label)
    ax3.set_ylabel("open descriptors")
    ax3.set_xlabel("minutes")
    ax3.legend(fontsize=8)
    if "partner_restart" in result:
        for ax in (ax1, ax2, ax3):
            ax.axvline(result["partner_restart"]["t"] / 60, color="grey", ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
