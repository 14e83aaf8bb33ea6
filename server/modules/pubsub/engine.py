"""The publish-subscribe engine (XEP-0060), pure: node configuration (defaults, XEP-0004 forms,
publish-options preconditions, §7.1.5), access models (§4.5), the node model (`Node`: its
configuration, affiliations, subscriptions and their options), the operations on a node
(subscription states, affiliation changes, publish models, the last item) that return the
`Notification`s to send, and the elements of requests, replies and event notifications. No
I/O: the one iq front (protocol.py) reads requests, stores, and delivers the notifications;
PEP (pep.py) and the service (service.py) add their policy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza
from server.xml import ns
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int, parse_optional_int

PUBSUB = "http://jabber.org/protocol/pubsub"
EVENT = PUBSUB + "#event"
OWNER = PUBSUB + "#owner"
ERRORS = PUBSUB + "#errors"
NODE_CONFIG = PUBSUB + "#node_config"
PUBLISH_OPTIONS = PUBSUB + "#publish-options"
META_DATA = PUBSUB + "#meta-data"
SUBSCRIBE_AUTHORIZATION = PUBSUB + "#subscribe_authorization"
DATA = ns.DATA_FORMS

X = ns.q(DATA, "x")
FIELD = ns.q(DATA, "field")
VALUE = ns.q(DATA, "value")
OPTION = ns.q(DATA, "option")

ACCESS_MODELS = ("open", "presence", "roster", "whitelist", "authorize")
# Longest node name and item id we take, in UTF-8 bytes (XEP-0060 sets none): an item id
# holds a full JID at most (XEP-0402 bookmarks use room JIDs; RFC 7622 §3.1: 3071 bytes).
MAX_NODE_LENGTH = 1024
MAX_ITEM_ID_LENGTH = 3071
# The largest max_items a request may name (any larger count means "all" anyway).
_MAX_COUNT = (1 << 63) - 1
PUBLISH_MODELS = ("publishers", "subscribers", "open")
MAX = "max"  # pubsub#max_items = max: as many as the service allows


class PubsubError(StanzaError):
    """A stanza error with a XEP-0060 application condition (pubsub#errors), §7–§8."""

    def __init__(self, condition: str, app: str | None = None, text: str | None = None, *,
                 feature: str | None = None) -> None:
        super().__init__(condition, text)
        self.app = app
        self.feature = feature


def error_reply(stanza: etree._Element, err: StanzaError) -> etree._Element:
    """The error reply, with the pubsub#errors condition when there is one."""
    reply = st.error_reply(stanza, err)
    app = getattr(err, "app", None)
    if app is not None:
        error = reply.find(st.ERROR)
        assert error is not None
        feature = getattr(err, "feature", None)
        condition = st.child(error, ns.q(ERRORS, app))
        if feature:
            condition.set("feature", feature)
    return reply


def unsupported(feature: str) -> PubsubError:
    return PubsubError("feature-not-implemented", "unsupported", feature=feature)


# -- node configuration -----------------------------------------------------------------------


def _bool(value: str) -> bool:
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise ValueError(value)


def _max_items(value: str) -> int | str:
    if value == MAX:
        return MAX
    return parse_int(value, minimum=0, maximum=_MAX_COUNT, name="pubsub#max_items")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(value)
        return value
    return parse


@dataclass(frozen=True)
class ConfigField:
    key: str                       # our key in the stored configuration
    type: str                      # XEP-0004 field type
    parse: Callable[[str], Any]
    label: str | None
    options: tuple[tuple[str, str], ...] = ()  # (value, label) of a list-single


def _options(*values: str) -> tuple[tuple[str, str], ...]:
    """List options labelled with their values: the labels Prosody's mod_pubsub gives them
    (its scansion scripts, tests/test_scansion.py, expect them), which clients show."""
    return tuple((v, v) for v in values)


_ACCESS_OPTIONS = _options(*sorted(ACCESS_MODELS))
_PUBLISH_OPTIONS = _options(*PUBLISH_MODELS)
_SEND_LAST_OPTIONS = _options("never", "on_sub", "on_sub_and_presence")


# XEP-0060 §16.4.4 (pubsub#node_config), in the order, with the labels and option labels,
# Prosody's mod_pubsub uses (clients were tested against it; the XEP leaves them open).
FIELDS: dict[str, ConfigField] = {
    "pubsub#title": ConfigField("title", "text-single", str, "Title"),
    "pubsub#description": ConfigField("description", "text-single", str, "Description"),
    "pubsub#type": ConfigField(
        "type", "text-single", str,
        "The type of node data, usually specified by the namespace of the payload (if any)"),
    "pubsub#max_items": ConfigField("max_items", "text-single", _max_items,
                                    "Max # of items to persist"),
    "pubsub#persist_items": ConfigField("persist_items", "boolean", _bool,
                                        "Persist items to storage"),
    "pubsub#access_model": ConfigField("access_model", "list-single", _choice(*ACCESS_MODELS),
                                       "Specify the subscriber model",
                                       _ACCESS_OPTIONS),
    "pubsub#roster_groups_allowed": ConfigField("roster_groups_allowed", "list-multi", str,
                                                "Roster groups allowed to subscribe"),
    "pubsub#publish_model": ConfigField("publish_model", "list-single",
                                        _choice(*PUBLISH_MODELS), "Specify the publisher model",
                                        _PUBLISH_OPTIONS),
    "pubsub#send_last_published_item": ConfigField(
        "send_last_published_item", "list-single",
        _choice("never", "on_sub", "on_sub_and_presence"),
        None, _SEND_LAST_OPTIONS),  # no label: see UNLABELLED
    "pubsub#deliver_notifications": ConfigField("deliver_notifications", "boolean", _bool,
                                                "Whether to deliver event notifications"),
    "pubsub#deliver_payloads": ConfigField(
        "deliver_payloads", "boolean", _bool,
        "Whether to deliver payloads with event notifications"),
    "pubsub#notification_type": ConfigField(
        "notification_type", "list-single", _choice("headline", "normal"),
        "Specify the delivery style for notifications",
        (("normal", "Messages of type normal"), ("headline", "Messages of type headline"))),
    "pubsub#notify_delete": ConfigField(
        "notify_delete", "boolean", _bool,
        "Whether to notify subscribers when the node is deleted"),
    "pubsub#notify_retract": ConfigField(
        "notify_retract", "boolean", _bool,
        "Whether to notify subscribers when items are removed from the node"),
    # Which JID an event's items carry as 'publisher' (Prosody's reading of the field).
    "pubsub#itemreply": ConfigField(
        "itemreply", "list-single", _choice("owner", "publisher", "none"),
        "Specify whose JID to include as the publisher of items",
        (("owner", "Include the node owner's JID"),
         ("publisher", "Include the item publisher's JID"),
         ("none", "Don't include any JID with items"))),
}
_VAR_OF = {f.key: var for var, f in FIELDS.items()}
# The one field sent without a label, as Prosody's mod_pubsub sends it: Prosody's scansion
# scripts (tests/test_scansion.py: pubsub_config, pubsub_max_items, pubsub_multi_items,
# pubsub_preconditions) match the form strictly. Its options are labelled.
UNLABELLED = frozenset({"pubsub#send_last_published_item"})
_VALIDATE = ns.q("http://jabber.org/protocol/xdata-validate", "validate")

# XEP-0163 §4 (PEP) node defaults: access model presence, the last item kept and sent.
PEP_DEFAULTS: dict[str, Any] = {
    "title": "",
    "description": "",
    "type": "",
    "max_items": 1,
    "persist_items": True,
    "access_model": "presence",
    "roster_groups_allowed": [],
    "publish_model": "publishers",
    "send_last_published_item": "on_sub_and_presence",
    "deliver_notifications": True,
    "deliver_payloads": True,
    "notification_type": "headline",
    "notify_delete": True,
    "notify_retract": True,
    "itemreply": "none",
}


def node_config(stored: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A full configuration: the defaults completed by what is stored."""
    config = dict(PEP_DEFAULTS)
    if stored:
        config.update({k: v for k, v in stored.items() if k in PEP_DEFAULTS})
    return config


def max_items(config: Mapping[str, Any], limit: int) -> int:
    """How many items the node keeps: its max_items, `max` and larger values capped at limit."""
    value = config.get("max_items", 1)
    return limit if value == MAX else min(int(value), limit)


def form_values(form: etree._Element | None, form_type: str) -> dict[str, Any]:
    """key -> parsed value of a submitted form (node_config or publish-options); bad-request
    for a form of another type; not-acceptable for a value out of range. Unknown fields are
    left out (a service may ignore them)."""
    if form is None:
        return {}
    if form.get("type") not in (None, "submit", "result"):
        raise PubsubError("bad-request", text="the form must be submitted")
    values: dict[str, Any] = {}
    for field in form.iter(FIELD):
        var = field.get("var")
        texts = [v.text or "" for v in field.findall(VALUE)]
        if var == "FORM_TYPE":
            if texts[:1] != [form_type]:
                raise PubsubError("bad-request", text=f"FORM_TYPE must be {form_type}")
            continue
        spec = FIELDS.get(var or "")
        if spec is None:
            continue
        try:
            if spec.type == "list-multi":
                values[spec.key] = [spec.parse(t) for t in texts if t]
            else:
                values[spec.key] = spec.parse(texts[0] if texts else "")
        except (ValueError, IndexError):
            raise PubsubError("not-acceptable", text=f"invalid value for {var}") from None
    return values


def publish_options(form: etree._Element | None) -> dict[str, Any]:
    """The preconditions of a publish (§7.1.5): the form's values; a field the service does
    not know is a precondition it cannot meet (conflict + precondition-not-met naming it,
    whether the node exists or would be auto-created with it), a bad value not-acceptable."""
    values = form_values(form, PUBLISH_OPTIONS)
    for field in form.iter(FIELD) if form is not None else ():
        var = field.get("var") or ""
        if var != "FORM_TYPE" and var not in FIELDS:
            raise PubsubError("conflict", "precondition-not-met",
                              f"Unsupported publish option: {var}")
    return values


def unmet_preconditions(config: Mapping[str, Any], options: Mapping[str, Any]) -> list[str]:
    """XEP-0060 §7.1.5: the publish-options whose value differs from the node's."""
    return [_VAR_OF[key] for key, value in options.items() if config.get(key) != value]


def precondition_error(unmet: list[str]) -> PubsubError:
    """§7.1.5: conflict + precondition-not-met, naming the first field as Prosody does."""
    return PubsubError("conflict", "precondition-not-met",
                       f"Field does not match: {unmet[0].removeprefix('pubsub#')}")


def config_form(config: Mapping[str, Any], form_type: str = NODE_CONFIG,
                type_: str = "form", max_items: int | None = None) -> etree._Element:
    """The node configuration as a XEP-0004 form (§8.2.1), or the meta-data of disco#info;
    max_items: the service's limit, told with XEP-0122 validation (1 to it, or `max`)."""
    form = st.element(X, {"type": type_})
    hidden = st.child(form, FIELD, {"var": "FORM_TYPE", "type": "hidden"})
    st.child(hidden, VALUE, text=form_type)
    for var, spec in FIELDS.items():
        if spec.key not in config:
            continue
        # Labelled in the meta-data result too (XEP-0004 §3.2; issue 19 item 5).
        attrs = {"var": var, "type": spec.type}
        if spec.label is not None:
            attrs["label"] = spec.label
        field = st.child(form, FIELD, attrs)
        if spec.key == "max_items" and max_items is not None and type_ == "form":
            validate = st.child(field, _VALIDATE, {"datatype": "pubsub:integer-or-max"})
            st.child(validate, ns.q("http://jabber.org/protocol/xdata-validate", "range"),
                     {"min": "1", "max": str(max_items)})
        if type_ == "form":
            for value, label in spec.options:
                st.child(st.child(field, OPTION, {"label": label}), VALUE, text=value)
        value = config[spec.key]
        for text in value if isinstance(value, list) else [value]:
            if text != "":  # an empty text field has no value (as Prosody writes it)
                st.child(field, VALUE, text=_text(text))
    return form


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # as Prosody writes them
    return str(value)


# -- access models (XEP-0060 §4.5) ------------------------------------------------------------


def check_access(config: Mapping[str, Any], *, owner: bool, subscriber: bool,
                 in_roster: bool, member: bool = False, approved: bool = False,
                 outcast: bool = False) -> None:
    """May this entity retrieve items (and get notifications)? Raises the §6.1.3 error.
    `subscriber`: to the owner's presence; `approved`: its subscription to the node was
    approved by the owner (the authorize model, §4.5); `member`: affiliated as publisher or
    member; `outcast`: banned (§4.1: forbidden)."""
    if outcast:
        raise PubsubError("forbidden", text="you are banned from this node")
    if owner or member:
        return
    model = config.get("access_model", "presence")
    if model == "open":
        return
    if model == "authorize":
        if not approved:  # §6.5.9.9 (retrieve), §7.1.2 notifications: approved subscribers
            raise PubsubError("not-authorized", "not-subscribed")
        return
    if model == "presence":
        if not subscriber:
            raise PubsubError("not-authorized", "presence-subscription-required")
        return
    if model == "roster":
        if not in_roster:
            raise PubsubError("not-authorized", "not-in-roster-group")
        return
    raise PubsubError("not-allowed", "closed-node")


def may_access(config: Mapping[str, Any], **facts: bool) -> bool:
    try:
        check_access(config, **facts)
    except PubsubError:
        return False
    return True


# -- a node's state (XEP-0060 §4) --------------------------------------------------------------


@dataclass
class Node:
    """A node: its configuration, affiliations (bare JID -> owner, publisher, member or
    outcast; PEP: the account owns every node of its own), explicit subscriptions (bare or
    full JID -> 'subscribed' | 'pending') and their §6.3 options (JID -> values given)."""
    config: dict[str, Any]
    affiliations: dict[str, str] = dataclasses.field(default_factory=dict)
    subscriptions: dict[str, str] = dataclasses.field(default_factory=dict)
    options: dict[str, dict[str, bool]] = dataclasses.field(default_factory=dict)
    # The newest stored item (id, publisher, stored payload; None: no item) when `last_known`,
    # so that the last item goes to a new subscriber or +notify resource without a read:
    # set when a publish commits and by a read nothing overtook (`generation` unchanged),
    # forgotten when items are retracted, purged or trimmed.
    last: tuple[str, str, str] | None = dataclasses.field(default=None, compare=False,
                                                         repr=False)
    last_known: bool = dataclasses.field(default=False, compare=False, repr=False)
    generation: int = dataclasses.field(default=0, compare=False, repr=False)

    def remember_last(self, item: tuple[str, str, str] | None) -> None:
        self.last, self.last_known = item, True
        self.generation += 1

    def forget_last(self) -> None:
        self.last, self.last_known = None, False
        self.generation += 1

    def affiliation(self, jid: JID) -> str:
        return self.affiliations.get(str(jid.bare), "none")

    def owners(self) -> list[str]:
        return [j for j, a in sorted(self.affiliations.items()) if a == "owner"]

    def approved(self, jid: JID) -> bool:
        """Subscribed (with the full JID or the bare one)."""
        return "subscribed" in (self.subscriptions.get(str(jid)),
                                self.subscriptions.get(str(jid.bare)))

    def delivers(self, jid: str) -> bool:
        """§6.3: pubsub#deliver (true unless the subscriber turned it off)."""
        return self.options.get(jid, {}).get("deliver", True)

    def facts(self, who: JID) -> dict[str, bool]:
        """What the node's own state says of an entity, for check_access."""
        affiliation = self.affiliation(who)
        return {"owner": affiliation == "owner", "member": affiliation in ("publisher", "member"),
                "outcast": affiliation == "outcast", "approved": self.approved(who)}


# -- elements ---------------------------------------------------------------------------------


def item_element(namespace: str, item_id: str, payload: etree._Element | None,
                 publisher: str | None = None) -> etree._Element:
    attrs = {"id": item_id}
    if publisher:
        attrs["publisher"] = publisher
    item = st.element(ns.q(namespace, "item"), attrs)
    if payload is not None:
        item.append(payload)
    return item


def event_message(from_: str, event: etree._Element, type_: str = "headline") -> etree._Element:
    """<message type='headline'><event xmlns='…#event'>…</event></message> (§7.1.2.1);
    the caller sets 'to' on each copy."""
    message = st.element(st.MESSAGE, {"from": from_, "type": type_})
    message.append(event)
    return message


def items_event(node: str, items: Iterable[etree._Element]) -> etree._Element:
    event = st.element(ns.q(EVENT, "event"))
    holder = st.child(event, ns.q(EVENT, "items"), {"node": node})
    for item in items:
        holder.append(item)
    return event


def retract_event(node: str, item_id: str) -> etree._Element:
    event = st.element(ns.q(EVENT, "event"))
    holder = st.child(event, ns.q(EVENT, "items"), {"node": node})
    st.child(holder, ns.q(EVENT, "retract"), {"id": item_id})
    return event


def subscription_element(namespace: str, node: str, jid: str, state: str) -> etree._Element:
    """<subscription node jid subscription/> (§6.1.2 reply, §8.6 event, §5.6 listing)."""
    return st.element(ns.q(namespace, "subscription"),
                      {"node": node, "jid": jid, "subscription": state})


def subscription_reply(node: str, jid: str, state: str) -> etree._Element:
    """The <pubsub/> of a subscribe result (§6.1.2; 'pending' for an authorize node, §6.1.2.2)."""
    reply = st.element(ns.q(PUBSUB, "pubsub"))
    reply.append(subscription_element(PUBSUB, node, jid, state))
    return reply


def subscription_event(node: str, jid: str, state: str) -> etree._Element:
    """§8.6.2 / §8.8.4: the subscriber is told its subscription's new state."""
    event = st.element(ns.q(EVENT, "event"))
    event.append(subscription_element(EVENT, node, jid, state))
    return event


def authorization_request(from_: str, node: str, jid: str) -> etree._Element:
    """§8.6.1: the form a node owner gets for a pending subscription (an ordinary message,
    kept offline when the owner is not online)."""
    message = st.element(st.MESSAGE, {"from": from_})
    form = st.child(message, X, {"type": "form"})
    st.child(form, ns.q(DATA, "title"), text="PubSub subscriber request")
    st.child(form, ns.q(DATA, "instructions"),
             text="To approve this entity's subscription request, click the OK button. "
                  "To deny the request, click the cancel button.")
    for var, type_, label, value in (
            ("FORM_TYPE", "hidden", None, SUBSCRIBE_AUTHORIZATION),
            ("pubsub#node", "text-single", "Node ID", node),
            ("pubsub#subscriber_jid", "jid-single", "Subscriber Address", jid),
            ("pubsub#allow", "boolean", "Allow this JID to subscribe to this pubsub node?",
             "false")):
        attrs = {"var": var, "type": type_}
        if label:
            attrs["label"] = label
        st.child(st.child(form, FIELD, attrs), VALUE, text=value)
    return message


def authorization_answer(message: etree._Element) -> tuple[str, str, bool | None] | None:
    """(node, subscriber JID, allowed) of an owner's §8.6.2 answer; None when the message
    carries no subscribe_authorization form; allowed None for a form that is not submitted
    (cancelled: the request stays pending)."""
    for form in message.findall(X):
        values = {f.get("var"): f.findtext(VALUE) or "" for f in form.findall(FIELD)}
        if values.get("FORM_TYPE") != SUBSCRIBE_AUTHORIZATION and form.get("type") != "cancel":
            continue
        if form.get("type") != "submit":
            return values.get("pubsub#node", ""), values.get("pubsub#subscriber_jid", ""), None
        try:
            allowed = _bool(values.get("pubsub#allow", ""))
        except ValueError:
            allowed = False
        return values.get("pubsub#node", ""), values.get("pubsub#subscriber_jid", ""), allowed
    return None


def node_event(kind: str, node: str, redirect: str | None = None) -> etree._Element:
    """<delete/> (with <redirect uri/>) or <purge/> (§8.4.2, §8.5.2)."""
    event = st.element(ns.q(EVENT, "event"))
    action = st.child(event, ns.q(EVENT, kind), {"node": node})
    if redirect:
        st.child(action, ns.q(EVENT, "redirect"), {"uri": redirect})
    return event


# -- operations on a node: decisions and the notifications they cause, no I/O ------------------


@dataclass(frozen=True)
class Notification:
    """A message (without 'to') and who gets it; the front serialises it once and routes a
    copy to each (server/xml/writer.addressed_copies)."""
    message: etree._Element
    to: tuple[str, ...]


def notification(service: str, node: Node, event: etree._Element,
                 to: Iterable[str]) -> Notification:
    return Notification(event_message(service, event, node.config["notification_type"]),
                        tuple(to))


def subscribers(node: Node) -> list[str]:
    """The explicit subscribers that get notifications (§7.1.2.1; §6.3 deliver)."""
    return [jid for jid, state in node.subscriptions.items()
            if state == "subscribed" and node.delivers(jid)]


def subscription_state(node: Node, who: JID, jid: JID, facts: Mapping[str, bool]) -> str:
    """The state a subscribe request gets (§6.1): 'pending' on an authorize node for an entity
    neither owner nor member (§6.1.2.2; 'subscribed' if it was approved already), else
    'subscribed' when the access model admits it (the §6.1.3 errors otherwise); one subscribes
    one's own bare or full JID (§6.1.3.1)."""
    if jid.bare != who.bare:
        raise PubsubError("bad-request", "invalid-jid", "subscribe your own JID")
    if (node.config["access_model"] == "authorize" and not facts.get("outcast")
            and not (facts.get("owner") or facts.get("member"))):
        return "subscribed" if node.subscriptions.get(str(jid)) == "subscribed" else "pending"
    check_access(node.config, **facts)
    return "subscribed"


def authorization_requests(service: str, name: str, node: Node,
                           jid: str) -> list[Notification]:
    """§8.6.1: the form each owner gets for a pending subscription."""
    return [Notification(authorization_request(service, name, jid), tuple(node.owners()))]


def check_unsubscribe(node: Node, who: JID, jid: JID) -> None:
    """§6.2.3: one's own subscription (or an owner's), which must exist."""
    if jid.bare != who.bare and node.affiliation(who) != "owner":
        raise PubsubError("forbidden", text="unsubscribe your own JID")  # §6.2.3.3
    if str(jid) not in node.subscriptions:
        raise PubsubError("unexpected-request", "not-subscribed",
                          "no such subscription")  # §6.2.3.2


def check_options_request(node: Node, who: JID, jid: JID | None) -> str:
    """§6.3.4: a subscriber's JID (jid-required without one), others' options only for an
    owner (forbidden), and a subscription (not-subscribed)."""
    if jid is None:
        raise PubsubError("bad-request", "jid-required", "options name a JID")
    if jid.bare != who.bare and node.affiliation(who) != "owner":
        raise PubsubError("forbidden", text="another entity's options")
    if node.subscriptions.get(str(jid)) is None:
        raise PubsubError("unexpected-request", "not-subscribed", "no such subscription")
    return str(jid)


def subscription_changed(service: str, name: str, jid: str, state: str) -> Notification:
    """§8.8.4 (and §8.6.2): the subscriber is told its subscription's new state."""
    return Notification(event_message(service, subscription_event(name, jid, state)), (jid,))


AFFILIATIONS = ("owner", "publisher", "member", "none", "outcast")


def change_affiliations(node: Node, changes: Iterable[tuple[JID, str]]) -> list[str]:
    """§8.9.2: the owner's changes ('none' removes one); a node keeps an owner (not-acceptable
    otherwise, nothing changed, §8.9.2.4); outcasts lose their subscriptions, whose JIDs are
    returned."""
    changed = dict(node.affiliations)
    for jid, affiliation in changes:
        if affiliation not in AFFILIATIONS:
            raise PubsubError("bad-request", text=f"unknown affiliation {affiliation!r}")
        if affiliation == "none":
            changed.pop(str(jid.bare), None)
        else:
            changed[str(jid.bare)] = affiliation
    if "owner" not in changed.values():
        raise PubsubError("not-acceptable", text="a node keeps at least one owner")
    node.affiliations = changed
    gone = [j for j in node.subscriptions
            if changed.get(str(JID.parse(j).bare)) == "outcast"]
    for jid_text in gone:
        del node.subscriptions[jid_text]
        node.options.pop(jid_text, None)
    return gone


def check_publisher(node: Node, who: JID) -> None:
    """§7.1.3.1 and pubsub#publish_model: publishers (owners and publishers), subscribers
    (those too) or open (anyone but outcasts)."""
    affiliation = node.affiliation(who)
    if affiliation in ("owner", "publisher"):
        return
    model = node.config.get("publish_model", "publishers")
    if affiliation != "outcast" and (
            model == "open" or (model == "subscribers" and node.approved(who))):
        return
    raise PubsubError("forbidden", text="you may not publish to this node")


def check_retracter(node: Node, who: JID) -> None:
    if node.affiliation(who) not in ("owner", "publisher"):
        raise PubsubError("forbidden", text="only owners and publishers retract")


def last_item(service: str, name: str, node: Node, jid: JID, facts: Mapping[str, bool],
              item: tuple[str, str, str] | None, publisher: str | None, *,
              on_sub: bool) -> Notification | None:
    """The newest item (id, publisher, stored payload) to one entity: on a new subscription
    (§6.1.7) when send_last_published_item is on_sub or on_sub_and_presence, on presence
    (XEP-0163 §4.3.2) when on_sub_and_presence; not to one the access model refuses, nor when
    the subscriber's options say deliver = false (§6.3)."""
    when = node.config["send_last_published_item"]
    if item is None or when == "never" or (when == "on_sub" and not on_sub):
        return None
    if not node.delivers(str(jid)) or not may_access(node.config, **facts):
        return None
    item_id, _stored_publisher, payload = item
    shown = parse_stored(payload) if node.config["deliver_payloads"] else None
    event = items_event(name, [item_element(EVENT, item_id, shown, publisher)])
    return notification(service, node, event, [str(jid)])


# -- the wire, for both front doors (PEP and the service) ---------------------------------------

# Stored payloads are our own serialisation; still parsed as untrusted.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                          remove_comments=True, remove_pis=True)


def node_attr(action: Stanza) -> str:
    """The node a request names (XEP-0060: nodeid-required without one; not-acceptable for a
    name longer than MAX_NODE_LENGTH)."""
    node = action.get("node")
    if not node:
        raise PubsubError("bad-request", "nodeid-required", "the request names no node")
    return checked_node(node)


def checked_node(node: str) -> str:
    if len(node) > MAX_NODE_LENGTH // 4 and len(node.encode()) > MAX_NODE_LENGTH:
        raise PubsubError("not-acceptable",
                          text=f"a node name has at most {MAX_NODE_LENGTH} bytes")
    return node


def checked_item_id(item_id: str) -> str:
    """An item id from the wire, at most MAX_ITEM_ID_LENGTH bytes (issue 20: 10,000-character
    ids were kept): not-acceptable, as for a payload too big (§7.1.3.4)."""
    if len(item_id) > MAX_ITEM_ID_LENGTH // 4 and len(item_id.encode()) > MAX_ITEM_ID_LENGTH:
        raise PubsubError("not-acceptable",
                          text=f"an item id has at most {MAX_ITEM_ID_LENGTH} bytes")
    return item_id


def standalone(payload: Stanza) -> Stanza:
    """A payload to keep: a copy without the declarations of the stanza around it."""
    kept = copy.deepcopy(payload)
    etree.cleanup_namespaces(kept)
    return kept


def parse_stored(text: str) -> Stanza | None:
    return etree.fromstring(text, _PARSER) if text else None


def item_payload(payloads: list[Stanza], config: Mapping[str, Any],
                 max_size: int) -> tuple[Stanza | None, str]:
    """The payload of a published item and its stored text, checked as XEP-0060 §7.1.3
    says (payload-required for a node that delivers payloads, payload-too-big)."""
    if not payloads and config["deliver_payloads"]:
        raise PubsubError("bad-request", "payload-required", "the item needs a payload")
    payload = standalone(payloads[0]) if payloads else None
    text = etree.tostring(payload, encoding="unicode") if payload is not None else ""
    if len(text.encode()) > max_size:
        raise PubsubError("not-acceptable", "payload-too-big",
                          f"a payload may have at most {max_size} bytes")
    return payload, text


# -- subscription options (XEP-0060 §6.3, §6.4) -----------------------------------------------

SUBSCRIBE_OPTIONS = PUBSUB + "#subscribe_options"
# var -> (key, label); booleans. pubsub#include_body is kept and told back, nothing more.
SUBSCRIPTION_FIELDS = {
    "pubsub#deliver": ("deliver", "Enable delivery?"),
    "pubsub#include_body": ("include_body", "Receive message body in addition to payload?"),
}
DEFAULT_SUBSCRIPTION = {"deliver": True, "include_body": False}


def subscription_options_form(options: Mapping[str, Any] | None = None) -> etree._Element:
    """The §6.3.2 options form, with a subscriber's values (or the §6.4 defaults)."""
    values = {**DEFAULT_SUBSCRIPTION, **(options or {})}
    form = st.element(X, {"type": "form"})
    hidden = st.child(form, FIELD, {"var": "FORM_TYPE", "type": "hidden"})
    st.child(hidden, VALUE, text=SUBSCRIBE_OPTIONS)
    for var, (key, label) in SUBSCRIPTION_FIELDS.items():
        field = st.child(form, FIELD, {"var": var, "type": "boolean", "label": label})
        st.child(field, VALUE, text=_text(bool(values[key])))
    return form


def subscription_options(form: etree._Element | None) -> dict[str, bool]:
    """The values of a submitted options form; §6.3.6/§6.3.7: bad-request <invalid-options/>
    for a missing or other form, an unknown field or a value that is not a boolean."""
    if form is None or form.get("type") not in (None, "submit"):
        raise PubsubError("bad-request", "invalid-options", "submit the options form")
    values: dict[str, bool] = {}
    for field in form.iter(FIELD):
        var = field.get("var") or ""
        text = field.findtext(VALUE) or ""
        if var == "FORM_TYPE":
            if text != SUBSCRIBE_OPTIONS:
                raise PubsubError("bad-request", "invalid-options",
                                  f"FORM_TYPE must be {SUBSCRIBE_OPTIONS}")
            continue
        if var not in SUBSCRIPTION_FIELDS:
            raise PubsubError("bad-request", "invalid-options", f"unknown option {var!r}")
        try:
            values[SUBSCRIPTION_FIELDS[var][0]] = _bool(text)
        except ValueError:
            raise PubsubError("bad-request", "invalid-options",
                              f"{var} is a boolean") from None
    return values


def items_request(request: Stanza) -> tuple[list[str], int | None]:
    """An <items/> retrieval (XEP-0060 §6.5): the item ids asked for, and max_items, a
    positive number (§6.5.7; 0, negative or unreadable: bad-request, issue 20)."""
    ids = [checked_item_id(i.get("id") or "") for i in request.findall(ns.q(PUBSUB, "item"))]
    try:
        return ids, parse_optional_int(request.get("max_items"), minimum=1,
                                       maximum=_MAX_COUNT, name="max_items")
    except NumberError as err:
        raise PubsubError("bad-request", text=f"max_items: {err.reason}") from None
