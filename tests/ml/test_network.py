import pytest
import torch
from helpers import TINY

from gcml_app.config import SiteConfig
from gcml_app.ml.network import arch_fingerprint, build_network

NETS = [
    {"name": "UNet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    {"name": "UNet", "channels": [4, 8], "strides": [2], "num_res_units": 0},
    {"name": "SegResNet", "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
]


def config(network, **kw):
    return SiteConfig.model_validate({**TINY, "network": network, **kw})


@pytest.mark.parametrize("network", NETS)
@pytest.mark.parametrize("size", [(16, 16, 16), (32, 16, 24)])
@pytest.mark.parametrize("channels", [1, 2])
def test_logit_shapes(network, size, channels):
    cfg = config(network, input_channels=channels)
    out = build_network(cfg)(torch.zeros(2, channels, *size))
    assert out.shape == (2, cfg.out_channels, *size)


def test_fingerprint_equal_for_equal_configs_and_different_otherwise():
    a, b = config(NETS[0]), config(NETS[0])
    fp = arch_fingerprint(a, build_network(a).state_dict())
    assert fp == arch_fingerprint(b, build_network(b).state_dict()) and fp.startswith("sha256:")
    others = [config(NETS[1]), config(NETS[2]), config(NETS[0], labels={"organ": 1}),
              config({**NETS[0], "channels": [4, 8, 32]}), config(NETS[0], input_channels=2)]
    fps = {arch_fingerprint(c, build_network(c).state_dict()) for c in others}
    assert fp not in fps and len(fps) == len(others)
