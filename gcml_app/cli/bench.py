"""``gcml bench``: latency, step cost, round split, payload, memory, scale, clicks, GPU, ranks and the soak."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``gcml`` subcommands of this module."""
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
