"""MONAI transform chains built from the site config, shared by inference, training and validation.

Images are loaded channel-first, reoriented to RAS, resampled to ``cfg.spacing`` and normalised per
``cfg.intensity``. Labels are mapped from task indices (e.g. ``{organ: 1, lesion: 4}``) to network
channels ``1..n`` in index order, so any index set trains the same ``n + 1``-channel network.
"""

from __future__ import annotations

from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from gcml_app.config import SiteConfig

__all__ = ["image_transforms", "train_transforms", "val_transforms"]


def _intensity(cfg: SiteConfig, key: str = "image"):
    it = cfg.intensity
    if it.mode == "range":
        return ScaleIntensityRanged(key, a_min=it.a_min, a_max=it.a_max, b_min=it.b_min, b_max=it.b_max, clip=True)
    return NormalizeIntensityd(key, channel_wise=True)


def image_transforms(cfg: SiteConfig) -> list:
    """Load ``image`` and bring it to network input space: ``(C, D, H, W)`` float32, RAS, ``cfg.spacing``."""
    return [
        LoadImaged("image"),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=cfg.spacing, mode="bilinear"),
        _intensity(cfg),
        EnsureTyped("image", dtype="float32"),
    ]


def _paired(cfg: SiteConfig) -> list:
    keys = ("image", "label")
    indices = list(cfg.labels.values())
    return [
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=cfg.spacing, mode=("bilinear", "nearest")),
        _intensity(cfg),
        MapLabelValued("label", orig_labels=indices, target_labels=list(range(1, len(indices) + 1))),
        EnsureTyped(keys, dtype=("float32", "int64"), track_meta=False),
    ]


def val_transforms(cfg: SiteConfig) -> Compose:
    """Whole volumes for sliding-window validation: ``image (C, D, H, W)``, ``label (1, D, H, W)`` channels."""
    return Compose(_paired(cfg))


def train_transforms(cfg: SiteConfig) -> Compose:
    """Random ROI crops (half centred on foreground) with flips; ``samples_per_case`` crops per case."""
    keys = ("image", "label")
    return Compose(
        _paired(cfg)
        + [
            SpatialPadd(keys, spatial_size=cfg.roi_size),
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=cfg.roi_size, pos=1, neg=1,
                num_samples=cfg.train.samples_per_case,
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
        ]
    )
