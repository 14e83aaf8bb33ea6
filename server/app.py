"""Server: owns listeners, router, modules and storage; start/stop lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lxml import etree

from federation.service import Federation, FederationContext
from server import ctl, events, listening
from server.events import Hooks
from server.jid import JID
from server.limits import Limiter
from server.module import M, Module, ModuleError, load_order
from server.modules import MODULES, module_class
from server.presence.access import AccessRules
from server.roster import RosterManager
from server.router import Router
from server.services import Route, ServiceHost
from server.sessions import Session, SessionManager
from server.storage import CORE_STORES, Storage, open_storage
from server.storage.keystore import shared_secret
from server.stream.c2s import C2SConnection
from server.stream.component import Components
from server.stream.negotiation import Policy
from server.stream.tls import TLSLayer, end_point_hash, sni_server_context
from server.xml.parser import StreamParser

if TYPE_CHECKING:
    from OpenSSL import SSL

    from server.cluster import Cluster
    from server.config import Config, TLSConfig

log = logging.getLogger("presenced")
_SWEEP_INTERVAL = 5.0


class Server:
    def __init__(self, config: Config, extra_modules: Sequence[type[Module]] = (),
                 modules: Sequence[str] = MODULES) -> None:
        """extra_modules: module classes loaded after those of server/modules (tests, plugins);
        their settings must have been given to load_config(sections=...). modules: the names
        of server/modules to load (all of MODULES unless told)."""
        self.config = config
        self._module_names = tuple(modules)
        self._extra_modules = tuple(extra_modules)
        self.hosts = frozenset(config.domains)
        self.default_domain = config.domains[0]
        self.placeholder_jid = JID.from_parts(None, self.default_domain)
        self.hooks = Hooks()
        self.cluster: Cluster | None = None
        if config.cluster.enabled:  # [cluster]: the directory in Redis, inboxes (server/cluster)
            from server.cluster import Cluster
            self.cluster = Cluster(self)
        self.sessions = (SessionManager(config.limits.max_sessions_per_user)
                         if self.cluster is None else self.cluster.directory)
        self.limiter = Limiter(config.limits)  # per-address counts and read rates
        self.router = Router(self.hosts, self.sessions, self.hooks)
        if self.cluster is not None:
            self.cluster.attach(self.router)
        self.modules: dict[str, Module] = {}
        self._by_class: dict[type[Module], Module] = {}
        self.nonza_handlers: dict[str, Callable[..., Any]] = {}
        self.pre_bind_handlers: dict[str, Callable[..., Any]] = {}
        self.service_hosts: dict[str, ServiceHost] = {}
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
        # The core's, as Prosody's core/rostermanager: modules read them (ModuleContext).
        self.rosters = RosterManager(self)
        self.access = AccessRules(self.hooks)
        self.loop: asyncio.AbstractEventLoop
        self._tls_starttls: SSL.Context
        self._tls_direct: SSL.Context
        self._end_point: bytes | None = None
        self.federation: Federation | None = None
        self.components: Components | None = None
        self.admin_socket = ctl.AdminSocket(self)  # presenced ctl (server/ctl.py)

    async def _check_scram_keys(self) -> None:
        """Accounts imported from Prosody or ejabberd (server/porting) may have SCRAM-SHA-1 keys
        only. A client picks the best mechanism offered before it names its account, and most
        (slixmpp, Conversations) take a failure there as a wrong password: while such accounts
        exist, and none lacks SHA-1 keys, SCRAM-SHA-256 is not offered (as Prosody 0.12 and
        ejabberd by default offer SCRAM-SHA-1 only). A password change gives an account both."""
        without_sha1, without_sha256 = await self.storage.accounts.missing_keys()
        if without_sha256 and not without_sha1:
            self.c2s_policy = dataclasses.replace(self.c2s_policy, scram_sha256=False)
            log.warning("event=scram-sha256-not-offered accounts_with_sha1_only=%d",
                        without_sha256)

    # -- pieces the connections use ----------------------------------------------------------

    def new_parser(self) -> StreamParser:
        limits = self.config.limits
        return StreamParser(max_stanza_size=limits.max_stanza_size, max_depth=limits.max_depth)

    def tls_layer(self, direct: bool) -> TLSLayer:
        return TLSLayer(self._tls_direct if direct else self._tls_starttls, self._end_point)

    def add_service(self, host: ServiceHost, route: Route) -> None:
        """Serve a domain of its own (server/services.py)."""
        self.router.add_service(host.domain, route)
        self.service_hosts[host.domain] = host

    def remove_service(self, domain: str) -> None:
        self.router.remove_service(domain)
        self.service_hosts.pop(domain, None)

    def services_of(self, domain: str) -> list[ServiceHost]:
        """The services a user domain lists in its disco#items."""
        return [h for h in self.service_hosts.values() if h.parent == domain]

    def module(self, cls: type[M]) -> M | None:
        """The loaded instance of a module class, or None (server/module.py: needs, uses)."""
        found = self._by_class.get(cls)
        return found if isinstance(found, cls) else None

    def end_session(self, session: Session, reason: str) -> None:
        """A session is over (its stream closed, or a detached session expired): forget it
        and tell the modules (presence goes unavailable, last activity is recorded, ...)."""
        session.transport = None
        if self.sessions.unbind(session):
            log.info("event=unbound jid=%s reason=%s", session.jid_str, reason)
        for pending in self.hooks.notify_nowait(events.SESSION_CLOSED, session, reason):
            self.router.spawn(pending)

    def post_bind_features(self) -> list[etree._Element]:
        features = []
        for make in self._stream_features:
            el = make()
            if el is not None:
                features.append(el)
        return features

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._load_tls(self.config.tls)
        classes = self._module_classes()
        # The core's stores and those the modules declare, each once (server/storage).
        stores = list(CORE_STORES)
        for spec in (spec for cls in classes for spec in cls.stores):
            if spec not in stores:
                stores.append(spec)
        self.storage = await open_storage(self.config, stores)
        try:
            await self._check_scram_keys()
            await self._load_modules(classes)
            if self.cluster is not None:
                await self.cluster.start()  # joined, with the directory, before any listener
            for address in self.config.listen.c2s:
                await self._listen(address.host, address.port, direct_tls=False)
            for address in self.config.listen.c2s_tls:
                await self._listen(address.host, address.port, direct_tls=True)
            self.federation = Federation(FederationContext(
                loop=self.loop, router=self.router, hooks=self.hooks,
                domains=frozenset(self.config.local_domains),
                default_domain=self.default_domain, s2s=self.config.s2s, tls=self.config.tls,
                listen=(("s2s", self.config.listen.s2s), ("s2s_tls", self.config.listen.s2s_tls)),
                new_parser=self.new_parser, limiter=self.limiter,
                shared_secret=await shared_secret(self.storage.secrets, "dialback")))
            await self.federation.start()
            self.components = Components(
                loop=self.loop, router=self.router, settings=self.config.components,
                addresses=self.config.listen.component, new_parser=self.new_parser,
                add_service=self.add_service, parent_of=self._parent_domain,
                limiter=self.limiter,
                routes=self.cluster.component_routes() if self.cluster is not None else None)
            await self.components.start()
        except BaseException:
            if self.components is not None:
                await self.components.stop()
            if self.federation is not None:
                await self.federation.stop()
            await self._close_listeners()
            await self.storage.close()
            raise
        self._sweeper = asyncio.ensure_future(self._sweep())
        await self.admin_socket.start()
        await self.hooks.notify(events.SERVER_STARTED, self)

    def _load_tls(self, tls: TLSConfig) -> None:
        default, per_domain = (tls.certificate, tls.key), tls.domain_certificates
        starttls = sni_server_context(default, per_domain, ca_file=tls.ca_file)
        # XEP-0368: direct TLS negotiates ALPN "xmpp-client".
        direct = sni_server_context(default, per_domain, alpn=[b"xmpp-client"],
                                    ca_file=tls.ca_file)
        end_point = end_point_hash(tls.certificate.read_bytes())
        self._tls_starttls, self._tls_direct, self._end_point = starttls, direct, end_point

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration and certificates, keeping every session (server/ctl.py):
        (ok, a report naming what needs a restart)."""
        return await ctl.reload(self)

    def reload_tls(self, tls: TLSConfig) -> None:
        """New connections get these certificates (server/ctl.py reload); open ones keep
        theirs. Raises (and changes nothing) when a file cannot be used."""
        self._load_tls(tls)
        if self.federation is not None:
            self.federation.reload_tls(tls)
        for pending in self.hooks.notify_nowait(events.TLS_RELOADED, tls):
            self.router.spawn(pending)

    async def _listen(self, host: str, port: int, direct_tls: bool) -> None:
        listener = await self.loop.create_server(
            lambda: C2SConnection(self, direct_tls), host, port, backlog=1024,
            reuse_address=True, reuse_port=listening.ports_shared())
        kind = "c2s_tls" if direct_tls else "c2s"
        self._listeners.append((kind, listener))
        for sock in listener.sockets:
            name = sock.getsockname()
            log.info("event=listening kind=%s address=%s:%s", kind, name[0], name[1])

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """(kind, host, port) of every listening socket: tests listen on port 0."""
        own = [(kind, *sock.getsockname()[:2])
               for kind, listener in self._listeners for sock in listener.sockets]
        own += self.federation.bound_addresses() if self.federation else []
        for module in self.modules.values():  # listeners of modules: http, https
            if isinstance(module, Module) and hasattr(module, "bound_addresses"):
                own += module.bound_addresses()
        return own + (self.components.bound_addresses() if self.components else [])

    def _parent_domain(self, domain: str) -> str:
        """The user domain a service domain belongs to: muc.a.test -> a.test."""
        for host in self.config.domains:
            if domain.endswith("." + host):
                return host
        return self.default_domain

    def _module_classes(self) -> list[type[Module]]:
        loaded = [importlib.import_module(f"server.modules.{name}")
                  for name in self._module_names]
        return load_order([*map(module_class, loaded), *self._extra_modules])

    async def _load_modules(self, classes: list[type[Module]]) -> None:
        for cls in classes:
            if cls.name in self.modules:
                raise ModuleError(f"two modules named {cls.name!r}")
            module = cls(self, self.config.modules.get(cls.name))
            self.modules[cls.name] = self._by_class[cls] = module
            self.features.extend(f for f in cls.features if f not in self.features)
            for route, handler in module.iq_handlers():
                for target in route.targets:
                    self.router.add_iq_handler(route.type, target, route.xmlns, route.name,
                                               handler)
            for hook_route, fn in module.hook_handlers():
                try:
                    self.hooks.add(hook_route.event, fn, hook_route.priority)
                except KeyError as exc:  # a misspelt @hook
                    raise ModuleError(f"module {cls.name}: {exc.args[0]}") from None
            self._stream_features.extend(module.stream_features())
            for nonza_route, fn in module.nonza_handlers():
                if nonza_route.tag in self.nonza_handlers:
                    raise ValueError(f"two handlers for {nonza_route.tag}")
                self.nonza_handlers[nonza_route.tag] = fn
            for pre_route, fn in module.pre_bind_handlers():
                if pre_route.tag in self.pre_bind_handlers:
                    raise ValueError(f"two handlers for {pre_route.tag}")
                self.pre_bind_handlers[pre_route.tag] = fn
        for module in self.modules.values():
            await module.start()

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
        await self.admin_socket.stop()
        await self.hooks.notify(events.SERVER_STOPPING, self)
        await self._close_listeners()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.components is not None:
            await self.components.stop()
        for conn in list(self.connections):
            conn.close("system-shutdown", "the server is shutting down")
        deadline = self.loop.time() + 3.0
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort("shutdown")
        await self.router.drain()
        if self.cluster is not None:
            await self.cluster.stop()
        # Federation after the client streams: what their closing sends to other servers
        # (unavailable presence to contacts and rooms, RFC 6121 §4.6.3) goes out first.
        if self.federation is not None:
            await self.federation.stop()
            # What peers sent until their streams closed (after the first drain) is handled
            # before the modules stop and storage closes (CI: a message from Prosody read the
            # closed SQLite database).
            await self.router.drain()
        for module in reversed(list(self.modules.values())):
            await module.stop()
        await self.storage.close()
        log.info("event=stopped")


async def _reload(server: Server) -> None:
    await server.reload()


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop, 1 when the server could not start."""
    server = Server(config)
    try:
        await server.start()
    except (OSError, ModuleError) as exc:
        log.error("event=start-failed reason=%s", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: re-read the configuration and certificates, keeping every session (server/ctl.py).
    loop.add_signal_handler(signal.SIGHUP, lambda: server.router.spawn(_reload(server)))
    log.info("event=started domains=%s", ",".join(config.domains))
    ctl.notify("READY=1", f"MAINPID={os.getpid()}")  # systemd Type=notify
    await stop.wait()
    ctl.notify("STOPPING=1")
    await server.stop()
    return 0
