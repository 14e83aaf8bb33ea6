"""SOCKS5 Bytestreams proxy (XEP-0065) at proxy.<domain>: file transfers between two clients
that cannot reach each other go through it.

    [proxy65]
    listen = ["0.0.0.0:7777"]   # its SOCKS5 listener; empty (the default): no proxy
    host = "proxy.example.org"  # the streamhost clients are told; unset: the listener's
    port = 7777                 # address and port (see _streamhost for a wildcard one)
    timeout = 30                # both ends must connect and be activated within it
    max_transfers = 100         # pairs at once (waiting or relaying); 0: no limit
    rate_per_transfer = 0       # bytes/second, each direction of a transfer; 0: no limit
    rate_total = 0              # bytes/second through the whole proxy; 0: no limit
    allow = []                  # domains or bare JIDs that may use it besides our accounts

The protocol (§6): the initiator asks the service for its <streamhost/>, offers it to the
target, both open a SOCKS5 connection to it with the same DST.ADDR (SHA1(SID + initiator JID
+ target JID)), and the initiator asks the service to <activate/> the pair. The service
computes that hash from the sid, the iq's (server-stamped) sender and the target named, so
only the initiator can activate a pair: anyone else finds nothing (<item-not-found/>).
Until activation nothing is read (bytes sent early wait, §9.1); a pair not activated within
`timeout` of its first connection is closed. Relaying moves at most _CHUNK bytes at a time
and waits for each write to drain, so a slow reader slows its writer and no file is ever held
in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from server.config import (
    Address,
    Invalid,
    addresses,
    boolean,
    int_option,
    option,
    seconds_option,
    service_fields,
)
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza
from server.services import ServiceModule
from server.sessions import Session
from server.xml import stanza as st

log = logging.getLogger("presenced.proxy65")

NS = "http://jabber.org/protocol/bytestreams"
_QUERY = f"{{{NS}}}query"
_ACTIVATE = f"{{{NS}}}activate"
_CHUNK = 1 << 16

# RFC 1928 §6 reply codes.
SUCCEEDED, FAILURE, NOT_ALLOWED, COMMAND_UNSUPPORTED, ADDRESS_UNSUPPORTED = 0, 1, 2, 7, 8


class Socks5Error(Exception):
    """The request cannot be served; `reply` is the RFC 1928 §6 code to answer with (None:
    close without a reply, e.g. not SOCKS5 at all)."""

    def __init__(self, reason: str, reply: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def stream_hash(sid: str, initiator: str, target: str) -> str:
    """XEP-0065 §5.3.2: DST.ADDR = hex SHA1 of SID + initiator JID + target JID."""
    return hashlib.sha1((sid + initiator + target).encode()).hexdigest()


def parse_greeting(data: bytes) -> bool:
    """RFC 1928 §3 version/methods message (VER NMETHODS METHODS): True if it offers 'no
    authentication', the one method we speak (XEP-0065 §5.3.2: authentication is out of scope)."""
    if len(data) < 2 or data[0] != 5 or len(data) != 2 + data[1]:
        raise Socks5Error("not-socks5")
    return 0 in data[2:]


def check_request(head: bytes) -> None:
    """RFC 1928 §4 request, its first four bytes (VER CMD RSV ATYP). XEP-0065 §9.2: CONNECT
    to a domain name (ATYP 3), the stream's hash."""
    if len(head) != 4 or head[0] != 5 or head[2] != 0:
        raise Socks5Error("bad-request", FAILURE)
    if head[1] != 1:
        raise Socks5Error("command-unsupported", COMMAND_UNSUPPORTED)
    if head[3] != 3:
        raise Socks5Error("address-unsupported", ADDRESS_UNSUPPORTED)


def parse_address(rest: bytes) -> str:
    """The rest of the request (LEN, DST.ADDR, DST.PORT): the hash, 40 lower-case hex digits
    (§5.3.2; the port is 0 but §9.2 lets the proxy ignore it). Returns the hash."""
    address = rest[1:-2]
    if len(rest) != rest[0] + 3 or len(address) != 40 \
            or any(c not in b"0123456789abcdef" for c in address):
        raise Socks5Error("not-a-stream-hash", ADDRESS_UNSUPPORTED)
    return address.decode("ascii")


def reply(code: int, address: str = "") -> bytes:
    """RFC 1928 §6 reply; BND.ADDR is the hash the client sent (XEP-0065 §5.3.2), port 0."""
    raw = address.encode("ascii")
    return bytes((5, code, 0, 3, len(raw))) + raw + b"\0\0"


class RateLimit:
    """A token bucket of `rate` bytes per second (0: no limit) with a burst of one chunk.
    Concurrent takers go into debt, each waiting until its own bytes are paid for, so the
    long-run rate holds however many share the bucket."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.burst = min(_CHUNK, rate)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    def chunk(self) -> int:
        """How much to read at once: small enough that the rate is smooth at low limits."""
        return max(1024, min(_CHUNK, self.rate // 8)) if self.rate else _CHUNK

    async def take(self, count: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - count
        self.stamp = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


# -- settings ------------------------------------------------------------------------------------


def _allowed(value: Any, _ctx: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid
    out = []
    for raw in value:
        try:
            jid = JID.parse(raw)
        except InvalidJID as exc:
            raise Invalid(f'"{raw}": {exc}') from None
        if jid.resource is not None:
            raise Invalid(f'"{raw}" is not a domain or a bare JID')
        out.append(str(jid))
    return tuple(out)


def _port(value: Any, _ctx: Any) -> int:
    if type(value) is not int or not 0 < value < 65536:
        raise Invalid
    return value


def _host(value: Any, _ctx: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() or c in "/@" for c in value):
        raise Invalid
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Proxy65Settings:
    # Unset: on when listen is not empty.
    enabled: bool = field(metadata=option("true or false", boolean))
    subdomain: str = field(metadata=service_fields.subdomain("proxy"))
    listen: tuple[Address, ...] = field(metadata=option(
        'a list of "host:port" strings', addresses, []))
    host: str | None = field(metadata=option("a host name or IP address", _host))
    port: int | None = field(metadata=option("an integer from 1 to 65535", _port))
    timeout: float = field(metadata=seconds_option(30))
    max_transfers: int = field(metadata=int_option(0, 1_000_000, 100))
    rate_per_transfer: int = field(metadata=int_option(0, 1 << 40, 0))
    rate_total: int = field(metadata=int_option(0, 1 << 40, 0))
    allow: tuple[str, ...] = field(metadata=option(
        "a list of domains and bare JIDs", _allowed, []))

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: Any) -> None:
        if values.get("enabled") is None:
            values["enabled"] = bool(values.get("listen"))
        elif values["enabled"] and not values.get("listen"):
            report("listen", "a SOCKS5 listener when [proxy65] enabled = true", "empty")


# -- the relay -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Pair:
    """The connections that gave one hash: the first (the target's, §5.3.2) and the second
    (the initiator's, §5.3.4), until activation; then the relay's task."""

    hash: str
    first: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    second: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    relay: asyncio.Task[None] | None = None
    expiry: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [conn[1] for conn in (self.first, self.second) if conn is not None]


class Proxy65(ServiceModule):
    name = "proxy65"
    settings = Proxy65Settings
    identity = ("proxy", "bytestreams")
    display_name = "SOCKS5 Bytestreams Service"
    service_features = (NS,)

    def __init__(self, server: Any, config: Proxy65Settings) -> None:
        super().__init__(server, config)
        self._listeners: list[asyncio.base_events.Server] = []
        self._pairs: dict[str, _Pair] = {}
        self._handshakes: set[asyncio.StreamWriter] = set()  # connections negotiating
        self._total = RateLimit(config.rate_total)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.config.enabled:
            return
        for address in self.config.listen:
            listener = await asyncio.start_server(self._connected, address.host, address.port,
                                                  limit=_CHUNK)
            self._listeners.append(listener)
            for sock in listener.sockets:
                log.info("event=listening kind=proxy65 address=%s:%s",
                         *sock.getsockname()[:2])
        await super().start()

    async def stop(self) -> None:
        for listener in self._listeners:
            listener.close()
        for writer in list(self._handshakes):
            writer.close()  # its handshake ends with IncompleteReadError
        relays = [p.relay for p in self._pairs.values() if p.relay is not None]
        for pair in list(self._pairs.values()):
            self._close(pair, "shutdown")
        for relay in relays:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await relay
        for listener in self._listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()
        self._listeners.clear()

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return [("proxy65", *sock.getsockname()[:2])
                for listener in self._listeners for sock in listener.sockets]

    # -- XMPP ----------------------------------------------------------------------------------

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if stanza.tag != st.IQ:
            return True  # messages and presence: nothing to do
        payload = st.payload(stanza)
        if to.local is not None or to.resource is not None or payload is None \
                or payload.tag != _QUERY or stanza.get("type") not in ("get", "set"):
            return None
        requester = self._requester(stanza, origin)
        if stanza.get("type") == "get":
            return st.result(stanza, self._streamhost(to))
        return self._activate(stanza, payload, requester)

    def _requester(self, stanza: Stanza, origin: Session | None) -> JID:
        """The sender, if it may use the proxy (§6.3.2: <forbidden/> otherwise)."""
        sender = origin.jid if origin is not None else None
        if sender is None:
            try:
                sender = JID.parse(stanza.get("from") or "")
            except InvalidJID:
                raise StanzaError("forbidden", "this proxy is for its own users") from None
        ours = (origin is not None and origin.local_client and sender.local is not None
                and sender.domain in self.server.hosts)
        if not ours and sender.domain not in self.config.allow \
                and str(sender.bare) not in self.config.allow:
            log.info("event=proxy65-refused jid=%s reason=not-allowed", sender)
            raise StanzaError("forbidden", "this proxy is for its own users")
        return sender

    def _streamhost(self, to: JID) -> Stanza:
        """§6.3.2: our network address as a <streamhost/>: [proxy65] host, else the listener's
        address; for a wildcard one (0.0.0.0, ::) that of a client listener, else the service's
        domain, which then has to resolve to this host."""
        bound = self.bound_addresses()
        first = self.config.listen[0]
        host = self.config.host or first.host
        if self.config.host is None and _wildcard(host):
            host = self._reachable(host) or str(to)
        port = self.config.port or (bound[0][2] if bound else first.port)
        query = st.element(_QUERY)
        st.child(query, f"{{{NS}}}streamhost", {"jid": str(to), "host": host, "port": str(port)})
        return query

    def _reachable(self, wildcard: str) -> str | None:
        """For a listener on every address: the address of a client listener of the same
        family, where clients evidently reach this host (None: there is none)."""
        ipv4 = ipaddress.ip_address(wildcard).version == 4
        for kind, host, _port in self.server.bound_addresses():
            if kind in ("c2s", "c2s_tls") and not _wildcard(host) \
                    and (not ipv4 or ipaddress.ip_address(host).version == 4):
                return host
        return None

    def _activate(self, stanza: Stanza, query: Stanza, requester: JID) -> Stanza:
        """§6.3.4 (Activation of Bytestream)."""
        sid = query.get("sid")
        target_text = query.findtext(_ACTIVATE)
        if not sid or target_text is None:
            raise StanzaError("bad-request", "give a sid and the target's JID in <activate/>")
        try:
            target = JID.parse(target_text.strip())
        except InvalidJID:
            raise StanzaError("jid-malformed", "<activate/> is not a JID") from None
        digest = stream_hash(sid, str(requester), str(target))
        pair = self._pairs.get(digest)
        if pair is None:
            # Not the initiator's hash: nobody else can name a pair (§6.3.4).
            log.info("event=proxy65-refused jid=%s reason=no-such-pair", requester)
            raise StanzaError("item-not-found", "no such bytestream from you")
        if pair.second is None or pair.relay is not None:
            reason = "already active" if pair.relay is not None else "only one party connected"
            raise StanzaError("not-allowed", reason)
        if pair.expiry is not None:
            pair.expiry.cancel()
        pair.relay = asyncio.ensure_future(self._relay(pair))
        log.info("event=proxy65-activated hash=%s requester=%s target=%s", _short(digest),
                 requester, target)
        return st.result(stanza)

    # -- SOCKS5 --------------------------------------------------------------------------------

    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self._handshakes.add(writer)
        try:
            await asyncio.wait_for(self._handshake(reader, writer), self.config.timeout)
        except (Socks5Error, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            reason = exc.reason if isinstance(exc, Socks5Error) else (
                "timeout" if isinstance(exc, TimeoutError) else "closed")
            log.info("event=proxy65-refused peer=%s reason=%s", _peer(writer), reason)
            if isinstance(exc, Socks5Error) and exc.reply is not None:
                with contextlib.suppress(OSError):
                    writer.write(reply(exc.reply))
            writer.close()
        finally:
            self._handshakes.discard(writer)

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(2)
        if head[0] != 5:
            raise Socks5Error("not-socks5")  # nothing to answer in a protocol it does not speak
        methods = await reader.readexactly(head[1])
        if not parse_greeting(head + methods):
            writer.write(b"\x05\xff")  # RFC 1928 §3: no acceptable method
            raise Socks5Error("no-acceptable-method")
        writer.write(b"\x05\x00")
        check_request(await reader.readexactly(4))
        length = await reader.readexactly(1)
        digest = parse_address(length + await reader.readexactly(length[0] + 2))
        pair = self._pairs.get(digest)
        if pair is None:
            limit = self.config.max_transfers
            if limit and len(self._pairs) >= limit:
                raise Socks5Error("max-transfers", NOT_ALLOWED)
            pair = _Pair(digest, (reader, writer))
            self._pairs[digest] = pair
            pair.expiry = asyncio.get_running_loop().call_later(
                self.config.timeout, self._expire, pair)
        elif pair.second is None and pair.relay is None:
            pair.second = (reader, writer)
        else:
            raise Socks5Error("third-connection", NOT_ALLOWED)  # §9.1: no multicasting
        writer.write(reply(SUCCEEDED, digest))
        # The hash is as good as a password here: only its start goes to the log.
        log.info("event=proxy65-connected hash=%s peer=%s side=%s", _short(digest),
                 _peer(writer), "second" if pair.second is not None else "first")

    def _expire(self, pair: _Pair) -> None:
        if pair.relay is None and self._pairs.get(pair.hash) is pair:
            self._close(pair, "timeout")

    def _close(self, pair: _Pair, reason: str) -> None:
        if self._pairs.get(pair.hash) is pair:
            del self._pairs[pair.hash]
        if pair.expiry is not None:
            pair.expiry.cancel()
        if pair.relay is not None and not pair.relay.done() and reason == "shutdown":
            pair.relay.cancel()
        for writer in pair.writers():
            writer.close()
        if reason != "done":
            log.info("event=proxy65-closed hash=%s reason=%s", _short(pair.hash), reason)

    async def _relay(self, pair: _Pair) -> None:
        assert pair.second is not None
        own = RateLimit(self.config.rate_per_transfer)
        back = RateLimit(self.config.rate_per_transfer)
        (r1, w1), (r2, w2) = pair.first, pair.second
        moved = [0, 0]
        pumps = [asyncio.ensure_future(self._pump(r2, w1, own, moved, 0)),
                 asyncio.ensure_future(self._pump(r1, w2, back, moved, 1))]
        try:
            # Both directions until both ends have closed; an error on one ends both.
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    log.info("event=proxy65-aborted hash=%s error=%s", _short(pair.hash),
                             type(task.exception()).__name__)
        finally:
            self._close(pair, "done")
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            log.info("event=proxy65-done hash=%s bytes=%d,%d seconds=%.3f", _short(pair.hash),
                     moved[0], moved[1], time.monotonic() - pair.started)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    limit: RateLimit, moved: list[int], index: int) -> None:
        """One direction: read a chunk, pay for it, write it and wait for it to drain."""
        size = min(limit.chunk(), self._total.chunk())
        while True:
            data = await reader.read(size)
            if not data:
                if writer.can_write_eof() and not writer.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()  # half-close: the other way may still be sending
                return
            await limit.take(len(data))
            await self._total.take(len(data))
            writer.write(data)
            await writer.drain()
            moved[index] += len(data)


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "-"


def _short(text: str) -> str:
    return text[:8]
