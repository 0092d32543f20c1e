import numpy as np
import pytest
import SimpleITK as sitk

from gcml_app.errors import LabelRejected
from gcml_app.site.labels import check_tag, conform_label

TASK = {"organ": 1, "lesion": 2}
SHAPE = (8, 10, 12)  # SimpleITK array order (z, y, x)


def image(tmp_path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    im = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
    im.SetSpacing(spacing)
    im.SetOrigin(origin)
    path = tmp_path / "img.nii.gz"
    sitk.WriteImage(im, str(path))
    return path


def label(tmp_path, arr=None, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None, name="lab.nii.gz"):
    arr = np.zeros(SHAPE, np.uint8) if arr is None else arr
    lab = sitk.GetImageFromArray(arr)
    lab.SetSpacing(spacing)
    lab.SetOrigin(origin)
    if direction is not None:
        lab.SetDirection(direction)
    path = tmp_path / name
    sitk.WriteImage(lab, str(path))
    return path


def values(*vals):
    arr = np.zeros(SHAPE, np.int16)
    for i, v in enumerate(vals):
        arr[i] = v
    return arr


REJECT = [
    # (label kwargs, label_info, message)
    ({"arr": np.zeros((8, 10, 11), np.uint8)}, None, r"label shape \(11, 10, 8\) does not match image shape \(12, 10, 8\)"),
    ({"spacing": (1.0, 1.0, 2.5)}, None, r"label spacing \(1, 1, 2.5\) mm does not match image spacing \(1, 1, 2\) mm"),
    ({"origin": (0.0, 5.0, 0.0)}, None, r"label origin \(0, 5, 0\) does not match image origin \(0, 0, 0\)"),
    ({"direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}, None, r"label direction .* does not match image direction"),
    ({"arr": values(0, 1, 3)}, None, r"label values \[3\] are not task labels; expected values in \{0: 'background', 1: 'organ', 2: 'lesion'\}"),
    ({"arr": values(0, -1)}, None, r"label values \[-1\] are not task labels"),
    ({"arr": values(0, 1, 2)}, [{"name": "Organ", "idx": 1}], r"label values \[2\] have no segment in label_info"),
    ({"arr": values(0, 1)}, [{"name": "tumour", "idx": 1}], r"segment 'tumour' \(value 1\) is not a label of this task; expected one of \['organ', 'lesion'\]"),
    ({"arr": values(0, 1)}, [{"name": "organ", "idx": "1"}], r"expected an integer 'idx'"),
    ({"arr": values(0, 1).astype(np.float32) + 0.5}, None, r"label has non-integer values"),
]


@pytest.mark.parametrize("kwargs, info, message", REJECT)
def test_rejections_name_the_mismatch(tmp_path, kwargs, info, message):
    with pytest.raises(LabelRejected, match=message):
        conform_label(image(tmp_path), label(tmp_path, **kwargs), TASK, info)


def test_4d_label_is_rejected_with_a_hint(tmp_path):
    vec = sitk.Compose([sitk.GetImageFromArray(np.zeros(SHAPE, np.uint8))] * 2)
    vec.SetSpacing((1.0, 1.0, 2.0))
    path = tmp_path / "seg.nrrd"
    sitk.WriteImage(vec, str(path))
    with pytest.raises(LabelRejected, match=r"3D labelmap with one value per voxel; found 3D with 2 components.*\.nii\.gz"):
        conform_label(image(tmp_path), path, TASK)


def test_unreadable_label(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(LabelRejected, match="label file unreadable"):
        conform_label(image(tmp_path), bad, TASK)


@pytest.mark.parametrize(
    "info, expected",
    [
        (None, {0: 0, 1: 1, 2: 2}),  # values are already task indices
        ([{"name": "lesion", "idx": 1}, {"name": "organ", "idx": 2}], {0: 0, 1: 2, 2: 1}),  # Slicer order
        ([{"name": "LESION", "idx": 1}, {"name": "Organ", "idx": 2}], {0: 0, 1: 2, 2: 1}),  # case-insensitive
        ([{"name": "background", "idx": 1}, {"name": "organ", "idx": 2}], {0: 0, 1: 0, 2: 1}),
    ],
)
def test_slicer_segments_are_remapped_by_name(tmp_path, info, expected):
    src = values(0, 1, 2)
    out = conform_label(image(tmp_path), label(tmp_path, arr=src), TASK, info)
    arr = sitk.GetArrayFromImage(out)
    for s, t in expected.items():
        assert np.all(arr[src == s] == t)
    assert out.GetSpacing() == (1.0, 1.0, 2.0)


def test_small_float_rounding_in_geometry_is_accepted(tmp_path):
    out = conform_label(image(tmp_path), label(tmp_path, spacing=(1.0000001, 1.0, 2.0), origin=(1e-6, 0, 0)), TASK)
    assert out.GetOrigin() == (0.0, 0.0, 0.0)  # the image's exact geometry is kept


@pytest.mark.parametrize("tag", ["../../etc", "final/x", "", "a" * 65, "fin al"])
def test_unsafe_tags(tag):
    with pytest.raises(LabelRejected, match="label tag .* rejected"):
        check_tag(tag)


OTHER_VALUES = [
    # (label values, label_info, what the stored result holds)
    ((0, 1, 2, 7), None, {0, 1, 2, 7}),  # a 10-organ map training 2: accepted as it is; rounds read 7 as 0
    ((0, 1, 300), None, {0, 1, 300}),  # uint16 maps keep their values
    ((0, 1, 2), [{"name": "organ", "idx": 1}, {"name": "liver", "idx": 2}], {0, 1}),  # an extra segment -> 0
]


@pytest.mark.parametrize("vals, info, stored", OTHER_VALUES)
def test_other_values_background_accepts_label_maps_with_more_classes(tmp_path, vals, info, stored):
    out = conform_label(image(tmp_path), label(tmp_path, values(*vals)), TASK, info, other_values="background")
    assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) == stored
    with pytest.raises(LabelRejected, match=r"not (task labels|a label of this task)"):
        conform_label(image(tmp_path), label(tmp_path, values(*vals)), TASK, info)  # refuse, the default


def test_extra_values_are_background_in_network_channels():
    import torch

    from gcml_app.ml.transforms import TaskChannels

    lab = torch.tensor([[0, 1, 4, 7, 300]])
    assert TaskChannels("label", [1, 4])({"label": lab})["label"].tolist() == [[0, 1, 2, 0, 0]]
