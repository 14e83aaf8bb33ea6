"""The server under uvloop (the `fast` extra, what `presenced serve` uses when installed), in
process: STARTTLS and direct-TLS logins, a message between two clients, and a clean stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, start_server, stop_server
from tests.rawclient import CLIENT

uvloop = pytest.importorskip("uvloop")  # in the `test` extra: under CI a skip fails


async def scenario(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop)
    running = await start_server(tmp_path)
    try:
        assert running.server.loop is loop
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        alice = await running.raw_login("alice@a.test")
        bob = await running.raw_login("bob@a.test")
        direct = await running.raw(direct_tls=True)
        await direct.authenticate("a.test", "bob", PASSWORD)
        await direct.close()
        await alice.send("<message to='bob@a.test/raw' id='m1' type='chat'>"
                         "<body>on uvloop</body></message>")
        message = await bob.next_of("message")
        assert message.get("from") == "alice@a.test/raw" and message.get("id") == "m1"
        assert message.findtext(f"{{{CLIENT}}}body") == "on uvloop"
        slix = await running.client("alice@a.test", resource="slix")
        got: asyncio.Future[str] = loop.create_future()
        slix.add_event_handler("message", lambda m: got.done() or got.set_result(m["body"]))
        await bob.send("<message to='alice@a.test/slix' type='chat'><body>back</body></message>")
        assert await asyncio.wait_for(got, 5) == "back"
    finally:
        await stop_server(running)


def test_server_runs_under_uvloop(tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(tmp_path), 30))
