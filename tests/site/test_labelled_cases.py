"""A round reads each final label's checks from memory once it has passed them: a label is checked once per content."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import make_studies

from gcml_app.ml.cache import cache_root
from gcml_app.site import trainer
from gcml_app.site.datastore import GCMLDatastore


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = trainer.conform_label

    def conform(image, label, labels, *a, **kw):
        calls.append(label)
        return real(image, label, labels, *a, **kw)

    monkeypatch.setattr(trainer, "conform_label", conform)
    return calls


def test_a_label_is_checked_once_until_it_is_replaced(cfg, tmp_path, counted):
    studies, _ = make_studies(tmp_path / "s", cases=5, labelled=4)
    ds = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    first = trainer.labelled_cases(ds, cfg)
    assert len(first) == 4 and len(counted) == 4
    assert trainer.labelled_cases(ds, cfg) == first and len(counted) == 4  # a second round checks nothing
    shutil.copy(first[1]["label"], first[0]["label"])  # a new label saved over case 0's
    assert len(trainer.labelled_cases(ds, cfg)) == 4 and counted[4:] == [first[0]["label"]]


def test_a_label_that_fails_is_skipped_every_round_and_never_remembered(cfg, tmp_path, counted):
    studies, _ = make_studies(tmp_path / "s", cases=3, labelled=3)
    bad = studies / "labels" / "final" / "case_001.nii.gz"
    bad.write_bytes(b"not a volume")
    ds = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    for round_ in range(2):
        assert [c["id"] for c in trainer.labelled_cases(ds, cfg)] == ["case_000", "case_002"]
    assert counted.count(str(bad)) == 2


def test_an_upload_is_recorded_as_checked_so_the_round_does_not_check_it_again(cfg, tmp_path, counted):
    studies, truth = make_studies(tmp_path / "s", cases=3, labelled=2)
    ds = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    ds.passed_root = cache_root(cfg)
    ds.save_label("case_002", str(truth / "case_002.nii.gz"), "final", {})
    assert [c["id"] for c in trainer.labelled_cases(ds, cfg)] == ["case_000", "case_001", "case_002"]
    assert counted == [c["label"] for c in trainer.labelled_cases(ds, cfg)][:2]  # only the two placed by hand


@pytest.mark.parametrize("policy, ids", [("refuse", ["case_001", "case_002"]),
                                         ("background", ["case_000", "case_001", "case_002"])])
def test_a_label_map_with_an_extra_class_trains_only_with_background(cfg, tmp_path, policy, ids):
    import numpy as np
    import SimpleITK as sitk

    studies, _ = make_studies(tmp_path / "s", cases=3, labelled=3)
    path = studies / "labels" / "final" / "case_000.nii.gz"
    lab = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(lab)
    arr[0] = 5  # a third organ the task does not train
    extra = sitk.GetImageFromArray(arr)
    extra.CopyInformation(lab)
    sitk.WriteImage(extra, str(path))
    site = cfg.model_copy(update={"other_values": policy})
    ds = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    assert [c["id"] for c in trainer.labelled_cases(ds, site)] == ids


def test_the_unlabelled_images_are_those_without_a_final_label(cfg, tmp_path):
    studies, _ = make_studies(tmp_path / "s", cases=5, labelled=3)
    ds = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    unl = trainer.unlabelled_images(ds)
    assert [c["id"] for c in unl] == ["case_003", "case_004"]
    assert all(set(c) == {"id", "image"} and c["image"].endswith(f"{c['id']}.nii.gz") for c in unl)


def test_the_memos_keep_only_the_files_present(cfg, tmp_path):
    """hashes.json and labels_ok.json are bounded by the files present: a round's listing prunes what is gone."""
    import json

    studies, _ = make_studies(tmp_path / "s", cases=6, labelled=6)
    ds = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    trainer.labelled_cases(ds, cfg)
    root = cache_root(cfg)
    hashes, passed = (json.loads((root / n).read_text()) for n in ("hashes.json", "labels_ok.json"))
    assert (len(hashes), len(passed)) == (12, 6)  # every image and label; every pair
    shutil.copy(studies / "labels" / "final" / "case_001.nii.gz", studies / "labels" / "final" / "case_000.nii.gz")
    for i in (2, 3):  # two cases deleted, image and label
        (studies / f"case_00{i}.nii.gz").unlink()
        (studies / "labels" / "final" / f"case_00{i}.nii.gz").unlink()
    ds = GCMLDatastore(str(studies), labels=cfg.labels, auto_reload=False)
    assert [c["id"] for c in trainer.labelled_cases(ds, cfg)] == ["case_000", "case_001", "case_004", "case_005"]
    hashes, passed = (json.loads((root / n).read_text()) for n in ("hashes.json", "labels_ok.json"))
    assert sorted(Path(k).name for k in hashes) == sorted([f"case_00{i}.nii.gz" for i in (0, 1, 4, 5)] * 2)
    assert len(passed) == 4  # case_000's old pair is gone with its old label; the deleted cases' too
