"""Clients of a site's server: :class:`SiteClient` for its internal ``/gcml`` surface (used by ``gcml sync``, the
demo and tests), :class:`ParamsClient` for MONAI Label's own routes as Slicer calls them, when only an answer's
params are read (benchmarks, the demo).

Example:
    >>> site = SiteClient("http://127.0.0.1:8001")
    >>> record = site.round(peers=["site-b"])        # start a gossip round and wait for its record
    >>> site.status()["served"]["version"]
    >>> _, params = ParamsClient("http://127.0.0.1:8001").infer("gcml_seg", "case_001", {})
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from monailabel.client import MONAILabelClient

__all__ = ["ParamsClient", "RoundFailed", "SiteClient"]


class RoundFailed(RuntimeError):
    """A round's training task ended in ERROR (or was stopped, or never recorded a decision)."""


class SiteClient:
    """Talks to one site's server from the annotation network (no token: internal routes).

    Args:
        url: the server's base URL.
        timeout: seconds per HTTP request.
    """

    def __init__(self, url: str, timeout: float = 30.0, session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()

    @classmethod
    def for_site(cls, cfg, url: str | None = None, timeout: float = 30.0) -> SiteClient:
        """A client of the site ``cfg`` describes (its URL; its CA and certificate when it serves HTTPS)."""
        from gcml_app.site.launch import client_session

        return cls(url or cfg.serve.url, timeout, client_session(cfg))

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise requests.HTTPError(f"{method} {path}: HTTP {r.status_code}: {detail}", response=r)
        return r.json()

    def status(self) -> dict[str, Any]:
        return self._json("GET", "/gcml/status")

    def train_stats(self) -> dict[str, Any]:
        """The ``gcml`` train task's stats from ``/info`` (progress, and ``last_round`` with its timings)."""
        return self._json("GET", "/info/").get("train_stats", {}).get("gcml", {})

    def history(self, round_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        return self._json("GET", "/gcml/history", params={"limit": limit, **({"round": round_id} if round_id else {})})

    def sync(self, peers: list[str] | None = None, epochs: int | None = None) -> dict[str, Any]:
        """Start a gossip round; returns ``{"task_id", "round_id", ...}``."""
        body = {k: v for k, v in (("peers", peers), ("epochs", epochs)) if v is not None}
        return self._json("POST", "/gcml/sync", json=body or None)

    def wait(self, task: dict[str, Any], timeout: float = 3600.0,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Wait for a started round and return its history record.

        Args:
            task: what :meth:`sync` (or the app's ``start_round``) returned.
            progress: called with the train stats (``epoch``, ``total_epochs``, ``loss``) while it runs.

        Raises:
            RoundFailed: the task ended in ERROR or STOPPED (message: its last log line) or left no record.
            TimeoutError: still running after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        started = time.time() - 2  # stats of earlier rounds are older than this
        while time.monotonic() < deadline:
            tasks = self._json("GET", "/train/", params={"all": "true"})
            mine = next((t for t in tasks if t.get("id") == task["task_id"]), {}) if isinstance(tasks, list) else {}
            if mine.get("status") in ("DONE", "ERROR", "STOPPED"):
                break
            if progress and mine.get("status") == "RUNNING":
                stats = self.train_stats()
                if stats.get("start_ts", 0) >= started:
                    progress(stats)
            time.sleep(0.25)
        else:
            raise TimeoutError(f"round {task['round_id']} at {self.url} still running after {timeout:.0f} s")
        records = self.history(task["round_id"])
        if mine["status"] != "DONE" or not records:
            lines = [d for d in mine.get("details", []) if d.strip()]
            raise RoundFailed(f"round {task['round_id']} at {self.url}: {mine['status']}: "
                              f"{lines[-1] if lines else 'no record written'}")
        return records[-1]

    def round(self, peers: list[str] | None = None, epochs: int | None = None, timeout: float = 3600.0,
              progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """:meth:`sync` then :meth:`wait`."""
        return self.wait(self.sync(peers, epochs), timeout, progress)


class ParamsClient(MONAILabelClient):
    """MONAI Label's client (the calls Slicer makes) for a caller that reads only an answer's params: ``infer``
    deletes the label image it saved and returns ``(None, params)``.

    The stock client saves each result as ``tmpdir/<the server's temporary file name>``, by default in the
    system's temporary folder, and never deletes it. On the server's machine that is the path of the server's
    own copy, which the server deletes once it has answered: the two race, and a working day of requests
    fills the folder (a 192x192x160 label is 1.2 MB). This client saves into a folder of its own, removed with
    the client, and deletes each result as soon as it has been read.

    Args:
        url: the server's base URL; other keyword arguments go to :class:`~monailabel.client.MONAILabelClient`.
    """

    def __init__(self, url: str, **kw: Any):
        self._own = tempfile.TemporaryDirectory(prefix="gcml-client-")
        super().__init__(url, tmpdir=self._own.name, **kw)

    def infer(self, model: str, image_id: str, params: dict[str, Any], *args: Any, **kw: Any
              ) -> tuple[None, dict[str, Any]]:
        path, answer = super().infer(model, image_id, params, *args, **kw)
        if path:
            Path(path).unlink(missing_ok=True)
        return None, answer
