"""ASGI app for ``monailabel start_server --uvicorn_app gcml_app.server:app``.

It is MONAI Label's own ``monailabel.app:app`` (so its lifespan, routes and settings are unchanged),
plus:

- the ``/gcml`` routes (:mod:`gcml_app.gossip.routes`);
- the guard in front of everything (:mod:`gcml_app.gossip.guard`);
- the app's domain errors answered as clear HTTP errors instead of a bare 500.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.interfaces.utils.app import app_instance

from gcml_app.errors import LabelRejected, NoPublishedModel, NotEnoughLabels
from gcml_app.gossip.guard import Guard, GuardMiddleware
from gcml_app.gossip.routes import router
from gcml_app.store import StoreError

__all__ = ["app"]

logger = logging.getLogger(__name__)

_STATUS = {LabelRejected: 422, NoPublishedModel: 409, NotEnoughLabels: 409, StoreError: 500}


def _handler(status: int):
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        logger.warning(f"{request.method} {request.url.path}: {status} {exc}")
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    return handle


for _exc, _status in _STATUS.items():
    app.add_exception_handler(_exc, _handler(_status))


_guards: dict[int, Guard] = {}


def _guard() -> Guard:
    """The guard for the running app's config (built on first use, after MONAI Label's start-up)."""
    cfg = app_instance().cfg
    if id(cfg) not in _guards:
        _guards[id(cfg)] = Guard(cfg.security)
    return _guards[id(cfg)]


app.include_router(router)
app.add_middleware(GuardMiddleware, guard=_guard)
