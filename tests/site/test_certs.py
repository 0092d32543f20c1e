"""``gcml certs``: each site's certificate names only that site; keys are private from creation."""

from __future__ import annotations

import os
import ssl
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from helpers import TINY

from gcml_app.cli import main
from gcml_app.config import SiteConfig
from gcml_app.errors import PeerUnavailable
from gcml_app.federation.client import PeerClient


class _Manifest(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture
def pki(tmp_path):
    out = tmp_path / "pki"
    assert main(["certs", "--out", str(out), "--sites", "site-a,site-b",
                 "--hosts", "site-a=127.0.0.2", "--hosts", "site-b=127.0.0.3"]) == 0
    return out


def _serve(pki, site: str, address: str):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / f"{site}.pem", pki / f"{site}.key")
    server = ThreadingHTTPServer((address, 0), _Manifest)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("serving, ok", [("site-a", True), ("site-b", False)])
def test_site_b_certificate_is_refused_for_site_a_url(tmp_path, pki, serving, ok):
    server = _serve(pki, serving, "127.0.0.2")  # site-a's address, answered by `serving`
    try:
        url = f"https://127.0.0.2:{server.server_address[1]}"
        cfg = SiteConfig.model_validate({**TINY, "state_dir": str(tmp_path / "s"), "gossip": {
            "peers": [{"name": "site-a", "url": url, "token": "x" * 20}], "ca_bundle": str(pki / "ca.pem"),
            "retries": 0, "connect_timeout_s": 2, "read_timeout_s": 2}})
        client = PeerClient(cfg.gossip.peers[0], cfg.gossip)
        if ok:
            from gcml_app.errors import NothingToShare
            with pytest.raises(NothingToShare):  # TLS passed; the partner simply has nothing yet
                client.manifest()
        else:
            with pytest.raises(PeerUnavailable, match="TLS verification failed.*(IP address mismatch|doesn't match)"):
                client.manifest()
    finally:
        server.shutdown()
        server.server_close()


def test_certificates_name_only_their_site_and_keys_are_private(tmp_path, pki):
    for site, ip in (("site-a", "127.0.0.2"), ("site-b", "127.0.0.3")):
        cert = x509.load_pem_x509_certificate((pki / f"{site}.pem").read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert alt.get_values_for_type(x509.DNSName) == [site]
        assert [str(a) for a in alt.get_values_for_type(x509.IPAddress)] == [ip]
        assert stat.S_IMODE(os.stat(pki / f"{site}.key").st_mode) == 0o600
    assert not (pki / "ca.key").exists()  # the CA key is not among the files handed to sites
    ca_dir = tmp_path / "pki-ca"
    assert stat.S_IMODE(os.stat(ca_dir / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700


def test_hosts_for_an_unknown_site_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--hosts: found 'site-z=10.0.0.1'; expected SITE=HOST"):
        main(["certs", "--out", str(tmp_path / "p"), "--sites", "site-a", "--hosts", "site-z=10.0.0.1"])
