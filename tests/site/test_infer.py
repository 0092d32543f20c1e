"""gcml_seg in process: its post-processing answers what MONAI's softmax-then-argmax answers, with the argmax
taken where the logits are and only the channel indices moved to host memory."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import TINY
from monai.transforms import Activationsd, AsDiscreted, EnsureTyped

from gcml_app.config import SiteConfig
from gcml_app.ml.network import arch_fingerprint, build_network
from gcml_app.site.infer import GCMLSegInfer
from gcml_app.store import ModelStore


class _MonaiPost(GCMLSegInfer):
    """gcml_seg with the post-processing it had before: logits to the CPU, MONAI's softmax, then its argmax."""

    def post_transforms(self, data=None) -> list:
        ours = super().post_transforms(data)
        return [EnsureTyped("pred", device="cpu", dtype=torch.float32), Activationsd("pred", softmax=True),
                AsDiscreted("pred", argmax=True), *ours[2:]]


@pytest.mark.parametrize("interactive", [False, True], ids=["segmentation", "interactive"])
def test_gcml_seg_answers_what_monais_softmax_and_argmax_answer(tmp_path, interactive):
    cfg = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "state"),
                                     "interactive": {"enabled": interactive}})
    store = ModelStore(cfg.state_dir / "models")
    torch.manual_seed(0)
    net = build_network(cfg)
    store.publish(net.state_dict(), arch=arch_fingerprint(cfg, net.state_dict()), val_dice={"organ": 0.5},
                  n_train=1, n_val=1, produced_by="local")
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(0, 50, (30, 36, 40)).astype(np.float32))
    image.SetSpacing((1.2, 0.9, 1.5))
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(image, str(path))

    answers = []
    for task in (GCMLSegInfer(cfg, store), _MonaiPost(cfg, store)):
        label, result = task({"image": str(path), "device": "cpu"})
        answers.append(sitk.GetArrayFromImage(sitk.ReadImage(label)))
        assert result["gcml_model_version"] == store.served_version()
    assert answers[0].shape == (30, 36, 40)
    assert len(np.unique(answers[0])) > 1  # an untrained network: the answer is not one class everywhere
    assert np.array_equal(answers[0], answers[1])
