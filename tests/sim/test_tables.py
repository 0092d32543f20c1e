"""The Markdown tables that docs/results.md includes as written: clicks, interaction on against off, a bench mode."""

import json
import re

import numpy as np
import pytest

from gcml_app.sim import tables
from gcml_app.sim.report import summarize_plateau

PROV = {"command": "gcml bench --clicks --out b", "commit": "abc1234", "date": "2026-12-04"}


def _clicks(d3: float) -> dict:
    """A two-site summary: ``gcml`` is ``d3`` above ``local2x`` after 3 clicks at site a, below at site b."""
    site = {"clicks_0": [0.7, 0.01], "clicks_3": [0.8, 0.02], "noc90": [12.0, 1.0]}
    return {"local2x": {"a": site, "b": site},
            "gcml": {n: {**site, "vs_local2x_clicks_3": {"mean": d, "std": 0.0, "wins": int(d > 0), "ties": 0, "n": 1}}
                     for n, d in (("a", d3), ("b", -0.01))}}


@pytest.mark.parametrize("d3, at_or_above", [(0.02, "1 of 2"), (-0.03, "0 of 2"), (0.0, "1 of 2")])
def test_clicks_table_counts_the_sites_at_or_above_local2x(d3, at_or_above):
    lines = tables.clicks_markdown(_clicks(d3), ["a", "b"])
    assert "| method | site | 0 | 3 | NoC@90 |" in lines
    assert "| local2x | a | 0.700 ± 0.010 | 0.800 ± 0.020 | 12.0 |" in lines
    (row,) = [x for x in lines if x.startswith("| gcml | ") and "of 2" in x]
    assert row == f"| gcml | {100 * d3:+.1f} ({int(d3 > 0)}/1) | -1.0 (0/1) | {at_or_above} |"


def _run(means: dict, stds: dict, rounds: int = 6, seeds: int = 3) -> dict:
    return {"config": {"sites": ["a"], "rounds": rounds, "seeds": seeds},
            "summary": {m: {"mean": means[m], "per_site": {"a": {"mean": means[m], "std": stds[m]}}} for m in means}}


@pytest.mark.parametrize("on, off, std_on, std_off, cell", [
    (0.80, 0.78, 0.03, 0.04, "+2.0 (0.57)"),   # |0.02| / sqrt((0.03² + 0.04²) / 2)
    (0.70, 0.76, 0.02, 0.02, "-6.0 (3.00)"),
    (0.75, 0.75, 0.00, 0.00, "+0.0 (0.00)"),   # no spread and no difference: not 0/0
    (0.76, 0.75, 0.00, 0.00, "+1.0 (inf)"),    # no spread: any difference is "infinitely" many stds
])
def test_on_off_difference_in_points_and_pooled_stds(on, off, std_on, std_off, cell):
    md = tables.on_off_markdown(_run({"gcml": on}, {"gcml": std_on}),
                                [(_run({"gcml": off}, {"gcml": std_off}), "`abc1234`")])
    assert f"| gcml | `abc1234` | {cell} |" in md


@pytest.mark.parametrize("on, off, line", [
    (0.70, 0.76, "at 1 of 1 sites; with no effect at all, 1 or more happen by chance with probability 0.14 "
                 "(each site: 0.144, 3 seeds a side)."),  # 3.00 stds below
    (0.80, 0.78, "at 0 of 1 sites."),  # above
    (0.755, 0.76, "at 0 of 1 sites."),  # below by 0.25 std: within one
])
def test_on_off_says_how_often_chance_alone_is_that_far_below(on, off, line):
    md = tables.on_off_markdown(_run({"gcml": on}, {"gcml": 0.02}), [(_run({"gcml": off}, {"gcml": 0.02}), "`o`")])
    assert md.splitlines()[-1] == "gcml: worse by more than one pooled seed-std " + line


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_the_chance_of_one_std_below_matches_a_simulation_of_no_effect(seeds):
    rng = np.random.default_rng(seeds)
    a, b = rng.normal(size=(2, 200_000, seeds))
    pooled = np.sqrt((a.var(axis=1, ddof=1) + b.var(axis=1, ddof=1)) / 2)
    below = np.mean(a.mean(axis=1) - b.mean(axis=1) < -pooled)
    assert abs(below - tables.worse_by_one_std(seeds)) < 0.004, (below, tables.worse_by_one_std(seeds))
    assert tables.worse_by_chance(1, 1, seeds) == pytest.approx(tables.worse_by_one_std(seeds))
    assert tables.worse_by_chance(0, 16, seeds) == pytest.approx(1.0)


def test_on_off_takes_each_method_from_the_first_run_that_has_it():
    on = _run({"local": 0.7, "gcml": 0.8}, {"local": 0.01, "gcml": 0.01})
    md = tables.on_off_markdown(on, [(_run({"gcml": 0.79}, {"gcml": 0.01}), "`new`"),
                                     (_run({"local": 0.69, "gcml": 0.5}, {"local": 0.01, "gcml": 0.01}), "`old`")])
    assert "| local | `old` | +1.0 (1.00) |" in md and "| gcml | `new` | +1.0 (1.00) |" in md


def test_on_off_refuses_runs_of_another_budget():
    with pytest.raises(ValueError, match=r"`off`: 8 rounds, 3 seeds; expected the interactive run's 6 and 3"):
        tables.on_off_markdown(_run({"gcml": 0.8}, {"gcml": 0.0}), [(_run({"gcml": 0.8}, {"gcml": 0.0}, rounds=8),
                                                                     "`off`")])


def test_bench_table_is_headed_by_what_reproduces_it():
    md = tables.bench_markdown("gcml bench --clicks: a click", [("a click", "0.84 s: 0.141x", "<= 0.25x"),
                                                               ("gcml_seg", "5.93 s", "")], PROV)
    assert md.splitlines()[:3] == ["#### gcml bench --clicks: a click", "",
                                   "`gcml bench --clicks --out b` at commit `abc1234`, 2026-12-04."]
    assert "| a click | 0.84 s: 0.141x | <= 0.25x |" in md and md.endswith("| gcml_seg | 5.93 s |  |\n")


def test_tables_cli_adds_the_on_off_table(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    for d, run in ((on, _run({"gcml": 0.8}, {"gcml": 0.02})), (off, _run({"gcml": 0.75}, {"gcml": 0.02}))):
        d.mkdir()
        run["config"].update(scenario="s", methods=["gcml"], epochs=4, warmup_epochs=20, gate=True)
        run["summary"]["gcml"].update(std=0.02, cost={})
        run["provenance"] = {"command": "gcml simulate", "commit": d.name + "1234", "date": "2026-12-04"}
        (d / "results.json").write_text(json.dumps(run))
    assert tables.main([str(on), "--off", str(off)]) == 0
    md = (on / "results.md").read_text()
    assert re.search(r"\| gcml \| `off1234` \| \+5\.0 \(2\.50\) \| \+5\.0 \|", md), md


@pytest.mark.parametrize("off, message", [
    ("missing", r"missing: no readable results.json \(FileNotFoundError"),
    ("broken", r"broken: no readable results.json \(JSONDecodeError"),
    ("longer", r"--off: `longer1234`: 8 rounds, 3 seeds; expected the interactive run's 6 and 3"),
])
def test_tables_cli_names_a_bad_run_without_a_traceback(tmp_path, capsys, off, message):
    on = tmp_path / "on"
    on.mkdir()
    run = _run({"gcml": 0.8}, {"gcml": 0.02})
    run["config"].update(scenario="s", methods=["gcml"], epochs=4, warmup_epochs=20, gate=True)
    run["summary"]["gcml"].update(std=0.02, cost={})
    (on / "results.json").write_text(json.dumps(run))
    if off == "broken":
        (tmp_path / off).mkdir()
        (tmp_path / off / "results.json").write_text("{not json")
    elif off == "longer":
        (tmp_path / off).mkdir()
        longer = _run({"gcml": 0.7}, {"gcml": 0.02}, rounds=8)
        longer["provenance"] = {"commit": "longer1234"}
        (tmp_path / off / "results.json").write_text(json.dumps(longer))
    with pytest.raises(SystemExit) as exit_:
        tables.main([str(on), "--off", str(tmp_path / off)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert not (on / "results.md").exists()  # nothing half-written


SOAK = {"minutes": 20.0, "clients": 4, "checks": {"labels_saved": 60, "label_saves": 446, "labels_lost": 0,
                                                   "corrupt_files": 0, "rounds_by_outcome": {"publish": 14, "keep": 87},
                                                   "rounds_without_reason": 0, "served_version": 14,
                                                   "served_verifies": True, "datastore_json_valid": True},
        "latency": {"gcml_seg": {"n": 446, "p50_s": 0.0535, "p95_s": 0.0733}},
        "idle_seg": {"n": 30, "p50_s": 0.0541, "p95_s": 0.0744},
        "idle_seg_back_to_back": {"p50_s": 0.05, "p95_s": 0.06},
        "seg_p95_ratio": 0.986, "targets": {"seg_p95_ratio": 2.0, "rss_growth_last_half": 0.05},
        "rss_growth_last_half": 0.0011, "server_fds": {"start": 12, "half": 13, "end": 13}, "errors": {}}
SOAK_CLICKS = {**SOAK, "interactive": True, "targets": {**SOAK["targets"], "edit_p95_ratio": 2.0},
               "latency": {**SOAK["latency"], "gcml_edit": {"n": 120, "p50_s": 0.061, "p95_s": 0.094}},
               "idle_edit": {"n": 30, "p50_s": 0.058, "p95_s": 0.071}, "edit_p95_ratio": 1.324}
CLICKS = {"device": "cpu", "train_clicks": {"batch": [2, 96, 96, 96], "train_clicks": 1, "simulate_s": 0.81,
                                           "step_s": 2.4, "ratio": 0.34},
          "shape_xyz_1mm": [192, 192, 160], "roi_size": [96] * 3, "target_ratio": 0.25,
          "median_s": {"gcml_seg": 5.93, "first_click_after_gcml_seg": 1.13, "click_1": 0.84, "click_5": 1.7,
                       "click_in_session": 0.9,
                       "first_click_uncached": 6.39},
          "ratio_to_gcml_seg": {"first_click_after_gcml_seg": 0.191, "click_1": 0.141, "click_5": 0.286,
                                "click_in_session": 0.152,
                                "first_click_uncached": 1.078},
          "stages_s": {"gcml_seg": {"pre": 0.29, "infer": 0.031, "invert": 0.0, "post": 0.052, "write": 0.37}}}


@pytest.mark.parametrize("argv, module, fn, result, rc, row", [
    (["--soak", "20"], "gcml_app.sim.soak", "soak_bench", SOAK, 0,
     "| `gcml_seg` p95 under load against idle | 0.986x | <= 2.0x |"),
    (["--soak", "20"], "gcml_app.sim.soak", "soak_bench", {**SOAK, "seg_p95_ratio": 2.5}, 2,  # a target missed: exit 2
     "| `gcml_seg` p95 under load against idle | 2.5x | <= 2.0x |"),
    (["--soak", "20", "--interactive"], "gcml_app.sim.soak", "soak_bench", SOAK_CLICKS, 0,
     "| `gcml_edit` clicks under load, p50 / p95 | 120 clicks, 61.0 ms / 94.0 ms |  |"),
    (["--soak", "20", "--interactive"], "gcml_app.sim.soak", "soak_bench", {**SOAK_CLICKS, "edit_p95_ratio": 2.4}, 2,
     "| `gcml_edit` p95 under load against idle | 2.4x | <= 2.0x |"),
    (["--soak", "20", "--interactive"], "gcml_app.sim.soak", "soak_bench", {**SOAK_CLICKS, "edit_p95_ratio": None}, 2,
     "| `gcml_edit` p95 under load against idle | no click answered | <= 2.0x |"),  # no click answered: missed
    (["--clicks"], "gcml_app.sim.clickbench", "click_bench", CLICKS, 0,
     "| `gcml_seg`, the whole 192x192x160 volume (ROI 96), on cpu | 5.93 s |  |"),
    (["--clicks"], "gcml_app.sim.clickbench", "click_bench", CLICKS, 0,
     "| a click in a new place after that | 0.84 s: 0.141x a full `gcml_seg` | <= 0.25x |"),
    (["--clicks"], "gcml_app.sim.clickbench", "click_bench", CLICKS, 0,
     "| clicks drawn for a training batch of 2 crops of 96³, each clicked (seeds, 1 round on the model's errors), "
     "against a training step on it | 0.81 s against 2.40 s: 0.3x |  |"),
    (["--clicks"], "gcml_app.sim.clickbench", "click_bench", CLICKS, 0,
     "| each click of five in three places (all sent each time) | 0.90 s: 0.152x a full `gcml_seg` | <= 0.25x |"),
    (["--clicks"], "gcml_app.sim.clickbench", "click_bench", CLICKS, 0,
     "| where `gcml_seg`'s time goes, s (MONAI Label's stages) | pre 0.290, infer 0.031, invert 0.000, post 0.052, "
     "write 0.370 |  |"),
])
def test_a_bench_mode_prints_its_rows_and_writes_them_as_markdown(tmp_path, monkeypatch, capsys, argv, module, fn,
                                                                 result, rc, row):
    """The formatting of one mode against its result's shape (the measurement itself is a slow test of its own)."""
    import importlib

    from gcml_app.cli import main

    monkeypatch.setattr(importlib.import_module(module), fn, lambda *a, **k: result)
    assert main(["bench", *argv, "--out", str(tmp_path)]) == rc
    name = "soak" if "--soak" in argv else "clicks"
    md = (tmp_path / f"{name}.md").read_text()
    assert row in md and f"`gcml bench {' '.join(argv)} --out {tmp_path}` at commit" in md
    what, result_cell, target = (c.strip() for c in row.strip("|").split("|"))
    assert f"{what}: {result_cell}" + (f" (target {target})" if target else "") in capsys.readouterr().out


def _plateau_run(val: list[float], test: list[float]) -> dict:
    """One seed, one site, methods ``local`` and ``gcml`` with the same curves, run with ``--until-plateau 2``."""
    rows = [{"seed": 0, "method": m, "round": k, "site": "a", "val_mean": v, "test_mean": t}
            for m in ("local", "gcml") for k, (v, t) in enumerate(zip(val, test))]
    run = _run({"local": test[-1], "gcml": test[-1]}, {"local": 0.0, "gcml": 0.0}, rounds=len(val) - 1, seeds=1)
    run["config"].update(scenario="s", methods=["local", "gcml"], epochs=4, warmup_epochs=20, gate=True)
    for m in ("local", "gcml"):
        run["summary"][m].update(std=0.0, cost={})
    run["summary"]["gcml"]["per_site"]["a"]["vs_local"] = {"mean": 0.0, "wins": 0, "n": 1}
    run.update(rows=rows, provenance={"command": "gcml simulate", "commit": "abc1234", "date": "2026-12-04"})
    run["plateau"] = summarize_plateau(rows, ["local", "gcml"], ["a"], 0.005, 2)
    return run


@pytest.mark.parametrize("patience, stop, test", [
    (None, 4, "0.740"),  # as run: two rounds without a gain (the gate kept the served model) stop it at 4
    (2, 4, "0.740"),
    (3, 8, "0.810"),     # three: the gain at round 5 counts; it stops after three more flat rounds (6-8)
])
def test_tables_cli_reads_the_plateau_again_at_another_patience(tmp_path, patience, stop, test):
    val = [0.60, 0.70, 0.75, 0.75, 0.75, 0.80, 0.80, 0.80, 0.80]
    tests = [0.60, 0.70, 0.74, 0.74, 0.74, 0.81, 0.81, 0.81, 0.81]
    (tmp_path / "results.json").write_text(json.dumps(_plateau_run(val, tests)))
    assert tables.main([str(tmp_path)] + (["--patience", str(patience)] if patience else [])) == 0
    md = (tmp_path / "results.md").read_text()
    assert f"up by at most 0.005 for {patience or 2} rounds" in md
    assert f"| gcml | {stop}.0 | {test} ± 0.000 | {test} |" in md, md


def test_tables_cli_refuses_a_patience_for_a_run_without_a_plateau(tmp_path, capsys):
    run = _plateau_run([0.6, 0.7, 0.7], [0.6, 0.7, 0.7])
    del run["plateau"]
    (tmp_path / "results.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit):
        tables.main([str(tmp_path), "--patience", "3"])
    assert "expected a run of gcml simulate --until-plateau" in capsys.readouterr().err
