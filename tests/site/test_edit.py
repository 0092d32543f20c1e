"""gcml_edit's clicks: the bad-click table and clicks landing on the anatomy clicked (LPS and oblique images)."""

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import TINY

from gcml_app.config import SiteConfig
from gcml_app.errors import ClickRejected
from gcml_app.ml.clicks import guidance_signal
from gcml_app.ml.transforms import case_transforms, image_transforms
from gcml_app.site.edit import parse_clicks, to_network_grid

NAMES = ["background", "organ", "lesion"]


@pytest.mark.parametrize("params, message", [
    ({"organ": [[40, 1, 1]]}, r"click 0 of 'organ' \(\[40, 1, 1\]\): outside the image of \[32, 32, 32\] voxels"),
    ({"organ": [[1, 1, -1]]}, r"outside the image"),
    ({"background": [[1, 1, 1], [float("nan"), 2, 3]]}, r"click 1 of 'background' .*: not finite"),
    ({"organ": [[float("inf"), 2, 3]]}, r"not finite"),
    ({"lesion": [[1.5, 2, 3]]}, r"click 0 of 'lesion' \(\[1.5, 2, 3\]\): not integer"),
    ({"organ": [[1, 2]]}, r"expected three voxel coordinates"),
    ({"organ": [["1", 2, 3]]}, r"expected numbers"),
    ({"organ": [[True, 2, 3]]}, r"expected numbers"),
    ({"spleen": [[1, 2, 3]]}, r"clicks for unknown label 'spleen'; expected one of \['background', 'organ', 'lesion'\]"),
    ({"organ": [[1, 1, 1]] * 150, "background": [[2, 2, 2]] * 51}, r"more than 200 clicks in one request"),
])
def test_bad_clicks_are_refused_by_name(params, message):
    with pytest.raises(ClickRejected, match=message):
        parse_clicks(params, NAMES, 200, (32, 32, 32))


def test_good_clicks_and_other_parameters():
    params = {"organ": [[1, 2, 3], [4.0, 5, 6]], "lesion": [], "background": [[0, 0, 31]], "label": "organ",
              "label_info": [{"name": "organ", "idx": 1}], "result_extension": ".nii.gz", "device": "cpu"}
    assert parse_clicks(params, NAMES, 200, (32, 32, 32)) == [(1, (1, 2, 3)), (1, (4, 5, 6)), (0, (0, 0, 31))]
    assert parse_clicks({"organ": [[99, 99, 99]]}, NAMES, 200) == [(1, (99, 99, 99))]  # bounds need the image


# ---------------------------------------------------------------- clicks land on the anatomy clicked
def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _write_case(tmp_path, direction: np.ndarray, spacing=(1.2, 0.9, 1.5)):
    """A 40x36x30 image (i, j, k) with an organ in one corner only, so a click on the wrong side misses it."""
    arr = np.zeros((30, 36, 40), np.float32)  # SimpleITK's arrays are (k, j, i)
    lab = np.zeros((30, 36, 40), np.uint8)
    lab[4:12, 6:14, 5:15] = 1                 # organ: i 5..14, j 6..13, k 4..11
    arr[lab == 1] = 100.0
    arr += np.random.default_rng(0).normal(0, 1, arr.shape).astype(np.float32)
    paths = []
    for name, a in (("image", arr), ("label", lab)):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing(spacing)
        img.SetOrigin((10.0, -20.0, 5.0))
        img.SetDirection(tuple(direction.ravel()))
        paths.append(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(img, str(paths[-1]))
    return paths


@pytest.mark.parametrize("direction", [
    np.eye(3),                         # RAS-like axes as written by ITK (LPS world): flipped twice on load
    np.diag([-1.0, -1.0, 1.0]),        # LPS voxel axes
    np.diag([1.0, -1.0, -1.0]),        # another flip
    _rotation(30, 20),                 # oblique: not axis-aligned
], ids=["itk-identity", "lps", "flip-jk", "oblique"])
def test_a_click_inside_the_organ_gives_guidance_inside_the_organ(tmp_path, direction):
    cfg = SiteConfig.model_validate({**TINY, "spacing": [1.0, 1.0, 1.0], "interactive": {"enabled": True}})
    image_path, label_path = _write_case(tmp_path, direction)
    from monai.transforms import Compose

    image = Compose(image_transforms(cfg))({"image": str(image_path)})["image"]
    label = case_transforms(cfg)({"image": str(image_path), "label": str(label_path)})["label"]
    assert tuple(label.shape[1:]) == tuple(image.shape[1:])
    original = np.asarray(image.meta["original_affine"])
    shape = tuple(image.shape[1:])
    for ijk in [(9, 9, 7), (6, 7, 5), (13, 12, 10)]:  # inside the organ, in the file's voxel grid
        assert parse_clicks({"organ": [list(ijk)]}, cfg.guidance_names, 200,
                            [int(s) for s in image.meta["spatial_shape"]]) == [(1, ijk)]
        v = to_network_grid(ijk, original, np.asarray(image.affine), shape)
        assert int(label[0][v]) == 1, f"click {ijk} landed at {v} outside the organ"
        g = guidance_signal([(1, v)], 3, shape, sigma=cfg.interactive.sigma)[1]
        assert int(label[0][np.unravel_index(int(g.argmax()), shape)]) == 1  # its guidance peaks on the organ
        if ijk == (9, 9, 7):  # the organ's centre: most of the click's guidance lies on the organ
            assert float((g * (label[0] == 1)).sum() / g.sum()) > 0.5
    # and a click outside it lands outside
    v = to_network_grid((35, 30, 25), original, np.asarray(image.affine), shape)
    assert int(label[0][v]) == 0
