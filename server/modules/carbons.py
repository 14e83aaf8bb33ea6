"""Message Carbons (XEP-0280, urn:xmpp:carbons:2): every carbon-enabled resource of an
account sees both sides of the account's conversations, whichever device had them.

A resource enables carbons with ``<enable xmlns='urn:xmpp:carbons:2'/>`` (an iq set to its own
account) and may ``<disable/>`` them again. Then:

* a message a local client sends goes, wrapped in ``<sent/>``, to the account's other
  carbon-enabled resources (the router's ``filter/user`` chain, after blocking and MAM);
* a message delivered to one or some resources of the account goes, wrapped in
  ``<received/>``, to its carbon-enabled resources that did not get it (the
  ``message/delivered`` notification of server/modules/messages.py): a message to the bare JID
  that went to several top-priority resources is copied to none of those.

Copies come from the account's bare JID and carry the original in a XEP-0297
``<forwarded/>`` (§5, §6). Eligible (§6): type chat; type normal with a body or an IM payload
(chat states, receipts, markers, encryption, call invitations); incoming errors. Never:
groupchat and headline; messages with ``<private xmlns='urn:xmpp:carbons:2'/>`` (§7; the
element is removed before delivery to a local recipient) or the XEP-0334 hint ``<no-copy/>``;
MUC private messages to a full JID (XEP-0045 §7.5, they belong to the joined resource).

Archive ids (XEP-0359 §3, XEP-0313 §5.1): a ``<received/>`` copy carries the stanza-id the
delivered message got from the account's archive. A ``<sent/>`` copy carries the *sender's*
archive id (``by`` = the sender's bare JID, announced by MAM through ``archive/sent-id``), never
the recipient's: a client matches the live copy with the one its archive returns later, and no
account sees another account's archive ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server import events
from server.events import stanza_kinds
from server.jid import JID
from server.module import Module, ModuleContext, SessionSlot, Stanza, hook, iq_set
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

CARBONS = "urn:xmpp:carbons:2"
_ENABLE = f"{{{CARBONS}}}enable"
FORWARD = "urn:xmpp:forward:0"
HINTS = "urn:xmpp:hints"
SENT, RECEIVED = ns.q(CARBONS, "sent"), ns.q(CARBONS, "received")
FORWARDED = ns.q(FORWARD, "forwarded")
_PRIVATE = ns.q(CARBONS, "private")
_NO_COPY = ns.q(HINTS, "no-copy")
_MUC_USER = "{http://jabber.org/protocol/muc#user}x"
_REMEMBERED = 1000  # <private/> messages remembered between routing and delivery
_SENT_IDS = 256  # senders' archive ids remembered between MAM and the <sent/> copy
_STANZA_ID = ns.q("urn:xmpp:sid:0", "stanza-id")
# Payloads that make a bodyless normal message an IM message worth copying (§6).
_IM_NAMESPACES = frozenset({
    "http://jabber.org/protocol/chatstates",   # XEP-0085
    "urn:xmpp:receipts",                       # XEP-0184
    "urn:xmpp:chat-markers:0",                 # XEP-0333
    "eu.siacs.conversations.axolotl",          # OMEMO
    "urn:xmpp:omemo:2",
    "urn:xmpp:openpgp:0",                      # XEP-0373
    "urn:xmpp:jingle-message:0",               # XEP-0353
    "urn:xmpp:jingle-message:1",
})


def _remote_on(session: Session) -> bool:
    """A session on another node of a cluster with carbons on (its node published it)."""
    return session.remote and CARBONS in session.flags


def eligible(stanza: Stanza, incoming: bool) -> bool:
    """XEP-0280 §6: should this message be copied to the account's other resources?"""
    kind = stanza.get("type") or "normal"
    if kind in ("groupchat", "headline"):
        return False
    if kind == "error":
        return incoming  # an error bouncing a message of ours; ours are answered by clients
    if stanza.find(_PRIVATE) is not None or stanza.find(_NO_COPY) is not None:
        return False
    if kind == "chat":
        return True
    for part in stanza:
        tag = part.tag
        if not isinstance(tag, str):
            continue
        if tag == st.BODY:
            return True
        if tag[1:tag.find("}")] in _IM_NAMESPACES:
            return True
    return False


class Carbons(Module):
    name = "carbons"
    features = (CARBONS,)
    enabled = SessionSlot[bool](False)

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        # bare JID -> how many of its sessions have carbons on (a quick "no" on the hot path),
        # with [cluster] those on other nodes too (counted in _remote: remote_changed())
        self._accounts: dict[JID, int] = {}
        self._remote: dict[JID, int] = {}
        # <private/> messages for carbon-enabled accounts, the element removed, until delivered
        self._private: dict[int, Stanza] = {}
        # id(message) -> (message, the sender's archive id), from MAM until the <sent/> copy
        self._sent_ids: dict[int, tuple[Stanza, str]] = {}

    # -- enabling (§4, §5) ---------------------------------------------------------------------

    @iq_set(CARBONS, "enable", to=("self",))
    def enable(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        self.turn_on(origin)
        return st.result(stanza)

    def turn_on(self, session: Session) -> None:
        """Carbons for this session from now on (the iq, or inline in Bind2, XEP-0386)."""
        if not self.enabled.get(session):  # §4: enabling twice is no error
            self.enabled.set(session, True)
            bare = session.jid.bare
            self._accounts[bare] = self._accounts.get(bare, 0) + 1
            session.flags = session.flags | {CARBONS}
            self.server.sessions.changed(session)  # [cluster]: the other nodes copy to it

    def remote_changed(self, bare: JID) -> None:
        """[cluster] The account's sessions on other nodes changed: count those with
        carbons on."""
        count = sum(1 for s in self.server.sessions.resources(bare) if _remote_on(s))
        before = self._remote.pop(bare, 0)
        if count:
            self._remote[bare] = count
        total = self._accounts.get(bare, 0) - before + count
        if total > 0:
            self._accounts[bare] = total
        else:
            self._accounts.pop(bare, None)

    @hook(events.BIND2_FEATURES)
    def bind2_features(self) -> tuple[str, ...]:
        return (CARBONS,)

    @hook(events.BIND2_ENABLE)
    def bind2_enable(self, session: Session, el: Stanza) -> bool | None:
        """<enable xmlns='urn:xmpp:carbons:2'/> inside Bind 2's <bind/> (XEP-0386 §3)."""
        if el.tag != _ENABLE:
            return None
        self.turn_on(session)
        return True

    @iq_set(CARBONS, "disable", to=("self",))
    def disable(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        self._off(origin)
        return st.result(stanza)

    @hook(events.SESSION_CLOSED)
    def closed(self, session: Session, _reason: str) -> None:
        self._off(session)

    def turn_off(self, session: Session) -> None:
        """No more carbons for this session (it moved to another node of a cluster)."""
        self._off(session)

    def _off(self, session: Session) -> None:
        if not self.enabled.get(session):
            return
        self.enabled.clear(session)
        session.flags = session.flags - {CARBONS}
        self.server.sessions.changed(session)
        bare = session.jid.bare
        left = self._accounts.get(bare, 1) - 1
        if left > 0:
            self._accounts[bare] = left
        else:
            self._accounts.pop(bare, None)

    # -- copies ----------------------------------------------------------------------------

    @hook(events.FILTER_USER, priority=-200)
    @stanza_kinds(st.MESSAGE)
    def sent(self, stanza: Stanza, origin: Session | None, to: JID) -> None:
        """A local client's outgoing message: <sent/> to its account's other resources.
        A <private/> message for a local account loses the element before delivery (§7)."""
        accounts = self._accounts
        if not accounts or stanza.tag != st.MESSAGE:
            return None
        sender = origin if origin is not None and origin.local_client else None
        account = sender.jid.bare if sender is not None else None
        if account not in accounts and to.bare not in accounts:
            return None  # no one with carbons on at either end
        own_id = None
        if self._sent_ids:
            remembered = self._sent_ids.pop(id(stanza), None)
            if remembered is not None and remembered[0] is stanza:
                own_id = remembered[1]
        if to.domain in self.server.hosts:
            private = stanza.find(_PRIVATE)
            if private is not None:
                self._strip(stanza, private, to.bare)
                return None
        if sender is None or account is None or account not in accounts:
            return None
        if eligible(stanza, incoming=False):
            self._copy(stanza, SENT, account, (sender,), own_id)
        return None

    @hook(events.ARCHIVE_SENT_ID)
    def archived_sent(self, stanza: Stanza, account: str, ident: str) -> None:
        """MAM archived a local client's message under this id in the sender's archive (it
        runs before this module's filter/user handler): kept for the <sent/> copy."""
        if not self._accounts or JID.parse(account) not in self._accounts:
            return
        remembered = self._sent_ids
        remembered[id(stanza)] = (stanza, ident)  # the stanza held: its id() is not reused
        if len(remembered) > _SENT_IDS:  # a message whose copy was never made: forgotten
            del remembered[next(iter(remembered))]

    def _strip(self, stanza: Stanza, private: Stanza, recipient: JID) -> None:
        # Only where carbons are on at one end (elsewhere the element stays: no one copies).
        stanza.remove(private)
        if recipient in self._accounts:  # remembered, so that delivery makes no copies
            marked = self._private
            marked[id(stanza)] = stanza
            if len(marked) > _REMEMBERED:  # never delivered (bounced, dropped): forgotten
                del marked[next(iter(marked))]

    @hook(events.MESSAGE_DELIVERED)
    def received(self, stanza: Stanza, account: JID, sessions: Sequence[Session]) -> None:
        """A message handed to these sessions: <received/> to the account's others."""
        if self._private and self._private.pop(id(stanza), None) is stanza:
            return  # it was <private/>
        accounts = self._accounts
        if not sessions or not accounts or account not in accounts:
            return
        if not eligible(stanza, incoming=True):
            return
        if (stanza.find(_MUC_USER) is not None and len(sessions) == 1
                and stanza.get("to") == sessions[0].jid_str):
            return  # a MUC private message: only the joined resource takes part
        sender = stanza.get("from")
        skip = [s for s in self.server.sessions.resources(account) if s.jid_str == sender]
        self._copy(stanza, RECEIVED, account, (*sessions, *skip))

    @hook(events.MESSAGE_COPIED_TO)
    def copied_to(self, stanza: Stanza, session: Session) -> list[Session] | None:
        """The account's resources that had a <received/> copy of this message delivered to
        `session` (stream management asks before it hands an unacknowledged one on)."""
        account = session.jid.bare
        if account not in self._accounts or not eligible(stanza, incoming=True):
            return None
        if stanza.find(_MUC_USER) is not None and stanza.get("to") == session.jid_str:
            return None  # a MUC private message was copied to no one
        return [s for s in self.server.sessions.resources(account)
                if s is not session and (self.enabled.get(s) or _remote_on(s))]

    def _copy(self, stanza: Stanza, kind: str, account: JID,
              skip: Sequence[Session], own_id: str | None = None) -> None:
        recipients = [s for s in self.server.sessions.resources(account)
                      if s not in skip and (self.enabled.get(s) or _remote_on(s))]
        if not recipients:
            return
        bare = str(account)
        attrs = {"from": bare}
        type_ = stanza.get("type")
        if type_ is not None:
            attrs["type"] = type_
        for session in recipients:
            wrapper = st.element(st.MESSAGE, {**attrs, "to": session.jid_str})
            forwarded = st.child(st.child(wrapper, kind), FORWARDED)
            inner = st.standalone(stanza)
            if kind == SENT:
                self._own_ids_only(inner, bare, own_id)
            forwarded.append(inner)
            session.send(wrapper)

    def _own_ids_only(self, inner: Stanza, account: str, own_id: str | None) -> None:
        """A <sent/> copy: the recipient's archive id (stamped by our MAM when the recipient
        is local) goes; the sender's own goes in (XEP-0359 §3: 'by' the archive's JID)."""
        hosts = self.server.hosts
        for claimed in inner.findall(_STANZA_ID):
            by = claimed.get("by") or ""
            if by != account and by.rpartition("@")[2].partition("/")[0] in hosts:
                inner.remove(claimed)
        if own_id is not None:
            st.child(inner, _STANZA_ID, {"by": account, "id": own_id})
