"""Bookmarks both ways, pure: XEP-0048 (one <storage xmlns='storage:bookmarks'/> in private XML,
XEP-0049) and XEP-0402 (one PEP item per room in urn:xmpp:bookmarks:1, the room JID as item id).

XEP-0402 §5.3 (compatibility): a server that unifies the two announces
``urn:xmpp:bookmarks:1#compat`` on the account; a new XEP-0402 list is read back as XEP-0048
(each item cast into a <conference/> whose jid is the item id), and a XEP-0048 list replacing
the old one updates the items one by one, without notifications for unchanged ones. The
private.py module moves them; this file only converts.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

from server.xml import stanza as st

LEGACY = "storage:bookmarks"        # XEP-0048
NATIVE = "urn:xmpp:bookmarks:1"     # XEP-0402
COMPAT = NATIVE + "#compat"
# The node configuration XEP-0402 §3 asks clients to publish with (whitelist: private data).
OPTIONS: dict[str, Any] = {"persist_items": True, "max_items": "max",
                           "send_last_published_item": "never", "access_model": "whitelist"}

_CONFERENCE = f"{{{LEGACY}}}conference"
_TRUE = ("true", "1")


def _text(conference: etree._Element, namespace: str, name: str) -> str | None:
    found = conference.find(f"{{{namespace}}}{name}")
    return found.text or "" if found is not None else None


def key(conference: etree._Element) -> tuple[Any, ...]:
    """What both versions say about a room (to tell a changed bookmark from an unchanged one)."""
    namespace = etree.QName(conference).namespace or ""
    return (conference.get("name") or "", conference.get("autojoin") in _TRUE,
            _text(conference, namespace, "nick") or "",
            _text(conference, namespace, "password") or "")


def from_legacy(storage: etree._Element,
                current: dict[str, etree._Element | None]) -> dict[str, etree._Element]:
    """room JID -> XEP-0402 <conference/> for each room of a XEP-0048 list; the <extensions/>
    of the current item of a room are kept (XEP-0402 §2: they are preserved on edits)."""
    rooms: dict[str, etree._Element] = {}
    for old in storage.iter(_CONFERENCE):
        jid = old.get("jid")
        if not jid:
            continue
        conference = st.element(f"{{{NATIVE}}}conference")
        if old.get("name"):
            conference.set("name", old.get("name", ""))
        if old.get("autojoin") in _TRUE:
            conference.set("autojoin", "true")
        for name in ("nick", "password"):
            value = _text(old, LEGACY, name)
            if value is not None:
                st.child(conference, f"{{{NATIVE}}}{name}", text=value)
        previous = current.get(jid)
        extensions = previous.find(f"{{{NATIVE}}}extensions") if previous is not None else None
        if extensions is not None:
            conference.append(extensions)
        rooms[jid] = conference
    return rooms


def to_legacy(items: list[tuple[str, etree._Element | None]],
              stored: etree._Element | None) -> etree._Element:
    """The XEP-0048 <storage/> of the XEP-0402 items, with the <url/> bookmarks (which
    XEP-0402 dropped) of what private XML holds."""
    storage = etree.Element(f"{{{LEGACY}}}storage", nsmap={None: LEGACY})
    for jid, conference in items:
        if conference is None or conference.tag != f"{{{NATIVE}}}conference":
            continue
        legacy = etree.SubElement(storage, _CONFERENCE, {"jid": jid})
        if conference.get("name"):
            legacy.set("name", conference.get("name", ""))
        legacy.set("autojoin", "true" if conference.get("autojoin") in _TRUE else "false")
        for name in ("nick", "password"):
            value = _text(conference, NATIVE, name)
            if value is not None:
                etree.SubElement(legacy, f"{{{LEGACY}}}{name}").text = value
    if stored is not None:
        for url in stored.iter(f"{{{LEGACY}}}url"):
            storage.append(url)
    return storage
