"""``gcml simulate`` and ``gcml bench``: structure and byte accounting (no Dice threshold is asserted)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import SimpleITK as sitk
import torch
from helpers import TINY, make_studies
from safetensors.torch import load as st_load
from test_trainer import cases_of

from gcml_app.cli import main
from gcml_app.config import SiteConfig
from gcml_app.gossip.payload import encode_weights, verify_weights
from gcml_app.network import build_network
from gcml_app.sim.data import SiteDataError, load_sites, synthetic_sites
from gcml_app.store import ModelStore
from gcml_app.trainer import run_round

METHODS = ["local", "fedavg", "gml", "gcml", "pooled"]


@pytest.mark.slow
def test_simulate_tiny_federation_accounts_for_every_byte(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--site-styles", "a,b,c", "--cases", "6", "--rounds", "2",
                 "--epochs", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    sites, mb = res["config"]["sites"], res["model_bytes"]["float32"]
    assert sites == ["site-a", "site-b", "site-c"] and set(res["summary"]) == set(METHODS)
    assert res["config"]["cases"]["site-a"] == {"train": 3, "val": 1, "test": 2}
    rows = res["rows"]
    assert {(r["method"], r["round"], r["site"]) for r in rows} == {
        (m, r, s) for m in METHODS for r in range(3) for s in sites}
    assert all(set(r) >= {"test_organ", "test_lesion", "test_mean", "bytes_sent", "bytes_received"} for r in rows)
    per_round = {m: res["summary"][m]["bytes_per_round"] for m in METHODS}
    assert per_round["fedavg"] == [2 * 3 * mb] * 2  # every site uploads and downloads the model
    assert per_round["gml"] == per_round["gcml"] == [3 * mb] * 2  # one model per site per round
    assert per_round["local"] == per_round["pooled"] == [0, 0]
    for m in ("gml", "gcml"):
        got = [r for r in rows if r["method"] == m and r["round"] > 0]
        assert all(r["bytes_received"] == mb for r in got)
        assert sum(r["bytes_sent"] for r in got) == sum(r["bytes_received"] for r in got)
    fed = [r for r in rows if r["method"] == "fedavg" and r["round"] > 0]
    assert all(r["bytes_sent"] == r["bytes_received"] == mb for r in fed)
    warm = {r["site"]: r["test_mean"] for r in rows if r["round"] == 0 and r["method"] == "local"}
    assert all({r["site"]: r["test_mean"] for r in rows if r["round"] == 0 and r["method"] == m} == warm
               for m in ("fedavg", "gml", "gcml"))  # the same warm-up for every method but pooled
    for m in METHODS:
        s = res["summary"][m]
        assert s["final_worst"] == min(s["per_site"].values()) and s["worst_site"] in sites
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for png in ("dice_vs_round.png", "dice_vs_bytes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "gcml" in printed and "MB moved" in printed and "worst" in printed

    assert main(["simulate", "--out", str(tmp_path / "half"), "--site-styles", "a,b", "--cases", "6", "--rounds", "1",
                 "--epochs", "1", "--methods", "gcml", "--transport", "float16"]) == 0
    half = json.loads((tmp_path / "half" / "results.json").read_text())
    assert half["summary"]["gcml"]["bytes_per_round"] == [2 * half["model_bytes"]["float16"]]
    assert half["model_bytes"]["float16"] < 0.55 * half["model_bytes"]["float32"]


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


def test_simulate_cli_reports_a_bad_layout_and_exits_2(tmp_path, capsys):
    data = _layout(tmp_path)
    _drop_label(data)
    assert main(["simulate", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "labelsTr/case_002.nii.gz: missing" in capsys.readouterr().err


def test_too_few_cases_for_a_split(tmp_path):
    with pytest.raises(SiteDataError, match=r"site x: found 2 cases; expected enough for at least 1 train"):
        load_sites(_layout(tmp_path, cases=2))


def test_synthetic_sites_reuse_their_data_and_name_repeated_styles(tmp_path):
    a = synthetic_sites(tmp_path, ["a", "b", "a"], cases=4)
    assert [s.name for s in a] == ["site-a", "site-b", "site-a2"]
    stamp = (tmp_path / "site-a" / "imagesTr" / "case_000.nii.gz").stat().st_mtime_ns
    synthetic_sites(tmp_path, ["a", "b", "a"], cases=4)
    assert (tmp_path / "site-a" / "imagesTr" / "case_000.nii.gz").stat().st_mtime_ns == stamp


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
    assert set(r) == {"quick", "torch_threads", "gossip_round", "payload", "infer_under_training", "infer", "dcml_step"}
    assert set(r["gossip_round"]) >= {"wall_s", "fetch_s", "verify_s", "load_s", "train_s", "validate_s", "publish_s",
                                      "peak_rss_mb", "bytes_pulled"}
    assert r["gossip_round"]["peak_rss_mb"] > 50 and r["gossip_round"]["bytes_pulled"] == r["payload"]["float32"]
    assert r["payload"]["float16"] < 0.55 * r["payload"]["float32"]
    assert r["infer"]["gcml_seg"]["n"] == r["infer"]["stock"]["n"] == 3 and r["infer"]["ratio_median"] > 0
    assert r["infer_under_training"]["training"]["n"] >= 3 and r["infer_under_training"]["p95_ratio"] > 0
    assert set(r["dcml_step"]) == {"site", "unet_16_128_roi_64"}
    assert all(v["ratio"] > 1.0 for v in r["dcml_step"].values())
    assert "DCML step vs supervised step" in capsys.readouterr().out
