"""Service hosts: features that live at a domain of their own (muc.<domain>, upload.<domain>,
an external component's domain), not at the user domains.

The router hands every stanza for a service domain (to the domain, to a bare or to a full JID
at it) to the service's route function; the user domain lists the service in its disco#items;
federation accepts and sends stanzas for it like for any domain we host; the self-signed
certificate we generate names it.

A module becomes a service by deriving from ServiceModule and giving its settings an
``enabled`` and a ``subdomain`` field (``service_fields`` makes both): it is then served at
``<subdomain>.<domain>`` for every hosted domain. Its iq handlers are declared as a user
domain module's are, with a service target::

    @iq_get(ns.PING, "ping", to="service")          # to muc.<domain> itself
    def ping(self, stanza: Stanza, origin: Session | None, to: JID) -> Stanza: ...

    @iq_set(MUC_OWNER, "query", to="service-bare")   # to room@muc.<domain>
    def configure(self, stanza: Stanza, origin: Session | None, to: JID) -> Any: ...

Two handlers for one (type, target, namespace, element) are refused when the module is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Handler, Module, Stanza
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

Route = Callable[[Stanza, Session | None, JID], Any]


@dataclass(frozen=True, slots=True)
class ServiceHost:
    domain: str  # the service's own domain
    parent: str  # the user domain whose disco#items list it
    name: str    # for disco items and identities


class ServiceModule(Module):
    """A module served at <subdomain>.<domain> for each hosted domain.

    Subclasses set ``identity`` (XEP-0030 category, type), ``display_name`` and
    ``service_features``, and implement ``handle`` for everything but disco#info (and
    ``items`` for disco#items)."""

    identity: ClassVar[tuple[str, str]]
    display_name: ClassVar[str]
    service_features: ClassVar[tuple[str, ...]] = ()

    def __init__(self, server: Any, config: Any) -> None:
        super().__init__(server, config)
        # (type, target, namespace, element) -> handler, from the declarations
        self._service_iqs: dict[tuple[str, str, str, str], Handler] = {}
        for route, handler in self.service_iq_handlers():
            for target in route.targets:
                key = (route.type, target, route.xmlns, route.name)
                if key in self._service_iqs:
                    raise ValueError(f"two handlers for iq {key} in {type(self).__name__}")
                self._service_iqs[key] = handler

    async def start(self) -> None:
        if not self.config.enabled:
            return
        for domain in self.server.config.domains:
            host = ServiceHost(f"{self.config.subdomain}.{domain}", domain, self.display_name)
            self.server.add_service(host, self.route)

    def route(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if (to.local is None and to.resource is None and stanza.tag == st.IQ
                and stanza.get("type") == "get"):
            payload = st.payload(stanza)
            if payload is not None and payload.tag == _INFO and payload.get("node") is None:
                return self.info(stanza)
            if payload is not None and payload.tag == _ITEMS:
                return self.items(stanza, origin)
        handler = self.iq_handler(stanza, to)
        if handler is not None:
            return self.call_iq(handler, stanza, origin, to)
        return self.handle(stanza, origin, to)

    def iq_handler(self, stanza: Stanza, to: JID) -> Handler | None:
        """The declared handler of an iq get/set to the service or a bare JID at it."""
        if stanza.tag != st.IQ or to.resource is not None:
            return None
        type_ = stanza.get("type")
        if type_ not in ("get", "set"):
            return None
        payload = st.payload(stanza)
        if payload is None:
            return None
        qname = etree.QName(payload)
        target = "service" if to.local is None else "service-bare"
        return self._service_iqs.get((type_, target, qname.namespace or "", qname.localname))

    def call_iq(self, handler: Handler, stanza: Stanza, origin: Session | None,
                to: JID) -> Any:
        """Runs a declared handler; a service may wrap it (checks, error replies)."""
        return handler(stanza, origin, to)

    def info(self, stanza: Stanza) -> Stanza:
        query = st.element(_INFO)
        category, type_ = self.identity
        st.child(query, ns.q(ns.DISCO_INFO, "identity"),
                 {"category": category, "type": type_, "name": self.display_name})
        for feature in sorted({ns.DISCO_INFO, ns.DISCO_ITEMS, *self.service_features}):
            st.child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
        return st.result(stanza, query)

    def items(self, stanza: Stanza, _origin: Session | None) -> Any:
        if stanza[0].get("node") is not None:
            raise StanzaError("item-not-found", "no such node")
        return st.result(stanza, st.element(_ITEMS))

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        """Everything else addressed to the service; None: service-unavailable."""
        return None


_INFO = ns.q(ns.DISCO_INFO, "query")
_ITEMS = ns.q(ns.DISCO_ITEMS, "query")
