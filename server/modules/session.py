"""The legacy session establishment of RFC 3921 §3, offered as optional
(draft-cridland-xmpp-session-01): old clients still send it and expect a result."""

from __future__ import annotations

from server.module import Module, Stanza, iq_set
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import result


class LegacySession(Module):
    name = "session"

    @iq_set(ns.SESSION, "session", to=("host", "self"))
    def establish(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        return result(stanza)
