"""An echo service at echo.<domain> (off by default): the smallest service host, used to test
the mechanism and handy to check federation by hand. It answers disco and XEP-0199 pings, and
sends every message with a body back to its sender, from the JID it was sent to.

    [echo]
    enabled = true
    subdomain = "echo"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.config import service_fields
from server.jid import JID
from server.module import Stanza
from server.services import ServiceModule
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

_BODY = ns.q(ns.CLIENT, "body")


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoSettings:
    enabled: bool = field(metadata=service_fields.enabled(False))
    subdomain: str = field(metadata=service_fields.subdomain("echo"))


class Echo(ServiceModule):
    name = "echo"
    settings = EchoSettings
    identity = ("component", "generic")
    display_name = "Echo service"
    service_features = (ns.PING,)

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if stanza.tag == st.IQ:
            payload = st.payload(stanza)
            if stanza.get("type") == "get" and payload is not None and payload.tag == _PING:
                return st.result(stanza)
            return None
        if stanza.tag == st.MESSAGE and stanza.get("type") != "error":
            body = stanza.find(_BODY)
            if body is None:
                return True
            reply = st.element(st.MESSAGE, {"from": str(to), "to": stanza.get("from", ""),
                                            "type": stanza.get("type") or "normal"})
            st.child(reply, _BODY, text=body.text)
            self.server.router.reply(reply, origin)
            return True
        return True  # presence and errors: nothing to do


_PING = ns.q(ns.PING, "ping")
