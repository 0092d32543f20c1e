"""The task partners compare before any weights move (gcml_app.federation.task), table-driven."""

import pytest
from helpers import TINY

from gcml_app.config import SiteConfig
from gcml_app.federation.task import task_differences, task_of

OURS = task_of(SiteConfig.model_validate(TINY))


def theirs(**changes):
    return task_of(SiteConfig.model_validate({**TINY, **changes}))


CASES = [
    # (partner's settings, gossip.accept, the differences named)
    ({}, (), []),
    ({"labels": {"lesion": 1, "organ": 2}}, (), ["labels: ours [organ, lesion], site-b [lesion, organ]"]),
    ({"labels": {"organ": 1, "lesion": 4}}, (), []),  # values are the site's own; channels match
    ({"labels": {"organ": 1}}, (), ["labels: ours [organ, lesion], site-b [organ]"]),
    ({"input_channels": 2}, ("spacing", "intensity", "roi_size"), ["input_channels: ours 1, site-b 2"]),
    ({"spacing": [1.5, 1.5, 3.0]}, (),
     ["spacing: ours [1.0, 1.0, 1.0], site-b [1.5, 1.5, 3.0] (gossip.accept: [spacing] allows it)"]),
    ({"spacing": [1.5, 1.5, 3.0]}, ("spacing",), []),
    ({"intensity": {"mode": "range", "a_min": -57, "a_max": 164}}, (),
     ["intensity: ours zscore, site-b range -57.0..164.0 (gossip.accept: [intensity] allows it)"]),
    ({"intensity": {"mode": "range"}, "spacing": [1.5, 1.5, 3.0]}, ("intensity", "spacing"), []),
    ({"roi_size": [64, 64, 64]}, (), ["roi_size: ours [32, 32, 32], site-b [64, 64, 64] (gossip.accept: [roi_size] allows it)"]),
    ({"labels": {"lesion": 1, "organ": 2}, "spacing": [1.5, 1.5, 3.0], "intensity": {"mode": "range"}}, ("spacing",),
     ["labels: ours [organ, lesion], site-b [lesion, organ]",
      "intensity: ours zscore, site-b range -1000.0..1000.0 (gossip.accept: [intensity] allows it)"]),
]


@pytest.mark.parametrize("changes, accept, expected", CASES)
def test_each_task_difference_is_named(changes, accept, expected):
    assert task_differences(OURS, theirs(**changes), "site-b", accept) == expected


def test_a_partner_that_does_not_say_its_task_is_refused():
    assert task_differences(OURS, {}, "old")[0].startswith("task: old does not say what its model segments")


def test_gossip_accept_names_only_what_may_differ(tmp_path):
    from helpers import write_config

    from gcml_app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"gossip\.accept\.0: found 'labels'; expected 'spacing', 'intensity' or"):
        load_config(write_config(tmp_path, gossip={"accept": ["labels"]}))
