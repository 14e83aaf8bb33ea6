"""Limits on what one peer may cost the server, as Prosody's mod_limits and ejabberd's
shapers do: a read rate per stream with a burst (bytes), a stanza rate per client session,
concurrent and unauthenticated connections per IP address, and failed authentications per
address and per account with a growing delay (RFC 6120 §6.5.10 temporary-auth-failure while it
lasts). Addresses in ``[limits] trusted`` (loopback by default) are exempt from all of them.

The accounting here is sans-IO: every method takes the time (the event loop's clock) and
returns numbers; the streams (server/stream/connection.py, c2s.py) pause their reading when a
bucket is empty and resume it when it has refilled (nothing is dropped), and the c2s listener
refuses a connection over a per-IP limit with a stream error.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import LimitsConfig, Network

log = logging.getLogger("presenced.limits")

# An IPv6 user usually has a /64 of its own: counting per address would let one user open
# 2**64 "different" peers. IPv4 counts per address.
IPV6_PREFIX = 64
# Shaping wakes a paused stream at most this many times a second: it resumes once the bucket
# holds a tenth of a second's worth of bytes (or all that is waiting).
_WAKEUPS = 10
_PURGE_INTERVAL = 60.0
# Why a stream's reading is paused besides a long backlog (bits; server/stream/connection.py)
PAUSE_BYTES = 1    # the read rate's bucket is empty
PAUSE_STANZAS = 2  # the session's stanza rate is used up
PAUSE_AUTH = 4     # a failed authentication's answer is being held back


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full. Taking more than is
    there leaves a debt that refills first (ejabberd's shaper, Prosody's throttle).

    Kept as one number, the time at which the bucket is full again (``full_at``; the generic
    cell rate algorithm's theoretical arrival time): the level at ``now`` is
    ``burst - (full_at - now) * rate``. Taking n tokens moves it n/rate later; no refill step,
    so the per-stanza check is a comparison and an addition."""

    __slots__ = ("burst", "full_at", "rate", "room", "step")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self.step = 1.0 / rate        # seconds one token takes to come back
        self.room = burst / rate      # how far full_at may be ahead of now: an empty bucket
        self.full_at = now

    def level(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (negative: a debt)."""
        ahead = self.full_at - now
        return self.burst - ahead * self.rate if ahead > 0 else float(self.burst)

    def take_one(self, now: float) -> bool:
        """Take one token if there is one (the stanza rate's hot path)."""
        full_at = self.full_at
        if full_at < now:
            full_at = now
        if full_at - now > self.room - self.step:
            return False
        self.full_at = full_at + self.step
        return True

    def take(self, n: float, now: float) -> bool:
        """Take n tokens, even into debt; False when that left the bucket in debt (the caller
        should wait ``wait(0, now)`` seconds before the next)."""
        full_at = self.full_at
        if full_at < now:
            full_at = now
        full_at += n * self.step
        self.full_at = full_at
        return full_at - now <= self.room

    def take_up_to(self, n: int, now: float) -> int:
        """Take as many whole tokens as there are, at most n: how many were taken."""
        level = self.level(now)
        allowed = min(n, int(level)) if level >= 1 else 0
        if allowed:
            self.full_at = max(self.full_at, now) + allowed * self.step
        return allowed

    def wait(self, n: float, now: float) -> float:
        """Seconds from ``now`` until the bucket holds n tokens (n at most burst)."""
        missing = min(n, self.burst) - self.level(now)
        return missing * self.step if missing > 0 else 0.0


class ReadShaper:
    """The read side of one stream: bytes (and, for client sessions, stanzas) against their
    buckets."""

    __slots__ = ("bytes", "limiter", "stanzas")

    def __init__(self, bytes_: TokenBucket | None, stanzas: TokenBucket | None,
                 limiter: Limiter | None = None) -> None:
        self.bytes = bytes_
        self.stanzas = stanzas
        self.limiter = limiter  # counts the pauses for /metrics

    def admit(self, size: int, now: float) -> int:
        """How many of ``size`` bytes may be read now (the rest waits ``resume_after``)."""
        bucket = self.bytes
        return size if bucket is None else bucket.take_up_to(size, now)

    def resume_after(self, waiting: int, now: float) -> float:
        """Seconds until a useful part of ``waiting`` bytes may be read."""
        bucket = self.bytes
        if bucket is None:
            return 0.0
        quantum = max(1.0, min(bucket.burst, bucket.rate / _WAKEUPS))
        return bucket.wait(min(float(waiting), quantum), now)


@dataclass(slots=True)
class _Record:
    failures: int
    last: float


class AuthBackoff:
    """Failed authentications per key (an address or an account): the first ``free`` within
    ``forget`` seconds of each other cost nothing; each one after doubles the delay, from
    ``delay`` up to ``max_delay`` seconds. A key is forgotten ``forget`` seconds after its last
    failure (or at once when the account logs in)."""

    __slots__ = ("_next_purge", "_records", "delay", "forget", "free", "max_delay")

    def __init__(self, *, free: int, delay: float, max_delay: float, forget: float) -> None:
        self.free = free
        self.delay = delay
        self.max_delay = max_delay
        self.forget = forget
        self._records: dict[str, _Record] = {}
        self._next_purge = 0.0

    def __len__(self) -> int:
        return len(self._records)

    def penalty(self, failures: int) -> float:
        """The delay after ``failures`` failures in a row."""
        over = failures - self.free
        if over <= 0:
            return 0.0
        # 2**over overflows nothing: the exponent is capped where max_delay is reached.
        return min(self.max_delay, self.delay * 2.0 ** min(over - 1, 64))

    def failed(self, key: str, now: float) -> float:
        """One more failure: the delay now in force (seconds from now)."""
        self._purge(now)
        record = self._records.get(key)
        if record is None or now - record.last > self.forget:
            record = self._records[key] = _Record(0, now)
        record.failures += 1
        record.last = now
        return self.penalty(record.failures)

    def remaining(self, key: str, now: float) -> float:
        """Seconds the key must still wait before it may try again (0: it may)."""
        record = self._records.get(key)
        if record is None:
            return 0.0
        if now - record.last > self.forget:
            del self._records[key]
            return 0.0
        return max(0.0, record.last + self.penalty(record.failures) - now)

    def succeeded(self, key: str) -> None:
        self._records.pop(key, None)

    def blocked(self, now: float) -> int:
        """How many keys are in their delay now."""
        return sum(1 for key in list(self._records) if self.remaining(key, now) > 0)

    def _purge(self, now: float) -> None:
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_INTERVAL
        forget = self.forget
        for key in [k for k, r in self._records.items() if now - r.last > forget]:
            del self._records[key]


def address_key(host: str) -> str | None:
    """The key an address is counted under (IPv6: its /64), None when it is no IP address
    (a Unix socket, an unknown peer: not limited)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class Ticket:
    """One counted connection from an address: ``authenticated()`` once it logs in,
    ``release()`` when it ends (both idempotent)."""

    __slots__ = ("_limiter", "authed", "key", "released")

    def __init__(self, limiter: Limiter, key: str) -> None:
        self._limiter = limiter
        self.key = key
        self.authed = False
        self.released = False

    def authenticated(self) -> None:
        if self.authed or self.released:
            return
        self.authed = True
        _decrement(self._limiter.unauthenticated, self.key)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        limiter = self._limiter
        _decrement(limiter.connections, self.key)
        if not self.authed:
            _decrement(limiter.unauthenticated, self.key)


def _decrement(counter: dict[str, int], key: str) -> None:
    left = counter.get(key, 0) - 1
    if left > 0:
        counter[key] = left
    else:
        counter.pop(key, None)


# Why a connection was refused: the reason for /metrics and the stream error to send.
REFUSALS = {
    "connections-per-ip": ("policy-violation", "too many connections from your address"),
    "unauthenticated-per-ip": ("policy-violation",
                               "too many unauthenticated connections from your address"),
}


class Limiter:
    """The server's limits: per-IP counts, authentication backoff, and the buckets of each
    new stream. One per server; its counters feed /metrics."""

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.trusted: tuple[Network, ...] = tuple(config.trusted)
        self.connections: dict[str, int] = {}
        self.unauthenticated: dict[str, int] = {}
        self.auth_by_address, self.auth_by_account = (
            AuthBackoff(free=config.auth_failures_free, delay=config.auth_delay,
                        max_delay=config.auth_max_delay, forget=config.auth_forget)
            for _ in range(2))
        # for /metrics
        self.refused: Counter[str] = Counter()      # connections, by reason
        self.read_pauses: Counter[str] = Counter()  # streams paused by their byte rate, by kind
        self.stanza_pauses = 0                      # sessions paused by their stanza rate
        self.auth_refused = 0                       # answered temporary-auth-failure
        self.auth_delayed = 0                       # failures answered late

    def is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.trusted)

    def key(self, host: str) -> str | None:
        """The key a peer is limited under; None for a trusted (or non-IP) peer."""
        if self.is_trusted(host):
            return None
        return address_key(host)

    # -- connections per address --------------------------------------------------------------

    def open(self, key: str) -> Ticket | str:
        """A new connection from ``key``: its ticket, or why it is refused (a REFUSALS key)."""
        config = self.config
        if config.max_connections_per_ip and \
                self.connections.get(key, 0) >= config.max_connections_per_ip:
            self.refused["connections-per-ip"] += 1
            return "connections-per-ip"
        if config.max_unauthenticated_per_ip and \
                self.unauthenticated.get(key, 0) >= config.max_unauthenticated_per_ip:
            self.refused["unauthenticated-per-ip"] += 1
            return "unauthenticated-per-ip"
        self.connections[key] = self.connections.get(key, 0) + 1
        self.unauthenticated[key] = self.unauthenticated.get(key, 0) + 1
        return Ticket(self, key)

    # -- read rates ---------------------------------------------------------------------------

    def shaper(self, kind: str, key: str | None, now: float) -> ReadShaper | None:
        """The read shaper of a new stream of ``kind`` ("c2s", "s2s" or "component") from a
        peer limited under ``key`` (None: trusted, no shaper)."""
        if key is None:
            return None
        config = self.config
        rate, burst = {"c2s": (config.c2s_read_rate, config.c2s_read_burst),
                       "s2s": (config.s2s_read_rate, config.s2s_read_burst),
                       "component": (config.component_read_rate,
                                     config.component_read_burst)}[kind]
        bytes_ = TokenBucket(rate, max(burst, 1), now) if rate else None
        stanzas = None
        if kind == "c2s" and config.stanza_rate:
            stanzas = TokenBucket(config.stanza_rate, max(config.stanza_burst, 1), now)
        if bytes_ is None and stanzas is None:
            return None
        return ReadShaper(bytes_, stanzas, self)

    def stream_shaper(self, kind: str, peername: object, now: float) -> ReadShaper | None:
        """The read shaper of a stream whose transport gave this peername (s2s, components)."""
        if not isinstance(peername, tuple) or not peername:
            return None
        return self.shaper(kind, self.key(str(peername[0])), now)

    def paused(self, kind: str, reason: int) -> None:
        """A stream of ``kind`` paused its reading (PAUSE_*): for /metrics."""
        if reason == PAUSE_BYTES:
            self.read_pauses[kind] += 1
        elif reason == PAUSE_STANZAS:
            self.stanza_pauses += 1

    # -- authentication -----------------------------------------------------------------------

    def auth_wait(self, key: str | None, now: float) -> float:
        """Seconds this address must wait before its next authentication attempt is heard."""
        return 0.0 if key is None else self.auth_by_address.remaining(key, now)

    def auth_failed(self, key: str | None, account: str | None, now: float) -> float:
        """A failed authentication: how long to hold its answer (the larger of the address's
        and the account's delay)."""
        if key is None:
            return 0.0
        delay = self.auth_by_address.failed(key, now)
        if account is not None:
            delay = max(delay, self.auth_by_account.failed(account, now))
        if delay > 0:
            self.auth_delayed += 1
        return delay

    def auth_succeeded(self, account: str) -> None:
        """The account logged in (with the right password, from anywhere): its own count
        starts again. The address's does not: an attacker with one account of its own must
        not be able to wipe its address's record between guesses."""
        self.auth_by_account.succeeded(account)
