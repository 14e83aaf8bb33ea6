"""Private XML storage (XEP-0049): an account keeps XML fragments, keyed by the root element's
name and namespace, that only its own sessions can read or write.

With PEP (pubsub/pep.py), XEP-0048 bookmarks here and XEP-0402 bookmarks in PEP are one list
(XEP-0402 §5.3, ``urn:xmpp:bookmarks:1#compat`` on the account): <storage
xmlns='storage:bookmarks'/> is read from the PEP node when there is one, and a stored one
updates the node's items (publishing the changed rooms, retracting the removed ones)."""

from __future__ import annotations

import copy

from lxml import etree

from server import events
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza, hook, iq_get, iq_set
from server.modules.pubsub import bookmarks
from server.modules.pubsub.pep import Pep
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
_BOOKMARKS = (bookmarks.LEGACY, "storage")


class Private(Module):
    name = "private"
    uses = (Pep,)  # XEP-0402 §5.3: bookmarks kept in PEP too, when PEP is loaded
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
            stored = etree.fromstring(text, _PARSER) if text is not None else None
            pep = self._pep()
            if (namespace, name) == _BOOKMARKS and pep is not None and await pep.has_node(
                    owner.bare, bookmarks.NATIVE):
                # XEP-0402 §5.3.1: the PEP items, cast into XEP-0048.
                items = await pep.stored_items(owner.bare, bookmarks.NATIVE)
                stored = bookmarks.to_legacy(items, stored)
            # Nothing stored: the requested element comes back empty.
            query.append(stored if stored is not None
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
        legacy = items.get(_BOOKMARKS)
        pep = self._pep()
        if legacy is not None and pep is not None:
            await self._to_pep(pep, owner.bare, etree.fromstring(legacy, _PARSER))
        return result(stanza)

    # -- XEP-0048 bookmarks <-> XEP-0402 (XEP-0402 §5.3) -------------------------------------

    def _pep(self) -> Pep | None:
        return self.server.module(Pep)

    async def _to_pep(self, pep: Pep, owner: JID, storage: Stanza) -> None:
        """§5.3.2: a replacement XEP-0048 list updates the PEP items as required: the changed
        and new rooms are published, the missing ones retracted (both notified to the
        owner's resources), unchanged ones left alone (no notification)."""
        current = dict(await pep.stored_items(owner, bookmarks.NATIVE))
        wanted = bookmarks.from_legacy(storage, current)
        for jid, conference in wanted.items():
            old = current.get(jid)
            if old is not None and bookmarks.key(old) == bookmarks.key(conference):
                continue
            await pep.publish_item(owner, bookmarks.NATIVE, jid, [conference],
                                   bookmarks.OPTIONS, preconditions=False)
        for jid in current.keys() - wanted.keys():
            await pep.retract_item(owner, bookmarks.NATIVE, jid, notify=True)

    @hook(events.DISCO_ACCOUNT_INFO)
    def bookmarks_compat(self, query: Stanza, _stanza: Stanza, _origin: Session | None) -> None:
        if self._pep() is not None:
            etree.SubElement(query, ns.q(ns.DISCO_INFO, "feature"), {"var": bookmarks.COMPAT})

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
