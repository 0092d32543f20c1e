"""What a round leaves behind: the record's shape, how a published model was made, and reading it back.

A round record is a JSON object: it goes to ``history.jsonl``, to the train task's stats and to
``/gcml/history``, where the Slicer module and ``gcml sync`` read it. :class:`RoundRecord` names its
keys and types (a ``TypedDict``: the record stays a plain dict on disk and on the wire).
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["Attempt", "GossipInfo", "RoundRecord", "partner_gain", "provenance", "pulled_bytes", "summarize"]


class Attempt(TypedDict, total=False):
    """One partner asked in a gossip round."""

    peer: str
    outcome: str  # pulled | unchanged | skipped | nothing_yet | unavailable | rejected | backed_off
    reason: str
    version: int
    bytes: int
    fetch_s: float
    verify_s: float
    seconds: float


class GossipInfo(TypedDict, total=False):
    """The ``gossip`` part of a round record: whom we asked, what came, and the bytes pulled (only here)."""

    peer: str
    peer_version: int
    attempts: list[Attempt]
    bytes_pulled: int
    cached: bool
    fetch_s: float
    verify_s: float


class RoundRecord(TypedDict, total=False):
    """A round's record. ``event`` is ``publish``, ``keep``, ``superseded``, or (a round that ended
    without training) ``gossip`` / ``labels`` with an ``outcome`` and a ``reason``."""

    event: str
    time: str
    trigger: str
    round_id: str
    stage: str
    mode: str  # local | dcml | adopt | a simulator baseline's name
    epochs: int
    seed: int
    n_train: int
    n_val: int
    more_labels_for_strict: int
    losses: list[dict[str, float]]
    winner: str
    published: bool
    reason: str
    outcome: str
    scores: dict[str, dict[str, float]]
    mean: dict[str, float]
    per_case: dict[str, list[dict[str, float]]]
    evidence: dict[str, dict[str, Any]]
    strict: bool
    incoming: dict[str, Any]
    gossip: GossipInfo
    working: dict[str, Any]
    version: int | None
    made_by: dict[str, Any]
    timings: dict[str, float]
    peak_rss_mb: dict[str, float]


def provenance(mode: str, candidate: str, peer: str | None = None) -> tuple[str, dict[str, Any]]:
    """How a published model was made, for its manifest: ``(produced_by, made_by)``.

    ``made_by`` is the structured form (``{"mode", "candidate", "peer"}``) that readers such as the
    Slicer module use; ``produced_by`` the one-line form for people and logs.

    Example:
        >>> provenance("dcml", "average", "site-b")
        ('gossip:site-b:average', {'mode': 'dcml', 'candidate': 'average', 'peer': 'site-b'})
        >>> [provenance(*a)[0] for a in [("local", "local"), ("adopt", "incoming", "site-b"), ("fedavg", "fedavg")]]
        ['local', 'adopted:site-b', 'fedavg']
    """
    made_by = {"mode": mode, "candidate": candidate, "peer": peer}
    if mode == "adopt":
        return f"adopted:{peer}", made_by
    if mode == "local" or candidate == mode:  # a baseline's only candidate is named after the method
        return mode, made_by
    if peer:
        return f"gossip:{peer}:{candidate}", made_by
    return f"{mode}:{candidate}", made_by


def pulled_bytes(record: RoundRecord) -> int:
    """The bytes a round downloaded from partners (``gossip.bytes_pulled``; 0 for a round without gossip)."""
    return int((record.get("gossip") or {}).get("bytes_pulled", 0))


def partner_gain(record: RoundRecord) -> float:
    """What a DCML round with a partner's model brought: the best candidate's mean paired validation gain.

    Negative when every candidate trained with that partner validated worse than the served model;
    0 when nothing was served before (no comparison). A round that trained alone beside a partner found far
    worse (``dcml.choose``) credits it with its own measured paired Dice.
    """
    if (record.get("arm") or {}).get("arm") == "alone":  # it did not train: what it was measured at on our cases
        return record["arm"]["gain"]
    gains = [e["gain"] for e in record.get("evidence", {}).values()]
    return max(gains, default=0.0)


ARM_WORDS = {"mutual": "mutual learning", "teacher": "distilled from it", "alone": "trained alone"}
"""How ``summarize`` names a DCML round's arm (``dcml.choose``)."""


def summarize(record: RoundRecord) -> str:
    """One line for a round record, e.g. for ``gcml sync`` and the demo.

    Example:
        ``"published v5: gossip with site-b v3, dcml_local 0.712 > served 0.690; pulled 42.7 kB"``, or with
        ``dcml.choose``: ``"kept v2: gossip with site-c v2 (trained alone; partner -12.4 Dice points on our
        cases), best candidate local 0.861, not enough over served 0.906; ..."``
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
    if arm := record.get("arm"):  # dcml.choose: how the partner's model was used, and its measured gap
        how += f" ({ARM_WORDS.get(arm['arm'], arm['arm'])}; partner {100 * arm['gain']:+.1f} Dice points on our cases)"
    if event == "publish" or record.get("published"):
        winner = record.get("winner")
        score = f"{winner} {means.get(winner, 0):.3f}" + (f" > served {means['served']:.3f}" if "served" in means else "")
        return f"published v{record.get('version')}: {how}, {score}" + (pulled if g else "")
    best = max((k for k in means if k != "served"), key=lambda k: means[k], default=None)
    score = f"best candidate {best} {means[best]:.3f}, not enough over served {means.get('served', 0):.3f}" if best else ""
    return f"kept v{record.get('version')}: {how}, {score}; training kept in the working model" + (pulled if g else "")
