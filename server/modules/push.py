"""Push Notifications (XEP-0357, urn:xmpp:push:0): wake a phone's app when a message arrives
while the app is not connected.

A client registers its app server (a PubSub service, often a component or a remote server
that talks to the phone vendor's push service) with an iq set to its own account::

    <enable xmlns='urn:xmpp:push:0' jid='push.example' node='yxs32uqsflafdk3iuqo'>
      <x xmlns='jabber:x:data' type='submit'>   <!-- optional publish-options (§5) -->
        <field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>
        <field var='secret'><value>…</value></field>
      </x>
    </enable>

and removes it with ``<disable jid='…' [node='…']/>`` (no node: every node of that app server).
Registrations are per account and stored (server/storage/push.py), so they survive restarts.

When a chat or normal message with a body (or an encrypted payload, or a call invitation)
arrives for an account none of whose sessions has a connection — every session detached
(stream management, waiting to be resumed) or none at all (the message went to offline
storage) — the server publishes to each registration's node, from the account's bare JID, an
item ``<notification xmlns='urn:xmpp:push:0'>`` with the ``urn:xmpp:push:summary`` form
(§6.2): ``message-count`` (messages notified since the account last had a connected session),
``last-message-sender``, and ``last-message-body`` only when ``[push] include_body = true`` or
the client asked for it in its publish-options with the field
``urn:presenced:push:include-body`` = true (which is not passed on). The publish-options go
with each publish (§5). An app server that answers with an error saying the registration is
invalid (item-not-found, forbidden, not-authorized, registration-required, not-allowed, gone)
loses it. Groupchat messages are not notified (rooms have their own history).

    [push]
    include_body = false    # message bodies in notifications for every registration
    max_registrations = 5   # per account; more gets <resource-constraint/>
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from lxml import etree

from server import events
from server.config import bool_option, int_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, Stanza, hook, iq_set
from server.sessions import Session
from server.storage.db import log_failure
from server.storage.push import SPEC, PushRegistration, PushStore
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.push")

PUSH = "urn:xmpp:push:0"
PUBSUB = "http://jabber.org/protocol/pubsub"
SUMMARY = "urn:xmpp:push:summary"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
INCLUDE_BODY = "urn:presenced:push:include-body"  # our publish-options field (not passed on)
_X = ns.q(ns.DATA_FORMS, "x")
_FIELD = ns.q(ns.DATA_FORMS, "field")
_VALUE = ns.q(ns.DATA_FORMS, "value")
# The app server says this registration is no good (anything else may pass: it is kept).
_GONE = frozenset({"item-not-found", "forbidden", "not-authorized", "registration-required",
                   "not-allowed", "gone"})
_NOTIFY = frozenset({"{eu.siacs.conversations.axolotl}encrypted", "{urn:xmpp:omemo:2}encrypted",
                     "{urn:xmpp:openpgp:0}openpgp", "{urn:xmpp:jingle-message:0}propose",
                     "{urn:xmpp:jingle-message:1}propose", st.BODY})
_ANSWER_TIMEOUT = 60.0  # seconds an app server's answer is waited for
_REMEMBERED = 1000  # messages per account remembered as notified (see delivered())
# Stored forms are our own serialisation; parse them as untrusted anyway.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PushSettings:
    # Message bodies in notifications for every registration (else only for clients asking).
    include_body: bool = field(metadata=bool_option(False))
    # Registrations per account; one more gets <resource-constraint/>.
    max_registrations: int = field(metadata=int_option(1, 100, 5))


def notifiable(stanza: Stanza) -> bool:
    """A message worth waking the phone for: chat or normal, with a body or the like."""
    if stanza.get("type") in ("error", "headline", "groupchat"):
        return False
    return any(part.tag in _NOTIFY for part in stanza)


def form_fields(form: Stanza) -> dict[str, list[str]]:
    return {f.get("var", ""): [v.text or "" for v in f.iter(_VALUE)] for f in form.iter(_FIELD)}


class Push(Module):
    name = "push"
    features = (PUSH,)
    settings = PushSettings
    stores = (SPEC,)

    def __init__(self, server: ModuleContext, config: PushSettings) -> None:
        super().__init__(server, config)
        self.store: PushStore = self.store_of(SPEC)
        self._unseen: dict[JID, int] = {}  # account -> messages notified since it was online
        # account -> messages notified while handed to its detached sessions (id -> message)
        self._notified: dict[JID, dict[int, Stanza]] = {}
        # id of a publish -> (account, registration), until the app server answers
        self._waiting: dict[str, tuple[JID, PushRegistration]] = {}
        self._prefix = "push-" + secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)

    # -- registrations (§5) ------------------------------------------------------------------

    @hook(events.DISCO_ACCOUNT_INFO)
    def account_feature(self, query: Stanza, _stanza: Stanza, _origin: Session | None) -> None:
        # §4: the account's bare JID advertises the feature.
        st.child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": PUSH})

    @iq_set(PUSH, "enable", to=("self",))
    async def enable(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        el = stanza[0]
        service = _service(el)
        node = el.get("node")
        if not node:
            raise StanzaError("bad-request", "<enable/> needs a 'node'")
        options = None
        form = el.find(_X)
        if form is not None:
            if (form.get("type") != "submit"
                    or form_fields(form).get("FORM_TYPE") != [PUBLISH_OPTIONS]):
                raise StanzaError("bad-request", "the form must be a submitted "
                                  f"{PUBLISH_OPTIONS} form")
            options = etree.tostring(st.standalone(form))
        bare = origin.jid.bare
        assert bare.local is not None
        existing = await self.store.get(bare.local, bare.domain)
        if (len(existing) >= self.config.max_registrations
                and not any(r.service == service and r.node == node for r in existing)):
            raise StanzaError("resource-constraint", "too many push registrations")
        await self.store.put(bare.local, bare.domain, PushRegistration(service, node, options))
        log.info("event=push-enabled jid=%s service=%s", bare, service)
        return st.result(stanza)

    @iq_set(PUSH, "disable", to=("self",))
    async def disable(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        el = stanza[0]
        service = _service(el)
        bare = origin.jid.bare
        assert bare.local is not None
        removed = await self.store.remove(bare.local, bare.domain, service, el.get("node") or None)
        log.info("event=push-disabled jid=%s service=%s count=%d", bare, service, removed)
        return st.result(stanza)

    # -- notifications (§6) ------------------------------------------------------------------

    @hook(events.SESSION_BOUND)
    def bound(self, session: Session) -> None:
        self._connected(session.jid.bare)

    def _connected(self, account: JID) -> None:
        if self._unseen:
            self._unseen.pop(account, None)
        if self._notified:
            self._notified.pop(account, None)

    @hook(events.MESSAGE_DELIVERED)
    def delivered(self, stanza: Stanza, account: JID, sessions: Sequence[Session]) -> None:
        for session in sessions:  # the hot path: handed to a connected session
            if session.connected:
                if self._unseen or self._notified:
                    self._connected(account)  # someone is connected: no push, count anew
                return
        if not notifiable(stanza):
            return
        for session in self.server.sessions.resources(account):
            if session.connected:
                self._connected(account)
                return
        notified = self._notified.get(account)
        if sessions:
            # Handed to detached sessions: when one of them ends unresumed, stream management
            # hands its unacknowledged messages to offline storage; no second notification.
            if notified is None:
                notified = self._notified[account] = {}
            notified[id(stanza)] = stanza
            if len(notified) > _REMEMBERED:
                del notified[next(iter(notified))]
        elif notified is not None and notified.pop(id(stanza), None) is stanza:
            return  # notified when it reached the detached session
        count = self._unseen.get(account, 0) + 1
        self._unseen[account] = count
        self.server.router.spawn(self._notify(account, stanza, count))

    async def _notify(self, account: JID, stanza: Stanza, count: int) -> None:
        assert account.local is not None
        try:
            registrations = await self.store.get(account.local, account.domain)
        except Exception:
            log_failure(log, "event=push-lookup-failed jid=%s", account)
            return
        if not registrations:
            self._unseen.pop(account, None)
            return
        sender = stanza.get("from") or ""
        body = stanza.findtext(st.BODY)
        router = self.server.router
        for registration in registrations:
            iq = self._publish(account, registration, count, sender, body)
            ident = iq.get("id", "")
            self._waiting[ident] = (account, registration)
            self.server.loop.call_later(_ANSWER_TIMEOUT, self._waiting.pop, ident, None)
            log.info("event=push-notify jid=%s service=%s count=%d", account,
                     registration.service, count)
            pending = router.route(iq, None)
            if pending is not None:
                await pending

    def _publish(self, account: JID, registration: PushRegistration, count: int, sender: str,
                 body: str | None) -> Stanza:
        options = None
        with_body = self.config.include_body
        if registration.options is not None:
            options = etree.fromstring(registration.options, _PARSER)
            for f in options.findall(_FIELD):
                if f.get("var") == INCLUDE_BODY:
                    with_body = with_body or f.findtext(_VALUE) in ("1", "true")
                    options.remove(f)
        iq = st.iq("set", to=registration.service, from_=str(account),
                   id_=f"{self._prefix}{next(self._ids)}")
        pubsub = st.child(iq, ns.q(PUBSUB, "pubsub"))
        publish = st.child(pubsub, ns.q(PUBSUB, "publish"), {"node": registration.node})
        notification = st.child(st.child(publish, ns.q(PUBSUB, "item")),
                                ns.q(PUSH, "notification"))
        form = st.child(notification, _X, {"type": "submit"})
        fields = [("FORM_TYPE", SUMMARY), ("message-count", str(count)),
                  ("last-message-sender", sender)]
        if with_body and body is not None:
            fields.append(("last-message-body", body))
        for var, value in fields:
            st.child(st.child(form, _FIELD, {"var": var}), _VALUE, text=value)
        if options is not None:
            st.child(pubsub, ns.q(PUBSUB, "publish-options")).append(options)
        return iq

    @hook(events.IQ_RESPONSE)
    def answered(self, stanza: Stanza, _origin: Session | None, _to: JID) -> object:
        waiting = self._waiting.pop(stanza.get("id", ""), None)
        if waiting is None:
            return None
        account, registration = waiting
        if stanza.get("from") != registration.service:
            self._waiting[stanza.get("id", "")] = waiting  # not the app server: not its answer
            return None
        if stanza.get("type") == "error":
            condition = _condition(stanza)
            log.info("event=push-error jid=%s service=%s condition=%s", account,
                     registration.service, condition)
            if condition in _GONE:
                self.server.router.spawn(self._forget(account, registration))
        return True

    async def _forget(self, account: JID, registration: PushRegistration) -> None:
        assert account.local is not None
        await self.store.remove(account.local, account.domain, registration.service,
                                registration.node)
        log.info("event=push-registration-removed jid=%s service=%s", account,
                 registration.service)


def _service(el: Stanza) -> str:
    try:
        return str(JID.parse(el.get("jid") or ""))
    except InvalidJID as exc:
        raise StanzaError("bad-request", f"'jid' must be the app server's JID: {exc}") from exc


def _condition(stanza: Stanza) -> str:
    error = stanza.find(st.ERROR)
    if error is not None:
        for part in error:
            if isinstance(part.tag, str) and part.tag.startswith(f"{{{ns.STANZA_ERRORS}}}") \
                    and not part.tag.endswith("}text"):
                return part.tag.partition("}")[2]
    return "undefined-condition"

