"""Test helpers: tiny site configs and sample studies (32^3 phantoms, small UNets)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from pathlib import Path

import psutil
import yaml

from gcml_app.sim.phantoms import write_studies

TINY = {
    "site": "test-site",
    "labels": {"organ": 1, "lesion": 2},
    "spacing": [1.0, 1.0, 1.0],
    "roi_size": [32, 32, 32],
    "network": {"name": "UNet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "train": {"epochs": 2, "batch_size": 2, "samples_per_case": 1, "lr": 0.005, "seed": 0, "num_threads": 2},
    "validation": {"fraction": 0.2, "min_cases": 1},
    # mutual learning every round: the tests of DCML's plumbing see its three candidates; dcml.choose (the default)
    # has its own tests (tests/rounds/test_choice.py, the simulator's gcml)
    "dcml": {"choose": False},
    "state_dir": "state",
}


def write_config(folder: Path, **overrides) -> Path:
    """Write the tiny site YAML (with top-level overrides) into ``folder/site.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return path


def cases_of(studies: Path, n: int | None = None) -> list[dict[str, str]]:
    """The labelled cases of a studies folder as a round takes them: ``[{"id", "image", "label"}]``."""
    labels = sorted((studies / "labels" / "final").glob("*.nii.gz"))[:n]
    return [{"id": p.name.split(".")[0], "image": str(studies / p.name), "label": str(p)} for p in labels]


def make_studies(root: Path, cases: int, labelled: int, style: str = "a", seed: int = 0) -> tuple[Path, Path]:
    """A studies folder with ``labelled`` final labels, and a folder with every case's true label.

    Returns:
        ``(studies, truth)``; ``truth/<case>.nii.gz`` exists for all cases.
    """
    full = write_studies(root / "full", style, cases=cases, seed=seed)
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in range(cases):
        name = f"case_{i:03d}.nii.gz"
        shutil.copy(full / name, studies / name)
        if i < labelled:
            shutil.copy(full / "labels" / "final" / name, studies / "labels" / "final" / name)
    return studies, full / "labels" / "final"


def write_federation(root: Path, styles: str = "abc", cases: int = 8, labelled: int = 6,
                     extra_peers: dict[str, list[dict]] | None = None,
                     gossip_for: dict[str, dict] | None = None, pki: Path | None = None,
                     **overrides) -> dict[str, dict]:
    """Site folders for a loopback federation: every site lists every other as a partner, with tokens.

    Args:
        root: where ``site-<style>/`` folders go.
        styles: one phantom style per site (site name ``site-<style>``).
        extra_peers: more ``gossip.peers`` entries per site name (e.g. a dead or hostile partner).
        gossip_for: more ``gossip`` keys per site name (e.g. float16 transport at one site).
        pki: a folder from :func:`gcml_app.site.certs.write_trial_pki`: every site serves HTTPS with mutual
            TLS and pulls over HTTPS with its own certificate.
        overrides: top-level YAML keys for every site (``gossip`` is merged, not replaced).

    Returns:
        ``{site: {"config", "studies", "truth", "port", "url", "tokens": {partner: token we present}}}``.
    """
    from gcml_app.site.guard import hash_token
    from gcml_app.site.launch import free_port

    names = [f"site-{s}" for s in styles]
    ports = {n: free_port() for n in names}
    scheme = "https" if pki else "http"
    tokens = {(a, b): secrets.token_urlsafe(24) for a in names for b in names if a != b}
    gossip_extra = overrides.pop("gossip", {})
    sites = {}
    for style, name in zip(styles, names):
        folder = root / name
        studies, truth = make_studies(folder, cases=cases, labelled=labelled, style=style)
        peers = [{"name": b, "url": f"{scheme}://127.0.0.1:{ports[b]}", "token": tokens[(name, b)]}
                 for b in names if b != name] + list((extra_peers or {}).get(name, []))
        tls = {}
        if pki:
            tls = {"ca_bundle": str(pki / "ca.pem"), "client_cert": str(pki / f"{name}.pem"),
                   "client_key": str(pki / f"{name}.key")}
        serve = {"host": "127.0.0.1", "port": ports[name]}
        if pki:
            serve["tls"] = {"certfile": str(pki / f"{name}.pem"), "keyfile": str(pki / f"{name}.key"),
                            "ca_certs": str(pki / "ca.pem"), "client_certs": "required"}
        config = write_config(
            folder, site=name, **overrides,
            gossip={"peers": peers, "interval_s": 0, "epochs": 1, "warmup_epochs": 2, **tls,
                    "connect_timeout_s": 2, "read_timeout_s": 5, "retries": 1, "backoff_factor": 0.1,
                    "peer_backoff_s": 0, **gossip_extra, **(gossip_for or {}).get(name, {})},
            security={"peer_tokens": [{"id": a, "sha256": hash_token(tokens[(a, name)])}
                                      for a in names if a != name]},
            serve=serve,
        )
        sites[name] = {"config": config, "studies": studies, "truth": truth, "port": ports[name],
                       "url": f"{scheme}://127.0.0.1:{ports[name]}",
                       "tokens": {b: tokens[(name, b)] for b in names if b != name}}
    return sites


@contextlib.contextmanager
def running(sites: dict[str, dict], logs: Path):
    """Every site of :func:`write_federation` served at once (started together, then waited for):
    ``{site: SiteServer}``; all stopped on exit."""
    from gcml_app.site.launch import SiteServer, start_together

    servers = {n: SiteServer(s["config"], s["studies"], port=s["port"], log=logs / f"{n}.log")
               for n, s in sites.items()}
    try:
        start_together(servers.values())
        yield servers
    finally:
        for srv in servers.values():
            srv.stop()


def until(check, timeout: float = 10.0, what: str = "the condition"):
    """Poll ``check()`` every 0.2 s until it returns something truthy, and return that."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g} s"
        time.sleep(0.2)
    return value


def train(client, timeout: float = 600, **params) -> dict:
    """Start the ``gcml`` train task through ``monailabel.client`` (Slicer's Train button) and wait:
    its final train status (``DONE`` or ``ERROR``)."""
    import time

    client.train_start("gcml", params)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.train_status(check_if_running=False)
        if status.get("status") in ("DONE", "ERROR"):
            return status
        time.sleep(1)
    raise TimeoutError(f"training did not finish in {timeout} s")


@contextlib.contextmanager
def bound_to(address: str):
    """Every connection this process opens leaves from ``address`` (a loopback address such as 127.0.0.2):
    ``requests``/urllib3 and ``http.client`` (what ``monailabel.client`` uses) alike."""
    import socket

    import urllib3.util.connection as u3

    original_socket, original_u3 = socket.create_connection, u3.create_connection

    def via_socket(addr, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kw):
        return original_socket(addr, timeout, (address, 0), **kw)

    def via_u3(addr, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, socket_options=None):
        return original_u3(addr, timeout, (address, 0), socket_options)

    socket.create_connection, u3.create_connection = via_socket, via_u3
    try:
        yield
    finally:
        socket.create_connection, u3.create_connection = original_socket, original_u3


def no_ranks_left():
    """Every process this test's rounds started has ended (the ranks are children of this process; spawn's
    resource tracker, multiprocessing's own helper, lives as long as this process)."""
    deadline = time.monotonic() + 10
    while (kids := [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE
                    and "resource_tracker" not in " ".join(p.cmdline())]):
        assert time.monotonic() < deadline, f"processes left behind: {[(p.pid, p.name()) for p in kids]}"
        time.sleep(0.1)
