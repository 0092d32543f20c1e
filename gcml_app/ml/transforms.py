"""MONAI transform chains built from the site config, shared by inference, training and validation.

Images are loaded channel-first, reoriented to RAS, resampled to ``cfg.spacing`` and normalised per
``cfg.intensity``; labels are uint8. Labels are mapped from task indices (e.g. ``{organ: 1, lesion: 4}``) to network
channels ``1..n`` in index order, so any index set trains the same ``n + 1``-channel network.

Training crops are augmented per ``train.augment`` (:func:`augment_transforms`): ``scanner`` (the
default) varies what differs between scanners and partners, nnU-Net's recipe with MONAI's transforms.
"""

from __future__ import annotations

import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPad,
    SpatialPadd,
)
from monai.transforms.utils import map_binary_to_indices
from monai.utils import MAX_SEED

from gcml_app.config import SiteConfig
from gcml_app.ml.distributed import rank, share, world

__all__ = ["MAX_INDICES", "CropCentres", "TaskChannels", "augment_transforms", "case_transforms", "crop_transforms",
           "image_transforms", "train_transforms", "unlabelled_crop_transforms", "val_transforms"]


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


def case_transforms(cfg: SiteConfig) -> Compose:
    """Load a case and bring it to network space once: ``image (C, D, H, W)`` float32, ``label (1, D, H, W)``
    uint8 in channels ``0..n`` (what :class:`~gcml_app.ml.cache.CaseCache` stores; labels hold at most 255)."""
    keys = ("image", "label")
    indices = list(cfg.labels.values())
    return Compose([
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=cfg.spacing, mode=("bilinear", "nearest")),
        _intensity(cfg),
        TaskChannels("label", indices),
        EnsureTyped(keys, dtype=("float32", "uint8"), track_meta=False),
    ])


class TaskChannels(MapTransform):
    """Task label values ``indices[i]`` -> network channel ``i + 1``; every other value -> 0 (background).

    Other values reach here only when ``labels.other_values: background``; with ``refuse`` such a label
    never passes :func:`gcml_app.site.labels.conform_label`. (MONAI's ``MapLabelValued`` would leave them
    as they are, out of the network's channels.)
    """

    def __init__(self, key: str, indices: list[int]):
        super().__init__(key)
        self.key, self.indices = key, list(indices)

    def __call__(self, data):
        d = dict(data)
        label = torch.as_tensor(d[self.key])
        out = torch.zeros_like(label, dtype=torch.uint8)
        for channel, value in enumerate(self.indices, start=1):
            out[label == value] = channel
        d[self.key] = out
        return d


MAX_INDICES = 1 << 20  # crop centres kept per class (fg, bg): 4 MB each as int32; a 32^3 phantom keeps all


class CropCentres(MapTransform):
    """Add ``fg`` and ``bg``: flat indices ``(K,)`` of the label's foreground and background, once per case.

    Computed on the label padded to ``roi_size`` (what :func:`crop_transforms` crops from), at most
    :data:`MAX_INDICES` of each: beyond that a fixed uniform random subset in index order, so a CT's
    background does not cost 8 bytes a voxel. The label is binarised first: MONAI's
    ``map_binary_to_indices`` treats a uint8 label as bits (``~`` of uint8 1 is 254, not 0), and would
    count every voxel as background.

    Args:
        roi_size: the training crop size.
        seed: the random subset's seed.
    """

    def __init__(self, roi_size, label_key: str = "label", seed: int = 0):
        super().__init__(label_key)
        self.pad, self.label_key, self.seed = SpatialPad(roi_size), label_key, seed

    def __call__(self, data):
        d = dict(data)
        fg, bg = map_binary_to_indices(torch.as_tensor(self.pad(d[self.label_key])) > 0)
        d["fg"], d["bg"] = (_subset(torch.as_tensor(t), self.seed + k) for k, t in enumerate((fg, bg)))
        return d


def _subset(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """At most :data:`MAX_INDICES` of ``indices``: a uniform random subset (in index order) beyond that."""
    if indices.numel() <= MAX_INDICES:
        return indices
    g = torch.Generator().manual_seed(seed)
    return indices[torch.randperm(indices.numel(), generator=g)[:MAX_INDICES].sort().values]


def augment_transforms(cfg: SiteConfig, keys: tuple[str, ...] = ("image", "label")) -> list:
    """The training augmentation ``train.augment`` names, on crops in network input space (after normalisation).

    ``scanner`` (the default) is nnU-Net's recipe (Isensee et al. 2021, its default probabilities) with
    MONAI's transforms, because what it varies is what differs between hospitals' scanners, and so
    between a site and its partners:

    - spatial, on image and label (nearest for the label), mild: rotations up to 15 degrees and
      scaling by up to 10 % about every axis (p 0.2; nnU-Net's 30 degrees and 0.7-1.4 are for patches
      cropped larger first), and a left-right flip (p 0.5);
    - intensity, on the image only: Gaussian noise (std up to 0.3, p 0.1), Gaussian blur (sigma
      0.5-1 voxel, p 0.2), brightness (x 0.75-1.25, p 0.15) and offset (+-0.1, p 0.15), contrast about
      the mean (x 0.75-1.25, p 0.15), a smooth multiplicative bias field (MONAI's default, p 0.15),
      simulated low resolution (down to half, p 0.25), and gamma 0.7-1.5 (p 0.3) and of the inverted
      image (p 0.1, which makes dark structures bright: an inverted contrast such as T1 against T2).

    ``flip`` is the left-right flip alone; ``none`` leaves crops as they are (ablations).

    Args:
        keys: ``(image, label)``, or ``(image,)`` for unlabelled crops.
    """
    mode = cfg.train.augment
    if mode == "none":
        return []
    flip = [RandFlipd(list(keys), prob=0.5, spatial_axis=0)]
    if mode == "flip":
        return flip  # exactly the chain before train.augment existed
    image = keys[0]
    rot = 15 * torch.pi / 180
    return [
        RandAffined(list(keys), prob=0.2, rotate_range=(rot, rot, rot), scale_range=(0.1, 0.1, 0.1),
                    mode=("bilinear", "nearest")[:len(keys)], padding_mode="zeros", cache_grid=True,
                    spatial_size=cfg.roi_size),
        *flip,
        RandGaussianNoised(image, prob=0.1, std=0.3),
        RandGaussianSmoothd(image, prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(image, prob=0.15, factors=0.25),
        RandShiftIntensityd(image, prob=0.15, offsets=0.1),
        RandScaleIntensityFixedMeand(image, prob=0.15, factors=0.25),
        RandBiasFieldd(image, prob=0.15),
        RandSimulateLowResolutiond(image, prob=0.25, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd(image, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd(image, prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        # plain tensors again, the label back to uint8 (the affine resamples it as float)
        EnsureTyped(list(keys), dtype=(torch.float32, torch.uint8)[:len(keys)], track_meta=False),
    ]


class _RankCropByPosNegLabeld(RandCropByPosNegLabeld):
    """:class:`RandCropByPosNegLabeld` that keeps this rank's crops, ``crops[rank::world]``: every rank draws
    the same crops of a case (the round's seed), trains on its share and augments only that."""

    def __call__(self, data, lazy=None):
        return share(super().__call__(data, lazy=lazy))


class _RankSpatialCropSamplesd(RandSpatialCropSamplesd):
    """:class:`RandSpatialCropSamplesd` that keeps this rank's crops (see :class:`_RankCropByPosNegLabeld`)."""

    def __call__(self, data, lazy=None):
        return share(super().__call__(data, lazy=lazy))


class _RankAugment(Compose):
    """The augmentation chain of a rank: seeded as one device's, offset by the rank, so the ranks' crops (drawn
    alike) are augmented from streams of their own, as one device augments each crop with its own draws."""

    def set_random_state(self, seed=None, state=None):
        if seed is not None:
            seed = (seed + 104_729 * rank()) % MAX_SEED
        return super().set_random_state(seed=seed, state=state)


def _augment(cfg: SiteConfig, keys) -> list:
    """:func:`augment_transforms`, in one :class:`_RankAugment` when the round runs on several ranks."""
    chain = augment_transforms(cfg, keys)
    return [_RankAugment(chain)] if world() > 1 and chain else chain


def crop_transforms(cfg: SiteConfig) -> Compose:
    """Random ROI crops (half centred on foreground), augmented (:func:`augment_transforms`):
    ``samples_per_case`` crops of a preprocessed case; in a round on several devices, this rank's
    ``samples_per_case / world`` of them (:func:`~gcml_app.ml.distributed.share`), so the ranks together
    train on one device's crops.

    The case carries its crop centres (``fg``/``bg``, :class:`CropCentres`): nothing scans the volume per crop.
    """
    keys = ("image", "label")
    crop = _RankCropByPosNegLabeld if world() > 1 else RandCropByPosNegLabeld
    return Compose([
        SpatialPadd(keys, spatial_size=cfg.roi_size),
        crop(keys, label_key="label", spatial_size=cfg.roi_size, pos=1, neg=1,
             num_samples=cfg.train.samples_per_case, fg_indices_key="fg", bg_indices_key="bg"),
        *_augment(cfg, keys),
    ])


def unlabelled_crop_transforms(cfg: SiteConfig) -> Compose:
    """Uniformly placed ROI crops of a preprocessed unlabelled image (``{"image"}``), augmented alike:
    ``samples_per_case`` crops (this rank's share of them), each ``{"image": (C, *roi_size)}``."""
    crop = _RankSpatialCropSamplesd if world() > 1 else RandSpatialCropSamplesd
    return Compose([
        SpatialPadd("image", spatial_size=cfg.roi_size),
        crop("image", roi_size=cfg.roi_size, num_samples=cfg.train.samples_per_case, random_size=False),
        *_augment(cfg, ("image",)),
    ])


def val_transforms(cfg: SiteConfig) -> Compose:
    """Whole volumes for sliding-window validation, from files: :func:`case_transforms`."""
    return case_transforms(cfg)


def train_transforms(cfg: SiteConfig) -> Compose:
    """Random crops from files (the simulator's in-memory path): :func:`case_transforms`, :class:`CropCentres`,
    then :func:`crop_transforms`."""
    return Compose([*case_transforms(cfg).transforms, CropCentres(cfg.roi_size), *crop_transforms(cfg).transforms])
