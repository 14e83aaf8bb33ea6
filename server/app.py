"""Server: owns listeners, router, modules and storage; start/stop lifecycle."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import signal
from typing import TYPE_CHECKING, Any

from lxml import etree

from federation.service import Federation
from server.hooks import Hooks
from server.jid import JID
from server.module import Module
from server.modules import MODULES
from server.router import Router
from server.sessions import SessionManager
from server.storage import Storage, open_storage
from server.stream.c2s import C2SConnection
from server.stream.negotiation import Policy
from server.stream.tls import TLSLayer, end_point_hash, sni_server_context
from server.xml.parser import StreamParser

if TYPE_CHECKING:
    from OpenSSL import SSL

    from server.config import Config
    from server.presence.access import AccessRules
    from server.roster import RosterManager

log = logging.getLogger("presenced")
_SWEEP_INTERVAL = 5.0


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.hosts = frozenset(config.domains)
        self.default_domain = config.domains[0]
        self.placeholder_jid = JID.from_parts(None, self.default_domain)
        self.hooks = Hooks()
        self.sessions = SessionManager(config.limits.max_sessions_per_user)
        self.router = Router(self.hosts, self.sessions, self.hooks)
        self.modules: dict[str, Module] = {}
        self.features: list[str] = []  # disco#info features of the server (XEP-0030)
        self.connections: set[C2SConnection] = set()
        self.c2s_policy = Policy(domains=self.hosts,
                                 require_starttls=config.c2s.require_starttls,
                                 allow_plain=config.c2s.allow_plain,
                                 scram_iterations=config.c2s.scram_iterations)
        self._stream_features: list[Any] = []
        self._listeners: list[tuple[str, asyncio.Server]] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.storage: Storage
        self.rosters: RosterManager  # set by the roster module
        self.access: AccessRules     # set by the presence module
        self.loop: asyncio.AbstractEventLoop
        self._tls_starttls: SSL.Context
        self._tls_direct: SSL.Context
        self._end_point: bytes | None = None
        self.federation: Federation | None = None

    # -- pieces the connections use ----------------------------------------------------------

    def new_parser(self) -> StreamParser:
        limits = self.config.limits
        return StreamParser(max_stanza_size=limits.max_stanza_size, max_depth=limits.max_depth)

    def tls_layer(self, direct: bool) -> TLSLayer:
        return TLSLayer(self._tls_direct if direct else self._tls_starttls, self._end_point)

    def post_bind_features(self) -> list[etree._Element]:
        features = []
        for make in self._stream_features:
            el = make(self)
            if el is not None:
                features.append(el)
        return features

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        tls = self.config.tls
        default, per_domain = (tls.certificate, tls.key), tls.domain_certificates
        self._tls_starttls = sni_server_context(default, per_domain, ca_file=tls.ca_file)
        # XEP-0368: direct TLS negotiates ALPN "xmpp-client".
        self._tls_direct = sni_server_context(default, per_domain, alpn=[b"xmpp-client"],
                                              ca_file=tls.ca_file)
        self._end_point = end_point_hash(tls.certificate.read_bytes())
        self.storage = await open_storage(self.config)
        try:
            await self._load_modules()
            for address in self.config.listen.c2s:
                await self._listen(address.host, address.port, direct_tls=False)
            for address in self.config.listen.c2s_tls:
                await self._listen(address.host, address.port, direct_tls=True)
            self.federation = Federation(self)
            await self.federation.start()
        except BaseException:
            if self.federation is not None:
                await self.federation.stop()
            await self._close_listeners()
            await self.storage.close()
            raise
        self._sweeper = asyncio.ensure_future(self._sweep())
        for pending in self.hooks.fire_all("server-started", self):
            await pending

    async def _listen(self, host: str, port: int, direct_tls: bool) -> None:
        listener = await self.loop.create_server(
            lambda: C2SConnection(self, direct_tls), host, port, reuse_address=True, backlog=1024)
        kind = "c2s_tls" if direct_tls else "c2s"
        self._listeners.append((kind, listener))
        for sock in listener.sockets:
            name = sock.getsockname()
            log.info("event=listening kind=%s address=%s:%s", kind, name[0], name[1])

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """(kind, host, port) of every listening socket: tests listen on port 0."""
        own = [(kind, *sock.getsockname()[:2])
               for kind, listener in self._listeners for sock in listener.sockets]
        return own + (self.federation.bound_addresses() if self.federation else [])

    async def _load_modules(self) -> None:
        for name in MODULES:
            module: Module = importlib.import_module(f"server.modules.{name}").module
            module.server = self
            self.modules[name] = module
            for type_, target, xmlns, handler in module.iq_handlers:
                self.router.add_iq_handler(type_, target, xmlns, handler)
            for event, priority, handler in module.event_handlers:
                self.hooks.add(event, handler, priority)
            self.features.extend(f for f in module.features if f not in self.features)
            self._stream_features.extend(module.stream_features)
            for loader in module.loaders:
                result = loader(self)
                if inspect.isawaitable(result):
                    await result

    async def _sweep(self) -> None:
        """Negotiation and idle timeouts, checked for all connections at once (cheaper than a
        timer per connection)."""
        limits = self.config.limits
        interval = min(_SWEEP_INTERVAL, limits.negotiation_timeout / 2, limits.idle_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for conn in list(self.connections):
                if not conn.bound and now - conn.opened_at > limits.negotiation_timeout:
                    conn.close("connection-timeout", "stream negotiation took too long")
                elif now - conn.last_activity > limits.idle_timeout:
                    conn.close("connection-timeout", "idle for too long")

    async def _close_listeners(self) -> None:
        for _kind, listener in self._listeners:
            listener.close()
        self._listeners.clear()

    async def stop(self) -> None:
        """Graceful: stop listening, close every stream, flush storage."""
        log.info("event=stopping sessions=%d", len(self.sessions))
        for pending in self.hooks.fire_all("server-stopping", self):
            await pending
        await self._close_listeners()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.federation is not None:
            await self.federation.stop()
        for conn in list(self.connections):
            conn.close("system-shutdown", "the server is shutting down")
        deadline = self.loop.time() + 3.0
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort("shutdown")
        await self.router.drain()
        await self.storage.close()
        log.info("event=stopped")


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop, 1 when the server could not start."""
    server = Server(config)
    try:
        await server.start()
    except OSError as exc:
        log.error("event=start-failed reason=%s", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("event=started domains=%s", ",".join(config.domains))
    await stop.wait()
    await server.stop()
    return 0
