"""Software Version (XEP-0092). The OS is not disclosed (XEP-0092 §5: it MAY be omitted)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from server.module import Module, Stanza, iq_get
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import child, element, result

try:
    VERSION = dist_version("presenced")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.1.0"


class SoftwareVersion(Module):
    name = "version"
    features = (ns.VERSION,)

    @iq_get(ns.VERSION, "query")
    def software_version(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        query = element(ns.q(ns.VERSION, "query"))
        child(query, ns.q(ns.VERSION, "name"), text="presenced")
        child(query, ns.q(ns.VERSION, "version"), text=VERSION)
        return result(stanza, query)
