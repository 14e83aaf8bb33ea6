"""The heartbeat thread: a node's key is refreshed even while its event loop is busy.

A node whose event loop is starved (a CPU-bound burst: logins, a large roster, a slow callback)
is busy, not dead. Beating from the loop let such a node miss its beats, be declared dead and
fence itself: in a run of 100,000 sessions on 6 workers one closed ~9,500 sessions, whose
clients reconnected at once and loaded the others further. So the key presenced:node:<name> is
refreshed from this thread, with a synchronous Redis client of its own (redis-py's ``Redis``,
the same URL) and the same compare-and-expire script as before (membership.BEAT): when the key
no longer holds our incarnation the thread reports it and the loop confirms, fences and rejoins
(membership.py).

The thread beats only while the loop shows progress: the loop stamps ``Membership.progress``
every heartbeat, and a loop that has not stamped it for ``hung_after(dead_after)`` seconds
(ten times dead_after, at least 30 s) is a hung process, not a busy one: the thread stops
beating and the node is declared dead as before. A process that is frozen (SIGSTOP), killed or
cut off from Redis stops beating like before: its threads stop with it, or its beats fail.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from server.cluster import keys

if TYPE_CHECKING:
    from server.cluster.membership import Membership

log = logging.getLogger("presenced.cluster")

# KEYS[1] node key, KEYS[2] stats; ARGV: incarnation, ttl ms, now ms, sessions, rooms, beats
# missed
BEAT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'incarnation', ARGV[1], 'heartbeat', ARGV[3], 'sessions', ARGV[4],
           'rooms', ARGV[5], 'missed', ARGV[6])
return 1
"""


def hung_after(dead_after: float) -> float:
    """Seconds without progress after which the event loop is hung, not busy."""
    return max(10 * dead_after, 30.0)


class HeartbeatThread:
    """Beats for a Membership from a daemon thread until stop()."""

    def __init__(self, url: str, membership: Membership) -> None:
        self.url = url
        self.membership = membership
        settings = membership.settings
        self.interval = settings.heartbeat
        # A beat that cannot be answered within dead_after is too late anyway; a short timeout
        # also bounds how long stop() may have to wait for the thread.
        self.timeout = min(settings.dead_after, 2.0)
        self.hung_after = hung_after(settings.dead_after)
        self.beats = 0  # successful beats
        # Beats missed since the process started: the intervals without a successful beat
        # (Redis slow or unreachable, the loop hung, the process starved or paused), counted
        # when a beat succeeds again; published with each beat (`presenced cluster status`).
        self.missed = 0
        self.last_beat: float | None = None  # time.monotonic() of the last successful beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._failing = False  # a failure was logged; the next success is logged too
        self._hung = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"presenced-heartbeat-{self.membership.name}")
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Blocking: no more beats once this returns True (False: a beat still in flight,
        which the script turns into a no-op once our key is gone)."""
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def late(self) -> float | None:
        """Seconds the next beat is overdue (0 while on time; None before the first)."""
        if self.last_beat is None:
            return None
        return max(0.0, time.monotonic() - self.last_beat - self.interval)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        # On a fixed cadence (a beat's own time is not added to the interval), never in a
        # burst to catch up after a late one.
        due = time.monotonic() + self.interval
        try:
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                self._tick()
                due = max(due + self.interval, time.monotonic())
        finally:
            self._drop_client()

    def _tick(self) -> None:
        membership = self.membership
        incarnation = membership.beating
        if incarnation is None:  # joining, rejoining, stopping: the loop beats itself
            return
        late = time.monotonic() - membership.progress
        if late > self.hung_after:
            if not self._hung:
                log.error("event=cluster-loop-hung node=%s seconds=%.0f", membership.name, late)
                self._hung = True
            return  # let the key expire: a hung process is dead
        if self._hung:
            log.warning("event=cluster-loop-resumed node=%s", membership.name)
            self._hung = False
        sessions, rooms = membership.counts
        try:
            if self._client is None:
                import redis  # only with [cluster]

                self._client = redis.Redis.from_url(
                    self.url, socket_connect_timeout=self.timeout,
                    socket_timeout=self.timeout)
                self._script = self._client.register_script(BEAT)
            ok = self._script(keys=[keys.node(membership.name), keys.stats(membership.name)],
                              args=[incarnation, membership.ttl_ms, int(time.time() * 1000),
                                    sessions, rooms, self.missed])
        except Exception as exc:  # Redis unreachable: the loop's side goes on; try again
            if not self._failing:
                log.warning("event=cluster-heartbeat-failed node=%s error=%s", membership.name,
                            type(exc).__name__)
                self._failing = True
            self._drop_client()
            return
        if self._failing:
            log.info("event=cluster-heartbeat-restored node=%s", membership.name)
            self._failing = False
        if ok:
            now = time.monotonic()
            if self.last_beat is not None:
                self.missed += max(0, int((now - self.last_beat) / self.interval + 0.5) - 1)
            self.beats += 1
            self.last_beat = now
        else:  # declared dead, or Redis lost our key: the loop confirms and acts
            membership.lost = incarnation

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                client.close()
