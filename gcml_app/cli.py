"""``gcml``: sample data, serving a site, site status, and the demo.

    gcml sample-data --out DIR --site-style a --cases 12 --labelled 8 --seed 0
    gcml sample-data --dicom DIR [--modality CT|MR]   the same phantoms as DICOM series and DICOM SEG
    gcml pacs-load DIR --url http://pacs:8042/dicom-web   STOW them (credentials: MONAI Label's env settings)
    gcml serve --config site.yaml --studies DIR|URL [--host H --port P]   (default: the YAML's serve:)
    gcml status --config site.yaml
    gcml node --config site.yaml [--node-rank K]   another machine's ranks in every round (train.distributed)
    gcml sync --config site.yaml [--peer NAME ...]   one gossip round on the running server (cron)
    gcml demo [--out gcml-demo --port 8001 --epochs 30 --gossip-epochs 5 --rounds 3 --no-wait --pacs]
    gcml simulate [--scenario few-labels --seeds 3 --rounds 8 --methods local,gcml,... --data DIR --until-plateau P]
    gcml simulate --active [--k 2 --start 2 --strategies random,epistemic,disagreement]
    gcml bench [--out gcml-bench --quick] [--scale | --clicks | --gpu | --ddp N | --soak MINUTES --clients K]
    gcml token new --peer site-b [--id site-b-2026q4]     a partner token, printed once, and its hash
    gcml certs --out pki --sites site-a,site-b,site-c     a trial CA and site certificates (mutual TLS)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gcml_app.config import ConfigError, load_config
from gcml_app.errors import InitError
from gcml_app.sim.data import SCENARIOS, SiteDataError
from gcml_app.sim.phantoms import STYLES

__all__ = ["main"]


def _sample_data(args: argparse.Namespace) -> int:
    from gcml_app.sim.phantoms import write_dicom_studies, write_studies

    n_lab = args.cases if args.labelled is None else args.labelled
    if args.dicom:
        out = write_dicom_studies(args.dicom, args.site_style, args.cases, args.labelled, args.seed, args.modality)
        print(f"wrote {args.cases} style-{args.site_style} phantoms as {args.modality} DICOM series ({n_lab} with a "
              f"DICOM SEG) to {out}; load them into a PACS with: gcml pacs-load {out} --url URL")
        return 0
    out = write_studies(args.out, args.site_style, args.cases, args.labelled, args.seed)
    print(f"wrote {args.cases} style-{args.site_style} phantoms ({n_lab} with final labels) to {out}")
    return 0


def _pacs_load(args: argparse.Namespace) -> int:
    import requests

    from gcml_app.site.pacs import pacs_client, stow_folder

    try:
        client = pacs_client(args.url)
        n = stow_folder(args.folder, client)
    except (ValueError, requests.RequestException) as e:
        print(f"gcml pacs-load: storing into the PACS failed: {e}", file=sys.stderr)
        return 2
    print(f"stored {n} DICOM instances from {args.folder} in {args.url}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gcml_app.site.launch import server_command

    from gcml_app.store import ModelStore

    cfg = load_config(args.config)  # fail here, with the key path, rather than inside the server
    store = ModelStore(cfg.state_dir / "models")
    _check_network(cfg, first_model=store.served_version() is None and not store.working_path.exists())
    cmd = server_command(args.config, args.studies, args.host or cfg.serve.host, args.port or cfg.serve.port)
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    os.execv(cmd[0], cmd)


def _node(args: argparse.Namespace) -> int:
    import logging

    from gcml_app.rounds.node_service import serve_node
    from gcml_app.rounds.nodes import NodeRefused

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config)
    d = cfg.train.distributed
    if d is None:
        print(f"gcml node: {args.config} has no train.distributed section (nodes, node_rank, rendezvous, token_env)",
              file=sys.stderr)
        return 2
    if args.node_rank is not None:
        try:
            d = type(d).model_validate({**d.model_dump(), "node_rank": args.node_rank})
        except ValueError as e:
            print(f"gcml node: --node-rank {args.node_rank}: {e}", file=sys.stderr)
            return 2
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"distributed": d})})
    try:
        serve_node(cfg, args.rounds)
    except (NodeRefused, KeyError) as e:
        print(f"gcml node: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


def _check_network(cfg, first_model: bool) -> None:
    """Build the site's network and, for a site's first model, its initial weights (``network.init_from``),
    so a bad bundle or checkpoint is a one-line error here, not a traceback in a server log or a sim run.

    Raises:
        InitError: what is wrong, naming the file.
    """
    from gcml_app.ml.network import build_network
    from gcml_app.rounds.loop import initial_state

    build_network(cfg)
    if cfg.network.init_from is not None and first_model:
        initial_state(cfg)


def _status(args: argparse.Namespace) -> int:
    from gcml_app.rounds.lock import running_round
    from gcml_app.store import ModelStore

    cfg = load_config(args.config)
    store = ModelStore(cfg.state_dir / "models")
    served = store.served()
    print(f"site {cfg.site}: state in {cfg.state_dir}")
    if (r := running_round(cfg.state_dir)) is not None:
        age = f", for {time.time() - r['started']:.0f} s" if isinstance(r.get("started"), float) else ""
        print(f"  round {r.get('round_id') or '(no id)'} running (trigger {r.get('trigger')}, pid {r.get('pid')}{age})")
    if served is None:
        print("  no published model yet")
    else:
        dice = ", ".join(f"{k} {v:.3f}" for k, v in served.val_dice.items())
        print(f"  serving v{served.version} ({served.produced_by}, {served.created}); val Dice {dice}; "
              f"n_train {served.n_train}, n_val {served.n_val}")
    for rec in store.history()[-args.last:]:
        print(f"  {rec['time']} {rec['event']:<8} v{rec.get('version')}  {rec.get('reason', '')}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    """Exit 0: the round ran (published, kept, or nothing new); 1: it failed; 3: no server answered."""
    import requests

    from gcml_app.rounds import summarize
    from gcml_app.site.client import RoundFailed, SiteClient

    cfg = load_config(args.config)
    site = SiteClient.for_site(cfg, args.server)
    try:
        task = site.sync(peers=args.peer)
        record = site.wait(task, timeout=args.timeout)
    except requests.HTTPError as e:
        print(f"{cfg.site}: sync refused: {e}")
        return 1
    except (RoundFailed, TimeoutError) as e:
        print(f"{cfg.site}: {e}")
        return 1
    except requests.RequestException as e:
        print(f"{cfg.site}: no answer from the site's server at {site.url}: {e}")
        return 3
    print(f"{cfg.site}: round {task['round_id']}: {summarize(record)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gcml_app.demo import run_demo

    return run_demo(args.out, port=args.port, cases=args.cases, labelled=args.labelled, warmup_epochs=args.epochs,
                    gossip_epochs=args.gossip_epochs, rounds=args.rounds, wait=not args.no_wait,
                    pacs=args.pacs)


def simulation_config(epochs: int) -> dict:
    """The site config ``gcml simulate`` uses on synthetic data (the sample federation's network)."""
    from gcml_app.sim.phantoms import LABELS

    return {"site": "sim", "labels": LABELS, "roi_size": [32, 32, 32],
            "network": {"name": "UNet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
            "train": {"epochs": epochs, "batch_size": 2, "samples_per_case": 2, "lr": 0.003, "seed": 0},
            "validation": {"sw_batch_size": 4}, "dcml": {"samples_per_class": 128}, "state_dir": "unused"}


def format_clicks(res: dict) -> str:
    """The --interactive table: per method and site, test Dice after k clicks and NoC (mean over seeds)."""
    c = res["clicks"]
    any_site = next(iter(next(iter(c.values())).values()))
    ks = [k for k in any_site if k.startswith("clicks_")]
    nocs = [k for k in any_site if k.startswith("noc")]
    lines = ["test Dice after k simulated clicks (mean +- std over seeds) and NoC (clicks to reach a Dice, cap 20)",
             f"{'method':10s} {'site':8s} " + " ".join(f"{k.replace('clicks_', 'k='):>13s}" for k in ks)
             + " " + " ".join(f"{k:>11s}" for k in nocs)]
    for m, per in c.items():
        for n, v in per.items():
            lines.append(f"{m:10s} {n:8s} " + " ".join(f"{v[k][0]:6.3f}+-{v[k][1]:5.3f}" for k in ks) + " "
                         + " ".join(f"{v[k][0]:5.2f}+-{v[k][1]:4.2f}" for k in nocs))
    return "\n".join(lines)


def _simulate(args: argparse.Namespace) -> int:
    from functools import partial

    from gcml_app.config import SiteConfig
    from gcml_app.sim.data import load_sites, scenario_sites
    from gcml_app.sim.federation import simulate
    from gcml_app.sim.tables import provenance

    out = Path(args.out)
    cfg = load_config(args.config) if args.config else SiteConfig.model_validate(simulation_config(args.epochs))
    if args.data:
        fixed = load_sites(args.data)
        sites_of_seed = lambda seed: fixed
        scenario = f"data:{args.data}"
    else:
        sites_of_seed = partial(scenario_sites, out / "data", args.scenario)
        scenario = args.scenario
    methods = args.methods.split(",") if args.methods else None
    if args.data and args.init == "pretrained":
        raise ConfigError("--init pretrained: its bundle is trained on phantoms of the simulator's task; on your own "
                          "data, set network.init_from in --config to your bundle or checkpoint")
    if args.interactive:
        cfg = cfg.model_copy(update={"interactive": cfg.interactive.model_copy(update={"enabled": True})})
    if args.ranks > 1:  # validated with each site's config
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gpus": list(range(args.ranks))})})
    _check_network(cfg, first_model=True)
    if args.active:
        return _simulate_active(args, cfg, out)
    pretrain = args.pretrain_epochs if args.init == "pretrained" else 0
    res = simulate(cfg, sites_of_seed, out, methods=methods, rounds=args.rounds, epochs=args.epochs,
                   warmup_epochs=args.warmup_epochs, seeds=args.seeds, transport=args.transport,
                   gate=args.gate == "on", jobs=args.jobs, scenario=scenario, pretrain_epochs=pretrain,
                   until_plateau=args.until_plateau, provenance=provenance(args.argv))
    print(format_summary(res))
    if "plateau" in res:
        print(format_plateau(res))
    if "clicks" in res:
        print(format_clicks(res))
    print(f"wrote {out}/results.json, results.csv, results.md, dice_vs_round.png, dice_vs_bytes.png"
          + (", dice_vs_clicks.png" if "clicks" in res else "") + f" ({res['seconds']:.0f} s)")
    return 0


def _simulate_active(args: argparse.Namespace, cfg, out: Path) -> int:
    """``gcml simulate --active``: random, epistemic and disagreement labelling, test Dice against labels."""
    from functools import partial

    from gcml_app.sim.active import simulate_active
    from gcml_app.sim.data import load_sites, scenario_sites

    if args.init == "pretrained":
        raise ConfigError("--active starts every site from its own warm-up; --init pretrained is not offered here")
    if args.selection:
        cfg = cfg.model_copy(update={"active": cfg.active.model_copy(update={"selection": args.selection})})
    pool = args.pool or 2 * args.k * args.rounds
    if args.data:
        fixed = load_sites(args.data)
        sites_of_seed, scenario = (lambda seed: fixed), f"data:{args.data}"
    else:
        sites_of_seed = partial(scenario_sites, out / "data", args.scenario, train=args.start + pool)
        scenario = args.scenario
    res = simulate_active(cfg, sites_of_seed, out, strategies=args.strategies.split(",") if args.strategies else None,
                          rounds=args.rounds, k=args.k, start=args.start, epochs=args.epochs,
                          warmup_epochs=args.warmup_epochs, seeds=args.seeds, transport=args.transport,
                          gate=args.gate == "on", jobs=args.jobs, scenario=scenario)
    print(format_active(res))
    print(f"wrote {out}/active.json, active.csv, active.png ({res['seconds']:.0f} s)")
    return 0


def format_active(res: dict) -> str:
    """Test Dice against labels per strategy (mean over sites and seeds), then the labels each needs to reach
    random's final Dice and its worst shortfall against random at any site."""
    c, s = res["config"], res["summary"]
    labels = s["labels"]
    lines = [f"{c['scenario']} --active: served test Dice against labelled cases per site ({len(c['sites'])} sites, "
             f"{c['seeds']} seeds, {c['k']} labelled per round from a pool of {max(c['pool'].values())})",
             f"  {'labels':<14}" + "".join(f"{x:>8.0f}" for x in labels)]
    for m in c["strategies"]:
        lines.append(f"  {m:<14}" + "".join(f"{d:>8.3f}" for d in s[m]["mean"]))
    if "random" in s:
        lines.append(f"  to reach random's final {s['random']['mean'][-1]:.3f} (of {labels[-1]:.0f} labels):")
        for m in c["strategies"]:
            need, frac = s[m].get("labels_to_reach_random_final"), s[m].get("label_fraction_of_random")
            worst = s[m].get("worst_vs_random_in_std")
            lines.append(f"  {m:<14}" + (f"{need:>8.1f} labels ({frac:.0%})" if need is not None else "   never")
                         + (f"; worst site vs random at equal labels {min(worst.values()):+.2f} seed-std" if worst else ""))
    return "\n".join(lines)


def format_plateau(res: dict) -> str:
    """The plateau table: per method, the test Dice per site where its validation Dice stopped rising."""
    p = res["plateau"]
    names = res["config"]["sites"]
    lines = [f"at the plateau (validation mean up by <= {p['tolerance']:g} for {p['patience']} rounds; at most "
             f"{res['config']['rounds']} rounds): test Dice per site, mean +- std over seeds",
             "  method          rounds  " + "  ".join(f"{n:>13}" for n in names) + "     mean"]
    for m in res["config"]["methods"]:
        x = p[m]
        rounds = f"{sum(x['rounds']) / len(x['rounds']):4.1f}" + ("" if x["plateau_reached"] == x["seeds"] else "*")
        lines.append(f"  {m:<14} {rounds:>6}  " + "  ".join(
            f"{x['sites'][n]['mean']:.3f} +- {x['sites'][n]['std']:.3f}" for n in names) + f"  {x['mean']:.3f}")
    lines.append("  (* some seeds still rising at the last round: their figure is the last round's)")
    return "\n".join(lines)


def format_summary(res: dict) -> str:
    """The comparison as a table: test Dice per site (mean +- std over seeds), mean, MB received, training cost
    (crop passes, as a multiple of local's), then each method against local2x and local per site."""
    c = res["config"]
    names = c["sites"]
    summary = res["summary"]
    lines = [f"{c['scenario']}: served test Dice after round {c['rounds']} ({len(names)} sites, {c['seeds']} seeds, "
             f"{c['epochs']} epochs per round, warm-up {c['warmup_epochs']}, gate {'on' if c['gate'] else 'off'})",
             f"  {'method':<14}" + "".join(f"{n:>15}" for n in names) + f"{'mean':>15}{'MB/seed':>9}{'compute':>9}"]
    for m, row in summary.items():
        ps = row["per_site"]
        compute = row["cost"].get("vs_local")
        lines.append(f"  {m:<14}" + "".join(f"{ps[n]['mean']:>8.3f} +-{ps[n]['std']:.3f}" for n in names)
                     + f"{row['mean']:>8.3f} +-{row['std']:.3f}{row['bytes_received_per_seed'] / 1e6:>9.2f}"
                     + (f"{compute:>8.2f}x" if compute is not None else f"{'':>9}"))
    for rival, what in (("local2x", "the same compute alone"), ("local", "the site alone")):
        if rival not in summary:
            continue
        lines.append(f"  paired vs {rival}, {what} (mean difference, seeds won):")
        for m, row in summary.items():
            if m != rival:
                ps = row["per_site"]
                lines.append(f"  {m:<14}" + "".join(
                    f"{ps[n][f'vs_{rival}']['mean']:>+9.3f} {ps[n][f'vs_{rival}']['wins']}/{ps[n][f'vs_{rival}']['n']:<3}"
                    for n in names))
    return "\n".join(lines)


def _certs(args: argparse.Namespace) -> int:
    from gcml_app.site.certs import write_trial_pki

    sites = args.sites.split(",")
    hosts: dict[str, list[str]] = {}
    for item in args.hosts or []:
        site, sep, names = item.partition("=")
        if not sep or site not in sites or not names:
            raise SystemExit(f"gcml certs --hosts: found {item!r}; expected SITE=HOST[,HOST...] with SITE one of {sites}")
        hosts.setdefault(site, []).extend(n.strip() for n in names.split(",") if n.strip())
    paths = write_trial_pki(args.out, sites, hosts)
    shared = [s for s in sites if s not in hosts]
    if len(shared) > 1:
        print(f"note: {shared} got only loopback names: fine on one machine, but each of their certificates is valid "
              "for the others' loopback URLs; give each site its own names with --hosts SITE=HOST,...")
    print(f"trial CA {paths['ca']}; its key is in {paths['ca_key']}: keep it offline, never hand it to a site.")
    print(f"For each site, <site>.pem and <site>.key in {args.out}:")
    print("  serve: {tls: {certfile: <site>.pem, keyfile: <site>.key, ca_certs: ca.pem, client_certs: required}}")
    print("  gossip: {ca_bundle: ca.pem, client_cert: <site>.pem, client_key: <site>.key}")
    return 0


def _token_new(args: argparse.Namespace) -> int:
    import secrets

    from gcml_app.site.guard import hash_token

    token = secrets.token_urlsafe(32)
    token_id = args.id or f"{args.peer}-{time.strftime('%Y%m%d')}"
    print(f"New token for partner {args.peer} (shown once; give it to {args.peer} over a secure channel):")
    print(f"  {token}")
    print(f"{args.peer} puts it in its YAML as gossip.peers[].token_env (an environment variable holding it).")
    print("You add this line under security.peer_tokens in your site YAML (the server re-reads it, no restart):")
    print(f"  - {{id: {token_id}, peer: {args.peer}, sha256: {hash_token(token)}}}")
    print("To rotate: keep the old line until the partner uses the new token, then delete the old line.")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from gcml_app.sim.scale import scale_bench

    r = scale_bench(args.out, quick=args.quick)
    for name, s in r["sizes"].items():
        print(f"{name} ({s['voxels'] / 1e6:.1f} M voxels a case): round memory per added case "
              f"{s['mb_per_case_first']:.1f} MB (first round) / {s['mb_per_case_second']:.1f} MB (second) "
              f"(target <= 8); second-round loading {s['second_over_first_load']:.2f}x the first (target <= 0.5); "
              f"cache {s['cache_mb_per_case']:.0f} MB a case on disk")
        for rd in s["rounds"]:
            pc = rd["per_case_s"]
            print(f"  N={rd['n']:3d} {rd['round']:6s} +{rd['above_start_mb']:6.0f} MB  load {pc['load']:.2f} s/case  "
                  f"train {pc['train']:.2f}  validate {pc['validate']:.2f}")
    sc = r["scoring"]
    print(f"scoring one unlabelled {sc['size']} image ({sc['voxels'] / 1e6:.1f} M voxels at 1 mm, CPU, "
          f"{sc['torch_threads']} threads): disagreement with {sc['partners']} partners {sc['disagreement_s']:.1f} s "
          f"(+{sc['disagreement_peak_above_mb']} MB), epistemic {sc['epistemic_s']:.1f} s "
          f"(+{sc['epistemic_peak_above_mb']} MB)")
    for a in r["augment"]:
        print(f"augmentation (train.augment: scanner), one CPU thread, {a['roi']}^3 crop: {a['s_per_crop'] * 1e3:.0f} ms "
              f"(p95 {a['p95_s'] * 1e3:.0f}, every transform at once {a['all_fire_s'] * 1e3:.0f}); train.num_workers "
              "processes share it")
    for k, st in r.get("dcml_step", {}).items():  # on a GPU only
        print(f"DCML step, deployment network at 96^3, {k}: {st['step_s'] * 1e3:.1f} ms, peak GPU {st['peak_gpu_mb']} MB")
    print(f"wrote {Path(args.out) / 'scale.json'} and scale.png")
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from gcml_app.sim.gpucheck import gpu_check

    r = gpu_check(args.out)
    where = r["gpu"] or "CPU (no GPU: reduced sizes)"
    print(f"GPU check on {where}, torch {r['torch']}: {'OK' if r['ok'] else 'FAILED'}")
    for k in ("amp_on", "amp_off"):
        s = r["dcml_step"][k]
        print(f"  DCML step {s['precision']:8s} {s['step_s'] * 1e3:8.1f} ms  peak GPU {s['peak_gpu_mb']} MB  "
              f"finite {s['loss_finite']}  both models updated {s['both_updated']}")
    rd, inf = r["round"], r["infer"]
    print(f"  round on {rd['cases']} cases of {rd['volume_1mm']}: {rd['wall_s']:.1f} s {rd['timings']}, "
          f"peak GPU {rd['peak_gpu_mb']} MB, published {rd['published']}")
    print(f"  gcml_seg on one volume: {inf['wall_s']:.2f} s, peak GPU {inf['peak_gpu_mb']} MB")
    print(f"wrote {Path(args.out) / 'gpu_check.json'}")
    return 0 if r["ok"] else 1


def _bench_clicks(args: argparse.Namespace) -> int:
    from gcml_app.sim.clickbench import click_bench

    r = click_bench(args.out, quick=args.quick)
    m, q = r["median_s"], r["ratio_to_gcml_seg"]
    print(f"clicks on a {'x'.join(map(str, r['shape_xyz_1mm']))} volume (ROI {r['roi_size'][0]}): gcml_seg "
          f"{m['gcml_seg']:.2f} s; the first click after it {m['first_click_after_gcml_seg']:.2f} s "
          f"({q['first_click_after_gcml_seg']:.3f}x); a click {m['click_1']:.2f} s ({q['click_1']:.3f}x), five clicks {m['click_5']:.2f} s "
          f"({q['click_5']:.3f}x), the first click on an uncached case {m['first_click_uncached']:.2f} s "
          f"({q['first_click_uncached']:.3f}x); target <= {r['target_ratio']}x")
    print(f"wrote {Path(args.out).resolve()}/clicks.json")
    return 0


def _bench_ddp(args: argparse.Namespace) -> int:
    from gcml_app.sim.ddpbench import ddp_bench

    r = ddp_bench(args.out, ranks=args.ddp, quick=args.quick)
    one, many, q = r["one"], r["many"], r["ratio"]
    print(f"one round on 1 and {r['ranks']} ranks ({r['device']}, {r['backend']}, {r['threads_per_rank'] or '-'} "
          f"threads per rank), {r['cases']} cases of {'x'.join(map(str, r['shape_xyz_1mm']))}, ROI {r['roi_size'][0]}:")
    for name, run in (("1 rank", one), (f"{r['ranks']} ranks", many)):
        print(f"  {name:8s} round {run['wall_s']:7.1f} s  {run['crops_per_s']:.2f} crops/s ({run['step_s']:.2f} s a step)"
              f"  validation {run['validate_s_per_case']:.2f} s/case  preprocessing {run['load_s_per_case']:.2f} s/case")
    print(f"  ratios: crops/s x{q['crops_per_s']:.2f}, validation x{q['validate_s_per_case']:.2f}, preprocessing "
          f"x{q['load_s_per_case']:.2f}, round x{q['round_wall_s']:.2f} (target >= {r['target_ratio']} for the first two); "
          f"ranks ready in {(many['ranks'] or {}).get('start_s')} s, same weights: {(many['ranks'] or {}).get('same_weights')}")
    if w := r.get("ratio_to_one_process_all_threads"):
        whole = r["one_all_threads"]
        print(f"  1 process, {r['cores']} threads: round {whole['wall_s']:.1f} s, {whole['crops_per_s']:.2f} crops/s, validation "
              f"{whole['validate_s_per_case']:.2f} s/case; {r['ranks']} ranks against it: crops/s x{w['crops_per_s']:.2f}, "
              f"validation x{w['validate_s_per_case']:.2f}, round x{w['round_wall_s']:.2f}")
    print(f"wrote {Path(args.out) / 'ddp.json'} and ddp.png")
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from gcml_app.sim.soak import soak_bench

    r = soak_bench(args.out, minutes=args.soak, clients=args.clients, quick=args.quick)
    c, t = r["checks"], r["targets"]
    print(f"soak: {r['clients']} clients for {r['minutes']:g} min; {c['label_saves']} label saves of "
          f"{c['labels_saved']} cases: {c['labels_lost']} lost, {c['corrupt_files']} corrupt; rounds "
          f"{c['rounds_by_outcome']}; served v{c['served_version']} verifies")
    seg, idle = r["latency"].get("gcml_seg", {}), r["idle_seg"]
    print(f"  gcml_seg p95 {seg.get('p95_s')} s under load, {idle['p95_s']} s idle (back to back: "
          f"{r['idle_seg_back_to_back']['p95_s']} s)")
    print(f"  gcml_seg p95 {r['seg_p95_ratio']}x idle (target <= {t['seg_p95_ratio']}); server RSS growth over the "
          f"last half {r.get('rss_growth_last_half')} (target <= {t['rss_growth_last_half']}); fds "
          f"{r.get('server_fds')}; errors {r['errors'] or 'none'}")
    print(f"wrote {Path(args.out) / 'soak.json'}, soak.png and soak_calls.csv")
    met = (c["labels_lost"] == 0 and c["corrupt_files"] == 0 and c["rounds_without_reason"] == 0
           and (r["seg_p95_ratio"] or 0) <= t["seg_p95_ratio"]
           and (r.get("rss_growth_last_half") or 0) <= t["rss_growth_last_half"])
    return 0 if met else 2


def _bench(args: argparse.Namespace) -> int:
    if args.soak:
        return _bench_soak(args)
    if args.ddp:
        return _bench_ddp(args)
    if args.scale:
        return _bench_scale(args)
    if args.clicks:
        return _bench_clicks(args)
    if args.gpu:
        return _bench_gpu(args)
    from gcml_app.sim.bench import bench

    r = bench(args.out, quick=args.quick)
    g, inf, bg, st = r["gossip_round"], r["infer"], r["infer_under_training"], r["dcml_step"]
    print(f"infer: gcml_seg vs stock BasicInferTask, median ratio {inf['ratio_median']:.3f} (target <= 1.05)")
    print("DCML step vs supervised step: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in st.items())
          + " (target <= 2.1)")
    print(f"infer p95 during a whole round vs idle: {bg['p95_ratio']:.2f}x (target <= 1.5; {bg['training']['n']} "
          f"requests; the round's start-up {bg['p95_ratio_startup'] or 0:.2f}x, "
          f"its epochs {bg['p95_ratio_epochs']:.2f}x)")
    sc = r["infer_under_scoring"]
    print(f"infer p95 while scoring every unlabelled image vs idle: {sc['p95_ratio']:.2f}x (target <= 1.5; "
          f"{sc['scoring']['n']} requests; " + ", ".join(f"{m} {x['scored']} images in {x['seconds'] or 0:.1f} s"
                                                        for m, x in sc["runs"].items()) + ")")
    print(f"gossip round {g['wall_s']:.1f} s: fetch {g['fetch_s']:.3f}, verify {g['verify_s']:.3f}, "
          f"train {g.get('train_s', 0):.1f}, validate {g.get('validate_s', 0):.1f}, publish {g.get('publish_s', 0):.3f} s; "
          f"peak RSS {g['peak_rss_mb']:.0f} MB")
    phases = g.get("peak_rss_by_phase_mb") or {}
    print("training process peak RSS by phase (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    print(f"round overhead (start-up, app init, load): {g['overhead_s']:.1f} s (target <= {g['target_overhead_s']:g}); "
          f"{g['start']} start in {g['startup_s'] or 0:.2f} s")
    if wt := g.get("warm_trainer_mb"):
        print(f"warm trainer (idle): {wt['rss']:.0f} MB RSS, {wt['uss']:.0f} MB its own (USS)")
    print(f"payload: float32 {r['payload']['float32'] / 1e3:.1f} kB, float16 {r['payload']['float16'] / 1e3:.1f} kB")
    pacs = r["pacs"]
    if "skipped" in pacs:
        print(f"PACS cache: not measured: {pacs['skipped']}")
    else:
        print(f"PACS cache (Orthanc): first fill {pacs['first_fill_s']:.2f} s for {pacs['first_fill_cases']} labelled "
              f"series with their DICOM SEG ({pacs['first_fill_s_per_case']:.3f} s each); one uncached series "
              f"{pacs['uncached_series_s']:.2f} s, cached {pacs['cached_series_ms']:.1f} ms")
    print(f"wrote {Path(args.out) / 'bench.json'} and bench.png")
    return 0


def _site_name(v: str) -> str:
    from gcml_app.config import check_site_name

    try:
        return check_site_name(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gcml", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sample-data", help="write a MONAI Label studies folder (or DICOM for a PACS) of phantoms")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="a studies folder: NIfTI images and labels/final/")
    where.add_argument("--dicom", help="a folder of DICOM series (one folder per case) and DICOM SEG labels")
    s.add_argument("--modality", default="CT", choices=["CT", "MR"], help="with --dicom: the images' SOP class")
    s.add_argument("--site-style", default="a", choices=sorted(STYLES),
                   help="a, b, c: the semantic-shift sample federation; s1-s5: the few-labels scanners")
    s.add_argument("--cases", type=int, default=12)
    s.add_argument("--labelled", type=int, default=None, help="how many cases get a final label (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample_data)

    s = sub.add_parser("pacs-load", help="store a folder of DICOM files in a PACS over DICOMweb (STOW-RS)")
    s.add_argument("folder", help="e.g. the output of gcml sample-data --dicom")
    s.add_argument("--url", required=True, help="the PACS's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    s.set_defaults(func=_pacs_load)

    s = sub.add_parser("serve", help="start this site's MONAI Label server with the GCML app")
    s.add_argument("--config", required=True)
    s.add_argument("--studies", required=True, help="the studies folder, or a PACS's DICOMweb URL")
    s.add_argument("--host", default=None, help="default: serve.host of the YAML")
    s.add_argument("--port", type=int, default=None, help="default: serve.port of the YAML")
    s.set_defaults(func=_serve)

    s = sub.add_parser("sync", help="run one gossip round on this site's running server and print the outcome")
    s.add_argument("--config", required=True)
    s.add_argument("--server", default=None, help="default: the YAML's serve: host and port")
    s.add_argument("--peer", action="append", help="ask this partner (repeat for an order); default: the policy")
    s.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the round")
    s.set_defaults(func=_sync)

    s = sub.add_parser("node", help="run this machine's ranks of every round of a site on several machines")
    s.add_argument("--config", required=True, help="the site's YAML, with train.distributed")
    s.add_argument("--node-rank", type=int, default=None, help="this machine's place (default: the YAML's)")
    s.add_argument("--rounds", type=int, default=None, help="stop after this many rounds (default: never)")
    s.set_defaults(func=_node)

    s = sub.add_parser("status", help="print the served model and recent decisions of a site")
    s.add_argument("--config", required=True)
    s.add_argument("--last", type=int, default=10)
    s.set_defaults(func=_status)


    s = sub.add_parser("simulate", help="controlled multi-seed comparison: GCML, local, FL baselines, ablations")
    s.add_argument("--out", default="gcml-simulate")
    s.add_argument("--scenario", default="few-labels", choices=sorted(SCENARIOS), help="synthetic federation")
    s.add_argument("--data", default=None, help="real data: DIR/<site>/imagesTr|labelsTr[|imagesTs|labelsTs|site.yaml]")
    s.add_argument("--config", default=None, help="site YAML for labels, network, transforms, DCML and gate")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--rounds", type=int, default=8)
    s.add_argument("--epochs", type=int, default=5, help="passes over a site's training cases per round, every method")
    s.add_argument("--warmup-epochs", type=int, default=20, help="round-0 local epochs (the shared warm-up)")
    s.add_argument("--methods", default=None, help="comma-separated; default: all (see the README)")
    s.add_argument("--gate", default="on", choices=["on", "off"], help="the gate policy of every method")
    s.add_argument("--transport", default="float32", choices=["float32", "float16"])
    s.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    s.add_argument("--init", default="random", choices=["random", "pretrained"],
                   help="sites start from random weights, or from a bundle trained at a separate synthetic site")
    s.add_argument("--pretrain-epochs", type=int, default=40, help="--init pretrained: that site's training epochs")
    s.add_argument("--until-plateau", type=int, default=0, metavar="P", help="also report each method at its plateau: "
                   "the round its mean validation Dice stopped rising by more than validation.margin for P rounds "
                   "(--rounds is then the maximum)")
    s.add_argument("--ranks", type=int, default=1, help="every site round (local, local2x, gml, the gcml variants) "
                   "on N torch.distributed ranks: train.gpus, CPU processes with gloo where there are fewer GPUs")
    s.add_argument("--interactive", action="store_true",
                   help="interactive.enabled at every site: every method trains with simulated clicks, and the final "
                   "models are scored after 0, 1, 3, 5, 10 clicks and by NoC@85/90 (dice_vs_clicks.png)")
    s.add_argument("--active", action="store_true",
                   help="which cases to label: each site starts with --start labels and labels --k per round")
    s.add_argument("--strategies", default=None, help="--active: comma-separated; default random,epistemic,disagreement")
    s.add_argument("--k", type=int, default=2, help="--active: cases each site labels per round")
    s.add_argument("--start", type=int, default=2, help="--active: labelled training cases each site starts with")
    s.add_argument("--pool", type=int, default=0, help="--active: pool of unlabelled cases per site; 0 = 2 k rounds")
    s.add_argument("--selection", default=None, choices=["top", "proportional"],
                   help="--active: how scored strategies pick (default: the config's active.selection)")
    s.set_defaults(func=_simulate)

    s = sub.add_parser("certs", help="a trial CA and per-site certificates (HTTPS and mutual TLS between sites)")
    s.add_argument("--out", required=True)
    s.add_argument("--sites", required=True, help="comma-separated site names, e.g. site-a,site-b,site-c")
    s.add_argument("--hosts", action="append", metavar="SITE=HOST[,HOST...]",
                   help="a site's own host names and addresses (repeat per site); default loopback only")
    s.set_defaults(func=_certs)

    s = sub.add_parser("token", help="partner tokens")
    tok = s.add_subparsers(dest="token_cmd", required=True)
    s = tok.add_parser("new", help="make a token for a partner: print it once, and the hash for your YAML")
    s.add_argument("--peer", required=True, type=_site_name, help="the partner's site name")
    s.add_argument("--id", default=None, type=_site_name, help="token id for the audit log (default: PEER-YYYYMMDD)")
    s.set_defaults(func=_token_new)

    s = sub.add_parser("bench", help="latency, step cost, round split, payload and memory -> bench.json")
    s.add_argument("--out", default="gcml-bench")
    s.add_argument("--quick", action="store_true", help="tiny budgets (seconds, for tests); ratios are noisier")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--scale", action="store_true", help="round memory and time against N on realistic-size "
                      "volumes -> scale.json, scale.png")
    mode.add_argument("--clicks", action="store_true", help="a click's latency (gcml_edit) against a full gcml_seg "
                      "of the same 192x192x160 volume -> clicks.json")
    mode.add_argument("--gpu", action="store_true", help="the GPU check (AMP DCML step, a round on 8 realistic "
                      "volumes, inference) -> gpu_check.json; on a CPU at reduced sizes")
    mode.add_argument("--ddp", type=int, default=0, metavar="N", help="one round on 1 and on N ranks "
                      "(train.gpus; CPU processes with gloo where there are fewer GPUs) on realistic-size volumes: "
                      "crops/s, validation s/case, round wall time and their ratios -> ddp.json, ddp.png")
    mode.add_argument("--soak", type=float, default=0, metavar="MINUTES", help="a working day compressed: clients, "
                      "rounds, gossip, scoring, the CLI and a partner restart at once, then nothing-lost checks "
                      "-> soak.json, soak.png, soak_calls.csv")
    s.add_argument("--clients", type=int, default=4, help="--soak: concurrent Slicer-like clients")
    s.set_defaults(func=_bench)

    s = sub.add_parser("demo", help="three sites on loopback: sample data, warm-up, gossip rounds, then serve")
    s.add_argument("--out", default="gcml-demo")
    s.add_argument("--port", type=int, default=8001, help="site A's port (B, C: the next two); 0 picks free ports")
    s.add_argument("--cases", type=int, default=12)
    s.add_argument("--labelled", type=int, default=8)
    s.add_argument("--epochs", type=int, default=30, help="warm-up epochs of each site")
    s.add_argument("--gossip-epochs", type=int, default=5, help="DCML epochs per gossip round")
    s.add_argument("--rounds", type=int, default=3, help="gossip rounds (each site pulls once per round)")
    s.add_argument("--no-wait", action="store_true", help="exit after the first inference instead of serving")
    s.add_argument("--pacs", action="store_true", help="site A's images in a private Orthanc (DICOMweb), not a folder")
    s.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv  # for what heads a result's tables
    try:
        return args.func(args)
    except (ConfigError, SiteDataError, InitError) as e:
        print(str(e), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
