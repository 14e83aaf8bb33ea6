"""Feature modules: one file per feature says what it handles (see DESIGN.md rule 1).

    module = Module("ping")
    module.feature(ns.PING)

    @module.iq_get(ns.PING, to=("host", "bare"))
    def ping(stanza, session):
        return stanza_result(stanza)

A handler gets (stanza, origin) and may return a reply element, None, or an awaitable of
either; raising StanzaError answers the stanza with that error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from lxml.etree import _Element

if TYPE_CHECKING:
    from server.app import Server

Stanza: TypeAlias = _Element


Handler = Callable[..., "_Element | Awaitable[_Element | None] | None"]
# Who an iq is addressed to: the server's domain, an account's bare JID (the sender's own, or
# another's), or absent `to` from a client (RFC 6120 §10.3.3: handled for the sender's account).
TARGETS = ("host", "self", "bare")


@dataclass
class Module:
    name: str
    iq_handlers: list[tuple[str, str, str, Handler]] = field(default_factory=list)
    event_handlers: list[tuple[str, int, Callable[..., Any]]] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    stream_features: list[Callable[[Any], _Element | None]] = field(default_factory=list)
    loaders: list[Callable[[Server], Any]] = field(default_factory=list)
    server: Server | None = None

    def feature(self, *names: str) -> None:
        """Disco features (XEP-0030) this module provides."""
        self.features.extend(names)

    def iq(self, type_: str, xmlns: str,
           to: Iterable[str] = ("host",)) -> Callable[[Handler], Handler]:
        targets = tuple(to)
        for target in targets:
            if target not in TARGETS:
                raise ValueError(f"unknown iq target {target!r}")

        def register(handler: Handler) -> Handler:
            for target in targets:
                self.iq_handlers.append((type_, target, xmlns, handler))
            return handler

        return register

    def iq_get(self, xmlns: str, to: Iterable[str] = ("host",)) -> Callable[[Handler], Handler]:
        return self.iq("get", xmlns, to)

    def iq_set(self, xmlns: str, to: Iterable[str] = ("host",)) -> Callable[[Handler], Handler]:
        return self.iq("set", xmlns, to)

    def on(self, event: str,
           priority: int = 0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Hook an event (see server/hooks.py for the names)."""

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self.event_handlers.append((event, priority, handler))
            return handler

        return register

    def stream_feature(
            self, fn: Callable[[Any], _Element | None]) -> Callable[[Any], _Element | None]:
        """A c2s stream feature offered after resource binding (e.g. roster versioning)."""
        self.stream_features.append(fn)
        return fn

    def on_load(self, fn: Callable[[Server], Any]) -> Callable[[Server], Any]:
        """Called once with the server when it starts (may be async)."""
        self.loaders.append(fn)
        return fn
