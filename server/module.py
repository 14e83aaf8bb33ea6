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
``stores`` (StoreSpecs whose stores the module needs, see server/storage); ``session_slots``
are SessionSlot class attributes (per-session state). Decorated methods: ``iq_get``/``iq_set``
(dispatched by type, namespace and element name; ``to="service"`` or ``"service-bare"`` on
a service host, see server/services.py), ``hook`` (events, see server/hooks.py),
``stream_feature`` (post-bind c2s stream features), ``nonza`` (top-level elements of a bound
c2s stream that are not stanzas, e.g. stream management's <r/>) and ``pre_bind`` (elements a
client sends instead of binding a resource, e.g. <resume/>). ``start``/``stop`` run when the
server starts and stops.

A handler gets (stanza, origin) and may return a reply element, None, or an awaitable of
either; raising StanzaError answers the stanza with that error.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeAlias, TypeVar

from lxml.etree import _Element

if TYPE_CHECKING:
    from server.app import Server
    from server.sessions import Session
    from server.storage import StoreSpec

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
    """Handle an event (see server/hooks.py for the names); higher priorities run first."""
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

    def __init__(self, server: Server, config: Any) -> None:
        self.server = server
        self.config = config  # an instance of `settings`, or None

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

