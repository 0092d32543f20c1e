"""A small test CA and per-site certificates for a trial federation (``gcml certs``).

Each site certificate is valid for server and client authentication (so the same pair serves the
site's HTTPS and identifies it to partners in mutual TLS), for the site's name and that site's own
host names and addresses only, so one site's certificate cannot stand in for another's URL. A site
given no hosts gets the loopback names (a one-machine trial, where every site shares them).

Every private key is created with mode 0600 (never readable by others, not even for a moment);
the CA key goes to its own folder, apart from the files handed to sites. For production, use your
hospital's PKI; this is for trials and tests.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["LOOPBACK", "make_ca", "make_site_cert", "write_trial_pki"]

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GCML trial federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path = path.with_suffix(".key")
    key_path.unlink(missing_ok=True)  # O_EXCL below: a fresh file, 0600 from its first byte
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(name: str = "GCML trial CA", days: int = 365):
    """A self-signed CA: ``(key, certificate)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_site_cert(ca_key, ca_cert, site: str, hosts: list[str], days: int = 365):
    """A site's certificate for ``site`` and its own ``hosts`` (names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    alt: list[x509.GeneralName] = [x509.DNSName(site)]
    for h in dict.fromkeys(hosts):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(site)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write_trial_pki(out: str | Path, sites: list[str], hosts: dict[str, list[str]] | None = None,
                    ca_name: str = "GCML trial CA", ca_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``ca.pem`` and ``<site>.pem`` / ``<site>.key`` for every site into ``out``, and ``ca.key``
    into ``ca_dir`` (default ``<out>-ca``, mode 0700), apart from what is handed to sites.

    Args:
        hosts: each site's own host names and addresses; a site not listed gets :data:`LOOPBACK`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_dir = Path(ca_dir) if ca_dir else out.with_name(out.name + "-ca")
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(ca_name)
    _write(ca_dir / "ca", ca_key, ca_cert)
    (out / "ca.pem").write_bytes((ca_dir / "ca.pem").read_bytes())
    paths = {"ca": out / "ca.pem", "ca_key": ca_dir / "ca.key"}
    for site in sites:
        _write(out / site, *make_site_cert(ca_key, ca_cert, site, list((hosts or {}).get(site) or LOOPBACK)))
        paths[site] = out / f"{site}.pem"
    return paths
