"""A site's first weights from a MONAI bundle or a checkpoint (gcml_app.ml.bundle), built locally in MONAI's layout."""

import json

import pytest
import torch
from helpers import TINY
from safetensors.torch import save_file

from gcml_app.config import SiteConfig
from gcml_app.errors import InitError
from gcml_app.ml.bundle import read_bundle, write_bundle
from gcml_app.ml.network import arch_fingerprint, build_network
from gcml_app.rounds.loop import initial_state

# the networks of the bundles the tests build: a UNet with batch norm (the spleen bundle's kind) and a SegResNet
BUNDLES = {
    "unet-batch": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                   "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
    "segresnet": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                  "init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
}


def bundle(tmp_path, kind="unet-batch", out_channels=3, **edit):
    """A bundle whose weights are a seeded random network of its own definition."""
    from monai.bundle import ConfigParser

    net_def = {**BUNDLES[kind], "out_channels": out_channels, **edit}
    torch.manual_seed(7)
    net = ConfigParser({"n": net_def}).get_parsed_content("n")
    return write_bundle(tmp_path / kind, net_def, net.state_dict(), name=f"test {kind}", version="1.2.3"), net


def config(tmp_path, network, **kw):
    return SiteConfig.model_validate({**TINY, "network": network, "state_dir": str(tmp_path / "state"), **kw})


@pytest.mark.parametrize("kind", sorted(BUNDLES))
def test_a_site_starts_from_a_bundle_network_with_the_bundles_weights(tmp_path, kind):
    path, net = bundle(tmp_path, kind)
    cfg = config(tmp_path, {"name": "bundle", "init_from": str(path)})
    state, start = initial_state(cfg)
    theirs = net.state_dict()
    assert {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}.keys() == theirs.keys()
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in theirs.items())
    assert any(k.startswith("head.") for k in state)  # the projection head starts fresh
    assert start["bundle"] == f"test {kind}" and start["bundle_version"] == "1.2.3" and not start["missing"]
    model = build_network(cfg)
    model.load_state_dict(state)
    logits, feats, emb = model.forward_features(torch.zeros(1, 1, 32, 32, 32))
    assert logits.shape == (1, 3, 32, 32, 32) and emb.shape[1] == cfg.dcml.embed_dim and feats.dim() == 5


def test_the_same_network_as_yaml_takes_a_bundle_and_its_fingerprint_ignores_where_weights_start(tmp_path):
    path, net = bundle(tmp_path)
    yaml_net = {"name": "UNet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "batch"}
    a = config(tmp_path, {**yaml_net, "init_from": str(path)})
    b = config(tmp_path, yaml_net)
    state, _ = initial_state(a)
    assert torch.equal(state["backbone.model.0.conv.unit0.conv.weight"], net.state_dict()["model.0.conv.unit0.conv.weight"])
    assert arch_fingerprint(a, build_network(a).state_dict()) == arch_fingerprint(b, build_network(b).state_dict())


def test_a_bundle_for_other_classes_is_refused_by_name_unless_strict_is_false(tmp_path):
    path, _ = bundle(tmp_path, out_channels=6)  # e.g. a whole-body bundle, fine-tuned to our 2 labels
    net = {"name": "bundle", "init_from": str(path)}
    with pytest.raises(InitError, match=r"does not fit this network: 8 mis-shaped: model\.2\.0\.conv\.weight: "
                                        r"theirs \[8, 6, 3, 3, 3\] vs ours \[8, 3, 3, 3, 3\].*strict: false"):
        initial_state(config(tmp_path, net))
    _, start = initial_state(config(tmp_path, {**net, "strict": False}))
    assert start["loaded"] > 0 and len(start["mismatched"]) == 8


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_checkpoint_file_starts_the_backbone(tmp_path, suffix):
    cfg = config(tmp_path, TINY["network"])
    torch.manual_seed(3)
    src = build_network(cfg).backbone.state_dict()
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.items()}}, path)  # wrapped, DataParallel names
    else:
        save_file({k: v.contiguous() for k, v in src.items()}, path)
    state, start = initial_state(config(tmp_path, {**TINY["network"], "init_from": str(path)}))
    assert all(torch.equal(state[f"backbone.{k}"], v) for k, v in src.items()) and start["checkpoint"] == path.name


class Payload:  # an arbitrary object: torch.load(weights_only=True) must refuse to build it
    def __reduce__(self):
        return (print, ("unpickled!",))


BAD = [
    ("pickle", lambda p: torch.save({"model": Payload()}, p / "x.pt") or p / "x.pt",
     r"not a tensors-only checkpoint.*pickled objects are never loaded"),
    ("missing", lambda p: p / "nope.pt", r"nope\.pt: file not found"),
    ("empty", lambda p: torch.save({}, p / "e.pt") or p / "e.pt", r"found no state dict of tensors"),
    ("no bundle", lambda p: (p / "b").mkdir() or p / "b", r"is not a MONAI bundle: expected configs/inference\.json"),
]


@pytest.mark.parametrize("name, make, message", BAD, ids=[b[0] for b in BAD])
def test_bad_init_from_is_a_clear_error(tmp_path, capsys, name, make, message):
    path = make(tmp_path)
    with pytest.raises(InitError, match=message):
        initial_state(config(tmp_path, {**TINY["network"], "init_from": str(path)}))
    assert "unpickled!" not in capsys.readouterr().out


UNSAFE = [
    ("expression", {"in_channels": "$__import__('os').system('echo pwned')"}, r"is an expression or macro"),
    ("target", {"_target_": "os.system"}, r"_target_ 'os\.system' refused; expected a network class"),
    ("nested target", {"act": {"_target_": "torch.nn.ReLU"}}, r"builds an object"),
    ("dangling reference", {"channels": "@nope"}, r"references '@nope', which is not in the config"),
]


@pytest.mark.parametrize("name, edit, message", UNSAFE, ids=[u[0] for u in UNSAFE])
def test_a_bundle_config_runs_no_code(tmp_path, name, edit, message):
    path, _ = bundle(tmp_path)
    conf = path / "configs" / "inference.json"
    raw = json.loads(conf.read_text())
    raw["network_def"].update(edit)
    conf.write_text(json.dumps(raw))
    with pytest.raises(InitError, match=message):
        build_network(config(tmp_path, {"name": "bundle", "init_from": str(path)}))


def test_a_reference_to_a_plain_value_is_resolved(tmp_path):
    path, _ = bundle(tmp_path)
    conf = path / "configs" / "inference.json"
    raw = json.loads(conf.read_text())
    raw["levels"] = [4, 8, 16]
    raw["network_def"]["channels"] = "@levels"
    conf.write_text(json.dumps(raw))
    assert read_bundle(path).network_def("network_def", 1, 3)["channels"] == [4, 8, 16]


def test_an_unknown_feature_layer_names_the_choices(tmp_path):
    with pytest.raises(InitError, match=r"network\.feature_layer: found 'model\.9'; expected a module of the network"):
        build_network(config(tmp_path, {**TINY["network"], "feature_layer": "model.9"}))
    net = build_network(config(tmp_path, {**TINY["network"], "feature_layer": "model.2"}))
    _, feats = net.logits_and_features(torch.zeros(1, 1, 32, 32, 32))
    assert feats.shape[1:] == (3, 32, 32, 32)  # the tap is that layer's output
