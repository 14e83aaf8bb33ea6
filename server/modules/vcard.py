"""vcard-temp (XEP-0054), with the avatar hash of vCard-based avatars (XEP-0153).

vCards are stored verbatim as XML text, together with the hex SHA-1 of their PHOTO image.
Outgoing presence gets that hash as ``<x xmlns='vcard-temp:x:update'><photo>HASH</photo></x>``;
it is cached in memory, so looking it up for every presence broadcast is cheap.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lxml import etree

from server.config import int_option
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza, hook, iq_get, iq_set
from server.sessions import Session
from server.storage.userdata import VCARDS
from server.xml import ns
from server.xml.stanza import child, element, payload, result

if TYPE_CHECKING:
    from server.app import Server

VCARD = ns.q(ns.VCARD, "vCard")
UPDATE = ns.q(ns.VCARD_UPDATE, "x")
MAX_VCARD_SIZE = 64 * 1024  # the default [vcard] max_size: room for a small avatar
_CACHE_SIZE = 10000
_PHOTO_BINVAL = f"{ns.q(ns.VCARD, 'PHOTO')}/{ns.q(ns.VCARD, 'BINVAL')}"
# Stored text is our own serialisation, but parse it as untrusted anyway.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                          remove_comments=True, remove_pis=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class VCardSettings:
    # Bytes of a stored vCard's XML (its PHOTO included); a larger one is not-acceptable.
    max_size: int = field(metadata=int_option(1024, 1 << 20, MAX_VCARD_SIZE))


class VCard(Module):
    name = "vcard"
    settings = VCardSettings
    stores = (VCARDS,)
    features = (ns.VCARD,)

    def __init__(self, server: Server, config: VCardSettings) -> None:
        super().__init__(server, config)
        # (localpart, domain) -> what avatar_hash() returns; cleared when it grows too big.
        self._hashes: dict[tuple[str, str], str | None] = {}

    async def avatar_hash(self, user: str, domain: str) -> str | None:
        """XEP-0153: hex SHA-1 of the account's avatar image; '' for a vCard without a photo
        (presence then carries an empty <photo/>), None when the account has no vCard."""
        key = (user, domain)
        if key in self._hashes:
            return self._hashes[key]
        value = await self.server.storage.vcards.avatar_hash(user, domain)
        self._remember(key, value)
        return value

    def _remember(self, key: tuple[str, str], value: str | None) -> None:
        if len(self._hashes) >= _CACHE_SIZE:
            self._hashes.clear()
        self._hashes[key] = value

    # -- the protocol ------------------------------------------------------------------------

    @iq_get(ns.VCARD, "vCard", to=("self", "bare"))
    async def get_vcard(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """Anyone may read an account's vCard (XEP-0054 §3.3)."""
        storage = self.server.storage
        target = _target(stanza, origin)
        assert target.local is not None
        text = await storage.vcards.get(target.local, target.domain)
        if text is None:
            # XEP-0054 §3.1: no vCard yet is an empty one; RFC 6121 §8.5.1: no such account.
            if not await storage.accounts.exists(target.local, target.domain):
                raise StanzaError("service-unavailable")
            return result(stanza, element(VCARD))
        return result(stanza, etree.fromstring(text, _PARSER))

    @iq_set(ns.VCARD, "vCard", to=("self",))
    async def set_vcard(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        vcard = payload(stanza)
        assert vcard is not None  # the router checked there is exactly one
        vcard = copy.deepcopy(vcard)
        etree.cleanup_namespaces(vcard)  # drop declarations inherited from the stanza
        text = etree.tostring(vcard, encoding="unicode")
        limit = self.config.max_size
        if len(text.encode()) > limit:
            raise StanzaError("not-acceptable", f"a vCard may have at most {limit} bytes")
        digest = photo_hash(vcard)
        owner = origin.jid
        assert owner.local is not None
        await self.server.storage.vcards.set(owner.local, owner.domain, text, digest)
        self._remember((owner.local, owner.domain), digest)
        return result(stanza)

    @iq_set(ns.VCARD, "vCard", to=("bare",))
    def set_other_vcard(self, _stanza: Stanza, _origin: Session | None) -> Stanza:
        # XEP-0054 §3.2: a user updates its own vCard (sent without 'to'), nobody else's.
        raise StanzaError("forbidden", "you can only set your own vCard")

    @iq_get(ns.VCARD, "vCard")
    def server_vcard(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        """The server's own vCard: its name (domain) and what it is."""
        vcard = element(VCARD)
        child(vcard, ns.q(ns.VCARD, "FN"), text=stanza.get("to") or "")
        child(vcard, ns.q(ns.VCARD, "DESC"), text="presenced XMPP server")
        return result(stanza, vcard)

    # -- presence ----------------------------------------------------------------------------

    @hook("presence/outgoing")
    def add_avatar_hash(self, session: Session, presence: Stanza) -> Awaitable[None] | None:
        """XEP-0153 §4.1: presence carries the avatar hash; added when the client left it out
        (as Prosody's mod_vcard_legacy does), so contacts of every client see avatar changes."""
        if presence.find(UPDATE) is not None:
            return None
        return self._add_avatar_hash(session.jid, presence)

    async def _add_avatar_hash(self, jid: JID, presence: Stanza) -> None:
        assert jid.local is not None
        photo = await self.avatar_hash(jid.local, jid.domain)
        if photo is None:
            return  # no vCard: say nothing rather than "no avatar"
        update = etree.SubElement(presence, UPDATE, nsmap={None: ns.VCARD_UPDATE})
        etree.SubElement(update, ns.q(ns.VCARD_UPDATE, "photo")).text = photo or None


def photo_hash(vcard: Stanza) -> str:
    """XEP-0153: the SHA-1 of the image data itself (not of its base64 form), hex."""
    binval = vcard.findtext(_PHOTO_BINVAL)
    if not binval or not binval.strip():
        return ""
    try:
        # BINVAL is often wrapped (RFC 2426 folds lines): whitespace is not data.
        data = base64.b64decode("".join(binval.split()), validate=True)
    except (binascii.Error, ValueError):
        raise StanzaError("bad-request", "PHOTO/BINVAL is not valid base64") from None
    return hashlib.sha1(data).hexdigest()


def _target(stanza: Stanza, origin: Session | None) -> JID:
    to = stanza.get("to")
    if to is not None:
        return JID.parse(to).bare
    assert origin is not None  # no 'to' only comes from a client
    return origin.jid.bare
