"""The one supervised step every method trains with, its step budget and penalty, and parameter averages."""

import pytest
import torch
from helpers import TINY

from gcml_app.config import SiteConfig
from gcml_app.ml.network import build_network
from gcml_app.ml.supervised import average_state, proximal, supervised_step, supervised_train


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_network(SiteConfig.model_validate(TINY))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(1, 1, 32, 32, 32, generator=g), "label": torch.randint(0, 3, (1, 1, 32, 32, 32),
                                                                                      generator=g)} for _ in range(n)]


@pytest.mark.parametrize("states, weights, expected", [
    (({"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}), None, [2.0]),  # DCML's average: equal weights
    (({"w": torch.tensor([1.0])}, {"w": torch.tensor([5.0])}), [3, 1], [2.0]),  # FedAvg: by training cases
    (({"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([6.0])}), [1, 1, 1], [3.0]),
])
def test_average_state(states, weights, expected):
    assert average_state(*states, weights=weights)["w"].tolist() == pytest.approx(expected)


def test_average_state_takes_non_float_buffers_from_the_first():
    avg = average_state({"n": torch.tensor(3), "w": torch.ones(1)}, {"n": torch.tensor(9), "w": torch.zeros(1)})
    assert avg["n"].item() == 3 and avg["n"].dtype == torch.int64


@pytest.mark.parametrize("call, message", [
    (lambda: average_state({"w": torch.zeros(1)}), r"found 1 state dicts; expected at least 2"),
    (lambda: average_state({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, weights=[1]),
     r"found 1 weights for 2 state dicts; expected one each"),
    (lambda: average_state({"w": torch.zeros(1)}, {"v": torch.zeros(1)}), r"key sets differ"),
])
def test_average_state_refuses_what_is_not_one_architecture(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_max_steps_stops_mid_epoch_and_the_penalty_joins_every_step(net):
    calls = []

    def penalty():
        calls.append(1)
        return torch.zeros(())

    history = supervised_train(net, _batches(2), epochs=2, lr=1e-3, max_steps=3, penalty=penalty)
    assert len(calls) == 3 and len(history) == 2  # 2 steps in the first epoch, 1 in the second


def test_proximal_is_zero_at_the_anchor_and_grows_away_from_it(net):
    anchor = {k: v.clone() for k, v in net.state_dict().items()}
    pull = proximal(net, anchor, weight=0.1)
    assert pull().item() == 0.0
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert pull().item() == pytest.approx(0.1 / 2 * next(net.parameters()).numel())


def test_a_step_whose_loss_is_not_finite_is_never_applied(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1.0)
    b = _batches(1)[0]
    loss = supervised_step(net, opt, b["image"], b["label"], penalty=lambda: torch.tensor(float("nan")))
    assert loss != loss and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
