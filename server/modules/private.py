"""Private XML storage (XEP-0049): an account keeps XML fragments, keyed by the root element's
name and namespace, that only its own sessions can read or write."""

from __future__ import annotations

import copy

from lxml import etree

from server.errors import StanzaError
from server.module import Module, Stanza, iq_get, iq_set
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import element, payload, result

QUERY = ns.q(ns.PRIVATE, "query")
MAX_ITEM_SIZE = 64 * 1024  # bytes of one stored fragment
MAX_ITEMS_PER_SET = 32
# XEP-0049 §2.3: fragments in these namespaces are refused with not-acceptable.
# ...and ours, which holds per-contact visibility (modules/visibility.py).
RESERVED = frozenset({ns.CLIENT, ns.SERVER, ns.PRIVATE, ns.WATCHERS})
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                          remove_comments=True, remove_pis=True)


class Private(Module):
    name = "private"
    features = (ns.PRIVATE,)

    @iq_get(ns.PRIVATE, "query", to=("self",))
    async def get_private(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        store = self.server.storage.private
        owner = origin.jid
        assert owner.local is not None
        query: Stanza = element(QUERY)
        # XEP-0049 §2.3 says a client asks for one namespace per get; answering each is harmless.
        for fragment in _fragments(stanza):
            namespace, name = _key(fragment)
            text = await store.get(owner.local, owner.domain, namespace, name)
            # Nothing stored: the requested element comes back empty.
            query.append(etree.fromstring(text, _PARSER) if text is not None
                         else etree.Element(fragment.tag, nsmap={None: namespace}))
        return result(stanza, query)

    @iq_set(ns.PRIVATE, "query", to=("self",))
    async def set_private(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        fragments = _fragments(stanza)
        if len(fragments) > MAX_ITEMS_PER_SET:
            raise StanzaError("not-acceptable", f"at most {MAX_ITEMS_PER_SET} elements per set")
        items: dict[tuple[str, str], str] = {}
        for fragment in fragments:
            fragment = _standalone(fragment)
            text = etree.tostring(fragment, encoding="unicode")
            if len(text.encode()) > MAX_ITEM_SIZE:
                raise StanzaError("not-acceptable",
                                  f"a stored element may have at most {MAX_ITEM_SIZE} bytes")
            items[_key(fragment)] = text  # the last of two with the same key wins
        owner = origin.jid
        assert owner.local is not None
        await self.server.storage.private.set(
            owner.local, owner.domain, [(namespace, name, text)
                                        for (namespace, name), text in items.items()])
        return result(stanza)

    @iq_get(ns.PRIVATE, "query", to=("bare",))
    @iq_set(ns.PRIVATE, "query", to=("bare",))
    def other_account(self, _stanza: Stanza, _origin: Session | None) -> Stanza:
        # XEP-0049 §2.3: another account's private data is "Forbidden".
        raise StanzaError("forbidden", "private XML is only for its owner")


def _fragments(stanza: Stanza) -> list[Stanza]:
    query = payload(stanza)
    assert query is not None  # the router checked there is exactly one
    fragments = [c for c in query if isinstance(c.tag, str)]
    if not fragments:
        # XEP-0049 §2.3: at least one child element, else "Not Acceptable".
        raise StanzaError("not-acceptable", "the query needs a child element to store or get")
    for fragment in fragments:
        namespace = etree.QName(fragment).namespace
        if not namespace:
            raise StanzaError("not-acceptable", "a stored element needs its own namespace")
        if namespace in RESERVED:
            raise StanzaError("not-acceptable", f"the namespace {namespace} is reserved")
    return fragments


def _key(fragment: Stanza) -> tuple[str, str]:
    name = etree.QName(fragment)
    return name.namespace or "", name.localname


def _standalone(fragment: Stanza) -> Stanza:
    """A copy without the namespace declarations it inherited from the stanza."""
    fragment = copy.deepcopy(fragment)
    etree.cleanup_namespaces(fragment)
    return fragment
