"""The one check of a sync request (``POST /gcml/sync``, the train task's request, ``gossip_round``)."""

import pytest

from gcml_app.rounds import SyncRequest

PARTNERS = ["site-b", "site-c"]


@pytest.mark.parametrize("body, expected", [
    ({}, SyncRequest()),
    ({"peers": ["site-c", "site-b"]}, SyncRequest(["site-c", "site-b"])),
    ({"epochs": 3}, SyncRequest(None, 3)),
    ({"peers": None, "epochs": None}, SyncRequest()),
])
def test_a_valid_request(body, expected):
    assert SyncRequest.parse(body, PARTNERS) == expected


@pytest.mark.parametrize("body, message", [
    ({"peer": ["site-b"]}, r"found keys \['peer'\]; expected only 'peers' and 'epochs'"),
    ({"peers": []}, r"found peers \[\]; expected a non-empty list of configured partners \['site-b', 'site-c'\]"),
    ({"peers": "site-b"}, r"found peers 'site-b'; expected a non-empty list"),
    ({"peers": ["nobody"]}, r"found peers \['nobody'\]; expected a non-empty list"),
    ({"peers": [1]}, r"found peers \[1\]; expected a non-empty list"),
    ({"epochs": 0}, r"found epochs 0; expected an integer from 1 to 10000"),
    ({"epochs": True}, r"found epochs True; expected an integer"),
    ({"epochs": 2.5}, r"found epochs 2.5; expected an integer"),
    ({"epochs": 10_001}, r"found epochs 10001; expected an integer from 1 to 10000"),
])
def test_a_bad_request_names_what_was_found(body, message):
    with pytest.raises(ValueError, match=message):
        SyncRequest.parse(body, PARTNERS)
