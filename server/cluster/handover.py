"""A session moving between nodes: XEP-0198 resumption on another node than the one the
session was on (issue 22 item 4), with <resume/> after binding or inline in SASL2's
<authenticate/> (XEP-0388 §2.6: modules/stream_management.py takes the session over before
<success/> is sent, then answers <resumed/> in it).

Resumption ids are known cluster-wide: presenced:sm:<previd> names the node (and incarnation)
holding a resumable session, written when SM is enabled with resume and deleted when the session
ends. A client that resumes on a node that does not hold the session:

1. that node (the taker) reads the key: none, another account's, or a node that is not live:
   <failed><item-not-found/> (XEP-0198 §5), as for an unknown id on one node;
2. it asks the holder through the holder's inbox (an "h" entry: previd, the account, a reply
   key); inbox entries of one node are handled one at a time on its loop, so the holder
   gives the session up in one step: its transport (if the old connection is still there) is
   closed with <conflict/>, the session leaves the holder's directory without going
   unavailable, and its state goes into the reply list — JID, presence, priority, roster
   interest, directed presence, the SM counters both ways (h handled, h acknowledged) and the
   queue: stanzas sent but not acknowledged, then those that arrived while it was detached;
3. the taker binds the same full JID with that state (the directory entry becomes its own),
   then resumes it as a local session: the client's h acknowledges the head of the queue
   (XEP-0198 §5), the rest is sent again, once.

The taker announces the session id it will bind with; the holder puts that entry in its
replica at once, and forwards what its inbox still gets for the old id (inbox.py, once).
No unavailable presence is ever broadcast (the session never ends), and a stanza is either in
the holder's queue when it gives the session up (and moves), routed to the taker afterwards,
or forwarded there. Not yet: a session whose holder died (kill -9) while it
was detached cannot be resumed — its unacknowledged messages are in the archive (MAM), and the
survivor that cleans up after the dead node ends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from server.cluster import keys
from server.jid import JID

CARBONS = "urn:xmpp:carbons:2"

if TYPE_CHECKING:
    from server.cluster.directory import ClusterDirectory
    from server.cluster.inbox import Inbox
    from server.cluster.membership import Membership
    from server.sessions import Session

log = logging.getLogger("presenced.cluster")
_ANSWER_WAIT = 5  # seconds a taker waits for the holder's answer
_ANSWER_KEEP = 60  # seconds an unread answer stays in Redis


class Handover:
    def __init__(self, redis: Any, membership: Membership, inbox: Inbox,
                 directory: ClusterDirectory) -> None:
        self.redis = redis
        self.directory = directory
        self.membership = membership
        self.inbox = inbox
        # Set by stream management: (previd, bare JID) -> the session's state, given up here,
        # or None when it has no such resumable session of that account.
        self.give: Callable[[str, str], dict[str, Any] | None] | None = None
        inbox.commands[keys.HANDOVER] = self._asked
        self._background = Background("sm-handover-write-failed")

    # -- resumption ids, cluster-wide --------------------------------------------------------

    def arriving(self, session: Session, sid: str) -> None:
        """A session taken over: it binds here with the id announced to its old node."""
        self.directory.sids[session] = sid

    def register(self, previd: str, session: Session) -> None:
        """A resumable session here (SM enabled with resume, or just taken over)."""
        membership = self.membership
        value = json.dumps({"n": membership.name, "i": membership.incarnation,
                            "j": session.jid_str})
        self._background.spawn(self.redis.set(keys.resumption(previd), value))

    def forget(self, previd: str) -> None:
        """The session ended here: its id resumes nothing any more."""
        self._background.spawn(self.redis.delete(keys.resumption(previd)))

    # -- taking a session from the node that holds it ----------------------------------------

    async def take(self, previd: str, bare: str) -> dict[str, Any] | None:
        """The state of the resumable session previd of account bare, given up by its node;
        None when no live node holds one (then: <failed><item-not-found/>)."""
        try:
            raw = await self.redis.get(keys.resumption(previd))
            if raw is None:
                return None
            where = json.loads(raw)
            node = where.get("n")
            if node == self.membership.name or not self.membership.is_live(node, where.get("i")):
                return None  # ours (it is not in our table: ended) or on a dead node
            if str(where.get("j", "")).partition("/")[0] != bare:
                return None  # another account's session: as if it did not exist
            answer_key = keys.handover_answer(secrets.token_hex(12))
            sid = secrets.token_hex(8)  # the session's id here, announced to the holder
            self.inbox.command(node, {"k": keys.HANDOVER, "p": previd, "u": bare,
                                      "r": answer_key, "s": sid,
                                      "t": self.membership.name,
                                      "i": self.membership.incarnation})
            answer = await self.redis.blpop([answer_key], timeout=_ANSWER_WAIT)
        except Exception as exc:  # Redis unreachable: the client binds a new session
            log.warning("event=sm-handover-failed previd_known=0 error=%s", type(exc).__name__)
            return None
        if answer is None:
            log.warning("event=sm-handover-unanswered node=%s", node)
            return None
        state: dict[str, Any] = json.loads(answer[1])
        if not state:
            return None
        state["s"] = sid
        log.info("event=sm-handover-taken jid=%s from=%s queued=%d", state.get("j"), node,
                 len(state.get("q", ())))
        return state

    def _asked(self, fields: dict[str, str]) -> None:
        """Another node resumes one of our sessions: give it up now (one step, no await)."""
        state = None
        if self.give is not None:
            state = self.give(fields.get("p", ""), fields.get("u", ""))
        if state is not None:
            # Stanzas routed here to it meanwhile (this node's own, and those in our inbox
            # from nodes whose replica still names us) follow it to the taker.
            self.directory.moved(JID.parse(state["j"]), {
                "n": fields["t"], "i": fields["i"], "s": fields["s"], "p": state["p"],
                "a": int(bool(state["x"])), "r": state["r"], "x": state["x"],
                "f": [CARBONS] if state.get("c") else []})
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(fields["r"], json.dumps(state or {}))
        pipe.expire(fields["r"], _ANSWER_KEEP)
        self._background.spawn(pipe.execute())

    async def flush(self) -> None:
        await self._background.flush()


class Background:
    """Redis work nobody waits for (writes, clean-ups): kept until done (flush() at a stop),
    a failure logged as one line (event=<event>)."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, awaitable: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(awaitable)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("event=%s error=%s", self.event, type(task.exception()).__name__)

    async def flush(self, timeout: float | None = None) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
