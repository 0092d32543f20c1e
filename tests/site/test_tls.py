"""Two sites over HTTPS with a trial CA and mutual TLS (``gcml certs``): a round succeeds; clients
without a certificate or with one from another CA are refused in the TLS handshake; the peer client
refuses a server certificate from another CA."""

from __future__ import annotations

import pytest
import requests
from helpers import write_federation

from gcml_app.cli import main
from gcml_app.config import load_config
from gcml_app.errors import PeerUnavailable
from gcml_app.federation.client import PeerClient
from gcml_app.site.certs import write_trial_pki
from gcml_app.site.client import SiteClient
from gcml_app.site.launch import SiteServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    pki = root / "pki"
    assert main(["certs", "--out", str(pki), "--sites", "site-a,site-b"]) == 0
    write_trial_pki(root / "rogue", ["site-a", "site-b"], ca_name="Another CA")
    sites = write_federation(root, styles="ab", cases=6, labelled=5, pki=pki)
    servers = [SiteServer(s["config"], s["studies"], port=s["port"], log=root / f"{n}.log") for n, s in sites.items()]
    try:
        for srv in servers:
            srv.spawn()
        for srv in servers:
            srv.wait_ready()
        yield {"sites": sites, "pki": pki, "rogue": root / "rogue"}
    finally:
        for srv in servers:
            srv.stop()


def test_a_gossip_round_over_mutual_tls(fed):
    a, b = (SiteClient.for_site(load_config(fed["sites"][n]["config"])) for n in ("site-a", "site-b"))
    assert a.url.startswith("https://") and b.url.startswith("https://")
    assert a.round()["stage"] == "warmup" and b.round()["stage"] == "warmup"
    rec = a.round(peers=["site-b"])
    assert rec["mode"] == "dcml" and rec["gossip"]["peer"] == "site-b" and rec["gossip"]["bytes_pulled"] > 0


@pytest.mark.parametrize("cert", [None, "rogue"])
def test_client_without_a_certificate_of_our_ca_fails_the_handshake(fed, cert):
    url = fed["sites"]["site-b"]["url"]
    kw = {"verify": str(fed["pki"] / "ca.pem")}
    if cert == "rogue":
        kw["cert"] = (str(fed["rogue"] / "site-a.pem"), str(fed["rogue"] / "site-a.key"))
    with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
        requests.get(url + "/info/", timeout=10, **kw)
    # the right certificate still works
    ok = requests.get(url + "/info/", timeout=10, verify=str(fed["pki"] / "ca.pem"),
                      cert=(str(fed["pki"] / "site-a.pem"), str(fed["pki"] / "site-a.key")))
    assert ok.status_code == 200


def test_peer_client_refuses_a_server_certificate_from_another_ca(fed):
    cfg = load_config(fed["sites"]["site-a"]["config"])
    gossip = cfg.gossip.model_copy(update={"ca_bundle": fed["rogue"] / "ca.pem", "retries": 0})
    client = PeerClient(gossip.peers[0], gossip)
    with pytest.raises(PeerUnavailable, match=r"peer site-b: TLS verification failed for https://127.0.0.1:\d+"):
        client.manifest()
