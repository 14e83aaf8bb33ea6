"""Events by name, handlers by priority (higher first), as in Prosody's module:hook.

A handler returning anything but None stops a fire() chain; that value is what fire() returns.
fire_all() calls every handler (notifications) and returns their non-None results.

Routing: message/{host,bare,full}, presence/{host,bare,full}, iq/{bare,full} (an iq no handler
took), iq-response, presence/broadcast (no 'to' from a client), route/remote (a domain we do not
host), filter/user (every stanza addressed to a user, local or remote, before delivery: stanza,
origin, to; each filter once, an awaitable of None lets it pass; a filter marked with
`stanza_kinds` is skipped for the other kinds), message/offline,
message/delivered (stanza, account, sessions: carbons, push), presence/outgoing,
presence/fetched, presence/available, presence/unavailable, archive/sent-id (stanza, sender
bare JID, its id in the sender's archive: MAM to carbons, for the <sent/> copy),
message/copied-to (stanza, session: the sessions that had a carbon copy of a message
delivered to that session; stream management asks before handing an unacked one on).
Sessions: session-bound, session-closed (session, reason), session-detached (the stream is
gone; True keeps the session bound for a resumption, XEP-0198), durability-barrier (session:
awaitables of writes still to commit, awaited before an XEP-0198 <a/>), auth-failed.
SASL2 and Bind 2 (XEP-0388/0386/0484): bind2/features, bind2/enable (session, element),
sasl2/resume (stream, element), fast/verify, fast/issue.
Discovery and access: disco/node, disco/account-info (query, stanza, origin),
access/may-see-presence, access/deny, watchers/list.
PEP: pep/published (owner, node, item id, payload or None) after an item went out.
Entity capabilities (caps.py, XEP-0115): caps/known (session, features) when a local resource's
features are known with its presence out; caps/remote-known (user, remote full JID, features).
Ad-hoc commands: adhoc/execute (iq, command element, requester bare JID: an awaitable of the
<command/> answer) for a node adhoc.py does not have itself (admin_adhoc.py, XEP-0133).
Lifecycle: server-started, server-stopping, tls-reloaded (TLSConfig: new connections get these
certificates; fired by Server.reload_tls, see server/ctl.py).
Registration (register.py, invites.py): c2s/pre-auth-features (stream: elements for the
features before SASL), c2s/pre-auth-iq (stream, iq: XEP-0077/XEP-0445 before SASL; a reply or
an awaitable of one), account-registered (jid, invitation or None), disco/server-info
(query, stanza, origin: XEP-0128 forms in the server's disco#info, e.g. XEP-0157).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_KINDS = "__presenced_stanza_kinds__"
_KIND_CHAINS = 16  # chains kept per event; kinds are stanza tags, a handful


def stanza_kinds(*tags: str) -> Callable[[F], F]:
    """Marks a handler (of filter/user) that looks at stanzas with these tags only, e.g.
    ``@stanza_kinds(st.PRESENCE)`` under ``@hook("filter/user")``: `Hooks.chain(event, tag)`
    leaves it out for the others, so a message does not pay for presence filters. The handler
    must return None for the kinds it leaves out (whoever runs the whole chain still calls
    it)."""
    def mark(fn: F) -> F:
        fn.__dict__[_KINDS] = frozenset(tags)
        return fn
    return mark


class Hooks:
    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[int, Callable[..., Any]]]] = {}
        self._chains: dict[str, tuple[Callable[..., Any], ...]] = {}
        # event -> stanza kind -> its chain, filled on demand (by_kind() hands out the dicts)
        self._kind_chains: dict[str, dict[object, tuple[Callable[..., Any], ...]]] = {}

    def add(self, event: str, handler: Callable[..., Any], priority: int = 0) -> None:
        handlers = self._handlers.setdefault(event, [])
        handlers.append((priority, handler))
        handlers.sort(key=lambda item: -item[0])  # stable: equal priorities keep load order
        self._chains[event] = tuple(h for _, h in handlers)
        kinds = self._kind_chains.get(event)
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
        for handler in self._chains.get(event, ()):
            result = handler(*args)
            if result is not None:
                return result
        return None

    def fire_all(self, event: str, *args: Any) -> list[Any]:
        """Call every handler (notifications); returns their non-None results (awaitables)."""
        results = []
        for handler in self._chains.get(event, ()):
            result = handler(*args)
            if result is not None:
                results.append(result)
        return results
