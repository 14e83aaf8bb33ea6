"""vcard-temp (XEP-0054), with the avatar hash of vCard-based avatars (XEP-0153).

vCards are stored verbatim as XML text, together with the hex SHA-1 of their PHOTO image.
Outgoing presence gets that hash as ``<x xmlns='vcard-temp:x:update'><photo>HASH</photo></x>``;
it is cached in memory, so looking it up for every presence broadcast is cheap.

With PEP (pubsub/pep.py), avatars are converted both ways (XEP-0398, feature
``urn:xmpp:pep-vcard-conversion:0`` on the account): a XEP-0084 metadata publication puts the
image of the matching urn:xmpp:avatar:data item (its SHA-1 checked against the id) into the
vCard's PHOTO, and a vCard stored with a new PHOTO is published as avatar data, then metadata
(an empty <metadata/> when the photo goes). Either way the XEP-0153 hash of later presence is
the new one.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lxml import etree

from server import events
from server.config import int_option
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, ModuleContext, Stanza, hook, iq_get, iq_set
from server.modules.pubsub.engine import PubsubError
from server.modules.pubsub.pep import Pep
from server.sessions import Session
from server.shared_reads import SharedReads
from server.storage.userdata import VCARDS
from server.xml import ns
from server.xml.stanza import child, element, payload, result

log = logging.getLogger("presenced.vcard")

VCARD = ns.q(ns.VCARD, "vCard")
CONVERSION = "urn:xmpp:pep-vcard-conversion:0"  # XEP-0398 §2
AVATAR_DATA = "urn:xmpp:avatar:data"            # XEP-0084
AVATAR_METADATA = "urn:xmpp:avatar:metadata"
_PHOTO = ns.q(ns.VCARD, "PHOTO")
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
    uses = (Pep,)  # XEP-0398: avatars converted both ways, when PEP is loaded
    stores = (VCARDS,)
    features = (ns.VCARD,)

    def __init__(self, server: ModuleContext, config: VCardSettings) -> None:
        super().__init__(server, config)
        # (localpart, domain) -> what avatar_hash() returns; cleared when it grows too big.
        self._hashes: dict[tuple[str, str], str | None] = {}
        # Reads under way, shared by their callers (the bind's read-ahead and the presence);
        # a key changed or forgotten while read is not remembered from that read.
        self._reads: SharedReads[tuple[str, str], str | None] = SharedReads()
        # [cluster]: tells the other nodes that an account's vCard changed (server/cluster)
        self.changed: Callable[[JID], Awaitable[None]] | None = None

    async def avatar_hash(self, user: str, domain: str) -> str | None:
        """XEP-0153: hex SHA-1 of the account's avatar image; '' for a vCard without a photo
        (presence then carries an empty <photo/>), None when the account has no vCard."""
        key = (user, domain)
        if key in self._hashes:
            return self._hashes[key]
        return await self._reads.read(
            key, lambda: self.server.storage.vcards.avatar_hash(*key),
            lambda value: self._remember(key, value))

    @hook(events.SESSION_BOUND)
    def bound(self, session: Session) -> Awaitable[str | None] | None:
        """The avatar hash read ahead, before the initial presence that carries it: that
        presence then waits for no storage (issue 25 item 6)."""
        jid = session.jid
        if jid.local is None or (jid.local, jid.domain) in self._hashes:
            return None
        return self.avatar_hash(jid.local, jid.domain)

    async def _stored(self, owner: JID, digest: str) -> None:
        assert owner.local is not None
        self._changing((owner.local, owner.domain))
        self._remember((owner.local, owner.domain), digest)
        if self.changed is not None:  # told before the answer: then every node knows
            await self.changed(owner.bare)

    def forget(self, bare: JID) -> None:
        """Another node stored this account's vCard: read its avatar hash again."""
        if bare.local is not None:
            self._changing((bare.local, bare.domain))
            self._hashes.pop((bare.local, bare.domain), None)

    def _changing(self, key: tuple[str, str]) -> None:
        self._reads.forget(key)  # what a read under way returns may be from before the change

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
        before = await self.avatar_hash(owner.local, owner.domain)
        await self.server.storage.vcards.set(owner.local, owner.domain, text, digest)
        await self._stored(owner, digest)
        if digest != (before or ""):
            await self._photo_to_pep(owner.bare, vcard, digest)
        return result(stanza)

    # -- XEP-0398: vCard PHOTO <-> XEP-0084 avatar ------------------------------------------

    def _pep(self) -> Pep | None:
        return self.server.module(Pep)

    @hook(events.DISCO_ACCOUNT_INFO)
    def conversion_feature(self, query: Stanza, _stanza: Stanza,
                           _origin: Session | None) -> None:
        if self._pep() is not None:
            child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": CONVERSION})

    async def _photo_to_pep(self, owner: JID, vcard: Stanza, digest: str) -> None:
        """XEP-0398 §3.2: the new photo is published as avatar data first, then as the
        metadata that points to it; no photo any more: empty metadata (XEP-0084 §4.6)."""
        pep = self._pep()
        if pep is None:
            return
        metadata = element(ns.q(AVATAR_METADATA, "metadata"))
        try:
            if digest:
                binval = "".join((vcard.findtext(_PHOTO_BINVAL) or "").split())
                image_type = (vcard.findtext(f"{_PHOTO}/{ns.q(ns.VCARD, 'TYPE')}")
                              or "image/png").strip()
                data = element(ns.q(AVATAR_DATA, "data"))
                data.text = binval
                await pep.publish_item(owner, AVATAR_DATA, digest, [data], {},
                                       preconditions=False)
                child(metadata, ns.q(AVATAR_METADATA, "info"), {
                    "id": digest, "type": image_type,
                    "bytes": str(len(base64.b64decode(binval)))})
            await pep.publish_item(owner, AVATAR_METADATA, digest or None, [metadata], {},
                                   preconditions=False)
        except PubsubError as err:  # too big for a PEP item, too many nodes, ...
            log.info("event=avatar-not-converted jid=%s direction=vcard-to-pep reason=%s",
                     owner, err.condition)

    @hook(events.PEP_PUBLISHED)
    def published(self, owner: JID, node: str, item_id: str,
                  payload: Stanza | None) -> Awaitable[None] | None:
        if node != AVATAR_METADATA or payload is None:
            return None
        return self._pep_to_photo(owner, payload)

    async def _pep_to_photo(self, owner: JID, metadata: Stanza) -> None:
        """XEP-0398 §3.1: the metadata's info without a url names the image in the data node;
        its SHA-1 must be its id; it becomes the vCard's PHOTO (removed for empty metadata)."""
        assert owner.local is not None
        pep = self._pep()
        if pep is None:  # pep/published came from it: it is loaded
            return
        infos = [i for i in metadata.findall(ns.q(AVATAR_METADATA, "info")) if not i.get("url")]
        storage = self.server.storage.vcards
        text = await storage.get(owner.local, owner.domain)
        vcard = etree.fromstring(text, _PARSER) if text is not None else element(VCARD)
        current = await self.avatar_hash(owner.local, owner.domain) or ""
        photo = None
        digest = ""
        if infos:
            digest = infos[0].get("id", "")
            if digest == current:
                return  # the vCard has it (or it came from the vCard)
            found = [p for i, p in await pep.stored_items(owner, AVATAR_DATA)
                     if i == digest and p is not None]
            if not found:
                return
            binval = "".join((found[-1].text or "").split())
            try:
                image = base64.b64decode(binval, validate=True)
            except (binascii.Error, ValueError):
                return
            if hashlib.sha1(image).hexdigest() != digest:  # §3.1 SHOULD verify
                log.info("event=avatar-not-converted jid=%s direction=pep-to-vcard "
                         "reason=hash-mismatch", owner)
                return
            photo = element(_PHOTO)
            child(photo, ns.q(ns.VCARD, "TYPE"), text=infos[0].get("type") or "image/png")
            child(photo, ns.q(ns.VCARD, "BINVAL"), text=binval)
        elif not current:
            return  # no avatar either way
        for old in vcard.findall(_PHOTO):
            vcard.remove(old)
        if photo is not None:
            vcard.append(photo)
        text = etree.tostring(vcard, encoding="unicode")
        if len(text.encode()) > self.config.max_size:
            log.info("event=avatar-not-converted jid=%s direction=pep-to-vcard reason=too-big",
                     owner)
            return
        await storage.set(owner.local, owner.domain, text, digest)
        await self._stored(owner, digest)

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

    @hook(events.PRESENCE_OUTGOING)
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
