"""MONAI Label's datastores, with every label upload validated and remapped before it is stored.

:class:`ValidatedLabels` is the check; :class:`GCMLDatastore` puts it in front of MONAI Label's
:class:`LocalDatastore` (a studies folder), :class:`gcml_app.site.pacs.PacsDatastore` in front of its
``DICOMWebDatastore`` (a PACS). Both also show each image's current active-learning scores in its info
(:class:`ScoredImages`, :mod:`gcml_app.site.scoring`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel

from gcml_app.errors import LabelRejected
from gcml_app.site.labels import PassedLabels, check_tag, conform_label
from gcml_app.util.files import atomic_write

__all__ = ["CurrentFile", "GCMLDatastore", "ScoredImages", "ValidatedLabels"]

logger = logging.getLogger(__name__)


class ScoredImages:
    """Mixin for a MONAI Label datastore: ``get_image_info`` adds the image's current scores
    (:meth:`gcml_app.site.scorebook.ScoreBook.info_of`) once :meth:`show_scores` is called."""

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


class CurrentFile:
    """Mixin for MONAI Label's :class:`LocalDatastore` (a studies folder, or a PACS site's cache): its JSON file
    is written whole or not at all, and never from an older copy.

    MONAI Label 0.8.5 rewrites the whole ``datastore_v2.json`` in place on every label save, from the copy
    the saving process holds in memory. A crash mid-write leaves a torn file; and the server and the
    training subprocess each hold a copy, so a save from one wrote its older copy over a label the other
    had saved since (the label file stayed, its entry was gone). Here the file is replaced atomically
    (a temporary file renamed over it), a save re-reads it under the datastore's lock when another process
    changed it, and the label file itself is written the same way. The server's watcher reloads the file
    when another process replaces it (a rename, where MONAI Label watched only in-place writes).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if getattr(self, "_handler", None) is not None:  # auto_reload: MONAI Label's file watcher
            self._handler.on_moved = self._on_replaced

    def _on_replaced(self, event) -> None:
        if getattr(event, "dest_path", None) != self._datastore_config_path:
            return
        if self._ignore_event_config:  # our own write
            self._ignore_event_config = False
            return
        self._init_from_datastore_file()

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            body = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write(Path(self._datastore_config_path), body.encode())
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _reload_if_changed(self) -> None:
        """Re-read the JSON file if another process replaced it since this one last read or wrote it (under the lock)."""
        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            self._datastore = LocalDatastoreModel.model_validate_json(Path(path).read_text())
            self._datastore.base_path = self._datastore_path
            self._config_ts = os.stat(path).st_mtime

    def _store_label(self, image_id: str, label_path: str, label_tag: str, info: dict[str, Any]) -> str:
        """MONAI Label's ``save_label``, from the current file, with the label and the file written atomically."""
        _, ext = self._to_id(os.path.basename(label_path))
        with FileLock(self._lock_file):
            self._reload_if_changed()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise LabelRejected(f"image {image_id!r} is not in the datastore")
            folder = Path(self._datastore.label_path(label_tag))
            folder.mkdir(parents=True, exist_ok=True)
            name = self._filename(image_id, ext)
            atomic_write(folder / name, Path(label_path).read_bytes())
            obj.labels[label_tag] = DataModel(info={**info, "ts": int(time.time()), "name": name}, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id


class GCMLDatastore(ScoredImages, CurrentFile, ValidatedLabels, LocalDatastore):
    """MONAI Label's :class:`LocalDatastore` (a studies folder) with validated label uploads.

    Args:
        datastore_path: the studies folder.
        labels: the task's labels, name -> index.
        kwargs: passed to :class:`LocalDatastore`.
    """

    def __init__(self, datastore_path: str, labels: Mapping[str, int], **kwargs: Any):
        self.task_labels = dict(labels)
        super().__init__(datastore_path, **kwargs)
