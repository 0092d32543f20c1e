"""Start and stop a site's MONAI Label server with this app (used by ``gcml serve``, the demo and tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from gcml_app.config import SiteConfig, load_config

__all__ = ["APP_FOLDERS", "SiteServer", "app_dir", "client_session", "free_port", "lowest_weight", "server_command",
           "start_together", "stop_group"]


def app_dir() -> str:
    """The MONAI Label app folder: the ``gcml_app`` package (it holds ``main.py``)."""
    return str(Path(__file__).resolve().parents[1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


APP_FOLDERS = ("model", "lib", "logs", "bin")  # what MONAI Label's start_server creates in the app folder


def server_command(config: str | os.PathLike, studies: str | os.PathLike, host: str, port: int) -> list[str]:
    """The ``monailabel start_server`` command line for one site (HTTPS when the YAML has ``serve.tls``).

    ``studies`` is a folder or a PACS's DICOMweb URL (:mod:`gcml_app.site.pacs`). The app folder's
    :data:`APP_FOLDERS` are created here, before any server starts: MONAI Label checks for each and
    then creates it, so servers of several sites starting at once from one fresh install (the demo,
    the bench) raced, and the loser exited with ``FileExistsError``.
    """
    tls = load_config(config).serve.tls
    for d in APP_FOLDERS:
        Path(app_dir(), d).mkdir(exist_ok=True)
    # MONAI Label's CLI through gcml_app.site.serve_main: uvicorn without proxy headers, and with client
    # certificates required when the YAML says so (MONAI Label cannot ask for that by itself).
    entry = [sys.executable, "-m", "gcml_app.site.serve_main", "--ssl-cert-reqs", tls.client_certs if tls else "none"]
    cmd = [
        *entry, "start_server",
        "--app", app_dir(),
        "--studies", str(studies) if str(studies).startswith(("http://", "https://")) else str(Path(studies).resolve()),
        "--conf", "gcml_config", str(Path(config).resolve()),
        "--host", host,
        "--port", str(port),
        "--uvicorn_app", "gcml_app.site.server:app",
    ]
    if tls is not None:
        cmd += ["--ssl_certfile", str(tls.certfile), "--ssl_keyfile", str(tls.keyfile), "--ssl_ca_certs", str(tls.ca_certs)]
    return cmd


def client_session(cfg: SiteConfig) -> requests.Session:
    """A ``requests`` session for talking to this site's own server: its CA, and its certificate for mTLS."""
    session = requests.Session()
    tls = cfg.serve.tls
    if tls is not None:
        session.trust_env = False  # else REQUESTS_CA_BUNDLE would replace the site's CA
        session.verify = str(tls.ca_certs)
        session.cert = (str(tls.certfile), str(tls.keyfile))
    return session


def stop_group(proc: subprocess.Popen | None, sig: int, timeout: float) -> None:
    """Send ``sig`` to a process started with ``start_new_session``, and its children; SIGKILL after ``timeout``."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """A ``requests`` adapter whose connections leave from ``address`` (one of this machine's own)."""

    def __init__(self, address: str, **kwargs):
        self.source_address = (address, 0)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = self.source_address
        super().init_poolmanager(*args, **kwargs)


def lowest_weight(pid: int) -> None:
    """Give process ``pid`` (a session leader, still starting) and what it starts the lowest CPU weight:
    niceness 19, and 19 for its autogroup where the kernel has them (``/proc/<pid>/autogroup``). Raising
    one's own processes' niceness needs no privilege."""
    os.setpriority(os.PRIO_PROCESS, pid, 19)
    try:
        Path(f"/proc/{pid}/autogroup").write_text("19")
    except OSError:  # no autogroups (kernel option off): niceness alone then orders the sessions
        pass


class SiteServer:
    """A running MONAI Label server for one site, started in its own process group.

    Args:
        config: the site YAML.
        studies: the studies folder, or a PACS's DICOMweb URL.
        host: bind address; loopback by default (the annotation network decides otherwise).
        port: ``None`` picks a free port.
        log: file receiving the server's stdout/stderr.
        client_address: the local address our own requests (the readiness probe) come from, for a
            server whose annotation network does not include ``127.0.0.1``.
        extra_args: more ``monailabel start_server`` arguments (e.g. ``--root_path /site-a``).
        env: more environment for the server (e.g. :attr:`gcml_app.site.orthanc.Orthanc.env`).
        elsewhere: the server stands for another machine (a partner in a benchmark that runs a federation
            on one machine): it and everything it starts run at the lowest CPU weight (niceness 19, and
            19 for its session's scheduling group, Linux's autogroup, which otherwise shares the CPU
            equally with the measured site's session whatever the niceness inside), so its rounds and
            scoring do not count as the measured site's load.

    Example:
        >>> with SiteServer("site.yaml", "studies") as srv:
        ...     requests.get(srv.url + "/info/", timeout=10).json()["name"]
    """

    def __init__(self, config, studies, host: str = "127.0.0.1", port: int | None = None, log=None,
                 client_address: str | None = None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, elsewhere: bool = False):
        cfg = load_config(config)
        self.host, self.port = host, port or free_port(host)
        self.url = f"{'https' if cfg.serve.tls else 'http'}://{host}:{self.port}"
        self.session = client_session(cfg)
        if client_address:
            adapter = SourceAddressAdapter(client_address)
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
        self.cmd = [*server_command(config, studies, host, self.port), *extra_args]
        self.log_path = Path(log) if log else None
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None
        self.env = dict(env or {})  # e.g. a PACS's credentials (MONAI Label's settings)
        self.elsewhere = elsewhere

    def start(self, timeout: float = 180.0) -> SiteServer:
        """Spawn the server and wait until it answers ``/info/``."""
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> SiteServer:
        """Start the server process without waiting (start several, then :meth:`wait_ready` each)."""
        # A private temp folder: MONAI Label's client saves a result under the server's temp file name
        # in its own temp folder, so a client on the same machine would race the server's clean-up.
        self.tmp = tempfile.mkdtemp(prefix="gcml-server-")
        env = {**os.environ, "MONAI_LABEL_TRACKING_ENABLED": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
               "TMPDIR": self.tmp, **self.env}
        if self.log_path:
            with open(self.log_path, "ab") as out:  # the child keeps its own copy of the descriptor
                self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        else:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        if self.elsewhere:
            lowest_weight(self.proc.pid)
        return self

    def wait_ready(self, timeout: float = 180.0) -> SiteServer:
        """Wait until the spawned server answers ``/info/``; stop it and raise if it exits or times out."""
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up; see {self.log_path}")
            try:
                if self.session.get(self.url + "/info/", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server at {self.url} did not answer /info/ within {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        stop_group(self.proc, signal.SIGINT, timeout)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> SiteServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_together(servers) -> None:
    """Spawn every :class:`SiteServer` first, then wait for each: their start-ups overlap (a federation on one machine)."""
    for srv in servers:
        srv.spawn()
    for srv in servers:
        srv.wait_ready()
