"""ASGI app for ``monailabel start_server --uvicorn_app gcml_app.site.server:app``.

It is MONAI Label's own ``monailabel.app:app`` (so its lifespan, routes and settings are unchanged),
plus:

- the ``/gcml`` routes (:mod:`gcml_app.site.routes`);
- the guard in front of everything (:mod:`gcml_app.site.guard`), deciding on the TCP peer:
  uvicorn's own forwarding-header rewrite (on by default for loopback peers) is switched off here,
  whatever command started the server, because the guard honours those headers only from
  ``security.trusted_proxies``;
- the app's domain errors answered as clear HTTP errors, and any other error as a JSON 500 naming it
  (inside the annotation network only);
- uvicorn's access log lines cut to a bounded length.
"""

from __future__ import annotations

import logging
import threading

import uvicorn.config
from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.interfaces.utils.app import app_instance

from gcml_app.config import ConfigError, load_config
from gcml_app.errors import ClickRejected, ImageRejected, LabelRejected, NoPublishedModel, NotEnoughLabels, PacsUnavailable
from gcml_app.site.guard import Guard, GuardMiddleware
from gcml_app.site.limits import FailureLimiter
from gcml_app.site.routes import router
from gcml_app.store import StoreError
from gcml_app.util.jsonl import clean

__all__ = ["app"]

logger = logging.getLogger(__name__)

_STATUS = {ClickRejected: 422, LabelRejected: 422, ImageRejected: 422, NoPublishedModel: 409, NotEnoughLabels: 409, StoreError: 500,
           PacsUnavailable: 503}


def _handler(status: int):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        logger.warning(f"{request.method} {request.url.path}: {status} {exc}")
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    return handle


for _exc, _status in _STATUS.items():
    app.add_exception_handler(_exc, _handler(_status))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    """Any other error: a JSON 500 naming it on the internal surface (site IT and our own clients see why
    without the server log), and a bare one to partners. The traceback still goes to the log."""
    logger.error(f"{request.method} {request.url.path}: unhandled {type(exc).__name__}: {exc}")
    peer = request.url.path.startswith("/gcml/peer")
    detail = "internal error" if peer else f"internal error: {type(exc).__name__}: {clean(exc, 300)}"
    return JSONResponse(status_code=500, content={"detail": detail})


app.add_exception_handler(Exception, _unhandled)


class _TcpPeer:
    """Stands in for uvicorn's ``ProxyHeadersMiddleware``: leaves ``scope["client"]`` the TCP peer.

    uvicorn wraps the app in that middleware after importing this module (``Config.load``), looking
    the class up by name in :mod:`uvicorn.config`; replacing the name here covers ``monailabel
    start_server`` and ``uvicorn`` alike. ``gcml serve`` also starts uvicorn with proxy headers off.
    """

    def __init__(self, app, *args, **kwargs):
        self.app = app

    async def __call__(self, scope, receive, send):
        return await self.app(scope, receive, send)


uvicorn.config.ProxyHeadersMiddleware = _TcpPeer


class _AccessLogLimit(logging.Filter):
    """uvicorn's access log line with its path cut to 200 characters (it is already percent-quoted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:
            record.args = (*record.args[:2], clean(record.args[2]), *record.args[3:])
        return True


logging.getLogger("uvicorn.access").addFilter(_AccessLogLimit())


class _Security:
    """The guard of the running site, rebuilt when its YAML changes (token rotation and revocation
    without a restart). Only ``security`` is re-read; a YAML that no longer validates keeps the
    previous guard and logs why."""

    def __init__(self):
        self.guard: Guard | None = None
        self.stamp: object = None
        self.lock = threading.Lock()
        self.limiter: FailureLimiter | None = None  # failed-token counts survive a re-read

    def __call__(self) -> Guard:
        site = app_instance()
        try:
            stat = site.config_path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = None
        if self.guard is not None and stamp == self.stamp:
            return self.guard
        with self.lock:
            if self.limiter is None:
                self.limiter = FailureLimiter(site.cfg.security.max_tracked_clients)
                site.guard_limiter = self.limiter  # its size is in /gcml/status
            if self.guard is None:
                self.guard = Guard(site.cfg.security, limiter=self.limiter, served_hosts=(site.cfg.serve.host,))
            elif stamp != self.stamp:
                try:
                    self.guard = Guard(load_config(site.config_path).security, limiter=self.limiter,
                                       served_hosts=(site.cfg.serve.host,))
                    logger.info(f"security settings re-read from {site.config_path}: "
                                f"{len(self.guard.tokens)} partner tokens")
                except ConfigError as e:
                    logger.error(f"security settings NOT re-read (keeping the previous ones): {e}")
            self.stamp = stamp
        return self.guard


def _audit(entry: dict) -> None:
    app_instance().audit.write("request", **entry)


app.include_router(router)
def _upload_caps() -> dict[str, int]:
    return {"/datastore/label": app_instance().cfg.security.max_upload_bytes}


app.add_middleware(GuardMiddleware, guard=_Security(), audit=_audit, upload_caps=_upload_caps)
