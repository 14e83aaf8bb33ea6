"""Presentities and presence tuples (RFC 2778 §2.1, §5): an account's bare JID and the
presence of each of its available resources, with every extension element kept intact."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lxml import etree

from server.jid import JID
from server.sessions import Session, SessionManager
from server.xml import ns
from server.xml.numbers import parse_int
from server.xml.stanza import PRESENCE, element

_SHOW = ns.q(ns.CLIENT, "show")
_STATUS = ns.q(ns.CLIENT, "status")
_PRIORITY = ns.q(ns.CLIENT, "priority")
SHOW_VALUES = frozenset({"away", "chat", "dnd", "xa"})  # RFC 6121 §4.7.2.1


@dataclass(frozen=True, slots=True)
class PresenceTuple:
    address: JID             # the communication address: the resource's full JID
    show: str | None
    status: str | None
    priority: int
    stanza: etree._Element   # the presence as sent, other markup (caps, idle, ...) included


def tuples(presentity: JID, sessions: SessionManager) -> list[PresenceTuple]:
    out = []
    for session in sessions.resources(presentity):
        presence = session.presence
        if presence is not None:
            out.append(PresenceTuple(session.jid, presence.findtext(_SHOW),
                                     presence.findtext(_STATUS), session.priority, presence))
    return out


def notification(source: etree._Element, to: str) -> etree._Element:
    """A copy of a presence stanza addressed to one watcher."""
    note = copy.deepcopy(source)
    note.set("to", to)
    return note


def unavailable(session: Session, to: str | None = None) -> etree._Element:
    attrs = {"type": "unavailable", "from": str(session.jid)}
    if to is not None:
        attrs["to"] = to
    return element(PRESENCE, attrs)


def parse_priority(stanza: etree._Element) -> int:
    """RFC 6121 §4.7.2.3: an integer from -128 to 127, default 0 (also for an empty
    <priority/>, as Prosody takes it); else ValueError (NumberError)."""
    text = stanza.findtext(_PRIORITY)
    if text is None or not text.strip():
        return 0
    text = text.strip()  # xs:byte: whitespace collapsed, an optional sign, ASCII digits only
    if text.startswith("+") and not text.startswith("+-"):
        text = text[1:]
    return parse_int(text, minimum=-128, maximum=127, name="priority")
