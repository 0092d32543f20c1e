"""MONAI Label's datastores, with every label upload validated and remapped before it is stored.

:class:`ValidatedLabels` is the check; :class:`GCMLDatastore` puts it in front of MONAI Label's
:class:`LocalDatastore` (a studies folder), :class:`gcml_app.site.pacs.PacsDatastore` in front of its
``DICOMWebDatastore`` (a PACS). Both also show each image's current active-learning scores in its info
(:class:`ScoredImages`, :mod:`gcml_app.site.scoring`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from monailabel.datastore.local import LocalDatastore

from gcml_app.errors import LabelRejected
from gcml_app.site.labels import PassedLabels, check_tag, conform_label

__all__ = ["GCMLDatastore", "ScoredImages", "ValidatedLabels"]

logger = logging.getLogger(__name__)


class ScoredImages:
    """Mixin for a MONAI Label datastore: ``get_image_info`` adds the image's current scores
    (:meth:`gcml_app.site.scoring.ScoreBook.info_of`) once :meth:`show_scores` is called."""

    _scores = None  # (ScoreBook, committee function) after show_scores
    _committee_memo: tuple[float, Any] | None = None

    def show_scores(self, book, committee_of) -> None:
        """``committee_of()`` gives the models scores must come from (read at most once a second)."""
        self._scores = (book, committee_of)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        if self._scores is None or not info:
            return info
        book, committee_of = self._scores
        now = time.monotonic()
        if self._committee_memo is None or now - self._committee_memo[0] > 1.0:
            self._committee_memo = (now, committee_of())
        return {**info, **book.info_of(image_id, self._committee_memo[1])}


class ValidatedLabels:
    """Mixin for a MONAI Label datastore: ``save_label`` refuses labels that do not fit the image or task.

    The class it is mixed into stores the conformed label (:meth:`_store_label`, by default its own
    ``save_label``); ``task_labels`` (name -> index) must be set before the first upload.
    """

    task_labels: dict[str, int]
    last_saved: tuple[str, str] | None = None  # (image id, tag) of the last accepted upload
    passed_root: Path | None = None  # where rounds look up labels that passed (PassedLabels); None: not recorded
    other_values: str = "refuse"  # labels.other_values: values (segments) that are no task label

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Validate (geometry, values), remap Slicer segment values by name, then store as NIfTI.

        Raises:
            LabelRejected: the image is unknown, the tag is unsafe, or the label does not fit; the
                datastore is left unchanged.
        """
        check_tag(label_tag)
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise LabelRejected(f"image {image_id!r} is not in the datastore")
        info = dict(label_info or {})
        segments = info.get("label_info")
        conformed = conform_label(image_uri, label_filename, self.task_labels, segments, self.other_values)
        tmp = Path(tempfile.mkdtemp(prefix="gcml-label-"))
        try:
            out = tmp / "label.nii.gz"
            sitk.WriteImage(conformed, str(out), useCompression=True)
            label_id = self._store_label(image_id, str(out), label_tag, info)
            self.last_saved = (image_id, label_tag)
            self._remember(image_id, image_uri, label_tag)
            return label_id
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _remember(self, image_id: str, image_uri: str, label_tag: str) -> None:
        """Record the stored final label as checked, so the next round does not check it again (best effort)."""
        if self.passed_root is None or label_tag != "final":
            return
        try:
            stored = self.get_label_uri(image_id, label_tag)
            if stored:
                passed = PassedLabels(self.passed_root, self.task_labels, self.other_values)
                passed.add(image_uri, stored)
                passed.save()
        except OSError as e:  # a memo: the round checks the label itself instead
            logger.warning(f"label of {image_id} stored, but not recorded as checked ({e}); the next round checks it")

    def _store_label(self, image_id: str, label_path: str, label_tag: str, info: dict[str, Any]) -> str:
        """Store a label that passed the checks (values are task indices, geometry the image's)."""
        return super().save_label(image_id, label_path, label_tag, info)


class GCMLDatastore(ScoredImages, ValidatedLabels, LocalDatastore):
    """MONAI Label's :class:`LocalDatastore` (a studies folder) with validated label uploads.

    Args:
        datastore_path: the studies folder.
        labels: the task's labels, name -> index.
        kwargs: passed to :class:`LocalDatastore`.
    """

    def __init__(self, datastore_path: str, labels: Mapping[str, int], **kwargs: Any):
        self.task_labels = dict(labels)
        super().__init__(datastore_path, **kwargs)
