"""The training augmentation (``train.augment``): shapes, labels, seeding, and what each mode holds."""

import pytest
import torch
from helpers import TINY
from monai.transforms import RandAffined, RandFlipd
from monai.transforms.utils import map_binary_to_indices

from gcml_app.config import SiteConfig
from gcml_app.ml.transforms import augment_transforms, crop_transforms, unlabelled_crop_transforms

SPATIAL = (RandAffined, RandFlipd)


def cfg(augment="scanner", samples=3):
    return SiteConfig.model_validate({**TINY, "roi_size": [16, 16, 16],
                                      "train": {**TINY["train"], "augment": augment, "samples_per_case": samples}})


def case(seed=0, size=(20, 24, 18)):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, *size, dtype=torch.uint8)
    label[:, 5:15, 6:18, 4:14] = 1
    label[:, 8:11, 9:13, 7:10] = 2
    image = label.float() + 0.3 * torch.randn(1, *size, generator=g)
    fg, bg = map_binary_to_indices(label > 0)
    return {"image": image, "label": label, "fg": torch.as_tensor(fg), "bg": torch.as_tensor(bg)}


def draw(chain, data, seed):
    chain.set_random_state(seed)
    return chain(dict(data))


@pytest.mark.parametrize("augment, n_transforms", [("scanner", 12), ("flip", 1), ("none", 0)])
def test_each_mode_gives_crops_of_roi_size_with_a_uint8_label_of_task_values(augment, n_transforms):
    c = cfg(augment)
    assert len(augment_transforms(c)) == n_transforms
    for seed in range(4):
        crops = draw(crop_transforms(c), case(seed), seed)
        assert len(crops) == 3
        for crop in crops:
            assert crop["image"].shape == (1, 16, 16, 16) and crop["image"].dtype == torch.float32
            assert crop["label"].shape == (1, 16, 16, 16) and crop["label"].dtype == torch.uint8
            assert set(crop["label"].unique().tolist()) <= {0, 1, 2}  # nearest: no blended label values
            assert torch.isfinite(crop["image"]).all()


def test_intensity_transforms_touch_the_image_only_and_leave_the_label_bit_for_bit():
    chain = [t for t in augment_transforms(cfg()) if not isinstance(t, SPATIAL)]
    random_ones = [t for t in chain if hasattr(t, "prob")]
    assert len(random_ones) == 9
    for t in chain:
        assert list(t.keys) in (["image"], ["image", "label"])  # the last one only casts types
    data = case()
    data = {"image": data["image"][:, :16, :16, :16], "label": data["label"][:, :16, :16, :16]}
    for t in random_ones:
        t.prob = 1.0  # every intensity transform fires
    out = data
    for i, t in enumerate(chain):
        if hasattr(t, "set_random_state"):
            t.set_random_state(i)
        out = t(out)
    assert torch.equal(torch.as_tensor(out["label"]), data["label"])
    assert not torch.allclose(torch.as_tensor(out["image"]), data["image"])


def test_the_same_seed_draws_the_same_crops_and_another_seed_others():
    c, data = cfg(), case()
    a, b, other = draw(crop_transforms(c), data, 7), draw(crop_transforms(c), data, 7), draw(crop_transforms(c), data, 8)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, other))


def test_spatial_transforms_move_image_and_label_together():
    # an image that is its label: after a rotation or scaling the two still coincide where the label is
    c = cfg()
    affine = next(t for t in augment_transforms(c) if isinstance(t, RandAffined))
    affine.prob = 1.0
    data = case()
    data = {"image": data["label"][:, :16, :16, :16].float(), "label": data["label"][:, :16, :16, :16]}
    moved = 0
    for seed in range(5):
        affine.set_random_state(seed)
        out = affine(dict(data))
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        assert (image.round().to(torch.uint8) == label).float().mean() > 0.97
        moved += not torch.equal(label, data["label"])
    assert moved == 5


def test_flip_mode_is_the_flip_alone_as_before_train_augment_existed():
    (flip,) = augment_transforms(cfg("flip"))
    assert isinstance(flip, RandFlipd) and flip.prob == 0.5 and flip.flipper.spatial_axis == 0


def test_unlabelled_crops_are_images_alone_of_roi_size():
    crops = draw(unlabelled_crop_transforms(cfg()), {"image": case()["image"]}, 0)
    assert len(crops) == 3 and all(set(x) == {"image"} and x["image"].shape == (1, 16, 16, 16) for x in crops)


def test_an_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"(?s)train\.augment.*'scanner', 'flip' or 'none'"):
        cfg("elastic")
