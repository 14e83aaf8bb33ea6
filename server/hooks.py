"""Events by name, handlers by priority (higher first), as in Prosody's module:hook.

A handler returning anything but None stops a fire() chain; that value is what fire() returns.
fire_all() calls every handler (notifications) and returns their non-None results.

Routing: message/{host,bare,full}, presence/{host,bare,full}, iq/{bare,full} (an iq no handler
took), iq-response, presence/broadcast (no 'to' from a client), route/remote (a domain we do not
host), filter/user (every stanza addressed to a user, local or remote, before delivery: stanza,
origin, to; each filter once, an awaitable of None lets it pass), message/offline,
message/delivered (stanza, account, sessions: carbons, push), presence/outgoing,
presence/fetched, presence/available, presence/unavailable.
Sessions: session-bound, session-closed (session, reason), session-detached (the stream is
gone; True keeps the session bound for a resumption, XEP-0198), durability-barrier (session:
awaitables of writes still to commit, awaited before an XEP-0198 <a/>), auth-failed.
SASL2 and Bind 2 (XEP-0388/0386/0484): bind2/features, bind2/enable (session, element),
sasl2/resume (stream, element), fast/verify, fast/issue.
Discovery and access: disco/node, disco/account-info (query, stanza, origin),
access/may-see-presence, access/deny, watchers/list.
Lifecycle: server-started, server-stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Hooks:
    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[int, Callable[..., Any]]]] = {}
        self._chains: dict[str, tuple[Callable[..., Any], ...]] = {}

    def add(self, event: str, handler: Callable[..., Any], priority: int = 0) -> None:
        handlers = self._handlers.setdefault(event, [])
        handlers.append((priority, handler))
        handlers.sort(key=lambda item: -item[0])  # stable: equal priorities keep load order
        self._chains[event] = tuple(h for _, h in handlers)

    def chain(self, event: str) -> tuple[Callable[..., Any], ...]:
        """The handlers of an event, highest priority first."""
        return self._chains.get(event, ())

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
