"""A private Orthanc PACS on loopback (Debian packages ``orthanc``, ``orthanc-dicomweb``), for tests and the demo.

    with Orthanc(folder) as pacs:       # own storage, DICOMweb on, authentication on, a free port
        pacs.url                        # http://127.0.0.1:PORT/dicom-web
        pacs.env                        # MONAI Label's credential settings for a server using it
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests

from gcml_app.site.launch import free_port, stop_group

__all__ = ["INSTALL_HINT", "Orthanc", "find_orthanc"]

INSTALL_HINT = "apt-get install -y --no-install-recommends orthanc orthanc-dicomweb"
_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")


def find_orthanc() -> tuple[str, str] | None:
    """``(Orthanc executable, DICOMweb plugin)`` if both are installed, else ``None``."""
    exe = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)
    plugin = next((str(Path(d) / "libOrthancDicomWeb.so") for d in _PLUGIN_DIRS
                   if (Path(d) / "libOrthancDicomWeb.so").exists()), None)
    return (exe, plugin) if exe and plugin else None


class Orthanc:
    """An Orthanc process with its own storage folder, DICOMweb at ``/dicom-web``, HTTP basic auth on.

    Args:
        folder: storage, index, config and log (created; kept across restarts, so a restarted
            Orthanc has the same studies).
        port: HTTP port on 127.0.0.1 (default a free one).
        user, password: the one registered user (default ``gcml`` and a random password).
    """

    def __init__(self, folder: str | Path, port: int | None = None, user: str = "gcml", password: str | None = None):
        found = find_orthanc()
        if found is None:
            raise RuntimeError(f"Orthanc with its DICOMweb plugin is not installed; install it with: {INSTALL_HINT}")
        self.exe, plugin = found
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        # Orthanc listens on every interface without SO_REUSEADDR. After a burst of short connections (the
        # attacker tests leave ~5000 in TIME_WAIT) a port probed free on 127.0.0.1 can still be refused to
        # that bind ("privileged or already in use"); a port probed on the wildcard is one it accepts.
        self.port = port or free_port("0.0.0.0")
        self.user, self.password = user, password or secrets.token_urlsafe(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/dicom-web"
        self.config = self.folder / "orthanc.json"
        self.log = self.folder / "orthanc.log"
        self.config.write_text(json.dumps({
            "Name": "gcml-pacs", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {user: self.password},
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False, "StableAge": 1, "ConcurrentJobs": 1,
        }, indent=1))
        os.chmod(self.config, 0o600)  # it holds the password
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """MONAI Label's DICOMweb credential settings for this Orthanc."""
        return {"MONAI_LABEL_DATASTORE_USERNAME": self.user, "MONAI_LABEL_DATASTORE_PASSWORD": self.password}

    @property
    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def session(self) -> requests.Session:
        s = requests.Session()
        s.auth = self.auth
        return s

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start Orthanc and wait until its REST API answers."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        with self.session() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with code {self.proc.returncode}; see {self.log}")
                try:
                    if s.get(f"{self.base}/system", timeout=2).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc on port {self.port} did not answer within {timeout:.0f} s; see {self.log}")

    def stop(self, timeout: float = 15.0) -> None:
        stop_group(self.proc, signal.SIGTERM, timeout)
        self.proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
