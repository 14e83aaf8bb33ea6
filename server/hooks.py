"""Events by name, handlers by priority (higher first), as in Prosody's module:hook.

Names used by the core:
  message/{host,bare,full}, presence/{host,bare,full}, presence/broadcast (no 'to' from a
  client), iq/{bare,full} (iq to an account or resource that no iq handler took),
  route/remote (a stanza for a domain we do not host), filter/user (every stanza addressed to a
  user, local or remote, before delivery; args (stanza, origin, to)), session-bound, session-closed,
  server-started, server-stopping.
A handler returning anything but None stops the chain; that value is what fire() returns.
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
