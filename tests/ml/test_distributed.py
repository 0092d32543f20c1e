"""gcml_app.ml.distributed in a real two-process gloo group (and its identity on one process)."""

import json
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


def _shard(rank):
    even = D.shard(torch.arange(4)).tolist()
    try:
        D.shard(torch.arange(3))
    except ValueError as e:
        return [even, str(e)]
    return [even, None]


def _collectives(rank):
    return [D.all_true(True, rank == 0), D.global_mean([1.0 + 2 * rank, 10.0])]


def _ddp_steps(rank):
    """Two DDP steps: in the first, rank 1's loss is not finite, so every rank skips it; the second trains."""
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with D.parallel(model) as net:
        for step in range(2):
            x = D.shard(torch.arange(12.0).reshape(4, 3) / 10)
            loss = net(x).pow(2).mean() * (float("nan") if step == 0 and rank == 1 else 1.0)
            opt.zero_grad()
            if D.all_true(bool(torch.isfinite(loss)))[0]:
                loss.backward()
                opt.step()
    return [round(float(p.detach().sum()), 6) for p in model.parameters()]


CASES = [
    # (what every rank runs, what each rank returns)
    (_gather, [["a", "b", "c", "d", "e"]] * 2),
    (_shard, [[[0, 2], "a step's 3 crops do not split evenly over 2 ranks: make train.samples_per_case a multiple of 2"],
              [[1, 3], "a step's 3 crops do not split evenly over 2 ranks: make train.samples_per_case a multiple of 2"]]),
    (_collectives, [[[True, False], [2.0, 10.0]]] * 2),
]


@pytest.mark.parametrize("fn, expected", CASES, ids=[c[0].__name__ for c in CASES])
def test_helpers_in_a_two_rank_group(tmp_path, fn, expected):
    assert _run(tmp_path, fn) == expected


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
    t = torch.arange(3)
    model = torch.nn.Linear(2, 2)
    with D.parallel(model) as net:
        assert net is model
    assert D.world() == 1 and D.rank() == 0 and D.shard(t) is t and D.share([1, 2]) == [1, 2]
    assert D.gather_cases([1, 2]) == [1, 2] and D.all_true(True, False) == [True, False] and D.global_mean([3.0]) == [3.0]
