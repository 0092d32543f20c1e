"""The preprocessed-case cache: hits, misses on changed content or settings, eviction, torn entries, crop centres."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from monai.transforms import Compose, EnsureTyped, RandCropByPosNegLabeld, RandFlipd, SpatialPad, SpatialPadd
from monai.transforms.utils import map_binary_to_indices

from gcml_app.config import SiteConfig
from gcml_app.ml import transforms as transforms_mod
from gcml_app.ml.cache import CachedCases, CaseCache, ContentHashes, load_entry
from gcml_app.ml.transforms import case_transforms, crop_transforms, train_transforms
from helpers import TINY, cases_of, make_studies


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    studies, _ = make_studies(tmp_path_factory.mktemp("cache"), cases=4, labelled=4)
    return studies


def _cfg(tmp_path, **over) -> SiteConfig:
    return SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "state"), **over})


def _copy(studies, tmp_path):
    """A private copy of the studies (tests that replace files must not touch the shared ones)."""
    dst = tmp_path / "studies"
    shutil.copytree(studies, dst)
    return cases_of(dst)


def test_an_entry_holds_the_preprocessed_case_with_uint8_labels(studies, tmp_path):
    cfg = _cfg(tmp_path)
    case = cases_of(studies)[0]
    entry = load_entry(CaseCache(cfg).prepare([case])[0], indices=True)
    want = case_transforms(cfg)({"image": case["image"], "label": case["label"]})
    assert entry["label"].dtype == torch.uint8 and entry["image"].dtype == torch.float32
    assert torch.equal(entry["image"], torch.as_tensor(want["image"]))
    assert torch.equal(entry["label"], torch.as_tensor(want["label"]))
    assert set(entry["label"].unique().tolist()) <= {0, 1, 2}
    fg, bg = map_binary_to_indices(SpatialPad(cfg.roi_size)(want["label"].long()))  # int64: MONAI's own path
    assert torch.equal(entry["fg"], torch.as_tensor(fg)) and torch.equal(entry["bg"], torch.as_tensor(bg))
    assert len(entry["fg"]) + len(entry["bg"]) == SpatialPad(cfg.roi_size)(want["label"]).numel()
    assert not bool(torch.isin(entry["fg"], entry["bg"]).any())


def test_a_second_round_hits_every_entry(studies, tmp_path):
    cfg, cases = _cfg(tmp_path), cases_of(studies)
    first = CaseCache(cfg)
    paths = first.prepare(cases)
    assert (first.stats.hits, first.stats.misses) == (0, 4)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = CaseCache(cfg)  # a new round (a new process reads the same folder)
    assert again.prepare(cases) == paths
    assert (again.stats.hits, again.stats.misses, again.stats.rebuilt) == (4, 0, 0)
    assert all(p.stat().st_mtime_ns >= m for p, m in zip(paths, mtimes))  # a read is a use (LRU)


@pytest.mark.parametrize("change", [
    {"spacing": [2.0, 2.0, 2.0]},
    {"intensity": {"mode": "range", "a_min": -1.0, "a_max": 3.0}},
    {"labels": {"organ": 1, "lesion": 3}},
    {"roi_size": [16, 16, 16]},
], ids=["spacing", "intensity", "labels", "roi_size"])
def test_a_changed_setting_misses(studies, tmp_path, change):
    cases = cases_of(studies)[:1]
    before = CaseCache(_cfg(tmp_path)).prepare(cases)[0]
    after = CaseCache(_cfg(tmp_path, **change))
    assert after.prepare(cases)[0] != before and after.stats.misses == 1


def test_a_replaced_label_misses_and_is_preprocessed_again(studies, tmp_path):
    cases = _copy(studies, tmp_path)
    cfg = _cfg(tmp_path)
    old = CaseCache(cfg).prepare(cases[:1])[0]
    shutil.copy(cases[1]["label"], cases[0]["label"])  # a new label saved over the old file
    again = CaseCache(cfg)
    new = again.prepare(cases[:1])[0]
    assert new != old and again.stats.misses == 1
    want = case_transforms(cfg)({"image": cases[0]["image"], "label": cases[1]["label"]})["label"]
    assert torch.equal(load_entry(new)["label"], torch.as_tensor(want))


def test_eviction_keeps_the_bound_least_recently_used_first_but_never_this_rounds_cases(studies, tmp_path):
    cases = cases_of(studies)
    one = CaseCache(_cfg(tmp_path)).prepare(cases[:1])[0].stat().st_size
    cfg = _cfg(tmp_path, train={**TINY["train"], "cache_max_gb": 2.5 * one / 1e9})  # room for two entries
    a = CaseCache(cfg)
    a.prepare(cases[:2])
    os.utime(a.prepare(cases[:1])[0])  # case 0 used after case 1
    b = CaseCache(cfg)
    b.prepare(cases[2:3])
    left = {e.name for e in b.entries()}
    assert b.stats.evicted == 1 and len(left) == 2
    assert f"{b.key(cases[1])}.safetensors" not in left  # the least recently used one went
    c = CaseCache(cfg)
    c.prepare(cases)  # this round needs four: none of them is evicted under it
    assert len(c.entries()) == 4 and c.stats.bytes > c.max_bytes


@pytest.mark.parametrize("damage", ["truncate", "zero_header", "other_key"])
def test_a_torn_or_foreign_entry_is_rebuilt_never_trusted(studies, tmp_path, damage):
    cfg, case = _cfg(tmp_path), cases_of(studies)[0]
    path = CaseCache(cfg).prepare([case])[0]
    good = {k: v.clone() for k, v in load_entry(path, indices=True).items()}  # not a map of the file damaged next
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "zero_header":
        path.write_bytes(b"\0" * 64 + path.read_bytes()[64:])
    else:  # a whole entry of another case under this name
        other = CaseCache(cfg).prepare([cases_of(studies)[1]])[0]
        shutil.copy(other, path)
    again = CaseCache(cfg)
    assert again.prepare([case])[0] == path
    assert again.stats.rebuilt == 1 and again.stats.misses == 1
    rebuilt = load_entry(path, indices=True)
    assert all(torch.equal(rebuilt[k], good[k]) for k in good)


def test_crop_centres_beyond_the_bound_are_a_uniform_subset(studies, tmp_path, monkeypatch):
    monkeypatch.setattr(transforms_mod, "MAX_INDICES", 100)
    cfg, case = _cfg(tmp_path), cases_of(studies)[0]
    entry = load_entry(CaseCache(cfg).prepare([case])[0], indices=True)
    label = case_transforms(cfg)({"image": case["image"], "label": case["label"]})["label"]
    fg, bg = map_binary_to_indices(SpatialPad(cfg.roi_size)(label.long()))
    for got, full in ((entry["fg"], torch.as_tensor(fg)), (entry["bg"], torch.as_tensor(bg))):
        assert len(got) == min(100, len(full)) and bool(torch.isin(got, full).all())
        assert torch.equal(got, got.sort().values) and len(got.unique()) == len(got)


def _scanning(cfg) -> Compose:
    """The crops as MONAI draws them with no precomputed centres, on int64 labels (the pipeline before the cache)."""
    keys = ("image", "label")
    return Compose([*case_transforms(cfg).transforms, EnsureTyped("label", dtype="int64", track_meta=False),
                    SpatialPadd(keys, spatial_size=cfg.roi_size),
                    RandCropByPosNegLabeld(keys, label_key="label", spatial_size=cfg.roi_size, pos=1, neg=1,
                                           num_samples=cfg.train.samples_per_case),
                    RandFlipd(keys, prob=0.5, spatial_axis=0)])


@pytest.mark.parametrize("roi", [[16, 16, 16], [32, 32, 48]], ids=["crop", "pad"])
@pytest.mark.parametrize("path", ["cache", "in_memory"])
def test_precomputed_centres_draw_the_crops_monai_draws_by_scanning_the_label(studies, tmp_path, roi, path):
    """The same seed draws the same crops as MONAI scanning an int64 label, so learning results do not move."""
    cfg = _cfg(tmp_path, roi_size=roi, train={**TINY["train"], "samples_per_case": 3, "augment": "flip"})
    cases = cases_of(studies)[:2]
    cached = CachedCases(CaseCache(cfg).prepare(cases), indices=True)
    ref, new = _scanning(cfg), crop_transforms(cfg) if path == "cache" else train_transforms(cfg)
    for i, case in enumerate(cases):
        ref.set_random_state(seed=i)
        want = ref({"image": case["image"], "label": case["label"]})
        new.set_random_state(seed=i)
        got = new(cached[i] if path == "cache" else {"image": case["image"], "label": case["label"]})
        for w, g in zip(want, got, strict=True):
            assert torch.equal(torch.as_tensor(w["image"]), torch.as_tensor(g["image"]))
            assert torch.equal(torch.as_tensor(w["label"]), torch.as_tensor(g["label"]).long())
            assert torch.as_tensor(g["label"]).dtype == torch.uint8 and "fg" not in g and "bg" not in g


def test_content_hashes_are_memoised_until_the_file_changes(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"one")
    memo = ContentHashes(tmp_path / "hashes.json")
    first = memo.of(f)
    memo.save()
    assert ContentHashes(tmp_path / "hashes.json")._memo[str(f.resolve())]["sha256"] == first
    f.write_bytes(b"two!")
    assert ContentHashes(tmp_path / "hashes.json").of(f) != first


def test_an_unlabelled_image_is_an_entry_with_the_image_alone(studies, tmp_path):
    cfg, case = _cfg(tmp_path), cases_of(studies)[0]
    cache = CaseCache(cfg)
    labelled, unlabelled = cache.prepare([case, {"id": case["id"], "image": case["image"]}])
    assert labelled != unlabelled  # the same image with and without its label: two keys
    entry = load_entry(unlabelled, indices=True)
    assert set(entry) == {"image"}
    assert torch.equal(entry["image"], load_entry(labelled)["image"])
    again = CaseCache(cfg)
    assert again.prepare([{"id": "x", "image": case["image"]}]) == [unlabelled] and again.stats.hits == 1


def test_an_unreadable_unlabelled_image_is_left_out_but_a_labelled_one_fails(studies, tmp_path):
    cfg, case = _cfg(tmp_path), cases_of(studies)[0]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a volume")
    entries = CaseCache(cfg).prepare([case, {"id": "bad", "image": str(bad)}])
    assert entries[0] is not None and entries[1] is None
    with pytest.raises(RuntimeError, match="LoadImaged"):
        CaseCache(cfg).prepare([{**case, "image": str(bad)}])
