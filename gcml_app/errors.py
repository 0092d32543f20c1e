"""Domain errors the server turns into clear HTTP answers (see :mod:`gcml_app.server`)."""

from __future__ import annotations

from gcml_app.labels import LabelRejected

__all__ = ["GCMLError", "IncomingModelRejected", "LabelRejected", "NoPublishedModel", "NotEnoughLabels"]


class GCMLError(RuntimeError):
    """Base of the app's own runtime errors."""


class NoPublishedModel(GCMLError):
    """Inference was asked for before any model passed the validation gate."""


class NotEnoughLabels(GCMLError):
    """Training cannot run: too few labelled cases for a train and a validation split."""


class IncomingModelRejected(GCMLError):
    """An incoming model file for a DCML round that is unsafe or unusable; nothing was trained or changed."""
