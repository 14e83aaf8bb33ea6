"""The presence-subscription state machine of RFC 6121 §3 and Appendix A, pure (sans-IO).

A presentity (RFC 2778) is an account's bare JID; its watchers are the contacts whose roster
items say 'from' or 'both'. Each roster item holds one `SubState`, seen from the account
that owns the roster ("the user"); the other party is "the contact".

`outbound` is what the user's server does when the user's own client sends a subscription
stanza to the contact (Appendix A.2, §3.1.2, §3.1.5, §3.2.2, §3.3.2, §3.4.2). `inbound` is
what it does when such a stanza arrives from the contact (A.3, §3.1.3, §3.1.6, §3.2.3,
§3.3.3). Both are total: any state (or no roster item, `None`) and any kind give a result,
and the result's state always satisfies the invariants below.

Invariants of a stored state (Appendix A.1 has exactly nine states, plus the §3.4 flag):
- pending_out only without 'to' (there is no "To + Pending Out");
- pending_in only without 'from' (there is no "From + Pending In");
- approved only without 'from' and without pending_in: a pre-approval is consumed by the
  contact's request (§3.4), and an approval of a pending request is not a pre-approval.

Roster items and hidden records. An inbound request from a contact who is not in the roster
must not add a roster item (§3.1.3: nothing is pushed until the user approves), but it must
be kept to redeliver at login (§3.1.3). The store keeps it as a record that is not listed
(`RosterItem.listed` false) holding only the state "None + Pending In". The user's own actions
list the contact (`Outbound.create_item`); `roster_item_needed` says when a record can go.
Inbound stanzas never list a contact, so a hidden record never needs a roster push.

Consistency between the two servers (tests/test_subscription_states.py checks all three):
- when exchanges do not overlap, the user has 'to' iff the contact has 'from' (and a
  request is pending out on one side iff it is pending in on the other);
- 'from' only ever comes from the user's own 'subscribed' (an approval or a pre-approval not
  since revoked by 'unsubscribed'), and 'to' only from the user's own 'subscribe';
- overlapping exchanges can diverge, because a 'subscribed' names no request: one that
  crosses the requester's unsubscribe + subscribe approves the newer request. The login
  probe repairs the side that believes it is subscribed (§4.3.2: non-watchers are answered
  'unsubscribed'); a contact left with 'from' only sends presence it chose to share.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Kind = Literal["subscribe", "subscribed", "unsubscribe", "unsubscribed"]
KINDS: tuple[Kind, ...] = ("subscribe", "subscribed", "unsubscribe", "unsubscribed")


class Subscription(StrEnum):
    NONE = "none"
    TO = "to"
    FROM = "from"
    BOTH = "both"


def _subscription(to: bool, from_: bool) -> Subscription:
    if to:
        return Subscription.BOTH if from_ else Subscription.TO
    return Subscription.FROM if from_ else Subscription.NONE


_BASE_NAMES = {Subscription.NONE: "None", Subscription.TO: "To",
               Subscription.FROM: "From", Subscription.BOTH: "Both"}


@dataclass(frozen=True, slots=True)
class SubState:
    """One roster item's subscription state, as stored."""

    subscription: Subscription = Subscription.NONE
    pending_out: bool = False   # the user asked the contact; shown as ask='subscribe'
    pending_in: bool = False    # the contact asked the user; stored, redelivered at login
    approved: bool = False      # §3.4 pre-approval of the contact's future request

    @property
    def to(self) -> bool:
        """The user receives the contact's presence."""
        return self.subscription in (Subscription.TO, Subscription.BOTH)

    @property
    def from_(self) -> bool:
        """The contact receives the user's presence: a watcher of the user's presentity."""
        return self.subscription in (Subscription.FROM, Subscription.BOTH)

    @property
    def name(self) -> str:
        """The Appendix A.1 state name, e.g. "None + Pending Out/In" (approved not shown)."""
        base = _BASE_NAMES[self.subscription]
        if self.pending_out and self.pending_in:
            return base + " + Pending Out/In"
        if self.pending_out:
            return base + " + Pending Out"
        if self.pending_in:
            return base + " + Pending In"
        return base

    @property
    def valid(self) -> bool:
        """Whether the state is one of Appendix A.1's (with the §3.4 flag where it can be)."""
        return self == _normal(self)

    @classmethod
    def parse(cls, name: str, *, approved: bool = False) -> SubState:
        """The state an Appendix A.1 name denotes; ValueError for anything else."""
        state = _BY_NAME.get(name)
        if state is None:
            raise ValueError(f"not an RFC 6121 Appendix A.1 state name: {name!r}")
        if approved:
            state = SubState(state.subscription, state.pending_out, state.pending_in, True)
            if not state.valid:
                raise ValueError(f"{name!r} cannot carry a pre-approval (RFC 6121 §3.4)")
        return state


NONE_STATE = SubState()

STATES: tuple[SubState, ...] = tuple(
    SubState(_subscription(to, from_), out, in_)
    for to, from_, out, in_ in (
        (False, False, False, False), (False, False, True, False),
        (False, False, False, True), (False, False, True, True),
        (True, False, False, False), (True, False, False, True),
        (False, True, False, False), (False, True, True, False),
        (True, True, False, False)))
"""The nine states of Appendix A.1, in the RFC's order."""

_BY_NAME = {s.name: s for s in STATES}


def _make(to: bool, from_: bool, pending_out: bool, pending_in: bool,
          approved: bool) -> SubState:
    return SubState(_subscription(to, from_), pending_out and not to,
                    pending_in and not from_, approved and not from_ and not pending_in)


def _normal(s: SubState) -> SubState:
    return _make(s.to, s.from_, s.pending_out, s.pending_in, s.approved)


def _visible(s: SubState) -> tuple[Subscription, bool, bool]:
    """What a roster item shows (§2.1.2): pending_in is not part of it."""
    return s.subscription, s.pending_out, s.approved


@dataclass(frozen=True, slots=True)
class Outbound:
    """The user's server handling a subscription stanza from the user's own client (A.2)."""

    state: SubState      # the item's new state (equal to the old one when nothing changes)
    route: bool          # stamp with the user's bare JID and route to the contact
    roster_push: bool    # the item's visible state changed: push it to interested resources
    create_item: bool    # the contact must be a listed roster item: create it, or list a
    #                      hidden pending-in record (§3.1.2 subscribe, §3.1.5 approval,
    #                      §3.4.2 pre-approval)
    send_presence: bool  # §3.1.5: after routing 'subscribed', send the user's current
    #                      presence from each available resource to the contact
    send_unavailable: bool  # §3.2.2: BEFORE routing 'unsubscribed', send 'unavailable' from
    #                         each available resource, while the contact is still a watcher


@dataclass(frozen=True, slots=True)
class Inbound:
    """The user's server handling a subscription stanza from the contact (A.3)."""

    state: SubState
    deliver: bool        # deliver to the user's available resources (§3.1.3) or interested
    #                      resources (§3.1.6, §3.2.3, §3.3.3), stamped from the bare JID
    roster_push: bool    # the item's visible state changed: push it (never for hidden records)
    auto_reply: Kind | None  # answer the contact on the user's behalf with this type
    send_presence: bool  # the contact is a watcher and just asked: send the user's current
    #                      presence from each available resource (§3.1.5 flow, §3.4)
    store_pending: bool  # keep this request to redeliver at every login until the user
    #                      decides (§3.1.3); a new pending_in record, hidden if no item exists
    send_unavailable: bool  # §3.3.3: the contact stopped watching: 'unavailable' from each
    #                         of the user's available resources to it


def outbound(state: SubState | None, kind: Kind) -> Outbound:
    """A.2: the user's client sent `kind` to the contact; `state` is None without an item."""
    old = _normal(state) if state is not None else NONE_STATE
    to, frm, out, inn, ok = old.to, old.from_, old.pending_out, old.pending_in, old.approved
    route = create = presence = unavailable = False
    if kind == "subscribe":
        # A.2.1, §3.1.2: routed without exception, so the contact's server can resynchronise
        # (it answers 'subscribed' itself if the user is already a watcher there).
        new = _make(to, frm, True, inn, ok)
        route = create = True
    elif kind == "unsubscribe":
        # A.2.2, §3.3.2: routed without exception; drops 'to' and any request of ours.
        new = _make(False, frm, False, inn, ok)
        route = True
    elif kind == "subscribed":
        if inn:
            # A.2.3 "Pending In" rows, §3.1.5: approve; the contact becomes a watcher.
            new = _make(to, True, out, False, False)
            route = create = presence = True
        elif not frm:
            # A.2.3 None / None + Pending Out / To, §3.4.2: a pre-approval, never routed.
            new = _make(to, frm, out, inn, True)
            create = True
        else:
            new = old  # §3.4.2: From / From + Pending Out / Both: silently ignored
    elif kind == "unsubscribed":
        if frm or inn:
            # A.2.4, §3.2.2: cancel the contact's subscription, or deny its request.
            new = _make(to, False, out, False, False)
            route = True
            unavailable = frm
        else:
            # A.2.4 None / None + Pending Out / To: not routed; note [1]: this cancels a
            # pre-approval (§3.4.2).
            new = _make(to, frm, out, inn, False)
    else:
        raise ValueError(f"not a subscription stanza type: {kind!r}")
    push = _visible(new) != _visible(old) or (create and state is None)
    return Outbound(new, route, push, create, presence, unavailable)


def inbound(state: SubState | None, kind: Kind) -> Inbound:
    """A.3: `kind` arrived from the contact; `state` is None when there is no record."""
    old = _normal(state) if state is not None else NONE_STATE
    to, frm, out, inn, ok = old.to, old.from_, old.pending_out, old.pending_in, old.approved
    deliver = store = presence = unavailable = False
    reply: Kind | None = None
    if kind == "subscribe":
        if frm:
            # A.3.1 From / From + Pending Out / Both: not delivered, no change; §3.1.3: the
            # server MUST answer 'subscribed' for the user (the sender lost sync).
            new, reply, presence = old, "subscribed", True
        elif ok:
            # §3.4: pre-approved: approve at once without asking the user.
            new = _make(to, True, out, False, False)
            reply, presence = "subscribed", True
        elif inn:
            new = old  # A.3.1 "Pending In" rows: a duplicate, not delivered again
        else:
            # A.3.1 None / None + Pending Out / To: deliver and keep it (§3.1.3).
            new = _make(to, frm, out, True, ok)
            deliver = store = True
    elif kind == "unsubscribe":
        if frm or inn:
            # A.3.2, §3.3.3: the contact stops watching, or withdraws its request.
            new = _make(to, False, out, False, ok)
            deliver = True
            unavailable = frm
        else:
            new = old  # A.3.2 None / None + Pending Out / To: not delivered
    elif kind == "subscribed":
        if out:
            # A.3.3, §3.1.6: our request is approved.
            new = _make(True, frm, False, inn, ok)
            deliver = True
        else:
            new = old  # A.3.3: unsolicited: MUST NOT deliver, no change (§3.1.6)
    elif kind == "unsubscribed":
        if to or out:
            # A.3.4, §3.2.3: our subscription is cancelled, or our request denied.
            new = _make(False, frm, False, inn, ok)
            deliver = True
        else:
            new = old  # A.3.4 None / None + Pending In / From: not delivered
    else:
        raise ValueError(f"not a subscription stanza type: {kind!r}")
    push = _visible(new) != _visible(old)
    return Inbound(new, deliver, push, reply, presence, store, unavailable)


def is_subscriber(state: SubState | None) -> bool:
    """The contact receives the user's presence: an RFC 2778 watcher (from/both).

    A probe from anyone else is answered 'unsubscribed' (§4.3.2), which does not touch a
    pre-approval: that answer is server-generated and does not go through `outbound`."""
    return state is not None and state.from_


def is_subscribed_to(state: SubState | None) -> bool:
    """The user receives the contact's presence (to/both): probed at login (§4.3.1)."""
    return state is not None and state.to


def roster_item_needed(state: SubState | None, *, listed: bool) -> bool:
    """Whether the stored record for a contact must be kept after a transition.

    A listed item stays until the user removes it (§2.5). A hidden record exists only to
    hold an inbound request (§3.1.3); once the request is withdrawn or denied it holds
    nothing and is deleted, without a roster push since it was never pushed."""
    return listed or (state is not None and state != NONE_STATE)
