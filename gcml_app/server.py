"""The ASGI app's import path before the layout of packages: ``--uvicorn_app gcml_app.server:app``.

Kept so that a hospital's existing service files (``monailabel start_server ... --uvicorn_app
gcml_app.server:app``) keep their guard after an upgrade. The app is :data:`gcml_app.site.server.app`;
``gcml serve`` and docs/site-it.md name that.
"""

from gcml_app.site.server import app

__all__ = ["app"]
