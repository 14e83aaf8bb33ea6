"""A lean asyncio XMPP client and the benchmark scenarios it drives.

Negotiation is parsed for real (lxml pull parser: stream features, SASL SCRAM-SHA-1 with
scramp, bind); once a session is established, a measuring client switches to a *sink* that only
counts closing tags in the decrypted bytes (``</message>``, ``</presence>``) — the cost of the
generator must stay far below the server's. Flow control is in-process: a sender keeps at most
``window`` messages in flight to its receiver, refilled from the receiver's data callback, so
no coroutine runs per message and no queue grows without bound.

Scenarios run in worker processes (``worker_main``) driven by ``bench.run``: each receives its
share of users, connects, reports ready, then runs over a timeline given by the parent
(start, end of warm-up, end) in CLOCK_MONOTONIC seconds, which all processes share.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import random
import re
import socket
import ssl
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import scramp
import scramp.core
from lxml import etree

STREAMS = "http://etherx.jabber.org/streams"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
REGISTER_NS = "jabber:iq:register"
ROSTER_NS = "jabber:iq:roster"
PING_NS = "urn:xmpp:ping"
CLIENT_NS = "jabber:client"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2

# A typical chat message body: 100 bytes of text.
BODY = ("The quick brown fox jumps over the lazy dog while the benchmark counts every "
        "message it receives....")
assert len(BODY) == 100


class XMPPError(Exception):
    """The server refused or broke the exchange (stream error, SASL failure, iq error)."""


class Unsupported(XMPPError):
    """The server does not offer what the scenario needs (e.g. no roster)."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _cache_pbkdf2() -> None:
    """The client's PBKDF2 (4096+ HMACs per login) is pure generator overhead: the server stores
    derived keys and does not repeat it. Accounts created in bulk share a salt, so caching the
    salted password keeps the generator's per-login cost at what a real client with a cached
    SaltedPassword (RFC 5802 §5.1) pays."""
    original = scramp.core.hi
    if getattr(original, "bench_cached", False):
        return
    cached = functools.lru_cache(maxsize=4096)(original)

    def hi(hf: Any, password: bytes, salt: bytes, iterations: Any) -> bytes:
        return cached(hf, password, salt, int(iterations))
    hi.bench_cached = True  # type: ignore[attr-defined]
    scramp.core.hi = hi


_cache_pbkdf2()


@functools.lru_cache(maxsize=1)
def client_context() -> ssl.SSLContext:
    """Certificates are not verified: every server here has a throw-away one. One context for all
    connections; no session resumption, so every login pays a full handshake on every server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _header(domain: str) -> bytes:
    return (f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xml:lang='en' "
            f"xmlns='{CLIENT_NS}' xmlns:stream='{STREAMS}'>").encode()


def _esc(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


@dataclass
class Target:
    """Where and as whom: the server's c2s address and the accounts' domain and password."""

    host: str
    port: int
    domain: str
    password: str
    source: str | None = None  # the local address to connect from (127.0.0.x: more ports)


class Client(asyncio.Protocol):
    """One c2s connection. Parses everything until ``sink`` is set, then hands raw bytes to it."""

    def __init__(self, target: Target, user: str, resource: str = "bench") -> None:
        self.target = target
        self.user = user
        self.resource = resource
        self.jid = f"{user}@{target.domain}/{resource}"  # replaced by the bound one
        self.transport: asyncio.Transport | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.features: etree._Element | None = None
        self._loop = asyncio.get_running_loop()
        self._parser: etree.XMLPullParser | None = None
        self._root: etree._Element | None = None
        self._depth = 0
        self._inbox: deque[etree._Element] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._ids = 0

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
            return
        if self._parser is None:
            return
        try:
            self._parser.feed(data)
            for event, el in self._parser.read_events():
                if event == "start":
                    self._depth += 1
                    if self._depth == 1:
                        self._root = el
                    continue
                self._depth -= 1
                if self._depth == 1 and self._root is not None:
                    self._root.remove(el)  # detached: memory stays flat over a long stream
                    self._inbox.append(el)
                elif self._depth == 0:
                    self._lost = XMPPError("the server closed the stream")
        except etree.XMLSyntaxError as exc:
            self._lost = XMPPError(f"not XML: {exc}")
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is None:
            self._lost = exc or XMPPError("connection closed")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # primitives ------------------------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        assert self.transport is not None
        self.transport.write(data.encode() if isinstance(data, str) else data)

    def next_id(self) -> str:
        self._ids += 1
        return f"b{self._ids}"

    async def next_element(self, timeout: float = 30.0) -> etree._Element:
        while not self._inbox:
            if self._lost is not None:
                raise XMPPError(f"{self.user}: {self._lost}")
            self._waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                raise XMPPError(f"{self.user}: nothing received for {timeout:.0f} s") from None
        el = self._inbox.popleft()
        if el.tag == f"{{{STREAMS}}}error":
            raise XMPPError(f"{self.user}: stream error {[c.tag for c in el]}")
        return el

    async def expect(self, predicate: Callable[[etree._Element], bool],
                     timeout: float = 30.0) -> etree._Element:
        """The next element matching predicate; the others are dropped (or answered, for iq
        requests that need a result, as a client must do, RFC 6120 §8.2.3)."""
        while True:
            el = await self.next_element(timeout)
            if predicate(el):
                return el
            self.answer(el)

    def answer(self, el: etree._Element) -> None:
        if el.tag == f"{{{CLIENT_NS}}}iq" and el.get("type") in ("get", "set"):
            kind = "result" if el.get("type") == "set" else "error"  # roster pushes: result
            attrs = f"type='{kind}' id='{_esc(el.get('id', ''))}'"
            if el.get("from"):
                attrs += f" to='{_esc(el.get('from', ''))}'"
            error = ("<error type='cancel'><service-unavailable "
                     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
                     if kind == "error" else "")
            self.send(f"<iq {attrs}>{error}</iq>")

    async def iq(self, payload: str, type_: str = "get", to: str | None = None,
                 timeout: float = 30.0) -> etree._Element:
        iq_id = self.next_id()
        dest = f" to='{_esc(to)}'" if to else ""
        self.send(f"<iq type='{type_}' id='{iq_id}'{dest}>{payload}</iq>")
        reply = await self.expect(
            lambda el: el.tag == f"{{{CLIENT_NS}}}iq" and el.get("id") == iq_id
            and el.get("type") in ("result", "error"), timeout)
        if reply.get("type") == "error":
            raise XMPPError(f"{self.user}: iq error {etree.tostring(reply)[:300]!r}")
        return reply

    async def _open_stream(self, timeout: float) -> etree._Element:
        self._parser = etree.XMLPullParser(events=("start", "end"), resolve_entities=False,
                                           no_network=True)
        self._root = None
        self._depth = 0
        self._inbox.clear()
        self.send(_header(self.target.domain))
        self.features = await self.expect(lambda el: el.tag == f"{{{STREAMS}}}features", timeout)
        return self.features

    # negotiation -----------------------------------------------------------------------------

    async def connect(self, timeout: float = 30.0) -> etree._Element:
        """TCP, stream, STARTTLS, stream: returns the features offered over TLS."""
        if self.target.source is None:
            await asyncio.wait_for(self._loop.create_connection(
                lambda: self, self.target.host, self.target.port), timeout)
        else:
            await asyncio.wait_for(self._connect_from(self.target.source), timeout)
        features = await self._open_stream(timeout)
        if features.find(f"{{{TLS_NS}}}starttls") is None:
            raise XMPPError("STARTTLS not offered")
        self.send(f"<starttls xmlns='{TLS_NS}'/>")
        reply = await self.next_element(timeout)
        if reply.tag != f"{{{TLS_NS}}}proceed":
            raise XMPPError(f"STARTTLS refused: {reply.tag}")
        assert self.transport is not None
        tls = await self._loop.start_tls(self.transport, self, client_context(),
                                         server_hostname=self.target.domain,
                                         ssl_handshake_timeout=timeout)
        self.transport = tls
        return await self._open_stream(timeout)

    async def _connect_from(self, source: str) -> None:
        """TCP from a given local address. Its port is chosen at connect(), not bind()
        (IP_BIND_ADDRESS_NO_PORT): unique per (source, destination) pair, so each source
        address gives the whole ephemeral port range towards each server address."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            await self._loop.sock_connect(sock, (self.target.host, self.target.port))
            await self._loop.create_connection(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def authenticate(self, features: etree._Element, timeout: float = 30.0) -> None:
        """SASL SCRAM-SHA-1 (RFC 5802, RFC 6120 §6), checking the server's signature."""
        offered = [m.text for m in features.iterfind(f"{{{SASL_NS}}}mechanisms/"
                                                     f"{{{SASL_NS}}}mechanism")]
        if "SCRAM-SHA-1" not in offered:
            raise XMPPError(f"SCRAM-SHA-1 not offered ({offered})")
        scram = scramp.ScramClient(["SCRAM-SHA-1"], self.user, self.target.password)
        first = base64.b64encode(scram.get_client_first().encode()).decode()
        self.send(f"<auth xmlns='{SASL_NS}' mechanism='SCRAM-SHA-1'>{first}</auth>")
        challenge = await self.next_element(timeout)
        if challenge.tag != f"{{{SASL_NS}}}challenge":
            raise XMPPError(f"{self.user}: SASL {etree.QName(challenge).localname}")
        scram.set_server_first(base64.b64decode(challenge.text or "").decode())
        final = base64.b64encode(scram.get_client_final().encode()).decode()
        self.send(f"<response xmlns='{SASL_NS}'>{final}</response>")
        outcome = await self.next_element(timeout)
        if outcome.tag == f"{{{SASL_NS}}}challenge":  # RFC 6120 §6.4.6: additional data
            self.send(f"<response xmlns='{SASL_NS}'/>")
            scram.set_server_final(base64.b64decode(outcome.text or "").decode())
            outcome = await self.next_element(timeout)
        elif outcome.tag == f"{{{SASL_NS}}}success":
            scram.set_server_final(base64.b64decode(outcome.text or "").decode())
        if outcome.tag != f"{{{SASL_NS}}}success":
            raise XMPPError(f"{self.user}: SASL {etree.QName(outcome).localname}")

    async def bind(self, features: etree._Element, timeout: float = 30.0) -> None:
        if features.find(f"{{{BIND_NS}}}bind") is None:
            raise XMPPError("resource binding not offered")
        reply = await self.iq(f"<bind xmlns='{BIND_NS}'><resource>{_esc(self.resource)}"
                              f"</resource></bind>", "set", timeout=timeout)
        jid = reply.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
        if not jid:
            raise XMPPError("bind result without a JID")
        self.jid = jid
        session = features.find(f"{{{SESSION_NS}}}session")
        if session is not None and session.find(f"{{{SESSION_NS}}}optional") is None:
            await self.iq(f"<session xmlns='{SESSION_NS}'/>", "set", timeout=timeout)  # RFC 3921

    async def login(self, *, presence: bool = True, roster: bool = False,
                    barrier: bool = True, timeout: float = 30.0) -> None:
        """STARTTLS, SCRAM-SHA-1, bind, [roster get], [initial presence], then a ping round trip
        so that the server has processed all of it when this returns."""
        features = await self.connect(timeout)
        await self.authenticate(features, timeout)
        features = await self._open_stream(timeout)
        await self.bind(features, timeout)
        if roster:
            reply = await self.iq(f"<query xmlns='{ROSTER_NS}'/>", timeout=timeout)
            if reply.find(f"{{{ROSTER_NS}}}query") is None:
                raise XMPPError("roster result without a query")
        if presence:
            self.send("<presence/>")
        if barrier:
            await self.iq(f"<ping xmlns='{PING_NS}'/>", to=self.target.domain, timeout=timeout)

    async def register(self, timeout: float = 30.0) -> bool:
        """XEP-0077 in-band registration on a fresh TLS stream; False when it already exists."""
        features = await self.connect(timeout)
        if features.find("{http://jabber.org/features/iq-register}register") is None:
            raise Unsupported("in-band registration not offered")
        try:
            await self.iq(f"<query xmlns='{REGISTER_NS}'><username>{_esc(self.user)}</username>"
                          f"<password>{_esc(self.target.password)}</password></query>",
                          "set", timeout=timeout)
        except XMPPError as exc:
            if "conflict" in str(exc):
                return False
            raise
        return True

    @property
    def alive(self) -> bool:
        """Not closed by either side (an idle client notices the server closing it here)."""
        return self._lost is None and self.transport is not None \
            and not self.transport.is_closing()

    def idle(self) -> None:
        """Logged in and left alone: the negotiation parser and what it kept go, and whatever
        the server sends from now on is dropped unread (a hundred thousand idle clients in a
        few generator processes must cost little)."""
        self.sink = _drop
        self._parser = None
        self._root = None
        self.features = None
        self._inbox.clear()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write(b"</stream:stream>")
            self.transport.close()


class TagCounter:
    """Occurrences of a byte string in a stream cut into arbitrary pieces."""

    __slots__ = ("_keep", "_tail", "marker")

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self._keep = len(marker) - 1
        self._tail = b""

    def count(self, data: bytes) -> int:
        if self._tail:
            data = self._tail + data
        self._tail = data[-self._keep:]
        return data.count(self.marker)


async def _gather_bounded(coros: Sequence[Any], limit: int) -> list[Any]:
    """Run the awaitables with at most limit at once (connecting hundreds of TLS clients); on
    the first failure the others are cancelled and that failure is raised."""
    sem = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        try:
            async with sem:
                return await coro
        finally:
            coro.close()  # cancelled before it started: no "never awaited" warning
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(c)) for c in coros]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [t.result() for t in tasks]


@contextlib.contextmanager
def closing_all(clients: Sequence[Client]) -> Iterator[None]:
    """Close every client on the way out, whatever happened."""
    try:
        yield
    finally:
        for c in clients:
            c.close()


async def connect_many(target: Target, users: Sequence[str], *, roster: bool = False,
                       presence: bool = True, limit: int = 32,
                       factory: Callable[[Target, str], Client] = Client) -> list[Client]:
    clients = [factory(target, u) for u in users]
    try:
        await _gather_bounded([c.login(roster=roster, presence=presence) for c in clients],
                              limit)
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


async def register_inband(target: Target, users: Sequence[str], limit: int = 16) -> int:
    """Create accounts over XMPP (XEP-0077), one stream each; returns how many were new."""
    async def one(user: str) -> bool:
        client = Client(target, user)
        try:
            return await client.register()
        finally:
            client.close()
    return sum(await _gather_bounded([one(u) for u in users], limit))


# -- rosters ------------------------------------------------------------------------------------


def ring_contacts(index: int, total: int, contacts: int) -> list[int]:
    """The contacts of user index in a ring: the contacts/2 users on each side."""
    half = contacts // 2
    return [(index + k) % total for k in range(-half, half + 1) if k != 0]


async def make_rosters(target: Target, users: Sequence[str], contacts: int,
                       timeout: float = 120.0) -> None:
    """Mutual 'both' subscriptions along a ring (each user with `contacts` contacts), made the
    way clients make them: subscribe, subscribed both ways (RFC 6121 §3.1), then checked with
    a roster get. Raises Unsupported when the server has no roster."""
    total = len(users)
    if contacts % 2 or contacts >= total:
        raise ValueError("contacts must be even and smaller than the number of users")
    probe = Client(target, users[0])
    try:
        await probe.login(presence=False)
        try:
            await probe.iq(f"<query xmlns='{ROSTER_NS}'/>")
        except XMPPError as exc:
            raise Unsupported(f"no roster: {exc}") from None
    finally:
        probe.close()
    clients = await connect_many(target, users, roster=True)
    with closing_all(clients):
        await _subscribe_ring(clients, users, contacts, timeout)


async def _subscribe_ring(clients: list[Client], users: Sequence[str], contacts: int,
                          timeout: float) -> None:
    total = len(users)
    domain = clients[0].target.domain
    bare = [f"{u}@{domain}" for u in users]
    index = {b: i for i, b in enumerate(bare)}
    want = [set(ring_contacts(i, total, contacts)) for i in range(total)]
    approved: list[set[int]] = [set() for _ in range(total)]
    asked: list[set[int]] = [set() for _ in range(total)]
    incomplete = {i for i in range(total) if want[i]}
    done = asyncio.get_running_loop().create_future()

    async def handle(i: int) -> None:
        client = clients[i]
        while True:
            el = await client.next_element(timeout)
            if el.tag != f"{{{CLIENT_NS}}}presence":
                client.answer(el)
                continue
            peer = index.get((el.get("from") or "").split("/")[0])
            if peer is None:
                continue
            kind = el.get("type")
            if kind == "subscribe":
                client.send(f"<presence to='{bare[peer]}' type='subscribed'/>")
                if peer not in asked[i]:
                    asked[i].add(peer)
                    client.send(f"<presence to='{bare[peer]}' type='subscribe'/>")
            elif kind == "subscribed":
                approved[i].add(peer)
                if approved[i] >= want[i]:
                    incomplete.discard(i)
                    if not incomplete and not done.done():
                        done.set_result(None)

    handlers = [asyncio.ensure_future(handle(i)) for i in range(total)]
    try:
        for i in range(total):  # the lower index of each pair asks first
            for j in want[i]:
                if j > i:
                    asked[i].add(j)
                    clients[i].send(f"<presence to='{bare[j]}' type='subscribe'/>")
        waiting = [done, *handlers]
        finished, _ = await asyncio.wait(waiting, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        if done not in finished:
            for h in finished:
                h.result()  # raises the handler's error
            raise XMPPError(f"subscriptions incomplete after {timeout:.0f} s: "
                            f"{len(incomplete)} users")
    finally:
        for h in handlers:
            h.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
    # Check: every roster holds exactly the ring contacts, all with subscription='both'.
    for i, client in enumerate(clients):
        reply = await client.iq(f"<query xmlns='{ROSTER_NS}'/>")
        both = {index.get(item.get("jid", "")) for item in reply.iter(f"{{{ROSTER_NS}}}item")
                if item.get("subscription") == "both"}
        if both != want[i]:
            raise XMPPError(f"{users[i]}: roster has 'both' for {sorted(map(str, both))}, "
                            f"expected {sorted(want[i])}")


# -- scenarios (run in a worker process) --------------------------------------------------------


@dataclass
class Timeline:
    start: float  # time.monotonic() seconds, the same clock in every process
    warm: float   # counting starts
    end: float    # counting stops

    async def wait(self, until: float) -> None:
        delay = until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Control:
    """The worker's side of the conversation with the parent (bench.run)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def ready(self, info: dict[str, Any]) -> Timeline:
        self.conn.send(("ready", info))
        loop = asyncio.get_running_loop()
        message = await loop.run_in_executor(None, self.conn.recv)
        if message[0] != "go":
            raise RuntimeError(f"expected go, got {message[0]}")
        return Timeline(*message[1:])


@dataclass
class Snapshots:
    """Counter values at the end of warm-up and at the end of the measurement."""

    read: Callable[[], int]
    at_warm: int = 0
    at_end: int = 0
    _handles: list[asyncio.TimerHandle] = field(default_factory=list)

    def schedule(self, timeline: Timeline) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self._handles = [loop.call_later(max(0.0, timeline.warm - now), self._warm),
                         loop.call_later(max(0.0, timeline.end - now), self._end)]

    def _warm(self) -> None:
        self.at_warm = self.read()

    def _end(self) -> None:
        self.at_end = self.read()

    @property
    def delta(self) -> int:
        return self.at_end - self.at_warm


async def op_logins(control: Control, target: Target, users: list[str],
                    concurrency: int) -> dict[str, Any]:
    """`concurrency` clients, each logging in and out again in a loop (a user each)."""
    timeline = await control.ready({"clients": concurrency})
    await timeline.wait(timeline.start)
    counted = 0
    errors = 0
    first_error = ""
    durations: list[float] = []

    async def loop_user(user: str) -> None:
        nonlocal counted, errors, first_error
        while time.monotonic() < timeline.end:
            client = Client(target, user)
            began = time.monotonic()
            try:
                await client.login(timeout=20.0)
            except (XMPPError, OSError, TimeoutError) as exc:
                errors += 1
                first_error = first_error or str(exc)
                await asyncio.sleep(0.05)
                continue
            finally:
                client.close()
            ended = time.monotonic()
            if timeline.warm <= ended < timeline.end:
                counted += 1
                durations.append(ended - began)

    await asyncio.gather(*(loop_user(users[i % len(users)]) for i in range(concurrency)))
    return {"count": counted, "errors": errors, "first_error": first_error,
            "durations": durations}


class _Pair:
    """A sender keeping `window` messages in flight to its receiver."""

    __slots__ = ("counter", "message", "received", "running", "sender", "sent", "window")

    def __init__(self, sender: Client, receiver: Client, window: int) -> None:
        self.sender = sender
        self.window = window
        self.message = (f"<message to='{_esc(receiver.jid)}' type='chat' id='m'>"
                        f"<body>{BODY}</body></message>").encode()
        self.counter = TagCounter(b"</message>")
        self.sent = 0
        self.received = 0
        self.running = False
        receiver.sink = self.on_data

    def fill(self) -> None:
        room = self.window - (self.sent - self.received)
        if room > 0 and self.running:
            assert self.sender.transport is not None
            self.sender.transport.write(self.message * room)
            self.sent += room

    def on_data(self, data: bytes) -> None:
        self.received += self.counter.count(data)
        if self.sent - self.received <= self.window // 2:
            self.fill()


async def _pairs(target: Target, pairs: list[tuple[str, str]], sink: bool = True,
                 receiver_target: Target | None = None) -> tuple[list[Client], list[Client]]:
    senders = await connect_many(target, [s for s, _ in pairs])
    try:
        receivers = await connect_many(receiver_target or target, [r for _, r in pairs])
    except BaseException:
        for s in senders:
            s.close()
        raise
    if sink:
        for s in senders:  # what comes back to a sender (errors, if any) is not measured
            s.sink = _drop
    return senders, receivers


def _drop(_data: bytes) -> None:
    pass


SM_NS = "urn:xmpp:sm:3"


class _SMPair(_Pair):
    """A _Pair with XEP-0198 on both ends, as a phone client runs it: the sender asks for an
    acknowledgement after each batch it writes, the receiver answers the server's <r/>."""

    __slots__ = ("receiver", "requests")
    REQUEST = f"<r xmlns='{SM_NS}'/>".encode()

    def __init__(self, sender: Client, receiver: Client, window: int) -> None:
        super().__init__(sender, receiver, window)
        self.requests = TagCounter(b"<r xmlns")
        self.receiver = receiver

    def fill(self) -> None:
        room = self.window - (self.sent - self.received)
        if room > 0 and self.running:
            assert self.sender.transport is not None
            self.sender.transport.write(self.message * room + self.REQUEST)
            self.sent += room

    def on_data(self, data: bytes) -> None:
        super().on_data(data)
        if self.requests.count(data) and self.receiver.transport is not None:
            # h: every stanza the receiver got since enabling is one of these messages.
            self.receiver.transport.write(f"<a xmlns='{SM_NS}' h='{self.received}'/>".encode())


async def _enable_sm(clients: Sequence[Client]) -> None:
    for c in clients:
        c.send(f"<enable xmlns='{SM_NS}' resume='true'/>")
    for c in clients:
        await c.expect(lambda el: el.tag == f"{{{SM_NS}}}enabled")


async def op_messages(control: Control, target: Target, pairs: list[tuple[str, str]],
                      window: int, sm: bool = False,
                      receivers_at: dict[str, Any] | None = None,
                      settle: float = 0.0) -> dict[str, Any]:
    """receivers_at: another Target (as a dict) for the receivers, e.g. another cluster node;
    settle: seconds between the logins and the first message (a cluster node learns of the
    other node's new sessions through Redis, a few milliseconds later)."""
    senders, receivers = await _pairs(target, pairs, sink=not sm, receiver_target=Target(
        **receivers_at) if receivers_at else None)
    if settle:
        await asyncio.sleep(settle)
    with closing_all(senders + receivers):
        if sm:
            await _enable_sm(senders + receivers)
            for s in senders:
                s.sink = _drop
        pair = _SMPair if sm else _Pair
        flows = [pair(s, r, window) for s, r in zip(senders, receivers, strict=True)]
        delivered = await _measure(control, {"pairs": len(flows)}, flows,
                                   lambda: sum(f.received for f in flows), _Pair.fill)
    return {"delivered": delivered, "sent": sum(f.sent for f in flows)}


async def _measure(control: Control, info: dict[str, Any], flows: Sequence[Any],
                   counter: Callable[[], int], begin: Callable[[Any], None],
                   also: Sequence[Snapshots] = ()) -> int:
    """Start every flow at the timeline's start (begin(flow)), stop them at its end; how much
    the counter grew over the measured window (and the `also` snapshots taken with it)."""
    timeline = await control.ready(info)
    snaps = Snapshots(counter)
    for s in (snaps, *also):
        s.schedule(timeline)
    await timeline.wait(timeline.start)
    for f in flows:
        f.running = True
        begin(f)
    await timeline.wait(timeline.end + 0.01)
    for f in flows:
        f.running = False
    return snaps.delta


_STAMP = re.compile(rb"<body>t=(\d+);")


async def op_latency(control: Control, target: Target, pairs: list[tuple[str, str]],
                     rate: float) -> dict[str, Any]:
    """Messages at a fixed total rate, each carrying its send time; latency = receipt - send."""
    senders, receivers = await _pairs(target, pairs)
    samples: list[int] = []  # microseconds
    warm_ns = end_ns = 0

    def sink_for() -> Callable[[bytes], None]:
        buffer = bytearray()

        def sink(data: bytes) -> None:
            now = time.monotonic_ns()
            buffer.extend(data)
            cut = buffer.rfind(b"</message>")
            if cut < 0:
                return
            for stamp in _STAMP.findall(buffer, 0, cut):
                sent_ns = int(stamp)
                if warm_ns <= sent_ns and now < end_ns:
                    samples.append((now - sent_ns) // 1000)
            del buffer[:cut + 10]
        return sink

    with closing_all(senders + receivers):
        for r in receivers:
            r.sink = sink_for()
        templates = [(s, f"<message to='{_esc(r.jid)}' type='chat' id='l'><body>t=")
                     for s, r in zip(senders, receivers, strict=True)]
        timeline = await control.ready({"pairs": len(templates)})
        warm_ns, end_ns = int(timeline.warm * 1e9), int(timeline.end * 1e9)
        await timeline.wait(timeline.start)
        sent = 0
        began = time.monotonic()
        while (now := time.monotonic()) < timeline.end:
            due = int((now - began) * rate) - sent
            for turn in range(sent, sent + due):
                sender, head = templates[turn % len(templates)]
                stamp = f"{time.monotonic_ns()};"
                pad = BODY[:100 - len(stamp) - 2]  # the body stays 100 bytes
                sender.send(f"{head}{stamp}{pad}</body></message>")
            sent += max(due, 0)
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.2)  # the last messages' latencies
    return {"latencies_us": samples, "sent": sent}


class _Presentity:
    """A fan-out user: counts presence notifications from others (not its own echo)."""

    __slots__ = ("all", "client", "mine_dq", "mine_sq", "notifications")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.all = TagCounter(b"</presence>")
        self.mine_sq = TagCounter(f"from='{_esc(client.jid)}'".encode())
        self.mine_dq = TagCounter(f'from="{_esc(client.jid)}"'.encode())
        self.notifications = 0


async def op_presence(control: Control, target: Target, users: list[str], contacts: int,
                      cap: int) -> dict[str, Any]:
    """Every user online with its `contacts` mutual contacts; users change presence in turn,
    keeping at most `cap` notifications in flight in this process."""
    clients = await connect_many(target, users, roster=True)
    people = [_Presentity(c) for c in clients]
    state = {"changes": 0, "delivered": 0, "offset": 0, "turn": 0}
    running = False
    stanzas = [b"<presence><show>away</show><status>bench</status></presence>",
               b"<presence><status>bench</status></presence>"]

    def in_flight() -> int:
        return state["changes"] * contacts - (state["delivered"] - state["offset"])

    def fill() -> None:
        for _ in range(max((cap - in_flight()) // contacts, 0)):
            turn = state["turn"]
            people[turn % len(people)].client.send(stanzas[(turn // len(people)) & 1])
            state["turn"] = turn + 1
            state["changes"] += 1

    def sink_for(p: _Presentity) -> Callable[[bytes], None]:
        def sink(data: bytes) -> None:
            n = p.all.count(data) - p.mine_sq.count(data) - p.mine_dq.count(data)
            p.notifications += n
            state["delivered"] += n
            if running and in_flight() <= cap // 2:
                fill()
        return sink

    with closing_all(clients):
        for p in people:
            p.client.sink = sink_for(p)
        timeline = await control.ready({"users": len(people)})
        snaps = Snapshots(lambda: state["delivered"])
        snaps.schedule(timeline)
        await timeline.wait(timeline.start)
        # Initial presences that arrived meanwhile do not count against the window.
        state["offset"] = state["delivered"]
        running = True
        fill()
        await timeline.wait(timeline.end + 0.01)
        running = False
    return {"delivered": snaps.delta, "changes": state["changes"]}


async def op_idle(control: Control, target: Target, users: list[str]) -> dict[str, Any]:
    """Authenticated TLS sessions (bound, with initial presence) that then stay idle."""
    clients = await connect_many(target, users, limit=16)
    with closing_all(clients):
        timeline = await control.ready({"sessions": len(clients)})
        await timeline.wait(timeline.end)
    await asyncio.sleep(0.1)
    return {"sessions": len(clients)}


class _OfflineSender:
    """Batches of messages to users who are not online (each one is stored: the storage-heavy
    path), each batch closed by a ping: the server handles a stream in order and stores a
    message before it handles the next stanza, so the ping's answer means "batch stored"."""

    __slots__ = (
        "_errors",
        "_replies",
        "batch",
        "client",
        "errors",
        "payload",
        "replies",
        "running",
        "stored",
    )

    def __init__(self, client: Client, recipients: list[str], batch: int) -> None:
        self.client = client
        self.batch = batch
        messages = b"".join(
            (f"<message to='{_esc(recipients[i % len(recipients)])}' type='chat'>"
             f"<body>{BODY}</body></message>").encode() for i in range(batch))
        self.payload = messages + b"<iq type='get' id='b'><ping xmlns='urn:xmpp:ping'/></iq>"
        self._replies = TagCounter(b"<iq ")
        self._errors = TagCounter(b"<error ")
        self.replies = self.errors = self.stored = 0
        self.running = False
        client.sink = self.on_data

    def send(self) -> None:
        if self.running:
            assert self.client.transport is not None
            self.client.transport.write(self.payload)

    def on_data(self, data: bytes) -> None:
        self.errors += self._errors.count(data)
        done = self._replies.count(data)
        if done:
            self.replies += done
            self.stored = self.replies * self.batch - self.errors
            self.send()


async def op_offline(control: Control, target: Target, senders: list[str],
                     recipients: list[str], batch: int) -> dict[str, Any]:
    clients = await connect_many(target, senders)
    jids = [f"{user}@{target.domain}" for user in recipients]
    with closing_all(clients):
        flows = [_OfflineSender(c, jids[i::len(clients)] or jids, batch)
                 for i, c in enumerate(clients)]
        stored = await _measure(control, {"senders": len(flows)}, flows,
                                lambda: sum(f.stored for f in flows), _OfflineSender.send)
    return {"stored": stored, "errors": sum(f.errors for f in flows)}


# -- PEP notifications and MUC fan-out (bench/pep_notify.py, bench/muc_fanout.py) ---------------

DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
CAPS_NS = "http://jabber.org/protocol/caps"
PUBSUB_NS = "http://jabber.org/protocol/pubsub"
TUNE_NS = "http://jabber.org/protocol/tune"
MUC_NS = "http://jabber.org/protocol/muc"
MUC_OWNER_NS = "http://jabber.org/protocol/muc#owner"
DATA_NS = "jabber:x:data"
CAPS_NODE = "https://presenced.invalid/bench"
CAPS_IDENTITY = ("client", "pc", "", "presenced bench")
CAPS_FEATURES = (CAPS_NS, DISCO_INFO_NS, TUNE_NS, TUNE_NS + "+notify")


def caps_ver(identity: tuple[str, str, str, str], features: Sequence[str]) -> str:
    """XEP-0115 §5.1: the sha-1 ver of one identity (category, type, lang, name) and features
    (no forms): what the servers recompute from our disco#info answer before caching it."""
    text = "/".join(identity) + "<" + "".join(f"{f}<" for f in sorted(features))
    return base64.b64encode(hashlib.sha1(text.encode()).digest()).decode()


CAPS_VER = caps_ver(CAPS_IDENTITY, CAPS_FEATURES)
CAPS_PRESENCE = (f"<presence><c xmlns='{CAPS_NS}' hash='sha-1' node='{CAPS_NODE}' "
                 f"ver='{CAPS_VER}'/></presence>").encode()


class CapsClient(Client):
    """A client whose presence carries XEP-0115 caps asking for tune notifications (XEP-0163
    §4.2: +notify) and which answers the servers' disco#info query for them with the result
    its ver is the hash of (the servers verify it, XEP-0115 §5.4)."""

    def answer(self, el: etree._Element) -> None:
        query = el.find(f"{{{DISCO_INFO_NS}}}query")
        if el.tag != f"{{{CLIENT_NS}}}iq" or el.get("type") != "get" or query is None:
            super().answer(el)
            return
        node = query.get("node")
        category, kind, _lang, name = CAPS_IDENTITY
        to = f" to='{_esc(el.get('from', ''))}'" if el.get("from") else ""
        self.send(f"<iq type='result' id='{_esc(el.get('id', ''))}'{to}>"
                  f"<query xmlns='{DISCO_INFO_NS}'"
                  + (f" node='{_esc(node)}'" if node is not None else "") + ">"
                  f"<identity category='{category}' type='{kind}' name='{_esc(name)}'/>"
                  + "".join(f"<feature var='{f}'/>" for f in CAPS_FEATURES)
                  + "</query></iq>")


_IQ_ATTR = re.compile(rb"""\s(type|id)\s*=\s*(?:'([^']*)'|"([^"]*)")""")


class _Listener:
    """The sink of a client that must stay answerable: counts a marker in the raw bytes, and
    picks the iqs out of them: requests are parsed and answered (Client.answer: the caps
    query), results and errors of our own requests (ids starting with `mine`) reported to
    on_reply(the iq if an error, else None). Only iqs are parsed; everything else is counted
    and dropped."""

    __slots__ = ("_carry", "client", "count", "counter", "mine", "on_reply", "requests")

    def __init__(self, client: Client, marker: bytes, mine: bytes = b"pub",
                 on_reply: Callable[[bytes | None], None] | None = None) -> None:
        self.client = client
        self.counter = TagCounter(marker)
        self.count = 0
        self.requests = 0
        self.mine = mine
        self.on_reply = on_reply
        self._carry = b""
        client.sink = self.feed

    def feed(self, data: bytes) -> None:
        self.count += self.counter.count(data)
        if self._carry or b"<iq" in data or data.endswith((b"<", b"<i")):
            self._scan(self._carry + data)

    def _scan(self, buf: bytes) -> None:
        self._carry = b""
        pos = 0
        while True:
            start = buf.find(b"<iq", pos)
            if start < 0:
                if buf.endswith((b"<", b"<i")):
                    self._carry = buf[buf.rindex(b"<"):]
                return
            head_end = buf.find(b">", start)
            if head_end < 0:
                self._carry = buf[start:]
                return
            if buf[head_end - 1:head_end] == b"/":
                end = head_end + 1
            else:
                close = buf.find(b"</iq>", head_end)
                if close < 0:
                    self._carry = buf[start:]
                    return
                end = close + 5
            self._iq(buf[start:end], buf[start:head_end])
            pos = end

    def _iq(self, segment: bytes, head: bytes) -> None:
        attrs = {m[0]: m[1] or m[2] for m in _IQ_ATTR.findall(head)}
        kind, ident = attrs.get(b"type", b""), attrs.get(b"id", b"")
        if kind in (b"get", b"set"):
            self.requests += 1
            try:
                wrapped = etree.fromstring(b"<w xmlns='jabber:client'>" + segment + b"</w>")
            except etree.XMLSyntaxError:
                return
            self.client.answer(wrapped[0])
        elif ident.startswith(self.mine) and self.on_reply is not None:
            self.on_reply(segment if kind == b"error" else None)


async def _until_quiet(counter: Callable[[], int], quiet: float = 0.7,
                       limit: float = 20.0) -> None:
    """Until counter() has not moved for `quiet` seconds (at most `limit` seconds)."""
    began = last_change = time.monotonic()
    last = counter()
    while (now := time.monotonic()) - last_change < quiet and now - began < limit:
        await asyncio.sleep(0.1)
        if (value := counter()) != last:
            last, last_change = value, time.monotonic()


_RUN = f"{random.getrandbits(32):08x}"  # this process's publications, told from others'
_TRACK = re.compile(rb"<title>Track ([0-9a-f]{8}-[0-9]+)</title>")


class _Notifications(_Listener):
    """A _Listener that also tells the publications apart (a server may notify one resource
    twice, through its full and its bare JID): `distinct` counts each at most once."""

    __slots__ = ("_tail", "distinct", "seen")

    def __init__(self, client: Client, on_reply: Callable[[bytes | None], None]) -> None:
        super().__init__(client, b"protocol/pubsub#event", b"pub", on_reply)
        self.seen: set[bytes] = set()
        self.distinct = 0
        self._tail = b""

    def feed(self, data: bytes) -> None:
        super().feed(data)
        buf = self._tail + data
        end = 0
        for match in _TRACK.finditer(buf):
            end = match.end()
            if match[1] not in self.seen:
                self.seen.add(match[1])
                self.distinct += 1
        self._tail = buf[max(end, len(buf) - 64):]  # a title cut in two is completed next


def _tune(turn: int) -> bytes:
    """A XEP-0118 tune publication (XEP-0163 §3: to the account's own PEP service, no 'to';
    the node is auto-created on the first one, XEP-0060 §7.1.4), always as item "current",
    which each publication replaces."""
    return (f"<iq type='set' id='pub{turn}'><pubsub xmlns='{PUBSUB_NS}'>"
            f"<publish node='{TUNE_NS}'><item id='current'><tune xmlns='{TUNE_NS}'>"
            f"<artist>Yes</artist><length>{180 + turn % 300}</length><source>Yessongs"
            f"</source><title>Track {_RUN}-{turn}</title><track>{turn % 12 + 1}</track>"
            f"<uri>https://example.org/tracks/{turn}</uri></tune></item></publish>"
            f"</pubsub></iq>").encode()


async def op_pep(control: Control, target: Target, users: list[str],
                 window: int) -> dict[str, Any]:
    """Every user online with its roster and caps that ask for tune notifications; users
    publish a tune in turn, at most `window` publications of this process unanswered. Counted:
    the pubsub#event notifications the clients receive (from contacts in any process)."""
    clients = await connect_many(target, users, roster=True, presence=False,
                                 factory=CapsClient)
    state: dict[str, Any] = {"published": 0, "answered": 0, "errors": 0, "error": ""}
    running = False

    def fill() -> None:
        while running and state["published"] - state["answered"] < window:
            turn = state["published"]
            clients[turn % len(clients)].send(_tune(turn))
            state["published"] = turn + 1

    def on_reply(error: bytes | None) -> None:
        state["answered"] += 1
        if error is not None:
            state["errors"] += 1
            condition = error[max(error.find(b"<error"), 0):][:300]
            state["error"] = state["error"] or condition.decode(errors="replace")
        fill()

    with closing_all(clients):
        listeners = [_Notifications(c, on_reply) for c in clients]

        def queries() -> int:
            return sum(li.requests for li in listeners)
        # Available presence with caps, twice: a server learns a contact's caps from the
        # presence the contact sends to the owner's bare JID (Prosody's mod_pep only from
        # that), and a contact that came online first only got the later one's probe answer.
        for c in clients:
            c.send(CAPS_PRESENCE)
        await _until_quiet(queries)
        for c in clients:
            c.send(CAPS_PRESENCE)
        await _until_quiet(queries)
        timeline = await control.ready({"users": len(clients), "caps_queries": queries()})
        received = Snapshots(lambda: sum(li.count for li in listeners))
        delivered = Snapshots(lambda: sum(li.distinct for li in listeners))
        answered = Snapshots(lambda: state["answered"])
        refused = Snapshots(lambda: state["errors"])
        for snaps in (received, delivered, answered, refused):
            snaps.schedule(timeline)
        await timeline.wait(timeline.start)
        running = True
        fill()
        await timeline.wait(timeline.end + 0.01)
        running = False
    return {"delivered": delivered.delta, "received": received.delta,
            "published": answered.delta, "errors": refused.delta, "error": state["error"],
            "caps_queries": queries()}


class _Room:
    """One room's occupants in this process, talking in turn; at most `window` messages (each
    delivered to every occupant, the sender included: XEP-0045 §7.4) in flight. A message the
    room refuses (an error back to its sender) is out of flight too, and counted apart."""

    __slots__ = ("base", "clients", "errors", "jid", "message", "received", "refused",
                 "running", "sent", "window")

    def __init__(self, jid: str, clients: list[Client], window: int) -> None:
        self.jid = jid
        self.clients = clients
        self.window = window
        self.message = (f"<message to='{_esc(jid)}' type='groupchat' id='g'>"
                        f"<body>{BODY}</body></message>").encode()
        self.sent = self.received = self.refused = self.base = 0
        self.running = False
        for c in clients:
            c.sink = self._sink()

    def _sink(self) -> Callable[[bytes], None]:
        # Only groupchat messages count: an error bounced to a sender is no delivery.
        counters = [TagCounter(m) for m in (b"type='groupchat'", b'type="groupchat"',
                                            b"type='error'", b'type="error"')]

        def sink(data: bytes) -> None:
            single, double, error_sq, error_dq = (c.count(data) for c in counters)
            self.received += single + double
            self.refused += error_sq + error_dq
            if self.running and self._in_flight() <= self.window * len(self.clients) // 2:
                self.fill()
        return sink

    def _in_flight(self) -> int:
        n = len(self.clients)
        return (self.sent - self.refused) * n - (self.received - self.base)

    def start(self) -> None:
        # Joins' subject messages and refusals before the start are no part of the flow.
        self.base = self.received
        self.sent = self.refused = 0
        self.fill()

    def fill(self) -> None:
        n = len(self.clients)
        for _ in range(max(self.window - -(-self._in_flight() // n), 0)):
            if not self.running:
                return
            sender = self.clients[self.sent % n]
            assert sender.transport is not None
            sender.transport.write(self.message)
            self.sent += 1


async def _join(client: Client, room: str, nick: str, timeout: float = 60.0) -> None:
    """XEP-0045 §7.2: enter the room without discussion history (maxstanzas='0', "Managing
    Discussion History"); done at our own presence, which comes after the other occupants'."""
    me = f"{room}/{nick}"
    client.send(f"<presence to='{_esc(me)}'><x xmlns='{MUC_NS}'><history maxstanzas='0'/>"
                f"</x></presence>")
    el = await client.expect(lambda el: el.tag == f"{{{CLIENT_NS}}}presence"
                             and el.get("from") == me, timeout)
    if el.get("type") == "error":
        raise XMPPError(f"{client.user}: cannot join {room}: {etree.tostring(el)[:300]!r}")


async def op_muc(control: Control, target: Target, rooms: list[tuple[str, list[str]]],
                 window: int, form: str = "") -> dict[str, Any]:
    """Rooms of occupants all talking (see _Room); the first occupant creates the room and
    submits the owner's form (XEP-0045 §10.1.2: an instant room when `form` is empty)."""
    occupants = [u for _, members in rooms for u in members]
    clients = await connect_many(target, occupants)
    by_user = dict(zip(occupants, clients, strict=True))
    with closing_all(clients):
        flows = []
        for room, members in rooms:
            first = by_user[members[0]]
            await _join(first, room, members[0])
            await first.iq(f"<query xmlns='{MUC_OWNER_NS}'><x xmlns='{DATA_NS}' "
                           f"type='submit'>{form}</x></query>", "set", to=room)
            await _gather_bounded([_join(by_user[m], room, m) for m in members[1:]], 16)
            flows.append(_Room(room, [by_user[m] for m in members], window))
        refused = Snapshots(lambda: sum(f.refused for f in flows))
        delivered = await _measure(control, {"rooms": len(flows)}, flows,
                                   lambda: sum(f.received for f in flows), _Room.start,
                                   also=(refused,))
    return {"delivered": delivered, "refused": refused.delta, "sent": sum(f.sent for f in flows)}


OPS: dict[str, Callable[..., Any]] = {
    "offline": op_offline,
    "logins": op_logins,
    "messages": op_messages,
    "messages_sm": functools.partial(op_messages, sm=True),
    "latency": op_latency,
    "presence": op_presence,
    "idle": op_idle,
    "pep": op_pep,
    "muc": op_muc,
}


def worker_main(conn: Connection) -> None:
    """A generator process: runs the ops the parent sends, one at a time, until "quit"."""
    random.seed()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        while True:
            message = conn.recv()
            if message[0] == "quit":
                return
            _, name, target, params = message
            try:
                result = runner.run(OPS[name](Control(conn), Target(**target), **params))
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("done", result))
