"""DICOM series and DICOM SEG: write phantoms as a PACS would hold them, check series, label <-> SEG.

Images are single-frame CT or MR instances (one file per slice, geometry in ``ImagePositionPatient``
/ ``ImageOrientationPatient`` / ``PixelSpacing``, intensities as int16 with a rescale). Labels are
DICOM SEG (``pydicom_seg``'s multi-class writer and reader, the library MONAI Label uses), one
segment per task label, named by the task's label names, referencing the source series.

:func:`check_series` is what stands between a PACS and the trainer: a series with a non-image SOP
class, mixed orientation, uneven or missing slices, or mixed in-plane geometry is refused with a
reason instead of being turned into a wrong volume.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["IMAGE_SOP_CLASSES", "SeriesRejected", "check_series", "read_seg", "write_seg", "write_series"]

# Single-frame image storage classes a site's segmentation task can read, by name.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
_SOP_BY_MODALITY = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_TOL = 1e-3  # mm (positions, spacing) and direction cosines


class SeriesRejected(ValueError):
    """A DICOM series that cannot become a volume; the message says why."""


def write_series(image: sitk.Image, out: str | Path, *, modality: str = "CT", patient_id: str = "ANON",
                 study_uid: str | None = None, series_uid: str | None = None,
                 description: str = "GCML phantom") -> str:
    """Write a 3D image as one DICOM file per slice.

    Args:
        image: a scalar 3D SimpleITK image (its spacing, origin and direction become the DICOM geometry).
        out: folder for ``slice_XXXX.dcm`` (created).
        modality: ``CT`` or ``MR`` (its SOP class is used).
        study_uid, series_uid: given, or generated.

    Returns:
        the series instance UID.
    """
    if modality not in _SOP_BY_MODALITY:
        raise ValueError(f"modality: found {modality!r}; expected one of {sorted(_SOP_BY_MODALITY)}")
    if image.GetDimension() != 3:
        raise ValueError(f"image must be 3D; found {image.GetDimension()}D")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x)
    lo, hi = float(arr.min()), float(arr.max())
    slope = max(hi - lo, 1e-6) / 60000.0  # the whole range in int16, to 1/60000 of it
    intercept = lo + 30000.0 * slope
    stored = np.clip(np.rint((arr - intercept) / slope), -32768, 32767).astype(np.int16)
    direction = np.array(image.GetDirection()).reshape(3, 3)  # columns: x, y, z axes
    spacing = image.GetSpacing()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.datetime.now()
    for k in range(stored.shape[0]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_BY_MODALITY[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
        ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.SeriesDescription = description
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(out / f"slice_{k:04d}.dcm", write_like_original=False)
    return series_uid


def check_series(folder: str | Path) -> list[Path]:
    """Check that the DICOM files in ``folder`` form one regular volume; headers only.

    Returns:
        the files, sorted along the slice normal.

    Raises:
        SeriesRejected: no files, a non-image SOP class, more than one series, mixed orientation,
            rows, columns or pixel spacing, or slice positions that are not evenly spaced (a missing
            or duplicate slice).
    """
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    if not files:
        raise SeriesRejected("the series has no instances")
    heads = []
    for f in files:
        try:
            heads.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError) as e:
            raise SeriesRejected(f"instance {f.name} is not readable DICOM: {e}") from None
    sops = {str(h.get("SOPClassUID", "")) for h in heads}
    bad = sops - IMAGE_SOP_CLASSES.keys()
    if bad:
        raise SeriesRejected(f"SOP class {min(bad)} is not a single-frame image class; expected one of "
                             f"{', '.join(IMAGE_SOP_CLASSES.values())}")
    if len({str(h.SeriesInstanceUID) for h in heads}) != 1:
        raise SeriesRejected("instances of more than one series")
    try:
        iop = np.array([[float(v) for v in h.ImageOrientationPatient] for h in heads])
        ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in heads])
        grid = {(int(h.Rows), int(h.Columns), *(round(float(v), 4) for v in h.PixelSpacing)) for h in heads}
    except (AttributeError, TypeError, ValueError) as e:
        raise SeriesRejected(f"missing or malformed geometry tags: {e}") from None
    if np.abs(iop - iop[0]).max() > _TOL:
        raise SeriesRejected("mixed orientation: ImageOrientationPatient differs between instances")
    if len(grid) != 1:
        raise SeriesRejected(f"mixed in-plane geometry (rows, columns, pixel spacing): {sorted(grid)[:2]}")
    normal = np.cross(iop[0, :3], iop[0, 3:])
    pos = ipp @ normal
    order = np.argsort(pos)
    if len(files) > 1:
        gaps = np.diff(pos[order])
        step = float(np.median(gaps))
        if step < _TOL:
            raise SeriesRejected("duplicate slice positions")
        if np.abs(gaps - step).max() > max(_TOL, 0.01 * step):
            worst = int(np.argmax(np.abs(gaps - step)))
            raise SeriesRejected(
                f"slices are not evenly spaced (a missing slice?): gap of {gaps[worst]:.3f} mm after slice "
                f"{worst + 1} of {len(files)}, expected {step:.3f} mm")
    return [files[i] for i in order]


def _segment(name: str, value: int) -> dict:
    return {
        "labelID": int(value),
        "SegmentLabel": name,
        "SegmentDescription": name,
        "SegmentAlgorithmType": "SEMIAUTOMATIC",
        "SegmentAlgorithmName": "GCML",
        "SegmentedPropertyCategoryCodeSequence": {
            "CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"},
        "SegmentedPropertyTypeCodeSequence": {
            "CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": name},
    }


def write_seg(label: sitk.Image, series_files: list[Path], labels: Mapping[str, int], out: str | Path) -> str:
    """Write a task label as DICOM SEG referencing its source series.

    Args:
        label: integer label in the geometry of the series, values in ``{0} | labels.values()``.
        series_files: the source series' files (their UIDs are referenced).
        labels: the task's labels, name -> value; every one becomes a segment of that name.
        out: the ``.dcm`` file to write.

    Returns:
        the SEG's series instance UID.
    """
    meta = {
        "ContentCreatorName": "GCML", "ClinicalTrialSeriesID": "GCML", "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "GCML label", "SeriesNumber": "300", "InstanceNumber": "1",
        "ContentLabel": "SEGMENTATION", "ContentDescription": "GCML final label",
        "ClinicalTrialCoordinatingCenterName": "GCML", "BodyPartExamined": "",
        "segmentAttributes": [[_segment(n, v) for n, v in sorted(labels.items(), key=lambda kv: kv[1])]],
    }
    writer = pydicom_seg.MultiClassWriter(template=pydicom_seg.template.from_dcmqi_metainfo(meta),
                                          inplane_cropping=False, skip_empty_slices=False,
                                          skip_missing_segment=False)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files]
    seg = writer.write(sitk.Cast(label, sitk.sitkUInt16), sources)
    seg.save_as(str(out))
    return str(seg.SeriesInstanceUID)


def read_seg(path: str | Path, labels: Mapping[str, int]) -> tuple[sitk.Image, str]:
    """Read a DICOM SEG back as a task label, segments mapped to task values by name.

    Returns:
        ``(label, referenced series UID)``: a ``uint8`` image in the SEG's geometry.

    Raises:
        SeriesRejected: a segment name that is not a task label, or no referenced series.
    """
    ds = pydicom.dcmread(str(path))
    ref = ds.get("ReferencedSeriesSequence")
    if not ref:
        raise SeriesRejected("DICOM SEG references no series")
    by_number = {}
    for seg in ds.SegmentSequence:
        name = str(seg.SegmentLabel)
        if name not in labels:
            raise SeriesRejected(f"DICOM SEG segment {name!r} is not a task label; expected {sorted(labels)}")
        by_number[int(seg.SegmentNumber)] = labels[name]
    result = pydicom_seg.MultiClassReader().read(ds)
    arr = np.asarray(result.data)
    mapped = np.zeros(arr.shape, np.uint8)
    for number, value in by_number.items():
        mapped[arr == number] = value
    out = sitk.GetImageFromArray(mapped)
    out.CopyInformation(result.image)
    return out, str(ref[0].SeriesInstanceUID)
