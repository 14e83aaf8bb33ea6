"""Watchers of a presentity (RFC 2778 §2.2, with RFC 3857 watcher information as prior art).

RFC 2778 names two kinds of watcher: a *subscriber* asks to be notified of changes, a *fetcher*
asks for the current value, and a fetcher that fetches regularly is a *poller*. Subscribers are
in the roster (subscription from/both, or an inbound request pending); fetchers are only known
from their fetches (probes), which `FetchLog` records. Pure: the caller passes the clock.

A poller that fetches more often than the configured rate is refused (its probe gets a
policy-violation error) until its rate falls under the limit again: refused probes count too, so
polling harder does not help.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from server.jid import JID
from server.storage.base import RosterItem

WINDOW = 60.0          # seconds: the rate is fetches per minute
RETENTION = 3600.0     # seconds a watcher is remembered after its last fetch
MAX_WATCHERS = 256     # fetchers remembered per presentity (the least recent are forgotten)
MAX_PRESENTITIES = 10_000  # presentities with a record (probes may name accounts that do not exist)

KINDS = ("subscriber", "pending", "fetcher", "poller")
STATUSES = ("active", "pending", "refused")


@dataclass(slots=True)
class FetchRecord:
    """What one watcher (bare JID) did to one presentity."""

    first: float
    last: float
    count: int = 0
    allowed: bool = False      # the last fetch was answered with presence
    over_limit: int = 0        # fetches refused for exceeding the rate
    recent: deque[float] = field(default_factory=deque)  # times within WINDOW, at most limit+1


class FetchLog:
    """Fetches per (presentity, watcher), bounded: at most `max_watchers` per presentity and
    `max_presentities` presentities (the least recently fetched are forgotten), none older
    than `retention` seconds."""

    def __init__(self, max_per_minute: int, *, max_watchers: int = MAX_WATCHERS,
                 max_presentities: int = MAX_PRESENTITIES, retention: float = RETENTION) -> None:
        if max_per_minute < 1:
            raise ValueError("max_per_minute must be at least 1")
        self.max_per_minute = max_per_minute
        self.max_watchers = max_watchers
        self.max_presentities = max_presentities
        self.retention = retention
        self._log: dict[JID, dict[JID, FetchRecord]] = {}

    def over_limit(self, presentity: JID, watcher: JID, now: float) -> bool:
        """Would one more fetch now exceed the rate? (Does not record anything.)"""
        record = self._log.get(presentity, {}).get(watcher.bare)
        if record is None:
            return False
        _expire(record.recent, now)
        return len(record.recent) >= self.max_per_minute

    def record(self, presentity: JID, watcher: JID, allowed: bool, now: float,
               refused_for_rate: bool = False) -> FetchRecord:
        watchers = self._log.pop(presentity, None)
        if watchers is None:
            if len(self._log) >= self.max_presentities:
                del self._log[next(iter(self._log))]
            watchers = {}
        self._log[presentity] = watchers  # (re)inserted last: the most recently fetched
        bare = watcher.bare
        record = watchers.get(bare)
        if record is None:
            self._prune(watchers, now)
            if len(watchers) >= self.max_watchers:
                # Forget the watcher seen least recently (dicts keep insertion order, and a
                # record is re-inserted on every fetch, so the first is the oldest).
                del watchers[next(iter(watchers))]
            record = FetchRecord(first=now, last=now)
        else:
            del watchers[bare]
        watchers[bare] = record
        record.last = now
        record.count += 1
        record.allowed = allowed
        if refused_for_rate:
            record.over_limit += 1
        recent = record.recent
        _expire(recent, now)
        recent.append(now)
        while len(recent) > self.max_per_minute + 1:
            recent.popleft()
        return record

    def records(self, presentity: JID, now: float) -> dict[JID, FetchRecord]:
        watchers = self._log.get(presentity)
        if watchers is None:
            return {}
        self._prune(watchers, now)
        if not watchers:
            del self._log[presentity]
        return dict(watchers)

    def forget(self, presentity: JID) -> None:
        self._log.pop(presentity, None)

    def _prune(self, watchers: dict[JID, FetchRecord], now: float) -> None:
        cutoff = now - self.retention
        for bare in [b for b, r in watchers.items() if r.last < cutoff]:
            del watchers[bare]

    def __len__(self) -> int:
        return sum(len(w) for w in self._log.values())


def _expire(recent: deque[float], now: float) -> None:
    cutoff = now - WINDOW
    while recent and recent[0] <= cutoff:
        recent.popleft()


@dataclass(frozen=True, slots=True)
class Watcher:
    """One row of watcher information."""

    jid: str
    kind: str      # one of KINDS
    status: str    # one of STATUSES
    count: int     # fetches recorded (0 for a subscriber that never fetched)
    first: float | None
    last: float | None


def watchers_of(items: Iterable[RosterItem], records: dict[JID, FetchRecord],
                denied: Callable[[JID], bool]) -> list[Watcher]:
    """One row per watcher bare JID, sorted by JID. The kind says what the watcher is, the most
    telling first: a poller over the limit, a subscriber, a pending subscriber, a fetcher.
    `denied(watcher)` says whether access rules (blocking, visibility) refuse it presence."""
    rows: dict[str, Watcher] = {}
    for item in items:
        subscriber = item.subscription in ("from", "both")
        if not subscriber and not item.pending_in:
            continue
        jid = JID.parse(item.contact)
        record = records.get(jid)
        if subscriber:
            kind, status = "subscriber", "refused" if denied(jid) else "active"
        else:
            kind, status = "pending", "pending"
        if record is not None and record.over_limit:
            kind = "poller"
        rows[item.contact] = _row(item.contact, kind, status, record)
    for jid, record in records.items():
        contact = str(jid)
        if contact in rows:
            continue
        kind = "poller" if record.over_limit else "fetcher"
        rows[contact] = _row(contact, kind, "active" if record.allowed else "refused", record)
    return [rows[k] for k in sorted(rows)]


def _row(jid: str, kind: str, status: str, record: FetchRecord | None) -> Watcher:
    if record is None:
        return Watcher(jid, kind, status, 0, None, None)
    return Watcher(jid, kind, status, record.count, record.first, record.last)


def timestamp(seconds: float) -> str:
    """XEP-0082 DateTime in UTC, e.g. 2026-11-25T06:27:48Z."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
