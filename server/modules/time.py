"""Entity Time (XEP-0202): UTC time and the server's offset, XEP-0082 profiles."""

from __future__ import annotations

from datetime import UTC, datetime

from server.module import Module, Stanza, iq_get
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import child, element, result


class EntityTime(Module):
    name = "time"
    features = (ns.TIME,)

    @iq_get(ns.TIME, "time")
    def entity_time(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        now = datetime.now(UTC)
        offset = now.astimezone().utcoffset()
        minutes = int(offset.total_seconds() // 60) if offset else 0
        sign = "+" if minutes >= 0 else "-"
        tzo = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        payload = element(ns.q(ns.TIME, "time"))
        child(payload, ns.q(ns.TIME, "tzo"), text=tzo)
        child(payload, ns.q(ns.TIME, "utc"),
              text=now.strftime("%Y-%m-%dT%H:%M:%SZ"))  # XEP-0082 DateTime, as XEP-0202 shows
        return result(stanza, payload)
