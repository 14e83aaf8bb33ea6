"""XMPP Ping (XEP-0199): the server answers pings to itself and to accounts' bare JIDs."""

from __future__ import annotations

from server.module import Module, Stanza, iq_get
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import result


class Ping(Module):
    name = "ping"
    features = (ns.PING,)

    @iq_get(ns.PING, "ping", to=("host", "bare"))
    def ping(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        return result(stanza)
