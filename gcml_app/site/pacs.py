"""A site whose images live in a PACS: MONAI Label's DICOMweb datastore, validated and fault-tolerant.

``gcml serve --studies https://pacs.example/dicom-web`` (MONAI Label's ``--studies`` with a DICOMweb
URL) makes :class:`PacsDatastore` the site's datastore (docs/design.md, "PACS sites"):

* **Reading.** Series are found with QIDO (``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``, default CT) and
  fetched with WADO on first use into a local cache. Each series is checked (:func:`gcml_app.site.dicom.check_series`)
  before it becomes a NIfTI volume; a series that fails is skipped, with its reason in the log, in
  ``<cache>/skipped.json`` and in ``/gcml/status``. The case id is the series instance UID.
* **Labels.** A final label from Slicer is validated and remapped like any other
  (:class:`gcml_app.site.datastore.ValidatedLabels`), written to the PACS as DICOM SEG over STOW
  (segments named as the task's labels, referencing the source series), and only then stored in
  the cache. DICOM SEGs already in the PACS become final labels in the cache (:meth:`PacsDatastore.sync_labels`);
  a SEG never overwrites a label already cached. Beyond ``store.pacs_cache_max_gb`` the least recently
  used series lose their DICOM instances, then unlabelled series their volumes (:meth:`PacsDatastore.evict`);
  labels and labelled volumes stay.
* **Faults.** While the PACS is unreachable the site keeps serving what is cached: listing falls back
  to the cached series, each failure is logged once with the URL, and the PACS is asked again after
  ``RETRY_DOWN_S``. An uncached series then answers :class:`PacsUnavailable` (HTTP 503).
* **Credentials** are MONAI Label's own settings (environment): ``MONAI_LABEL_DATASTORE_USERNAME``
  / ``_PASSWORD`` (or the older ``MONAI_LABEL_DICOMWEB_USERNAME`` / ``_PASSWORD``), never the site
  YAML, never the URL, never a log line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydicom
import requests
import SimpleITK as sitk
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag

from gcml_app.errors import PacsUnavailable
from gcml_app.site.datastore import CurrentFile, ScoredImages, ValidatedLabels
from gcml_app.site.dicom import SeriesRejected, check_series, read_seg, write_seg
from gcml_app.site.labels import conform_label
from gcml_app.util.files import atomic_write
from gcml_app.util.jsonl import clean

__all__ = ["PacsDatastore", "PacsUnavailable"]

logger = logging.getLogger(__name__)

RETRY_DOWN_S = 30.0  # after a failure, how long the cache answers alone before the PACS is asked again
LIST_TTL_S = 30.0  # how long a QIDO listing (series, SEGs) is reused
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _read_map(path: Path) -> dict[str, str]:
    """A small JSON map of the cache (``skipped.json``, ``segs.json``); missing or torn reads as empty."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_map(path: Path, entries: dict[str, str]) -> None:
    """Merge ``entries`` into a JSON map of the cache, under a file lock shared with other processes."""
    with FileLock(str(path) + ".lock"):
        atomic_write(path, json.dumps({**_read_map(path), **entries}, indent=1, sort_keys=True).encode())


def _reason(e: BaseException) -> str:
    """An exception in one short line (requests' messages repeat the URL and the retry state)."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code}"
    if isinstance(e, requests.ConnectionError):
        return "connection failed"
    if isinstance(e, requests.Timeout):
        return "timed out"
    return clean(f"{type(e).__name__}: {e}", 160)


class PacsDatastore(ScoredImages, ValidatedLabels, CurrentFile, DICOMWebDatastore):
    """MONAI Label's :class:`DICOMWebDatastore` with validated labels, series checks and a cache that
    keeps serving while the PACS is down (see the module docstring).

    Args:
        client: the DICOMweb client (:func:`gcml_app.site.dicomweb.pacs_client`).
        labels: the task's labels, name -> index.
        cache_path: where series, volumes and labels are cached (a folder per PACS URL under it).
        search_filter: QIDO filter for the site's image series (MONAI Label's setting by default).
        max_cache_bytes: the cache's bound (:meth:`evict` after each fetch); ``None``: unbounded.
    """

    def __init__(self, client, labels: Mapping[str, int], cache_path: str | Path,
                 search_filter: dict[str, Any] | None = None, max_cache_bytes: int | None = None):
        self.task_labels = dict(labels)
        self.max_cache_bytes = max_cache_bytes
        self.url = client.base_url
        self._health_lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._last_error = ""
        self._listing: tuple[float, list[str]] | None = None
        self._synced_at = 0.0
        super().__init__(client, dict(search_filter or settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER),
                         cache_path=str(cache_path), fetch_by_frame=False, convert_to_nifti=True)
        self.cache = Path(self._datastore_path)
        self._fetch_lock = FileLock(str(self.cache / ".fetch.lock"))
        self._skipped_path = self.cache / "skipped.json"
        self._segs_path = self.cache / "segs.json"

    # ---------------------------------------------------------------- health
    def _call(self, what: str, fn, *args, **kwargs):
        """Run one PACS request; on failure note the outage (logged once) and raise :class:`PacsUnavailable`."""
        with self._health_lock:
            if self._down_since is not None and time.time() < self._retry_at:
                raise PacsUnavailable(f"PACS {self.url} is unreachable ({self._last_error}); retrying after "
                                      f"{self._retry_at - time.time():.0f} s")
        try:
            out = fn(*args, **kwargs)
        except (requests.RequestException, OSError) as e:
            with self._health_lock:
                first = self._down_since is None
                self._down_since = self._down_since or time.time()
                self._retry_at = time.time() + RETRY_DOWN_S
                self._last_error = f"{what}: {_reason(e)}"
            if first:
                logger.error(f"PACS {self.url} is unreachable ({self._last_error}); serving the "
                             f"{len(LocalDatastore.list_images(self))} cached series until it answers")
            raise PacsUnavailable(f"PACS {self.url} is unreachable ({self._last_error})") from None
        with self._health_lock:
            if self._down_since is not None:
                logger.warning(f"PACS {self.url} answers again after {time.time() - self._down_since:.0f} s")
            self._down_since = None
        return out

    def pacs_status(self) -> dict[str, Any]:
        """What ``/gcml/status`` shows under ``pacs``."""
        return {"url": self.url, "cache": str(self.cache), "reachable": self._down_since is None,
                "last_error": self._last_error or None, "cached_series": len(LocalDatastore.list_images(self)),
                "skipped": self.skipped()}

    # ---------------------------------------------------------------- skip list
    def skipped(self) -> dict[str, str]:
        """Series (and SEGs) that cannot be used, with the reason: ``{uid: reason}``."""
        return _read_map(self._skipped_path)

    def _skip(self, uid: str, reason: str) -> None:
        logger.warning(f"PACS series {uid} skipped: {reason}")
        _write_map(self._skipped_path, {uid: clean(reason, 300)})

    # ---------------------------------------------------------------- images
    def _pacs_series(self) -> list[str]:
        """The site's series in the PACS (QIDO, reused for ``LIST_TTL_S`` while it answers), less the skipped ones.

        Raises:
            PacsUnavailable: the PACS did not answer.
        """
        now = time.time()
        if self._listing is None or self._down_since is not None or now - self._listing[0] > LIST_TTL_S:
            found = self._call("QIDO series", self._client.search_for_series, search_filters=self._search_filter)
            uids = [str(d.get("0020000E", {}).get("Value", [""])[0]) for d in found]
            self._listing = (now, [u for u in uids if _UID.fullmatch(u)])
        skipped = self.skipped()
        return [u for u in self._listing[1] if u not in skipped]

    def list_images(self) -> list[str]:
        """The site's series in the PACS, less the skipped ones; while it is unreachable, the cached series."""
        try:
            return self._pacs_series()
        except PacsUnavailable:
            return LocalDatastore.list_images(self)

    def get_image_uri(self, image_id: str) -> str:
        """The cached NIfTI volume of a series, fetched and checked on first use.

        Returns:
            the volume's path, or ``""`` for an id that is not a UID, not in the PACS, or skipped.

        Raises:
            PacsUnavailable: the series is not cached and the PACS does not answer.
        """
        if not isinstance(image_id, str) or len(image_id) > 64 or not _UID.fullmatch(image_id):
            return ""
        cached = self._cached(image_id)
        if cached or image_id in self.skipped():
            return cached
        with self._fetch_lock:  # one fetch per series, across the server and the training process
            self._init_from_datastore_file()  # another process may have cached it meanwhile
            cached = self._cached(image_id)
            if cached:
                return cached
            uri = self._fetch(image_id)
            if self.max_cache_bytes:
                self.evict(self.max_cache_bytes, keep=image_id)
            return uri

    def local_image_uri(self, image_id: str) -> str:
        """The cached volume's path, or ``""``: never fetches, and leaves the eviction order alone (what a
        round's unlabelled images are drawn from)."""
        uri = LocalDatastore.get_image_uri(self, image_id)
        return uri if uri and os.path.isfile(uri) else ""

    def _cached(self, image_id: str) -> str:
        """The cached volume's path, its access time set to now (the eviction order); ``""`` if not cached
        (or evicted). Only the access time changes: the content memo keys on the modification time."""
        uri = LocalDatastore.get_image_uri(self, image_id)
        if not uri:
            return ""
        try:
            st = os.stat(uri)
            os.utime(uri, ns=(time.time_ns(), st.st_mtime_ns))
        except FileNotFoundError:
            return ""
        return uri

    def evict(self, max_bytes: int, keep: str | None = None) -> dict[str, Any]:
        """Bring the cache under ``max_bytes`` (``store.pacs_cache_max_gb``), least recently used series first.

        First the series' DICOM instances go (the NIfTI volume holds the image; a SEG upload fetches the
        instances again), then the volumes of *unlabelled* series (fetched again on next use). Labels,
        labelled series' volumes and the SEG map are never evicted: they are what rounds train on.

        Returns:
            ``{"evicted_instances": [uids], "evicted_volumes": [uids], "bytes": n}`` (the cache's size after).
        """
        from gcml_app.site.disk import folder_bytes

        with self._fetch_lock:
            total = folder_bytes(self.cache)
            uids = [u for u in LocalDatastore.list_images(self) if u != keep]
            labelled = {u for u in uids if self._datastore.objects.get(u) and self._datastore.objects[u].labels}

            def atime(uid: str) -> float:
                try:
                    return os.stat(LocalDatastore.get_image_uri(self, uid)).st_atime
                except (FileNotFoundError, TypeError):
                    return 0.0

            order = sorted(uids, key=atime)
            done: dict[str, list[str]] = {"evicted_instances": [], "evicted_volumes": []}
            for uid in order:
                folder = self.cache / uid
                if total <= max_bytes:
                    break
                if folder.is_dir():
                    n = folder_bytes(folder)
                    shutil.rmtree(folder, ignore_errors=True)
                    total -= n
                    done["evicted_instances"].append(uid)
            for uid in order:
                if total <= max_bytes:
                    break
                if uid in labelled:
                    continue
                path = Path(LocalDatastore.get_image_uri(self, uid))
                if path.is_file():
                    total -= path.stat().st_size
                    LocalDatastore.remove_image(self, uid)
                    done["evicted_volumes"].append(uid)
            if total > max_bytes:
                logger.warning(f"PACS cache: {total / 2**30:.1f} GB after eviction, over store.pacs_cache_max_gb "
                               f"({max_bytes / 2**30:.1f} GB): the labelled series alone take that; raise the bound")
            if done["evicted_instances"] or done["evicted_volumes"]:
                logger.info(f"PACS cache: evicted the instances of {len(done['evicted_instances'])} series and "
                            f"{len(done['evicted_volumes'])} unlabelled volumes; {total / 2**30:.2f} GB now")
        return {**done, "bytes": total}

    def _fetch(self, image_id: str) -> str:
        if image_id not in self._pacs_series():
            return ""
        folder = self.cache / image_id
        shutil.rmtree(folder, ignore_errors=True)
        start = time.time()
        try:
            self._call("WADO series", dicom_web_download_series, None, image_id, str(folder), self._client)
        except PacsUnavailable:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except IndexError:  # dicomweb helper: the series left the PACS since it was listed
            shutil.rmtree(folder, ignore_errors=True)
            return ""
        with tempfile.TemporaryDirectory(prefix="gcml-series-") as tmp:
            try:
                files = check_series(folder)
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames([str(f) for f in files])
                nii = Path(tmp) / "image.nii.gz"
                sitk.WriteImage(reader.Execute(), str(nii), useCompression=True)
            except (SeriesRejected, RuntimeError) as e:  # RuntimeError: pixel data SimpleITK cannot decode
                shutil.rmtree(folder, ignore_errors=True)
                why = str(e) if isinstance(e, SeriesRejected) else f"unreadable pixel data: {_reason(e)}"
                self._skip(image_id, why)
                return ""
            head = pydicom.dcmread(files[0], stop_before_pixels=True)
            info = {k: str(head.get(k, "")) for k in ("StudyInstanceUID", "Modality", "SeriesDescription")}
            LocalDatastore.add_image(self, image_id, str(nii), {**info, "SeriesInstanceUID": image_id})
        logger.info(f"PACS series {image_id}: {len(files)} slices cached in {time.time() - start:.2f} s")
        return LocalDatastore.get_image_uri(self, image_id)

    # ---------------------------------------------------------------- labels
    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The cached label of an image (label ids are image ids, as in a studies folder)."""
        return LocalDatastore.get_label_uri(self, label_id, label_tag)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Cached series with a label of ``label_tag``, after taking in new DICOM SEGs from the PACS."""
        self.sync_labels()
        return LocalDatastore.get_labeled_images(self, label_tag, labels)

    def status(self) -> dict[str, Any]:
        """``/info``'s datastore summary: series in the PACS and labels in the cache, fetching nothing
        (the first round fills the cache, with its progress in the train stats, not a Slicer poll)."""
        tags: dict[str, int] = {}
        for obj in self._datastore.objects.values():
            for tag in obj.labels:
                tags[tag] = tags.get(tag, 0) + 1
        return {"total": len(self.list_images()), "completed": len(LocalDatastore.get_labeled_images(self)),
                "label_tags": tags}

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        self.sync_labels()
        return LocalDatastore.datalist(self, full_path)

    def sync_labels(self, force: bool = False) -> int:
        """Take DICOM SEGs that are new in the PACS as final labels of cached series.

        A SEG is read once (``segs.json`` remembers each SEG's series UID -> image or reason). Its
        segments are mapped to task labels by name, and the result is checked against the image like
        an upload. A series that already has a cached final label keeps it. Nothing happens while the
        PACS is unreachable, and at most every ``LIST_TTL_S`` unless ``force``.

        Returns:
            the number of labels added.
        """
        if not force and time.time() - self._synced_at < LIST_TTL_S:
            return 0
        self._synced_at = time.time()
        try:
            found = self._call("QIDO SEG", self._client.search_for_series, search_filters={"Modality": "SEG"})
        except PacsUnavailable:
            return 0
        added = 0
        with FileLock(str(self._segs_path) + ".lock"):
            seen = _read_map(self._segs_path)  # the whole sync holds this lock: one sync at a time
            for d in found:
                seg_uid = str(d.get("0020000E", {}).get("Value", [""])[0])
                study_uid = str(d.get("0020000D", {}).get("Value", [""])[0])
                if seg_uid in seen or not _UID.fullmatch(seg_uid) or not _UID.fullmatch(study_uid):
                    continue
                try:
                    seen[seg_uid] = self._take_seg(study_uid, seg_uid)
                    added += seen[seg_uid].startswith("label of ")
                except PacsUnavailable:
                    break  # try again next sync
                except Exception as e:  # noqa: BLE001 - a PACS's SEG is outside data: one bad SEG never stops a round
                    seen[seg_uid] = f"skipped: {_reason(e)}"
                    self._skip(seg_uid, f"DICOM SEG unusable: {_reason(e)}")
            atomic_write(self._segs_path, json.dumps(seen, indent=1, sort_keys=True).encode())
        if added:
            logger.info(f"PACS: {added} new final label(s) from DICOM SEG")
        return added

    def _take_seg(self, study_uid: str, seg_uid: str) -> str:
        instances = self._call("WADO SEG", self._client.retrieve_series, study_uid, seg_uid)
        if len(instances) != 1:
            raise SeriesRejected(f"expected one SEG instance, found {len(instances)}")
        with tempfile.TemporaryDirectory(prefix="gcml-seg-") as tmp:
            path = Path(tmp) / "seg.dcm"
            instances[0].save_as(str(path))
            label, image_id = read_seg(path, self.task_labels)
            if LocalDatastore.get_label_uri(self, image_id, DefaultLabelTag.FINAL.value):
                return f"not used: series {image_id} already has a final label"
            image = self.get_image_uri(image_id)
            if not image:
                return f"not used: series {image_id} is not a usable image of this site"
            nii = Path(tmp) / "label.nii.gz"
            sitk.WriteImage(label, str(nii), useCompression=True)
            conformed = conform_label(image, nii, self.task_labels, other_values=self.other_values)
            sitk.WriteImage(conformed, str(nii), useCompression=True)
            CurrentFile._store_label(self, image_id, str(nii), DefaultLabelTag.FINAL.value,
                                      {"SeriesInstanceUID": seg_uid, "source": "pacs"})
        return f"label of {image_id}"

    def _store_label(self, image_id: str, label_path: str, label_tag: str, info: dict[str, Any]) -> str:
        """A final label goes to the PACS as DICOM SEG first, then to the cache; other tags only to the cache.

        Raises:
            PacsUnavailable: the PACS did not take the SEG; nothing was stored.
        """
        if label_tag == DefaultLabelTag.FINAL.value:
            folder = self.cache / image_id
            if not folder.is_dir():  # the instances the SEG references were removed from the cache
                self._call("WADO series", dicom_web_download_series, None, image_id, str(folder), self._client)
            files = check_series(folder)
            with tempfile.TemporaryDirectory(prefix="gcml-seg-") as tmp:
                seg = Path(tmp) / "seg.dcm"
                seg_uid = write_seg(sitk.ReadImage(label_path), files, self.task_labels, seg)
                self._call("STOW SEG", self._client.store_instances, [pydicom.dcmread(seg)])
            _write_map(self._segs_path, {seg_uid: f"label of {image_id} (uploaded here)"})
            info = {**info, "SeriesInstanceUID": seg_uid}
            logger.info(f"PACS: final label of series {image_id} stored as DICOM SEG {seg_uid}")
        return CurrentFile._store_label(self, image_id, label_path, label_tag, info)  # into the cache, atomically
