"""IPv6 listeners: c2s and direct TLS on [::1]:0, a raw login and a slixmpp client over them.

CI runs on this same kind of machine, which has ::1; a machine without IPv6 skips (and a skip
fails under CI: see conftest.py)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.conftest import start_server, stop_server
from tests.rawclient import CLIENT


def loopback6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_c2s_listens_on_ipv6_loopback(tmp_path: Path) -> None:
    if not loopback6():
        pytest.skip("this machine cannot bind ::1")
    running = await start_server(tmp_path, host="[::1]")
    try:
        kinds = {(kind, host) for kind, host, _port in running.server.bound_addresses()}
        assert kinds == {("c2s", "::1"), ("c2s_tls", "::1")}
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        for direct_tls in (False, True):
            client = await running.raw(direct_tls=direct_tls)
            peer = client.writer.get_extra_info("peername")
            assert peer[0] == "::1" and client.writer.get_extra_info("socket").family == \
                socket.AF_INET6
            await client.close()
        alice = await running.raw_login("alice@a.test")
        bob = await running.client("bob@a.test")
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        bob.add_event_handler("message", lambda m: got.done() or got.set_result(m["body"]))
        await alice.send("<message to='bob@a.test/slix' type='chat'><body>over ::1</body>"
                         "</message>")
        assert await asyncio.wait_for(got, 5) == "over ::1"
        reply = await alice.ask("<iq type='get' id='p' to='a.test'>"
                                "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
        assert reply.tag == f"{{{CLIENT}}}iq" and reply.get("type") == "result"
    finally:
        await stop_server(running)
