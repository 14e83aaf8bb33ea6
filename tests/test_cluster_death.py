"""A node's death loses nothing (issue 22 item 6): nodes are real `presenced serve` processes
(so that kill -9 is real) for one domain a.test on 127.0.0.1 and 127.0.0.2, with a private
redis-server (tests/redis.py) and PostgreSQL (tests/pg.py); clients are raw XMPP streams.

kill -9 mid-conversation, a node restarting under the same name, a graceful stop, and Redis
restarting empty: every message a server accepted is delivered once — live, or from offline
storage — contacts see the unavailable presence, iqs get an answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from lxml import etree

from server.jid import JID
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server, write_config
from tests.process import free_ports, presenced, watch_line
from tests.rawclient import CLIENT, RawClient, StreamClosedError
from tests.redis import RedisServer, redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_cluster import cluster_tables, eventually

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "alice@a.test", "bob@a.test"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
HEARTBEAT, DEAD_AFTER = 0.2, 2.0


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


class Node:
    """One `presenced serve` process of the cluster; its log lines are kept."""

    def __init__(self, tmp: Path, name: str, host: str, port: int, dsn: str,
                 redis: str, dead_after: float = DEAD_AFTER) -> None:
        self.name, self.host, self.port = name, host, port
        cluster = (f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
                   f'[cluster]\nredis = "{redis}"\nnode = "{name}"\nheartbeat = {HEARTBEAT}\n'
                   f'dead_after = {dead_after}\n')
        self.config = write_config(tmp / name, cluster, domains=("a.test",), host=host)
        text = self.config.read_text()
        text = text.replace(f'c2s = ["{host}:0"]', f'c2s = ["{host}:{port}"]', 1)
        text = text.replace(f'c2s_tls = ["{host}:0"]', "c2s_tls = []", 1)
        self.config.write_text(text)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    async def start(self) -> None:
        self.proc = subprocess.Popen(presenced("serve", "-c", str(self.config)), env=_env(),
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        started = threading.Event()
        proc, lines = self.proc, self.lines

        def read() -> None:
            state = [0]
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                watch_line(line, state)
                if "event=started" in line:
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        await asyncio.to_thread(started.wait, 60)
        if proc.poll() is not None or not any("event=started" in li for li in lines):
            raise AssertionError(f"{self.name} did not start:\n{''.join(lines[-30:])}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self) -> int:
        """SIGTERM; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 30)

    def logged(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    async def logs(self, text: str, timeout: float = 5.0) -> list[str]:
        """The lines with text, waiting until there is one (or timeout)."""
        deadline = time.monotonic() + timeout
        while not self.logged(text) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.logged(text)

    async def login(self, jid: str, resource: str) -> RawClient:
        user, domain = jid.split("@")
        client = await RawClient.connect(self.host, self.port)
        await client.login(domain, user, PASSWORD, resource)
        return client


async def available(node: Node, jid: str, resource: str) -> RawClient:
    client = await node.login(jid, resource)
    await client.send("<presence/>")
    while True:  # its own presence, reflected (RFC 6121 §4.2.2)
        got = await client.next_of("presence")
        if got.get("from") == client.jid and got.get("type") is None:
            return client


async def available_raw(node: RunningServer, jid: str) -> RawClient:
    client = await node.raw_login(jid, "r")
    await client.send("<presence/>")
    await client.next_of("presence")
    return client


def adduser(node: Node, *jids: str) -> None:
    for jid in jids:
        subprocess.run(presenced("adduser", jid, "-p", PASSWORD, "-c", str(node.config)),
                       env=_env(), check=True, capture_output=True, timeout=60)


async def reaches(sender: RawClient, receiver: RawClient, to: str) -> None:
    """Until a headline from sender reaches receiver at `to` (the sender's node sees the
    receiver's session; a headline to an unknown resource is dropped, RFC 6121 §8.5.3.2.1)."""
    for attempt in range(100):
        await sender.send(f"<message to='{to}' type='headline' id='sync{attempt}'>"
                          "<body>sync</body></message>")
        with contextlib.suppress(TimeoutError):
            while True:
                got = await receiver.next_of("message", timeout=0.3)
                if (got.get("id") or "").startswith("sync"):
                    return
    raise AssertionError(f"{to} never reached")


async def subscribe(alice: RawClient, bob: RawClient) -> None:
    """alice subscribes to bob's presence (RFC 6121 §3.1) and sees him available."""
    await alice.send(f"<presence to='{BOB}' type='subscribe'/>")
    while (await bob.next_of("presence", timeout=10)).get("type") != "subscribe":
        pass
    await bob.send(f"<presence to='{ALICE}' type='subscribed'/>")
    while True:
        got = await alice.next_of("presence", timeout=10)
        if got.get("from") == bob.jid and got.get("type") is None:
            return


async def collect(client: RawClient, prefix: str, quiet: float = 2.0) -> list[str]:
    """The ids (starting with prefix) of the messages that arrive until none for `quiet` s."""
    ids = []
    with contextlib.suppress(TimeoutError):
        while True:
            got = await client.next_of("message", timeout=quiet)
            ident = got.get("id") or ""
            if ident.startswith(prefix):
                ids.append(ident)
    return ids


async def unavailable_from(client: RawClient, full: str, timeout: float) -> float:
    """Seconds until an unavailable presence from `full` arrives."""
    start = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - start)
        got = await client.next_of("presence", timeout=max(left, 0.01))
        if got.get("from") == full and got.get("type") == "unavailable":
            return time.monotonic() - start


def status(node: Node) -> dict[str, dict[str, object]]:
    out = subprocess.run([sys.executable, "-m", "server", "cluster", "status", "--json", "-c",
                          str(node.config)], env=_env(), capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return {n["node"]: n for n in map(json.loads, out.splitlines())}


def error_condition(iq: etree._Element) -> str | None:
    error = iq.find(f"{{{CLIENT}}}error")
    if error is None:
        return None
    return next((etree.QName(c).localname for c in error
                 if etree.QName(c).namespace == STANZAS and etree.QName(c).localname != "text"),
                None)


@pytest.fixture
async def cluster(tmp_path: Path, pg_dsn: str, redis_url: str  # noqa: F811
                  ) -> AsyncIterator[Callable[..., Node]]:
    """Makes nodes (not started); every one still running at the end is stopped."""
    made: list[Node] = []
    ports = iter(free_ports(4, "127.0.0.1"))

    def make(name: str, host: str, dead_after: float = DEAD_AFTER) -> Node:
        node = Node(tmp_path, name, host, next(ports), pg_dsn, redis_url, dead_after)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in made:
            if node.proc is not None:
                try:
                    await asyncio.to_thread(node.proc.wait, 30)
                except subprocess.TimeoutExpired:
                    node.proc.kill()


async def two_nodes(make: Callable[..., Node], dead_after: float = DEAD_AFTER
                    ) -> tuple[Node, Node]:
    one, two = make("node1", "127.0.0.1", dead_after), make("node2", "127.0.0.2", dead_after)
    await one.start()
    await two.start()
    adduser(one, ALICE, BOB)
    return one, two


async def test_kill_9_mid_conversation_loses_nothing(cluster: Callable[..., Node]) -> None:
    one, two = await two_nodes(cluster)
    alice = await available(one, ALICE, "phone")
    bob = await available(two, BOB, "desk")
    await reaches(alice, bob, f"{BOB}/desk")
    await subscribe(alice, bob)
    for i in range(5):
        await alice.send(f"<message to='{BOB}' type='chat' id='live{i}'><body>{i}</body>"
                         "</message>")
    assert await collect(bob, "live", quiet=1.0) == [f"live{i}" for i in range(5)]
    two.kill()
    # Accepted by node1 while it still believes node2 alive (into node2's inbox), and after
    # (to offline storage): all of them must come back, once each.
    sent = []
    for i in range(10):
        await alice.send(f"<message to='{BOB}/desk' type='chat' id='after{i}'><body>{i}</body>"
                         "</message>")
        sent.append(f"after{i}")
        await asyncio.sleep(0.05)
    await alice.send(f"<iq to='{BOB}/desk' type='get' id='v1'>"
                     "<query xmlns='jabber:iq:version'/></iq>")
    # Unavailable presence for bob's session, as if its stream had closed (RFC 6121 §4.6.3),
    # within a few seconds of the kill; the iq sent meanwhile is answered (§8.5.3.2.1).
    took = 0.0
    answered = None
    deadline = time.monotonic() + DEAD_AFTER + 6
    while time.monotonic() < deadline and (not took or answered is None):
        got = await alice.next(timeout=deadline - time.monotonic())
        if got.tag == f"{{{CLIENT}}}presence" and got.get("from") == f"{BOB}/desk" and \
                got.get("type") == "unavailable":
            took = time.monotonic()
        elif got.tag == f"{{{CLIENT}}}iq" and got.get("id") == "v1":
            answered = got
    assert took, "alice never saw bob unavailable"
    assert answered is not None and answered.get("type") == "error"
    assert error_condition(answered) in ("service-unavailable", "recipient-unavailable")
    # An iq to the dead session's full JID, now: an error, not silence.
    await alice.send(f"<iq to='{BOB}/desk' type='get' id='v2'><ping xmlns='urn:xmpp:ping'/>"
                     "</iq>")
    later = await alice.next_of("iq", timeout=5)
    assert (later.get("id"), later.get("type")) == ("v2", "error")
    assert await one.logs("event=cluster-reaped node=node2")
    nodes = await asyncio.to_thread(status, one)
    assert (nodes["node1"]["alive"], nodes["node2"]["alive"]) == (True, False)
    # bob logs in on node1: every message accepted after the kill, once, in order (and none
    # of those he had before: they were handed over and acknowledged).
    back = await available(one, BOB, "desk")
    assert await collect(back, "") == sent
    await alice.close()
    await back.close()


async def test_restarted_node_claims_its_previous_incarnation(
        cluster: Callable[..., Node]) -> None:
    """node2 dies with entries in its inbox and no survivor to clean up (node1 stops before
    it would notice): the next incarnation of node2 cleans up its own, and node1, started
    again, does not do it a second time."""
    one, two = await two_nodes(cluster, dead_after=4.0)
    alice = await available(one, ALICE, "phone")
    bob = await available(two, BOB, "desk")
    await reaches(alice, bob, f"{BOB}/desk")
    two.kill()
    sent = [f"queued{i}" for i in range(5)]
    for ident in sent:  # node1 still believes node2 alive: into node2's inbox
        await alice.send(f"<message to='{BOB}/desk' type='chat' id='{ident}'><body>x</body>"
                         "</message>")
    await asyncio.sleep(0.3)
    await alice.close()
    assert await one.stop() == 0  # well within dead_after: node1 never saw node2 dead
    assert not one.logged("event=cluster-reaped")
    mark = len(two.lines)
    await two.start()
    reaped = await two.logs("event=cluster-reaped node=node2")
    assert len(reaped) == 1, two.lines[-20:]
    # Before it served anyone or read its inbox (not later, by its periodic reaping).
    started = next(i for i, line in enumerate(two.lines) if "event=started" in line and
                   i >= mark)
    assert two.lines.index(reaped[0]) < started
    back = await available(two, BOB, "desk")
    assert await collect(back, "queued") == sent
    await one.start()
    await asyncio.sleep(HEARTBEAT * 5)
    assert not one.logged("event=cluster-reaped")
    await back.close()


async def test_graceful_stop_drains(cluster: Callable[..., Node]) -> None:
    """node2 stops (SIGTERM) while alice keeps writing to bob there: what bob did not get
    live is in offline storage, bob's unavailable presence reaches alice on node1, and node2
    settled its own inbox (no survivor had to)."""
    one, two = await two_nodes(cluster)
    alice = await available(one, ALICE, "phone")
    bob = await available(two, BOB, "desk")
    await reaches(alice, bob, f"{BOB}/desk")
    await subscribe(alice, bob)
    sent: list[str] = []

    async def write() -> None:
        for i in range(60):
            await alice.send(f"<message to='{BOB}/desk' type='chat' id='g{i}'><body>{i}</body>"
                             "</message>")
            sent.append(f"g{i}")
            await asyncio.sleep(0.05)

    writer = asyncio.ensure_future(write())
    await asyncio.sleep(0.5)
    stopping = asyncio.ensure_future(two.stop())
    live: list[str] = []
    with contextlib.suppress(TimeoutError, ConnectionError, StreamClosedError):
        while True:
            got = await bob.next(timeout=5)
            if got.tag == f"{{{CLIENT}}}message" and (got.get("id") or "").startswith("g"):
                live.append(got.get("id") or "")
    assert await stopping == 0
    await writer
    assert await unavailable_from(alice, f"{BOB}/desk", 5) >= 0
    assert await two.logs("event=cluster-drained node=node2")
    back = await available(one, BOB, "desk")
    stored = await collect(back, "g")
    assert sorted(live + stored, key=lambda s: int(s[1:])) == sent
    assert not set(live) & set(stored)
    assert live, "bob got nothing live: the test did not stop node2 mid-conversation"
    await asyncio.sleep(HEARTBEAT * 5)
    assert not one.logged("event=cluster-reaped node=node2")
    assert not one.logged("event=cluster-dead-inbox-drained"), two.logged("cluster-drained")
    await alice.close()
    await back.close()


async def test_redis_restart_loses_nothing(cluster: Callable[..., Node],
                                           redis_server: RedisServer  # noqa: F811
                                           ) -> None:
    one, two = await two_nodes(cluster, dead_after=3.0)
    alice = await available(one, ALICE, "phone")
    alice2 = await available(one, ALICE, "tablet")
    bob = await available(two, BOB, "desk")
    await reaches(alice, bob, f"{BOB}/desk")
    restarting = asyncio.ensure_future(asyncio.to_thread(redis_server.restart, 2.0))
    await asyncio.sleep(0.3)
    # Local traffic goes on without Redis: a message between alice's own resources.
    await alice.send(f"<message to='{ALICE}/tablet' type='chat' id='local'><body>l</body>"
                     "</message>")
    got = await alice2.next_of("message", timeout=3)
    assert got.get("id") == "local"
    # Cross-node stanzas accepted meanwhile are retried, in order, not lost.
    during = [f"during{i}" for i in range(5)]
    for ident in during:
        await alice.send(f"<message to='{BOB}/desk' type='chat' id='{ident}'><body>d</body>"
                         "</message>")
    await restarting
    assert await collect(bob, "during", quiet=4.0) == during
    # Each node re-asserted its membership and directory entries: no fencing, and bob's
    # session is found again across nodes.
    await reaches(alice, bob, f"{BOB}/desk")
    await bob.send(f"<message to='{ALICE}/phone' type='chat' id='back'><body>b</body>"
                   "</message>")
    assert (await alice.next_of("message", timeout=5)).get("id") == "back"
    for node in (one, two):
        assert node.logged(f"event=cluster-reasserted node={node.name}")
        assert not node.logged("event=cluster-fenced")
    nodes = await asyncio.to_thread(status, one)
    assert (nodes["node1"]["alive"], nodes["node2"]["alive"]) == (True, True)
    for client in (alice, alice2, bob):
        await client.close()


async def test_stop_ends_while_redis_hangs(cluster: Callable[..., Node],
                                           redis_server: RedisServer  # noqa: F811
                                           ) -> None:
    """Redis paused (SIGSTOP: connections open, no answer) while a client is connected: the
    node still stops within a few seconds, cleanly (every Redis step of stopping bounded)."""
    one = cluster("node1", "127.0.0.1")
    await one.start()
    adduser(one, ALICE)
    alice = await available(one, ALICE, "phone")
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert await one.stop() == 0
        took = time.monotonic() - started
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert took < 12, f"stopping took {took:.1f} s"
    assert one.logged("event=cluster-stop-step-timeout")
    await alice.close()


async def test_node_died_fires_on_every_survivor_and_one_reaps(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """Three in-process nodes; node3 stops beating (as if killed): cluster/node-died reaches
    the modules of node1 and node2 alike, and exactly one of them cleans up (the lock)."""
    hosts = {"node1": "127.0.0.1", "node2": "127.0.0.2", "node3": "127.0.0.3"}
    nodes = [await start_server(tmp_path / name, cluster_tables(pg_dsn, redis_url, name),
                                domains=("a.test",), host=host) for name, host in hosts.items()]
    try:
        one, two, three = (n.server.cluster for n in nodes)
        assert one is not None and two is not None and three is not None
        heard: dict[str, list[tuple[str, str]]] = {"node1": [], "node2": []}
        for name, server in (("node1", nodes[0].server), ("node2", nodes[1].server)):
            server.hooks.add("cluster/node-died",
                             lambda node, inc, name=name: heard[name].append((node, inc)), 0)
        # Enough sessions that cleaning up takes longer than the survivors' heartbeats are
        # apart: without the lock both would do it.
        clients = []
        for i in range(40):
            await nodes[2].add_user(f"u{i}@a.test")
            clients.append(await available_raw(nodes[2], f"u{i}@a.test"))
        await nodes[2].add_user(BOB)
        bob = await nodes[2].raw_login(BOB, "desk")
        await eventually(lambda: len(three.directory) == 41, "sessions bound on node3")
        await three.directory.flush()
        dead = three.membership.incarnation
        await three.membership.stop()  # no more heartbeats: its key expires (dead_after)
        await eventually(lambda: heard["node1"] and heard["node2"], "both survivors heard",
                         timeout=15)
        assert heard == {"node1": [("node3", dead)], "node2": [("node3", dead)]}
        await eventually(lambda: one.reaper.reaped + two.reaper.reaped == 1, "one reaped")
        await asyncio.sleep(1.0)  # a few more heartbeats: nobody reaps it again
        assert one.reaper.reaped + two.reaper.reaped == 1
        assert not await one.redis.exists(f"presenced:dir:{BOB}")
        assert not await one.redis.hexists("presenced:incarnations", f"node3:{dead}")
        for client in [bob, *clients]:
            await client.close()
    finally:
        for running in reversed(nodes):
            await stop_server(running)


async def test_stopping_node_settles_its_unread_inbox(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """Entries in node2's inbox that its reader never got to (stopped here on purpose) are
    settled by node2 itself when it stops: to offline storage, not left to a survivor."""
    one = await start_server(tmp_path / "node1", cluster_tables(pg_dsn, redis_url, "node1"),
                             domains=("a.test",), host="127.0.0.1")
    two = await start_server(tmp_path / "node2", cluster_tables(pg_dsn, redis_url, "node2"),
                             domains=("a.test",), host="127.0.0.2")
    stopped = False
    try:
        await one.add_user(ALICE)
        await one.add_user(BOB)
        first, second = one.server.cluster, two.server.cluster
        assert first is not None and second is not None
        alice = await available_raw(one, ALICE)
        bob = await available_raw(two, BOB)
        await eventually(lambda: one.server.sessions.get(JID.parse(bob.jid)) is not None,
                         "node1 sees bob")
        await second.inbox.stop()  # node2 reads no more
        sent = [f"u{i}" for i in range(5)]
        for ident in sent:
            await alice.send(f"<message to='{bob.jid}' type='chat' id='{ident}'><body>x</body>"
                             "</message>")
        await eventually(lambda: first.inbox.sent >= 5, "into node2's inbox")
        await bob.close()
        await stop_server(two)
        stopped = True
        assert second.drained == 5
        back = await available_raw(one, BOB)
        assert await collect(back, "u") == sent
        assert first.reaper.reaped == 0
        await alice.close()
        await back.close()
    finally:
        if not stopped:
            await stop_server(two)
        await stop_server(one)


async def test_every_log_line_names_its_node(tmp_path: Path, pg_dsn: str,
                                             redis_url: str) -> None:  # noqa: F811
    """serve --workers 2: the workers and their parent write to one stderr, and every line
    says whose it is (node=<name> after the level); without [cluster] no line has it."""
    from tests.test_cluster_ops import Workers, worker_config

    config = worker_config(tmp_path / "workers", pg_dsn, redis_url, free_ports(1)[0],
                           node="box")
    workers = Workers(presenced("serve", "--workers", "2", "--config", str(config)))
    try:
        await workers.wait_for("event=started", 2)
        started = sorted(line.split()[2] for line in workers.lines if "event=started" in line)
        assert started == ["node=box-w1", "node=box-w2"], workers.lines
        lines = [line for line in list(workers.lines) if line.startswith("time=")]
        assert lines and all(line.split()[2].startswith("node=box") for line in lines), lines
        assert any(line.split()[2] == "node=box" and "event=workers-started" in line
                   for line in lines)  # the parent's own
        workers.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(workers.proc.wait, 30) == 0
    finally:
        workers.kill()
    single = write_config(tmp_path / "single", domains=("a.test",))
    proc = subprocess.Popen(presenced("serve", "-c", str(single)), env=_env(),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "event=started" in line:
                break
        assert any("event=started" in line for line in seen), seen
        assert not [line for line in seen if line.startswith("time=") and " node=" in line]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


async def test_a_frozen_node_is_dead_and_fences_itself_when_it_thaws(
        cluster: Callable[..., Node]) -> None:
    """SIGSTOP freezes every thread of a node, its heartbeat thread too (server/cluster/
    heartbeat.py): the others declare it dead within dead_after and clean up after it; when
    it runs again its key is gone, so it fences itself (closes its client streams) and joins
    again as a new incarnation — never two live owners of bob's session."""
    one, two = await two_nodes(cluster)
    alice = await available(one, ALICE, "phone")
    bob = await available(two, BOB, "desk")
    await reaches(alice, bob, f"{BOB}/desk")
    first = status(one)["node2"]["incarnation"]
    assert two.proc is not None
    two.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        assert await one.logs("event=cluster-reaped node=node2", timeout=DEAD_AFTER + 6)
        assert time.monotonic() - frozen < DEAD_AFTER + 3
        assert status(one)["node2"]["alive"] is False
    finally:
        two.proc.send_signal(signal.SIGCONT)
    assert await two.logs("event=cluster-fenced node=node2", timeout=10)
    assert await bob.stream_error(10) == "system-shutdown"
    deadline = time.monotonic() + 10
    while (now := status(one)["node2"])["incarnation"] == first or not now["alive"]:
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.2)
    back = await available(two, BOB, "desk")  # the new incarnation serves him again
    await reaches(alice, back, f"{BOB}/desk")
    await alice.close()
    await back.close()
