"""The task a model is for, as partners compare it before any weights move (docs/design.md, "The task").

Two sites can exchange weights only if their networks have the same shape (the architecture
fingerprint) *and* segment the same thing the same way. The second is the task: the ordered label names
and values (the network's output channels, in order), the input channels, the spacing and intensity
settings the network sees its input at, and the crop size it was trained on. A partner whose labels or
input channels differ is always refused; a spacing, intensity or ROI difference is refused unless the
site declares it acceptable (``gossip.accept``): the data never moves, only the weights, and a model
trained at another resolution can still teach.
"""

from __future__ import annotations

from typing import Any

from gcml_app.config import SiteConfig

__all__ = ["ACCEPTABLE", "task_differences", "task_of"]

ACCEPTABLE = ("spacing", "intensity", "roi_size")  # what gossip.accept may name; labels and channels never


def task_of(cfg: SiteConfig) -> dict[str, Any]:
    """The site's task: ``{"labels": [[name, value], ...], "input_channels", "spacing", "intensity", "roi_size"}``.

    Labels are in channel order (by value), so a swapped order is a difference.
    """
    task = {"labels": [[k, v] for k, v in cfg.labels.items()], "input_channels": cfg.input_channels,
            "spacing": [float(s) for s in cfg.spacing], "intensity": cfg.intensity.model_dump(mode="json"),
            "roi_size": list(cfg.roi_size)}
    if cfg.guidance_names:  # interactive: the click guidance channels after the image's, in order
        task["guidance"] = cfg.guidance_names
    return task


def _fmt(key: str, value: Any) -> str:
    if key == "labels" and isinstance(value, list):
        return "[" + ", ".join(str(x[0]) if isinstance(x, list) and x else str(x) for x in value) + "]"
    if key == "intensity" and isinstance(value, dict):
        mode = value.get("mode")
        return (f"range {value.get('a_min')}..{value.get('a_max')}" if mode == "range" else str(mode))
    return str(value)


def task_differences(ours: dict[str, Any], theirs: dict[str, Any] | None, peer: str,
                     accept: tuple[str, ...] = ()) -> list[str]:
    """What differs between our task and a partner's, each as ``"key: ours X, PEER Y"``; accepted ones left out.

    Labels are compared by name and order, the channel each name lands in; the values in a site's label
    files are its own (``{organ: 1, lesion: 4}`` trains the same channels as ``{organ: 1, lesion: 2}``).

    Args:
        theirs: the partner manifest's ``task`` (``None``: a partner too old to say; refused).
        accept: the keys of :data:`ACCEPTABLE` the site allows to differ (``gossip.accept``).
    """
    if not theirs:
        return [(f"task: {peer} does not say what its model segments (a gcml app older than ours); "
                 "expected a manifest with 'task'")]
    out = []
    for key in ("labels", "input_channels", "spacing", "intensity", "roi_size"):
        a, b = ours.get(key), theirs.get(key)
        if key == "labels":
            a = [x[0] for x in a or []]
            b = [x[0] if isinstance(x, list) and x else x for x in (b or [])]
            if a != b:
                out.append(f"labels: ours {_fmt(key, [[n] for n in a])}, {peer} {_fmt(key, [[n] for n in b])}")
            continue
        if a != b and key not in accept:
            hint = f" (gossip.accept: [{key}] allows it)" if key in ACCEPTABLE else ""
            out.append(f"{key}: ours {_fmt(key, a)}, {peer} {_fmt(key, b)}{hint}")
    a, b = ours.get("guidance") or [], theirs.get("guidance") or []
    if a and b and a != b:  # with and without guidance convert exactly; two different layouts do not
        out.append(f"guidance: ours {a}, {peer} {b}")
    return out
