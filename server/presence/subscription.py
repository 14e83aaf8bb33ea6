"""The presence-subscription state machine of RFC 6121 §3 and Appendix A, pure.

A roster item's state (from the user's side) is a subscription (none/to/from/both) plus two
pending flags and the pre-approval flag. `outbound` is A.2 (the user's own client sends a
subscription stanza to the contact); `inbound` is A.3 (such a stanza arrives for the user).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

Kind = Literal["subscribe", "subscribed", "unsubscribe", "unsubscribed"]


class Subscription(StrEnum):
    NONE = "none"
    TO = "to"
    FROM = "from"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class SubState:
    subscription: Subscription = Subscription.NONE
    pending_out: bool = False   # shown as ask='subscribe'
    pending_in: bool = False    # an inbound request awaiting the user's decision
    approved: bool = False      # RFC 6121 §3.4 pre-approval

    @property
    def to(self) -> bool:
        return self.subscription in (Subscription.TO, Subscription.BOTH)

    @property
    def from_(self) -> bool:
        return self.subscription in (Subscription.FROM, Subscription.BOTH)

    @property
    def name(self) -> str:
        """The Appendix A state name, e.g. 'None + Pending Out/In'."""
        base = {"none": "None", "to": "To", "from": "From", "both": "Both"}[self.subscription]
        if self.pending_out and self.pending_in:
            return base + " + Pending Out/In"
        if self.pending_out:
            return base + " + Pending Out"
        if self.pending_in:
            return base + " + Pending In"
        return base

    @classmethod
    def parse(cls, name: str) -> SubState:
        base, _, pending = name.partition(" + ")
        pending = pending.removeprefix("Pending ")
        return cls(Subscription(base.lower()), pending_out="Out" in pending,
                   pending_in="In" in pending.replace("Out/In", "In"))


NONE_STATE = SubState()


def _with(to: bool, from_: bool, pending_out: bool, pending_in: bool,
          approved: bool = False) -> SubState:
    sub = (Subscription.BOTH if to and from_ else Subscription.TO if to
           else Subscription.FROM if from_ else Subscription.NONE)
    # A pending-out request is meaningless once subscribed to; pending-in once the contact is
    # a subscriber (Appendix A has no such states).
    return SubState(sub, pending_out and not to, pending_in and not from_, approved and not from_)


@dataclass(frozen=True, slots=True)
class Outbound:
    """The user's server handling a subscription stanza from the user's client (A.2)."""

    state: SubState
    route: bool           # route the stanza (stamped with the bare JID) to the contact
    roster_push: bool     # the item changed: push it to interested resources
    send_presence: bool   # §3.1.5: after approving, send the user's current presence
    send_unavailable: bool  # §3.2.2: after cancelling, send unavailable from each resource


@dataclass(frozen=True, slots=True)
class Inbound:
    """The user's server handling a subscription stanza from a contact (A.3)."""

    state: SubState
    deliver: bool         # deliver to the user's available resources
    roster_push: bool
    auto_reply: Kind | None  # answer the contact on the user's behalf
    send_presence: bool   # the contact just became a subscriber by pre-approval: send presence
    store_pending: bool   # keep the request to redeliver at login (§3.1.3)
    send_unavailable: bool = False  # §3.3.3: the contact stopped watching: unavailable to it


def outbound(state: SubState | None, kind: Kind) -> Outbound:
    s = state or NONE_STATE
    to, frm, out, inn = s.to, s.from_, s.pending_out, s.pending_in
    if kind == "subscribe":
        # A.2.1: route always; to/both already subscribed: no change.
        new = s if to else _with(to, frm, True, inn, s.approved)
        return Outbound(new, True, new != s or state is None, False, False)
    if kind == "unsubscribe":
        # A.2.2: drop 'to' and any pending-out; always routed (§3.3.2).
        new = _with(False, frm, False, inn, s.approved)
        return Outbound(new, True, new != s, False, False)
    if kind == "subscribed":
        if inn:
            # A.2.3: approve the pending request: the contact becomes a subscriber.
            new = _with(to, True, out, False)
            return Outbound(new, True, True, True, False)
        if not frm and not s.approved:
            # §3.4.1: pre-approval; the stanza is not routed.
            new = replace(s, approved=True)
            return Outbound(new, False, True, False, False)
        return Outbound(s, False, False, False, False)
    # unsubscribed (A.2.4): cancel the contact's subscription or deny its request.
    if frm or inn:
        new = _with(to, False, out, False)
        return Outbound(new, True, True, False, frm)
    if s.approved:  # §3.4: cancels a pre-approval, nothing to route
        new = replace(s, approved=False)
        return Outbound(new, False, True, False, False)
    return Outbound(s, False, False, False, False)


def inbound(state: SubState | None, kind: Kind) -> Inbound:
    s = state or NONE_STATE
    to, frm, out, inn = s.to, s.from_, s.pending_out, s.pending_in
    if kind == "subscribe":
        if frm:
            # §3.1.3: already a subscriber: answer 'subscribed' for the user.
            return Inbound(s, False, False, "subscribed", False, False)
        if s.approved:
            # §3.4.2: pre-approved: subscribed at once, the user is not asked.
            new = _with(to, True, out, False)
            return Inbound(new, False, True, "subscribed", True, False)
        if inn:
            return Inbound(s, False, False, None, False, False)  # A.3.1: no state change
        # A.3.1: no roster item is created or pushed for an inbound request (§3.1.3).
        new = _with(to, frm, out, True)
        return Inbound(new, True, False, None, False, True)
    if kind == "unsubscribe":
        # A.3.2: the contact no longer wants our presence.
        if frm or inn:
            new = _with(to, False, out, False)
            return Inbound(new, True, frm, None, False, False, send_unavailable=frm)
        return Inbound(s, False, False, None, False, False)
    if kind == "subscribed":
        # A.3.3: only meaningful with our request pending.
        if out:
            new = _with(True, frm, False, inn, s.approved)
            return Inbound(new, True, True, None, False, False)
        return Inbound(s, False, False, None, False, False)
    # unsubscribed (A.3.4): our subscription is cancelled or our request denied.
    if to or out:
        new = _with(False, frm, False, inn, s.approved)
        return Inbound(new, True, True, None, False, False)
    return Inbound(s, False, False, None, False, False)


def is_subscriber(state: SubState | None) -> bool:
    """The contact receives the user's presence (an RFC 2778 watcher)."""
    return state is not None and state.from_


def is_subscribed_to(state: SubState | None) -> bool:
    return state is not None and state.to
