"""Checks a label volume against its image and the task's labels before it can reach training.

Slicer's MONAI Label module uploads segment values ``1..n`` in segment order with the names in
``label_info`` (``[{"name": "lesion", "idx": 1}, ...]``); :func:`conform_label` remaps them to
the task's indices by name. Without ``label_info`` the values must already be task indices.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from gcml_app.errors import LabelRejected
from gcml_app.util.files import ContentHashes, merge_json, read_json, sha256_bytes

__all__ = ["PassedLabels", "check_tag", "conform_label"]

_TAG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Pixel types a labelmap may use: at most 4 bytes a voxel, so decoding is bounded by 4x the image's voxels.
_LABEL_PIXELS = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
                 sitk.sitkFloat32}

SPACING_RTOL = 1e-3
ORIGIN_TOL_VOXELS = 1e-2
DIRECTION_ATOL = 1e-4


def check_tag(tag: str) -> str:
    if not _TAG.match(tag or ""):
        raise LabelRejected(f"label tag {tag!r} rejected: expected 1-64 letters, digits, '_' or '-'")
    return tag


def _read_info(path: str | Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def _check_geometry(image: sitk.ImageFileReader, label: sitk.ImageFileReader) -> None:
    # Multi-channel images may carry channels as a 4th axis; compare the spatial part only.
    size = tuple(image.GetSize()[:3])
    spacing = np.array(image.GetSpacing()[:3])
    origin = np.array(image.GetOrigin()[:3])
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)[:3, :3]

    if tuple(label.GetSize()) != size:
        raise LabelRejected(f"label shape {tuple(label.GetSize())} does not match image shape {size}")
    if not np.allclose(label.GetSpacing(), spacing, rtol=SPACING_RTOL, atol=0):
        raise LabelRejected(
            f"label spacing {_fmt(label.GetSpacing())} mm does not match image spacing {_fmt(spacing)} mm"
        )
    if not np.allclose(label.GetOrigin(), origin, rtol=0, atol=ORIGIN_TOL_VOXELS * spacing.min()):
        raise LabelRejected(f"label origin {_fmt(label.GetOrigin())} does not match image origin {_fmt(origin)}")
    if not np.allclose(np.array(label.GetDirection()).reshape(3, 3), direction, atol=DIRECTION_ATOL):
        raise LabelRejected(
            f"label direction {_fmt(label.GetDirection())} does not match image direction {_fmt(direction.ravel())}"
        )


def _value_map(label_info: Sequence[Mapping[str, Any]], task: Mapping[str, int],
               other_values: str = "refuse") -> dict[int, int]:
    """Slicer segment value -> task index, by segment name (case-insensitive); with ``other_values:
    background``, a segment that is no task label -> 0."""
    by_name = {k.lower(): v for k, v in task.items()}
    by_name["background"] = 0
    out: dict[int, int] = {0: 0}
    for seg in label_info:
        name, idx = str(seg.get("name", "")), seg.get("idx")
        if not isinstance(idx, int):
            raise LabelRejected(f"label_info entry {dict(seg)} rejected: expected an integer 'idx'")
        if name.lower() not in by_name and other_values == "background":
            out[idx] = 0
            continue
        if name.lower() not in by_name:
            raise LabelRejected(
                f"segment {name!r} (value {idx}) is not a label of this task; expected one of {list(task)}"
            )
        out[idx] = by_name[name.lower()]
    return out


def conform_label(
    image_path: str | Path,
    label_path: str | Path,
    labels: Mapping[str, int],
    label_info: Sequence[Mapping[str, Any]] | None = None,
    other_values: str = "refuse",
) -> sitk.Image:
    """Validate a label against its image and the task, and return it in task indices.

    Args:
        image_path: the datastore image the label belongs to.
        label_path: the uploaded label (any format SimpleITK reads: NIfTI, NRRD, ...).
        labels: the task's labels, name -> index (background is 0).
        label_info: Slicer's segments ``[{"name", "idx"}]``; ``None`` means values are task indices.
        other_values: ``labels.other_values``: ``refuse`` a value (or segment) that is no task label, or
            keep it as ``background``: a label map with more classes than the task is then accepted as
            it is (training and validation read the extra values as 0); an upload's extra segments
            are stored as 0.

    Returns:
        a label image with the image's geometry: ``uint8`` with values in ``{0} | labels.values()``, or
        with ``background`` the file's own values (``uint16`` when they pass 255).

    Raises:
        LabelRejected: not a 3D single-component volume; shape, spacing, origin or direction differ
            from the image's; non-integer values; values with no segment or no task label.
    """
    try:
        image = _read_info(image_path)
        header = _read_info(label_path)  # the header only: nothing is decoded until it fits the image
    except RuntimeError as e:
        raise LabelRejected(f"label file unreadable: {str(e).strip().splitlines()[-1]}") from None
    if header.GetDimension() != 3 or header.GetNumberOfComponents() != 1:
        raise LabelRejected(
            f"label must be a 3D labelmap with one value per voxel; found {header.GetDimension()}D with "
            f"{header.GetNumberOfComponents()} components (in Slicer's MONAI Label settings, "
            "save labels as .nii.gz, not overlapping .seg.nrrd)"
        )
    if header.GetPixelID() not in _LABEL_PIXELS:
        raise LabelRejected(f"label pixel type {sitk.GetPixelIDValueAsString(header.GetPixelID())} refused; "
                            "expected integers (or float32 holding integers)")
    _check_geometry(image, header)
    try:
        label = header.Execute()
    except RuntimeError as e:
        raise LabelRejected(f"label file unreadable: {str(e).strip().splitlines()[-1]}") from None

    arr = sitk.GetArrayFromImage(label)
    values = np.unique(arr)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise LabelRejected(f"label has non-integer values {values[np.mod(values, 1) != 0][:5].tolist()}")
    values = values.astype(np.int64)

    allowed = {0, *labels.values()}
    if label_info:
        vmap = _value_map(label_info, labels, other_values)
        missing = sorted(int(v) for v in values if int(v) not in vmap)
        if missing:
            raise LabelRejected(f"label values {missing} have no segment in label_info {list(label_info)}")
        lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
        for src, dst in vmap.items():
            if 0 <= src < len(lut):
                lut[src] = dst
        out = lut[arr.astype(np.int64)]
    else:
        bad = sorted(int(v) for v in values if int(v) not in allowed)
        if bad and other_values == "background":
            if values.min() < 0 or values.max() > 65535:
                raise LabelRejected(f"label values {int(values.min())}..{int(values.max())} out of range; expected 0..65535")
            bad = []
        if bad:
            names = {0: "background", **{i: n for n, i in labels.items()}}
            raise LabelRejected(f"label values {bad} are not task labels; expected values in {names} (or set "
                                "labels.other_values: background to read the others as background)")
        out = arr.astype(np.uint8 if values.max() <= 255 else np.uint16)

    result = sitk.GetImageFromArray(out)
    result.SetSpacing(image.GetSpacing()[:3])
    result.SetOrigin(image.GetOrigin()[:3])
    result.SetDirection(tuple(np.array(image.GetDirection()).reshape(image.GetDimension(), -1)[:3, :3].ravel()))
    return result


class PassedLabels:
    """Label files that passed :func:`conform_label`, remembered by content, so a label is checked once.

    A pair is named by the sha256 of the image's and the label's content and of the task's labels
    (``labels_ok.json`` beside the memoised hashes in ``root``, the case cache folder): an upload is
    recorded as it is stored, and a round checks only files it does not find here (labels placed in
    the datastore by other means, or replaced).

    Args:
        root: the folder of ``hashes.json`` and ``labels_ok.json``.
        labels: the task's labels, name -> index.
        other_values: ``labels.other_values`` (a label that passed under ``background`` may not under ``refuse``).
    """

    def __init__(self, root: Path, labels: Mapping[str, int], other_values: str = "refuse"):
        self.path = Path(root) / "labels_ok.json"
        self.hashes = ContentHashes(Path(root) / "hashes.json")
        # the policy joins the key only when it is not the default: labels passed before it existed stay passed
        self._task = json.dumps(list(labels.items()) + ([other_values] if other_values != "refuse" else []))
        self._passed = read_json(self.path)
        self._new: dict[str, int] = {}
        self._seen: set[str] = set()  # the pairs asked about or added since this object was made
        self._known = set(self._passed)  # the pairs on record when it was made

    def _key(self, image: str | Path, label: str | Path) -> str:
        key = sha256_bytes(f"{self.hashes.of(image)} {self.hashes.of(label)} {self._task}".encode())
        self._seen.add(key)
        return key

    def __contains__(self, pair: tuple[str | Path, str | Path]) -> bool:
        return self._key(*pair) in self._passed

    def add(self, image: str | Path, label: str | Path) -> None:
        key = self._key(image, label)
        self._passed[key] = self._new[key] = int(time.time())

    def save(self, prune: bool = False) -> None:
        """Record the pairs that passed since the last save.

        Args:
            prune: this object was asked about every final label the datastore holds (a round's listing):
                drop the pairs it did not see (labels replaced or deleted) unless another process recorded
                them since this object read the memo; and the hashes of files that are gone. Both memos then stay
                bounded by the files present.
        """
        self.hashes.save(prune=prune)
        seen, known = self._seen, self._known
        merge_json(self.path, self._new, (lambda key, _: key in seen or key not in known) if prune else None)
        self._new = {}
