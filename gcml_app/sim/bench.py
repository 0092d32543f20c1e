"""``gcml bench``: the costs a consortium asks about, measured side by side in one run -> ``bench.json``.

- ``infer``: latency of ``gcml_seg`` vs a stock MONAI Label ``BasicInferTask`` with the same network,
  weights, transforms and volume, in one process, interleaved (target overhead <= 5%);
- ``dcml_step``: a DCML step vs a single-model supervised step on the same batch (target <= 2.1x), for
  three network sizes: the site's network, a UNet 16..64 on 48^3 crops and a UNet 16..128 on 64^3;
- ``gossip_round``: a real round between two servers on loopback, wall seconds split into fetch,
  verify, load, train, validate and publish, plus the peak memory (RSS) of the training process,
  also at the round's start and after each phase (``peak_rss_by_phase_mb``);
  ``overhead_s`` is what the round pays outside those phases and before its first step (subprocess
  start-up, imports, app rebuild, datastore scan, dataset caching; target <= 2 s);
- ``payload``: bytes of the served model as float32 and float16 transport;
- ``infer_under_training``: ``gcml_seg`` latency over HTTP, back to back for a whole training round
  (its process start-up included) vs idle (p50 and p95; target p95 ratio <= 1.5), also split into
  the round's start-up and its epochs;
- ``infer_under_scoring``: the same, while MONAI Label's scoring subprocess scores ``SCORED_POOL``
  unlabelled images by disagreement (with the cached partner model) and then by MC dropout
  (target p95 ratio <= 1.5);
- ``pacs``: a PACS site's cache on a private Orthanc (when installed): STOW of the sample data, the
  first fill (every labelled series and its DICOM SEG), one uncached series, a cached one, a re-sync.

Every figure that has a target sits beside it as ``target_<name>`` in the same object. Ratios are
measured in the same run on the same machine; absolute times vary with the machine. ``bench.png``
shows each measure against its target and the round's phases.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import requests
import torch
from monailabel.tasks.infer.basic_infer import BasicInferTask

from gcml_app.config import SiteConfig, load_config
from gcml_app.federation.payload import encode_weights
from gcml_app.ml.dcml import dcml_step
from gcml_app.ml.network import build_network
from gcml_app.ml.supervised import supervised_step
from gcml_app.sim.phantoms import write_studies
from gcml_app.sim.sample import site_yamls
from gcml_app.site.client import ParamsClient, SiteClient
from gcml_app.site.infer import GCMLSegInfer
from gcml_app.site.launch import SiteServer, free_port, start_together
from gcml_app.store import ModelStore

__all__ = ["TARGET_OVERHEAD_S", "StockSegInfer", "bench", "plot"]

TARGET_OVERHEAD_S = 2.0  # seconds a round may pay before its first step
SCORED_POOL = 20  # unlabelled images at site-a that infer_under_scoring scores


class StockSegInfer(GCMLSegInfer):
    """The baseline: MONAI Label's own model loading (``BasicInferTask._get_network``: a ``.pt`` file,
    reloaded when its mtime changes) with everything else as in ``gcml_seg``."""

    def __init__(self, cfg, store, path: str):
        super().__init__(cfg, store)
        self.path = [path]

    def _get_network(self, device, data):
        return BasicInferTask._get_network(self, device, data)

    def writer(self, data, extension=None, dtype=None):
        return BasicInferTask.writer(self, data, extension=extension, dtype=dtype)



def step_cost(cfg: SiteConfig, repeats: int = 10) -> dict[str, float]:
    """Seconds per DCML step and per single-model supervised step on the same batch, and their ratio."""
    torch.manual_seed(0)
    x = torch.randn(cfg.train.batch_size, cfg.input_channels, *cfg.roi_size)
    y = torch.randint(0, cfg.out_channels, (cfg.train.batch_size, 1, *cfg.roi_size))
    a, b = build_network(cfg), build_network(cfg)
    oa, ob = torch.optim.AdamW(a.parameters()), torch.optim.AdamW(b.parameters())
    s = copy.deepcopy(a)
    os_ = torch.optim.AdamW(s.parameters())
    for _ in range(2):  # warm-up
        dcml_step(a, b, oa, ob, x, y, cfg.dcml)
        supervised_step(s, os_, x, y)
    t = {"dcml": 0.0, "supervised": 0.0}
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        dcml_step(a, b, oa, ob, x, y, cfg.dcml)
        t["dcml"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        supervised_step(s, os_, x, y)
        t["supervised"] += time.perf_counter() - t0
    return {"dcml_s": t["dcml"] / repeats, "supervised_s": t["supervised"] / repeats,
            "ratio": t["dcml"] / t["supervised"]}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _lat(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50_s": round(_pct(xs, 0.5), 4), "p95_s": round(_pct(xs, 0.95), 4),
            "mean_s": round(statistics.fmean(xs), 4)}


def _infer_overhead(cfg, store: ModelStore, image: str, work: Path, repeats: int) -> dict[str, Any]:
    pt = work / "stock_model.pt"
    torch.save(store.load(store.served_version()), pt)
    ours, stock = GCMLSegInfer(cfg, store), StockSegInfer(cfg, store, str(pt))
    t = {"gcml_seg": [], "stock": []}
    for i in range(repeats + 1):  # the first call of each loads the model: not counted
        for name, task in (("gcml_seg", ours), ("stock", stock)):
            t0 = time.perf_counter()
            task({"image": image, "device": "cpu"})
            if i:
                t[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"gcml_seg": _lat(t["gcml_seg"]), "stock": _lat(t["stock"]),
            "ratio_median": round(med["gcml_seg"] / med["stock"], 4), "target_ratio": 1.05}


class _PeakRSS(threading.Thread):
    """Samples the RSS of a server's child processes (the round's processes) every 50 ms, all but ``skip``
    (the idle warm trainer, reported apart)."""

    def __init__(self, pid: int, skip: int | None = None):
        super().__init__(daemon=True)
        self.proc, self.skip, self.peak, self.done = psutil.Process(pid), skip, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for child in self.proc.children(recursive=True):
                if child.pid == self.skip:
                    continue
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)


def _warm_trainer_memory(site: SiteClient) -> dict[str, float] | None:
    """The idle warm trainer's ``pid`` and memory (MB): ``rss``, and ``uss`` (what only it holds), once it is ready."""
    deadline = time.monotonic() + 120
    while not (w := site.status()["training"]["warm_trainer"])["ready"]:
        if w["pid"] is None or time.monotonic() > deadline:
            return None
        time.sleep(0.5)
    mem = psutil.Process(w["pid"]).memory_full_info()
    return {"pid": w["pid"], "rss": round(mem.rss / 2**20, 1), "uss": round(mem.uss / 2**20, 1)}


def _latency_under_training(url: str, case: str, n: int, epochs: int) -> dict[str, Any]:
    """``gcml_seg`` latency over HTTP: ``5 n`` requests idle, then back to back for a whole training round
    (from ``/train`` to its end, the round's process start-up included), split at the round's first epoch."""
    client = ParamsClient(url)
    client.infer("gcml_seg", case, {})
    idle = []
    for _ in range(5 * n):  # the baseline's own p95 needs more than a handful of requests
        t0 = time.perf_counter()
        client.infer("gcml_seg", case, {})
        idle.append(time.perf_counter() - t0)
    site = SiteClient(url)
    asked, t_asked = int(time.time()) - 1, time.monotonic()
    client.train_start("gcml", {"epochs": epochs})
    startup, steps = [], []
    while time.monotonic() - t_asked < 900:
        t = site.status()["training"]
        mine = (t.get("start_ts") or 0) >= asked  # this round's stats, not the last round's
        if not t["running"] and (mine or time.monotonic() - t_asked > 60):  # over (or never started)
            break
        t0 = time.perf_counter()
        client.infer("gcml_seg", case, {})
        (steps if mine and (t.get("epoch") or 0) >= 1 else startup).append(time.perf_counter() - t0)
    busy = startup + steps
    if len(steps) < 3:
        raise RuntimeError(f"only {len(steps)} requests overlapped the round's epochs; raise its epochs")
    p95 = _pct(idle, 0.95)
    return {"idle": _lat(idle), "training": _lat(busy), "startup": _lat(startup), "epochs": _lat(steps),
            "background_epochs": epochs, "p95_ratio": round(_pct(busy, 0.95) / p95, 3),
            "p95_ratio_startup": round(_pct(startup, 0.95) / p95, 3) if startup else None,
            "p95_ratio_epochs": round(_pct(steps, 0.95) / p95, 3),
            "p50_ratio": round(_pct(busy, 0.5) / _pct(idle, 0.5), 3), "target_p95_ratio": 1.5}


def _latency_under_scoring(url: str, case: str, n: int, methods: tuple[str, ...] = ("disagreement", "epistemic"),
                           ) -> dict[str, Any]:
    """``gcml_seg`` latency over HTTP: ``5 n`` requests idle, then back to back while MONAI Label's scoring
    subprocess scores every unlabelled image with each of ``methods`` in turn (``POST /scoring/<method>``)."""
    client = ParamsClient(url)
    site = SiteClient(url)
    client.infer("gcml_seg", case, {})
    idle = []
    for _ in range(5 * n):
        t0 = time.perf_counter()
        client.infer("gcml_seg", case, {})
        idle.append(time.perf_counter() - t0)
    busy, runs = [], {}
    for method in methods:
        started = requests.post(f"{url}/scoring/{method}", json={"max_images": 1000}, timeout=30)
        started.raise_for_status()
        task = started.json()["id"]
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:  # until MONAI Label's scoring task (its process) has ended
            last = requests.get(f"{url}/scoring/", timeout=30).json()
            if last.get("id") == task and last.get("status") in ("DONE", "ERROR"):
                break
            t0 = time.perf_counter()
            client.infer("gcml_seg", case, {})
            busy.append(time.perf_counter() - t0)
        else:
            raise RuntimeError(f"scoring {method} did not finish in 30 min")
        if last["status"] != "DONE":
            raise RuntimeError(f"scoring {method} failed: {last.get('details', [])[-5:]}")
        run = (site.status()["active"].get(method) or {}).get("last_run") or {}
        runs[method] = {k: run.get(k) for k in ("unlabelled", "scored", "failed", "seconds", "partners")}
    if len(busy) < 3:
        raise RuntimeError(f"only {len(busy)} requests overlapped the scoring runs; score more images")
    p95 = _pct(idle, 0.95)
    return {"idle": _lat(idle), "scoring": _lat(busy), "runs": runs,
            "p95_ratio": round(_pct(busy, 0.95) / p95, 3), "p50_ratio": round(_pct(busy, 0.5) / _pct(idle, 0.5), 3),
            "target_p95_ratio": 1.5}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(unreadable: {e})"


def _step(cfg, repeats: int) -> dict[str, Any]:
    cost = step_cost(cfg, repeats=repeats)
    return {"dcml_s": round(cost["dcml_s"], 4), "supervised_s": round(cost["supervised_s"], 4),
            "ratio": round(cost["ratio"], 3), "target_ratio": 2.1, "network": cfg.network.model_dump(mode="json"),
            "roi_size": list(cfg.roi_size), "params": sum(p.numel() for p in build_network(cfg).parameters())}


def _pacs(work: Path, cases: int, labelled: int) -> dict[str, Any]:
    """The PACS cache on a private Orthanc: seconds for STOW, the first fill and single series."""
    from gcml_app.sim.phantoms import LABELS, write_dicom_studies
    from gcml_app.site.orthanc import INSTALL_HINT, Orthanc, find_orthanc
    from gcml_app.site.dicomweb import pacs_client, stow_folder
    from gcml_app.site.pacs import PacsDatastore

    if find_orthanc() is None:
        return {"skipped": f"Orthanc is not installed ({INSTALL_HINT})"}
    shutil.rmtree(work / "pacs", ignore_errors=True)
    dicom = write_dicom_studies(work / "pacs" / "dicom", "a", cases=cases, labelled=labelled)
    with Orthanc(work / "pacs" / "orthanc") as orthanc:
        client = pacs_client(orthanc.url, auth=orthanc.auth)
        t0 = time.perf_counter()
        instances = stow_folder(dicom, client)
        stow = time.perf_counter() - t0
        ds = PacsDatastore(client, LABELS, work / "pacs" / "cache")
        t0 = time.perf_counter()
        filled = len(ds.get_labeled_images("final"))
        fill = time.perf_counter() - t0
        uncached = sorted(ds.get_unlabeled_images())[0]
        t0 = time.perf_counter()
        ds.get_image_uri(uncached)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds.get_image_uri(uncached)
        cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds.sync_labels(force=True)
        resync = time.perf_counter() - t0
    return {"cases": cases, "instances": instances, "stow_s": round(stow, 3), "first_fill_cases": filled,
            "first_fill_s": round(fill, 3), "first_fill_s_per_case": round(fill / max(filled, 1), 3),
            "uncached_series_s": round(one, 3), "cached_series_ms": round(cached * 1000, 2),
            "resync_nothing_new_s": round(resync, 3)}


def bench(out: str | Path, quick: bool = False) -> dict[str, Any]:
    """Run every measurement (``quick``: tiny budgets, for tests) and write ``out/bench.json``."""
    out = Path(out).resolve()
    work = out / "work"
    warmup, gossip_epochs, n, bg_epochs, repeats = (2, 1, 6, 4, 3) if quick else (20, 5, 40, 40, 10)
    ports = {s: free_port() for s in ("site-a", "site-b", "site-c")}
    configs = site_yamls(work, ports, warmup, gossip_epochs, active={"poll_s": 0})  # scored when measured
    servers = {}
    for i, s in enumerate(("site-a", "site-b")):
        shutil.rmtree(work / s / "state", ignore_errors=True)  # every run measures from untrained sites
        studies = work / s / "studies"
        if not studies.exists():
            write_studies(studies, s[-1], cases=10, labelled=8, seed=i)
        if s == "site-a" and len(list(studies.glob("pool_*.nii.gz"))) != SCORED_POOL - 2:
            # unlabelled images to score: with case_008 and case_009, SCORED_POOL of them
            pool = write_studies(work / "pool", "a", cases=SCORED_POOL - 2, labelled=0, seed=7)
            for k, img in enumerate(sorted(pool.glob("case_*.nii.gz"))):
                shutil.move(str(img), studies / f"pool_{k:03d}.nii.gz")
            shutil.rmtree(pool)
        servers[s] = SiteServer(configs[s], studies, port=ports[s], log=work / s / "server.log")
    result: dict[str, Any] = {"quick": quick, "torch_threads": torch.get_num_threads()}
    try:
        start_together(servers.values())
        a, b = SiteClient(servers["site-a"].url), SiteClient(servers["site-b"].url)
        a.round()
        b.round()

        warm = _warm_trainer_memory(a)
        sampler = _PeakRSS(servers["site-a"].proc.pid, skip=warm and warm["pid"])
        sampler.start()
        t0 = time.perf_counter()
        rec = a.round(peers=["site-b"])
        wall = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
        last = a.train_stats()["last_round"]
        timings = last["timings"]
        g = rec["gossip"]
        other = wall - g["fetch_s"] - g["verify_s"] - sum(timings.values())
        result["gossip_round"] = {
            "wall_s": round(wall, 3), "fetch_s": g["fetch_s"], "verify_s": g["verify_s"], **timings,
            "startup_s": last.get("startup_s"),  # MONAI Label's train subprocess started -> the round's code runs
            "subprocess_and_other_s": round(other, 3),
            "overhead_s": round(other + timings.get("load_s", 0.0), 3), "target_overhead_s": TARGET_OVERHEAD_S,
            "dcml_epochs": gossip_epochs, "outcome": rec["event"], "bytes_pulled": g["bytes_pulled"],
            "peak_rss_mb": round(sampler.peak / 2**20, 1),
            # the training process's own peak at the round's start (imports, app, datastore) and after each phase
            "peak_rss_by_phase_mb": last.get("peak_rss_mb", {}),
            "start": last.get("start"), "warm_trainer_mb": warm,
        }

        cfg = load_config(configs["site-a"])
        store = ModelStore(cfg.state_dir / "models")
        state = store.load(store.served_version())
        result["payload"] = {"float32": len(store.read_bytes(store.served_version())),  # what partners download
                             "float16": len(encode_weights(state, "float16", arch=store.served().arch))}
        result["payload"]["float16_ratio"] = round(result["payload"]["float16"] / result["payload"]["float32"], 4)
        result["infer_under_training"] = _latency_under_training(servers["site-a"].url, "case_009", n, bg_epochs)
        result["infer_under_scoring"] = _latency_under_scoring(servers["site-a"].url, "case_009", n)
    except requests.HTTPError as e:  # a server's own error: its log says why
        tails = "\n".join(f"--- {srv.log_path} (last lines) ---\n{_tail(srv.log_path)}" for srv in servers.values())
        raise RuntimeError(f"{e}\n{tails}") from e
    finally:
        for srv in servers.values():
            srv.stop()
    image = str(work / "site-a" / "studies" / "case_009.nii.gz")
    result["infer"] = _infer_overhead(cfg, store, image, work, repeats)
    sizes = {"site": cfg}
    for name, roi, channels in (("unet_16_64_roi_48", 48, (16, 32, 64)), ("unet_16_128_roi_64", 64, (16, 32, 64, 128))):
        sizes[name] = cfg.model_copy(update={"roi_size": (roi,) * 3, "network": cfg.network.model_copy(
            update={"channels": channels, "strides": (2,) * (len(channels) - 1)})})
    result["dcml_step"] = {name: _step(c, repeats if name == "site" else max(2, repeats // 3))
                           for name, c in sizes.items()}
    result["pacs"] = _pacs(work, *((4, 2) if quick else (12, 8)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "bench.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """``bench.png``: each measure as a fraction of its target (left), the round's phases (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = {"infer overhead": (result["infer"]["ratio_median"], result["infer"]["target_ratio"]),
                **{f"DCML step, {k}": (v["ratio"], v["target_ratio"]) for k, v in result["dcml_step"].items()},
                "infer p95 while training": (result["infer_under_training"]["p95_ratio"],
                                             result["infer_under_training"]["target_p95_ratio"]),
                "infer p95 while scoring": (result["infer_under_scoring"]["p95_ratio"],
                                            result["infer_under_scoring"]["target_p95_ratio"]),
                "round overhead (s)": (result["gossip_round"]["overhead_s"], result["gossip_round"]["target_overhead_s"])}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names = list(measures)
    frac = [value / target for value, target in measures.values()]
    left.barh(names, frac, color=["tab:green" if f <= 1 else "tab:red" for f in frac])
    left.axvline(1.0, color="k", linestyle="--", linewidth=1)
    for i, (value, target) in enumerate(measures.values()):
        left.text(frac[i], i, f" {value:.2f} (target {target:g})", va="center", fontsize=8)
    left.set_xlabel("measured / target (<= 1 meets it)")
    left.invert_yaxis()
    g = result["gossip_round"]
    phases = {"overhead": g["overhead_s"], "fetch+verify": g["fetch_s"] + g["verify_s"], "train": g.get("train_s", 0),
              "validate": g.get("validate_s", 0), "publish": g.get("publish_s", 0)}
    start = 0.0
    for name, secs in phases.items():
        right.barh(["round"], [secs], left=start, label=f"{name} {secs:.2f} s")
        start += secs
    right.set_xlabel("seconds")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    right.set_title(f"gossip round: {g['wall_s']:.1f} s wall")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
