"""route(stanza, origin): to local sessions, server handlers, federation or an error reply.

Stanzas arrive here with a trustworthy 'from' (stamped by the stream they came on).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeAlias

from lxml import etree

from server.errors import StanzaError
from server.hooks import Hooks
from server.jid import JID, InvalidJID
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.module import Handler
    from server.sessions import Session, SessionManager

log = logging.getLogger("presenced.router")
_Element: TypeAlias = etree._Element


class Router:
    def __init__(self, hosts: frozenset[str], sessions: SessionManager, hooks: Hooks) -> None:
        self.hosts = hosts
        self.sessions = sessions
        self.hooks = hooks
        self._iq: dict[tuple[str, str, str], Handler] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def add_iq_handler(self, type_: str, target: str, xmlns: str, handler: Handler) -> None:
        key = (type_, target, xmlns)
        if key in self._iq:
            raise ValueError(f"two handlers for iq {key}")
        self._iq[key] = handler

    # -- entry point -------------------------------------------------------------------------

    def route(self, stanza: _Element, origin: Session | None) -> Awaitable[None] | None:
        """Route one stanza. Returns an awaitable when handling goes on asynchronously; the
        caller awaits it before the next stanza from the same origin (keeps per-stream order)."""
        try:
            result = self._route(stanza, origin)
        except StanzaError as err:
            self.reply_error(stanza, err, origin)
            return None
        except Exception:
            self._internal_error(stanza, origin)
            return None
        if result is None or result is True:
            return None
        if etree.iselement(result):
            self.reply(result, origin)
            return None
        if inspect.isawaitable(result):
            return self._finish(result, stanza, origin)
        return None

    async def _finish(self, pending: Awaitable[Any], stanza: _Element,
                      origin: Session | None) -> None:
        try:
            result = await pending
        except StanzaError as err:
            self.reply_error(stanza, err, origin)
            return
        except Exception:
            self._internal_error(stanza, origin)
            return
        if etree.iselement(result):
            self.reply(result, origin)

    def spawn(self, pending: Awaitable[None]) -> None:
        """Run an awaitable route result in the background (origins with no stream order)."""
        task = asyncio.ensure_future(pending)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for background work (used at shutdown so nothing accepted is lost)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- dispatch ----------------------------------------------------------------------------

    def _route(self, stanza: _Element, origin: Session | None) -> Any:
        tag = stanza.tag
        to = stanza.get("to")
        if to is None:
            if origin is None:
                return None
            if tag == st.PRESENCE:
                return self.hooks.fire("presence/broadcast", stanza, origin)
            # RFC 6120 §10.3.3: no 'to' means the sender's own account.
            jid = origin.jid.bare
        else:
            try:
                jid = JID.parse(to)
            except InvalidJID as exc:
                raise StanzaError("jid-malformed", f"invalid 'to': {exc}") from exc
        # Filters (e.g. blocking, XEP-0191) see every stanza addressed to a user, local or
        # remote, before delivery: one returning non-None has consumed the stanza, one raising
        # StanzaError bounces it.
        if jid.local is not None and self.hooks.has("filter/user"):
            consumed = self.hooks.fire("filter/user", stanza, origin, jid)
            if consumed is not None:
                return consumed
        if jid.domain not in self.hosts:
            result = self.hooks.fire("route/remote", stanza, origin, jid)
            if result is None:
                raise StanzaError("remote-server-not-found", f"no route to {jid.domain}")
            return result
        if jid.local is None:
            kind = "host"
        elif jid.resource is None:
            kind = "bare"
        else:
            kind = "full"
        if tag == st.IQ:
            return self._route_iq(stanza, origin, jid, kind)
        if tag == st.MESSAGE:
            result = self.hooks.fire("message/" + kind, stanza, origin, jid)
            if result is None and not _no_error_reply(stanza):
                raise StanzaError("service-unavailable")
            return result
        if tag == st.PRESENCE:
            return self.hooks.fire("presence/" + kind, stanza, origin, jid)
        raise StanzaError("bad-request", "unknown stanza kind")

    def _route_iq(self, stanza: _Element, origin: Session | None, jid: JID, kind: str) -> Any:
        type_ = stanza.get("type")
        if type_ in ("get", "set"):
            if stanza.get("id") is None:
                raise StanzaError("bad-request", "an iq needs an 'id' (RFC 6120 §8.2.3)")
            if kind == "full":
                session = self.sessions.get(jid)
                if session is not None:
                    session.send(stanza)
                    return True
                # RFC 6121 §8.5.3.2.1 (via §8.5.3): no such resource online.
                result = self.hooks.fire("iq/full", stanza, origin, jid)
                if result is None:
                    raise StanzaError("service-unavailable")
                return result
            payload = st.payload(stanza)
            if payload is None:
                raise StanzaError("bad-request", "an iq get/set carries exactly one child element")
            xmlns = etree.QName(payload).namespace or ""
            if kind == "bare" and origin is not None and origin.jid.bare == jid:
                kind = "self"
            handler = self._iq.get((type_, kind, xmlns))
            if handler is None and kind == "self":
                handler = self._iq.get((type_, "bare", xmlns))
            if handler is not None:
                return handler(stanza, origin)
            event = "iq/" + ("bare" if kind == "self" else kind)
            result = self.hooks.fire(event, stanza, origin, jid)
            if result is None:
                raise StanzaError("service-unavailable")
            return result
        if type_ in ("result", "error"):
            # RFC 6120 §8.2.3: never answer a result or error; deliver it or drop it.
            if kind == "full":
                session = self.sessions.get(jid)
                if session is not None:
                    session.send(stanza)
                    return True
            return self.hooks.fire("iq-response", stanza, origin, jid) or True
        raise StanzaError("bad-request", "iq type must be get, set, result or error")

    # -- replies -----------------------------------------------------------------------------

    def reply(self, reply: _Element, origin: Session | None) -> None:
        """Send a server-generated answer back towards the stanza's sender."""
        if origin is not None and reply.get("to") in (None, str(origin.jid)):
            origin.send(reply)
            return
        pending = self.route(reply, None)
        if pending is not None:
            self.spawn(pending)

    def reply_error(self, stanza: _Element, err: StanzaError, origin: Session | None) -> None:
        # RFC 6120 §8.3.1: never answer an error with an error.
        if st.is_error(stanza):
            return
        self.reply(st.error_reply(stanza, err), origin)

    def _internal_error(self, stanza: _Element, origin: Session | None) -> None:
        log.exception("event=handler-failed id=%s from=%s to=%s", stanza.get("id"),
                      stanza.get("from"), stanza.get("to"))
        self.reply_error(stanza, StanzaError("internal-server-error"), origin)


def _no_error_reply(stanza: _Element) -> bool:
    # RFC 6121 §8.5.2.1.1 / §8.5.4: errors are never answered; headline and groupchat are dropped.
    return stanza.get("type") in ("error", "headline", "groupchat")
