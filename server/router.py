"""route(stanza, origin): to local sessions, server handlers, federation or an error reply.

Stanzas arrive here with a trustworthy 'from' (stamped by the stream they came on).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from lxml import etree

from server.errors import StanzaError
from server.events import Hooks
from server.jid import JID, InvalidJID
from server.storage.db import StorageUnavailable
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.module import Handler
    from server.sessions import Session, SessionDirectory

log = logging.getLogger("presenced.router")
_Element: TypeAlias = etree._Element
_STORAGE_DOWN = "storage is unavailable; try again later"
_MESSAGE_EVENTS = {kind: f"message/{kind}" for kind in ("host", "bare", "full")}
_PRESENCE_EVENTS = {kind: f"presence/{kind}" for kind in ("host", "bare", "full")}


class Router:
    def __init__(self, hosts: frozenset[str], sessions: SessionDirectory, hooks: Hooks) -> None:
        self.hosts = hosts          # user domains
        self.sessions = sessions
        self.hooks = hooks
        # Service hosts (muc.<domain>, a component's domain): domain -> its route function.
        self.services: dict[str, Callable[[_Element, Session | None, JID], Any]] = {}
        self._iq: dict[tuple[str, str, str, str], Handler] = {}
        self._iq_namespaces: set[tuple[str, str, str]] = set()  # (type, target, xmlns) handled
        self._tasks: set[asyncio.Task[Any]] = set()
        self._filters = hooks.by_kind("filter/user")  # stanza tag -> its filter chain
        # deliver_in_order: stanzas to a session that wait behind one held up by a filter
        self._backlogs: dict[JID, list[_Element]] = {}
        # [cluster]: looks an account up again in the shared directory, whose replica here may
        # lag a session bound on another node a moment ago (server/cluster/directory.py);
        # None in a single process, where a miss is final and nothing awaits.
        self.miss: Callable[[JID], Awaitable[None]] | None = None

    def add_iq_handler(self, type_: str, target: str, xmlns: str, name: str,
                       handler: Handler) -> None:
        """Handle iqs of this type to this target whose payload is <name xmlns=xmlns/>."""
        key = (type_, target, xmlns, name)
        if key in self._iq:
            raise ValueError(f"two handlers for iq {key}")
        self._iq[key] = handler
        self._iq_namespaces.add((type_, target, xmlns))

    def add_service(self, domain: str,
                    route: Callable[[_Element, Session | None, JID], Any]) -> None:
        """Deliver every stanza for `domain` (host, bare and full JIDs) to `route`, which
        returns like a handler (None: no one took it, answered service-unavailable)."""
        if domain in self.hosts or domain in self.services:
            raise ValueError(f"{domain} is hosted twice")
        self.services[domain] = route

    def remove_service(self, domain: str) -> None:
        self.services.pop(domain, None)

    def is_local(self, domain: str) -> bool:
        """A user domain or a service host of ours."""
        return domain in self.hosts or domain in self.services

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

    def spawn(self, pending: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run an awaitable route result as a task that drain() waits for: storage closes
        only after every handler that started has finished."""
        task = asyncio.ensure_future(pending)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait for background work (used at shutdown so nothing accepted is lost); what is
        still running after timeout seconds (a handler stuck on an unreachable store) is
        cancelled, so that a stop always ends."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                stuck = list(self._tasks)
                log.warning("event=drain-timeout pending=%d", len(stuck))
                for task in stuck:
                    task.cancel()
                await asyncio.gather(*stuck, return_exceptions=True)
                return
            await asyncio.wait(list(self._tasks), timeout=left)

    # -- dispatch ----------------------------------------------------------------------------

    def _route(self, stanza: _Element, origin: Session | None) -> Any:
        to = stanza.get("to")
        if to is None:
            if origin is None:
                return None
            if stanza.tag == st.PRESENCE:
                return self.hooks.fire("presence/broadcast", stanza, origin)
            # RFC 6120 §10.3.3: no 'to' means the sender's own account.
            jid = origin.jid.bare
        else:
            try:
                jid = JID.parse(to)
            except InvalidJID as exc:
                raise StanzaError("jid-malformed", f"invalid 'to': {exc}") from exc
        # Filters (blocking, XEP-0191; later MAM, carbons) see every stanza addressed to a
        # user, local or remote, before delivery, each once: one returning non-None has
        # consumed the stanza, one raising StanzaError bounces it, one returning an awaitable
        # of None lets it pass once it is done (the next filters then run, not the first ones).
        tag = stanza.tag  # built anew by lxml at each access: once here
        if jid.local is not None:
            chain = self._filters.get(tag)
            if chain is None:
                chain = self.hooks.chain("filter/user", tag)
            if chain:
                return self._filter(chain, 0, stanza, origin, jid, tag)
        return self._deliver(stanza, origin, jid, tag)

    def _filter(self, chain: tuple[Callable[..., Any], ...], start: int, stanza: _Element,
                origin: Session | None, jid: JID, tag: str) -> Any:
        for index in range(start, len(chain)):
            verdict = chain[index](stanza, origin, jid)
            if verdict is None:
                continue
            if inspect.isawaitable(verdict):
                return self._filter_later(verdict, chain, index + 1, stanza, origin, jid, tag)
            return verdict
        return self._deliver(stanza, origin, jid, tag)

    async def _filter_later(self, pending: Awaitable[Any], chain: tuple[Callable[..., Any], ...],
                            start: int, stanza: _Element, origin: Session | None,
                            jid: JID, tag: str) -> Any:
        verdict = await pending
        if verdict is not None:
            return verdict
        result = self._filter(chain, start, stanza, origin, jid, tag)
        while inspect.isawaitable(result):
            result = await result
        return result

    def _deliver(self, stanza: _Element, origin: Session | None, jid: JID, tag: str,
                 looked: bool = False) -> Any:
        domain = jid.domain
        if domain not in self.hosts:
            service = self.services.get(domain)
            if service is not None:
                result = service(stanza, origin, jid)
                if result is None and not _no_error_reply(stanza) and not (
                        tag == st.IQ and stanza.get("type") in ("result", "error")):
                    raise StanzaError("service-unavailable")
                return result if result is not None else True
            result = self.hooks.fire("route/remote", stanza, origin, jid)
            if result is None:
                raise StanzaError("remote-server-not-found", f"no route to {domain}")
            return result
        if jid.local is None:
            kind = "host"
        elif jid.resource is None:
            kind = "bare"
        else:
            kind = "full"
        if self.miss is not None and not looked and kind != "host" and self._missed(
                stanza, jid, kind, tag):
            return self._look_again(stanza, origin, jid, tag)
        if tag == st.IQ:
            return self._route_iq(stanza, origin, jid, kind)
        if tag == st.MESSAGE:
            result = self.hooks.fire(_MESSAGE_EVENTS[kind], stanza, origin, jid)
            if result is None and not _no_error_reply(stanza):
                raise StanzaError("service-unavailable")
            return result
        if tag == st.PRESENCE:
            return self.hooks.fire(_PRESENCE_EVENTS[kind], stanza, origin, jid)
        raise StanzaError("bad-request", "unknown stanza kind")

    def _missed(self, stanza: _Element, jid: JID, kind: str, tag: str) -> bool:
        """[cluster] The replica finds no session this stanza could go to: to a full JID, no
        such session; a message to a bare JID, no available resource (RFC 6121 §8.5.2.1.1:
        it would go to offline storage). The shared directory is asked before giving up."""
        if kind == "full":
            return self.sessions.get(jid) is None
        if tag != st.MESSAGE or stanza.get("type") == "error":
            return False  # iqs and presence to a bare JID are the server's to answer
        return not any(s.presence is not None and s.priority >= 0
                       for s in self.sessions.resources(jid))

    async def _look_again(self, stanza: _Element, origin: Session | None, jid: JID,
                          tag: str) -> Any:
        assert self.miss is not None
        await self.miss(jid.bare)
        result = self._deliver(stanza, origin, jid, tag, looked=True)
        while inspect.isawaitable(result):
            result = await result
        return result

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
            qname = etree.QName(payload)
            xmlns, name = qname.namespace or "", qname.localname
            if kind == "bare" and origin is not None and origin.jid.bare == jid:
                kind = "self"
            handler = self._iq.get((type_, kind, xmlns, name))
            if handler is None and kind == "self":
                handler = self._iq.get((type_, "bare", xmlns, name))
            if handler is not None:
                return handler(stanza, origin)
            if (type_, kind, xmlns) in self._iq_namespaces or (
                    kind == "self" and (type_, "bare", xmlns) in self._iq_namespaces):
                # RFC 6120 §8.3.3.1: a namespace we speak, with an element it does not have.
                raise StanzaError("bad-request", f"unexpected <{name}/> in {xmlns}")
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

    # -- ordered delivery of what a service sends ----------------------------------------------

    def deliver_in_order(self, stanza: _Element, to: JID) -> None:
        """Deliver a stanza a service generates (a MUC room's presence, message or history; a
        pubsub notification) to the local session `to`, through the `filter/user` chain as
        `route` runs it (blocking, XEP-0191; CSI; MAM), and in order per recipient.

        `route` would lose the order: a filter that has to wait returns an awaitable, and the
        next stanza to the same session could overtake it (XEP-0045 §7.2.3 and §7.2.16 need
        a joiner's presences, history and subject in that order). Here, while one stanza to a
        session waits for a filter, later ones to that session wait behind it; a session with
        nothing waiting gets its stanza at once. A filter's verdict: None, on; an awaitable,
        on once it is done; anything else, consumed; StanzaError, refused — silently, since
        the service is not told (a room would take an error back as a failed delivery, status
        333). The session gone by the time the chain is done: dropped."""
        backlog = self._backlogs.get(to)
        if backlog is not None:
            backlog.append(stanza)
            return
        chain = self.hooks.chain("filter/user", stanza.tag)
        verdict, index = self._run_filters(chain, 0, stanza, to)
        if verdict is not None:
            self._backlogs[to] = []
            self.spawn(self._in_order_later(verdict, chain, index, stanza, to))

    def _run_filters(self, chain: tuple[Callable[..., Any], ...], start: int, stanza: _Element,
                     to: JID) -> tuple[Any, int]:
        """Runs the chain from `start` and sends; or returns the awaitable verdict it stopped
        at and the index to go on from ((None, 0) when done)."""
        for index in range(start, len(chain)):
            try:
                verdict = chain[index](stanza, None, to)
            except StanzaError:
                return None, 0
            if verdict is None:
                continue
            if inspect.isawaitable(verdict):
                return verdict, index + 1
            return None, 0
        session = self.sessions.get(to)
        if session is not None:
            session.send(stanza)
        elif self.miss is not None and start <= len(chain):
            # [cluster] A session bound on another node a moment ago (a room's joiner): the
            # shared directory is asked once, in order with what follows for it.
            return self.miss(to.bare), len(chain) + 1
        return None, 0

    async def _in_order_later(self, pending: Any, chain: tuple[Callable[..., Any], ...],
                              start: int, stanza: _Element, to: JID) -> None:
        backlog = self._backlogs[to]
        try:
            while True:
                try:
                    verdict = await pending
                except StanzaError:
                    verdict = False
                while verdict is None:
                    pending, start = self._run_filters(chain, start, stanza, to)
                    if pending is None:
                        break
                    try:
                        verdict = await pending
                    except StanzaError:
                        verdict = False
                # The next one waiting for this session, from the start of its chain.
                while backlog:
                    stanza = backlog.pop(0)
                    chain = self.hooks.chain("filter/user", stanza.tag)
                    pending, start = self._run_filters(chain, 0, stanza, to)
                    if pending is not None:
                        break
                else:
                    return
        finally:
            del self._backlogs[to]

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
        if isinstance(sys.exc_info()[1], StorageUnavailable):
            # The database is down or full (logged once by its Outage): try again later
            # (RFC 6120 §8.3.2 type 'wait'); a message is bounced to its sender, not lost.
            self.reply_error(stanza, StanzaError("internal-server-error", _STORAGE_DOWN,
                                                 type="wait"), origin)
            return
        log.exception("event=handler-failed id=%s from=%s to=%s", stanza.get("id"),
                      stanza.get("from"), stanza.get("to"))
        self.reply_error(stanza, StanzaError("internal-server-error"), origin)


def _no_error_reply(stanza: _Element) -> bool:
    # RFC 6121 §8.5.2.1.1 / §8.5.4: errors are never answered; headline and groupchat are dropped.
    return stanza.get("type") in ("error", "headline", "groupchat")
