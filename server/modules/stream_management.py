"""Stream Management (XEP-0198, urn:xmpp:sm:3): acknowledgements and resumption.

With SM enabled a session's outgoing stanzas are counted and kept until the client
acknowledges them (`<a h/>`); the server asks for an acknowledgement (`<r/>`) once
`max_unacked` are outstanding, and answers the client's `<r/>` with the number of stanzas it
handled. When the TCP connection of a resumable session is lost, the session stays bound —
contacts keep seeing it available and stanzas for it are queued — until the client resumes it
on a new connection (`<resume previd h/>`, on any listener) or `resume_timeout` passes.

With [cluster], resumption ids are known to every node and a session resumed on another node
than the one holding it moves there with its queue (server/cluster/handover.py).

Nothing is lost: when a session ends with stanzas still unacknowledged (not resumed in time, a
session that was not resumable, the server shutting down), each message goes where it would
have gone had the session been offline — another available resource of the account, else
offline storage — and each iq request is answered with an error.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from lxml import etree

from server import events
from server.config import int_option, seconds_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, Stanza, hook, nonza, pre_bind, stream_feature
from server.modules.blocking import Blocking
from server.modules.carbons import Carbons
from server.modules.csi import CsiGate
from server.sessions import Session
from server.storage.db import log_failure
from server.xml import ns
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int

if TYPE_CHECKING:
    from server.app import Server
    from server.cluster.directory import ClusterDirectory
    from server.cluster.handover import Handover
    from server.stream.c2s import C2SConnection

log = logging.getLogger("presenced.sm")
SM = "urn:xmpp:sm:3"
ENABLE, ENABLED = f"{{{SM}}}enable", f"{{{SM}}}enabled"
RESUME, RESUMED = f"{{{SM}}}resume", f"{{{SM}}}resumed"
FAILED, R, A = f"{{{SM}}}failed", f"{{{SM}}}r", f"{{{SM}}}a"
_MOD = 1 << 32  # XEP-0198 §4: h wraps at 2^32
# Ways a stream ends without the client saying goodbye: the session may be resumed.
_LOST = frozenset({"disconnected", "connection-lost", "connection-timeout", "aborted"})
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamManagementSettings:
    # How long a detached session waits for its client to resume it (seconds).
    resume_timeout: float = field(metadata=seconds_option(300))
    # Unacknowledged stanzas after which the server asks for an acknowledgement.
    max_unacked: int = field(metadata=int_option(1, 1000, 5))
    # Stanzas kept for a session at most; past it a detached session ends at once.
    max_queue: int = field(metadata=int_option(10, 100000, 1000))


class SMState:
    """One session's stream management: the session's Outbox while SM is enabled."""

    __slots__ = ("acked", "handled", "id", "module", "queue", "requested", "resumable",
                 "session", "timer")

    def __init__(self, module: StreamManagement, session: Session, resumable: bool) -> None:
        self.module = module
        self.session = session
        self.resumable = resumable
        self.id = secrets.token_urlsafe(18)
        self.handled = 0        # stanzas received from the client (h we report)
        self.acked = 0          # h the client last reported
        # Sent, not yet acknowledged, oldest first. A list, not a deque: an empty deque keeps
        # a 64-slot block (760 bytes per idle session), an emptied list frees its array, and
        # an acknowledgement drops its stanzas with one slice deletion.
        self.queue: list[Stanza] = []
        self.requested = False  # an <r/> of ours is unanswered
        self.timer: asyncio.TimerHandle | None = None

    # -- Outbox --------------------------------------------------------------------------------

    def send(self, stanza: Stanza) -> None:
        self.queue.append(stanza)
        transport = self.session.transport
        if transport is not None:
            transport.deliver(stanza)
            if not self.requested and len(self.queue) >= self.module.config.max_unacked:
                self.requested = True
                transport.write_element(_element(R))  # type: ignore[attr-defined]
        elif len(self.queue) > self.module.config.max_queue:
            log.info("event=sm-queue-full jid=%s", self.session.jid_str)
            self.module.expire(self)

    def close_detached(self, condition: str | None, text: str | None) -> None:
        self.module.expire(self)

    # -- acknowledgements ----------------------------------------------------------------------

    def ack(self, h: int) -> bool:
        """The client handled our stanzas up to h; False when h counts more than we sent."""
        newly = (h - self.acked) % _MOD
        if newly > len(self.queue):
            return False
        del self.queue[:newly]
        self.acked = h % _MOD
        self.requested = False
        return True


class StreamManagement(Module):
    name = "stream_management"
    settings = StreamManagementSettings
    features = ()
    uses = (Carbons, Blocking)  # their per-session state moves with a session (cluster)

    def __init__(self, server: ModuleContext, config: StreamManagementSettings) -> None:
        super().__init__(server, config)
        self.resumable: dict[str, SMState] = {}  # previd -> state, while it may be resumed
        # [cluster]: resumption ids known cluster-wide, sessions moving between nodes
        self.handover: Handover | None = None
        if server.config.cluster.enabled:
            self.handover = cast("ClusterDirectory", server.sessions).handover
            self.handover.give = self.give

    @stream_feature
    def feature(self) -> Stanza:
        return _element(f"{{{SM}}}sm")

    # -- enabling (XEP-0198 §3) ----------------------------------------------------------------

    @nonza(ENABLE)
    def enable(self, session: Session, el: Stanza) -> None:
        transport = session.transport
        assert transport is not None
        transport.write_element(self._enable(session, el))  # type: ignore[attr-defined]

    def _enable(self, session: Session, el: Stanza) -> Stanza:
        """<enabled/>, or <failed/> when SM is on already."""
        if session.outbox is not None:
            return _failed("unexpected-request")
        resumable = el.get("resume") in ("true", "1")
        state = SMState(self, session, resumable)
        session.outbox = state
        attrs = {"id": state.id}
        if resumable:
            self.resumable[state.id] = state
            if self.handover is not None:
                self.handover.register(state.id, session)
            attrs.update(resume="true", max=str(int(self.config.resume_timeout)))
        log.info("event=sm-enabled jid=%s resume=%s", session.jid_str, int(resumable))
        return _element(ENABLED, attrs)

    # -- inline in SASL2 / Bind 2 (XEP-0388, XEP-0386 §3.2; see server/stream/c2s.py) ----------

    @hook(events.BIND2_FEATURES)
    def bind2_features(self) -> tuple[str, ...]:
        return (SM,)

    @hook(events.BIND2_ENABLE)
    def bind2_enable(self, session: Session, el: Stanza) -> Stanza | None:
        """<enable/> inside Bind 2's <bind/>: the answer goes into <bound/>."""
        return self._enable(session, el) if el.tag == ENABLE else None

    @hook(events.SASL2_RESUME)
    def sasl2_resume(self, stream: C2SConnection, el: Stanza) -> Any:
        """<resume/> inside SASL2's <authenticate/>: (<resumed/> or <failed/>, what to do once
        <success/> is out: the redelivery); None when the stream was closed (h too high). With
        [cluster], a session held by another node is taken over first, as for <resume/>
        (XEP-0388 §2.6 with XEP-0198 §5): then an awaitable of that answer."""
        if self.handover is not None and el.get("previd", "") not in self.resumable:
            return self._sasl2_resume_from_another_node(stream, el)
        return self._sasl2_answer(stream, el)

    async def _sasl2_resume_from_another_node(
            self, stream: C2SConnection,
            el: Stanza) -> tuple[Stanza, Callable[[], None] | None] | None:
        await self._take_over(stream, el)
        if stream.closing:
            return None
        return self._sasl2_answer(stream, el)

    def _sasl2_answer(self, stream: C2SConnection,
                      el: Stanza) -> tuple[Stanza, Callable[[], None] | None] | None:
        answer, state = self._resume(stream, el)
        if answer is None:
            return None
        if state is None:
            return answer, None
        return answer, lambda: self._redeliver(stream, state)

    @pre_bind(ENABLE)
    def enable_before_bind(self, stream: C2SConnection, _el: Stanza) -> None:
        # XEP-0198 §3: only after resource binding.
        stream.write_element(_failed("unexpected-request"))

    # -- acks (XEP-0198 §4) --------------------------------------------------------------------

    @nonza(R)
    def request(self, session: Session, _el: Stanza) -> None:
        state = session.outbox
        transport = session.transport
        if not isinstance(state, SMState) or transport is None:
            self._not_enabled(session)
            return
        answer = _element(A, {"h": str(state.handled % _MOD)})
        # An acknowledged stanza is one the client need never send again: what storage still
        # has to commit for it (the archive's group commit) must be durable first.
        pending = self.server.hooks.notify_nowait(events.DURABILITY_BARRIER, session)
        if not pending:
            transport.write_element(answer)  # type: ignore[attr-defined]
            return

        async def answer_when_durable() -> None:
            await asyncio.gather(*pending)
            if session.transport is transport:
                transport.write_element(answer)  # type: ignore[attr-defined]
        self.server.router.spawn(answer_when_durable())

    @nonza(A)
    def answer(self, session: Session, el: Stanza) -> None:
        state = session.outbox
        if not isinstance(state, SMState):
            self._not_enabled(session)
            return
        h = _h(el)
        if h is None:
            session.close("invalid-xml", "<a/> needs a numeric 'h'")
            return
        if not state.ack(h):
            # XEP-0198 §4: acknowledging more than was sent ends the stream.
            sent = (state.acked + len(state.queue)) % _MOD
            _close_too_high(session.transport, h, sent)

    def _not_enabled(self, session: Session) -> None:
        session.close("unsupported-stanza-type", "stream management is not enabled")

    # -- resumption (XEP-0198 §5) --------------------------------------------------------------

    @hook(events.SESSION_DETACHED)
    def detached(self, session: Session, reason: str) -> Any:
        state = session.outbox
        if not isinstance(state, SMState) or not state.resumable or reason not in _LOST:
            return None  # ends now; session-closed deals with what is unacknowledged
        state.requested = False
        state.timer = self.server.loop.call_later(self.config.resume_timeout, self.expire, state)
        log.info("event=sm-detached jid=%s unacked=%d", session.jid_str, len(state.queue))
        return True

    @pre_bind(RESUME)
    def resume(self, stream: C2SConnection, el: Stanza) -> None:
        if self.handover is not None and el.get("previd", "") not in self.resumable:
            self.server.router.spawn(self._resume_from_another_node(stream, el))
            return
        self._resume_here(stream, el)

    def _resume_here(self, stream: C2SConnection, el: Stanza) -> None:
        answer, state = self._resume(stream, el)
        if answer is not None:
            stream.write_element(answer)
        if state is not None:
            self._redeliver(stream, state)

    def _resume(self, stream: C2SConnection,
                el: Stanza) -> tuple[Stanza | None, SMState | None]:
        """Attach the session to the stream: (<resumed/>, its state); (<failed/>, None); or
        (None, None) when the stream was closed."""
        previd, h = el.get("previd", ""), _h(el)
        state = self.resumable.get(previd)
        negotiation = stream.negotiation
        if state is not None:
            owner = state.session.jid
            if (owner.local, owner.domain) != (negotiation.user, negotiation.domain):
                state = None  # another account's session: as if it did not exist
        if state is None or h is None:
            # §5: the client may bind a new resource instead.
            return _failed("item-not-found"), None
        if not state.ack(h):
            sent = (state.acked + len(state.queue)) % _MOD
            _close_too_high(stream, h, sent)
            return None, None
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        session = state.session
        old = session.transport
        session.transport = None
        stream.attach(session)
        if old is not None:  # the old connection is still there (it did not notice yet)
            old.close("conflict", "the session was resumed on another stream")
        return _element(RESUMED, {"previd": previd, "h": str(state.handled % _MOD)}), state

    # -- resumption on another node of a cluster (server/cluster/handover.py) ------------------

    async def _resume_from_another_node(self, stream: C2SConnection, el: Stanza) -> None:
        """The session is held by another node: take it over, then resume it here."""
        await self._take_over(stream, el)
        if not stream.closing:
            self._resume_here(stream, el)

    async def _take_over(self, stream: C2SConnection, el: Stanza) -> None:
        """The session <resume/> names, held by another node, moved here (detached, resumable)
        when that node gives it up; nothing when no live node holds it."""
        assert self.handover is not None
        negotiation = stream.negotiation
        previd = el.get("previd", "")
        taken = None
        if _h(el) is not None and previd:
            taken = await self.handover.take(previd, f"{negotiation.user}@{negotiation.domain}")
        if taken is not None:
            try:
                self._restore(previd, taken)  # detached here: resumable if this stream died
            except StanzaError as exc:  # e.g. resource-constraint: as if it were not resumed
                log.info("event=sm-handover-refused jid=%s condition=%s", taken.get("j"),
                         exc.condition)
                self.server.router.spawn(self._rescue(
                    Session(JID.parse(taken["j"]), None),
                    [etree.fromstring(x, _PARSER) for x in taken["q"]]))

    def give(self, previd: str, bare: str) -> dict[str, Any] | None:
        """Another node resumes this session: it leaves this node, as it is, in one step (no
        unavailable presence: it goes on there). Its state, or None when there is no such
        resumable session of that account here."""
        state = self.resumable.get(previd)
        if state is None or state.session.bare_str != bare:
            return None
        session = state.session
        del self.resumable[previd]
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        old = session.transport
        session.transport = None  # so that the old stream's end does not end the session
        if old is not None:  # the old connection is still there (it did not notice yet)
            old.close("conflict", "the session was resumed on another node")
        queue = list(state.queue)
        gate = session.gate
        if isinstance(gate, CsiGate):  # held back (XEP-0352): sent after the queue
            queue.extend(gate.held.values())
            gate.held.clear()
            session.gate = None
        carbons = self.server.module(Carbons)
        blocking = self.server.module(Blocking)
        moved = {
            "j": session.jid_str, "p": session.priority, "r": int(session.interested),
            "x": etree.tostring(session.presence, encoding="unicode")
            if session.presence is not None else "",
            "d": [str(j) for j in session.directed or ()],
            "h": state.handled, "a": state.acked,
            "q": [etree.tostring(s, encoding="unicode") for s in queue],
            "c": int(carbons is not None and carbons.enabled.get(session)),
            "b": int(blocking is not None and blocking.interested.get(session)),
        }
        if carbons is not None:
            carbons.turn_off(session)
        session.outbox = None
        state.queue.clear()
        cast("ClusterDirectory", self.server.sessions).release(session)
        log.info("event=sm-handed-over jid=%s queued=%d", session.jid_str, len(queue))
        return moved

    def _restore(self, previd: str, moved: dict[str, Any]) -> None:
        """A session taken over from another node: bound here, detached, resumable."""
        full = JID.parse(moved["j"])
        assert full.local is not None and full.resource is not None
        session = Session(JID.from_parts(full.local, full.domain), None)
        session.priority = int(moved["p"])
        session.interested = bool(moved["r"])
        session.presence = etree.fromstring(moved["x"], _PARSER) if moved["x"] else None
        session.directed = {JID.parse(j) for j in moved["d"]} or None
        assert self.handover is not None
        self.handover.arriving(session, moved["s"])
        self.server.sessions.bind(session, full.resource)
        state = SMState(self, session, True)
        state.id = previd
        state.handled, state.acked = int(moved["h"]), int(moved["a"])
        state.queue.extend(etree.fromstring(x, _PARSER) for x in moved["q"])
        session.outbox = state
        carbons = self.server.module(Carbons)
        if moved.get("c") and carbons is not None:
            carbons.turn_on(session)
        blocking = self.server.module(Blocking)
        if moved.get("b") and blocking is not None:
            blocking.interested.set(session, True)
        self.resumable[previd] = state
        assert self.handover is not None
        self.handover.register(previd, session)
        state.timer = self.server.loop.call_later(self.config.resume_timeout, self.expire, state)
        for pending in self.server.hooks.notify_nowait(events.SESSION_BOUND, session):
            self.server.router.spawn(pending)

    def _redeliver(self, stream: C2SConnection, state: SMState) -> None:
        for stanza in state.queue:  # §5: everything the client did not acknowledge, again
            stream.deliver(stanza)
        state.requested = False
        log.info("event=sm-resumed jid=%s redelivered=%d", state.session.jid_str,
                 len(state.queue))

    def expire(self, state: SMState) -> None:
        """A detached session was not resumed in time (or cannot wait any longer): it ends."""
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        self._unregister(state)
        session = state.session
        if session.transport is None:
            self.server.end_session(session, "resume-timeout")

    # -- the end of a session: nothing unacknowledged is lost ----------------------------------

    @hook(events.SESSION_CLOSED, priority=100)
    def closed(self, session: Session, _reason: str) -> Any:
        state = session.outbox
        if not isinstance(state, SMState):
            return None
        self._unregister(state)
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        session.outbox = None
        unacked = list(state.queue)
        state.queue.clear()
        if not unacked:
            return None
        return self._rescue(session, unacked)

    def _unregister(self, state: SMState) -> None:
        if self.resumable.pop(state.id, None) is not None and self.handover is not None:
            self.handover.forget(state.id)

    async def _rescue(self, session: Session, unacked: list[Stanza]) -> None:
        """What the closed session never acknowledged, handed on once: a message goes to the
        account's other available resources that have not had it, or to offline storage when
        there are none; an iq request is answered with an error. Delivered directly, not
        routed again: the message passed blocking, the archive and carbons when it first came
        (routing it again archived it twice and copied it twice)."""
        hooks = self.server.hooks
        account = session.jid.bare
        others = [s for s in self.server.sessions.resources(account)
                  if s is not session and s.presence is not None and s.priority >= 0]
        rescued = 0
        for stanza in unacked:
            tag, type_ = stanza.tag, stanza.get("type")
            pending: Any = None
            if tag == st.MESSAGE:
                if type_ in ("error", "groupchat", "headline"):
                    continue  # never answered, not for offline storage (RFC 6121 §8.5.2)
                if _a_copy(stanza):
                    continue  # a carbon or an archive result: the original is elsewhere
                if others:
                    if _to_bare(stanza):
                        continue  # sent to the bare JID: the other resources got it too
                    # To this full JID: the account's resources with carbons on had a
                    # <received/> copy (XEP-0280 §5), and its sender has it.
                    have = {id(s) for copies in hooks.collect(events.MESSAGE_COPIED_TO, stanza,
                                                               session) for s in copies}
                    sender = stanza.get("from")
                    rest = [s for s in others if id(s) not in have and s.jid_str != sender]
                    if not rest:
                        continue
                    for other in rest:
                        other.send(stanza)
                else:
                    pending = hooks.fire(events.MESSAGE_OFFLINE, stanza, None, account)
                    if pending is None:
                        continue  # no offline storage: the archive has it, if anything
            elif tag == st.IQ and type_ in ("get", "set"):
                pending = self.server.router.route(st.error_reply(stanza, StanzaError(
                    "service-unavailable", "the recipient's session ended")), None)
            else:
                continue  # presence: a later login gets current presence anyway
            rescued += 1
            if pending is not None and not isinstance(pending, bool):
                try:
                    await pending
                except StanzaError as exc:  # e.g. offline storage full
                    log.info("event=sm-rescue-refused jid=%s condition=%s", session.jid_str,
                             exc.condition)
                except Exception:
                    log_failure(log, "event=sm-rescue-failed jid=%s", session.jid_str)
        log.info("event=sm-unacked-rescued jid=%s count=%d", session.jid_str, rescued)

    @hook(events.SERVER_STOPPING)
    def stopping(self, _server: Server) -> None:
        # Graceful shutdown: detached sessions end as if they had timed out (their unacked
        # messages go to offline storage while storage is still open).
        for state in list(self.resumable.values()):
            if state.session.transport is None:
                self.expire(state)


def _element(tag: str, attrs: dict[str, str] | None = None) -> Stanza:
    return etree.Element(tag, attrs or {}, nsmap={None: SM})


def _failed(condition: str) -> Stanza:
    failed = _element(FAILED)
    etree.SubElement(failed, ns.q(ns.STANZA_ERRORS, condition), nsmap={None: ns.STANZA_ERRORS})
    return failed


def _h(el: Stanza) -> int | None:
    try:  # XEP-0198 §4: an unsignedInt (mod 2^32)
        return parse_int(el.get("h"), maximum=_MOD - 1, name="h")
    except NumberError:
        return None


_COPIES = frozenset({ns.q("urn:xmpp:carbons:2", "sent"), ns.q("urn:xmpp:carbons:2", "received"),
                     ns.q("urn:xmpp:mam:2", "result"), ns.q("urn:xmpp:mam:1", "result")})


def _a_copy(stanza: Stanza) -> bool:
    """A carbon copy (XEP-0280) or an archive query result (XEP-0313): made for this session
    only, its original delivered or archived already."""
    return any(child.tag in _COPIES for child in stanza)


def _to_bare(stanza: Stanza) -> bool:
    try:
        return JID.parse(stanza.get("to") or "").resource is None
    except InvalidJID:
        return False


def _close_too_high(stream: Any, h: int, sent: int) -> None:
    if stream is None:
        return
    log.info("event=sm-handled-count-too-high h=%d sent=%d", h, sent)
    stream.close("undefined-condition", f"h={h} acknowledges more than the {sent} sent "
                 "(XEP-0198 handled-count-too-high)")
