"""``gcml``: sample data, serving a site, site status, and the demo.

    gcml sample-data --out DIR --site-style a --cases 12 --labelled 8 --seed 0
    gcml serve --config site.yaml --studies DIR [--host 127.0.0.1 --port 8000]
    gcml status --config site.yaml
    gcml demo [--out gcml-demo --port 8000 --epochs 30 --no-wait]
    gcml dcml-compare [--out dcml-compare --rounds 4 --epochs 5 --styles a,b]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from gcml_app.config import ConfigError, load_config

__all__ = ["main"]


def _sample_data(args: argparse.Namespace) -> int:
    from gcml_app.sim.phantoms import write_studies

    out = write_studies(args.out, args.site_style, args.cases, args.labelled, args.seed)
    n_lab = args.cases if args.labelled is None else args.labelled
    print(f"wrote {args.cases} style-{args.site_style} phantoms ({n_lab} with final labels) to {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gcml_app.launch import server_command

    load_config(args.config)  # fail here, with the key path, rather than inside the server
    cmd = server_command(args.config, args.studies, args.host, args.port)
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    os.execv(cmd[0], cmd)


def _status(args: argparse.Namespace) -> int:
    from gcml_app.store import ModelStore

    cfg = load_config(args.config)
    store = ModelStore(cfg.state_dir / "models")
    served = store.served()
    print(f"site {cfg.site}: state in {cfg.state_dir}")
    if served is None:
        print("  no published model yet")
    else:
        dice = ", ".join(f"{k} {v:.3f}" for k, v in served.val_dice.items())
        print(f"  serving v{served.version} ({served.produced_by}, {served.created}); val Dice {dice}; "
              f"n_train {served.n_train}, n_val {served.n_val}")
    for rec in store.history()[-args.last:]:
        print(f"  {rec['time']} {rec['event']:<8} v{rec.get('version')}  {rec.get('reason', '')}")
    return 0


def demo_config(site: str, state_dir: Path, epochs: int) -> dict:
    """The demo site's YAML (the values of ``sample_configs/site_a.yaml``)."""
    return {
        "site": site,
        "labels": {"organ": 1, "lesion": 2},
        "spacing": [1.0, 1.0, 1.0],
        "roi_size": [32, 32, 32],
        "network": {"name": "UNet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "train": {"epochs": epochs, "batch_size": 2, "samples_per_case": 2, "lr": 0.003, "seed": 0},
        "validation": {"fraction": 0.2, "min_cases": 1},
        "state_dir": str(state_dir),
    }


def _demo(args: argparse.Namespace) -> int:
    from monailabel.client import MONAILabelClient

    from gcml_app.launch import SiteServer
    from gcml_app.sim.phantoms import write_studies

    out = Path(args.out).resolve()
    studies = out / "site-a" / "studies"
    if not studies.exists():
        write_studies(studies, "a", cases=args.cases, labelled=args.labelled, seed=0)
        print(f"[1/4] sample data: {args.cases} phantoms, {args.labelled} labelled -> {studies}")
    else:
        print(f"[1/4] sample data: reusing {studies}")
    config = out / "site-a" / "site.yaml"
    config.write_text(yaml.safe_dump(demo_config("site-a", out / "site-a" / "state", args.epochs), sort_keys=False))

    server = SiteServer(config, studies, host="127.0.0.1", port=args.port, log=out / "site-a" / "server.log")
    print(f"[2/4] starting MONAI Label server for site-a on {server.url} (log: {server.log_path})")
    server.start()
    try:
        client = MONAILabelClient(server.url)
        info = client.info()
        print(f"      app: {info['name']}; models: {list(info['models'])}; trainers: {list(info['trainers'])}")

        print(f"[3/4] training the first model ({args.epochs} epochs, gated by validation Dice)")
        client.train_start("gcml", {"epochs": args.epochs})
        last = -1
        while True:
            status = client.train_status(check_if_running=False)
            stats = client.info()["train_stats"]["gcml"]
            if status.get("status") in ("DONE", "ERROR"):
                break
            if "loss" in stats and stats.get("epoch") != last:
                last = stats["epoch"]
                print(f"      epoch {last}/{stats['total_epochs']}  loss {stats['loss']:.4f}")
            time.sleep(1)
        stats = client.info()["train_stats"]["gcml"]
        rnd = stats.get("last_round") or {}
        if status.get("status") != "DONE" or not rnd:
            print("      training failed:\n        " + "\n        ".join(status.get("details", [])[-8:]))
            return 1
        print(f"      gate: {rnd.get('reason')}; serving version {stats.get('served_version')}")

        sample = client.next_sample("first", {})
        target = sample.get("id") or "case_000"
        t0 = time.perf_counter()
        label, params = client.infer("gcml_seg", target, {})
        dt = time.perf_counter() - t0
        print(f"[4/4] auto-segmented {target} with version {params.get('gcml_model_version')} in {dt:.2f} s -> {label}")
        print()
        print(f"  In 3D Slicer: MONAI Label module -> Server: {server.url}")
        print("  then Next Sample -> Auto Segmentation (gcml_seg) -> correct -> Submit Label -> Train (gcml).")
        if args.no_wait:
            return 0
        print("  Serving until Ctrl-C ...")
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
        return 0
    finally:
        print("stopping server")
        server.stop()


def _dcml_compare(args: argparse.Namespace) -> int:
    from gcml_app.sim.pair import compare

    styles = tuple(args.styles.split(","))
    if len(styles) != 2:
        raise SystemExit(f"--styles: found {args.styles!r}; expected two site styles such as a,b")
    res = compare(args.out, rounds=args.rounds, epochs=args.epochs, styles=styles, cases=args.cases, seed=args.seed)
    print(f"{'arm':<6} {'site':<5} {'round':>5} {'winner':<14} {'val':>6} {'test':>6}")
    for r in res["rows"]:
        print(f"{r['arm']:<6} {r['site']:<5} {r['round']:>5} {r['winner']:<14} {r['val_dice']:>6.3f} {r['test_dice']:>6.3f}")
    for name, c in res["step_cost"].items():
        print(f"step cost ({name}): DCML {c['dcml_s'] * 1000:.0f} ms vs supervised {c['supervised_s'] * 1000:.0f} ms "
              f"= {c['ratio']:.2f}x")
    print(f"wrote {args.out}/compare.json, compare.csv, compare.png")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gcml", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sample-data", help="write a MONAI Label studies folder of synthetic phantoms")
    s.add_argument("--out", required=True)
    s.add_argument("--site-style", default="a", choices=["a", "b", "c"])
    s.add_argument("--cases", type=int, default=12)
    s.add_argument("--labelled", type=int, default=None, help="how many cases get a final label (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample_data)

    s = sub.add_parser("serve", help="start this site's MONAI Label server with the GCML app")
    s.add_argument("--config", required=True)
    s.add_argument("--studies", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=_serve)

    s = sub.add_parser("status", help="print the served model and recent decisions of a site")
    s.add_argument("--config", required=True)
    s.add_argument("--last", type=int, default=10)
    s.set_defaults(func=_status)

    s = sub.add_parser("dcml-compare", help="two synthetic sites: DCML rounds vs local fine-tuning of equal steps")
    s.add_argument("--out", default="dcml-compare")
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--epochs", type=int, default=5)
    s.add_argument("--styles", default="a,b")
    s.add_argument("--cases", type=int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_dcml_compare)

    s = sub.add_parser("demo", help="sample data + a serving site with a first trained model")
    s.add_argument("--out", default="gcml-demo")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--cases", type=int, default=12)
    s.add_argument("--labelled", type=int, default=8)
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--no-wait", action="store_true", help="exit after the first inference instead of serving")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
