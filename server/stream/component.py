"""External components (XEP-0114, Jabber Component Protocol): a bridge or bot connects to
[listen] component, says which domain it is, proves the shared secret of [components], and
then sends and receives every stanza of that domain.

The handshake (XEP-0114 §3) is a pure machine (ComponentNegotiation); ComponentStream moves
the bytes; Components is the listener and the registry of connected components, which it
serves as service hosts (server/services.py) while they are connected.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from lxml import etree

from server import listening
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.services import ServiceHost
from server.stream.connection import XMLStreamConnection
from server.stream.negotiation import CloseStream, Send
from server.xml import ns
from server.xml.parser import Event, StreamClosed, StreamOpened
from server.xml.stanza import STANZA_TAGS
from server.xml.writer import serialize, stream_header, to_canonical

if TYPE_CHECKING:
    from server.cluster.routes import ComponentRoutes
    from server.config import Address, ComponentConfig
    from server.limits import Limiter
    from server.router import Router
    from server.xml.parser import StreamParser

log = logging.getLogger("presenced.component")
_Element: TypeAlias = etree._Element
HANDSHAKE = ns.q(ns.COMPONENT, "handshake")


@dataclass(frozen=True, slots=True)
class Authenticated:
    domain: str


ComponentAction = Send | CloseStream | Authenticated


def handshake_digest(stream_id: str, secret: str) -> str:
    """XEP-0114 §3: hex SHA-1 of the stream id followed by the secret."""
    return hashlib.sha1((stream_id + secret).encode()).hexdigest()


class ComponentNegotiation:
    """header -> our header with an id -> <handshake>digest</handshake> -> <handshake/>."""

    def __init__(self, components: dict[str, ComponentConfig],
                 stream_id: str | None = None) -> None:
        self._components = components
        self.stream_id = stream_id or secrets.token_hex(8)
        self.domain: str | None = None
        self.authenticated = False
        self.header_sent = False

    def receive(self, event: Event) -> list[ComponentAction]:
        if isinstance(event, StreamClosed):
            return [CloseStream()]
        if isinstance(event, StreamOpened):
            return self._opened(event)
        if self.domain is None:
            return [CloseStream("not-authorized", "open a stream first")]
        if self.authenticated:
            return []  # stanzas: the stream handles them
        if event.tag != HANDSHAKE:
            # XEP-0114 §3: nothing but the handshake before it succeeded.
            return [CloseStream("not-authorized", "send <handshake/> first")]
        expected = handshake_digest(self.stream_id, self._components[self.domain].secret)
        if not hmac.compare_digest((event.text or "").strip().lower(), expected):
            return [CloseStream("not-authorized", "wrong secret")]
        self.authenticated = True
        # Authenticated first: the stream may still refuse it (the domain is connected).
        return [Authenticated(self.domain),
                Send(f"<handshake xmlns='{ns.COMPONENT}'/>".encode())]

    def _opened(self, event: StreamOpened) -> list[ComponentAction]:
        if self.domain is not None:
            return [CloseStream("not-authorized", "the stream is open already")]
        header = stream_header(content_ns=ns.COMPONENT, from_=event.attrs.get("to"), to=None,
                               id_=self.stream_id, version=None)
        self.header_sent = True
        if event.default_ns != ns.COMPONENT:
            return [Send(header), CloseStream("invalid-namespace",
                                              f"components speak {ns.COMPONENT}")]
        to = event.attrs.get("to", "")
        try:
            domain = JID.parse(to).domain if to else ""
        except InvalidJID:
            domain = ""
        if domain not in self._components:
            return [Send(header), CloseStream("host-unknown", "no such component")]
        self.domain = domain
        return [Send(header)]


class ComponentStream(XMLStreamConnection):
    kind = "component"

    def __init__(self, components: Components) -> None:
        super().__init__(components.loop, components.new_parser(), None)
        self._components = components
        self.negotiation = ComponentNegotiation(components.settings)
        self.domain: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._components.streams.add(self)
        limiter = self._components.limiter
        if limiter is not None:
            self._shaper = limiter.stream_shaper(
                "component", transport.get_extra_info("peername"), self._loop.time())

    def _who(self) -> str:
        return self.domain or "-"

    def _header_for_error(self) -> bytes:
        if self.negotiation.header_sent:
            return b""
        self.negotiation.header_sent = True
        return stream_header(content_ns=ns.COMPONENT, from_=None, to=None, id_=None,
                             version=None)

    def _event(self, event: Event) -> None:
        if (self.domain is not None or self._blocked) and type(event) is _ElementType:
            self._stanza(event)  # (blocked: waits for the cluster-wide claim, then goes on)
            return
        for action in self.negotiation.receive(event):
            if isinstance(action, Send):
                self._write_now(action.data)
            elif isinstance(action, CloseStream):
                self.close(action.condition, action.text)
                return
            elif isinstance(action, Authenticated):
                if not self._components.attach(action.domain, self):
                    self.close("conflict", "this component is connected already")
                    return
                routes = self._components.routes
                if routes is not None:
                    # [cluster]: the domain is claimed cluster-wide before <handshake/> goes
                    # out; what the component sends meanwhile waits (server/cluster/routes.py).
                    self._wait_for(self._components.router.spawn(
                        self._claim(routes, action.domain)))
                    return
                self._authenticated(action.domain)

    def _authenticated(self, domain: str) -> None:
        self.domain = domain
        log.info("event=component-authenticated peer=%s domain=%s", self.peer, domain)

    async def _claim(self, routes: ComponentRoutes, domain: str) -> None:
        try:
            claimed = await routes.claim(domain)
        except Exception as exc:  # Redis unreachable: refused, the component tries again
            log.warning("event=component-claim-failed domain=%s error=%s", domain,
                        type(exc).__name__)
            self._components.detach(domain, self)
            self.close("remote-connection-failed", "the cluster is unreachable")
            return
        if self._closing:  # gone meanwhile: what it claimed goes too
            if claimed:
                routes.release(domain)
            self._components.detach(domain, self)
            return
        if not claimed:  # XEP-0114: connected to another node of the cluster
            self._components.detach(domain, self)
            self.close("conflict", "this component is connected already")
            return
        self._authenticated(domain)
        self._write_now(f"<handshake xmlns='{ns.COMPONENT}'/>".encode())

    def _stanza(self, el: _Element) -> None:
        if self._blocked and self._hold(el):
            return
        if self.domain is None:  # [cluster]: held while the claim was under way, refused
            return
        if etree.QName(el).localname not in _STANZA_NAMES:
            self.close("unsupported-stanza-type", f"unexpected element {el.tag}")
            return
        stanza = to_canonical(el)
        sender, to = stanza.get("from"), stanza.get("to")
        if sender is None or to is None:
            # XEP-0114 §4: a component addresses every stanza itself.
            self.close("improper-addressing", "a component's stanza needs 'from' and 'to'")
            return
        try:
            claimed = JID.parse(sender)
        except InvalidJID:
            claimed = None
        if claimed is None or claimed.domain != self.domain:
            # A component speaks only for its own domain (and the JIDs at it).
            self.close("invalid-from", f"you may only send from {self.domain}")
            return
        pending = self._components.router.route(stanza, None)
        if pending is not None:
            self._wait_for(self._components.router.spawn(pending))

    def deliver(self, stanza: _Element) -> None:
        self._queue(serialize(stanza, ns.COMPONENT))

    def _ended(self, reason: str) -> None:
        self._detach()

    def _lost(self, exc: Exception | None) -> None:
        self._components.streams.discard(self)
        self._detach()

    def _detach(self) -> None:
        if self.domain is not None:
            if self._components.detach(self.domain, self) and \
                    self._components.routes is not None:
                self._components.routes.release(self.domain)
            log.info("event=component-disconnected domain=%s", self.domain)
            self.domain = None


class Components:
    """The component listener and which components are connected now."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, router: Router,
                 settings: dict[str, ComponentConfig], addresses: tuple[Address, ...],
                 new_parser: Callable[[], StreamParser],
                 add_service: Callable[[ServiceHost, Any], None],
                 parent_of: Callable[[str], str], limiter: Limiter | None = None,
                 routes: ComponentRoutes | None = None) -> None:
        self.loop = loop
        # [cluster]: a component connected to any node serves its domain for all of them
        self.routes = routes
        if routes is not None:
            routes.components = self
        self.limiter = limiter  # the read rate of component streams ([limits])
        self.router = router
        self.settings = settings
        self.new_parser = new_parser
        self._addresses = addresses
        self._add_service = add_service
        self._parent_of = parent_of
        self.connected: dict[str, ComponentStream] = {}
        self.streams: set[ComponentStream] = set()
        self._listeners: list[asyncio.Server] = []

    async def start(self) -> None:
        # Served whether connected or not: a stanza for a component that is away must get an
        # error here, never be sent over federation to a server of that name.
        for domain in self.settings:
            self._add_service(ServiceHost(domain, self._parent_of(domain), domain),
                              lambda stanza, origin, to, domain=domain: self._route(
                                  domain, stanza))
        for address in self._addresses:
            listener = await self.loop.create_server(
                lambda: ComponentStream(self), address.host, address.port,
                reuse_address=True, reuse_port=listening.ports_shared())
            self._listeners.append(listener)
            for sock in listener.sockets:
                name = sock.getsockname()
                log.info("event=listening kind=component address=%s:%s", name[0], name[1])

    def _route(self, domain: str, stanza: _Element) -> Any:
        stream = self.connected.get(domain)
        if stream is None or stream.domain is None:
            if self.routes is not None:
                return self.routes.route(domain, stanza)  # connected to another node?
            raise StanzaError("service-unavailable", f"{domain} is not connected")
        stream.deliver(stanza)
        return True

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return [("component", *sock.getsockname()[:2])
                for listener in self._listeners for sock in listener.sockets]

    async def stop(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for stream in list(self.streams):
            stream.close("system-shutdown", "the server is shutting down")
            stream._detach()  # [cluster]: its domain is released before Redis closes
        if self.routes is not None:
            await self.routes.flush()

    def attach(self, domain: str, stream: ComponentStream) -> bool:
        if domain in self.connected:
            return False
        self.connected[domain] = stream
        return True

    def detach(self, domain: str, stream: ComponentStream) -> bool:
        if self.connected.get(domain) is stream:
            del self.connected[domain]
            return True
        return False


_ElementType = type(etree.Element("x"))
_STANZA_NAMES = frozenset(etree.QName(tag).localname for tag in STANZA_TAGS)
