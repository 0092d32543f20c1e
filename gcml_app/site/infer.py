"""The ``gcml_seg`` infer task: serves the store's current published version, never untrained weights."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import EnsureTyped
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.post import Restored

from gcml_app.config import SiteConfig
from gcml_app.errors import NoPublishedModel
from gcml_app.ml.device import precision, stitch_device, sw_batch_size
from gcml_app.ml.evaluate import channel_argmax, predict
from gcml_app.ml.network import arch_fingerprint, build_network, fit_state, other_layout_arch
from gcml_app.ml.transforms import image_transforms
from gcml_app.store import ModelStore, StoreError

__all__ = ["GCMLSegInfer", "file_key"]

logger = logging.getLogger(__name__)


def file_key(path: Any) -> tuple | None:
    """``(path, mtime, size)`` of an image file, what its preprocessed image is kept by; ``None`` if unreadable."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return (str(path), st.st_mtime_ns, st.st_size)


class GCMLSegInfer(BasicInferTask):
    """Sliding-window segmentation with the site's served model.

    Each request reads the store's served pointer (a few bytes); when a new version has been
    published, or a rollback happened, the weights are reloaded without a restart. The result JSON
    carries ``gcml_model_version``.

    Args:
        cfg: site config (transforms, network, ROI, labels).
        store: the site's model store.
        cache: an interactive site's zero-click predictions (:class:`gcml_app.site.edit.PredictionCache`): each
            answer leaves its prediction there, so the first click on the case costs only the click's windows.
        images: an interactive site's last images in network space, by file (shared with ``gcml_edit``): each
            answer leaves its image there, so the first click on the case skips loading and resampling it.
    """

    def __init__(self, cfg: SiteConfig, store: ModelStore, cache=None, images=None):
        self.cfg = cfg
        self.store = store
        self.cache = cache
        self.images = images
        self._template = build_network(cfg)
        self._arch = arch_fingerprint(cfg, self._template.state_dict())
        self._other_arch = other_layout_arch(cfg)  # served before interactive.enabled changed: converts exactly
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[int, torch.nn.Module]] = {}
        super().__init__(
            path=None,
            network=self._template,
            type=InferType.SEGMENTATION,
            labels=cfg.labels,
            dimension=3,
            description=f"Personalized {cfg.network.name} segmentation of site {cfg.site} (GCML)",
            roi_size=cfg.roi_size,
        )

    def is_valid(self) -> bool:
        # Always listed in /info; a request before the first publish gets a clear NoPublishedModel.
        return True

    def pre_transforms(self, data=None) -> list:
        return image_transforms(self.cfg)

    def run_pre_transforms(self, data: dict[str, Any], transforms) -> dict[str, Any]:
        """The image in network space: from ``images`` when the file is unchanged (an interactive site), else
        loaded; ``data["gcml_image_key"]`` says what the file held (path, mtime, size), ``None`` without ``images``."""
        key = file_key(data.get("image_path") or data.get("image")) if self.images is not None else None
        data["gcml_image_key"] = key
        hit = self.images.get(key) if key is not None else None
        if hit is not None:
            data["image"] = hit
            return data
        # MONAI >= 1.5 ``Spacingd`` treats every ``image_*`` key as a meta dict, but MONAI Label's
        # ``image_path`` is a string: hold it aside while the transforms run.
        path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if path is not None:
            data["image_path"] = path
        if key is not None:
            self.images.put(key, data["image"])
        return data

    def gpu(self) -> int:
        """The CUDA device index inference runs on: ``serve.gpu``, default ``train.gpu``."""
        return self.cfg.train.gpu if self.cfg.serve.gpu is None else self.cfg.serve.gpu

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        """MONAI Label's inferer on the configured GPU, with mixed precision there (``train.amp``)."""
        if str(device).startswith("cuda"):
            device = f"cuda:{self.gpu()}"
            data["device"] = device
        with precision(self.cfg, torch.device(device)).autocast():
            return super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)

    @staticmethod
    def _argmax(data: dict[str, Any]) -> dict[str, Any]:
        """Post transform: logits ``(C, D, H, W)`` -> channel indices ``(1, D, H, W)`` uint8, where the logits are.

        On a GPU the argmax runs there and only the indices go to host memory: moving the logits first and taking
        MONAI's softmax and argmax on the CPU was 1.1 of 1.7 s of a 192x192x160 ``gcml_seg`` on an H200
        (docs/results.md). The softmax is not taken: it does not change which channel is largest.
        """
        pred = data["pred"]
        data["pred"] = channel_argmax(pred.as_tensor() if hasattr(pred, "as_tensor") else pred)[None]
        return data

    def _keep_zero_click(self, data: dict[str, Any]) -> dict[str, Any]:
        """Post transform after the argmax: the prediction ``(1, D, H, W)`` in network space goes to the cache where
        ``gcml_edit``'s clicks start (an interactive site), from the argmax the answer needs anyway."""
        if data.get("image_path") and data.get("gcml_model_version") is not None:
            pred = data["pred"]
            pred = pred.as_tensor() if hasattr(pred, "as_tensor") else pred
            self.cache.put((str(data["image_path"]), int(data["gcml_model_version"])), pred.to("cpu", torch.uint8))
        return data

    def base_prediction(self, data: dict[str, Any], network: torch.nn.Module, device) -> torch.Tensor:
        """The zero-click prediction ``(1, D, H, W)`` uint8 of the request's image by the served version: cached,
        else by the same sliding windows as ``gcml_seg``."""
        key = (str(data.get("image_path")), int(data["gcml_model_version"]))
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None and tuple(cached.shape[1:]) == tuple(data["image"].shape[1:]):
            return cached
        dev = torch.device(device)
        image = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
        pred = predict(network, image, self.cfg.roi_size, sw_batch_size(self.cfg, dev), self.cfg.validation.overlap,
                       dev, precision(self.cfg, dev), self.cfg.out_channels).cpu()
        if self.cache is not None:
            self.cache.put(key, pred)
        return pred

    def inferer(self, data=None) -> SlidingWindowInferer:
        """Windows on the request's device; the output is stitched there when it fits, else in host memory."""
        device = torch.device((data or {}).get("device") or "cpu")
        shape = tuple((data or {}).get("image").shape[1:]) if data and hasattr(data.get("image"), "shape") else ()
        return SlidingWindowInferer(
            roi_size=self.cfg.roi_size, sw_batch_size=sw_batch_size(self.cfg, device),
            overlap=self.cfg.validation.overlap, sw_device=device,
            device=stitch_device(device, shape, self.cfg.out_channels) if shape else device,
        )

    def post_transforms(self, data=None) -> list:
        return [
            self._argmax,
            *([self._keep_zero_click] if self.cache is not None else []),  # from the uint8 indices, once
            EnsureTyped("pred", device="cpu", dtype=torch.float32),
            # Back to the image's grid and orientation; channels 1..n -> the task's label indices.
            Restored("pred", ref_image="image", invert_orient=True, config_labels=self.cfg.labels),
        ]

    def _get_network(self, device: str, data: dict[str, Any] | None) -> torch.nn.Module:
        version = self.store.served_version()
        if version is None:
            raise NoPublishedModel(
                f"no trained model yet: site {self.cfg.site} has not published a model that passed "
                "validation; submit final labels and start training (POST /train/gcml)"
            )
        with self._lock:
            cached = self._loaded.get(device)
            if cached is None or cached[0] != version:
                man = self.store.manifest(version)
                if man.arch not in (self._arch, self._other_arch):
                    raise StoreError(
                        f"served version {version} was trained for another architecture ({man.arch[:19]}...) "
                        f"than this config builds ({self._arch[:19]}...); roll back or retrain"
                    )
                net = build_network(self.cfg)
                net.load_state_dict(fit_state(self.store.load(version), self.cfg))
                net.to(torch.device(device)).eval()
                logger.info(f"gcml_seg: serving version {version} on {device}")
                self._loaded = {device: (version, net)}
                cached = self._loaded[device]
        if data is not None:
            data["gcml_model_version"] = version
        return cached[1]

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        label, result = super().writer(data, extension=extension, dtype=dtype)
        result["gcml_model_version"] = data.get("gcml_model_version")
        return label, result
