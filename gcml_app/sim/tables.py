"""Markdown tables of a ``gcml simulate`` run, headed by what reproduces them: the command, the commit, the date
and the settings. ``gcml simulate`` writes them to ``results.md``; the docs include that file as written.

    python -m gcml_app.sim.tables OUT [--command "gcml simulate ..."] [--commit C] [--date D] [--off DIR ...]
                                      [--patience P]

rebuilds ``OUT/results.md`` from ``OUT/results.json`` (a run from before the file existed); with ``--off``, an
``--interactive`` run's zero-click Dice is compared with runs without it; with ``--patience``, an
``--until-plateau`` run's plateau is read again at patience ``P`` from its rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

from scipy import stats

from gcml_app.sim.report import summarize_plateau

__all__ = ["arms_markdown", "bench_markdown", "clicks_markdown", "on_off_markdown", "provenance", "results_markdown",
           "worse_by_chance", "worse_by_one_std"]


def provenance(argv: list[str]) -> dict[str, str]:
    """The command (``gcml`` and ``argv``), the checkout's commit (``+changes`` when tracked files differ from
    it; ``unknown`` outside a git checkout) and today's date (UTC)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=7", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    return {"command": "gcml " + shlex.join(argv), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}


def _pm(x: dict[str, float]) -> str:
    return f"{x['mean']:.3f} ± {x['std']:.3f}"


def results_markdown(res: dict[str, Any], prov: dict[str, str]) -> str:
    """The fixed-budget table (test Dice per site, mean ± std over seeds), each method against ``local2x`` and
    ``local`` per site (mean paired difference in Dice points, seeds won), and with ``--until-plateau`` the
    plateau table and each method's plateau against the best plateau alone; under a header naming the command,
    commit, date and settings."""
    c, summary = res["config"], res["summary"]
    names = c["sites"]
    lines = [
        f"#### {c['scenario']}: served test Dice after round {c['rounds']}",
        "",
        f"`{prov['command']}` at commit `{prov['commit']}`, {prov['date']}: {len(names)} sites, {c['seeds']} seeds, "
        f"{c['epochs']} epochs a round after a {c['warmup_epochs']}-epoch warm-up, "
        f"gate {'on' if c['gate'] else 'off'}, "
        f"init {c.get('init', 'random')}.",
        "",
        "| method | " + " | ".join(names) + " | mean | compute |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for m, row in summary.items():
        compute = row["cost"].get("vs_local")
        lines.append(f"| {m} | " + " | ".join(_pm(row["per_site"][n]) for n in names)
                     + f" | {_pm(row)} | {f'{compute:.2f}x' if compute is not None else ''} |")
    for rival, what in (("local2x", "the same compute alone"), ("local", "the site alone")):
        if rival not in summary:
            continue
        lines += ["", f"Against `{rival}` ({what}): mean paired difference in Dice points, seeds won.", "",
                  "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for m, row in summary.items():
            if m != rival:
                cells = [row["per_site"][n][f"vs_{rival}"] for n in names]
                lines.append(f"| {m} | " + " | ".join(f"{100 * x['mean']:+.1f} ({x['wins']}/{x['n']})" for x in cells)
                             + " |")
    lines += arms_markdown(res.get("rows", []))
    if "plateau" in res:
        p = res["plateau"]
        lines += ["", f"At the plateau (validation Dice up by at most {p['tolerance']:g} for {p['patience']} rounds; "
                  f"at most {c['rounds']} rounds; * some seeds still rising at the last round): test Dice there.", "",
                  "| method | rounds | " + " | ".join(names) + " | mean |", "|---|---|" + "---|" * (len(names) + 1)]
        for m in c["methods"]:
            x = p[m]
            rounds = f"{sum(x['rounds']) / len(x['rounds']):.1f}" + ("" if x["plateau_reached"] == x["seeds"] else "*")
            cells = " | ".join(_pm(x["sites"][n]) for n in names)
            lines.append(f"| {m} | {rounds} | {cells} | {x['mean']:.3f} |")
        alone = [m for m in ("local", "local2x") if m in p]
        others = [m for m in c["methods"] if m not in ("local", "local2x")]
        if alone and others:
            best = {n: max(p[m]["sites"][n]["mean"] for m in alone) for n in names}
            both = " and ".join(alone)
            lines += ["", f"At the plateau against the best the site reaches alone (the higher of {both} "
                      "at each site), Dice points.", "", "| method | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)]
            for m in others:
                lines.append(f"| {m} | " + " | ".join(f"{100 * (p[m]['sites'][n]['mean'] - best[n]):+.1f}"
                                                      for n in names) + " |")
    if "clicks" in res:
        lines += clicks_markdown(res["clicks"], names)
    return "\n".join(lines) + "\n"


ARMS = ("mutual", "teacher", "alone")  # gcml_app.rounds.producers.ARMS, not imported: the tables need no torch


def arms_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """``dcml.choose``: per method, the rounds each arm was chosen (all sites, seeds and rounds) and the share of
    them whose candidate the gate published; nothing when no method chose (``rows`` without ``arm``)."""
    chosen: dict[str, dict[str, list[bool]]] = {}
    for r in rows:
        if r.get("arm"):
            chosen.setdefault(r["method"], {}).setdefault(r["arm"], []).append(bool(r["published"]))
    if not chosen:
        return []
    lines = ["", "How the choice used the partner's model (`dcml.choose`): rounds per arm over all sites and seeds, "
             "and the share of them the gate published.", "", "| method | " + " | ".join(ARMS) + " |",
             "|---|" + "---|" * len(ARMS)]
    for m, arms in chosen.items():
        cells = [f"{len(p)} ({100 * sum(p) / len(p):.0f}%)" if (p := arms.get(a)) else "0" for a in ARMS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def clicks_markdown(clicks: dict[str, Any], names: list[str]) -> list[str]:
    """``--interactive``: each method's test Dice after k simulated clicks per site (mean ± std over seeds) with
    NoC@90, and each method against ``local2x`` after 3 clicks (mean paired difference in points, seeds won).

    Args:
        clicks: ``results.json``'s ``clicks`` (:func:`~gcml_app.sim.report.summarize_clicks`).
    """
    first = clicks[next(iter(clicks))][names[0]]
    ks = sorted((int(k.split("_")[1]) for k in first if k.startswith("clicks_")))
    lines = ["", "Test Dice after k simulated clicks (mean ± std over seeds); NoC@90: mean clicks to a Dice of 0.90, "
             "capped at 20.", "", "| method | site | " + " | ".join(str(k) for k in ks) + " | NoC@90 |",
             "|---|---|" + "---|" * (len(ks) + 1)]
    for m, per in clicks.items():
        for n in names:
            v = per[n]
            lines.append(f"| {m} | {n} | " + " | ".join(f"{v[f'clicks_{k}'][0]:.3f} ± {v[f'clicks_{k}'][1]:.3f}"
                                                     for k in ks) + f" | {v['noc90'][0]:.1f} |")
    rivals = [m for m in clicks if "vs_local2x_clicks_3" in clicks[m][names[0]]]
    if rivals:
        lines += ["", "After 3 clicks against `local2x`: mean paired difference in Dice points, seeds won.", "",
                  "| method | " + " | ".join(names) + " | sites at or above |", "|---|" + "---|" * (len(names) + 1)]
        for m in rivals:
            d = [clicks[m][n]["vs_local2x_clicks_3"] for n in names]
            lines.append(f"| {m} | " + " | ".join(f"{100 * x['mean']:+.1f} ({x['wins']}/{x['n']})" for x in d)
                         + f" | {sum(x['mean'] >= 0 for x in d)} of {len(d)} |")
    return lines


def on_off_markdown(on: dict[str, Any], offs: list[tuple[dict[str, Any], str]]) -> str:
    """Zero-click served test Dice with interaction on (``on``, a ``--interactive`` run) against off (runs without
    it on the same scenario, seeds and budget): per method and site, the difference in points and its size in
    pooled seed-stds, ``|on - off| / sqrt((std_on² + std_off²) / 2)``; under it, per method, how often as many
    sites would be worse by more than one of them if interaction changed nothing (:func:`worse_by_chance`).

    Args:
        offs: ``(results, label)`` of each run without ``--interactive``; a method is taken from the first run that
            has it, and the label (its commit) is named beside it.
    """
    names, rounds, chances = on["config"]["sites"], on["config"]["rounds"], []
    lines = [f"Zero-click served test Dice after round {rounds}, interaction on − off: Dice points "
             "(|difference| / pooled seed-std).", "", "| method | off run | " + " | ".join(names) + " | mean |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for m, row in on["summary"].items():
        off = next(((r, lab) for r, lab in offs if m in r["summary"]), None)
        if off is None:
            continue
        if off[0]["config"]["rounds"] != rounds or off[0]["config"]["seeds"] != on["config"]["seeds"]:
            raise ValueError(f"{off[1]}: {off[0]['config']['rounds']} rounds, {off[0]['config']['seeds']} seeds; "
                             f"expected the interactive run's {rounds} and {on['config']['seeds']}")
        cells, worse = [], 0
        for n in names:
            a, b = row["per_site"][n], off[0]["summary"][m]["per_site"][n]
            pooled = ((a["std"] ** 2 + b["std"] ** 2) / 2) ** 0.5
            gap = abs(a["mean"] - b["mean"])
            size = gap / pooled if pooled else (float("inf") if gap else 0.0)  # no spread: any gap is "infinite"
            cells.append(f"{100 * (a['mean'] - b['mean']):+.1f} ({size:.2f})")
            worse += a["mean"] < b["mean"] and size > 1
        mean = 100 * (row["mean"] - off[0]["summary"][m]["mean"])
        lines.append(f"| {m} | {off[1]} | " + " | ".join(cells) + f" | {mean:+.1f} |")
        chances.append((m, worse, len(names)))
    seeds = on["config"]["seeds"]
    if chances and seeds > 1:
        p = worse_by_one_std(seeds)
        lines.append("")
        lines += [f"{m}: worse by more than one pooled seed-std at {k} of {n} sites" + (
            f"; with no effect at all, {k} or more happen by chance with probability "
            f"{worse_by_chance(k, n, seeds):.2f} (each site: {p:.3f}, {seeds} seeds a side)." if k else ".")
            for m, k, n in chances]
    return "\n".join(lines) + "\n"


def worse_by_one_std(seeds: int) -> float:
    """The chance that a site's mean over ``seeds`` seeds with one setting falls more than one pooled seed-std
    below its mean with another, when the setting has no effect (both normal with one variance).

    The difference of the two means over its standard error, ``t = d / (s * sqrt(2 / seeds))``, has Student's t
    distribution with ``2 seeds - 2`` degrees of freedom, so ``d < -s`` is ``t < -sqrt(seeds / 2)``: 0.144 at
    3 seeds. "Within one seed-std at every site" is a coin that a method with no effect loses often: at 16 sites
    and 3 seeds, all 16 are within (either side) with probability 0.004.
    """
    return float(stats.t.cdf(-(seeds / 2) ** 0.5, 2 * seeds - 2))


def worse_by_chance(k: int, sites: int, seeds: int) -> float:
    """The chance of ``k`` or more of ``sites`` independent sites each being worse by more than one pooled
    seed-std when the setting has no effect (:func:`worse_by_one_std`; binomial)."""
    return float(stats.binom.sf(k - 1, sites, worse_by_one_std(seeds)))


def bench_markdown(title: str, rows: list[tuple[str, str, str]], prov: dict[str, str]) -> str:
    """A ``gcml bench`` mode's measures as a table (measure, result, target) under ``title`` and the command,
    commit and date (:func:`provenance`)."""
    lines = [f"#### {title}", "", f"`{prov['command']}` at commit `{prov['commit']}`, {prov['date']}.", "",
             "| measure | result | target |", "|---|---|---|"]
    lines += [f"| {what} | {result} | {target} |" for what, result, target in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gcml_app.sim.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="a gcml simulate --out folder (its results.json)")
    ap.add_argument("--command", help="the command that made it (default: unknown)")
    ap.add_argument("--commit", help="the commit it ran at (default: this checkout's)")
    ap.add_argument("--date", help="the day it ran (default: results.json's modification day)")
    ap.add_argument("--off", type=Path, action="append", default=[], metavar="DIR",
                    help="an --interactive run's zero-click Dice against this run without --interactive (same "
                         "scenario, seeds and rounds); repeat: a method is taken from the first run that has it")
    ap.add_argument("--patience", type=int, metavar="P",
                    help="read an --until-plateau run's plateau again at another patience (rounds without a gain), "
                         "from its rows: later rounds do not change earlier ones")
    args = ap.parse_args(argv)

    def load(d: Path) -> dict[str, Any]:
        try:
            return json.loads((d / "results.json").read_text())
        except (OSError, ValueError) as e:
            ap.error(f"{d}: no readable results.json ({type(e).__name__}: {e}); expected a gcml simulate --out folder")

    res = load(args.out)
    had = res.get("provenance", {})
    day = datetime.datetime.fromtimestamp((args.out / "results.json").stat().st_mtime, datetime.timezone.utc)
    prov = {"command": args.command or had.get("command", "unknown"),
            "commit": args.commit or had.get("commit") or provenance([])["commit"],
            "date": args.date or had.get("date") or day.date().isoformat()}
    if args.patience is not None:
        if "plateau" not in res or args.patience < 1:
            ap.error(f"--patience {args.patience}: expected a run of gcml simulate --until-plateau and a patience >= 1")
        c = res["config"]
        res["plateau"] = summarize_plateau(res["rows"], c["methods"], c["sites"], res["plateau"]["tolerance"],
                                           args.patience)
    text = results_markdown(res, prov)
    if args.off:
        offs = []
        for d in args.off:
            r = load(d)
            offs.append((r, f"`{r.get('provenance', {}).get('commit', d.name)}`"))
        try:
            text += "\n" + on_off_markdown(res, offs)
        except (KeyError, ValueError) as e:
            ap.error(f"--off: {e}" if isinstance(e, ValueError) else f"--off: the runs differ: no {e} in one of them")
    (args.out / "results.md").write_text(text)
    print(f"wrote {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
