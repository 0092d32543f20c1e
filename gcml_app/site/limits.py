"""The guard's tables per client address, each bounded: failed partner-token attempts and folded refusals.

A client is its address, an IPv6 client its /64 (:func:`client_key`), so that one host cannot grow a
table by rotating addresses; every table keeps at most ``security.max_tracked_clients`` clients,
the least recently seen dropped first.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import OrderedDict, deque
from typing import Any

from gcml_app.util.jsonl import clean

__all__ = ["FailureLimiter", "RefusalDigest", "client_key"]


def client_key(address: str | None) -> str:
    """What per-client tables count by: the address, or its /64 for IPv6 (one host owns a whole /64)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return clean(address or "unknown", 64)
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Bounded:
    """An LRU dict of at most ``size`` entries (the least recently touched are dropped first)."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return default

    def put(self, key: str, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def __len__(self) -> int:
        return len(self.items)


class FailureLimiter:
    """Failed partner-token attempts per client (:func:`client_key`) in a sliding window.

    Kept across guard rebuilds. Bounded: at most ``max_clients`` clients are tracked (expired ones
    are swept first, then the least recently seen dropped), each with at most ``limit`` times.
    """

    def __init__(self, max_clients: int = 10_000):
        self._fails = _Bounded(max_clients)
        self._lock = threading.Lock()
        self._swept = float("-inf")

    def __len__(self) -> int:
        return len(self._fails)

    def _sweep(self, now: float, window: float) -> None:
        for key in [k for k, times in self._fails.items.items() if not times or now - times[-1] >= window]:
            del self._fails.items[key]

    def retry_after(self, client: str, limit: int, window: float, now: float) -> int | None:
        """Seconds until ``client`` may try again, or ``None`` if it is not blocked."""
        with self._lock:
            times = self._fails.items.get(client_key(client))
            recent = [t for t in times or () if now - t < window]
            return max(1, int(recent[-limit] + window - now) + 1) if len(recent) >= limit else None

    def fail(self, client: str, now: float, limit: int = 10, window: float = 300.0) -> None:
        with self._lock:
            key = client_key(client)
            times = self._fails.get(key)
            if times is None:
                if len(self._fails) >= self._fails.size and now - self._swept >= 1.0:  # at most once a second
                    self._sweep(now, window)
                    self._swept = now
                times = deque(maxlen=limit)
            times.append(now)
            self._fails.put(key, times)


class RefusalDigest:
    """Folds repeated refusals of one kind (status and reason) from one client into one line per ``period_s``.

    :meth:`note` says whether this refusal is the one to log, and how many were folded in since the
    last logged one of that kind from that client. Bounded like :class:`FailureLimiter`.
    """

    def __init__(self, period_s: float = 60.0, max_clients: int = 10_000):
        self.period_s = period_s
        self._seen = _Bounded(max_clients)
        self._lock = threading.Lock()

    def note(self, client: str | None, now: float, kind: str = "") -> tuple[bool, int]:
        with self._lock:
            key = f"{client_key(client)} {kind}"
            last, folded = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.period_s:
                self._seen.put(key, (last, folded + 1))
                return False, folded + 1
            self._seen.put(key, (now, 0))
            return True, folded
