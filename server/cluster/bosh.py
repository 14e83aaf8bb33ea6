"""BOSH across nodes (issue 22 item 4): a BOSH session lives on the node its first request
reached, but its next HTTP requests may reach any node (another machine behind the balancer,
or another worker of `serve --workers N`, where the kernel spreads TCP connections over the
processes). The node that gets a request for a session it does not hold relays the request's
body to the session's node through that node's inbox and answers the HTTP request with what
comes back, the long poll included.

In Redis: ``presenced:bosh:<sid>`` = "<node>:<incarnation>" of the node holding the session,
with an expiry a little past the longest a session may go without a request (renewed by each
request). Inbox entries: "B" (a relayed request: sid, body, the asking node and a token) and
"b" (its answer: the token and the response body). A session whose node is not live is
unknown (item-not-found: the client logs in again), as a session of a node that died is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from server.cluster import keys
from server.cluster.handover import Background

if TYPE_CHECKING:
    from server.cluster import Cluster

log = logging.getLogger("presenced.cluster")

REQUEST, ANSWER = "B", "b"
_RENEW_EVERY = 10.0  # seconds between renewals of a session's key by its requests


class BoshRelay:
    def __init__(self, cluster: Cluster, answer: Callable[[bytes], Awaitable[bytes]],
                 lifetime: float) -> None:
        """answer: how this node answers a request body for one of its sessions (the long
        poll included); lifetime: seconds a session's key outlives its last request."""
        self.cluster = cluster
        self.redis = cluster.redis
        self.membership = cluster.membership
        self._answer = answer
        self._ttl_ms = int(lifetime * 1000)
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._tokens = itertools.count(1)
        self._renewed: dict[str, float] = {}
        self._background = Background("cluster-bosh-failed")
        self.relayed = 0  # requests this node relayed to another (tests, metrics)
        cluster.inbox.commands[REQUEST] = self._asked
        cluster.inbox.commands[ANSWER] = self._answered

    @property
    def me(self) -> str:
        return f"{self.membership.name}:{self.membership.incarnation}"

    # -- the session's node --------------------------------------------------------------------

    async def held(self, sid: str) -> None:
        """A session was created here: the others find it (before the creation is answered,
        so the client's next request may go anywhere)."""
        await self.redis.set(keys.bosh(sid), self.me, px=self._ttl_ms)
        self._renewed[sid] = time.monotonic()

    def used(self, sid: str) -> None:
        """A request of a session held here: its key lives on (renewed now and then)."""
        now = time.monotonic()
        if now - self._renewed.get(sid, 0.0) >= _RENEW_EVERY:
            self._renewed[sid] = now
            self._background.spawn(self.redis.pexpire(keys.bosh(sid), self._ttl_ms))

    def ended(self, sid: str) -> None:
        if self._renewed.pop(sid, None) is not None:
            self._background.spawn(self.redis.delete(keys.bosh(sid)))

    def _asked(self, fields: dict[str, str]) -> None:
        self._background.spawn(self._serve(fields))

    async def _serve(self, fields: dict[str, str]) -> None:
        node, token = fields.get("o", ""), fields.get("t", "")
        response = await self._answer(fields.get("x", "").encode())  # errors: a terminate body
        if node:
            self.cluster.inbox.command(node, {"k": ANSWER, "t": token,
                                              "x": response.decode()})

    # -- another node ----------------------------------------------------------------------

    async def relay(self, sid: str, data: bytes, wait: float) -> bytes | None:
        """The response of the node holding `sid` to this request body; None when no live
        node holds it. TimeoutError when that node did not answer within `wait` seconds."""
        raw = await self.redis.get(keys.bosh(sid))
        if raw is None:
            return None
        node, _, incarnation = raw.decode().partition(":")
        if node == self.membership.name or not self.membership.is_live(node, incarnation):
            return None
        token = f"{self.membership.incarnation}:{next(self._tokens)}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        self.relayed += 1
        self.cluster.inbox.command(node, {"k": REQUEST, "o": self.membership.name,
                                          "t": token, "x": data.decode()})
        try:
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            log.warning("event=cluster-bosh-relay-timeout node=%s", node)
            raise
        finally:
            self._waiting.pop(token, None)

    def _answered(self, fields: dict[str, str]) -> None:
        future = self._waiting.get(fields.get("t", ""))
        if future is not None and not future.done():
            future.set_result(fields.get("x", "").encode())

    async def stop(self) -> None:
        await self._background.flush(timeout=5.0)

