"""Every event a module can hook, with its arguments, whether a handler can stop it, and who
fires it — the one list a contributor reads (Prosody's module:hook, by name).

    from server import events
    from server.module import Module, hook

    class Greeter(Module):
        @hook(events.SESSION_BOUND)
        def greet(self, session): ...

An event is a ``str`` (its name), so the router's hot path keys its chains by plain strings and
``@hook("session-closed")`` still works for a known name. Hooking a name that is not listed
here (a misspelt ``@hook``) is an error when the module loads. A module file may define events
of its own with ``Event(...)`` at import time; two events of one name are refused.

Two kinds (``stops``):

* **fire** (stops=True): handlers run highest priority first; the first one returning anything
  but None answers, and the rest are not called: ``hooks.fire(EVENT, *args)`` returns that
  answer (often an awaitable, which the caller awaits or hands on).
* **notify** (stops=False): every handler runs; ``await hooks.notify(EVENT, *args)`` awaits
  the awaitables they return, in order; ``hooks.notify_nowait(...)`` calls them all at once
  and returns those awaitables (for callers that are not coroutines: they spawn or gather
  them); ``hooks.collect(...)`` returns every non-None answer (e.g. lists of features).

Handlers of one event are called with the same positional arguments (``args``, below).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_KNOWN: dict[str, Event] = {}


class Event(str):
    """An event's name with what a handler needs to know about it."""

    args: tuple[str, ...]
    stops: bool
    fired_by: str
    doc: str

    def __new__(cls, name: str, args: tuple[str, ...], *, stops: bool, fired_by: str,
                doc: str = "") -> Event:
        if name in _KNOWN:
            raise ValueError(f"event {name!r} is defined twice")
        self = super().__new__(cls, name)
        self.args, self.stops, self.fired_by, self.doc = args, stops, fired_by, doc
        _KNOWN[name] = self
        return self


def known(name: str) -> Event:
    """The event of this name; KeyError (naming the list to read) when there is none."""
    event = _KNOWN.get(name)
    if event is None:
        raise KeyError(f"unknown event {name!r}: server/events.py lists the events")
    return event


def all_events() -> list[Event]:
    return list(_KNOWN.values())


def _fire(name: str, args: tuple[str, ...], fired_by: str, doc: str = "") -> Event:
    return Event(name, args, stops=True, fired_by=fired_by, doc=doc)


def _notify(name: str, args: tuple[str, ...], fired_by: str, doc: str = "") -> Event:
    return Event(name, args, stops=False, fired_by=fired_by, doc=doc)


_STANZA = ("stanza", "origin: Session | None", "to: JID")

# -- routing (server/router.py): a handler returning non-None has taken the stanza ----------
MESSAGE_HOST = _fire("message/host", _STANZA, "server/router.py")
MESSAGE_BARE = _fire("message/bare", _STANZA, "server/router.py")
MESSAGE_FULL = _fire("message/full", _STANZA, "server/router.py")
PRESENCE_HOST = _fire("presence/host", _STANZA, "server/router.py")
PRESENCE_BARE = _fire("presence/bare", _STANZA, "server/router.py")
PRESENCE_FULL = _fire("presence/full", _STANZA, "server/router.py")
IQ_BARE = _fire("iq/bare", _STANZA, "server/router.py",
                "an iq get/set to an account that no @iq_get/@iq_set handler took")
IQ_FULL = _fire("iq/full", _STANZA, "server/router.py",
                "an iq get/set to a resource that is not online (RFC 6121 §8.5.3.2.1)")
IQ_HOST = _fire("iq/host", _STANZA, "server/router.py",
                "an iq get/set to the domain that no @iq_get/@iq_set handler took")
IQ_RESPONSE = _fire("iq-response", _STANZA, "server/router.py",
                    "an iq result/error not for an online resource")
PRESENCE_BROADCAST = _fire("presence/broadcast", ("stanza", "origin: Session"),
                           "server/router.py", "presence without 'to' from a client")
ROUTE_REMOTE = _fire("route/remote", _STANZA, "server/router.py",
                     "a stanza for a domain we do not host (federation takes it)")
FILTER_USER = _fire(
    "filter/user", _STANZA, "server/router.py",
    "every stanza addressed to a user, local or remote, before delivery; each filter once; "
    "an awaitable of None lets it pass; a filter marked @stanza_kinds is skipped for the "
    "other kinds (the router's hot path: Hooks.chain/by_kind)")

# -- messages (server/modules/messages.py) --------------------------------------------------
MESSAGE_OFFLINE = _fire("message/offline", _STANZA, "server/modules/messages.py",
                        "a message for an account with no available resource: store it")
MESSAGE_DELIVERED = _notify(
    "message/delivered", ("stanza", "account: JID", "sessions: Sequence[Session]"),
    "server/modules/messages.py",
    "delivered to these sessions, or stored offline (none); what handlers return is ignored")

MESSAGE_COPIED_TO = _notify(
    "message/copied-to", ("stanza", "session"), "server/modules/stream_management.py",
    "collected: the sessions that had a carbon copy of a message delivered to that session "
    "(stream management asks before handing an unacknowledged one on)")
ARCHIVE_SENT_ID = _notify("archive/sent-id", ("stanza", "sender: JID", "archive_id: str"),
                          "server/modules/mam.py",
                          "the message's id in the sender's archive (for carbons' <sent/>)")

# -- presence (server/modules/presence.py) --------------------------------------------------
PRESENCE_OUTGOING = _notify("presence/outgoing", ("session", "stanza"),
                            "server/modules/presence.py",
                            "an available presence about to go out: handlers may complete it")
PRESENCE_AVAILABLE = _notify("presence/available", ("session", "first: bool"),
                             "server/modules/presence.py")
PRESENCE_UNAVAILABLE = _notify("presence/unavailable", ("session", "stanza | None"),
                               "server/modules/presence.py",
                               "the resource no longer counts as available (None: it left)")
PRESENCE_FETCHED = _notify("presence/fetched",
                           ("presentity: JID", "watcher: JID", "allowed: bool"),
                           "server/modules/presence.py, server/modules/visibility.py",
                           "a probe was answered (RFC 2778 §2.2 fetch)")
ACCESS_MAY_SEE_PRESENCE = _fire("access/may-see-presence", ("presentity: JID", "watcher: JID"),
                                "server/modules/last.py",
                                "answered by presence: an awaitable of bool")
ACCESS_DENY = _fire("access/deny", ("presentity: JID", "watcher: JID", "what: str"),
                    "server/presence/access.py", "non-None: the rule denies it")
WATCHERS_LIST = _fire("watchers/list", ("requester: JID",), "server/modules/adhoc.py")

# -- sessions (server/app.py, server/stream/c2s.py) -----------------------------------------
SESSION_BOUND = _notify("session-bound", ("session",), "server/stream/c2s.py")
SESSION_CLOSED = _notify("session-closed", ("session", "reason: str"), "server/app.py",
                         "the session is over; awaitables handlers return are spawned")
SESSION_DETACHED = _fire("session-detached", ("session", "reason: str"), "server/stream/c2s.py",
                         "the stream is gone; True keeps the session for a resumption "
                         "(XEP-0198)")
DURABILITY_BARRIER = _notify("durability-barrier", ("session",),
                             "server/modules/stream_management.py",
                             "awaitables of writes still to commit, awaited before an <a/>")
AUTH_FAILED = _notify("auth-failed", ("stream",), "server/stream/c2s.py")

# -- SASL2 and Bind 2 (XEP-0388/0386/0484; server/stream/c2s.py) ----------------------------
BIND2_FEATURES = _notify("bind2/features", (), "server/stream/c2s.py",
                         "collected: each handler returns the feature vars it offers")
BIND2_ENABLE = _fire("bind2/enable", ("session", "element"), "server/stream/c2s.py",
                     "an element for <bound/>, True (done) or None (not mine)")
SASL2_RESUME = _fire("sasl2/resume", ("stream", "element"), "server/stream/c2s.py")
FAST_VERIFY = _fire("fast/verify", ("user", "domain", "client", "mechanism", "proof", "cb_data",
                                   "invalidate: bool"), "server/stream/c2s.py",
                    "an awaitable of (responder | None, rotate: bool)")
FAST_ISSUE = _fire("fast/issue", ("user", "domain", "client", "mechanism"),
                   "server/stream/c2s.py", "an awaitable of (token, expiry) or None")

# -- discovery (server/modules/disco.py) ----------------------------------------------------
DISCO_NODE = _fire("disco/node", ("query", "origin: Session | None", "node: str"),
                   "server/modules/disco.py", "disco#info of a node: fill the query")
DISCO_SERVER_INFO = _notify("disco/server-info", ("query", "stanza", "origin"),
                            "server/modules/disco.py",
                            "add XEP-0128 forms to the server's disco#info (e.g. XEP-0157)")
DISCO_ACCOUNT_INFO = _notify("disco/account-info", ("query", "stanza", "origin"),
                             "server/modules/disco.py", "add to an account's disco#info")

# -- PEP (server/modules/pubsub/pep.py) -----------------------------------------------------
PEP_PUBLISHED = _notify("pep/published",
                        ("owner: JID", "node: str", "item_id: str", "payload | None"),
                        "server/modules/pubsub/pep.py", "after an item went out")

# -- entity capabilities (server/modules/caps.py, XEP-0115) ---------------------------------
CAPS_KNOWN = _notify("caps/known", ("session", "features: frozenset[str]"),
                     "server/modules/caps.py",
                     "a local resource's features are known, with its presence out")
CAPS_REMOTE_KNOWN = _notify("caps/remote-known",
                            ("user: JID", "remote: JID", "features: frozenset[str]"),
                            "server/modules/caps.py",
                            "a remote contact's features are known (its presence to user)")

# -- registration (server/modules/register.py, invites.py; server/stream/c2s.py) ------------
C2S_PRE_AUTH_FEATURES = _notify("c2s/pre-auth-features", ("stream",), "server/stream/c2s.py",
                                "collected: elements for the stream features before SASL")
C2S_PRE_AUTH_IQ = _fire("c2s/pre-auth-iq", ("stream", "iq"), "server/stream/c2s.py",
                        "XEP-0077/XEP-0445 before SASL: a reply or an awaitable of one")
ACCOUNT_REGISTERED = _notify("account-registered", ("jid: JID", "invitation | None"),
                             "server/modules/register.py")

# -- ad-hoc commands (server/modules/adhoc.py, XEP-0050) ------------------------------------
ADHOC_EXECUTE = _fire("adhoc/execute", ("stanza", "request", "requester: JID"),
                      "server/modules/adhoc.py",
                      "a command node adhoc.py does not know (admin_adhoc: XEP-0133): the "
                      "reply or an awaitable of one")

# -- lifecycle (server/app.py, server/ctl.py) -----------------------------------------------
TLS_RELOADED = _notify("tls-reloaded", ("tls: TLSConfig",), "server/app.py",
                       "presenced ctl reload / SIGHUP: new connections get these certificates")
SERVER_STARTED = _notify("server-started", ("server",), "server/app.py")
SERVER_STOPPING = _notify("server-stopping", ("server",), "server/app.py")

# -- cluster (server/cluster/, only with [cluster]) -----------------------------------------
CLUSTER_NODE_DIED = _notify(
    "cluster/node-died", ("node: str", "incarnation: str"), "server/cluster/__init__.py",
    "on every node, once per incarnation of another node that stopped being live (killed, "
    "fenced, or stopped): whatever was placed on it (rooms, PEP services) moves; the "
    "incarnation's sessions, directory entries and inbox are cleaned up by one node "
    "(server/cluster/reaper.py)")


# -- the handlers, by event --------------------------------------------------------------------

_KINDS = "__presenced_stanza_kinds__"
_KIND_CHAINS = 16  # chains kept per event; kinds are stanza tags, a handful


def stanza_kinds(*tags: str) -> Callable[[F], F]:
    """Marks a handler (of filter/user) that looks at stanzas with these tags only, e.g.
    ``@stanza_kinds(st.PRESENCE)`` under ``@hook(events.FILTER_USER)``: `Hooks.chain(event,
    tag)` leaves it out for the others, so a message does not pay for presence filters. The
    handler must return None for the kinds it leaves out (whoever runs the whole chain still
    calls it)."""
    def mark(fn: F) -> F:
        fn.__dict__[_KINDS] = frozenset(tags)
        return fn
    return mark


class Hooks:
    """Handlers by event, higher priorities first (equal ones in load order)."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[int, Callable[..., Any]]]] = {}
        self._chains: dict[str, tuple[Callable[..., Any], ...]] = {}
        # event -> stanza kind -> its chain, filled on demand (by_kind() hands out the dicts)
        self._kind_chains: dict[str, dict[object, tuple[Callable[..., Any], ...]]] = {}

    def add(self, event: str, handler: Callable[..., Any], priority: int = 0) -> None:
        """Raises KeyError for an event that is not defined (see the list above)."""
        name = str(known(event))  # chains are keyed by plain str: the hot path's lookups
        handlers = self._handlers.setdefault(name, [])
        handlers.append((priority, handler))
        handlers.sort(key=lambda item: -item[0])  # stable: equal priorities keep load order
        self._chains[name] = tuple(h for _, h in handlers)
        kinds = self._kind_chains.get(name)
        if kinds is not None:
            kinds.clear()  # in place: holders of by_kind(event) see the change

    def chain(self, event: str, kind: object = None) -> tuple[Callable[..., Any], ...]:
        """The handlers of an event, highest priority first; given a stanza's tag, without
        those marked (`stanza_kinds`) as looking at other kinds only."""
        if kind is None:
            return self._chains.get(event, ())
        kinds = self.by_kind(event)
        chain = kinds.get(kind)
        if chain is None:
            chain = tuple(h for h in self._chains.get(event, ())
                          if kind in getattr(h, _KINDS, (kind,)))
            if len(kinds) >= _KIND_CHAINS:
                kinds.clear()
            kinds[kind] = chain
        return chain

    def by_kind(self, event: str) -> dict[object, tuple[Callable[..., Any], ...]]:
        """The chains of an event by stanza kind made so far, kept up to date in place (a
        kind missing: ask chain(event, kind)). For the router's hot path: one dict lookup."""
        kinds = self._kind_chains.get(event)
        if kinds is None:
            kinds = self._kind_chains[event] = {}
        return kinds

    def has(self, event: str) -> bool:
        return event in self._chains

    def fire(self, event: str, *args: Any) -> Any:
        """A `fire` event: the first answer that is not None (the rest are not called)."""
        for handler in self._chains.get(event, ()):
            result = handler(*args)
            if result is not None:
                return result
        return None

    def collect(self, event: str, *args: Any) -> list[Any]:
        """Call every handler; their answers that are not None."""
        results = []
        for handler in self._chains.get(event, ()):
            result = handler(*args)
            if result is not None:
                results.append(result)
        return results


    def notify_nowait(self, event: str, *args: Any) -> list[Awaitable[Any]]:
        """Call every handler now; the awaitables they returned (coroutines, futures), for a
        caller that is not a coroutine to spawn or gather. Other answers are ignored."""
        pending = []
        for handler in self._chains.get(event, ()):
            result = handler(*args)
            if result is not None and inspect.isawaitable(result):
                pending.append(result)
        return pending

    async def notify(self, event: str, *args: Any) -> None:
        """Call every handler, then await what they returned that is awaitable, in order."""
        for pending in self.notify_nowait(event, *args):
            await pending
