"""The ``gcml_edit`` infer task: clicks from Slicer's DeepEdit tools on the site's interactive model.

One network serves both tasks (docs/design.md, "Clicks"): ``gcml_seg`` with zero guidance, and ``gcml_edit``
(``/info`` type ``deepedit``) with the clicks of a request. The stock Slicer module POSTs
``/infer/gcml_edit?image=ID`` with ``{<label name>: [[i, j, k], ...], "background": [...], "label": <segment>}``:
every click so far, in voxel (IJK) coordinates of the *original* image.

- **Clicks land on the anatomy clicked.** A click is mapped through the image's own affines: from the file's
  voxel grid to world coordinates (``original_affine``, what the loader read) and back into the network grid
  (the affine after ``Orientationd`` and ``Spacingd``). MONAI's ``AddGuidanceFromPointsDeepEditd`` only rescales
  by the resampling factor, so on a non-RAS or oblique image its clicks land on the wrong side (MONAI Label
  #1407); this mapping has no such case.
- **Fast where the click is.** The zero-click prediction of an image is kept per served version (``gcml_seg``
  leaves its own there too); a click costs the windows around the clicks (:func:`gcml_app.ml.clicks.refine`),
  never a whole-volume pass or a whole-volume resize (#1299).
- **Bad clicks** (outside the image, not finite, not integer, an unknown label, more than
  ``interactive.max_clicks``) are refused with :class:`~gcml_app.errors.ClickRejected` (HTTP 422) naming the
  click, before any inference; nothing is stored.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import EnsureTyped
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.transform.post import Restored

from gcml_app.config import SiteConfig
from gcml_app.errors import ClickRejected
from gcml_app.ml.clicks import Click, refine
from gcml_app.ml.device import precision
from gcml_app.site.infer import GCMLSegInfer
from gcml_app.store import ModelStore

__all__ = ["GCMLEditInfer", "PredictionCache", "image_cache", "parse_clicks", "to_network_grid"]

logger = logging.getLogger(__name__)

# Request keys that are never clicks, whatever they hold (MONAI Label's and Slicer's own parameters).
_NOT_CLICKS = {"image", "model", "device", "label", "label_info", "result_extension", "result_dtype",
               "result_compress", "client_id", "logging", "cache_transforms", "pipeline"}


def parse_clicks(params: Mapping[str, Any], names: Sequence[str], max_clicks: int,
                 shape: Sequence[int] | None = None) -> list[tuple[int, tuple[int, int, int]]]:
    """The clicks of a DeepEdit request, checked: ``[(channel, (i, j, k))]`` in the original image's voxel grid.

    A request key holding a list of points is a label's clicks (an empty list: none); ``names`` are the
    guidance channels in order (``background`` first).

    Args:
        params: the request (``{"organ": [[i, j, k], ...], "background": [...], "label": "organ", ...}``).
        max_clicks: the most clicks one request may carry.
        shape: the original image's ``(I, J, K)``; ``None`` checks everything but the bounds.

    Raises:
        ClickRejected: an unknown label, a point that is not three finite integers, a point outside the
            image, or more than ``max_clicks`` clicks; the message names it.
    """
    out = []
    for key, value in params.items():
        if key in _NOT_CLICKS or not isinstance(value, list) or (value and not isinstance(value[0], (list, tuple))):
            continue
        if key not in names:
            raise ClickRejected(f"clicks for unknown label {key!r}; expected one of {list(names)}")
        for n, p in enumerate(value):
            where = f"click {n} of {key!r} ({_short(p)})"
            if not isinstance(p, (list, tuple)) or len(p) != 3:
                raise ClickRejected(f"{where}: expected three voxel coordinates [i, j, k]")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p):
                raise ClickRejected(f"{where}: expected numbers")
            if not all(math.isfinite(v) for v in p):
                raise ClickRejected(f"{where}: not finite; expected voxel coordinates")
            if not all(float(v).is_integer() for v in p):
                raise ClickRejected(f"{where}: not integer; expected voxel (IJK) coordinates")
            ijk = tuple(int(v) for v in p)
            if shape is not None and not all(0 <= ijk[i] < shape[i] for i in range(3)):
                raise ClickRejected(f"{where}: outside the image of {list(shape)} voxels")
            out.append((names.index(key), ijk))
            if len(out) > max_clicks:
                raise ClickRejected(f"more than {max_clicks} clicks in one request (interactive.max_clicks)")
    return out


def _short(p: Any) -> str:
    s = repr(p)
    return s if len(s) <= 60 else s[:57] + "..."


def to_network_grid(ijk: Sequence[int], original_affine: np.ndarray, network_affine: np.ndarray,
                    shape: Sequence[int]) -> tuple[int, int, int]:
    """A voxel of the original image -> the nearest voxel of the network's grid (after orientation, spacing).

    ``world = original_affine @ ijk``, ``network voxel = inverse(network_affine) @ world``; both affines are in
    one world convention (MONAI's loaders give RAS), so any orientation or oblique direction maps exactly.
    """
    world = np.asarray(original_affine, dtype=np.float64) @ np.array([*ijk, 1.0])
    v = np.linalg.solve(np.asarray(network_affine, dtype=np.float64), world)[:3]
    return tuple(int(min(max(round(float(v[i])), 0), shape[i] - 1)) for i in range(3))


class PredictionCache:
    """Zero-click predictions ``(1, D, H, W)`` uint8 in network space, per (image, served version), LRU-bounded
    (also the last preprocessed images, per file: :func:`image_cache`)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def put(self, key: tuple, pred: Any) -> None:
        if self.size < 1:
            return
        with self._lock:
            self._items[key] = pred
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def image_cache(cfg: SiteConfig) -> PredictionCache:
    """The last images in network space that ``gcml_seg`` and ``gcml_edit`` share: at most 2 (float32)."""
    return PredictionCache(min(2, cfg.interactive.cache_images))


class GCMLEditInfer(GCMLSegInfer):
    """Click-to-correct with the served interactive model (``/info`` type ``deepedit``).

    Args:
        cfg: site config with ``interactive.enabled``.
        store: the site's model store.
        cache: the zero-click predictions, shared with ``gcml_seg``.
        images: the last images in network space, shared with ``gcml_seg`` (:func:`image_cache`); its own when
            ``None``.
    """

    def __init__(self, cfg: SiteConfig, store: ModelStore, cache: PredictionCache,
                 images: PredictionCache | None = None):
        # the last images clicked on or auto-segmented, in network space (a radiologist runs gcml_seg, then clicks
        # on that case many times): a click then skips loading and resampling; at most 2, a 1 mm CT being float32
        # (a 58 M-voxel CT: 232 MB)
        super().__init__(cfg, store, cache, images if images is not None else image_cache(cfg))
        self._windows = PredictionCache(cfg.interactive.cache_windows)  # refine's windows, by their exact input
        self.type = InferType.DEEPEDIT
        self.labels = {"background": 0, **cfg.labels}  # DeepEdit's layout: Slicer shows a tool per label
        self.description = f"Click to correct: the personalized model of site {cfg.site} with clicks (GCML)"

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cpu"):
        """Clicks -> the network grid -> :func:`~gcml_app.ml.clicks.refine` of the cached zero-click prediction."""
        if str(device).startswith("cuda"):
            device = f"cuda:{self.gpu()}"
        image = data["image"]
        shape0 = [int(s) for s in np.asarray(image.meta.get("spatial_shape"))]
        clicks = parse_clicks(data, self.cfg.guidance_names, self.cfg.interactive.max_clicks, shape0)
        net_shape = tuple(image.shape[1:])
        original = np.asarray(image.meta["original_affine"])
        mapped: list[Click] = [(c, to_network_grid(p, original, np.asarray(image.affine), net_shape))
                               for c, p in clicks]
        network = self._get_network(device, data)
        base = self.base_prediction(data, network, device)
        with torch.no_grad():
            pred = refine(network, image.as_tensor(), base, mapped, self.cfg.roi_size, self.cfg.interactive.sigma,
                          device, precision(self.cfg, torch.device(device)),
                          windows=self._windows if data.get("gcml_image_key") else None,
                          key=(data.get("gcml_image_key"), int(data["gcml_model_version"]), str(device)))
        data["pred"] = pred.to(torch.float32)
        data["gcml_clicks"] = len(clicks)
        return data

    def post_transforms(self, data=None) -> list:
        return [
            EnsureTyped("pred", device="cpu", dtype=torch.float32),
            Restored("pred", ref_image="image", invert_orient=True, config_labels=self.cfg.labels),
        ]

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        """The label as uint8 unless the request names ``result_dtype``: a label's values fit (at most 255), and
        writing and compressing a quarter of float32's bytes is most of what a click costs on a GPU."""
        if dtype is None and not data.get("result_dtype"):
            dtype = "uint8"
        label, result = super().writer(data, extension=extension, dtype=dtype)
        result["gcml_clicks"] = data.get("gcml_clicks", 0)
        return label, result


def warm_writer() -> float:
    """Write one tiny label with MONAI Label's result writer and delete it: its first use imports ITK's IO (about
    2.5 s), which would otherwise fall on a radiologist's first request. Returns the seconds it took."""
    import os
    import time

    from monai.data import MetaTensor
    from monailabel.transform.writer import Writer

    t0 = time.perf_counter()
    try:
        data = {"image_path": "warm.nii.gz", "pred": np.zeros((4, 4, 4), np.uint8),
                "image": MetaTensor(torch.zeros(1, 4, 4, 4)), "result_extension": ".nii.gz"}
        path, _ = Writer(label="pred", json="result")(data)
        if path:
            os.unlink(path)
    except Exception as e:  # a warm-up that fails costs the first request its 2.5 s, nothing else
        logger.warning(f"result writer warm-up failed ({type(e).__name__}: {e}); the first inference will be slower")
    return time.perf_counter() - t0
