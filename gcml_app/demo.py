"""``gcml demo``: a three-site federation on loopback, from sample data to gossip rounds to Slicer.

1. sample data: styles a, b and c (different scanners) for sites A, B and C;
2. site YAMLs from ``sample_configs/site_{a,b,c}.yaml`` (tokens for each other), with this run's
   state folders, ports and epochs;
3. three MONAI Label servers on 127.0.0.1;
4. warm-up: each site trains its first model alone (a sync with no model served runs the warm-up);
5. gossip: ``--rounds`` rounds in which every site pulls a partner's model and runs DCML + the gate;
6. a per-site table (val Dice after warm-up vs after gossip, versions, bytes pulled), ``demo.json``
   and ``demo.png`` in the output folder; the servers keep serving for Slicer until Ctrl-C.

With ``--pacs``, site A's images and labels live in a private Orthanc instead of a folder: its sample
data is written as DICOM series and DICOM SEG, stored in Orthanc over STOW, and site A's server reads
them through DICOMweb (:mod:`gcml_app.site.pacs`).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gcml_app.rounds import summarize
from gcml_app.rounds.record import pulled_bytes
from gcml_app.sim.sample import STYLES, site_yamls
from gcml_app.site.client import ParamsClient, SiteClient
from gcml_app.site.launch import SiteServer, free_port, start_together

__all__ = ["run_demo"]

def _progress_bar(desc: str):
    bar = tqdm(total=None, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)

    def update(stats: dict[str, Any]) -> None:
        if stats.get("total_epochs"):
            bar.total = stats["total_epochs"]
        if stats.get("epoch") is not None and stats["epoch"] > bar.n:
            bar.update(stats["epoch"] - bar.n)
        if stats.get("loss") is not None:
            bar.set_postfix(loss=f"{stats['loss']:.3f}")

    return bar, update


def _served_mean(site: SiteClient) -> tuple[int | None, float | None]:
    served = site.status()["served"]
    return (served["version"], served["mean_dice"]) if served else (None, None)


def _plot(path: Path, curves: dict[str, list[float]], rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for site, ys in curves.items():
        ax.plot(range(len(ys)), ys, marker="o", label=site)
    ax.set_xticks(range(rounds + 1), ["warm-up"] + [f"round {r}" for r in range(1, rounds + 1)])
    ax.set_ylabel("served model: mean validation Dice")
    ax.set_title("GCML demo: each site's own held-out labels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out: str | Path, port: int = 8001, cases: int = 12, labelled: int = 8, warmup_epochs: int = 30,
             gossip_epochs: int = 5, rounds: int = 3, wait: bool = True, pacs: bool = False) -> int:
    """Run the demo; see the module docstring. ``port`` is site A's (B and C take the next two); 0 = free ports."""
    from gcml_app.sim.phantoms import write_dicom_studies, write_studies
    from gcml_app.site.orthanc import INSTALL_HINT, Orthanc, find_orthanc
    from gcml_app.site.dicomweb import pacs_client, stow_folder

    if pacs and find_orthanc() is None:
        print(f"gcml demo --pacs needs Orthanc and its DICOMweb plugin; install them with:\n  {INSTALL_HINT}")
        return 2

    out = Path(out).resolve()
    sites = [f"site-{s}" for s in STYLES]
    ports = {s: (port + i if port else free_port()) for i, s in enumerate(sites)}
    configs = site_yamls(out, ports, warmup_epochs, gossip_epochs)
    for site in sites:  # every run starts from untrained sites (the sample data is kept)
        shutil.rmtree(out / site / "state", ignore_errors=True)
    print(f"[1/5] sample data and site configs in {out} (fresh model state)")
    orthanc = None
    studies = {s: out / s / "studies" for s in sites}
    for i, (style, site) in enumerate(zip(STYLES, sites)):
        if pacs and site == "site-a":
            dicom = out / site / "dicom"
            if not dicom.exists():
                write_dicom_studies(dicom, style, cases=cases, labelled=labelled, seed=i)
            shutil.rmtree(out / site / "pacs", ignore_errors=True)  # a fresh PACS each run
            orthanc = Orthanc(out / site / "pacs").start()
            t0 = time.perf_counter()
            n = stow_folder(dicom, pacs_client(orthanc.url, auth=orthanc.auth))
            studies[site] = orthanc.url
            print(f"      {site}: {cases} style-{style} phantoms as DICOM ({labelled} with DICOM SEG), {n} instances "
                  f"stored in Orthanc {orthanc.url} in {time.perf_counter() - t0:.1f} s, config {configs[site]}")
            continue
        if not studies[site].exists():
            write_studies(studies[site], style, cases=cases, labelled=labelled, seed=i)
        print(f"      {site}: {cases} style-{style} phantoms ({labelled} labelled), config {configs[site]}")

    servers = {s: SiteServer(configs[s], studies[s], port=ports[s], log=out / s / "server.log",
                             env=orthanc.env if orthanc and s == "site-a" else None) for s in sites}
    print("[2/5] starting three MONAI Label servers: " + ", ".join(f"{s} {v.url}" for s, v in servers.items()))
    try:
        start_together(servers.values())
        clients = {s: SiteClient(servers[s].url) for s in sites}
        report: dict[str, Any] = {"sites": {s: {"url": servers[s].url} for s in sites}, "rounds": []}
        curves: dict[str, list[float]] = {s: [] for s in sites}

        print(f"[3/5] warm-up: each site trains alone for {warmup_epochs} epochs on its own labels")
        for s in sites:
            bar, update = _progress_bar(f"      {s} warm-up")
            record = clients[s].round(progress=update)
            bar.close()
            version, mean = _served_mean(clients[s])
            curves[s].append(mean or 0.0)
            report["sites"][s].update(warmup_version=version, warmup_dice=mean)
            print(f"      {s}: {summarize(record)}")

        print(f"[4/5] gossip: {rounds} rounds; each site pulls a partner's model and, as it measures it on its "
              "own cases, learns mutually with it, distils from it or trains alone, at the compute of "
              f"{gossip_epochs} DCML epochs")
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            for s in sites:
                bar, update = _progress_bar(f"      round {r} {s}")
                record = clients[s].round(progress=update)
                bar.close()
                pulled = pulled_bytes(record)
                report["rounds"].append({"round": r, "site": s, "event": record.get("event"),
                                         "peer": (record.get("gossip") or {}).get("peer"),
                                         "winner": record.get("winner"), "mean": record.get("mean"),
                                         "version": record.get("version"), "bytes_pulled": pulled})
                print(f"      round {r} {s}: {summarize(record)}")
            for s in sites:
                curves[s].append(_served_mean(clients[s])[1] or 0.0)
        gossip_s = time.perf_counter() - t0

        print(f"[5/5] per-site results ({rounds} rounds in {gossip_s:.0f} s)")
        print(f"      {'site':<8} {'val Dice warm-up':>16} {'after gossip':>13} {'served':>7} {'published':>10} "
              f"{'kB pulled':>10}")
        for s in sites:
            version, mean = _served_mean(clients[s])
            mine = [x for x in report["rounds"] if x["site"] == s]
            published = sum(x["event"] == "publish" for x in mine)
            kb = sum(x["bytes_pulled"] for x in mine) / 1000
            report["sites"][s].update(final_version=version, final_dice=mean, published=published, kb_pulled=kb)
            print(f"      {s:<8} {report['sites'][s]['warmup_dice']:>16.3f} {mean:>13.3f} {'v' + str(version):>7} "
                  f"{published:>4} of {len(mine):<3} {kb:>10.1f}")
        report["gossip_seconds"] = round(gossip_s, 1)
        (out / "demo.json").write_text(json.dumps(report, indent=1))
        _plot(out / "demo.png", curves, rounds)
        print(f"      wrote {out / 'demo.json'} and {out / 'demo.png'}")

        a = servers["site-a"]
        client = ParamsClient(a.url)
        sample = client.next_sample("random", {})
        _, params = client.infer("gcml_seg", sample["id"], {})
        print(f"      site-a auto-segmented {sample['id']} with its version {params.get('gcml_model_version')}")
        print()
        print(f"  In 3D Slicer: MONAI Label module -> Server: {a.url}  (site A; B and C also keep serving)")
        print("  Next Sample -> Auto Segmentation (gcml_seg) -> correct -> Submit Label; "
              f"sync now: gcml sync --config {configs['site-a']}")
        if not wait:
            return 0
        print("  Serving until Ctrl-C ...")
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
        return 0
    finally:
        print("stopping servers")
        for srv in servers.values():
            srv.stop()
        if orthanc is not None:
            orthanc.stop()

