from pathlib import Path

import pytest
from helpers import TINY, write_config

from gcml_app.config import CONFIG_ENV, ConfigError, SegResNetConfig, load_config

REPO = Path(__file__).resolve().parents[1]

BAD = [
    # (overrides, expected message fragment)
    ({"site": "a b"}, r"site: found 'a b'; expected 1-64 characters"),
    ({"labels": {}}, r"labels: found no labels"),
    ({"labels": {"organ": 0}}, r"labels: found \{'organ': 0\}; expected indices between 1 and 255"),
    ({"labels": {"organ": 1, "lesion": 1}}, r"labels: .*expected each label to have its own index"),
    ({"labels": {"background": 1}}, r"labels: found 'background'"),
    ({"spacing": [1, 0, 1]}, r"spacing: found \[1.0, 0.0, 1.0\]; expected three positive spacings"),
    ({"roi_size": [32, 32]}, r"roi_size: found \[32, 32\]; expected 3 values"),
    ({"roi_size": [30, 32, 32]}, r"roi_size: found \[30, 32, 32\]; expected positive sizes divisible by 4"),
    ({"input_channels": 0}, r"input_channels: found 0; expected greater than or equal to 1"),
    ({"network": {"name": "ResNet"}}, r"network.name: found 'ResNet'; expected one of 'UNet', 'SegResNet'"),
    ({"network": {"name": "UNet", "channels": [4, 8], "strides": [2, 2]}}, r"network: found channels=\[4, 8\] with strides"),
    ({"network": {"name": "SegResNet", "blocks_down": [1, 2], "blocks_up": [1, 1]}}, r"network: found blocks_down"),
    ({"network": {"name": "SegResNet", "init_filters": 4}}, r"network: found init_filters=4; expected a multiple of 8"),
    ({"train": {"epochs": 0}}, r"train.epochs: found 0; expected greater than or equal to 1"),
    ({"train": {"lr": "fast"}}, r"train.lr: found 'fast'; expected a valid number"),
    ({"train": {"device": "tpu"}}, r"train.device: found 'tpu'; expected 'auto', 'cpu' or 'cuda'"),
    ({"train": {"epoch": 3}}, r"train.epoch: found unknown key"),
    ({"train": {"gpus": []}}, r"train: .*gpus: found \[\]; expected a list of device indices, all, or none"),
    ({"train": {"gpus": [0, 0]}}, r"train: .*gpus: found \[0, 0\]; expected distinct device indices >= 0"),
    ({"train": {"gpus": "some"}}, r"(?s)train.gpus.*found 'some'; expected a valid list.*expected 'all'"),
    ({"train": {"gpus": [0, 1, 2], "samples_per_case": 2}},
     r"samples_per_case: found 2 with 3 gpus; expected a multiple of 3"),
    ({"train": {"rank_timeout_s": 0}}, r"train.rank_timeout_s: found 0; expected greater than 0"),
    ({"validation": {"fraction": 1.5}}, r"validation.fraction: found 1.5; expected less than 1"),
    ({"intensity": {"mode": "range", "a_min": 5, "a_max": 1}}, r"intensity: found a_min=5.0, a_max=1.0"),
    ({"unknown_key": 1}, r"unknown_key: found unknown key"),
    ({"gossip": {"peers": [{"name": "b", "url": "ftp://x", "token": "t" * 16}]}},
     r"gossip.peers.0.url: found 'ftp://x'; expected an http\(s\)://host:port URL"),
    ({"gossip": {"peers": [{"name": "b", "url": "http://h:1"}]}},
     r"gossip.peers.0: peer 'b': found neither of token and token_env; expected exactly one"),
    ({"gossip": {"peers": [{"name": "b", "url": "http://h:1", "token": "short"}]}},
     r"gossip.peers.0.token: found 'short'; expected at least 16 characters"),
    ({"gossip": {"peers": [{"name": "b", "url": "http://h:1", "token_env": "X"}] * 2}},
     r"gossip: found peers named \['b'\] more than once"),
    ({"gossip": {"policy": "best"}}, r"gossip.policy: found 'best'; expected 'uniform' or 'performance'"),
    ({"gossip": {"epsilon": 2}}, r"gossip.epsilon: found 2; expected less than or equal to 1"),
    ({"security": {"annotation_networks": ["10.0.0.0/33"]}},
     r"security.annotation_networks: found '10.0.0.0/33'; expected a CIDR"),
    ({"security": {"peer_tokens": [{"id": "b", "sha256": "abc"}]}}, r"security.peer_tokens.0.sha256: found 'abc'"),
    ({"security": {"peer_tokens": [{"id": "b"}]}}, r"token 'b': found neither of sha256 and env"),
    ({"security": {"trusted_proxies": ["proxy.example"]}},
     r"security.trusted_proxies: found 'proxy.example'; expected a CIDR"),
    ({"security": {"max_upload_bytes": 10}}, r"security.max_upload_bytes: found 10; expected greater than or equal to 1024"),
    ({"security": {"audit_max_bytes": 0}}, r"security.audit_max_bytes: found 0; expected greater than or equal to 4096"),
    ({"gossip": {"peers": [{"name": "b", "url": "http://h:1", "token_env": "X"}], "adopt_from": ["c"]}},
     r"gossip: adopt_from: found \['c'\]; expected names of configured peers \['b'\]"),
    ({"gossip": {"pull_deadline_s": 0}}, r"gossip.pull_deadline_s: found 0; expected greater than 0"),
    ({"gossip": {"max_abs_weight": -1}}, r"gossip.max_abs_weight: found -1; expected greater than 0"),
    ({"finetune": {"min_new_labels": -1}}, r"finetune.min_new_labels: found -1"),
    ({"serve": {"port": 70000}}, r"serve.port: found 70000; expected less than or equal to 65535"),
    ({"interactive": {"click_probability": 1.5}}, r"interactive.click_probability: found 1.5; expected less than or equal to 1"),
    ({"interactive": {"enabled": "sometimes"}}, r"interactive.enabled: found 'sometimes'; expected a valid boolean"),
    ({"interactive": {"gate_clicks": 21}}, r"interactive.gate_clicks: found 21; expected less than or equal to 20"),
    ({"interactive": {"sigma": 0}}, r"interactive.sigma: found 0; expected greater than 0"),
    ({"interactive": {"clicks": 3}}, r"interactive.clicks: found unknown key"),
    ({"dcml": {"choose": False, "pulled_candidate": True}},
     r"dcml: found \{'choose': False, 'pulled_candidate': True\}; expected pulled_candidate: true only with "
     r"choose: true \(the choice scores the partner's model"),
    ({"dcml": {"shown_worse": "mutual"}}, r"dcml.shown_worse: found 'mutual'; expected 'teacher' or 'alone'"),
    ({"dcml": {"choose": False, "shown_worse": "alone"}},
     r"dcml: found \{'choose': False, 'shown_worse': 'alone'\}; expected shown_worse: alone only with "
     r"choose: true"),
    ({"dcml": {"interval": "t"}}, r"dcml.interval: found 't'; expected 'normal' or 'student'"),
    ({"dcml": {"choose": False, "interval": "student"}},
     r"dcml: found \{'choose': False, 'interval': 'student'\}; expected interval: student only with choose: true"),
    ({"dcml": {"mutual_bar": "median"}}, r"dcml.mutual_bar: found 'median'; expected 'bound' or 'mean'"),
    ({"dcml": {"choose": False, "mutual_bar": "mean"}},
     r"dcml: found \{'choose': False, 'mutual_bar': 'mean'\}; expected mutual_bar: mean only with choose: true"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_values_name_key_value_and_expectation(tmp_path, overrides, message):
    path = write_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_every_error_is_reported_at_once(tmp_path):
    path = write_config(tmp_path, site="a b", train={"epochs": -1})
    with pytest.raises(ConfigError, match=r"(?s)site: found 'a b'.*train.epochs: found -1"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("site: [unclosed", r"not valid YAML"),
        ("- just\n- a list\n", r"found list; expected a mapping"),
        ("", r"found NoneType; expected a mapping"),
    ],
)
def test_malformed_yaml(tmp_path, text, message):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_and_missing_env(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with pytest.raises(ConfigError, match="pass --conf gcml_config PATH or set GCML_CONFIG"):
        load_config()


def test_env_var_and_relative_state_dir(tmp_path, monkeypatch):
    path = write_config(tmp_path / "site")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    cfg = load_config()
    assert cfg.state_dir == (tmp_path / "site" / "state").resolve()
    assert cfg.out_channels == len(TINY["labels"]) + 1


def test_labels_are_ordered_by_index(tmp_path):
    cfg = load_config(write_config(tmp_path, labels={"lesion": 4, "organ": 1}))
    assert list(cfg.labels.items()) == [("organ", 1), ("lesion", 4)]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "sample_configs").glob("*.yaml")))
def test_sample_configs_load(name):
    cfg = load_config(REPO / "sample_configs" / name)
    assert cfg.site and cfg.labels


def test_segresnet_config(tmp_path):
    cfg = load_config(write_config(tmp_path, network={"name": "SegResNet", "init_filters": 16}))
    assert isinstance(cfg.network, SegResNetConfig) and cfg.network.downsample == 8


def test_sample_federation_tokens_match_each_other():
    """Each token a sample site presents hashes to what its partner's YAML expects from it."""
    from gcml_app.site.guard import Guard

    sites = {c.site: c for c in (load_config(REPO / "sample_configs" / f"site_{s}.yaml") for s in "abc")}
    ports = {c.site: c.serve.port for c in sites.values()}
    assert len(set(ports.values())) == 3
    for name, cfg in sites.items():
        assert {p.name for p in cfg.gossip.peers} == set(sites) - {name}
        for peer in cfg.gossip.peers:
            assert peer.url == f"http://127.0.0.1:{ports[peer.name]}"
            assert Guard(sites[peer.name].security).identify(peer.bearer())[0] == name
