"""What a site remembers about its partners, and which partner a round asks first.

Policies:

- ``uniform``: a random order over the partners not backed off.
- ``performance`` (default): partners not tried yet first (each is tried once: an optimistic start),
  then best score first, where a partner's score is an exponential moving average of the
  validation-Dice gain its models brought (``winner - served``, 0 when the gate kept ours, and
  ``REJECT_GAIN`` when its payload was refused); with probability ``epsilon`` the order is uniform,
  so every partner keeps being tried.

A partner that fails (down, timed out, token refused) is backed off for ``peer_backoff_s``,
doubling with each consecutive failure up to ``peer_backoff_max_s``.

The book is a JSON file (``<state_dir>/gossip/peers.json``) written only by the training process
and read by the server for ``/gcml/status``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gcml_app.config import GossipConfig
from gcml_app.util.files import atomic_write

__all__ = ["REJECT_GAIN", "PeerBook", "PeerRecord", "order_peers"]

logger = logging.getLogger(__name__)

REJECT_GAIN = -0.1  # the "gain" a refused payload counts as in the performance score


@dataclass
class PeerRecord:
    """One partner's track record."""

    score: float = 0.0
    rounds: int = 0
    failures: int = 0  # consecutive
    rejections: int = 0  # total
    backoff_until: float = 0.0
    last_attempt: float = 0.0
    last_ok: float = 0.0
    last_error: str = ""
    last_sha256: str = ""
    last_version: int | None = None
    last_site: str = ""
    bytes_pulled: int = 0

    @property
    def reachable(self) -> bool | None:
        """``None`` before the first attempt."""
        if not self.last_attempt:
            return None
        return self.last_ok >= self.last_attempt


@dataclass
class PeerBook:
    """Every partner's :class:`PeerRecord`, persisted as JSON.

    Args:
        path: the JSON file.
        peers: records by partner name.
    """

    path: Path
    peers: dict[str, PeerRecord] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> PeerBook:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raw = {}
        except json.JSONDecodeError as e:
            logger.warning(f"{path} is not valid JSON ({e}); partner scores and backoff start afresh")
            raw = {}
        known = {f.name for f in fields(PeerRecord)}
        peers = {k: PeerRecord(**{a: b for a, b in v.items() if a in known}) for k, v in raw.items()}
        return cls(path, peers)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({k: asdict(v) for k, v in self.peers.items()}, indent=1).encode())

    def get(self, name: str) -> PeerRecord:
        return self.peers.setdefault(name, PeerRecord())

    def failed(self, name: str, reason: str, gossip: GossipConfig, now: float | None = None) -> None:
        """The partner did not answer usefully: back it off."""
        now = time.time() if now is None else now
        rec = self.get(name)
        rec.failures += 1
        rec.last_attempt, rec.last_error = now, reason
        wait = min(gossip.peer_backoff_s * 2 ** (rec.failures - 1), gossip.peer_backoff_max_s)
        rec.backoff_until = now + wait

    def rejected(self, name: str, reason: str, gossip: GossipConfig, now: float | None = None) -> None:
        """The partner answered with a payload we refused: lower its score (it is reachable)."""
        now = time.time() if now is None else now
        rec = self.get(name)
        rec.rejections += 1
        rec.failures = 0
        rec.last_attempt = rec.last_ok = now
        rec.last_error = reason
        rec.score = (1 - gossip.ema) * rec.score + gossip.ema * REJECT_GAIN

    def answered(self, name: str, now: float | None = None) -> None:
        """The partner answered (e.g. its model is unchanged): clear its backoff."""
        now = time.time() if now is None else now
        rec = self.get(name)
        rec.failures, rec.backoff_until = 0, 0.0
        rec.last_attempt = rec.last_ok = now
        rec.last_error = ""

    def pulled(self, name: str, sha256: str, version: int, site: str, nbytes: int, now: float | None = None) -> None:
        """We hold this partner's model ``sha256`` now."""
        self.answered(name, now)
        rec = self.get(name)
        rec.last_sha256, rec.last_version, rec.last_site = sha256, version, site
        rec.bytes_pulled += nbytes

    def credit(self, name: str, gain: float, gossip: GossipConfig) -> None:
        """A DCML round with this partner's model ended with validation-Dice ``gain`` (0 when kept)."""
        rec = self.get(name)
        rec.rounds += 1
        rec.score = (1 - gossip.ema) * rec.score + gossip.ema * gain

    def summary(self, names: list[str], now: float | None = None) -> list[dict[str, Any]]:
        """Rows for ``/gcml/status``: one per configured partner."""
        now = time.time() if now is None else now
        rows = []
        for name in names:
            rec = self.get(name)
            rows.append({
                "name": name, "reachable": rec.reachable, "score": round(rec.score, 4), "rounds": rec.rounds,
                "failures": rec.failures, "rejections": rec.rejections, "last_error": rec.last_error,
                "last_exchange": rec.last_ok or None, "backed_off_s": max(0.0, round(rec.backoff_until - now, 1)),
                "last_version": rec.last_version, "last_sha256": rec.last_sha256 or None,
                "bytes_pulled": rec.bytes_pulled,
            })
        return rows


def order_peers(
    names: list[str], book: PeerBook, gossip: GossipConfig, rng: random.Random, now: float | None = None
) -> tuple[list[str], list[str]]:
    """The order in which a round asks partners, and those skipped because they are backed off.

    Args:
        names: configured partner names.
        book: their records.
        gossip: the policy and its parameters.
        rng: the round's random source.

    Returns:
        ``(order, backed_off)``.
    """
    now = time.time() if now is None else now
    ready = [n for n in names if book.get(n).backoff_until <= now]
    backed_off = [n for n in names if n not in ready]
    rng.shuffle(ready)
    if gossip.policy == "performance" and rng.random() >= gossip.epsilon:
        # untried partners first (optimistic start: each is tried once before scores rank them), then best score;
        # the sort is stable, so ties keep their random order
        ready.sort(key=lambda n: (book.get(n).rounds > 0 or book.get(n).rejections > 0, -book.get(n).score))
    return ready, backed_off
