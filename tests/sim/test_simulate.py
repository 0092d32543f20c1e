"""``gcml simulate`` and ``gcml bench``: structure and byte accounting (no Dice threshold is asserted)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from helpers import TINY, cases_of, make_studies
from safetensors.torch import load as st_load

from gcml_app.cli import main
from gcml_app.config import SiteConfig
from gcml_app.federation.payload import encode_weights, verify_weights
from gcml_app.ml.network import build_network
from gcml_app.rounds.loop import run_round
from gcml_app.sim import tables
from gcml_app.sim.data import SiteDataError, load_sites, scenario_sites
from gcml_app.ml.bundle import write_bundle
from gcml_app.store import ModelStore


def _tiny_yaml(tmp_path):
    from helpers import write_config

    return write_config(tmp_path / "cfg", validation={"fraction": 0.2, "min_cases": 1, "margin": 0.0})


@pytest.mark.slow
def test_simulate_runs_every_method_through_the_servers_round_code(tmp_path, capsys, monkeypatch):
    import gcml_app.rounds.gossip as gossip
    import gcml_app.rounds.loop as loop
    import gcml_app.sim.methods as methods_
    import gcml_app.sim.run as run_

    # the simulator's rounds are the servers' functions themselves, not copies
    assert methods_.run_round is run_.run_round is gossip.run_round is loop.run_round
    assert methods_.gossip_round is gossip.gossip_round
    calls = {"run_round": 0, "gossip_round": 0}

    def spy(name, real):
        def wrapped(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        return wrapped

    real_run, real_gossip = loop.run_round, gossip.gossip_round
    for module in (gossip, run_, methods_):  # every place that calls run_round (run_: the warm-up)
        monkeypatch.setattr(module, "run_round", spy("run_round", real_run))
    monkeypatch.setattr(methods_, "gossip_round", spy("gossip_round", real_gossip))

    data, out = _layout(tmp_path, sites=("x", "y"), cases=5), tmp_path / "sim"
    methods = list(methods_.DEFAULT_METHODS)  # every method but the opt-in ones (methods_.OPT_IN)
    assert main(["simulate", "--data", str(data), "--config", str(_tiny_yaml(tmp_path)), "--out", str(out),
                 "--seeds", "2", "--rounds", "2", "--epochs", "1", "--warmup-epochs", "1"]) == 0
    gossip_ = [m for m in methods if methods_.ARMS[m].kind == "gossip"]
    alone = [m for m in methods if methods_.ARMS[m].kind == "round"]  # local, local2x, local2x-noaug
    central = [m for m in methods if not methods_.ARMS[m].shares_warmup]
    sites, seeds, rounds_ = ["x", "y"], 2, 2
    # warm-up and local rounds via run_round; every gossip round via gossip_round (which trains via run_round);
    # every baseline round, round 0 included, gates its central step's candidates via run_round
    assert calls["gossip_round"] == seeds * len(gossip_) * rounds_ * len(sites)
    assert calls["run_round"] == seeds * len(sites) * (1 + len(alone) * rounds_ + len(gossip_) * rounds_
                                                       + len(central) * (1 + rounds_))

    res = json.loads((out / "results.json").read_text())
    mb = res["model_bytes"]["float32"]
    assert set(res["summary"]) == set(methods) and res["config"]["seeds"] == 2
    assert {(r["seed"], r["method"], r["round"], r["site"]) for r in res["rows"]} == {
        (s, m, r, n) for s in range(seeds) for m in methods for r in range(rounds_ + 1) for n in sites}
    for m in methods:
        for n in sites:
            ps = res["summary"][m]["per_site"][n]
            assert len(ps["values"]) == 2 and ps["mean"] == pytest.approx(sum(ps["values"]) / 2, abs=1e-4)
            assert ps["vs_local"]["n"] == 2 and (m != "local" or ps["vs_local"]["mean"] == 0)
    rows = res["rows"]
    first = [r for r in rows if r["round"] == 1]
    for r in first:  # the first round of every method moves what it should
        want = {"round": 0, "gossip": mb, "fedavg": mb, "ditto": mb, "pooled": 0}[methods_.ARMS[r["method"]].kind]
        assert r["bytes_received"] == want, r
    warm = {(r["seed"], r["site"]): r["test_mean"] for r in rows if r["round"] == 0 and r["method"] == "local"}
    for m in [*alone, *gossip_]:  # one shared warm-up for the servers' methods
        assert {(r["seed"], r["site"]): r["test_mean"] for r in rows if r["round"] == 0 and r["method"] == m} == warm

    # the sites are real site state folders: history, partner book, audit trail, working model
    site = out / "runs" / "seed1" / "gcml" / "y"
    history = [json.loads(line) for line in (site / "models" / "history.jsonl").read_text().splitlines()]
    dcml = [h for h in history if h.get("mode") == "dcml"]
    assert len(dcml) == rounds_ and all(h["trigger"] == "simulate" and h["gossip"]["peer"] == "x" for h in dcml)
    assert all(len(h["per_case"]["served"]) == 1 and "evidence" in h for h in dcml)
    book = json.loads((site / "gossip" / "peers.json").read_text())
    assert sum(p["rounds"] for p in book.values()) == rounds_  # the performance policy's record persists
    assert (site / "audit.jsonl").read_text().count('"kind": "pull"') >= rounds_
    assert (site.parent.parent / "gcml" / "y" / "working.safetensors").is_file()

    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for png in ("dice_vs_round.png", "dice_vs_bytes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "paired vs local" in printed and "gcml-uniform" in printed and "+-" in printed


def _rows_less_seconds(out):
    with open(out / "results.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_a_baseline_run_twice_gives_the_same_rows(tmp_path):
    """Round r of site i draws its batches from the round's seed in every method, baselines included:
    two runs in one process (torch's global generator in another state each time) give the same rows."""
    data, cfg = _layout(tmp_path, sites=("x", "y"), cases=5), _tiny_yaml(tmp_path)
    rows = []
    for run in ("a", "b"):
        torch.manual_seed(len(rows))  # a different global state before each run: only the seeds may matter
        assert main(["simulate", "--data", str(data), "--config", str(cfg), "--out", str(tmp_path / run),
                     "--seeds", "1", "--rounds", "2", "--epochs", "1", "--warmup-epochs", "1",
                     "--methods", "fedavg,fedavg-ft,ditto,pooled"]) == 0
        rows.append(_rows_less_seconds(tmp_path / run))
    assert len(rows[0]) == 4 * 3 * 2 and rows[0] == rows[1]


@pytest.mark.slow
def test_float16_transport_halves_the_gossip_bytes(tmp_path):
    data, out = _layout(tmp_path, sites=("x", "y"), cases=5), tmp_path / "half"
    assert main(["simulate", "--data", str(data), "--config", str(_tiny_yaml(tmp_path)), "--out", str(out),
                 "--seeds", "1", "--rounds", "1", "--epochs", "1", "--warmup-epochs", "1", "--methods", "gcml",
                 "--transport", "float16"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["gcml"]["bytes_received_per_seed"] == 2 * res["model_bytes"]["float16"]
    assert res["model_bytes"]["float16"] < 0.55 * res["model_bytes"]["float32"]


def test_scenarios_write_their_sites_once_per_seed(tmp_path):
    sites = scenario_sites(tmp_path, "few-labels", seed=0)
    assert [s.name for s in sites] == ["site-s1", "site-s2", "site-s3", "site-s4", "site-s5"]
    assert [(len(s.train), len(s.val), len(s.test)) for s in sites] == [
        (12, 4, 20), (2, 4, 20), (3, 4, 20), (4, 4, 20), (3, 4, 20)]
    stamp = (tmp_path / "few-labels-seed0" / "site-s2" / "imagesTr" / "case_000.nii.gz").stat().st_mtime_ns
    scenario_sites(tmp_path, "few-labels", seed=0)
    assert (tmp_path / "few-labels-seed0" / "site-s2" / "imagesTr" / "case_000.nii.gz").stat().st_mtime_ns == stamp
    other = scenario_sites(tmp_path, "few-labels", seed=1)[1].train[0]["image"]
    assert sitk.GetArrayFromImage(sitk.ReadImage(other)).tolist() != sitk.GetArrayFromImage(
        sitk.ReadImage(sites[1].train[0]["image"])).tolist()
    assert [len(s.unlabelled) for s in sites] == [36, 6, 9, 12, 9]  # 3 unlabelled per labelled training case
    assert all(set(c) == {"id", "image"} and "imagesUn" in c["image"] for c in sites[0].unlabelled)
    with pytest.raises(ValueError, match=r"scenario: found 'none'; expected one of \['few-labels', 'mixed-scanners', "
                                         r"'modality-shift', 'semantic-shift'\]"):
        scenario_sites(tmp_path, "none")


def test_a_scenarios_labelled_cases_do_not_depend_on_its_unlabelled_pool(tmp_path):
    from gcml_app.sim.phantoms import write_studies

    sites = scenario_sites(tmp_path, "modality-shift", seed=2)
    assert [s.name for s in sites] == ["site-s1", "site-s2", "site-t2", "site-ct"]
    alone = write_studies(tmp_path / "alone", "t2", cases=28, seed=2 * 1000 + 2)  # the same stream, no pool
    for case in sites[2].train + sites[2].val + sites[2].test:
        name = Path(case["image"]).name
        assert sitk.GetArrayFromImage(sitk.ReadImage(case["image"])).tobytes() == sitk.GetArrayFromImage(
            sitk.ReadImage(str(alone / name))).tobytes()
    assert len(sites[2].unlabelled) == 12


def test_the_modality_shift_styles_invert_the_contrast_and_take_a_ct_range():
    import numpy as np

    from gcml_app.sim.phantoms import STYLES, make_case

    t2, lab = make_case(STYLES["t2"], np.random.default_rng(0))
    organ, lesion = (t2[lab == k].mean() for k in (1, 2))
    assert lesion < organ < t2[(lab == 0) & (t2 > 0.5 * t2.max())].mean()  # body brighter than organ, lesion darkest
    ct, lab = make_case(STYLES["ct"], np.random.default_rng(0))
    assert ct.min() < -900 and 80 < ct[lab == 1].mean() < 120 and ct[lab == 2].mean() > ct[lab == 1].mean()
    assert STYLES["ct"].spacing[0] == 2 * STYLES["s1"].spacing[0]  # (z, y, x): half the z-resolution


def test_an_unlabelled_pool_is_read_when_there_and_is_optional(tmp_path):
    data = _layout(tmp_path, cases=5)
    assert [s.unlabelled for s in load_sites(data)] == [[], []]
    (data / "x" / "imagesUn").mkdir()
    for name in ("case_000", "case_001"):
        shutil.copy(data / "x" / "imagesTr" / f"{name}.nii.gz", data / "x" / "imagesUn" / f"u{name}.nii.gz")
    x, y = load_sites(data)
    assert [c["id"] for c in x.unlabelled] == ["un_ucase_000", "un_ucase_001"] and y.unlabelled == []
    (data / "x" / "imagesUn" / "bad.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(SiteDataError, match=r"x/imagesUn/bad.nii.gz: not a readable image"):
        load_sites(data)


def test_a_site_yaml_sets_that_sites_intensity_and_spacing(tmp_path):
    data = _layout(tmp_path, cases=4)
    (data / "x" / "site.yaml").write_text("intensity: {mode: range, a_min: -100, a_max: 200}\nspacing: [1.5, 1.5, 2]\n")
    x, y = load_sites(data)
    assert x.settings == {"intensity": {"mode": "range", "a_min": -100, "a_max": 200}, "spacing": [1.5, 1.5, 2]}
    assert y.settings == {}
    (data / "y" / "site.yaml").write_text("network: {name: UNet}\n")
    with pytest.raises(SiteDataError, match=r"y/site.yaml: found \['network'\]; expected a mapping with only"):
        load_sites(data)


def _layout(root, sites=("x", "y"), cases=4):
    for i, s in enumerate(sites):
        studies, _ = make_studies(root / f"src-{s}", cases=cases, labelled=cases, seed=i)
        for sub in ("imagesTr", "labelsTr"):
            (root / "data" / s / sub).mkdir(parents=True)
        for img in sorted(studies.glob("*.nii.gz")):
            shutil.copy(img, root / "data" / s / "imagesTr" / img.name)
            shutil.copy(studies / "labels" / "final" / img.name, root / "data" / s / "labelsTr" / img.name)
    return root / "data"


def test_real_data_layout_is_read_and_split(tmp_path):
    data = _layout(tmp_path, cases=5)
    sites = load_sites(data)
    assert [s.name for s in sites] == ["x", "y"]
    assert [(len(s.train), len(s.val), len(s.test)) for s in sites] == [(3, 1, 1)] * 2
    assert sites[0].test[0]["id"] == "case_004" and sites[0].val[0]["id"] == "case_003"
    (data / "x" / "imagesTs").mkdir()
    (data / "x" / "labelsTs").mkdir()
    shutil.copy(data / "x" / "imagesTr" / "case_000.nii.gz", data / "x" / "imagesTs" / "t0.nii.gz")
    shutil.copy(data / "x" / "labelsTr" / "case_000.nii.gz", data / "x" / "labelsTs" / "t0.nii.gz")
    x = load_sites(data)[0]
    assert [c["id"] for c in x.test] == ["t0"] and len(x.train) + len(x.val) == 5


def _drop_label(data):
    (data / "y" / "labelsTr" / "case_002.nii.gz").unlink()


def _shrink_label(data):
    lab = data / "x" / "labelsTr" / "case_001.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, 16, sitk.sitkUInt8), str(lab))


def _garbage(data):
    (data / "x" / "imagesTr" / "case_000.nii.gz").write_bytes(b"not nifti")


MALFORMED = [
    (_drop_label, r"y/labelsTr/case_002.nii.gz: missing; expected the label of .*y/imagesTr/case_002.nii.gz"),
    (_shrink_label, r"x/labelsTr/case_001.nii.gz: shape \(16, 16, 16\) does not match its image .* of shape \(32, 32, 32\)"),
    (_garbage, r"x/imagesTr/case_000.nii.gz or .*: not a readable image"),
    (lambda d: shutil.rmtree(d / "y"), r"found 1 site folders; expected at least 2"),
    (lambda d: shutil.rmtree(d / "x" / "imagesTr"), r"x/imagesTr: missing; expected a folder of NIfTI images"),
]


@pytest.mark.parametrize("break_it, message", MALFORMED)
def test_malformed_layout_names_the_file(tmp_path, break_it, message):
    data = _layout(tmp_path)
    break_it(data)
    with pytest.raises(SiteDataError, match=message):
        load_sites(data)


def test_simulate_until_plateau_reports_each_methods_stop_and_the_arm_of_each_choosing_round(tmp_path, capsys):
    from helpers import write_config

    data, out = _layout(tmp_path, sites=("x", "y"), cases=5), tmp_path / "sim"
    cfg = write_config(tmp_path / "cfg", validation={"fraction": 0.2, "min_cases": 1, "margin": 0.0},
                       dcml={"choose": True})  # the default (the tests' tiny site turns it off)
    assert main(["simulate", "--data", str(data), "--config", str(cfg), "--out", str(out),
                 "--seeds", "1", "--rounds", "3", "--epochs", "1", "--warmup-epochs", "1",
                 "--methods", "local,gcml,gcml-mutual", "--until-plateau", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    p = res["plateau"]
    assert (p["patience"], p["tolerance"]) == (1, res["config"]["validation"]["margin"])
    for m in ("local", "gcml", "gcml-mutual"):
        assert p[m]["rounds"][0] in (1, 2, 3) and set(p[m]["sites"]) == {"x", "y"}
        stop = p[m]["rounds"][0]
        at = {r["site"]: r["test_mean"] for r in res["rows"] if r["method"] == m and r["round"] == stop}
        assert {n: v["mean"] for n, v in p[m]["sites"].items()} == at  # the test Dice at that round
    assert all("val_mean" in r for r in res["rows"])
    assert "at the plateau" in capsys.readouterr().out
    history = [json.loads(line) for line in
               (out / "runs" / "seed0" / "gcml" / "y" / "models" / "history.jsonl").read_text().splitlines()]
    dcml = [h for h in history if h.get("gossip") and h.get("event") in ("publish", "keep")]
    assert dcml and all(h["arm"]["arm"] in ("mutual", "teacher", "alone") and h["arm"]["why"] for h in dcml)
    arms = {(r["method"], r["site"], r["round"]): r.get("arm") for r in res["rows"]}  # each row says how, too
    assert arms[("gcml", "y", 3)] == dcml[-1]["arm"]["arm"] and arms[("local", "y", 3)] is None
    assert arms[("gcml-mutual", "y", 3)] is None  # dcml.choose off: mutual learning, no choice to record
    # the tables, headed by what reproduces them
    md = (out / "results.md").read_text()
    assert md.startswith("#### data:") and "`gcml simulate --data " in md and "--until-plateau 1`" in md
    assert re.search(r"at commit `([0-9a-f]{7}(\+changes)?|unknown)`, \d{4}-\d\d-\d\d", md)
    assert "| gcml-mutual | " in md and "At the plateau" in md and "Against `local`" in md
    chosen = [r for r in res["rows"] if r["method"] == "gcml" and r.get("arm")]  # the arms' table counts the rows
    cells = {a: sum(r["arm"] == a for r in chosen) for a in ("mutual", "teacher", "alone")}
    table = md.split("How the choice used")[1].split("\n\n")[1].splitlines()[2:]  # under its header
    assert chosen and {x.split(" | ")[0].strip("| "): [int(c.split()[0]) for c in x.strip("| ").split(" | ")[1:]]
                       for x in table} == {"gcml": list(cells.values())}  # gcml-mutual does not choose
    # rebuilt from results.json alone, with the provenance given: the same tables under that header
    assert tables.main([str(out), "--commit", "abc1234", "--date", "2026-01-02"]) == 0
    again = (out / "results.md").read_text()
    assert "at commit `abc1234`, 2026-01-02" in again and again.split("\n", 3)[3] == md.split("\n", 3)[3]


def test_simulate_cli_reports_a_bad_layout_and_exits_2(tmp_path, capsys):
    data = _layout(tmp_path)
    _drop_label(data)
    assert main(["simulate", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "labelsTr/case_002.nii.gz: missing" in capsys.readouterr().err


def test_too_few_cases_for_a_split(tmp_path):
    with pytest.raises(SiteDataError, match=r"site x: found 2 cases; expected enough for at least 1 train"):
        load_sites(_layout(tmp_path, cases=2))


@pytest.mark.parametrize("transport, bound", [("float32", 0.0), ("float16", 2.0**-11)])
def test_transport_round_trip_error_is_bounded(tmp_path, transport, bound):
    cfg = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path)})
    torch.manual_seed(0)
    state = build_network(cfg).state_dict()
    back = verify_weights(encode_weights(state, transport), cfg)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        if v.is_floating_point():
            err = (back[k] - v).abs()
            assert (err <= bound * v.abs() + 1e-7).all(), k  # round to nearest: half a unit in the last place
    assert encode_weights(state, transport, arch="sha256:x") == encode_weights(state, transport, arch="sha256:x")
    with pytest.raises(ValueError, match=r"transport: found 'int8'; expected one of \['float32', 'float16'\]"):
        encode_weights(state, "int8")


@pytest.mark.slow
def test_dcml_round_runs_with_a_float16_payload(cfg, studies):
    store = ModelStore(cfg.state_dir / "models")
    run_round(cfg, store, cases_of(studies[0]), epochs=1)
    incoming = cfg.state_dir / "gossip" / "peers" / "p.safetensors"
    incoming.parent.mkdir(parents=True)
    incoming.write_bytes(encode_weights(st_load(store.read_bytes(1)), "float16"))
    rec = run_round(cfg, store, cases_of(studies[0]), epochs=1, incoming=incoming)
    assert rec["mode"] == "dcml" and set(rec["scores"]) == {"served", "dcml_local", "dcml_incoming", "average"}
    assert rec["losses"][0]["kl_l"] >= 0 and set(rec["timings"]) == {"load_s", "validate_s", "train_s", "publish_s"}


@pytest.mark.slow
def test_bench_quick_writes_every_key(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "b"), "--quick"]) == 0
    r = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert set(r) == {"quick", "torch_threads", "gossip_round", "payload", "infer_under_training",
                      "infer_under_scoring", "infer", "dcml_step", "pacs"}
    assert r["pacs"]["first_fill_cases"] == 2 and r["pacs"]["instances"] == 4 * 32 + 2  # Orthanc: make system-deps
    assert set(r["gossip_round"]) >= {"wall_s", "fetch_s", "verify_s", "load_s", "train_s", "validate_s", "publish_s",
                                      "peak_rss_mb", "bytes_pulled"}
    assert r["gossip_round"]["peak_rss_mb"] > 50 and r["gossip_round"]["bytes_pulled"] == r["payload"]["float32"]
    # the measured round forks from the warm trainer, whose own memory is reported beside it
    assert r["gossip_round"]["start"] == "warm" and 0 < r["gossip_round"]["startup_s"] < r["gossip_round"]["wall_s"]
    assert 50 < r["gossip_round"]["warm_trainer_mb"]["uss"] <= r["gossip_round"]["warm_trainer_mb"]["rss"]
    phases = r["gossip_round"]["peak_rss_by_phase_mb"]  # in time order; a peak only grows, phase by phase
    assert list(phases) == ["before_round", "load", "validate_served", "train", "validate_candidates", "publish"]
    assert list(phases.values()) == sorted(phases.values()) and phases["before_round"] > 50
    assert r["payload"]["float16"] < 0.55 * r["payload"]["float32"]
    assert r["infer"]["gcml_seg"]["n"] == r["infer"]["stock"]["n"] == 3 and r["infer"]["ratio_median"] > 0
    assert r["infer_under_training"]["training"]["n"] >= 3 and r["infer_under_training"]["p95_ratio"] > 0
    # every unlabelled image of the site scored by both methods while inference ran
    scoring = r["infer_under_scoring"]
    assert scoring["scoring"]["n"] >= 3 and scoring["p95_ratio"] > 0 and scoring["target_p95_ratio"] == 1.5
    assert {m: (x["unlabelled"], x["scored"], x["failed"]) for m, x in scoring["runs"].items()} == {
        "disagreement": (20, 20, 0), "epistemic": (20, 20, 0)}
    assert scoring["runs"]["disagreement"]["partners"] == ["site-b"]
    assert set(r["dcml_step"]) == {"site", "unet_16_64_roi_48", "unet_16_128_roi_64"}
    params = [v["params"] for v in r["dcml_step"].values()]
    assert params == sorted(params) and len(set(params)) == 3  # three network sizes, growing
    # every figure with a target has it beside it
    assert r["gossip_round"]["target_overhead_s"] == 2.0 and r["gossip_round"]["overhead_s"] > 0
    assert all(v["target_ratio"] == 2.1 for v in r["dcml_step"].values())
    assert (tmp_path / "b" / "bench.png").stat().st_size > 10_000
    assert all(v["ratio"] > 1.0 for v in r["dcml_step"].values())
    printed = capsys.readouterr().out
    assert "DCML step against a supervised step, site: " in printed and "(target <= 2.1x)" in printed
    md = (tmp_path / "b" / "bench.md").read_text()  # the rows printed, as a table headed by the command
    assert md.startswith("#### gcml bench:") and f"`gcml bench --out {tmp_path / 'b'} --quick` at commit" in md
    assert f"| `gcml_seg` against stock `BasicInferTask` (median ratio) | {r['infer']['ratio_median']:.3f}x | <= 1.05x |" in md


@pytest.mark.slow
def test_simulate_data_takes_any_valid_site_yaml_and_its_bundle(tmp_path, capsys):
    """The README's way to compare on your own data with your own settings: a deployment YAML's peers,
    adoption, tokens and serving are replaced, not validated against the simulator's site names; its
    network.init_from is every site's start."""
    import yaml

    from gcml_app.ml.network import build_network
    from gcml_app.ml.network import network_def

    sample = yaml.safe_load(open("sample_configs/site_a.yaml"))
    torch.manual_seed(2)
    cfg = SiteConfig.model_validate({**sample, "state_dir": str(tmp_path / "unused")})
    backbone = build_network(cfg).backbone.state_dict()
    bundle = write_bundle(tmp_path / "zoo", network_def(cfg), backbone, name="my bundle", version="3.1")
    sample["train"] = {**sample["train"], "epochs": 1}
    sample["network"] = {"name": "bundle", "init_from": str(bundle)}
    path = tmp_path / "site_a.yaml"
    path.write_text(yaml.safe_dump(sample))
    data, out = _layout(tmp_path, sites=("x", "y"), cases=5), tmp_path / "sim"
    assert main(["simulate", "--data", str(data), "--config", str(path), "--out", str(out), "--seeds", "1",
                 "--rounds", "1", "--epochs", "1", "--warmup-epochs", "1", "--methods", "local"]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert {r["site"] for r in res["rows"]} == {"x", "y"}
    served = ModelStore(out / "runs" / "seed0" / "local" / "x" / "models").served()
    assert served.lineage[-1]["mode"] == "init" and served.start["bundle"] == "my bundle"
    assert main(["simulate", "--data", str(data), "--config", str(path), "--out", str(out), "--init", "pretrained"]) == 2
    assert "on your own data, set network.init_from" in capsys.readouterr().err


@pytest.mark.slow
def test_the_pretrained_bundle_is_a_bundle_a_site_starts_from(tmp_path):
    from gcml_app.ml.bundle import read_bundle, read_weights
    from gcml_app.rounds.loop import initial_state
    from gcml_app.sim.pretrain import pretrained_bundle

    cfg = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "s")})
    bundle = pretrained_bundle(cfg, tmp_path / "pre", seed=0, epochs=1)
    assert read_bundle(bundle).version == "0.1.0"
    state, start = initial_state(cfg.model_copy(update={"network": cfg.network.model_copy(update={"init_from": bundle})}))
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in read_weights(read_bundle(bundle).weights).items())
    assert start["bundle"].startswith("gcml-sim pretrained") and not start["missing"]


def test_a_bad_init_from_is_a_one_line_error_not_a_traceback(tmp_path, capsys):
    from helpers import write_config

    cfg = write_config(tmp_path / "c", network={**TINY["network"], "init_from": str(tmp_path / "missing.pt")})
    assert main(["simulate", "--data", str(_layout(tmp_path, sites=("x", "y"), cases=5)), "--config", str(cfg),
                 "--out", str(tmp_path / "o"), "--seeds", "1", "--rounds", "1", "--methods", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("missing.pt: file not found") and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("pool", [True, False], ids=["imagesUn", "no-imagesUn"])
def test_simulate_data_trains_on_an_unlabelled_pool_only_when_there_is_one(tmp_path, capsys, pool):
    from helpers import write_config

    data = _layout(tmp_path, sites=("x", "y"), cases=5)
    if pool:
        for s in ("x", "y"):
            (data / s / "imagesUn").mkdir()
            for img in sorted((data / s / "imagesTr").glob("*.nii.gz"))[:3]:
                shutil.copy(img, data / s / "imagesUn" / f"u{img.name}")
    cfg = write_config(tmp_path / "cfg", validation={"fraction": 0.2, "min_cases": 1, "margin": 0.0},
                       dcml={"lambda_unl": 0.25, "confidence": 0.0, "choose": False})
    out = tmp_path / "sim"
    assert main(["simulate", "--data", str(data), "--config", str(cfg), "--out", str(out), "--seeds", "1",
                 "--rounds", "1", "--epochs", "2", "--warmup-epochs", "1", "--methods", "local,local2x,gcml"]) == 0
    history = [json.loads(line) for line in
               (out / "runs" / "seed0" / "gcml" / "x" / "models" / "history.jsonl").read_text().splitlines()]
    (dcml,) = [h for h in history if h.get("mode") == "dcml"]
    assert any(h["unl_l"] > 0 for h in dcml["losses"]) is pool
    res = json.loads((out / "results.json").read_text())
    rows = [r for r in res["rows"] if r["round"] == 1]
    assert all(r["train_steps"] > 0 and r["crop_passes"] > 0 for r in rows)
    cost = {m: res["summary"][m]["cost"] for m in ("local", "local2x", "gcml")}
    assert cost["local2x"]["vs_local"] == 2.0 and 1.5 <= cost["gcml"]["vs_local"] <= 2.5  # two models' compute
    assert set(res["summary"]["gcml"]["per_site"]["x"]["vs_local2x"]) == {"mean", "std", "wins", "ties", "n"}
    printed = capsys.readouterr().out
    assert "paired vs local2x, the same compute alone" in printed and "2.00x" in printed


def test_click_summary_pairs_against_local2x_and_plots(tmp_path):
    from gcml_app.sim.report import plot_clicks, summarize_clicks

    rows = [{"seed": s, "method": m, "round": "clicks", "site": n, "clicks_0": 0.5 + d, "clicks_3": 0.6 + d + s / 100,
             "noc90": 10 - s}
            for s in (0, 1) for m, d in (("local2x", 0.0), ("gcml", 0.05)) for n in ("a", "b")]
    out = summarize_clicks(rows, ["local2x", "gcml"], ["a", "b"])
    assert out["gcml"]["a"]["clicks_3"] == [0.655, pytest.approx(0.0071, abs=1e-4)]
    assert out["gcml"]["a"]["vs_local2x_clicks_3"] == {"mean": 0.05, "std": 0.0, "wins": 2, "ties": 0, "n": 2}
    assert "vs_local2x_clicks_3" not in out["local2x"]["a"] and out["local2x"]["b"]["noc90"] == [9.5, 0.7071]
    plot_clicks(out, ["local2x", "gcml"], ["a", "b"], tmp_path)
    assert (tmp_path / "dice_vs_clicks.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_clicks_quick_writes_the_ratios(tmp_path):
    from gcml_app.sim.clickbench import click_bench

    r = click_bench(tmp_path / "b", quick=True, repeats=1)
    assert set(r["median_s"]) == {"gcml_seg", "first_click_uncached", "first_click_after_gcml_seg", "click_1",
                                  "click_in_session", "click_5"}
    assert all(v > 0 for v in r["median_s"].values()) and set(r["ratio_to_gcml_seg"]) == set(r["median_s"]) - {"gcml_seg"}
    assert (tmp_path / "b" / "clicks.json").exists()
    for measure, total in r["median_s"].items():  # the stages of each measure's calls account for their time
        st = r["stages_s"][measure]
        assert list(st) == ["pre", "infer", "invert", "post", "write"] and all(v >= 0 for v in st.values())
        assert st["infer"] > 0 and sum(st.values()) <= total * 1.5 + 0.01  # medians of stages, not of one call
    assert r["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    tc = r["train_clicks"]
    assert tc["batch"] == [2, 32, 32, 32] and tc["simulate_s"] > 0 and tc["step_s"] > 0


@pytest.mark.slow
def test_bench_ddp_quick_runs_one_and_two_ranks_and_writes_the_ratios(tmp_path):
    import json

    from gcml_app.sim.ddpbench import ddp_bench

    r = ddp_bench(tmp_path / "b", ranks=2, quick=True)
    one, many = r["one"], r["many"]
    assert one["ranks"] is None and many["ranks"]["world"] == 2 and many["ranks"]["same_weights"]
    assert (one["steps"], one["crops"]) == (many["steps"], many["crops"])  # the same budget on both
    assert len(many["per_rank_train_s"]) == 2 and all(v > 0 for v in r["ratio"].values())
    assert json.loads((tmp_path / "b" / "ddp.json").read_text())["ratio"] == r["ratio"]
    assert (tmp_path / "b" / "ddp.png").stat().st_size > 1000
    if r["device"] == "cpu":  # and one process with every core's threads, what a CPU site runs without train.gpus
        assert r["one_all_threads"]["ranks"] is None and set(r["ratio_to_one_process_all_threads"]) == {
            "crops_per_s", "validate_s_per_case", "round_wall_s"}
    with pytest.raises(ValueError, match="found 1 ranks; expected at least 2"):
        ddp_bench(tmp_path / "c", ranks=1, quick=True)


COMPUTE_UNITS = [
    # (methods run, each one's crop passes a round) -> each one's compute as a multiple of local's
    (("local", "local2x", "gcml"), (10, 20, 20), {"local": 1.0, "local2x": 2.0, "gcml": 2.0}),
    (("local2x", "gcml"), (20, 20), {"local2x": 2.0, "gcml": 2.0}),  # no local: half of local2x's
    (("gcml",), (20,), {}),  # neither: no unit, no multiple
]


@pytest.mark.parametrize("methods, passes, multiple", COMPUTE_UNITS, ids=["with-local", "local2x-only", "neither"])
def test_compute_is_a_multiple_of_locals_crop_passes(methods, passes, multiple):
    from gcml_app.sim.report import summarize_rows

    rows = [{"method": m, "site": "a", "seed": s, "round": r, "test_mean": 0.5, "bytes_received": 0,
             "published": False, "crop_passes": p, "train_steps": p} for m, p in zip(methods, passes)
            for s in (0, 1) for r in (0, 1, 2)]
    summary = summarize_rows(rows, list(methods), ["a"], 2)
    assert {m: summary[m]["cost"]["vs_local"] for m in methods if "vs_local" in summary[m]["cost"]} == multiple
