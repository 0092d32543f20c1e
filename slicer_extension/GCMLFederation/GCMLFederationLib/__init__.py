"""Plain-Python helpers of the GCML Federation Slicer module (no Slicer imports; pytest covers them).

- :mod:`.client`: the HTTP client of a site's ``/gcml`` internal surface;
- :mod:`.model`: turns ``/gcml/status`` and ``/gcml/history`` JSON into the rows, series and texts shown;
- :mod:`.poller`: fetches in a background thread so the GUI never waits on the network.
"""

from .client import FederationClient, FederationError, server_url_from_settings
from .model import (
    active_rows,
    active_text,
    dice_series,
    interactive_text,
    labels_text,
    partner_rows,
    published_how,
    rollback_choices,
    round_rows,
    served_text,
    training_text,
    working_text,
)
from .poller import Poller

__all__ = [
    "FederationClient",
    "FederationError",
    "Poller",
    "active_rows",
    "active_text",
    "dice_series",
    "interactive_text",
    "labels_text",
    "partner_rows",
    "published_how",
    "rollback_choices",
    "round_rows",
    "served_text",
    "server_url_from_settings",
    "training_text",
    "working_text",
]
