"""Preprocessed cases on disk: each case loaded, resampled and normalised once, then read lazily by rounds.

A site's round used to hold every case in memory at full resolution and redo the preprocessing every
round. Here a case is preprocessed once (:func:`~gcml_app.ml.transforms.case_transforms`) into one
safetensors file under ``train.cache_dir`` (default ``<state_dir>/cache``)::

    image  (C, D, H, W) float32   in network input space (RAS, cfg.spacing, cfg.intensity)
    label  (1, D, H, W) uint8     network channels 0..n
    fg, bg (K,)         int32     flat voxel indices of foreground / background of the label padded
                                  to roi_size: the crop centres RandCropByPosNegLabeld draws from
                                  (transforms.CropCentres: at most MAX_INDICES each)

An unlabelled image (a case without ``"label"``, for DCML's unlabelled term) is an entry with
``image`` alone.

Rounds read entries through memory maps (:meth:`CaseCache.load`): a training crop touches only its
pages, and a validation case is in memory only while it is scored. So a round's memory does not grow
with the number of cases; the OS page cache is the in-memory cache, bounded by the machine.

**Keys.** An entry's name is the sha256 of the image's and the label's *content* and of every setting
the preprocessing reads (spacing, intensity, labels, channels, roi_size, the format and MONAI's
version): a replaced label or a new spacing is a new key, never a stale hit. Content hashes are
memoised by ``(path, size, mtime, inode)`` in ``hashes.json``, so an unchanged file is hashed once.

**Bounded.** Entries beyond ``train.cache_max_gb`` are evicted least recently used first (a read
touches an entry); the entries of the round in progress are never evicted under it.

**Never trusted when torn.** An entry is written to a temporary file, flushed and renamed; on read,
its header, sizes and the key in its metadata must match, else it is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import monai
import torch
from monai.transforms import Compose
from safetensors import safe_open
from safetensors.torch import save_file

from gcml_app.config import SiteConfig
from gcml_app.ml import transforms
from gcml_app.ml.transforms import CropCentres, case_transforms, image_transforms
from gcml_app.util.files import ContentHashes, fsync_dir

__all__ = ["CACHE_FORMAT", "CacheStats", "CachedCases", "CaseCache", "cache_root", "load_entry"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_SUFFIX = ".safetensors"


def cache_root(cfg: SiteConfig) -> Path:
    """The site's preprocessed-case folder: ``train.cache_dir``, default ``<state_dir>/cache``."""
    return Path(cfg.train.cache_dir or cfg.state_dir / "cache")


@dataclass
class CacheStats:
    """What one round's preparation found: entries reused, built, rebuilt (torn) and evicted; bytes on disk."""

    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    evicted: int = 0
    bytes: int = 0
    build_s: float = 0.0

    def as_record(self) -> dict[str, Any]:
        return {**asdict(self), "build_s": round(self.build_s, 3)}


def _settings(cfg: SiteConfig) -> dict[str, Any]:
    """Every setting the preprocessing reads; a change to any of them is a new key."""
    settings = {
        "format": CACHE_FORMAT, "monai": monai.__version__, "spacing": list(cfg.spacing),
        "intensity": cfg.intensity.model_dump(mode="json"), "labels": list(cfg.labels.items()),
        "input_channels": cfg.input_channels, "roi_size": list(cfg.roi_size), "max_indices": transforms.MAX_INDICES,
    }
    if cfg.other_values != "refuse":  # absent at the default: entries made before the option keep their key
        settings["other_values"] = cfg.other_values
    return settings


class CaseCache:
    """The site's preprocessed cases (see the module docstring).

    Args:
        cfg: site config (its preprocessing settings, ``train.cache_dir`` and ``train.cache_max_gb``).
        root: overrides the cache folder.

    Example:
        >>> cache = CaseCache(cfg)                                 # doctest: +SKIP
        >>> entries = cache.prepare(cases)                         # builds what is missing
        >>> load_entry(entries[0])["label"].dtype                  # doctest: +SKIP
        torch.uint8
    """

    def __init__(self, cfg: SiteConfig, root: Path | None = None):
        self.cfg = cfg
        self.root = Path(root or cache_root(cfg))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(cfg.train.cache_max_gb * 1e9)
        self.hashes = ContentHashes(self.root / "hashes.json")
        self._settings = json.dumps(_settings(cfg), sort_keys=True)
        self._build = case_transforms(cfg)
        self._build_image = Compose(image_transforms(cfg))
        self._pinned: set[Path] = set()
        self.stats = CacheStats()

    def key(self, case: dict[str, str]) -> str:
        """The entry name of ``case`` (``{"image", "label"}`` paths, or ``{"image"}``): content and settings."""
        label = self.hashes.of(case["label"]) if "label" in case else "unlabelled"
        blob = json.dumps([self.hashes.of(case["image"]), label, self._settings])
        return hashlib.sha256(blob.encode()).hexdigest()

    def prepare(self, cases: Sequence[dict[str, str]], progress: Callable[[int, int], None] | None = None,
                evict: bool = True) -> list[Path | None]:
        """The entries of ``cases`` (in order), building each that is missing or torn, then evicting to the bound.

        The returned entries are pinned: eviction leaves them alone for the life of this object (a round).
        ``evict=False`` leaves the bound to another caller (the ranks of a round: only rank 0 evicts).
        An unlabelled image (no ``"label"``) that cannot be read is ``None``, with a warning: it is not
        worth a round. A labelled case that cannot be read raises.
        """
        out: list[Path | None] = []
        for i, case in enumerate(cases):
            path = self.root / f"{self.key(case)}{_SUFFIX}"
            if path.exists() and self._intact(path):
                self.stats.hits += 1
                os.utime(path)  # least recently used: a read is a use
            else:
                t = time.perf_counter()
                try:
                    self._write(path, case)
                except Exception as e:  # any reader's error: an unlabelled image is left out, a case raises
                    if "label" in case:
                        raise
                    logger.warning(f"unlabelled image {case.get('id')} left out: unreadable ({e})")
                    out.append(None)
                    continue
                self.stats.build_s += time.perf_counter() - t
                self.stats.misses += 1
            self._pinned.add(path)
            out.append(path)
            if progress:
                progress(i + 1, len(cases))
        self.hashes.save()
        if evict:
            self.evict()
        return out

    def _intact(self, path: Path) -> bool:
        """Whether ``path`` parses whole and names its own key; a torn or foreign entry is deleted."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                need = {"image"} if meta.get("kind") == "image" else {"image", "label", "fg", "bg"}
                ok = meta.get("key") == path.stem and need <= set(f.keys())
                if ok:
                    for k in f.keys():
                        f.get_slice(k)  # sizes against the file: a short file fails here
        except Exception as e:  # noqa: BLE001 - any failure to parse is a torn entry
            logger.warning(f"cache entry {path.name} is unreadable ({e}); rebuilding it")
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
            self.stats.rebuilt += 1
        return ok

    def _write(self, path: Path, case: dict[str, str]) -> None:
        if "label" not in case:  # an unlabelled image: the image alone
            d = self._build_image({"image": case["image"]})
            tensors = {"image": _plain(d["image"]).float().contiguous()}
            kind = "image"
        else:
            d = self._build({"image": case["image"], "label": case["label"]})
            image, label = _plain(d["image"]), _plain(d["label"])
            centres = CropCentres(self.cfg.roi_size, seed=int(path.stem[:8], 16))({"label": label})
            fg, bg = centres["fg"], centres["bg"]
            tensors = {"image": image.float().contiguous(), "label": label.to(torch.uint8).contiguous(),
                       "fg": fg.to(torch.int32).contiguous(), "bg": bg.to(torch.int32).contiguous()}
            kind = "case"
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".entry.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"key": path.stem, "format": str(CACHE_FORMAT), "kind": kind})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.root)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def entries(self) -> list[os.DirEntry]:
        return [e for e in os.scandir(self.root) if e.name.endswith(_SUFFIX) and e.is_file()]

    def evict(self) -> None:
        """Delete least recently used entries until the cache fits ``train.cache_max_gb`` (never a pinned one)."""
        entries = sorted(self.entries(), key=lambda e: e.stat().st_mtime_ns)
        total = sum(e.stat().st_size for e in entries)
        for e in entries:
            if total <= self.max_bytes:
                break
            if Path(e.path) in self._pinned:
                continue
            size = e.stat().st_size
            Path(e.path).unlink(missing_ok=True)
            total -= size
            self.stats.evicted += 1
        if total > self.max_bytes:
            logger.warning(f"case cache {self.root}: this round's cases need {total / 1e9:.1f} GB, more than "
                           f"train.cache_max_gb = {self.cfg.train.cache_max_gb:g}; raise it, or every round "
                           "preprocesses again")
        self.stats.bytes = total


def load_entry(path: Path, indices: bool = False) -> dict[str, torch.Tensor]:
    """One entry, memory-mapped: ``image (C, D, H, W)`` float32, ``label (1, D, H, W)`` uint8
    (and with ``indices``, ``fg``/``bg`` ``(K,)`` int64 crop centres); an unlabelled image's entry
    has ``image`` alone."""
    with safe_open(str(path), "pt") as f:
        have = set(f.keys())
        out = {k: f.get_tensor(k) for k in (("image", "label", "fg", "bg") if indices else ("image", "label"))
               if k in have}
    if indices and "fg" in out:
        out["fg"], out["bg"] = out["fg"].long(), out["bg"].long()
    return out


def _plain(t) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


class CachedCases(Sequence):
    """Cases read lazily from cache entries: ``cases[i]`` is :func:`load_entry` of entry ``i``.

    Holds only the entry paths: MONAI's ``DataLoader`` seeds every randomizable object it finds in a
    dataset's attributes, so nothing random may hide here (the crops' seeds stay those of a plain list).
    """

    def __init__(self, entries: Iterable[Path], indices: bool = False):
        self.entries, self.indices = list(entries), indices

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return load_entry(self.entries[i], self.indices)
