"""The peer client against a real HTTP server playing a hostile partner (no MONAI Label needed)."""

from __future__ import annotations

import time

import pytest
import requests
import torch
from helpers import TINY
from hostile import PAYLOAD_CASES, HostilePeer, pickle_payload
from safetensors.torch import load as st_load

from gcml_app.config import SiteConfig
from gcml_app.errors import NothingToShare, PayloadRejected, PeerUnavailable
from gcml_app.federation.client import PeerClient
from gcml_app.federation.payload import our_arch
from gcml_app.site.launch import free_port

TOKEN = "t" * 32


def _cfg(tmp_path, url: str, **gossip) -> SiteConfig:
    g = {"peers": [{"name": "evil", "url": url, "token": TOKEN}], "max_model_bytes": 200_000,
         "connect_timeout_s": 1, "read_timeout_s": 1, "retries": 1, "backoff_factor": 0.01, **gossip}
    return SiteConfig.model_validate({**TINY, "gossip": g, "state_dir": str(tmp_path)})


@pytest.fixture
def evil(tmp_path):
    with HostilePeer(SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path)})) as peer:
        yield peer


def _pull(cfg: SiteConfig, etag=None):
    client = PeerClient(cfg.gossip.peers[0], cfg.gossip)
    try:
        return client.fetch(client.manifest(), cfg, our_arch(cfg), etag=etag)
    finally:
        client.close()


def test_honest_peer_payload_is_pulled_and_verified(evil, tmp_path):
    cfg = _cfg(tmp_path, evil.url)
    got = _pull(cfg)
    assert got.bytes_received == len(evil.h.body) and got.manifest.site == "evil"
    served = st_load(evil.h.body)  # the tensors received are exactly the tensors served
    assert got.state.keys() == served.keys() and all(torch.equal(got.state[k], v) for k, v in served.items())
    assert evil.h.requests[0][1]["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("case, misbehave, reason", PAYLOAD_CASES, ids=[c[0] for c in PAYLOAD_CASES])
def test_hostile_payload_is_rejected_with_its_reason(evil, tmp_path, case, misbehave, reason):
    cfg = _cfg(tmp_path, evil.url)
    misbehave(evil.h, cfg)
    with pytest.raises(PayloadRejected, match=reason) as e:
        _pull(cfg)
    assert e.value.peer == "evil"


def test_pickle_payload_is_never_unpickled(evil, tmp_path):
    marker = tmp_path / "unpickled"
    evil.h.body = pickle_payload(marker)
    with pytest.raises(PayloadRejected, match="pickled payloads are never loaded"):
        _pull(_cfg(tmp_path, evil.url))
    assert not marker.exists()


@pytest.mark.parametrize("mode, size, announced", [
    ("chunked", 5_000_000, 1000),  # no Content-Length, far more than the manifest announced
])
def test_body_is_not_read_past_what_the_manifest_announced(evil, tmp_path, mode, size, announced):
    evil.h.body = b"\0" * size
    evil.h.manifest = {**evil.h.honest_manifest("x"), "bytes": announced}
    evil.h.mode = mode
    cfg = _cfg(tmp_path, evil.url)
    client = PeerClient(cfg.gossip.peers[0], cfg.gossip)
    man = client.manifest().model_copy(update={"arch": our_arch(cfg)})
    with pytest.raises(PayloadRejected, match=f"model body passed the limit of {announced} bytes; download aborted"):
        client.fetch(man, cfg, our_arch(cfg))


def test_a_compressed_body_is_refused_not_decoded(evil, tmp_path):
    evil.h.body = b"\0" * 50_000_000  # a decompression bomb: about 50 kB on the wire, 50 MB decoded
    evil.h.manifest = {**evil.h.honest_manifest("x"), "bytes": 150_000}
    evil.h.mode = "gzip"
    cfg = _cfg(tmp_path, evil.url)
    client = PeerClient(cfg.gossip.peers[0], cfg.gossip)
    man = client.manifest().model_copy(update={"arch": our_arch(cfg)})
    with pytest.raises(PayloadRejected, match="model sent with Content-Encoding 'gzip'; we asked for identity"):
        client.fetch(man, cfg, our_arch(cfg))


UNAVAILABLE = [
    # (hostile setup, gossip overrides, reason)
    ({"mode": "hang", "hang_s": 5.0}, {}, r"read timeout after 1 s"),
    ({"mode": "status", "status": 503}, {}, r"manifest: HTTP 503 hostile says no"),
    ({"mode": "status", "status": 500}, {}, r"manifest: HTTP 500 hostile says no"),
    ({"token": "another-token-entirely-000000"}, {}, r"refused our token: HTTP 403 unknown partner token"),
]


@pytest.mark.parametrize("setup, gossip, reason", UNAVAILABLE)
def test_unavailable_peer_raises_with_reason(evil, tmp_path, setup, gossip, reason):
    for k, v in setup.items():
        setattr(evil.h, k, v)
    with pytest.raises(PeerUnavailable, match=reason):
        _pull(_cfg(tmp_path, evil.url, **gossip))


def test_down_peer_is_unreachable_quickly(tmp_path):
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable, match=r"peer evil: unreachable at http://127\.0\.0\.1:\d+"):
        _pull(cfg)
    assert time.monotonic() - t0 < 10  # retries with backoff, not a hang (generous bound)


def test_retries_idempotent_gets_on_503(evil, tmp_path):
    evil.h.mode, evil.h.status = "status", 503
    with pytest.raises(PeerUnavailable):
        _pull(_cfg(tmp_path, evil.url, retries=2))
    assert len(evil.h.requests) == 3  # the first try and two retries


def test_missing_token_env_is_a_clear_error(tmp_path, evil, monkeypatch):
    monkeypatch.delenv("GCML_TEST_NO_SUCH_TOKEN", raising=False)
    g = {"peers": [{"name": "evil", "url": evil.url, "token_env": "GCML_TEST_NO_SUCH_TOKEN"}]}
    cfg = SiteConfig.model_validate({**TINY, "gossip": g, "state_dir": str(tmp_path)})
    with pytest.raises(PeerUnavailable, match="no token: environment variable GCML_TEST_NO_SUCH_TOKEN"):
        _pull(cfg)
    monkeypatch.setenv("GCML_TEST_NO_SUCH_TOKEN", TOKEN)
    assert _pull(cfg).bytes_received == len(evil.h.body)
    assert evil.h.requests[-1][1]["Authorization"] == f"Bearer {TOKEN}"


def test_404_means_nothing_to_share(evil, tmp_path):
    evil.h.mode, evil.h.status = "status", 404
    with pytest.raises(NothingToShare, match="no published model yet"):
        _pull(_cfg(tmp_path, evil.url))


def test_float16_payload_is_pulled_and_widened(evil, tmp_path):
    from safetensors.torch import load as st_load

    from gcml_app.federation.payload import encode_weights

    cfg = _cfg(tmp_path, evil.url)
    full = st_load(evil.h.body)
    evil.h.body = encode_weights(full, "float16")
    got = _pull(cfg)
    assert got.bytes_received == len(evil.h.body) < 0.6 * len(encode_weights(full))
    for k, v in full.items():
        assert got.state[k].dtype == v.dtype
        if v.is_floating_point():
            assert torch.allclose(got.state[k], v, rtol=2**-11, atol=1e-7)


@pytest.mark.parametrize("first_bytes", [b"\x80", b"PK"])
def test_safetensors_whose_length_bytes_look_like_pickle_or_zip_are_accepted(tmp_path, first_bytes):
    """The header length is little-endian: its first byte may be 0x80 or spell "PK" by chance."""
    import json as _json

    from hostile import valid_weights
    from safetensors.torch import load as st_load

    from gcml_app.federation.payload import verify_weights

    cfg = _cfg(tmp_path, "http://127.0.0.1:1")
    data = valid_weights(cfg)
    n = int.from_bytes(data[:8], "little")
    low = int.from_bytes(first_bytes.ljust(2, b"\0")[:2], "little") if first_bytes == b"PK" else 0x80
    step = 0x10000 if first_bytes == b"PK" else 0x100
    length = low + step * ((n - low) // step + 1)  # the next length >= n whose low bytes are those
    header = _json.loads(data[8:8 + n])
    blob = _json.dumps(header, separators=(",", ":")).encode()
    forged = length.to_bytes(8, "little") + blob + b" " * (length - len(blob)) + data[8 + n:]
    assert forged.startswith(first_bytes)
    assert set(verify_weights(forged, cfg)) == set(st_load(data))


def test_configured_ca_bundle_wins_over_requests_ca_bundle(tmp_path, monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE override a session's CA; the client passes its CA per request."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/system-bundle.pem")
    cfg = _cfg(tmp_path, "https://127.0.0.1:1", ca_bundle=str(tmp_path / "our-ca.pem"))
    client = PeerClient(cfg.gossip.peers[0], cfg.gossip)
    assert client.verify == str(tmp_path / "our-ca.pem")
    sent = {}

    def fake_send(request, **kw):  # capture what requests would verify against, without a network
        sent.update(kw)
        raise requests.exceptions.ConnectionError("stop here")

    monkeypatch.setattr(client.session, "send", fake_send)
    with pytest.raises(PeerUnavailable):
        client.manifest()
    assert sent["verify"] == str(tmp_path / "our-ca.pem")



# ---------------------------------------------------------------- liveness: a partner cannot hold a round
@pytest.mark.parametrize("setup, gossip, reason", [
    ({"mode": "drip", "drip_bytes": 1, "drip_every_s": 1.0}, {"min_rate_bytes_s": 0},
     r"pull deadline of 6 s passed during the model body"),
    ({"mode": "drip", "drip_bytes": 1, "drip_every_s": 0.5, "drip_manifest": True}, {"min_rate_bytes_s": 0},
     r"pull deadline of 6 s passed during the manifest body"),
    ({"mode": "drip", "drip_bytes": 2, "drip_every_s": 0.5}, {"pull_deadline_s": 60},
     r"model transfer too slow: \d+ bytes in 5\.\d s, under 10000 B/s"),
    ({"mode": "retry_after", "retry_after_s": 3600}, {"retries": 2}, r"manifest: HTTP 503 busy"),
    ({"mode": "hang", "hang_s": 20.0}, {"read_timeout_s": 60, "retries": 0}, r"read timeout after [56](\.\d+)? s"),
])
def test_a_stalling_partner_ends_within_the_deadline(evil, tmp_path, setup, gossip, reason):
    for k, v in setup.items():
        setattr(evil.h, k, v)
    cfg = _cfg(tmp_path, evil.url, **{"pull_deadline_s": 6, "read_timeout_s": 3, **gossip})
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable, match=reason):
        _pull(cfg)
    assert time.monotonic() - t0 < cfg.gossip.pull_deadline_s + 5
    assert not list(tmp_path.glob("**/.pull-*"))  # nothing half-received is left behind


def test_the_client_asks_for_no_content_encoding(evil, tmp_path):
    _pull(_cfg(tmp_path, evil.url))
    assert all(h.get("Accept-Encoding") == "identity" for _, h in evil.h.requests)
