"""BOSH across nodes (issue 22 item 4): a BOSH client's HTTP requests may reach any node (a
balancer, or the workers of `serve --workers N` behind one port); the node that holds the
session answers them all, the long poll included (server/cluster/bosh.py).

Two nodes of a.test with HTTPS; the BOSH client of tests/test_http.py, pointed at node1 or node2
request by request."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from server.app import Server
from server.config import load_config
from server.http.bosh import Bosh
from server.modules.http import HTTP
from server.xml import ns
from tests.conftest import PASSWORD, RunningServer, stop_server, write_config
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_cluster import (
    ALICE,
    cluster_tables,
    eventually,
    raw_available,
    see_each_other,
    sees,
)
from tests.test_http import BoshClient, url

CLIENT = ns.CLIENT
BOB = "bob@a.test"


async def start_node(tmp: Path, pg_dsn: str, redis_url: str, name: str,  # noqa: F811
                     host: str) -> RunningServer:
    path = write_config(tmp, cluster_tables(pg_dsn, redis_url, name), domains=("a.test",),
                        host=host)
    path.write_text(path.read_text().replace("https = []", f'https = ["{host}:0"]', 1))
    server = Server(load_config(path))
    await server.start()
    return RunningServer(server, tmp / "data", path)


@pytest.fixture
async def nodes(tmp_path: Path, pg_dsn: str, redis_url: str  # noqa: F811
                ) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    one = await start_node(tmp_path / "node1", pg_dsn, redis_url, "node1", "127.0.0.1")
    try:
        two = await start_node(tmp_path / "node2", pg_dsn, redis_url, "node2", "127.0.0.2")
    except BaseException:
        await stop_server(one)
        raise
    try:
        yield one, two
    finally:
        await stop_server(two)
        await stop_server(one)


def bosh_of(running: RunningServer) -> Bosh:
    http = running.server.module(HTTP)
    assert http is not None
    return http.bosh


def body_text(body: etree._Element) -> list[str | None]:
    return [m.findtext(f"{{{CLIENT}}}body") for m in body.iter(f"{{{CLIENT}}}message")]


async def test_requests_on_either_node_reach_the_session(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    """Created on node1, then every other request on node2: login, bind, a message out, a
    long poll on node2 that carries what arrives for the session on node1, an empty poll after
    'wait', and the session's end. Node2 relays each of them (and never holds the session)."""
    one, two = nodes
    await see_each_other(one, two)
    await one.add_user(ALICE)
    await one.add_user(BOB)
    bob = await raw_available(two, BOB, "pc")
    targets = [url(one, "/http-bind"), url(two, "/http-bind")]
    client = BoshClient(targets[0])
    sent = 0

    async def post(*args: str, **options: object) -> etree._Element:
        nonlocal sent
        client.target = targets[sent % 2]  # node1, node2, node1, ...
        sent += 1
        return await client.post(*args, **options)  # type: ignore[arg-type]

    try:
        created = await client.create(wait=3)
        sent = 1
        assert created.get("sid")
        token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        answer = await post(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{token}</auth>")
        assert answer.find(f"{{{ns.SASL}}}success") is not None, etree.tostring(answer)
        answer = await post(attrs=" xmpp:restart='true' to='a.test'")
        assert answer.find(f"{{{ns.STREAMS}}}features") is not None, etree.tostring(answer)
        answer = await post(f"<iq xmlns='{CLIENT}' type='set' id='b'><bind xmlns='{ns.BIND}'>"
                            "<resource>web</resource></bind></iq>")
        assert answer.findtext(f".//{{{ns.BIND}}}jid") == f"{ALICE}/web"
        await post(f"<presence xmlns='{CLIENT}'/>")
        await eventually(sees(two, f"{ALICE}/web"), "node2 sees alice's BOSH session")
        # Out (every other request is relayed, whichever this one is).
        await post(f"<message xmlns='{CLIENT}' to='{BOB}' type='chat'><body>hi bob</body>"
                   "</message>")
        got = await bob.next_of("message", 10)
        assert got.findtext(f"{{{CLIENT}}}body") == "hi bob"
        # A long poll through whichever node is next carries bob's answer when it comes.
        poll = asyncio.ensure_future(post())
        await asyncio.sleep(0.5)
        assert not poll.done()
        await bob.send(f"<message to='{ALICE}/web' type='chat'><body>hello back</body>"
                       "</message>")
        assert "hello back" in body_text(await asyncio.wait_for(poll, 10))
        # The next poll, on the other node, with nothing to carry: empty after 'wait' (3 s).
        started = asyncio.get_running_loop().time()
        empty = await post()
        assert len(empty) == 0 and asyncio.get_running_loop().time() - started >= 2.5
        bosh_one, bosh_two = (bosh_of(n) for n in (one, two))
        sid = created.get("sid")
        assert sid in bosh_one.sessions and sid not in bosh_two.sessions
        assert bosh_two.relay is not None and bosh_two.relay.relayed >= 4
        # The end, through node2 when it is its turn: the session ends on node1.
        client.target = targets[1]
        ended = await client.post(attrs=" type='terminate'")
        assert ended.get("type") == "terminate"
        await eventually(lambda: sid not in bosh_one.sessions, "the session ended on node1")
        # A request for it now: unknown everywhere (XEP-0124 §17.2 item-not-found).
        client.target = targets[1]
        gone = await client.post()
        assert (gone.get("type"), gone.get("condition")) == ("terminate", "item-not-found")
        await bob.close()
    finally:
        await client.close()
