"""What a round leaves behind, read back: one line for a round record, the partner's credit, ``produced_by``."""

from __future__ import annotations

from typing import Any

__all__ = ["partner_gain", "produced_by", "pulled_bytes", "summarize"]


def produced_by(mode: str, winner: str, origin: dict[str, Any] | None) -> str:
    """How a published model was made, for its manifest.

    Example:
        ``"local"``, ``"dcml:average"``, ``"gossip:site-b:dcml_local"``, ``"fedavg"`` (a baseline's
        only candidate is named after the method).
    """
    if mode == "local" or winner == mode:
        return mode
    if origin and origin.get("peer"):
        return f"gossip:{origin['peer']}:{winner}"
    return f"{mode}:{winner}"


def pulled_bytes(record: dict[str, Any]) -> int:
    """The bytes a round downloaded from partners (``gossip.bytes_pulled``; 0 for a round without gossip)."""
    return int((record.get("gossip") or {}).get("bytes_pulled", 0))


def partner_gain(record: dict[str, Any]) -> float:
    """What a DCML round with a partner's model brought: the best candidate's mean paired validation gain.

    Negative when every candidate trained with that partner validated worse than the served model;
    0 when nothing was served before (no comparison).
    """
    gains = [e["gain"] for e in record.get("evidence", {}).values()]
    return max(gains, default=0.0)


def summarize(record: dict[str, Any]) -> str:
    """One line for a round record, e.g. for ``gcml sync`` and the demo.

    Example:
        ``"published v5: gossip with site-b v3, dcml_local 0.712 > served 0.690; pulled 42.7 kB"``
    """
    g = record.get("gossip") or {}
    pulled = f"; pulled {pulled_bytes(record) / 1000:.1f} kB"
    event, means = record.get("event"), record.get("mean", {})
    if event == "superseded" or record.get("superseded_by") is not None:
        return f"superseded: {record.get('reason', '')}"
    if event in ("gossip", "labels"):  # ended without training
        return f"{record.get('outcome', event)}: {record.get('reason', '')}{pulled}"
    if record.get("mode") == "adopt":
        return f"adopted v{record.get('version')} unvalidated from {g.get('peer')}{pulled}"
    how = f"gossip with {g['peer']} v{g.get('peer_version')}" if g else f"{record.get('mode')} round"
    if event == "publish" or record.get("published"):
        winner = record.get("winner")
        score = f"{winner} {means.get(winner, 0):.3f}" + (f" > served {means['served']:.3f}" if "served" in means else "")
        return f"published v{record.get('version')}: {how}, {score}" + (pulled if g else "")
    best = max((k for k in means if k != "served"), key=lambda k: means[k], default=None)
    score = f"best candidate {best} {means[best]:.3f}, not enough over served {means.get('served', 0):.3f}" if best else ""
    return f"kept v{record.get('version')}: {how}, {score}; training kept in the working model" + (pulled if g else "")
