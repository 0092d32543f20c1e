"""Click to correct on a real MONAI Label server, driven by ``monailabel.client`` as Slicer's DeepEdit tools do."""

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import cases_of, make_studies, write_config
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from scipy import ndimage

from gcml_app.config import load_config
from gcml_app.rounds.loop import run_round
from gcml_app.site.launch import SiteServer
from gcml_app.store import ModelStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    studies, truth = make_studies(root, cases=12, labelled=8)
    config = write_config(root, interactive={"enabled": True})
    cfg = load_config(config)
    store = ModelStore(cfg.state_dir / "models")
    for _ in range(2):  # a model that follows clicks but still makes errors to correct (rounds with clicks)
        run_round(cfg, store, cases_of(studies), epochs=10)
    with SiteServer(config, studies, log=root / "server.log") as server:
        yield {"client": MONAILabelClient(server.url), "cfg": cfg, "studies": studies, "truth": truth,
               "store": store, "url": server.url}


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (k, j, i)


def _ijk(zyx):
    return [int(zyx[2]), int(zyx[1]), int(zyx[0])]


def _auto(client, case):
    label, params = client.infer("gcml_seg", case, {})
    return _array(label), params


def _error_case(site, channels):
    """Of every case's auto-segmentation, the connected error of one of ``channels`` (1, 2: a missed structure;
    0: a false positive) with the thickest core, then the largest: its case, channel, component, the auto
    segmentation, and the evaluation click at the error's centre (the voxel farthest from its edge)."""
    best = None
    for i in range(12):
        case = f"case_{i:03d}"
        pred, _ = _auto(site["client"], case)
        truth = _array(site["truth"] / f"{case}.nii.gz")
        for ch in channels:
            comps, n = ndimage.label((truth == ch) & (pred != ch))
            for k in range(1, n + 1):
                comp = comps == k
                depth = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1, 1:-1]
                key = (float(depth.max()), int(comp.sum()))
                if best is None or key > best[0]:
                    zyx = tuple(int(v) for v in np.unravel_index(int(depth.argmax()), comp.shape))
                    best = (key, case, ch, comp, pred, zyx)
    assert best is not None and best[0][1] >= 5, f"no error of {channels} to click on: {best and best[0]}"
    return best[1:]


def _near(zyx, shape, r=9):
    """The box of ``r`` voxels (3 sigma) around a click."""
    box = np.zeros(shape, bool)
    z, y, x = zyx
    box[max(0, z - r):z + r + 1, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
    return box


def test_info_lists_gcml_edit_as_deepedit_beside_gcml_seg(site):
    info = site["client"].info()
    assert info["models"]["gcml_edit"]["type"] == "deepedit"
    assert info["models"]["gcml_edit"]["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert info["models"]["gcml_seg"]["type"] == "segmentation"
    assert "config" not in info


def test_status_shows_zero_click_and_click_dice_of_the_last_round(site):
    import requests

    it = requests.get(site["url"] + "/gcml/status", timeout=30).json()["interactive"]
    assert it["enabled"] and it["guidance"] == ["background", "organ", "lesion"] and it["gate_clicks"] == 3
    last = it["last_round"]
    assert last["click_dice"]["clicks"] == 3 and set(last["click_dice"]) == {"clicks", "served", "local"}
    assert set(last["zero_click_dice"]) == {"served", "local"}
    assert all(0 <= v <= 1 for k, v in last["click_dice"].items() if k != "clicks")


def test_a_foreground_click_adds_the_missed_structure_and_nothing_far_from_it_changes(site):
    client = site["client"]
    case, ch, comp, before, zyx = _error_case(site, (1, 2))
    name = ["background", "organ", "lesion"][ch]
    label, params = client.infer("gcml_edit", case, {name: [_ijk(zyx)], "background": [], "label": name})
    after = _array(label)
    assert params["gcml_clicks"] == 1 and params["gcml_model_version"] == site["store"].served_version()
    assert after[zyx] == ch and before[zyx] != ch  # the clicked voxel is now what the radiologist said
    gained = int((after[comp] == ch).sum())
    truth = _array(site["truth"] / f"{case}.nii.gz") == ch
    dice = [2 * (truth & (p == ch)).sum() / (truth.sum() + (p == ch).sum()) for p in (before, after)]
    # the tiny test model (two rounds of 10 epochs) adds the part of the structure around the click, not yet all
    # of it: gcml simulate measures how much clicks recover (README, "Click to correct")
    assert gained >= 20 and dice[1] > dice[0] + 0.02, f"the click added {gained} {name} voxels; Dice {dice}"
    changed, _ = ndimage.label(after != before)
    touching = set(np.unique(changed[_near(zyx, comp.shape)])) - {0}
    assert set(np.unique(changed)) - {0} <= touching  # every change is connected to the click's neighbourhood
    assert np.array_equal(_auto(client, case)[0], before)  # gcml_seg answers as before


def test_a_background_click_removes_the_false_positive(site):
    client = site["client"]
    case, _, comp, before, zyx = _error_case(site, (0,))
    fg = "organ" if before[zyx] == 1 else "lesion"
    label, _ = client.infer("gcml_edit", case, {"background": [_ijk(zyx)], fg: [], "label": fg})
    after = _array(label)
    assert after[zyx] == 0 and before[zyx] != 0
    near = comp & _near(zyx, comp.shape)
    left = int((after[near] != 0).sum())
    assert left <= 0.5 * near.sum(), f"{left} of {near.sum()} false-positive voxels near the click remain"


@pytest.mark.parametrize("params, message", [
    ({"organ": [[99, 1, 1]]}, "outside the image"),
    ({"organ": [[1.5, 1, 1]]}, "not integer"),
    ({"spleen": [[1, 1, 1]]}, "unknown label 'spleen'"),
    ({"organ": [[1, 1, 1]] * 201}, "more than 200 clicks"),
])
def test_bad_clicks_get_422_and_change_nothing(site, params, message):
    client, studies, store = site["client"], site["studies"], site["store"]
    labels = sorted(p.name for p in (studies / "labels").rglob("*.nii.gz"))
    served = store.served_version()
    with pytest.raises(MONAILabelClientException) as e:
        client.infer("gcml_edit", "case_010", params)
    assert "Status: 422" in e.value.msg and message in e.value.msg
    assert sorted(p.name for p in (studies / "labels").rglob("*.nii.gz")) == labels
    assert store.served_version() == served


def test_the_first_click_after_gcml_seg_loads_nothing_and_answers_as_after_a_fresh_load(site):
    """gcml_seg leaves the image in network space for the clicks; the label comes back as uint8."""
    client = site["client"]
    client.infer("gcml_seg", "case_011", {})
    clicks = {"organ": [[16, 16, 16]], "background": [[2, 2, 2]], "label": "organ"}
    label, params = client.infer("gcml_edit", "case_011", clicks)
    assert "pre" not in params["latencies"]["transform"], params["latencies"]  # no load, no resampling
    image = sitk.ReadImage(str(label))
    assert image.GetPixelID() == sitk.sitkUInt8
    for other in ("case_009", "case_010"):  # two other cases push case_011's image out (2 are kept)
        client.infer("gcml_seg", other, {})
    fresh, params = client.infer("gcml_edit", "case_011", clicks)
    assert "LoadImaged" in params["latencies"]["transform"]["pre"]
    assert np.array_equal(_array(fresh), sitk.GetArrayFromImage(image))
