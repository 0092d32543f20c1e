"""``gcml bench --scale`` and ``gcml bench --gpu`` run end to end (small sizes here; the figures are the bench's)."""

from __future__ import annotations

import json

import pytest
import torch

from gcml_app.cli import main
from gcml_app.sim.scale import NATIVE_SPACING, ct_volume


@pytest.mark.parametrize("shape", [(64, 64, 48), (40, 56, 32)])
def test_a_synthetic_ct_resamples_to_its_size_at_1mm(shape):
    image, label = ct_volume(shape, seed=1)
    assert image.GetSpacing() == NATIVE_SPACING and label.GetSize() == image.GetSize()
    size_1mm = [round(n * s) for n, s in zip(image.GetSize(), NATIVE_SPACING)]
    assert all(abs(a - b) <= 2 for a, b in zip(size_1mm, shape))
    import SimpleITK as sitk

    values = set(sitk.GetArrayViewFromImage(label).ravel().tolist()[::7])
    assert values == {0, 1, 2}


@pytest.mark.slow
def test_bench_scale_quick_writes_rounds_against_n(tmp_path, capsys):
    assert main(["bench", "--scale", "--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "scale.json").read_text())
    assert (tmp_path / "scale.png").stat().st_size > 0
    (name, s), = r["sizes"].items()
    assert [(x["n"], x["round"]) for x in s["rounds"]] == [(3, "first"), (3, "second"), (5, "first"), (5, "second")]
    for x in s["rounds"]:
        assert x["cache"]["misses" if x["round"] == "first" else "hits"] == x["n"]
        assert x["above_start_mb"] >= 0 and set(x["per_case_s"]) == {"load", "train", "validate"}
    assert {"mb_per_case_first", "mb_per_case_second", "second_over_first_load", "cache_mb_per_case"} <= set(s)
    (aug,) = r["augment"]
    assert aug["roi"] == 32 and 0 < aug["s_per_crop"] <= aug["p95_s"] and aug["all_fire_s"] > 0
    sc = r["scoring"]
    assert sc["size"] == name and sc["partners"] == 3 and sc["voxels"] > 0
    assert sc["disagreement_s"] > 0 and sc["epistemic_s"] > 0 and sc["disagreement_peak_above_mb"] >= 0
    printed = capsys.readouterr().out
    assert "round memory per added case" in printed and "augmentation (`train.augment: scanner`)" in printed
    assert "scoring one unlabelled" in printed
    md = (tmp_path / "scale.md").read_text()  # the same rows, as docs/results.md includes them
    assert md.startswith("#### gcml bench --scale") and "`gcml bench --scale --quick --out " in md
    assert f"{name} ({s['voxels'] / 1e6:.1f} M voxels a case): second-round loading against the first" in md
    assert "| <= 0.5x |" in md and "| <= 8 MB |" in md


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_path(tmp_path, capsys):
    assert main(["bench", "--gpu", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["ok"] and r["reduced"] == (not torch.cuda.is_available())
    for k in ("amp_on", "amp_off"):
        assert r["dcml_step"][k]["loss_finite"] and r["dcml_step"][k]["both_updated"]
    assert r["dcml_step"]["amp_off"]["precision"] == "fp32"
    assert r["round"]["published"] and r["round"]["cache"]["misses"] == 8
    assert r["infer"]["label_written"] and r["infer"]["model_version"] == 1
    printed = capsys.readouterr().out
    assert "the check: OK (target OK)" in printed and "DCML step, fp32: " in printed
    assert "| the check | OK | OK |" in (tmp_path / "gpu_check.md").read_text()
