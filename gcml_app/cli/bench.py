"""``gcml bench``: latency, step cost, round split, payload, memory, scale, clicks, GPU, ranks and the soak.

Every mode prints its measures as rows (measure, result, target) and writes them as a Markdown table,
``<out>/<mode>.md``, headed by the command, the commit and the date, which docs/results.md includes as written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

Row = tuple[str, str, str]
"""One measure: what, the result, its target ("" when it has none)."""


def _report(args: argparse.Namespace, name: str, title: str, rows: list[Row], also: str) -> None:
    """Print ``rows`` and write them to ``<out>/<name>.md`` under ``title`` and the command, commit and date.

    Args:
        also: the other files the mode wrote, named on the last line.
    """
    from gcml_app.sim.tables import bench_markdown, provenance

    for what, result, target in rows:
        print(f"{what}: {result}" + (f" (target {target})" if target else ""))
    md = Path(args.out) / f"{name}.md"
    md.write_text(bench_markdown(title, rows, provenance(getattr(args, "argv", []))))
    print(f"wrote {md}, {also}")


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _bench_scale(args: argparse.Namespace) -> int:
    from gcml_app.sim.scale import scale_bench

    r = scale_bench(args.out, quick=args.quick)
    rows: list[Row] = []
    for name, s in r["sizes"].items():
        what = f"{name} ({s['voxels'] / 1e6:.1f} M voxels a case)"
        rows += [(f"{what}: round memory per added case, first / second round",
                  f"{s['mb_per_case_first']:.1f} / {s['mb_per_case_second']:.1f} MB", "<= 8 MB"),
                 (f"{what}: second-round loading against the first", f"{s['second_over_first_load']:.3f}x", "<= 0.5x"),
                 (f"{what}: case cache on disk", f"{s['cache_mb_per_case']:.0f} MB a case", "")]
        for rd in s["rounds"]:
            pc = rd["per_case_s"]
            rows.append((f"{what}: N = {rd['n']}, {rd['round']} round",
                         f"+{rd['above_start_mb']:.0f} MB above its start; s a case: load {pc['load']:.2f}, "
                         f"train {pc['train']:.2f}, validate {pc['validate']:.2f}", ""))
    sc = r["scoring"]
    rows.append((f"scoring one unlabelled {sc['size']} image ({sc['voxels'] / 1e6:.1f} M voxels, CPU, "
                 f"{sc['torch_threads']} threads)",
                 f"disagreement with {sc['partners']} partners {sc['disagreement_s']:.1f} s "
                 f"(+{sc['disagreement_peak_above_mb']} MB), epistemic {sc['epistemic_s']:.1f} s "
                 f"(+{sc['epistemic_peak_above_mb']} MB)", ""))
    for a in r["augment"]:
        rows.append((f"augmentation (`train.augment: scanner`) of a {a['roi']}³ crop, one CPU thread",
                     f"{_ms(a['s_per_crop'])} (p95 {_ms(a['p95_s'])}; every transform at once {_ms(a['all_fire_s'])})",
                     ""))
    for k, st in r.get("dcml_step", {}).items():  # on a GPU only
        rows.append((f"DCML step, deployment network at 96³, {k}",
                     f"{_ms(st['step_s'])}, peak GPU {st['peak_gpu_mb']} MB", ""))
    _report(args, "scale", "gcml bench --scale: a round's memory and time against the number of cases", rows,
            "scale.json, scale.png")
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from gcml_app.sim.gpucheck import gpu_check

    r = gpu_check(args.out)
    rows: list[Row] = [("device", f"{r['gpu'] or 'CPU (no GPU: reduced sizes)'}, torch {r['torch']}", ""),
                       ("the check", "OK" if r["ok"] else "FAILED", "OK")]
    for k in ("amp_on", "amp_off"):
        s = r["dcml_step"][k]
        rows.append((f"DCML step, {s['precision']}",
                     f"{_ms(s['step_s'])}, peak GPU {s['peak_gpu_mb']} MB, losses finite {s['loss_finite']}, "
                     f"both models updated {s['both_updated']}", "finite, both updated"))
    rd, inf = r["round"], r["infer"]
    rows += [(f"a round on {rd['cases']} cases of {rd['volume_1mm']}",
              f"{rd['wall_s']:.1f} s, peak GPU {rd['peak_gpu_mb']} MB, published {rd['published']}", ""),
             ("`gcml_seg` on one volume", f"{inf['wall_s']:.2f} s, peak GPU {inf['peak_gpu_mb']} MB", "")]
    _report(args, "gpu_check", "gcml bench --gpu: the GPU check", rows, "gpu_check.json")
    return 0 if r["ok"] else 1


def _bench_clicks(args: argparse.Namespace) -> int:
    from gcml_app.sim.clickbench import click_bench

    r = click_bench(args.out, quick=args.quick)
    m, q, target = r["median_s"], r["ratio_to_gcml_seg"], f"<= {r['target_ratio']}x"
    shape = "x".join(map(str, r["shape_xyz_1mm"]))
    rows: list[Row] = [(f"`gcml_seg`, the whole {shape} volume (ROI {r['roi_size'][0]}), on {r['device']}",
                        f"{m['gcml_seg']:.2f} s", "")]
    for key, what, tgt in (("first_click_after_gcml_seg", "the first click after the case's `gcml_seg`", target),
                           ("click_1", "a click in a new place after that", target),
                           ("click_in_session", "each click of five in three places (all sent each time)", target),
                           ("click_5", "those five clicks at once, no window kept (a new model version)", ""),
                           ("first_click_uncached", "the first click on a case never auto-segmented", "")):
        rows.append((what, f"{m[key]:.2f} s: {q[key]:.3f}x a full `gcml_seg`", tgt))
    for key, what in (("gcml_seg", "`gcml_seg`"), ("first_click_after_gcml_seg", "the first click after it"),
                      ("click_in_session", "a click of the session")):
        if st := r.get("stages_s", {}).get(key):  # results from before the stages were recorded have none
            rows.append((f"where {what}'s time goes, s (MONAI Label's stages)",
                         ", ".join(f"{s} {v:.3f}" for s, v in st.items()), ""))
    tc = r["train_clicks"]
    rows.append((f"clicks drawn for a training batch of {tc['batch'][0]} crops of {tc['batch'][1]}³, each clicked "
                 f"(seeds, {tc['train_clicks']} round on the model's errors), against a training step on it",
                 f"{tc['simulate_s']:.2f} s against {tc['step_s']:.2f} s: {tc['ratio']:.1f}x", ""))
    _report(args, "clicks", "gcml bench --clicks: a click against a full gcml_seg", rows, "clicks.json")
    return 0


def _bench_ddp(args: argparse.Namespace) -> int:
    from gcml_app.sim.ddpbench import ddp_bench

    r = ddp_bench(args.out, ranks=args.ddp, quick=args.quick)
    q, n, target = r["ratio"], r["ranks"], f">= {r['target_ratio']}x"
    rows: list[Row] = [("setting", f"{r['device']}, {r['backend']}, {r['threads_per_rank'] or '-'} threads a rank; "
                        f"{r['cases']} cases of {'x'.join(map(str, r['shape_xyz_1mm']))}, ROI {r['roi_size'][0]}", "")]
    for name, run in (("1 rank", r["one"]), (f"{n} ranks", r["many"])):
        rows.append((f"{name}: round, crops/s, validation and preprocessing s a case",
                     f"{run['wall_s']:.1f} s, {run['crops_per_s']:.2f}, {run['validate_s_per_case']:.2f}, "
                     f"{run['load_s_per_case']:.2f}", ""))
    rows += [(f"{n} ranks against 1: crops/s", f"{q['crops_per_s']:.2f}x", target),
             (f"{n} ranks against 1: validation", f"{q['validate_s_per_case']:.2f}x", target),
             (f"{n} ranks against 1: preprocessing, round",
              f"{q['load_s_per_case']:.2f}x, {q['round_wall_s']:.2f}x", ""),
             ("ranks ready after the launch; same weights", f"{(r['many']['ranks'] or {}).get('start_s')} s; "
              f"{(r['many']['ranks'] or {}).get('same_weights')}", "")]
    if w := r.get("ratio_to_one_process_all_threads"):
        whole = r["one_all_threads"]
        rows += [(f"1 process, {r['cores']} threads: round, crops/s, validation s a case",
                  f"{whole['wall_s']:.1f} s, {whole['crops_per_s']:.2f}, {whole['validate_s_per_case']:.2f}", ""),
                 (f"{n} ranks against it: crops/s, validation, round",
                  f"{w['crops_per_s']:.2f}x, {w['validate_s_per_case']:.2f}x, {w['round_wall_s']:.2f}x", "")]
    _report(args, "ddp", f"gcml bench --ddp {n}: one round on 1 and {n} ranks", rows, "ddp.json, ddp.png")
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from gcml_app.sim.soak import soak_bench

    r = soak_bench(args.out, minutes=args.soak, clients=args.clients, quick=args.quick, interactive=args.interactive)
    c, t = r["checks"], r["targets"]
    seg, idle = r["latency"].get("gcml_seg", {}), r["idle_seg"]
    fds, rss = r.get("server_fds") or {}, r.get("server_rss_mb") or {}
    growth = r.get("rss_growth_last_half")
    rows: list[Row] = [
        ("load", f"{r['clients']} clients for {r['minutes']:g} min", ""),
        ("label saves (cases)", f"{c['label_saves']} ({c['labels_saved']})", ""),
        ("labels lost, corrupt files; the datastore JSON", f"{c['labels_lost']}, {c['corrupt_files']}; "
         f"{'valid' if c.get('datastore_json_valid') else 'INVALID'}", "0, 0; valid"),
        ("rounds on record; without a reason", ", ".join(f"{k} {v}" for k, v in c["rounds_by_outcome"].items())
         + f"; {c['rounds_without_reason']}", "0 without"),
        ("served model", f"v{c['served_version']}, {'verifies' if c.get('served_verifies') else 'DOES NOT verify'}",
         "verifies"),
        ("partner restart, half-way", f"down {(r.get('partner_restart') or {}).get('down_s')} s", ""),
        ("`gcml_seg` p50 / p95 under load", f"{_ms(seg.get('p50_s') or 0)} / {_ms(seg.get('p95_s') or 0)}", ""),
        ("`gcml_seg` p50 / p95 idle (back to back)", f"{_ms(idle.get('p50_s') or 0)} / {_ms(idle['p95_s'])} "
         f"({_ms(r['idle_seg_back_to_back'].get('p50_s') or 0)} / {_ms(r['idle_seg_back_to_back']['p95_s'])})", ""),
        ("`gcml_seg` p95 under load against idle", f"{r['seg_p95_ratio']}x", f"<= {t['seg_p95_ratio']}x"),
    ]
    if r.get("interactive"):
        edit, idle_edit = r["latency"].get("gcml_edit", {}), r["idle_edit"]
        rows += [
            ("`gcml_edit` clicks under load, p50 / p95", f"{edit.get('n', 0)} clicks, {_ms(edit.get('p50_s') or 0)} / "
             f"{_ms(edit.get('p95_s') or 0)}", ""),
            ("`gcml_edit` click p50 / p95 idle", f"{_ms(idle_edit.get('p50_s') or 0)} / {_ms(idle_edit['p95_s'])}", ""),
            ("`gcml_edit` p95 under load against idle",
             f"{r['edit_p95_ratio']}x" if r.get("edit_p95_ratio") is not None else "no click answered",
             f"<= {t['edit_p95_ratio']}x"),
        ]
    rows += [
        ("server RSS over the last half", (f"{rss.get('half')} -> {rss.get('end')} MB: " if rss else "")
         + (f"{growth:+.2%}" if growth is not None else "not measured"), f"<= {t['rss_growth_last_half']:.0%}"),
        ("server open descriptors: start, half-way, end (max)",
         f"{fds.get('start')}, {fds.get('half')}, {fds.get('end')} ({fds.get('max')})", "no growth"),
        ("warm trainer RSS: start, end", f"{(r.get('warm_rss_mb') or {}).get('start')}, "
         f"{(r.get('warm_rss_mb') or {}).get('end')} MB", ""),
        ("`gcml status` / `gcml sync` from a shell, p50", " / ".join(
            _ms(r["latency"].get(k, {}).get("p50_s") or 0) for k in ("gcml status", "gcml sync")), ""),
        ("errors", f"{r['errors'] or 'none'}", ""),
    ]
    _report(args, "soak", f"gcml bench --soak {r['minutes']:g}: a working day's load", rows,
            "soak.json, soak.png, soak_calls.csv")
    met = (c["labels_lost"] == 0 and c["corrupt_files"] == 0 and c["rounds_without_reason"] == 0
           and (r["seg_p95_ratio"] or 0) <= t["seg_p95_ratio"]
           and (not r.get("interactive")  # an interactive soak whose clicks all failed has no ratio: missed
                or (r.get("edit_p95_ratio") is not None and r["edit_p95_ratio"] <= t["edit_p95_ratio"]))
           and (r.get("rss_growth_last_half") or 0) <= t["rss_growth_last_half"])
    return 0 if met else 2


def _bench_default(args: argparse.Namespace) -> int:
    from gcml_app.sim.bench import bench

    r = bench(args.out, quick=args.quick)
    g, inf, st = r["gossip_round"], r["infer"], r["dcml_step"]
    bg, sc = r["infer_under_training"], r["infer_under_scoring"]
    rows: list[Row] = [("`gcml_seg` against stock `BasicInferTask` (median ratio)", f"{inf['ratio_median']:.3f}x",
                        "<= 1.05x")]
    rows += [(f"DCML step against a supervised step, {k}", f"{v['ratio']:.2f}x", "<= 2.1x") for k, v in st.items()]
    rows += [("`gcml_seg` p95 during a whole round against idle",
              f"{bg['p95_ratio']:.2f}x ({bg['training']['n']} requests; start-up {bg['p95_ratio_startup'] or 0:.2f}x, "
              f"epochs {bg['p95_ratio_epochs']:.2f}x)", "<= 1.5x"),
             ("`gcml_seg` p95 while every unlabelled image is scored, against idle",
              f"{sc['p95_ratio']:.2f}x ({sc['scoring']['n']} requests; " + ", ".join(
                  f"{m} {x['scored']} images in {x['seconds'] or 0:.1f} s" for m, x in sc["runs"].items()) + ")",
              "<= 1.5x"),
             ("a gossip round", f"{g['wall_s']:.1f} s: fetch {g['fetch_s']:.3f}, verify {g['verify_s']:.3f}, "
              f"train {g.get('train_s', 0):.1f}, validate {g.get('validate_s', 0):.1f}, "
              f"publish {g.get('publish_s', 0):.3f} s", ""),
             ("the round's peak RSS by phase", ", ".join(f"{k} {v:.0f}" for k, v in
                                                         (g.get("peak_rss_by_phase_mb") or {}).items()) + " MB", ""),
             ("round overhead before its first step", f"{g['overhead_s']:.2f} s ({g['start']} start "
              f"{g['startup_s'] or 0:.2f} s)", f"<= {g['target_overhead_s']:g} s")]
    if wt := g.get("warm_trainer_mb"):
        rows.append(("the idle warm trainer", f"{wt['rss']:.0f} MB RSS, {wt['uss']:.0f} MB its own (USS)", ""))
    rows.append(("payload, float32 / float16",
                 f"{r['payload']['float32'] / 1e3:.1f} / {r['payload']['float16'] / 1e3:.1f} kB", ""))
    pacs = r["pacs"]
    rows.append(("a PACS site's cache (Orthanc)", f"not measured: {pacs['skipped']}" if "skipped" in pacs else
                 f"first fill {pacs['first_fill_s']:.2f} s for {pacs['first_fill_cases']} labelled series with "
                 f"their SEG ({pacs['first_fill_s_per_case']:.3f} s each); an uncached series "
                 f"{pacs['uncached_series_s']:.2f} s, "
                 f"a cached one {pacs['cached_series_ms']:.1f} ms", ""))
    _report(args, "bench", "gcml bench: inference, the DCML step, a round and its costs", rows, "bench.json, bench.png")
    return 0


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
    return _bench_default(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``gcml`` subcommands of this module."""
    s = sub.add_parser("bench", help="latency, step cost, round split, payload and memory -> bench.json, bench.md")
    s.add_argument("--out", default="gcml-bench")
    s.add_argument("--quick", action="store_true", help="tiny budgets (seconds, for tests); ratios are noisier")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--scale", action="store_true", help="round memory and time against N on realistic-size "
                      "volumes -> scale.json, scale.png, scale.md")
    mode.add_argument("--clicks", action="store_true", help="a click's latency (gcml_edit) against a full gcml_seg "
                      "of the same 192x192x160 volume -> clicks.json, clicks.md")
    mode.add_argument("--gpu", action="store_true", help="the GPU check (AMP DCML step, a round on 8 realistic "
                      "volumes, inference) -> gpu_check.json, gpu_check.md; on a CPU at reduced sizes")
    mode.add_argument("--ddp", type=int, default=0, metavar="N", help="one round on 1 and on N ranks "
                      "(train.gpus; CPU processes with gloo where there are fewer GPUs) on realistic-size volumes: "
                      "crops/s, validation s/case, round wall time and their ratios -> ddp.json, ddp.png, ddp.md")
    mode.add_argument("--soak", type=float, default=0, metavar="MINUTES", help="a working day compressed: clients, "
                      "rounds, gossip, scoring, the CLI and a partner restart at once, then nothing-lost checks "
                      "-> soak.json, soak.png, soak_calls.csv, soak.md")
    s.add_argument("--clients", type=int, default=4, help="--soak: concurrent Slicer-like clients")
    s.add_argument("--interactive", action="store_true",
                   help="--soak: the site serves gcml_edit too, and each client clicks 1-3 times on a case before "
                        "saving it (its partner stays without clicks)")
    s.set_defaults(func=_bench)
