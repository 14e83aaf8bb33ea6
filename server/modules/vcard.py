"""vcard-temp (XEP-0054), with the avatar hash of vCard-based avatars (XEP-0153).

vCards are stored verbatim as XML text. For presence, ``avatar_hash(user, domain)`` gives the hex
SHA-1 of the account's PHOTO image, '' when its vCard has no photo, None when it has no vCard;
the presence module puts it in outgoing presence as
``<x xmlns='vcard-temp:x:update'><photo>HASH</photo></x>`` (an empty <photo/> for '').
It is cached in memory, so calling it for every presence broadcast is cheap.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
from typing import TYPE_CHECKING

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import child, element, payload, result

if TYPE_CHECKING:
    from server.app import Server

module = Module("vcard")
UPDATE = ns.q(ns.VCARD_UPDATE, "x")
module.feature(ns.VCARD)

VCARD = ns.q(ns.VCARD, "vCard")
MAX_VCARD_SIZE = 64 * 1024  # bytes of serialised XML: room for a small avatar
_CACHE_SIZE = 10000
_PHOTO_BINVAL = f"{ns.q(ns.VCARD, 'PHOTO')}/{ns.q(ns.VCARD, 'BINVAL')}"
# Stored text is our own serialisation, but parse it as untrusted anyway.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                          remove_comments=True, remove_pis=True)

# (localpart, domain) -> avatar hash as avatar_hash() returns it; cleared when it grows too big.
_hashes: dict[tuple[str, str], str | None] = {}


@module.on_load
def _reset(_server: Server) -> None:
    _hashes.clear()  # a new server (tests start several in one process) has another database


async def avatar_hash(user: str, domain: str) -> str | None:
    """XEP-0153: hex SHA-1 of the account's avatar image; '' for a vCard without a photo (the
    presence then carries an empty <photo/>), None when the account has no vCard."""
    key = (user, domain)
    try:
        return _hashes[key]
    except KeyError:
        pass
    assert module.server is not None
    value = await module.server.storage.vcards.avatar_hash(user, domain)
    _remember(key, value)
    return value


def _remember(key: tuple[str, str], value: str | None) -> None:
    if len(_hashes) >= _CACHE_SIZE:
        _hashes.clear()
    _hashes[key] = value


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


@module.iq_get(ns.VCARD, to=("self", "bare"))
async def get_vcard(stanza: Stanza, origin: Session | None) -> Stanza:
    """Anyone may read an account's vCard (XEP-0054 §3.3)."""
    assert module.server is not None
    storage = module.server.storage
    target = _target(stanza, origin)
    assert target.local is not None
    text = await storage.vcards.get(target.local, target.domain)
    if text is None:
        # XEP-0054 §3.1: no vCard yet is an empty one; RFC 6121 §8.5.1: no such account.
        if not await storage.accounts.exists(target.local, target.domain):
            raise StanzaError("service-unavailable")
        return result(stanza, element(VCARD))
    return result(stanza, etree.fromstring(text, _PARSER))


@module.iq_set(ns.VCARD, to=("self",))
async def set_vcard(stanza: Stanza, origin: Session | None) -> Stanza:
    assert module.server is not None and origin is not None
    vcard = payload(stanza)
    assert vcard is not None  # the router checked there is exactly one
    if etree.QName(vcard).localname != "vCard":
        raise StanzaError("bad-request", "expected <vCard xmlns='vcard-temp'/>")
    vcard = copy.deepcopy(vcard)
    etree.cleanup_namespaces(vcard)  # drop declarations inherited from the stanza
    text = etree.tostring(vcard, encoding="unicode")
    if len(text.encode()) > MAX_VCARD_SIZE:
        raise StanzaError("not-acceptable", f"a vCard may have at most {MAX_VCARD_SIZE} bytes")
    digest = photo_hash(vcard)
    owner = origin.jid
    assert owner.local is not None
    await module.server.storage.vcards.set(owner.local, owner.domain, text, digest)
    _remember((owner.local, owner.domain), digest)
    return result(stanza)


@module.iq_set(ns.VCARD, to=("bare",))
def set_other_vcard(_stanza: Stanza, _origin: Session | None) -> Stanza:
    # Only the account itself may update its vCard (XEP-0054 §3.2: sent without 'to').
    raise StanzaError("forbidden", "you can only set your own vCard")


@module.iq_get(ns.VCARD)
def server_vcard(stanza: Stanza, _origin: Session | None) -> Stanza:
    """The server's own vCard: its name (domain) and what it is."""
    vcard = element(VCARD)
    child(vcard, ns.q(ns.VCARD, "FN"), text=stanza.get("to") or "")
    child(vcard, ns.q(ns.VCARD, "DESC"), text="presenced XMPP server")
    return result(stanza, vcard)


@module.on("presence/outgoing")
def add_avatar_hash(session: Session, presence: Stanza) -> object:
    """XEP-0153 §4.1: presence carries the avatar hash; added when the client left it out
    (as Prosody's mod_vcard_legacy does), so contacts of every client learn of avatar changes."""
    if presence.find(UPDATE) is not None:
        return None

    async def add() -> None:
        jid = session.jid
        assert jid.local is not None
        photo = await avatar_hash(jid.local, jid.domain)
        if photo is None:
            return  # no vCard: say nothing rather than "no avatar"
        update = etree.SubElement(presence, UPDATE, nsmap={None: ns.VCARD_UPDATE})
        etree.SubElement(update, ns.q(ns.VCARD_UPDATE, "photo")).text = photo or None
    return add()
