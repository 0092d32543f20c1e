"""Domain errors the server turns into clear HTTP answers (see :mod:`gcml_app.site.server`)."""

from __future__ import annotations

__all__ = [
    "ClickRejected",
    "InitError",
    "GCMLError",
    "ImageRejected",
    "IncomingModelRejected",
    "LabelRejected",
    "NoPublishedModel",
    "NotEnoughLabels",
    "NothingToShare",
    "PacsUnavailable",
    "PayloadRejected",
    "PeerError",
    "PeerUnavailable",
    "RoundBusy",
]


class LabelRejected(ValueError):
    """A label upload that would corrupt training; the message names the mismatch."""


class GCMLError(RuntimeError):
    """Base of the app's own runtime errors."""


class ClickRejected(ValueError):
    """A ``gcml_edit`` request whose clicks cannot be placed (outside the image, not integer voxels, an unknown
    label, too many); the message names the click. Nothing is stored and nothing served changes (HTTP 422)."""


class ImageRejected(GCMLError):
    """An inference request named an image that is not in this site's datastore (e.g. a server path)."""


class NoPublishedModel(GCMLError):
    """Inference was asked for before any model passed the validation gate."""


class PacsUnavailable(GCMLError):
    """The site's PACS did not answer and what was asked for is not in the local cache (HTTP 503)."""


class NotEnoughLabels(GCMLError):
    """Training cannot run: too few labelled cases for a train and a validation split."""


class RoundFailed(GCMLError):
    """A round stopped before its commit; nothing served changed and its pending labels stay pending.

    ``phase`` is where it stopped (``prepare``, ``validate``, ``train``); the round record in the
    history (``outcome: failed``) carries the same message.
    """

    def __init__(self, message: str, phase: str):
        super().__init__(message)
        self.phase = phase


class IncomingModelRejected(GCMLError):
    """An incoming model file for a DCML round that is unsafe or unusable; nothing was trained or changed."""


class PeerError(GCMLError):
    """A partner could not give us a usable model; ``peer`` and ``reason`` say which and why.

    Args:
        peer: the partner's configured name.
        reason: what went wrong, in words a site admin can act on.
    """

    def __init__(self, peer: str, reason: str):
        super().__init__(f"peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerUnavailable(PeerError):
    """The partner did not answer usefully: down, timed out, refused our token, or had no model to share."""


class NothingToShare(PeerUnavailable):
    """The partner answered but has no published model yet (not a fault: it is not backed off)."""


class PayloadRejected(PeerError):
    """The partner answered, but its manifest or weights failed a check; nothing was stored or trained."""


class InitError(ValueError):
    """``network.init_from`` (a bundle or checkpoint) cannot be used: the message names the file and what is wrong."""


class RoundBusy(GCMLError):
    """Another round holds the site's round lock (:mod:`gcml_app.rounds.lock`); nothing ran. ``running`` is
    what that round wrote about itself (``round_id``, ``trigger``, ``pid``, ``started``)."""

    def __init__(self, message: str, running: dict | None = None):
        super().__init__(message)
        self.running = running or {}
