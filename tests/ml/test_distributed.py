"""gcml_app.ml.distributed in a real two-process gloo group (and its identity on one process)."""

import json
from pathlib import Path
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gcml_app.ml import distributed as D


def _group(rank: int, path: str, fn, out: str) -> None:
    store = dist.FileStore(path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        result = fn(rank)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, fn) -> list:
    """``fn(rank)`` in two forked ranks of one gloo group; their JSON results in rank order."""
    mp.start_processes(_group, args=(str(tmp_path / "store"), fn, str(tmp_path / "out")), nprocs=2,
                       start_method="fork")
    return [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]


def _gather(rank):
    cases = ["a", "b", "c", "d", "e"]
    return D.gather_cases(D.share(cases))


def _crops(rank=0):
    """The training crops of one case with the round's seed: each rank keeps ``crops[rank::world]``."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from helpers import TINY

    from gcml_app.config import SiteConfig
    from gcml_app.ml.transforms import CropCentres, crop_transforms

    cfg = SiteConfig.model_validate({**TINY, "train": {**TINY["train"], "samples_per_case": 4, "augment": "none"}})
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(1, 40, 40, 40, dtype=torch.uint8)
    label[:, 10:20, 12:25, 8:30] = 1
    case = {"image": torch.rand(1, 40, 40, 40, generator=g), "label": label,
            **CropCentres(cfg.roi_size, seed=1)({"label": label})}
    crops = crop_transforms(cfg)
    crops.set_random_state(seed=3)
    return [round(float(c["image"].sum()), 4) for c in crops(case)]


def _augment_draws(rank=0):
    """Two draws of a rank's augmentation chain, seeded as the DataLoader seeds it."""
    from monai.transforms import RandGaussianNoised

    from gcml_app.ml.transforms import _RankAugment

    chain = _RankAugment([RandGaussianNoised("image", prob=1.0)])
    chain.set_random_state(seed=11)
    return [round(float(chain({"image": torch.zeros(1, 4, 4, 4)})["image"].sum()), 5) for _ in range(2)]


def _collectives(rank):
    return [D.all_true(True, rank == 0), D.global_mean([1.0 + 2 * rank, 10.0])]


def _ddp_steps(rank):
    """Two DDP steps: in the first, rank 1's loss is not finite, so every rank skips it; the second trains."""
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with D.parallel(model) as net:
        for step in range(2):
            x = torch.arange(12.0).reshape(4, 3)[rank::2] / 10
            loss = net(x).pow(2).mean() * (float("nan") if step == 0 and rank == 1 else 1.0)
            opt.zero_grad()
            if D.all_true(bool(torch.isfinite(loss)))[0]:
                loss.backward()
                opt.step()
    return [round(float(p.detach().sum()), 6) for p in model.parameters()]


def _batch():
    """Two crops' logits of two models and their labels (8^3, 3 classes): unlike crops, as a step's are."""
    g = torch.Generator().manual_seed(0)
    z_l, z_i = torch.randn(2, 3, 8, 8, 8, generator=g), torch.randn(2, 3, 8, 8, 8, generator=g)
    y = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    y[0, :, 2:6, 2:6, 2:6] = 1  # a crop on the organ
    y[0, :, 3:4, 3:4, 3:4] = 2
    y[1, :, 0:2, 0:2, 0:8] = 1  # a crop mostly on background
    return z_l, z_i, y


def _batch_losses(rank=None):
    """DCML's batch-normalised terms: on one process over both crops, or in a group over each rank's crop."""
    from gcml_app.ml.losses import mutual_kl, teacher_dice, unlabelled_kl

    z_l, z_i, y = _batch()
    if rank is not None:
        z_l, z_i, y = z_l[rank:rank + 1], z_i[rank:rank + 1], y[rank:rank + 1]
    values = [*mutual_kl(z_l, z_i, y), *unlabelled_kl(z_l, z_i, confidence=0.0), teacher_dice(z_i, y)]
    return D.global_mean([float(v) for v in values])


CASES = [
    # (what every rank runs, what each rank returns)
    (_gather, [["a", "b", "c", "d", "e"]] * 2),
    (_collectives, [[[True, False], [2.0, 10.0]]] * 2),
]


@pytest.mark.parametrize("fn, expected", CASES, ids=[c[0].__name__ for c in CASES])
def test_helpers_in_a_two_rank_group(tmp_path, fn, expected):
    assert _run(tmp_path, fn) == expected


def test_each_rank_trains_on_its_share_of_one_devices_crops(tmp_path):
    one = _crops()
    assert len(one) == 4
    assert _run(tmp_path, _crops) == [one[0::2], one[1::2]]


def test_each_rank_augments_its_crops_from_a_stream_of_its_own(tmp_path):
    r0, r1 = _run(tmp_path, _augment_draws)
    assert r0 == _augment_draws() and r1 != r0  # rank 0 draws as one device does; rank 1 its own


def test_the_ranks_losses_together_are_the_one_device_loss_of_the_whole_batch(tmp_path):
    """Region balance, normalisers and a teacher's Dice are counted over every rank's crops: the mean of the ranks'
    losses (what DDP's averaged gradients descend) is the one-device loss, though the two crops differ."""
    one = _batch_losses()
    r0, r1 = _run(tmp_path, _batch_losses)
    assert r0 == r1 and r0 == pytest.approx(one, rel=1e-6)
    z_l, z_i, y = _batch()
    from gcml_app.ml.losses import mutual_kl
    alone = [float(v) for v in mutual_kl(z_l[:1], z_i[:1], y[:1])]  # one crop normalised on its own: not the same
    assert alone[0] != pytest.approx(one[0], rel=1e-3)


def test_ddp_keeps_the_ranks_equal_and_a_skipped_step_skips_everywhere(tmp_path):
    r0, r1 = _run(tmp_path, _ddp_steps)
    assert r0 == r1
    # one process training on all four rows for one step (the skipped step changed nothing) lands on the same weights
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.arange(12.0).reshape(4, 3) / 10).pow(2).mean().backward()
    opt.step()
    assert r0 == pytest.approx([round(float(p.detach().sum()), 6) for p in model.parameters()], abs=1e-5)


def test_one_process_is_the_identity():
    model = torch.nn.Linear(2, 2)
    with D.parallel(model) as net:
        assert net is model
    assert D.world() == 1 and D.rank() == 0 and D.share([1, 2]) == [1, 2]
    assert D.gather_cases([1, 2]) == [1, 2] and D.all_true(True, False) == [True, False] and D.global_mean([3.0]) == [3.0]
