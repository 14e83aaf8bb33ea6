"""Client State Indication (XEP-0352, urn:xmpp:csi:0): a client whose screen is off says
``<inactive/>``, and the server holds back what can wait until it says ``<active/>``.

While a session is inactive its gate (server/sessions.py `Gate`) holds *unimportant* stanzas:
presence updates (available and unavailable; of each contact resource only the latest is kept),
chat states and other bodyless messages (receipts, markers, PEP events), headlines, and
groupchat messages that do not mention the user's nickname in that room. Anything else is
*important* — a message with a body, a subject or an encrypted payload, a MUC mention, an
invitation, an iq, a subscription request, an error — and goes out at once, after everything
held, in order. ``<active/>`` delivers everything held, in order; so does a full buffer
(``max_held`` stanzas). Held stanzas are not sent yet, so stream management counts them when
they are delivered; each carries a XEP-0203 ``<delay/>`` saying when it was held. Held stanzas
of a session that ends are dropped: none of them is a message anyone would miss (and none is
ever stored offline).

    [csi]
    max_held = 100   # stanzas held per inactive session; when full, all of them go out
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from server import events
from server.config import int_option
from server.events import stanza_kinds
from server.jid import JID
from server.module import Module, SessionSlot, Stanza, hook, nonza, stream_feature
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.csi")

CSI = "urn:xmpp:csi:0"
ACTIVE, INACTIVE = ns.q(CSI, "active"), ns.q(CSI, "inactive")
_SUBJECT = ns.q(ns.CLIENT, "subject")
_DELAY = ns.q(ns.DELAY, "delay")
_CARBONS = ("{urn:xmpp:carbons:2}sent", "{urn:xmpp:carbons:2}received")
_FORWARDED_MESSAGE = f"{{urn:xmpp:forward:0}}forwarded/{st.MESSAGE}"
_MUC = "{http://jabber.org/protocol/muc}x"
# Payloads that make a message important though it has no body.
_IMPORTANT = frozenset({
    "{eu.siacs.conversations.axolotl}encrypted",   # OMEMO
    "{urn:xmpp:omemo:2}encrypted",
    "{urn:xmpp:openpgp:0}openpgp",                 # XEP-0373
    "{urn:xmpp:eme:0}encryption",                  # XEP-0380
    "{jabber:x:conference}x",                      # XEP-0249 invitation
    "{http://jabber.org/protocol/muc#user}x",      # mediated invitation (XEP-0045 §7.8.2)
})
_JINGLE_MESSAGE = ("urn:xmpp:jingle-message:0", "urn:xmpp:jingle-message:1")


@dataclass(frozen=True, slots=True, kw_only=True)
class CsiSettings:
    # Stanzas held per inactive session; when the buffer is full, everything held goes out.
    max_held: int = field(metadata=int_option(1, 10000, 100))


def important(stanza: Stanza, rooms: dict[str, str] | None) -> bool:
    """Must this stanza reach an inactive client now? rooms: bare room JID -> our nickname."""
    tag = stanza.tag
    if tag == st.PRESENCE:
        # Updates (available, unavailable) wait; subscriptions, probes and errors do not.
        return stanza.get("type") not in (None, "unavailable")
    if tag != st.MESSAGE:
        return True  # iqs: someone waits for the answer
    kind = stanza.get("type")
    if kind == "error":
        return True
    if kind == "headline":
        return False  # ephemeral by definition (and how PEP events come)
    for carbon in _CARBONS:  # a carbon is as important as the message it carries
        wrapper = stanza.find(carbon)
        if wrapper is not None:
            inner = wrapper.find(_FORWARDED_MESSAGE)
            if inner is not None:
                return important(inner, rooms)
    body = None
    for part in stanza:
        part_tag = part.tag
        if not isinstance(part_tag, str):
            continue
        if part_tag == st.BODY:
            body = part.text or ""
        elif (part_tag == _SUBJECT or part_tag in _IMPORTANT
              or part_tag[1:part_tag.find("}")] in _JINGLE_MESSAGE):
            return True
    if body is None:
        return False  # chat states, receipts, markers, PEP events
    if kind != "groupchat":
        return True
    # A room's chatter waits; a mention of our nickname there does not.
    if not rooms:
        return False
    room = (stanza.get("from") or "").partition("/")[0]
    nick = rooms.get(room)
    return nick is not None and nick != "" and nick in body


def _delayed(stanza: Stanza, by: str) -> Stanza:
    """A copy saying when it was held (XEP-0203), as Prosody's mod_csi_simple does: the
    client learns when a contact's presence changed, not when the screen came on."""
    kept = st.standalone(stanza)
    now = datetime.now(UTC)
    st.child(kept, _DELAY, {"from": by, "stamp": f"{now:%Y-%m-%dT%H:%M:%S}."
                                                  f"{now.microsecond // 1000:03d}Z"})
    return kept


class CsiGate:
    """An inactive session's gate: holds unimportant stanzas, in order."""

    __slots__ = ("held", "max_held", "module", "numbers", "session")

    def __init__(self, module: ClientState, session: Session, max_held: int) -> None:
        self.module = module
        self.session = session
        self.max_held = max_held
        # Insertion-ordered: presence keyed by its sender (a later one replaces it and moves to
        # the end), everything else by a number of its own.
        self.held: dict[object, Stanza] = {}
        self.numbers = itertools.count()

    def hold(self, stanza: Stanza) -> bool:
        if important(stanza, self.module.rooms.get(self.session)):
            if self.held:
                self.flush()
            return False
        held = self.held
        if stanza.tag == st.PRESENCE:
            key: object = stanza.get("from")
            held.pop(key, None)
        else:
            key = next(self.numbers)
        held[key] = _delayed(stanza, self.session.bare_str)
        if len(held) >= self.max_held:
            log.info("event=csi-buffer-full jid=%s count=%d", self.session.jid_str, len(held))
            self.flush()
        return True

    def flush(self) -> None:
        held = list(self.held.values())
        self.held.clear()
        deliver = self.session.deliver
        for stanza in held:
            deliver(stanza)


class ClientState(Module):
    name = "csi"
    settings = CsiSettings
    # bare room JID -> the nickname this session joined with (for mentions)
    rooms = SessionSlot[dict[str, str] | None](None)

    @stream_feature
    def feature(self) -> Stanza:
        return st.element(ns.q(CSI, "csi"))

    @hook(events.BIND2_FEATURES)
    def bind2_features(self) -> tuple[str, ...]:
        return (CSI,)

    @hook(events.BIND2_ENABLE)
    def bind2_enable(self, session: Session, el: Stanza) -> bool | None:
        """<inactive xmlns='urn:xmpp:csi:0'/> inside Bind 2's <bind/> (XEP-0386 §3): a phone
        that logs in with its screen off."""
        if el.tag != INACTIVE:
            return None
        self.inactive(session, el)
        return True

    @nonza(INACTIVE)
    def inactive(self, session: Session, _el: Stanza) -> None:
        if not isinstance(session.gate, CsiGate):
            session.gate = CsiGate(self, session, self.config.max_held)

    @nonza(ACTIVE)
    def active(self, session: Session, _el: Stanza) -> None:
        gate = session.gate
        if isinstance(gate, CsiGate):
            session.gate = None
            gate.flush()

    @hook(events.SESSION_CLOSED)
    def closed(self, session: Session, _reason: str) -> None:
        gate = session.gate
        if isinstance(gate, CsiGate):
            session.gate = None
            if gate.held:
                log.info("event=csi-dropped jid=%s count=%d", session.jid_str, len(gate.held))
            gate.held.clear()

    @hook(events.FILTER_USER, priority=-300)
    @stanza_kinds(st.PRESENCE)
    def track_rooms(self, stanza: Stanza, origin: Session | None, to: JID) -> None:
        """Remember the nicknames a session joins rooms with (presence to room@service/nick),
        so that a mention can wake an inactive client."""
        if stanza.tag != st.PRESENCE or origin is None or to.resource is None:
            return None
        if not origin.local_client:
            return None
        kind = stanza.get("type")
        rooms = self.rooms.get(origin)
        room = str(to.bare)
        if kind is None:
            if stanza.find(_MUC) is not None or (rooms and room in rooms):
                if rooms is None:
                    rooms = {}
                    self.rooms.set(origin, rooms)
                rooms[room] = to.resource
        elif kind == "unavailable" and rooms:
            rooms.pop(room, None)
        return None

    def held(self, session: Session) -> int:
        """How many stanzas the session's gate holds (0: active)."""
        gate = session.gate
        return len(gate.held) if isinstance(gate, CsiGate) else 0
