"""HTTP client of a GCML site's internal surface, standard library only (it runs inside Slicer's Python).

Every call has a timeout, HTTPS certificates are verified (system CAs, or a CA file), and every
failure is a :class:`FederationError` with the HTTP status (if any) and a message a user can act on.

Example:
    >>> client = FederationClient("http://127.0.0.1:8001")
    >>> client.status()["served"]["version"]
    4
    >>> client.sync()["round_id"]
    '1f2e3d4c5b6a'
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = ["FederationClient", "FederationError", "server_url_from_settings"]

MONAILABEL_URL_KEY = "MONAILabel/serverUrl"
OWN_URL_KEY = "GCMLFederation/serverUrl"


def server_url_from_settings(value) -> str:
    """The server to show: the MONAI Label module's server if set, else this module's own setting.

    Args:
        value: ``value(key) -> str`` (e.g. ``lambda k: qt.QSettings().value(k, "")``).
    """
    return str(value(MONAILABEL_URL_KEY) or value(OWN_URL_KEY) or "").strip()


class FederationError(Exception):
    """A call to the site's server failed.

    Attributes:
        status: the HTTP status, or ``None`` when the server could not be reached or did not answer.
        message: what went wrong, in words for the user.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status


class FederationClient:
    """Talks to ``/gcml/*`` of one site's MONAI Label server (from the annotation network).

    Args:
        url: the server URL, e.g. ``http://127.0.0.1:8001`` (the MONAI Label module's server).
        timeout: seconds each request may take.
        ca_file: a CA bundle for HTTPS with a private CA; verification is never turned off.

    Raises:
        ValueError: ``url`` is not an http(s) URL, or ``timeout`` is not positive.
    """

    def __init__(self, url: str, timeout: float = 5.0, ca_file: str | None = None):
        parsed = urllib.parse.urlparse((url or "").strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"server URL: found {url!r}; expected http(s)://host:port")
        if timeout <= 0:
            raise ValueError(f"timeout: found {timeout}; expected a positive number of seconds")
        self.url = url.strip().rstrip("/")
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file) if parsed.scheme == "https" else None

    def _request(self, method: str, path: str, params: dict[str, Any] | None = None, body: Any = None) -> Any:
        url = self.url + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(url, data=data, method=method, headers={"Accept": "application/json"})
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = _detail(e)
            if e.code == 404 and path == "/gcml/status":
                detail = "no /gcml/status here: is this a MONAI Label server running the GCML app?"
            raise FederationError(f"{method} {path} failed: HTTP {e.code}: {detail}", e.code) from None
        except (socket.timeout, TimeoutError):
            raise FederationError(f"the GCML server at {self.url} did not answer within {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise FederationError(f"the GCML server at {self.url} did not answer within {self.timeout:g} s") from None
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise FederationError(f"the certificate of {self.url} could not be verified: {reason.verify_message}") from None
            raise FederationError(f"cannot reach the GCML server at {self.url}: {reason}") from None
        except OSError as e:
            raise FederationError(f"cannot reach the GCML server at {self.url}: {e}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise FederationError(f"{method} {path}: the server answered with something that is not JSON") from None

    def status(self) -> dict[str, Any]:
        """``GET /gcml/status``: served model, gossip state, partners, pending labels, running round."""
        return self._request("GET", "/gcml/status")

    def history(self, limit: int = 200) -> list[dict[str, Any]]:
        """``GET /gcml/history``: the last ``limit`` decisions, oldest first."""
        return self._request("GET", "/gcml/history", params={"limit": int(limit)})

    def sync(self, peers: list[str] | None = None) -> dict[str, Any]:
        """Start a gossip round now; returns ``{"task_id", "round_id", ...}`` (409 while one runs)."""
        return self._request("POST", "/gcml/sync", body={"peers": list(peers)} if peers else None)

    def pause(self) -> dict[str, Any]:
        return self._request("POST", "/gcml/pause")

    def resume(self) -> dict[str, Any]:
        return self._request("POST", "/gcml/resume")

    def rollback(self, version: int, reason: str = "") -> dict[str, Any]:
        """Serve ``version`` again.

        Raises:
            ValueError: ``version`` is not a positive integer.
            FederationError: e.g. 404 for a version the site does not have.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"rollback version: found {version!r}; expected a positive integer")
        return self._request("POST", f"/gcml/rollback/{version}", params={"reason": reason} if reason else None)


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read(4096)
        return str(json.loads(body).get("detail", body.decode(errors="replace")))
    except Exception:  # the status alone still says what happened
        return e.reason or ""
