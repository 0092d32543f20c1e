"""The comparison's summary and plots: final test Dice per site and method, paired differences, PNGs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["plateau_round", "plot", "plot_clicks", "summarize_clicks", "summarize_plateau", "summarize_rows"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


PAIRED = ("local", "local2x")
"""The rivals every method is compared with per site, seed by seed: the site alone, and the site alone with
the compute of two models (what DCML spends)."""


def _paired(final: dict, m: str, rival: str, n: str, seeds: list[int]) -> dict[str, Any]:
    d = [final[(m, n, s)] - final[(rival, n, s)] for s in seeds]
    dm, ds = _mean_std(d)
    return {"mean": round(dm, 4), "std": round(ds, 4), "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d),
            "n": len(d)}


def summarize_rows(rows: list[dict], methods: list[str], names: list[str], rounds: int) -> dict[str, Any]:
    """Per method: final test Dice per site (mean, std over seeds), the site mean, bytes, the training cost,
    and the paired difference to ``local`` and to ``local2x`` per site (mean, std, seeds won).

    The cost is what a site's rounds 1..``rounds`` trained, per seed: optimizer steps and crop passes (a
    crop through one model forward and backward), mean over sites, and as a multiple of ``local``'s (of half
    ``local2x``'s in a run without ``local``)."""
    final = {(r["method"], r["site"], r["seed"]): r["test_mean"] for r in rows if r["round"] == rounds}
    seeds = sorted({r["seed"] for r in rows})
    out = {}
    for m in methods:
        per_site = {}
        for n in names:
            xs = [final[(m, n, s)] for s in seeds]
            mu, sd = _mean_std(xs)
            per_site[n] = {"mean": round(mu, 4), "std": round(sd, 4), "values": xs}
            for rival in PAIRED:
                if rival in methods:
                    per_site[n][f"vs_{rival}"] = _paired(final, m, rival, n, seeds)
        site_means = [statistics.fmean(final[(m, n, s)] for n in names) for s in seeds]
        mu, sd = _mean_std(site_means)
        moved = [sum(r["bytes_received"] for r in rows if r["method"] == m and r["seed"] == s and r["round"] > 0)
                 for s in seeds]
        pub = [r["published"] for r in rows if r["method"] == m and r["round"] > 0]
        out[m] = {"mean": round(mu, 4), "std": round(sd, 4), "worst_site": min(names, key=lambda n: per_site[n]["mean"]),
                  "per_site": per_site, "bytes_received_per_seed": round(statistics.fmean(moved)),
                  "published_fraction": round(sum(pub) / max(len(pub), 1), 3), "cost": _cost(rows, m, seeds, names)}
        if "vs_local2x" in per_site[names[0]]:
            d = [statistics.fmean(final[(m, n, s)] - final[("local2x", n, s)] for n in names) for s in seeds]
            out[m]["vs_local2x"] = {"mean": round(statistics.fmean(d), 4), "wins": sum(x > 0 for x in d), "n": len(d),
                                    "sites_at_or_above": sum(per_site[n]["vs_local2x"]["mean"] >= 0 for n in names)}
    # the unit: local's crop passes, or half of local2x's (twice local's epochs over the same crops) without it
    unit = (out["local"]["cost"]["crop_passes"] if "local" in out
            else out["local2x"]["cost"]["crop_passes"] / 2 if "local2x" in out else 0)
    if unit:
        for m in out:
            out[m]["cost"]["vs_local"] = round(out[m]["cost"]["crop_passes"] / unit, 3)
    return out


def _cost(rows: list[dict], m: str, seeds: list[int], names: list[str]) -> dict[str, float]:
    """A site's training over the rounds, per seed (mean over seeds and sites)."""
    mine = [r for r in rows if r["method"] == m and r["round"] > 0]
    per = len(seeds) * len(names)
    return {"train_steps": round(sum(r.get("train_steps", 0) for r in mine) / per, 1),
            "crop_passes": round(sum(r.get("crop_passes", 0) for r in mine) / per, 1)}


def plot(rows, methods, names, rounds, summary, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(m, key="test_mean"):
        return [statistics.fmean(x[key] for x in rows if x["method"] == m and x["round"] == r) for r in range(rounds + 1)]

    palette = plt.get_cmap("tab20").colors  # one colour per method, the same in every panel
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for m in methods:
        style = "-" if m.startswith(("gcml", "gml")) else "--"
        axes[0].plot(range(rounds + 1), curve(m), style, marker="o", ms=3, label=m, color=color[m])
    axes[0].set_title("served model, test Dice (mean over sites and seeds)")
    axes[0].set_xlabel("round (0 = warm-up)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ps = summary[m]["per_site"]
        axes[1].bar([i + j * width for i in range(len(names))], [ps[n]["mean"] for n in names], width,
                    yerr=[ps[n]["std"] for n in names], label=m, capsize=1, color=color[m])
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    axes[1].set_title(f"final test Dice per site (mean +- std over seeds, round {rounds})")
    lo = min(summary[m]["per_site"][n]["mean"] for m in methods for n in names)
    axes[1].set_ylim(max(0.0, lo - 0.1), 1.0)
    axes[1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "dice_vs_round.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        per_round = [statistics.fmean(sum(x["bytes_received"] for x in rows if x["method"] == m and x["round"] == r
                                          and x["seed"] == s) for s in {x["seed"] for x in rows}) for r in range(rounds + 1)]
        xs = [sum(per_round[: r + 1]) / 1e6 for r in range(rounds + 1)]
        ax.plot(xs, curve(m), "o-", ms=3, label=m, color=color[m])
    ax.set_xlabel("MB received by the sites (cumulative; pooled moves data, not models)")
    ax.set_ylabel("mean test Dice")
    ax.set_title("accuracy vs communication")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_bytes.png", dpi=100)
    plt.close(fig)


def summarize_clicks(rows: list[dict], methods: list[str], names: list[str]) -> dict[str, Any]:
    """``gcml simulate --interactive``: per method and site, test Dice after k clicks and NoC (mean, std over seeds),
    and each method's Dice after 3 clicks against ``local2x``'s, paired by seed per site.

    Args:
        rows: one per seed, method and site, with ``clicks_<k>`` and ``noc<t>`` (means over the test cases).
    """
    keys = [k for k in rows[0] if k.startswith(("clicks_", "noc"))]
    at = {(r["method"], r["site"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out: dict[str, Any] = {}
    for m in methods:
        per = {}
        for n in names:
            per[n] = {k: [round(v, 4) for v in _mean_std([at[(m, n, s)][k] for s in seeds])] for k in keys}
            if m != "local2x" and "local2x" in methods:
                per[n]["vs_local2x_clicks_3"] = _paired({(mm, nn, s): at[(mm, nn, s)]["clicks_3"] for (mm, nn, s) in at},
                                                       m, "local2x", n, seeds)
        out[m] = per
    return out


def plot_clicks(summary: dict[str, Any], methods: list[str], names: list[str], out: Path) -> None:
    """``dice_vs_clicks.png``: test Dice against simulated clicks, one panel per site, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k.split("_")[1]) for k in summary[methods[0]][names[0]] if k.startswith("clicks_"))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], names):
        for m in methods:
            mean = [summary[m][n][f"clicks_{k}"][0] for k in ks]
            std = [summary[m][n][f"clicks_{k}"][1] for k in ks]
            ax.errorbar(ks, mean, yerr=std, marker="o", capsize=2, label=m)
        ax.set_title(n)
        ax.set_xlabel("simulated clicks")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test Dice (mean over labels)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_clicks.png", dpi=100)
    plt.close(fig)


def plateau_round(values: list[float], tol: float, patience: int) -> int | None:
    """The round a method stops at: the first ``r`` whose last ``patience`` rounds improved the best value before
    them by no more than ``tol``; ``None`` when it kept improving to the end (``values[r]`` is round ``r``).

    Example:
        >>> plateau_round([0.5, 0.6, 0.65, 0.652, 0.651, 0.7], tol=0.005, patience=2), plateau_round([.1, .2, .3], .005, 2)
        (4, None)
    """
    for r in range(patience, len(values)):
        if max(values[r - patience + 1:r + 1]) <= max(values[:r - patience + 1]) + tol:
            return r
    return None


def summarize_plateau(rows: list[dict], methods: list[str], names: list[str], tol: float,
                      patience: int) -> dict[str, Any]:
    """Per method: the round each seed stopped at (its mean validation Dice over sites no longer rose by more than
    ``tol`` for ``patience`` rounds; the last round when it never stopped) and the served test Dice per site
    there (mean, std over seeds), with how many seeds reached a plateau.

    Stopping a method at that round and reading a longer run at that round give the same figures: later rounds
    do not change earlier ones.
    """
    out: dict[str, Any] = {"tolerance": tol, "patience": patience}
    seeds = sorted({r["seed"] for r in rows})
    for m in methods:
        stops, reached, per_site = [], 0, {n: [] for n in names}
        for s in seeds:
            mine = [r for r in rows if r["method"] == m and r["seed"] == s]
            last = max(r["round"] for r in mine)
            val = [statistics.fmean(r["val_mean"] for r in mine if r["round"] == k) for k in range(last + 1)]
            stop = plateau_round(val, tol, patience)
            reached += stop is not None
            stop = last if stop is None else stop
            stops.append(stop)
            for r in mine:
                if r["round"] == stop:
                    per_site[r["site"]].append(r["test_mean"])
        sites = {n: dict(zip(("mean", "std"), (round(x, 4) for x in _mean_std(v)))) for n, v in per_site.items()}
        out[m] = {"rounds": stops, "plateau_reached": reached, "seeds": len(seeds), "sites": sites,
                  "mean": round(statistics.fmean(v["mean"] for v in sites.values()), 4)}
    return out
