"""``gcml simulate``: the controlled multi-seed comparison, its tables on the terminal."""

from __future__ import annotations

import argparse
from pathlib import Path

from gcml_app.cli.site import check_network
from gcml_app.config import ConfigError, load_config
from gcml_app.sim.data import SCENARIOS


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
    check_network(cfg, first_model=True)
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``gcml`` subcommands of this module."""
    s = sub.add_parser("simulate", help="controlled multi-seed comparison: GCML, local, FL baselines, ablations")
    s.add_argument("--out", default="gcml-simulate")
    s.add_argument("--scenario", default="few-labels", choices=sorted(SCENARIOS), help="synthetic federation")
    s.add_argument("--data", default=None, help="real data: DIR/<site>/imagesTr|labelsTr[|imagesTs|labelsTs|site.yaml]")
    s.add_argument("--config", default=None, help="site YAML for labels, network, transforms, DCML and gate")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--rounds", type=int, default=8)
    s.add_argument("--epochs", type=int, default=5, help="passes over a site's training cases per round, every method")
    s.add_argument("--warmup-epochs", type=int, default=20, help="round-0 local epochs (the shared warm-up)")
    s.add_argument("--methods", default=None, help="comma-separated; default: all (docs/results.md lists them)")
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
