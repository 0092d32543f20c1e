"""DICOM series and SEG (no PACS): phantoms as series, the series checks, label <-> SEG round trips."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from gcml_app.sim.phantoms import LABELS, STYLES, make_case, write_dicom_studies
from gcml_app.site.dicom import SeriesRejected, check_series, read_seg, write_seg, write_series


def _image(spacing=(1.25, 1.25, 1.5), origin=(3.0, -4.0, 5.0), direction=None):
    img, lab = make_case(STYLES["s2"], np.random.default_rng(0), shape=(12, 16, 20))
    im = sitk.GetImageFromArray(img)
    im.SetSpacing(spacing)
    im.SetOrigin(origin)
    if direction is not None:
        im.SetDirection(direction)
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(im)
    return im, label


def _read_volume(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in check_series(folder)])
    return reader.Execute()


# A rotated (oblique) direction: the columns x, y, z of a rotation about z by 30 degrees.
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
OBLIQUE = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("direction", [None, OBLIQUE], ids=["axial", "oblique"])
def test_series_round_trip_keeps_geometry_and_intensities(tmp_path, direction):
    image, _ = _image(direction=direction)
    uid = write_series(image, tmp_path / "s", modality="MR")
    back = _read_volume(tmp_path / "s")
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-4)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-4)
    a, b = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(back)
    assert np.abs(a - b).max() <= (a.max() - a.min()) / 30000  # int16 with a rescale
    head = pydicom.dcmread(next((tmp_path / "s").iterdir()), stop_before_pixels=True)
    assert head.SeriesInstanceUID == uid and head.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage


def _drop(files):
    files[5].unlink()


def _set(index, **tags):
    def edit(files):
        for f in files if index is None else [files[index]]:
            ds = pydicom.dcmread(f)
            for k, v in tags.items():
                setattr(ds, k, v)
            ds.save_as(f)
    return edit


def _garbage(files):
    files[3].write_bytes(b"not a dicom file" * 10)


def _empty(files):
    for f in files:
        f.unlink()


BAD_SERIES = [
    ("missing slice", _drop, "not evenly spaced (a missing slice?): gap of 3.000 mm after slice 5 of 11"),
    ("mixed orientation", _set(4, ImageOrientationPatient=[0, 1, 0, 0, 0, -1]), "mixed orientation"),
    ("non-image SOP class", _set(None, SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11"),
     "SOP class 1.2.840.10008.5.1.4.1.1.88.11 is not a single-frame image class"),
    ("two series", _set(2, SeriesInstanceUID="1.2.3.4"), "instances of more than one series"),
    ("mixed rows", _set(7, Rows=8), "mixed in-plane geometry"),
    ("mixed pixel spacing", _set(7, PixelSpacing=[2.0, 2.0]), "mixed in-plane geometry"),
    ("duplicate position", _set(1, ImagePositionPatient=[3.0, -4.0, 5.0]), "not evenly spaced"),
    ("no geometry", _set(0, ImagePositionPatient=None), "missing or malformed geometry tags"),
    ("unreadable instance", _garbage, "is not readable DICOM"),
    ("empty", _empty, "the series has no instances"),
]


@pytest.mark.parametrize("name,corrupt,message", BAD_SERIES, ids=[b[0] for b in BAD_SERIES])
def test_series_that_is_not_one_regular_volume_is_rejected_with_the_reason(tmp_path, name, corrupt, message):
    image, _ = _image()
    write_series(image, tmp_path / "s")
    corrupt(sorted((tmp_path / "s").iterdir()))
    with pytest.raises(SeriesRejected, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        check_series(tmp_path / "s")


def test_check_series_sorts_slices_along_the_normal(tmp_path):
    image, _ = _image()
    write_series(image, tmp_path / "s")
    for f in sorted((tmp_path / "s").iterdir()):  # file names no longer follow the slice order
        f.rename(f.with_name(f"{pydicom.dcmread(f).SOPInstanceUID}.dcm"))
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in check_series(tmp_path / "s")]
    assert z == sorted(z) and len(z) == 12


@pytest.mark.parametrize("labels", [LABELS, {"liver": 1, "tumour": 3}], ids=["phantom", "gap-in-values"])
def test_seg_round_trip_names_segments_and_keeps_values_and_geometry(tmp_path, labels):
    image, label = _image(direction=OBLIQUE)
    arr = sitk.GetArrayFromImage(label)
    arr = np.select([arr == 1, arr == 2], list(labels.values()), 0).astype(np.uint8)
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(image)
    uid = write_series(image, tmp_path / "s")
    seg_uid = write_seg(label, check_series(tmp_path / "s"), labels, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert ds.Modality == "SEG" and ds.SeriesInstanceUID == seg_uid
    assert [s.SegmentLabel for s in ds.SegmentSequence] == list(labels)
    back, ref = read_seg(tmp_path / "seg.dcm", labels)
    assert ref == uid
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-4)


def test_seg_with_a_segment_that_is_not_a_task_label_is_rejected(tmp_path):
    image, label = _image()
    write_series(image, tmp_path / "s")
    write_seg(label, check_series(tmp_path / "s"), LABELS, tmp_path / "seg.dcm")
    with pytest.raises(SeriesRejected, match=r"segment 'organ' is not a task label; expected \['liver'\]"):
        read_seg(tmp_path / "seg.dcm", {"liver": 1})


def test_dicom_sample_data_has_one_series_per_case_and_seg_for_the_labelled(tmp_path):
    out = write_dicom_studies(tmp_path / "dicom", "s1", cases=3, labelled=2)
    series = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in series] == ["case_000", "case_001", "case_002"]
    assert sorted(p.name for p in out.glob("*_seg.dcm")) == ["case_000_seg.dcm", "case_001_seg.dcm"]
    patients = {pydicom.dcmread(next(p.iterdir())).PatientID for p in series}
    assert patients == {"GCML-000", "GCML-001", "GCML-002"}
    _, ref = read_seg(out / "case_001_seg.dcm", LABELS)
    assert ref == pydicom.dcmread(next((out / "case_001").iterdir())).SeriesInstanceUID
