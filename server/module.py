"""Feature modules: one file per feature, one instance per server (DESIGN.md rule 1).

A module is a class; the server makes one instance of it when it starts and hands it the
server and the module's own config section. Everything the feature handles is declared in its
file::

    class Ping(Module):
        '''XMPP Ping (XEP-0199).'''
        name = "ping"
        features = (ns.PING,)

        @iq_get(ns.PING, "ping", to=("host", "bare"))
        def ping(self, stanza: Stanza, origin: Session | None) -> Stanza:
            return result(stanza)

Declarations (class attributes): ``name``; ``features`` (XEP-0030 disco features of the user
domains); ``settings`` (a config section dataclass, read from the table ``[name]``);
``stores`` (StoreSpecs whose stores the module needs, see server/storage; ``self.store_of(SPEC)``
gives one, to keep as a typed attribute); ``needs`` and ``uses`` (the other modules it cannot
work without, and those it works with when they are loaded: ``self.server.module(Pep)`` gives
the instance or None; a module loads after those it names, and a missing need stops the
start); ``session_slots`` are SessionSlot class attributes (per-session state). Decorated
methods: ``iq_get``/``iq_set`` (dispatched by type, namespace and element name; ``to="service"``
or ``"service-bare"`` on a service host, see server/services.py), ``hook`` (events, see
server/events.py),
``stream_feature`` (post-bind c2s stream features), ``nonza`` (top-level elements of a bound
c2s stream that are not stanzas, e.g. stream management's <r/>) and ``pre_bind`` (elements a
client sends instead of binding a resource, e.g. <resume/>). ``start``/``stop`` run when the
server starts and stops.

A handler gets (stanza, origin) and may return a reply element, None, or an awaitable of
either; raising StanzaError answers the stanza with that error.

A module sees the server through ``ModuleContext`` (``self.server``): the router, hooks,
sessions, storage, the core's rosters and access rules, the server-wide config, service hosts
and the other modules, by class. Nothing else of ``Server`` is its business.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar

from lxml.etree import _Element

if TYPE_CHECKING:
    from server.cluster import Cluster
    from server.config import Config
    from server.events import Hooks
    from server.jid import JID
    from server.presence.access import AccessRules
    from server.roster import RosterManager
    from server.router import Router
    from server.services import Route, ServiceHost
    from server.sessions import Session, SessionManager
    from server.storage import Storage, StoreSpec

Stanza: TypeAlias = _Element
Handler = Callable[..., "_Element | Awaitable[_Element | None] | None"]
# Who an iq is addressed to: the server's domain, an account's bare JID (the sender's own, or
# another's), or absent `to` from a client (RFC 6120 §10.3.3: handled for the sender's account).
TARGETS = ("host", "self", "bare")
# On a service host (server/services.py: muc.<domain>, ...): the service's own domain, or a
# bare JID at it (a room, a node). The service dispatches these itself; handlers get
# (stanza, origin, to).
SERVICE_TARGETS = ("service", "service-bare")
T = TypeVar("T")
M = TypeVar("M", bound="Module")


class ModuleError(Exception):
    """The modules cannot be loaded together (a missing need, a cycle, two of one name)."""


class ModuleContext(Protocol):
    """What a module may use of the server (``self.server``), as federation has its
    FederationContext: everything else of ``Server`` is the core's own."""

    config: Config                   # the whole configuration (a module's own: self.config)
    hosts: frozenset[str]            # the user domains
    default_domain: str
    placeholder_jid: JID
    router: Router
    hooks: Hooks
    sessions: SessionManager
    storage: Storage
    rosters: RosterManager           # RFC 6121 §2 rosters, cached while online (server/roster.py)
    access: AccessRules              # who may see whose presence (server/presence/access.py)
    loop: asyncio.AbstractEventLoop
    features: list[str]              # the user domains' disco#info features (XEP-0030)
    cluster: Cluster | None          # [cluster] (server/cluster): None in a single process

    def module(self, cls: type[M]) -> M | None:
        """The loaded instance of a module class, or None when it is not loaded."""

    def add_service(self, host: ServiceHost, route: Route) -> None: ...

    def remove_service(self, domain: str) -> None: ...

    def services_of(self, domain: str) -> list[ServiceHost]: ...

    def end_session(self, session: Session, reason: str) -> None: ...

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """(kind, host, port) of every listening socket (c2s, s2s, modules' listeners)."""


@dataclass(frozen=True)
class IqRoute:
    type: str
    xmlns: str
    name: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class HookRoute:
    event: str
    priority: int


_DECLARED = "__presenced_routes__"


def _declare(route: object) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        routes = fn.__dict__.setdefault(_DECLARED, [])
        routes.append(route)
        return fn
    return mark


def iq(type_: str, xmlns: str, name: str,
       to: Iterable[str] = ("host",)) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An iq handler for <name xmlns=xmlns/> payloads of iqs of this type to these targets
    (one target may be given as a string)."""
    targets = (to,) if isinstance(to, str) else tuple(to)
    for target in targets:
        if target not in TARGETS and target not in SERVICE_TARGETS:
            raise ValueError(f"unknown iq target {target!r}")
    if type_ not in ("get", "set"):
        raise ValueError("iq handlers answer get or set")
    return _declare(IqRoute(type_, xmlns, name, targets))


def iq_get(xmlns: str, name: str,
           to: Iterable[str] = ("host",)) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return iq("get", xmlns, name, to)


def iq_set(xmlns: str, name: str,
           to: Iterable[str] = ("host",)) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return iq("set", xmlns, name, to)


def hook(event: str, priority: int = 0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Handle an event (server/events.py lists them: ``@hook(events.SESSION_CLOSED)``; a known
    name as a string works too); higher priorities run first. An unknown event is refused when
    the module loads."""
    return _declare(HookRoute(event, priority))


@dataclass(frozen=True)
class _StreamFeature:
    pass


@dataclass(frozen=True)
class NonzaRoute:
    tag: str  # Clark notation, {namespace}name


@dataclass(frozen=True)
class PreBindRoute:
    tag: str


def pre_bind(tag: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An element a client may send instead of resource binding (XEP-0198 <resume/>):
    (stream, element), where stream is the C2SConnection being negotiated."""
    return _declare(PreBindRoute(tag))


def stream_feature(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A c2s stream feature offered after resource binding: returns an element or None."""
    return _declare(_StreamFeature())(fn)


def nonza(tag: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A top-level element other than a stanza on a bound c2s stream: (session, element)."""
    return _declare(NonzaRoute(tag))


class SessionSlot(Generic[T]):
    """A declared piece of per-session state of one module (instead of free-form dicts):

        interested = SessionSlot[bool](False)
        ...
        self.interested.set(session, True); self.interested.get(session)
    """

    _numbers = itertools.count()

    def __init__(self, default: T) -> None:
        self.index = next(self._numbers)
        self.default = default

    def get(self, session: Session) -> T:
        state = session.state
        if state is None:
            return self.default
        value: T = state.get(self.index, self.default)
        return value

    def set(self, session: Session, value: T) -> None:
        if session.state is None:
            session.state = {}
        session.state[self.index] = value

    def clear(self, session: Session) -> None:
        if session.state is not None:
            session.state.pop(self.index, None)


class Module:
    name: ClassVar[str]
    features: ClassVar[tuple[str, ...]] = ()
    settings: ClassVar[type | None] = None
    stores: ClassVar[tuple[StoreSpec, ...]] = ()
    needs: ClassVar[tuple[type[Module], ...]] = ()  # loaded first; without one, no start
    uses: ClassVar[tuple[type[Module], ...]] = ()   # loaded first when loaded at all

    def __init__(self, server: ModuleContext, config: Any) -> None:
        self.server = server
        self.config = config  # an instance of `settings`, or None

    def needed(self, cls: type[M]) -> M:
        """A module this one declares in `needs` (so it is loaded)."""
        if cls not in self.needs:
            raise ModuleError(f"module {self.name} does not declare {cls.name} in needs")
        found = self.server.module(cls)
        assert found is not None  # load_order() refused a start without it
        return found

    def store_of(self, spec: StoreSpec) -> Any:
        """The opened store of a spec this module declares in `stores`; keep it as a typed
        attribute (``self.archive: ArchiveStore = self.store_of(archive.SPEC)``)."""
        if spec not in self.stores:
            raise ModuleError(f"module {self.name} does not declare the store {spec.name}")
        return getattr(self.server.storage, spec.name)

    async def start(self) -> None:
        """Called once when the server starts, after every module has been made."""

    async def stop(self) -> None:
        """Called once when the server stops, before storage closes."""

    # -- what the server reads off an instance ----------------------------------------------

    def iq_handlers(self) -> list[tuple[IqRoute, Handler]]:
        """The iq handlers of the user domains (the router's)."""
        return self._iq_routes(TARGETS)

    def service_iq_handlers(self) -> list[tuple[IqRoute, Handler]]:
        """The iq handlers of a service host (SERVICE_TARGETS; see server/services.py)."""
        return self._iq_routes(SERVICE_TARGETS)

    def _iq_routes(self, kinds: tuple[str, ...]) -> list[tuple[IqRoute, Handler]]:
        found = []
        for r, fn in self._declared():
            if isinstance(r, IqRoute):
                targets = tuple(t for t in r.targets if t in kinds)
                if targets:
                    found.append((IqRoute(r.type, r.xmlns, r.name, targets), fn))
        return found

    def hook_handlers(self) -> list[tuple[HookRoute, Callable[..., Any]]]:
        return [(r, fn) for r, fn in self._declared() if isinstance(r, HookRoute)]

    def stream_features(self) -> list[Callable[[], _Element | None]]:
        return [fn for r, fn in self._declared() if isinstance(r, _StreamFeature)]

    def nonza_handlers(self) -> list[tuple[NonzaRoute, Callable[..., Any]]]:
        return [(r, fn) for r, fn in self._declared() if isinstance(r, NonzaRoute)]

    def pre_bind_handlers(self) -> list[tuple[PreBindRoute, Callable[..., Any]]]:
        return [(r, fn) for r, fn in self._declared() if isinstance(r, PreBindRoute)]

    def _declared(self) -> list[tuple[object, Callable[..., Any]]]:
        found: list[tuple[object, Callable[..., Any]]] = []
        for attr in dir(type(self)):
            fn = getattr(type(self), attr, None)
            routes = getattr(fn, _DECLARED, None)
            if routes:
                bound = getattr(self, attr)
                found.extend((route, bound) for route in routes)
        return found



def load_order(classes: Sequence[type[Module]]) -> list[type[Module]]:
    """The classes ordered so that each comes after those it needs or uses (when present),
    otherwise in the given order (stable). ModuleError names the module whose need is missing,
    and the modules of a cycle."""
    present = set(classes)
    for cls in classes:
        for need in cls.needs:
            if need not in present:
                raise ModuleError(f"module {cls.name} needs module {need.name}, which is not "
                                  f"loaded (add it to server/modules MODULES or remove "
                                  f"{cls.name})")
    after = {cls: [d for d in (*cls.needs, *cls.uses) if d in present] for cls in classes}
    ordered: list[type[Module]] = []
    done: set[type[Module]] = set()
    waiting = list(classes)
    while waiting:
        for cls in waiting:
            if all(dep in done for dep in after[cls]):
                break
        else:
            names = ", ".join(c.name for c in waiting)
            raise ModuleError(f"modules depend on each other in a cycle: {names}")
        waiting.remove(cls)
        ordered.append(cls)
        done.add(cls)
    return ordered
