"""Storage failures under a running server (issue 20 item 7), over real sockets: SQLite on a
small file system that fills up, PostgreSQL stopped and started again underneath.

While storage is down a client's write gets an iq error (internal-server-error, type 'wait':
RFC 6120 §8.3.2), a message to an offline contact bounces back to its sender (never silently
lost), other clients are still served, and the server log has one line for the outage (no
traceback per stanza); when storage comes back the same requests work again and the log says
so once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, STANZAS, RawClient

PRIVATE = "jabber:iq:private"


def private_set(ident: str, value: str) -> str:
    return (f"<iq type='set' id='{ident}'><query xmlns='{PRIVATE}'>"
            f"<note xmlns='urn:test:storage'>{value}</note></query></iq>")


def error_of(stanza: etree._Element) -> tuple[str | None, str | None]:
    """(error type, defined condition) of an error stanza."""
    error = stanza.find(f"{{{CLIENT}}}error")
    assert stanza.get("type") == "error" and error is not None, etree.tostring(stanza)
    names = [etree.QName(c).localname for c in error if etree.QName(c).namespace == STANZAS]
    return error.get("type"), next(n for n in names if n != "text")


def outage_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event}" in r.getMessage()]


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r.getMessage() for r in caplog.records
           if not r.name.startswith("slixmpp") and (r.exc_info or r.levelno >= logging.ERROR)]
    assert not bad, bad


async def ping(client: RawClient, ident: str) -> None:
    reply = await client.ask(f"<iq type='get' id='{ident}' to='a.test'>"
                             "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
    assert reply.get("type") == "result", etree.tostring(reply)


async def storage_down_then_back(running: RunningServer, caplog: pytest.LogCaptureFixture,
                                 down: object, up: object, *, reads_fail: bool) -> None:
    """The checks common to both backends; `down()` and `up()` break and restore storage
    (`reads_fail`: reads fail too, as with PostgreSQL stopped, unlike a full disk)."""
    alice = await running.raw_login("alice@a.test", "desk")
    carol = await running.raw_login("carol@a.test", "phone")
    await alice.send("<enable xmlns='urn:xmpp:sm:3'/>")
    await alice.expect("{urn:xmpp:sm:3}enabled")
    reply = await alice.ask(private_set("before", "one"), skip_others=True)
    assert reply.get("type") == "result"

    await down()  # type: ignore[operator]
    for n in range(5):  # five writes refused: one log line for the outage, not five
        reply = await alice.ask(private_set(f"down{n}", "two"), skip_others=True)
        assert error_of(reply) == ("wait", "internal-server-error"), etree.tostring(reply)
    # A message to an offline contact cannot be stored: it comes back to its sender.
    await alice.send("<message id='m1' to='bob@a.test' type='chat'><body>lost?</body></message>")
    bounce = await alice.next_of("message")
    assert bounce.get("id") == "m1" and error_of(bounce) == ("wait", "internal-server-error")
    await alice.send("<r xmlns='urn:xmpp:sm:3'/>")
    ack = await alice.expect("{urn:xmpp:sm:3}a")
    assert int(ack.get("h", "-1")) >= 7  # handled: answered with the bounce
    await ping(carol, "carol-alive")  # others are served meanwhile
    if reads_fail:  # a login cannot look its credentials up: RFC 6120 §6.5.12, try later
        dave = await running.raw()
        with pytest.raises(AssertionError, match="temporary-auth-failure"):
            await dave.authenticate("a.test", "bob", PASSWORD)
        await dave.close()
    assert len(outage_lines(caplog, "storage-unavailable")) == 1
    no_tracebacks(caplog)

    await up()  # type: ignore[operator]
    for attempt in range(50):  # PostgreSQL may need a moment to accept connections
        reply = await alice.ask(private_set(f"up{attempt}", "three"), skip_others=True)
        if reply.get("type") == "result":
            break
        await asyncio.sleep(0.2)
    assert reply.get("type") == "result", etree.tostring(reply)
    got = await alice.ask(f"<iq type='get' id='get'><query xmlns='{PRIVATE}'>"
                          "<note xmlns='urn:test:storage'/></query></iq>", skip_others=True)
    assert got.findtext(".//{urn:test:storage}note") == "three"
    await alice.send("<message id='m2' to='bob@a.test' type='chat'><body>kept</body></message>")
    bob = await running.raw_login("bob@a.test", "laptop")
    await bob.send("<presence/>")
    offline = await bob.next_of("message", timeout=10)
    assert offline.findtext(f"{{{CLIENT}}}body") == "kept"
    assert len(outage_lines(caplog, "storage-unavailable")) == 1
    assert len(outage_lines(caplog, "storage-recovered")) == 1
    no_tracebacks(caplog)
    for client in (alice, bob, carol):
        await client.close()


# -- SQLite on a file system that fills up -----------------------------------------------------

@contextlib.contextmanager
def mounted_tmpfs(directory: Path) -> Iterator[Path]:
    """`directory` on a 16 MiB tmpfs (root only: `mount -t tmpfs -o size=`), unmounted after."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs",
                           str(directory)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        for leftover in directory.glob("filler"):
            leftover.unlink()
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/data (the server's data_dir) on a 16 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "data") as data:
        yield data


def fill(directory: Path) -> Path:
    """Fill the file system of `directory`; the file that did it."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


async def test_sqlite_disk_full(tmp_path: Path, small_fs: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    caplog.set_level(logging.INFO)
    running = await start_server(tmp_path)
    try:
        for user in ("alice", "bob", "carol"):
            await running.add_user(f"{user}@a.test")
        filler = small_fs / "filler"

        async def down() -> None:
            fill(small_fs)

        async def up() -> None:
            filler.unlink()
        await storage_down_then_back(running, caplog, down, up, reads_fail=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            (small_fs / "filler").unlink()
        await stop_server(running)


async def test_upload_on_a_full_disk(tmp_path: Path, small_fs: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """XEP-0363 over a full file system: the files' own (a PUT is 507 and the slot stays
    usable), then the database's (a slot request is an iq error of type 'wait', a PUT is 503);
    no traceback, and it all works again once there is room."""
    from tests.test_http import fetch, put_file, request_slot, slot_urls, start_upload
    caplog.set_level(logging.INFO)
    with mounted_tmpfs(tmp_path / "files") as files:
        running = await start_upload(tmp_path, f'path = "{files}"\nmax_file_size = 1000000\n')
        try:
            client = await running.raw_login("alice@a.test")
            put, get = slot_urls(await request_slot(client, "a.txt", 100000))
            fill(files)
            assert (await put_file(put, b"a" * 100000))[0] == 507
            (files / "filler").unlink()
            assert (await put_file(put, b"a" * 100000))[0] == 201
            assert (await fetch(get))[2] == b"a" * 100000
            put, get = slot_urls(await request_slot(client, "b.txt", 10))
            fill(small_fs)  # now the database's file system
            reply = await request_slot(client, "c.txt", 10)
            assert error_of(reply) == ("wait", "internal-server-error")
            status, headers, _body = await put_file(put, b"b" * 10)
            assert status == 503 and headers.get("Retry-After")
            (small_fs / "filler").unlink()
            assert (await put_file(put, b"b" * 10))[0] == 201
            assert (await fetch(get))[2] == b"b" * 10
            assert slot_urls(await request_slot(client, "d.txt", 10))
            await client.close()
        finally:
            await stop_server(running)
    assert any("event=upload-write-failed" in line for line in
               [r.getMessage() for r in caplog.records])
    assert len(outage_lines(caplog, "storage-unavailable")) == 1
    no_tracebacks(caplog)


# -- PostgreSQL stopped and started under the server ---------------------------------------------

async def test_postgresql_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bench.pgcluster import ClusterError
    from tests.pg import Cluster
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    caplog.set_level(logging.INFO)
    try:
        cluster = Cluster()
    except ClusterError as exc:
        pytest.skip(str(exc))
    cluster.start()  # a private cluster: the session's one is shared with other tests
    try:
        dsn = cluster.dsn(cluster.create_database())
        running = await start_server(
            tmp_path, f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\npool_size = 2\n')
        try:
            for user in ("alice", "bob", "carol"):
                await running.add_user(f"{user}@a.test")

            paused = False

            async def down() -> None:
                nonlocal paused
                await asyncio.to_thread(cluster.pause)
                paused = True

            async def up() -> None:
                nonlocal paused
                await asyncio.to_thread(cluster.resume)
                paused = False
            try:
                await storage_down_then_back(running, caplog, down, up, reads_fail=True)
            finally:
                if paused:
                    await up()
        finally:
            await stop_server(running)
    finally:
        cluster.stop()

