"""RFC 6121 Appendix A subscription states, row by row, and two servers kept in step.

The tables below are Appendix A.2 (the user's server processing the user's own outbound
subscription stanzas) and A.3 (processing inbound ones), one pytest row per table row, as
"EXISTING STATE | ROUTE?/DELIVER? | NEW STATE". A.2.1 and A.2.2 route without exception
(the contact's server resynchronises from them); "pre-approval" is §3.4.2.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.presence.subscription import (
    KINDS,
    NONE_STATE,
    STATES,
    Kind,
    Subscription,
    SubState,
    inbound,
    is_subscribed_to,
    is_subscriber,
    outbound,
    roster_item_needed,
)

A_2_1 = """
None                  | yes | None + Pending Out
None + Pending Out    | yes | no state change
None + Pending In     | yes | None + Pending Out/In
None + Pending Out/In | yes | no state change
To                    | yes | no state change
To + Pending In       | yes | no state change
From                  | yes | From + Pending Out
From + Pending Out    | yes | no state change
Both                  | yes | no state change
"""
A_2_2 = """
None                  | yes | no state change
None + Pending Out    | yes | None
None + Pending In     | yes | no state change
None + Pending Out/In | yes | None + Pending In
To                    | yes | None
To + Pending In       | yes | None + Pending In
From                  | yes | no state change
From + Pending Out    | yes | From
Both                  | yes | From
"""
A_2_3 = """
None                  | no  | pre-approval
None + Pending Out    | no  | pre-approval
None + Pending In     | yes | From
None + Pending Out/In | yes | From + Pending Out
To                    | no  | pre-approval
To + Pending In       | yes | Both
From                  | no  | no state change
From + Pending Out    | no  | no state change
Both                  | no  | no state change
"""
A_2_4 = """
None                  | no  | no state change
None + Pending Out    | no  | no state change
None + Pending In     | yes | None
None + Pending Out/In | yes | None + Pending Out
To                    | no  | no state change
To + Pending In       | yes | To
From                  | yes | None
From + Pending Out    | yes | None + Pending Out
Both                  | yes | To
"""
A_3_1 = """
None                  | yes  | None + Pending In
None + Pending Out    | yes  | None + Pending Out/In
None + Pending In     | no   | no state change
None + Pending Out/In | no   | no state change
To                    | yes  | To + Pending In
To + Pending In       | no   | no state change
From                  | no * | no state change
From + Pending Out    | no * | no state change
Both                  | no * | no state change
"""
A_3_2 = """
None                  | no  | no state change
None + Pending Out    | no  | no state change
None + Pending In     | yes | None
None + Pending Out/In | yes | None + Pending Out
To                    | no  | no state change
To + Pending In       | yes | To
From                  | yes | None
From + Pending Out    | yes | None + Pending Out
Both                  | yes | To
"""
A_3_3 = """
None                  | no  | no state change
None + Pending Out    | yes | To
None + Pending In     | no  | no state change
None + Pending Out/In | yes | To + Pending In
To                    | no  | no state change
To + Pending In       | no  | no state change
From                  | no  | no state change
From + Pending Out    | yes | Both
Both                  | no  | no state change
"""
A_3_4 = """
None                  | no  | no state change
None + Pending Out    | yes | None
None + Pending In     | no  | no state change
None + Pending Out/In | yes | None + Pending In
To                    | yes | None
To + Pending In       | yes | None + Pending In
From                  | no  | no state change
From + Pending Out    | yes | From
Both                  | yes | From
"""


@dataclass(frozen=True)
class Row:
    table: str
    kind: Kind
    old: SubState
    flag: bool          # ROUTE? (A.2) or DELIVER? (A.3)
    starred: bool       # A.3.1 "no *": the server auto-replies 'subscribed'
    new: SubState

    @property
    def id(self) -> str:
        return f"{self.table} {self.kind}: {self.old.name} -> {self.new.name}" + (
            " (pre-approved)" if self.new.approved else "")


def rows(table: str, kind: Kind, text: str) -> list[Row]:
    out = []
    for line in text.strip().splitlines():
        existing, flag, new = (part.strip() for part in line.split("|"))
        old = SubState.parse(existing)
        if new == "no state change":
            after = old
        elif new == "pre-approval":
            after = SubState.parse(existing, approved=True)
        else:
            after = SubState.parse(new)
        out.append(Row(table, kind, old, flag.startswith("yes"), flag.endswith("*"), after))
    assert len(out) == 9 and {r.old for r in out} == set(STATES), table
    return out


OUTBOUND_ROWS = (rows("A.2.1", "subscribe", A_2_1) + rows("A.2.2", "unsubscribe", A_2_2)
                 + rows("A.2.3", "subscribed", A_2_3) + rows("A.2.4", "unsubscribed", A_2_4))
INBOUND_ROWS = (rows("A.3.1", "subscribe", A_3_1) + rows("A.3.2", "unsubscribe", A_3_2)
                + rows("A.3.3", "subscribed", A_3_3) + rows("A.3.4", "unsubscribed", A_3_4))


@pytest.mark.parametrize("row", OUTBOUND_ROWS, ids=lambda r: r.id)
def test_appendix_a2_outbound(row: Row) -> None:
    result = outbound(row.old, row.kind)
    assert result.state == row.new
    assert result.route is row.flag
    visible_change = (row.new.subscription, row.new.pending_out, row.new.approved) != (
        row.old.subscription, row.old.pending_out, row.old.approved)
    assert result.roster_push is visible_change
    # §3.1.5: presence follows an approval; §3.2.2: 'unavailable' precedes a cancellation.
    assert result.send_presence is (row.kind == "subscribed" and row.flag)
    assert result.send_unavailable is (row.kind == "unsubscribed" and row.old.from_)
    # §3.1.2 / §3.1.5 / §3.4.2: the user's subscribe and subscribed list the contact.
    assert result.create_item is (row.kind == "subscribe" or (
        row.kind == "subscribed" and not row.old.from_))


@pytest.mark.parametrize("row", INBOUND_ROWS, ids=lambda r: r.id)
def test_appendix_a3_inbound(row: Row) -> None:
    result = inbound(row.old, row.kind)
    assert result.state == row.new
    assert result.deliver is row.flag
    assert result.auto_reply == ("subscribed" if row.starred else None)
    assert result.send_presence is row.starred
    # §3.1.3: a new request is kept for redelivery at login; nothing else is.
    assert result.store_pending is (row.new.pending_in and not row.old.pending_in)
    # §3.3.3 step 3: a watcher that leaves gets 'unavailable' from each resource.
    assert result.send_unavailable is (row.kind == "unsubscribe" and row.old.from_)
    # Roster items show subscription and ask, not pending_in (§2.1.2).
    assert result.roster_push is ((row.new.subscription, row.new.pending_out)
                                  != (row.old.subscription, row.old.pending_out))


# §3.4: pre-approval. Possible only in None, None + Pending Out and To.
PRE_APPROVED = [SubState.parse(n, approved=True) for n in ("None", "None + Pending Out", "To")]


@pytest.mark.parametrize("old", PRE_APPROVED, ids=lambda s: s.name)
def test_preapproved_subscribe_is_approved_without_asking(old: SubState) -> None:
    result = inbound(old, "subscribe")
    assert result.state == SubState(
        Subscription.BOTH if old.to else Subscription.FROM, pending_out=old.pending_out)
    assert not result.state.approved  # consumed: the next request asks the user again
    assert result.auto_reply == "subscribed"
    assert result.deliver is False and result.store_pending is False
    assert result.roster_push and result.send_presence


@pytest.mark.parametrize("old", PRE_APPROVED, ids=lambda s: s.name)
def test_unsubscribed_cancels_preapproval_without_routing(old: SubState) -> None:
    # A.2.4 note [1].
    result = outbound(old, "unsubscribed")
    assert result.state == SubState(old.subscription, pending_out=old.pending_out)
    assert not result.route and result.roster_push and not result.send_unavailable


@pytest.mark.parametrize("old", PRE_APPROVED, ids=lambda s: s.name)
def test_preapproval_is_idempotent(old: SubState) -> None:
    result = outbound(old, "subscribed")
    assert result.state == old and not result.route and not result.roster_push


@pytest.mark.parametrize("old", PRE_APPROVED, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_own_subscription_leaves_preapproval(old: SubState, kind: Kind) -> None:
    # The flag concerns the contact's subscription to the user, not the user's to it.
    assert outbound(old, kind).state.approved


@pytest.mark.parametrize("old", PRE_APPROVED, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["subscribed", "unsubscribed", "unsubscribe"])
def test_other_inbound_stanzas_leave_preapproval(old: SubState, kind: Kind) -> None:
    assert inbound(old, kind).state.approved


def test_no_item_outbound() -> None:
    # §3.1.2: subscribe creates the item; §3.4.2 step 4: so does a pre-approval.
    sub = outbound(None, "subscribe")
    assert sub.state == SubState.parse("None + Pending Out")
    assert sub.route and sub.create_item and sub.roster_push
    pre = outbound(None, "subscribed")
    assert pre.state == SubState.parse("None", approved=True)
    assert not pre.route and pre.create_item and pre.roster_push
    for kind in ("unsubscribe", "unsubscribed"):
        result = outbound(None, kind)
        assert result.state == NONE_STATE and not result.create_item
        assert not result.roster_push
    assert outbound(None, "unsubscribe").route  # A.2.2: without exception
    assert not outbound(None, "unsubscribed").route


def test_no_item_inbound_request_is_a_hidden_record() -> None:
    # §3.1.3: delivered and kept, but no roster item is created or pushed.
    result = inbound(None, "subscribe")
    assert result.state == SubState.parse("None + Pending In")
    assert result.deliver and result.store_pending
    assert not result.roster_push and result.auto_reply is None
    assert roster_item_needed(result.state, listed=False)
    # The contact withdraws it: the record goes, and nothing was ever pushed.
    gone = inbound(result.state, "unsubscribe")
    assert gone.deliver and not gone.roster_push and not gone.send_unavailable
    assert not roster_item_needed(gone.state, listed=False)
    assert roster_item_needed(gone.state, listed=True)
    # Or the user denies it: routed, and again nothing to keep.
    denied = outbound(result.state, "unsubscribed")
    assert denied.route and not denied.roster_push
    assert not roster_item_needed(denied.state, listed=False)
    # Or approves it: the contact joins the roster (§3.1.5).
    approved = outbound(result.state, "subscribed")
    assert approved.create_item and approved.roster_push and approved.route
    assert approved.state == SubState(Subscription.FROM)


@pytest.mark.parametrize("kind", ["subscribed", "unsubscribe", "unsubscribed"])
def test_no_record_other_inbound_is_ignored(kind: Kind) -> None:
    result = inbound(None, kind)
    assert result == inbound(NONE_STATE, kind)
    assert result.state == NONE_STATE and not result.deliver and not result.roster_push
    assert not roster_item_needed(result.state, listed=False)


def test_names_round_trip() -> None:
    assert [s.name for s in STATES] == [
        "None", "None + Pending Out", "None + Pending In", "None + Pending Out/In", "To",
        "To + Pending In", "From", "From + Pending Out", "Both"]
    for s in STATES:
        assert SubState.parse(s.name) == s and s.valid
    assert SubState.parse("None") == NONE_STATE


@pytest.mark.parametrize("name", ["none", "To + Pending Out", "From + Pending In",
                                  "Both + Pending Out/In", ""])
def test_parse_rejects_other_names(name: str) -> None:
    with pytest.raises(ValueError):
        SubState.parse(name)


@pytest.mark.parametrize("name", ["None + Pending In", "From", "Both", "To + Pending In"])
def test_parse_rejects_impossible_preapproval(name: str) -> None:
    with pytest.raises(ValueError):
        SubState.parse(name, approved=True)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError):
        outbound(None, "probe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        inbound(None, "available")  # type: ignore[arg-type]


def test_watcher_predicates() -> None:
    for s in STATES:
        assert is_subscriber(s) is (s.subscription in ("from", "both"))
        assert is_subscribed_to(s) is (s.subscription in ("to", "both"))
    assert not is_subscriber(None) and not is_subscribed_to(None)


# Every combination of stored fields, including ones Appendix A does not define (a damaged
# store): the machine is total and never produces an undefined state.
ALL_FIELDS = [SubState(sub, out, in_, ok) for sub in Subscription
              for out, in_, ok in itertools.product((False, True), repeat=3)]


@pytest.mark.parametrize("state", ALL_FIELDS, ids=repr)
def test_total_and_closed(state: SubState) -> None:
    for kind in KINDS:
        for result in (outbound(state, kind), inbound(state, kind)):
            assert result.state.valid, (state, kind, result)
    if state.valid:
        # Consent, per step: only the user's own 'subscribed' (now, or as a pre-approval)
        # makes a watcher, and only the user's own request ends in 'to'.
        for kind in KINDS:
            after = inbound(state, kind).state
            assert not after.from_ or state.from_ or state.approved
            assert not after.to or state.to or state.pending_out
            out = outbound(state, kind).state
            assert not out.to or state.to
            assert not out.from_ or state.from_ or (kind == "subscribed" and state.pending_in)
            assert not out.approved or state.approved or kind == "subscribed"


# ---------------------------------------------------------------------------------------
# Two servers: the user's roster item for the contact and the contact's for the user, each
# run by this machine the way server/modules/presence.py and roster.py use it, with every
# routed stanza and auto-reply carried to the other side in order and none lost.

Action = tuple[str, int, str]  # ("act", side, kind | "remove") or ("deliver", side, "")


@dataclass
class Side:
    state: SubState | None = None
    listed: bool = False
    stored_request: bool = False      # the §3.1.3 record kept for redelivery
    consent: bool = False             # last own subscribed/unsubscribed was 'subscribed'
    asked: bool = False               # last own subscribe/unsubscribe was 'subscribe'
    inbox: deque[str] = field(default_factory=deque)

    @property
    def s(self) -> SubState:
        return self.state or NONE_STATE

    def keep(self, new: SubState) -> None:
        if not new.pending_in:
            self.stored_request = False
        self.state = new if roster_item_needed(new, listed=self.listed) else None


class Pair:
    def __init__(self) -> None:
        self.sides = (Side(), Side())

    def act(self, i: int, kind: str) -> None:
        me, peer = self.sides[i], self.sides[1 - i]
        if kind == "remove":
            # RFC 6121 §2.5.2 as server/modules/roster.py does it: cancel both ways, delete.
            if not me.listed:
                return
            state: SubState | None = me.state
            for k in ("unsubscribe", "unsubscribed"):
                result = outbound(state, k)
                state = result.state
                if result.route:
                    peer.inbox.append(k)
            me.state, me.listed, me.stored_request = None, False, False
            me.consent = me.asked = False
            return
        result = outbound(me.state, kind)  # type: ignore[arg-type]
        if result.create_item:
            me.listed = True
        me.keep(result.state)
        if result.route:
            peer.inbox.append(kind)
        if kind in ("subscribed", "unsubscribed"):
            me.consent = kind == "subscribed"
        else:
            me.asked = kind == "subscribe"

    def deliver(self, i: int) -> bool:
        me, peer = self.sides[i], self.sides[1 - i]
        if not me.inbox:
            return False
        kind = me.inbox.popleft()
        result = inbound(me.state, kind)  # type: ignore[arg-type]
        # A request is pending only if it was stored when it arrived (§3.1.3).
        assert not result.state.pending_in or me.s.pending_in or result.store_pending
        assert not result.store_pending or result.state.pending_in
        if result.store_pending:
            me.stored_request = True
        me.keep(result.state)
        if result.auto_reply:
            peer.inbox.append(result.auto_reply)
        return True

    def drain(self) -> None:
        while self.deliver(0) | self.deliver(1):
            pass

    def probe(self) -> None:
        """Both log in: each probes the contacts it is subscribed to (§4.3.1); a server
        answers a non-watcher 'unsubscribed' (§4.3.2), outside `outbound`."""
        for i in (0, 1):
            if is_subscribed_to(self.sides[i].state) and not is_subscriber(
                    self.sides[1 - i].state):
                self.sides[i].inbox.append("unsubscribed")
        self.drain()

    def check_local(self) -> None:
        for side in self.sides:
            s = side.s
            assert s.valid
            assert side.stored_request == s.pending_in  # redelivered at login iff pending
            assert not s.from_ or side.consent         # a watcher only by the user's consent
            assert not s.to or side.asked              # 'to' only on the user's own request
            assert side.listed or s in (NONE_STATE, SubState.parse("None + Pending In"))

    def consistent(self) -> bool:
        u, c = self.sides[0].s, self.sides[1].s
        return u.to == c.from_ and c.to == u.from_


KIND_OR_REMOVE = st.sampled_from([*KINDS, "remove"])
SIDE = st.integers(0, 1)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(SIDE, KIND_OR_REMOVE), max_size=30))
def test_two_servers_agree_when_exchanges_do_not_overlap(steps: list[tuple[int, str]]) -> None:
    pair = Pair()
    for i, kind in steps:
        pair.act(i, kind)
        pair.drain()
        pair.check_local()
        u, c = pair.sides[0].s, pair.sides[1].s
        assert pair.consistent(), (steps, u, c)
        assert u.pending_out == c.pending_in and c.pending_out == u.pending_in, (steps, u, c)


ACTION = st.one_of(st.tuples(st.just("act"), SIDE, KIND_OR_REMOVE),
                   st.tuples(st.just("deliver"), SIDE, st.just("")))


@settings(max_examples=600, deadline=None)
@given(st.lists(ACTION, max_size=40))
def test_two_servers_under_any_interleaving(actions: list[Action]) -> None:
    pair = Pair()
    for what, i, kind in actions:
        if what == "act":
            pair.act(i, kind)
        else:
            pair.deliver(i)
        pair.check_local()
    pair.drain()
    pair.check_local()
    pair.probe()
    pair.check_local()
    for i in (0, 1):
        # After the login probes, nobody believes it receives presence it is not sent.
        assert not pair.sides[i].s.to or pair.sides[1 - i].s.from_, actions


def run(actions: list[tuple[str, int, str]]) -> Pair:
    pair = Pair()
    for what, i, kind in actions:
        if what == "act":
            pair.act(i, kind)
        else:
            pair.deliver(i)
    pair.drain()
    return pair


U, C = 0, 1


def test_crossing_approval_and_rerequest_diverge_until_probed() -> None:
    # The documented race: C approves U's first request while U withdraws and asks again;
    # the 'subscribed' then approves the second request, which C has not seen yet.
    pair = run([("act", U, "subscribe"), ("deliver", C, ""), ("act", C, "subscribed"),
                ("act", U, "unsubscribe"), ("act", U, "subscribe")])
    assert pair.sides[U].s == SubState.parse("To")
    assert pair.sides[C].s == SubState.parse("None + Pending In")
    assert not pair.consistent()
    pair.probe()  # §4.3.2: C answers U's probe 'unsubscribed'
    assert pair.sides[U].s == NONE_STATE and pair.consistent()


def test_full_handshake_both_ways() -> None:
    # RFC 6121 §3.1 flow, both directions, then §3.3 and §3.2.
    pair = run([("act", U, "subscribe"), ("act", C, "subscribed"), ("act", C, "subscribe"),
                ("act", U, "subscribed")])
    # C's 'subscribed' was sent before it saw the request: a pre-approval, used on arrival.
    assert pair.sides[U].s == pair.sides[C].s == SubState.parse("Both")
    pair = run([("act", U, "subscribe"), ("deliver", C, ""), ("act", C, "subscribed"),
                ("deliver", U, ""), ("act", C, "subscribe"), ("deliver", U, ""),
                ("act", U, "subscribed")])
    assert pair.sides[U].s == pair.sides[C].s == SubState.parse("Both")
    pair.act(U, "unsubscribe")
    pair.drain()
    assert pair.sides[U].s == SubState.parse("From")
    assert pair.sides[C].s == SubState.parse("To")
    pair.act(U, "unsubscribed")
    pair.drain()
    assert pair.sides[U].s == pair.sides[C].s == NONE_STATE
