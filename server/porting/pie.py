"""XEP-0227 (Portable Import/Export Format), pure: files to Account values and back.

The shape (XEP-0227 §4): <server-data xmlns='urn:xmpp:pie:0'><host jid='DOMAIN'><user name=
'LOCALPART'> with, inside a user, the extensions the exporters we read use:

- credentials: `password` (plain text, the XEP's own form) or `<scram-credentials
  xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-1'>` with server-key, stored-key, salt (base64)
  and iter-count (RFC 5802 §3), one per hash. ejabberd 23.01 writes the base64 text it keeps,
  base64-encoded once more (keys and salt alike): a key that decodes to the wrong size but
  decodes again to the right one is read that way, and its salt with it;
- roster: <query xmlns='jabber:iq:roster'> items, pending inbound requests as <presence
  type='subscribe' from=…/> next to it (Prosody writes them in the pie namespace, ejabberd in
  jabber:client);
- <vCard xmlns='vcard-temp'/>, private XML (<query xmlns='jabber:iq:private'>), offline messages
  (<offline-messages>, XEP-0227 §4.1);
- archives (Prosody): <archive xmlns='urn:xmpp:pie:0#mam'> of XEP-0313 <result/>s, each a
  <forwarded/> with its <delay/>;
- PEP (Prosody): node configurations under <pubsub xmlns='…pubsub#owner'> (<configure node=…>
  with a node_config form), items under <pubsub xmlns='…pubsub'> (<items node=…><item id=…>).

ejabberd's export_piefxis writes an index file whose <server-data/> holds XInclude <include
href='…'/> elements naming one file per host (root <host/>); read() follows them (only to files
in the same directory).

read() streams (lxml iterparse): one user element in memory at a time, whatever the file's size.
A part it cannot use becomes a line in Account.skipped, saying why; an account it cannot use at
all has Account.error.
"""

from __future__ import annotations

import base64
import binascii
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from lxml import etree

from server.jid import JID, InvalidJID, normalize_domain, normalize_localpart
from server.modules.pubsub import bookmarks
from server.modules.pubsub.engine import (
    NODE_CONFIG,
    PubsubError,
    config_form,
    form_values,
    node_config,
)
from server.storage.base import Credentials, RosterItem, ScramKeys
from server.storage.pubsub import StoredItem
from server.xml.numbers import NumberError, parse_int

PIE = "urn:xmpp:pie:0"
SCRAM = PIE + "#scram"
PIE_MAM = PIE + "#mam"
XINCLUDE = "http://www.w3.org/2001/XInclude"
CLIENT = "jabber:client"
ROSTER = "jabber:iq:roster"
PRIVATE = "jabber:iq:private"
VCARD = "vcard-temp"
PUBSUB = "http://jabber.org/protocol/pubsub"
PUBSUB_OWNER = PUBSUB + "#owner"
FORWARD = "urn:xmpp:forward:0"
DELAY = "urn:xmpp:delay"
MAM_NAMESPACES = ("urn:xmpp:mam:2", "urn:xmpp:mam:1", "urn:xmpp:mam:0")
DATA_FORMS = "jabber:x:data"

_USER = f"{{{PIE}}}user"
_HOST = f"{{{PIE}}}host"
_SERVER_DATA = f"{{{PIE}}}server-data"
_INCLUDE = f"{{{XINCLUDE}}}include"
_HASHES = {"SCRAM-SHA-1": ("sha1", 20), "SCRAM-SHA-256": ("sha256", 32)}
_MECHANISM = {"sha1": "SCRAM-SHA-1", "sha256": "SCRAM-SHA-256"}
_SUBSCRIPTIONS = ("none", "to", "from", "both")
MAX_ITERATIONS = 10_000_000


class PieError(Exception):
    """The file is not XEP-0227 (or not well-formed XML); nothing of it can be read."""


@dataclass
class PepNode:
    config: dict[str, Any]
    items: list[StoredItem] = field(default_factory=list)


@dataclass(frozen=True)
class ArchivedItem:
    """One archived message of an account (XEP-0313): with whom, in which direction, when."""

    ts: int                  # microseconds since the epoch, UTC
    with_bare: str
    with_resource: str
    outgoing: bool
    stanza: bytes            # the {jabber:client}message, serialised
    id: str = ""             # its archive id where it came from (export: ours)


@dataclass
class Account:
    user: str
    domain: str
    credentials: Credentials | None = None
    password: str | None = None          # plain text: keys are derived at import
    roster: list[RosterItem] = field(default_factory=list)
    vcard: str | None = None             # the <vCard xmlns='vcard-temp'/> as XML text
    private: list[tuple[str, str, str]] = field(default_factory=list)  # (namespace, name, xml)
    pep: dict[str, PepNode] = field(default_factory=dict)
    offline: list[bytes] = field(default_factory=list)
    archive: list[ArchivedItem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what was left out, and why
    error: str | None = None             # why the whole account cannot be imported

    @property
    def jid(self) -> str:
        return f"{self.user}@{self.domain}"


Progress = Callable[[Path, int, int], None]  # (file, bytes read, file size)

# No DTD, no entities, no network: an export is data, never instructions to the parser.
_PARSE = {"resolve_entities": False, "no_network": True, "load_dtd": False, "huge_tree": True,
          "remove_comments": True, "remove_pis": True}


# -- reading ------------------------------------------------------------------------------------


def included_files(path: Path) -> list[Path]:
    """The files an ejabberd index file names with XInclude (for a directory: those are read
    through the index, not on their own)."""
    found = []
    try:
        for _event, element in etree.iterparse(str(path), events=("end",), tag=_INCLUDE,
                                               **_PARSE):
            target = _include_target(path, element.get("href"))
            if target is not None:
                found.append(target)
    except etree.XMLSyntaxError:
        return []
    return found


def _include_target(path: Path, href: str | None) -> Path | None:
    """Only a plain file name next to the index: no directories, no URLs."""
    if not href or "/" in href or "\\" in href or href in (".", ".."):
        return None
    return path.parent / href


def read(path: Path, progress: Progress | None = None) -> Iterator[Account]:
    """The accounts of one XEP-0227 file, one at a time. PieError when the file is not one (or
    breaks off: the accounts before the break have been given already)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        yield from _read(path, handle, size, progress)


def _read(path: Path, handle: IO[bytes], size: int, progress: Progress | None
          ) -> Iterator[Account]:
    host: str | None = None
    root_seen = False
    try:
        for event, element in etree.iterparse(handle, events=("start", "end"), **_PARSE):
            if event == "start":
                if not root_seen:
                    root_seen = True
                    if element.tag not in (_SERVER_DATA, _HOST):
                        raise PieError(f"{path}: not a XEP-0227 file (the root element is "
                                       f"{element.tag}, not {{{PIE}}}server-data)")
                if element.tag == _HOST:
                    host = element.get("jid")
                continue
            if element.tag == _USER:
                yield account_of(element, host)
                _drop(element)
                if progress is not None:
                    progress(path, handle.tell(), size)
            elif element.tag == _INCLUDE:
                target = _include_target(path, element.get("href"))
                if target is None:
                    raise PieError(f"{path}: an XInclude href names no file next to it: "
                                   f"{element.get('href')!r}")
                yield from read(target, progress)
    except etree.XMLSyntaxError as exc:
        raise PieError(f"{path}: not well-formed XML: {exc}") from None
    if progress is not None:
        progress(path, size, size)


def _drop(element: etree._Element) -> None:
    """Free a parsed user element and those before it (iterparse keeps the tree)."""
    element.clear(keep_tail=True)
    parent = element.getparent()
    if parent is not None:
        while element.getprevious() is not None:
            del parent[0]


def account_of(user: etree._Element, host: str | None) -> Account:
    """One <user/> element (inside <host jid=host>) as an Account."""
    name = user.get("name") or ""
    try:
        domain = normalize_domain(host or "")
        local = normalize_localpart(name)
    except (InvalidJID, ValueError, UnicodeError) as exc:
        return Account(name, host or "", error=f"not a valid JID ({exc})")
    account = Account(local, domain)
    owner = account.jid
    handled = {f"{{{SCRAM}}}scram-credentials", f"{{{ROSTER}}}query", f"{{{VCARD}}}vCard",
               f"{{{PRIVATE}}}query", f"{{{PIE}}}offline-messages", f"{{{PIE_MAM}}}archive",
               f"{{{PUBSUB_OWNER}}}pubsub", f"{{{PUBSUB}}}pubsub", f"{{{PIE}}}presence",
               f"{{{CLIENT}}}presence"}
    for child in user:
        if isinstance(child.tag, str) and child.tag not in handled:
            account.skipped.append(f"{child.tag}: not understood")
    _credentials(user, account)
    items = _roster(user, owner, account.skipped)
    account.roster = list(items.values())
    vcard = user.find(f"{{{VCARD}}}vCard")
    if vcard is not None:
        account.vcard = etree.tostring(_standalone(vcard), encoding="unicode")
    for query in user.iterfind(f"{{{PRIVATE}}}query"):
        for child in query:
            if not isinstance(child.tag, str):
                continue
            qname = etree.QName(child)
            if not qname.namespace:
                account.skipped.append(f"private XML <{qname.localname}/>: no namespace")
                continue
            account.private.append((qname.namespace, qname.localname,
                                    etree.tostring(_standalone(child), encoding="unicode")))
    for offline in user.iterfind(f"{{{PIE}}}offline-messages"):
        for message in offline:
            if isinstance(message.tag, str) and etree.QName(message).localname == "message":
                account.offline.append(etree.tostring(_client(message)))
    for archive in user.iterfind(f"{{{PIE_MAM}}}archive"):
        for result in archive:
            if isinstance(result.tag, str):
                item = _archived(result, owner, account.skipped)
                if item is not None:
                    account.archive.append(item)
    _pep(user, account)
    return account


def _b64(text: str | None) -> bytes:
    if text is None:
        raise ValueError("missing")
    return base64.b64decode("".join(text.split()), validate=True)


def _credentials(user: etree._Element, account: Account) -> None:
    keys: dict[str, ScramKeys] = {}
    for element in user.iterfind(f"{{{SCRAM}}}scram-credentials"):
        mechanism = element.get("mechanism", "SCRAM-SHA-1")
        if mechanism not in _HASHES:
            account.skipped.append(f"credentials for {mechanism}: not a mechanism we offer")
            continue
        hash_name, size = _HASHES[mechanism]
        try:
            keys[hash_name] = _scram_keys(element, size)
        except (ValueError, binascii.Error, NumberError) as exc:
            account.skipped.append(f"{mechanism} credentials: unusable ({exc})")
    if keys:
        account.credentials = Credentials(sha1=keys.get("sha1"), sha256=keys.get("sha256"))
    elif user.get("password"):
        account.password = user.get("password")
    else:
        account.error = "no credentials (neither SCRAM keys nor a password)"


def _scram_keys(element: etree._Element, size: int) -> ScramKeys:
    def text(name: str) -> str | None:
        return element.findtext(f"{{{SCRAM}}}{name}")

    server_key, stored_key, salt = _b64(text("server-key")), _b64(text("stored-key")), \
        _b64(text("salt"))
    if len(server_key) != size:
        # ejabberd: its stored base64 text, base64-encoded again (the salt too).
        try:
            server_key, stored_key, salt = (_b64(v.decode("ascii"))
                                            for v in (server_key, stored_key, salt))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ValueError(f"a key is {len(server_key)} bytes, not {size}") from None
    if len(server_key) != size or len(stored_key) != size:
        raise ValueError(f"the keys are not {size} bytes")
    if not salt:
        raise ValueError("empty salt")
    iterations = parse_int(text("iter-count"), minimum=1, maximum=MAX_ITERATIONS,
                           name="iter-count")
    return ScramKeys(salt=salt, iterations=iterations, stored_key=stored_key,
                     server_key=server_key)


def _bare(text: str | None) -> str | None:
    try:
        return str(JID.parse(text or "").bare)
    except InvalidJID:
        return None


def _roster(user: etree._Element, owner: str, skipped: list[str]) -> dict[str, RosterItem]:
    items: dict[str, RosterItem] = {}
    for query in user.iterfind(f"{{{ROSTER}}}query"):
        for item in query.iterfind(f"{{{ROSTER}}}item"):
            contact = _bare(item.get("jid"))
            if contact is None:
                skipped.append(f"roster item {item.get('jid')!r}: not a valid JID")
                continue
            if contact == owner:
                continue  # RFC 6121 §2.1.1 has no self-contacts (Prosody's writer drops them)
            subscription = item.get("subscription") or "none"
            if subscription not in _SUBSCRIPTIONS:
                skipped.append(f"roster item {contact}: subscription {subscription!r}")
                continue
            groups = tuple(dict.fromkeys(
                g.text.strip() for g in item.iterfind(f"{{{ROSTER}}}group")
                if g.text and g.text.strip()))
            items[contact] = RosterItem(
                contact=contact, name=item.get("name") or None, groups=groups,
                subscription=subscription,
                pending_out=item.get("ask") == "subscribe" and subscription in ("none", "from"))
    # Requests waiting for the user's answer (RFC 6121 §3.1.3: kept to redeliver at login).
    for presence in user:
        if not isinstance(presence.tag, str) or presence.tag not in (
                f"{{{PIE}}}presence", f"{{{CLIENT}}}presence"):
            continue
        if presence.get("type") != "subscribe":
            continue
        contact = _bare(presence.get("from"))
        if contact is None or contact == owner:
            skipped.append(f"subscription request from {presence.get('from')!r}: not a JID")
            continue
        request = etree.Element(f"{{{CLIENT}}}presence", {"from": contact, "type": "subscribe"},
                                nsmap={None: CLIENT})
        text = etree.tostring(request, encoding="unicode")
        current = items.get(contact)
        if current is None:
            items[contact] = RosterItem(contact=contact, listed=False, pending_in=True,
                                        request=text)
        elif current.subscription in ("none", "to"):
            items[contact] = replace(current, pending_in=True, request=text)
    return items


def _standalone(element: etree._Element) -> etree._Element:
    kept = copy.deepcopy(element)
    kept.tail = None
    etree.cleanup_namespaces(kept)
    return kept


def _client(element: etree._Element) -> etree._Element:
    """A stanza in the canonical jabber:client namespace (the pie namespace, or none, is what
    a stanza written without its own declaration inherits)."""
    kept = copy.deepcopy(element)
    kept.tail = None
    for node in kept.iter():
        if isinstance(node.tag, str) and etree.QName(node).namespace in (PIE, None):
            node.tag = f"{{{CLIENT}}}{etree.QName(node).localname}"
    if kept.nsmap.get(None) != CLIENT:
        rebuilt = etree.Element(kept.tag, dict(kept.attrib), nsmap={None: CLIENT})
        rebuilt.text = kept.text
        rebuilt.extend(list(kept))
        kept = rebuilt
    etree.cleanup_namespaces(kept)
    return kept


def parse_stamp(text: str | None) -> int:
    """Microseconds since the epoch of a XEP-0082 DateTime; ValueError."""
    if not text or "T" not in text:
        raise ValueError(f"not a XEP-0082 DateTime: {text!r}")
    when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_stamp(us: int) -> str:
    seconds, micro = divmod(us, 1_000_000)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{micro:06d}Z"


def _archived(result: etree._Element, owner: str, skipped: list[str]) -> ArchivedItem | None:
    """A XEP-0313 <result/> as Prosody's driver writes it (XEP-0297 forwarded, XEP-0203
    delay)."""
    where = f"archived message {result.get('id')!r}"
    if etree.QName(result).namespace not in MAM_NAMESPACES:
        skipped.append(f"{where}: {result.tag} is not a XEP-0313 result")
        return None
    forwarded = result.find(f"{{{FORWARD}}}forwarded")
    message = None
    if forwarded is not None:
        message = next((m for m in forwarded if isinstance(m.tag, str)
                        and etree.QName(m).localname == "message"), None)
    if forwarded is None or message is None:
        skipped.append(f"{where}: no forwarded message")
        return None
    delay = forwarded.find(f"{{{DELAY}}}delay")
    try:
        ts = parse_stamp(delay.get("stamp") if delay is not None else None)
    except ValueError as exc:
        skipped.append(f"{where}: {exc}")
        return None
    try:
        sender = JID.parse(message.get("from") or owner)
        recipient = JID.parse(message.get("to") or owner)
    except InvalidJID:
        skipped.append(f"{where}: from/to is not a JID")
        return None
    outgoing = str(sender.bare) == owner
    other = recipient if outgoing else sender
    return ArchivedItem(ts=ts, with_bare=str(other.bare), with_resource=other.resource or "",
                        outgoing=outgoing, stanza=etree.tostring(_client(message)),
                        id=result.get("id") or "")


def _node_config(form: etree._Element | None) -> dict[str, Any]:
    """A node_config form (XEP-0060 §16.4.4) as our configuration. Prosody writes every field,
    those without a value too: they mean the default, as if absent."""
    if form is None:
        return node_config()
    kept = copy.deepcopy(form)
    for f in list(kept.iterfind(f"{{{DATA_FORMS}}}field")):
        if f.find(f"{{{DATA_FORMS}}}value") is None:
            kept.remove(f)
    return node_config(form_values(kept, NODE_CONFIG))


def _pep(user: etree._Element, account: Account) -> None:
    owner = account.jid
    nodes = account.pep
    for pubsub in user.iterfind(f"{{{PUBSUB_OWNER}}}pubsub"):
        for element in pubsub:
            if not isinstance(element.tag, str):
                continue
            node = element.get("node")
            kind = etree.QName(element).localname
            if not node:
                account.skipped.append(f"PEP <{kind}/> without a node name")
                continue
            if kind == "configure":
                try:
                    config = _node_config(element.find(f"{{{DATA_FORMS}}}x"))
                except PubsubError as exc:
                    account.skipped.append(f"PEP node {node}: configuration not used "
                                           f"({exc.text}); the defaults apply")
                    config = node_config()
                nodes.setdefault(node, PepNode(config)).config = config
            elif kind in ("affiliations", "subscriptions"):
                others = [e.get("jid") for e in element if isinstance(e.tag, str)
                          and _bare(e.get("jid")) != owner]
                if others:
                    account.skipped.append(
                        f"PEP node {node}: {kind} of {', '.join(map(str, others))} (PEP access "
                        "follows the node's access model and the roster)")
            else:
                account.skipped.append(f"PEP node {node}: <{kind}/> not understood")
    for pubsub in user.iterfind(f"{{{PUBSUB}}}pubsub"):
        for items in pubsub.iterfind(f"{{{PUBSUB}}}items"):
            node = items.get("node")
            if not node:
                account.skipped.append("PEP items without a node name")
                continue
            entry = nodes.setdefault(node, PepNode(node_config()))
            for item in items.iterfind(f"{{{PUBSUB}}}item"):
                item_id = item.get("id")
                if not item_id:
                    account.skipped.append(f"PEP node {node}: an item without id")
                    continue
                payload = next((p for p in item if isinstance(p.tag, str)), None)
                text = "" if payload is None else etree.tostring(_standalone(payload),
                                                                 encoding="unicode")
                entry.items = [i for i in entry.items if i.id != item_id]
                entry.items.append(StoredItem(item_id, owner, text))
    _bookmarks(account)


def _bookmarks(account: Account) -> None:
    """XEP-0048 bookmarks (private XML, as ejabberd keeps them, or the legacy PEP node
    storage:bookmarks) become XEP-0402 items when the account has none (§5.3: a client of
    today reads those). The private XML copy stays (its <url/> bookmarks are not XEP-0402's)."""
    legacy_node = account.pep.pop(bookmarks.LEGACY, None)
    sources: list[etree._Element] = []
    if legacy_node is not None:
        for item in legacy_node.items:
            if item.payload:
                sources.append(etree.fromstring(item.payload))
        if not legacy_node.items:
            account.skipped.append(f"PEP node {bookmarks.LEGACY}: empty (the compatibility "
                                   f"node of XEP-0048; bookmarks live in {bookmarks.NATIVE})")
    for namespace, _name, xml in account.private:
        if namespace == bookmarks.LEGACY:
            sources.append(etree.fromstring(xml))
    native = account.pep.get(bookmarks.NATIVE)
    if not sources or (native is not None and native.items):
        return
    rooms: dict[str, etree._Element] = {}
    for storage in sources:
        rooms.update(bookmarks.from_legacy(storage, {}))
    if not rooms:
        return
    node = PepNode(node_config(bookmarks.OPTIONS))
    for room, conference in rooms.items():
        node.items.append(StoredItem(room, account.jid,
                                     etree.tostring(conference, encoding="unicode")))
    account.pep[bookmarks.NATIVE] = node


# -- writing ------------------------------------------------------------------------------------


def user_element(account: Account) -> etree._Element:
    """The <user/> of an account, the way read() reads it back and Prosody's importer reads
    it (mod_storage_xep0227: scram-credentials, roster, vCard, private, archive, PEP)."""
    user = etree.Element(_USER, {"name": account.user}, nsmap={None: PIE})
    credentials = account.credentials
    for hash_name, keys in (("sha1", credentials.sha1 if credentials else None),
                            ("sha256", credentials.sha256 if credentials else None)):
        if keys is None:
            continue
        element = etree.SubElement(user, f"{{{SCRAM}}}scram-credentials",
                                   {"mechanism": _MECHANISM[hash_name]}, nsmap={None: SCRAM})
        for name, value in (("server-key", base64.b64encode(keys.server_key).decode()),
                            ("stored-key", base64.b64encode(keys.stored_key).decode()),
                            ("iter-count", str(keys.iterations)),
                            ("salt", base64.b64encode(keys.salt).decode())):
            etree.SubElement(element, f"{{{SCRAM}}}{name}").text = value
    if account.roster:
        query = etree.SubElement(user, f"{{{ROSTER}}}query", nsmap={None: ROSTER})
        for item in account.roster:
            if not item.listed:
                continue
            attrs = {"jid": item.contact, "subscription": item.subscription}
            if item.name:
                attrs["name"] = item.name
            if item.pending_out:
                attrs["ask"] = "subscribe"
            element = etree.SubElement(query, f"{{{ROSTER}}}item", attrs)
            for group in item.groups:
                etree.SubElement(element, f"{{{ROSTER}}}group").text = group
        for item in account.roster:
            if item.pending_in:
                etree.SubElement(user, f"{{{CLIENT}}}presence",
                                 {"from": item.contact, "type": "subscribe"},
                                 nsmap={None: CLIENT})
    if account.vcard:
        user.append(etree.fromstring(account.vcard))
    if account.private:
        query = etree.SubElement(user, f"{{{PRIVATE}}}query", nsmap={None: PRIVATE})
        for _namespace, _name, xml in account.private:
            query.append(etree.fromstring(xml))
    if account.offline:
        offline = etree.SubElement(user, f"{{{PIE}}}offline-messages")
        for stanza in account.offline:
            offline.append(etree.fromstring(stanza))
    if account.archive:
        archive = etree.SubElement(user, f"{{{PIE_MAM}}}archive", nsmap={None: PIE_MAM})
        for entry in account.archive:
            result = etree.SubElement(archive, f"{{{MAM_NAMESPACES[0]}}}result",
                                      {"id": entry.id}, nsmap={None: MAM_NAMESPACES[0]})
            forwarded = etree.SubElement(result, f"{{{FORWARD}}}forwarded",
                                         nsmap={None: FORWARD})
            etree.SubElement(forwarded, f"{{{DELAY}}}delay", {"stamp": format_stamp(entry.ts)},
                             nsmap={None: DELAY})
            forwarded.append(etree.fromstring(entry.stanza))
    if account.pep:
        owner = etree.SubElement(user, f"{{{PUBSUB_OWNER}}}pubsub", nsmap={None: PUBSUB_OWNER})
        for node, pep in account.pep.items():
            configure = etree.SubElement(owner, f"{{{PUBSUB_OWNER}}}configure", {"node": node})
            configure.append(config_form(pep.config, type_="submit"))
        published = [(node, pep) for node, pep in account.pep.items() if pep.items]
        if published:
            pubsub = etree.SubElement(user, f"{{{PUBSUB}}}pubsub", nsmap={None: PUBSUB})
            for node, pep in published:
                items = etree.SubElement(pubsub, f"{{{PUBSUB}}}items", {"node": node})
                for stored in pep.items:
                    item = etree.SubElement(items, f"{{{PUBSUB}}}item", {"id": stored.id})
                    if stored.payload:
                        item.append(etree.fromstring(stored.payload))
    return user


def write_user_file(path: Path, account: Account) -> None:
    """One account in a file of its own, as Prosody's xep0227 driver keeps them
    (<user>@<host>.xml, whose first host and first user it reads)."""
    root = etree.Element(_SERVER_DATA, nsmap={None: PIE})
    etree.SubElement(root, _HOST, {"jid": account.domain}).append(user_element(account))
    etree.ElementTree(root).write(str(path), encoding="utf-8", xml_declaration=True)
