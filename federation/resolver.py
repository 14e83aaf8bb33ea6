"""Where a remote XMPP domain's server listens: static routes, then SRV (RFC 6120 §3.2,
XEP-0368 direct TLS), then the domain itself on 5269.

SRV answers are ordered by RFC 2782: ascending priority, and within one priority a weighted
random order. aiodns does the lookups without blocking the loop.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiodns
import pycares

DEFAULT_PORT = 5269


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    direct_tls: bool  # XEP-0368: TLS from the first byte (_xmpps-server)


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    host: str
    direct_tls: bool = False


def order_srv(records: Sequence[SrvRecord], rng: random.Random | None = None) -> list[SrvRecord]:
    """RFC 2782 'Usage rules': lowest priority first; within a priority, pick records one at a
    time with probability proportional to weight (zero-weight records get a small chance)."""
    rng = rng or random.Random()
    ordered: list[SrvRecord] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        # RFC 2782: zero-weight records first in the list so they have a small chance.
        group.sort(key=lambda r: r.weight != 0)
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered


class Resolver:
    def __init__(self, routes: Mapping[str, tuple[str, int]] | None = None,
                 nameservers: Sequence[str] | None = None, timeout: float = 5.0) -> None:
        self.routes = dict(routes or {})
        self._nameservers = list(nameservers) if nameservers else None
        self._timeout = timeout
        self._dns: aiodns.DNSResolver | None = None

    def _resolver(self) -> aiodns.DNSResolver:
        if self._dns is None:
            self._dns = aiodns.DNSResolver(nameservers=self._nameservers, timeout=self._timeout)
        return self._dns

    async def targets(self, domain: str) -> list[Target]:
        """Connection targets to try in order. An SRV answer of '.' means 'no service' (RFC 2782):
        then the list is empty and the caller bounces with remote-server-not-found."""
        route = self.routes.get(domain)
        if route is not None:
            return [Target(route[0], route[1], direct_tls=False)]
        records: list[SrvRecord] = []
        answered = False
        for service, direct in (("_xmpps-server._tcp.", True), ("_xmpp-server._tcp.", False)):
            found = await self._srv(service + domain, direct)
            if found is not None:
                answered = True
                records.extend(found)
        if answered:
            usable = [r for r in records if r.host not in ("", ".")]
            if not usable:
                return []
            # XEP-0368 §3: at equal priority, prefer direct TLS.
            ordered = order_srv(usable)
            ordered.sort(key=lambda r: (r.priority, not r.direct_tls))
            return [Target(r.host.rstrip("."), r.port, r.direct_tls) for r in ordered]
        # RFC 6120 §3.2.2: no SRV records: the domain itself on the default port.
        return [Target(domain, DEFAULT_PORT, direct_tls=False)]

    async def _srv(self, name: str, direct: bool) -> list[SrvRecord] | None:
        try:
            result = await self._resolver().query_dns(name, "SRV")
        except aiodns.error.DNSError:
            return None
        records = []
        for answer in result.answer:
            data = answer.data
            if not isinstance(data, pycares.SRVRecordData):
                continue
            records.append(SrvRecord(data.priority, data.weight, data.port,
                                     _text(data.target), direct))
        return records or None

    async def addresses(self, host: str, port: int) -> list[tuple[str, int]]:
        """A/AAAA for one target (the OS resolver would also do; this one never blocks)."""
        try:
            info = await self._resolver().getaddrinfo(host, port=port)
        except aiodns.error.DNSError:
            return []
        return [(node.addr[0] if isinstance(node.addr[0], str) else node.addr[0].decode(),
                 port) for node in info.nodes]

    async def close(self) -> None:
        if self._dns is not None:
            await self._dns.close()
            self._dns = None


def _text(value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value
