"""presenced on PostgreSQL end to end: a real server on a private cluster (tests/pg.py) with
real clients over sockets, kill -9 durability, and the commands that touch the database
(check, migrate, storage copy SQLite <-> PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from lxml import etree

from server.config import load_config
from server.storage import all_store_specs, open_storage
from tests.conftest import PASSWORD, start_server, stop_server, write_config
from tests.pg import Cluster
from tests.process import free_port
from tests.rawclient import CLIENT, RawClient
from tests.test_persistence import login, start  # the same steps, on PostgreSQL

ROOT = Path(__file__).resolve().parent.parent
ROSTER = "jabber:iq:roster"
IQ, MESSAGE, PRESENCE = (f"{{{CLIENT}}}{n}" for n in ("iq", "message", "presence"))


def pg_storage(dsn: str, **more: object) -> str:
    extra = "".join(f"{key} = {value!r}\n" for key, value in more.items())
    return f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n{extra}'


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


async def until(client: RawClient, match: str, ident: str | None = None) -> etree._Element:
    """The next stanza with this tag (and id); others are skipped."""
    while True:
        el = await asyncio.wait_for(client.next(), 10)
        if el.tag == match and (ident is None or el.get("id") == ident):
            return el


async def ping(client: RawClient, ident: str) -> list[etree._Element]:
    """What arrives before the answer to a ping (the server handles a stream in order)."""
    await client.send(f"<iq type='get' id='{ident}'><ping xmlns='urn:xmpp:ping'/></iq>")
    before = []
    while True:
        el = await asyncio.wait_for(client.next(), 10)
        if el.tag == IQ and el.get("id") == ident:
            return before
        before.append(el)


# -- a server on PostgreSQL ---------------------------------------------------------------------


async def test_login_roster_presence_messages_and_offline(tmp_path: Path, pg_dsn: str) -> None:
    running = await start_server(tmp_path, pg_storage(pg_dsn))
    try:
        assert running.server.storage.backend == "postgresql"
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        alice = await running.raw_login("alice@a.test", "pc")
        await alice.send("<presence/>")
        # Offline: bob has no session; the message is kept in PostgreSQL.
        await alice.send("<message to='bob@a.test' type='chat' id='m1'><body>while you were "
                         "away: Grüße 🙂</body></message>")
        await alice.send(f"<iq type='set' id='r1'><query xmlns='{ROSTER}'><item jid='bob@a.test'"
                         " name='Bob'><group>Friends</group></item></query></iq>")
        assert (await until(alice, IQ, "r1")).get("type") == "result"
        await alice.send("<presence to='bob@a.test' type='subscribe'/>")
        await ping(alice, "p1")
        assert await running.server.storage.offline.count("bob", "a.test") == 1

        # bob logs in with slixmpp: the offline message and the request arrive.
        got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        bob = await running.client("bob@a.test", presence=False)
        bob.auto_authorize = None  # answer by hand
        bob.add_event_handler("message", lambda m: got.put_nowait(("message", str(m["body"]))))
        bob.add_event_handler("presence_subscribe",
                              lambda p: got.put_nowait(("subscribe", str(p["from"]))))
        bob.send_presence()
        seen = {await asyncio.wait_for(got.get(), 10) for _ in range(2)}
        assert seen == {("message", "while you were away: Grüße 🙂"),
                        ("subscribe", "alice@a.test")}
        # Deleted once handed over (the delete follows the delivery; it may still be on its way).
        for _ in range(100):
            if await running.server.storage.offline.count("bob", "a.test") == 0:
                break
            await asyncio.sleep(0.05)
        assert await running.server.storage.offline.count("bob", "a.test") == 0

        # bob approves: alice's roster now has subscription "to", and bob's presence arrives.
        bob.send_presence(pto="alice@a.test", ptype="subscribed")
        presence = await until(alice, PRESENCE)
        while presence.get("from", "").split("/")[0] != "bob@a.test" or presence.get("type"):
            presence = await until(alice, PRESENCE)
        version, items = await running.server.storage.rosters.load("alice", "a.test")
        (item,) = items
        assert (item.contact, item.name, item.groups, item.subscription) == (
            "bob@a.test", "Bob", ("Friends",), "to")
        assert version >= 2

        # A live message, bob -> alice, over the two sockets.
        bob.send_message(mto="alice@a.test/pc", mbody="live", mtype="chat")
        message = await until(alice, MESSAGE)
        assert message.findtext(f"{{{CLIENT}}}body") == "live"
        assert message.get("from") == "bob@a.test/slix"
        await alice.close()
    finally:
        await stop_server(running)


async def test_kill_9_loses_no_offline_message_nor_pending_request(
        tmp_path: Path, pg_dsn: str) -> None:
    """What test_persistence.py checks on SQLite: committed to PostgreSQL before the sender's
    stanza counts as handled, so a `kill -9` right after loses nothing."""
    port = free_port()
    config = tmp_path / "presenced.toml"
    config.write_text(f'domains = ["a.test"]\ndata_dir = "data"\n[listen]\n'
                      f'c2s = ["127.0.0.1:{port}"]\nc2s_tls = []\n' + pg_storage(pg_dsn))
    for user in ("alice", "bob"):
        assert run(tmp_path, "adduser", f"{user}@a.test", "-p", "pw", "-c", str(config)) \
            .returncode == 0
    proc = start(config, tmp_path)
    try:
        alice = await login(port, "alice", "laptop")
        await alice.send("<presence to='bob@a.test' type='subscribe'/>"
                         "<message to='bob@a.test' type='chat'><body>kept</body></message>")
        assert [el for el in await ping(alice, "handled") if el.get("type") == "error"] == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # In the database, seen by another client: the message and bob's pending_in.
    db = await asyncpg.connect(pg_dsn)
    try:
        assert await db.fetchval("SELECT count(*) FROM offline_messages WHERE localpart = "
                                 "'bob'") == 1
        assert await db.fetchval("SELECT pending_in FROM roster_items WHERE localpart = 'bob' "
                                 "AND contact = 'alice@a.test'") is True
    finally:
        await db.close()
    assert not (tmp_path / "data" / "presenced.sqlite").exists()
    proc = start(config, tmp_path)
    try:
        bob = await login(port, "bob", "phone")
        await bob.send("<presence/>")
        arrived = set()
        while len(arrived) < 2:  # in either order
            el = await asyncio.wait_for(bob.next(), 10)
            if el.tag == MESSAGE:
                arrived.add(("message", el.findtext(f"{{{CLIENT}}}body")))
            elif el.tag == PRESENCE and el.get("type") == "subscribe":
                arrived.add(("request", el.get("from")))
        assert arrived == {("message", "kept"), ("request", "alice@a.test")}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


# -- storage copy -------------------------------------------------------------------------------


async def populate(tmp: Path) -> Path:
    """A SQLite database filled through a running server: accounts, a roster with a pending
    request, an offline message, a vCard. Returns its config."""
    running = await start_server(tmp)
    try:
        for user in ("alice", "bob", "jürgen"):
            await running.add_user(f"{user}@a.test", f"{user}-pw")
        alice = await running.raw_login("alice@a.test", password="alice-pw")
        await alice.send(f"<iq type='set' id='r1'><query xmlns='{ROSTER}'><item jid='bob@a.test'"
                         " name='Bob'><group>Friends</group></item></query></iq>")
        assert (await until(alice, IQ, "r1")).get("type") == "result"
        await alice.send(f"<iq type='set' id='r2'><query xmlns='{ROSTER}'>"
                         "<item jid='carol@b.test'/></query></iq>")
        assert (await until(alice, IQ, "r2")).get("type") == "result"
        await alice.send("<presence to='jürgen@a.test' type='subscribe'/>")
        await alice.send("<message to='bob@a.test' type='chat'><body>copied</body></message>")
        await alice.send("<iq type='set' id='v1'><vCard xmlns='vcard-temp'><FN>Alice</FN>"
                         "</vCard></iq>")
        assert (await until(alice, IQ, "v1")).get("type") == "result"
        await ping(alice, "p")
        await alice.close()
    finally:
        await stop_server(running)
    return running.config_path


async def test_storage_copy_sqlite_to_postgresql_and_back(
        tmp_path: Path, pg_cluster: Cluster, pg_dsn: str) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    sqlite_config = await populate(tmp_path / "sqlite")
    pg_dir = tmp_path / "pg"
    pg_config = write_config(pg_dir, pg_storage(pg_dsn))
    copied = run(tmp_path, "storage", "copy", "--from", str(sqlite_config), "--to",
                 str(pg_config))
    assert copied.returncode == 0, copied.stderr
    # Not a terminal: plain lines, one per table, no bar.
    assert "copied accounts: 3 row(s)" in copied.stderr.splitlines()
    assert "\r" not in copied.stderr
    assert copied.stdout.startswith("copied ")

    running = await start_server(pg_dir, pg_storage(pg_dsn))
    try:
        assert running.server.storage.backend == "postgresql"
        for user in ("bob", "jürgen"):  # every account logs in with its old password
            await running.client(f"{user}@a.test", f"{user}-pw", presence=False)
        alice = await running.client("alice@a.test", "alice-pw", presence=False)
        await alice.get_roster()
        assert set(alice.client_roster) >= {"bob@a.test", "carol@b.test", "jürgen@a.test"}
        assert alice.client_roster["bob@a.test"]["name"] == "Bob"
        assert alice.client_roster["bob@a.test"]["groups"] == ["Friends"]
        assert alice.client_roster["jürgen@a.test"]["pending_out"]
        # The offline message comes along, and new ones get ids after the copied ones.
        ((_, first),) = await running.server.storage.offline.load("bob", "a.test")
        assert b"copied" in first
        await running.server.storage.offline.store("bob", "a.test", b"<message>new</message>", 9)
        ids = [i for i, _ in await running.server.storage.offline.load("bob", "a.test")]
        assert len(ids) == 2 and ids[0] < ids[1]
        assert "Alice" in (await running.server.storage.vcards.get("alice", "a.test") or "")
    finally:
        await stop_server(running)

    # The target is no longer empty: a second copy refuses, and changes nothing.
    again = run(tmp_path, "storage", "copy", "--from", str(sqlite_config), "--to",
                str(pg_config))
    assert again.returncode == 1
    assert again.stderr.strip().endswith("storage copy only fills an empty database")
    assert "the target is not empty: table accounts has 3 row(s)" in again.stderr

    # And back, into a new SQLite file.
    back_config = write_config(tmp_path / "back")
    back = run(tmp_path, "storage", "copy", "--from", str(pg_config), "--to", str(back_config))
    assert back.returncode == 0, back.stderr
    source = await open_storage(load_config(sqlite_config))
    target = await open_storage(load_config(back_config))
    try:
        for user in ("alice", "bob", "jürgen"):
            assert await target.accounts.get_credentials(user, "a.test") == \
                await source.accounts.get_credentials(user, "a.test")
        assert await target.rosters.load("alice", "a.test") == \
            await source.rosters.load("alice", "a.test")
        assert len(await target.offline.load("bob", "a.test")) == 2
    finally:
        await source.close()
        await target.close()


def test_storage_copy_refuses_the_same_database_and_a_missing_one(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run(tmp_path, "storage", "copy", "--from", str(config), "--to", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().endswith("name the same database")
    other = write_config(tmp_path / "other")
    result = run(tmp_path, "storage", "copy", "--from", str(config), "--to", str(other))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"presenced: error: {config}: there is no database at "
                                      f"{tmp_path / 'data' / 'presenced.sqlite'}")


# -- migrate, check, config ---------------------------------------------------------------------


def test_migrate_creates_then_reports_up_to_date(tmp_path: Path, pg_dsn: str) -> None:
    config = write_config(tmp_path, pg_storage(pg_dsn))
    first = run(tmp_path, "migrate", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"{spec.name}: migrated from version 0 to {len(spec.migrations['postgresql'])}"
        for spec in all_store_specs()]
    second = run(tmp_path, "migrate", "--config", str(config))
    assert second.stdout.splitlines() == [
        f"{spec.name}: version {len(spec.migrations['postgresql'])}, up to date"
        for spec in all_store_specs()]


def check_lines(tmp_path: Path, config: Path) -> list[str]:
    result = run(tmp_path, "check", "--config", str(config))
    return [line for line in result.stdout.splitlines() if "storage" in line]


def dsn_line(config: Path) -> int:
    return next(n for n, line in enumerate(config.read_text().splitlines(), 1)
                if line.startswith("dsn"))


def test_check_reports_database_problems_on_one_line(tmp_path: Path,
                                                     pg_cluster: Cluster) -> None:
    good = write_config(tmp_path / "good", pg_storage(pg_cluster.dsn("postgres")))
    result = run(tmp_path, "check", "--config", str(good))
    assert result.returncode == 0 and result.stdout.strip().endswith(": ok"), result.stdout

    missing = write_config(tmp_path / "missing", pg_storage(pg_cluster.dsn("x")))
    assert check_lines(tmp_path, missing) == [
        f'error: {missing}:{dsn_line(missing)}: [storage] dsn: cannot connect: database "x" '
        "does not exist"]

    closed = write_config(tmp_path / "closed",
                          pg_storage(f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    (line,) = check_lines(tmp_path, closed)
    assert line.startswith(f"error: {closed}:{dsn_line(closed)}: [storage] dsn: cannot "
                           "connect: "), line

    wrong = write_config(tmp_path / "wrong", pg_storage(pg_cluster.dsn("postgres",
                                                                       password="wrong")))
    (line,) = check_lines(tmp_path, wrong)
    assert line.endswith("[storage] dsn: cannot connect: password authentication failed for "
                         'user "postgres"'), line

    unreadable = write_config(tmp_path / "pw", pg_storage(
        pg_cluster.dsn("postgres"), password_file=str(tmp_path / "no-such-file")))
    (line,) = check_lines(tmp_path, unreadable)
    assert "[storage] password_file: cannot read the password file" in line, line


def test_check_reports_missing_permissions(tmp_path: Path, pg_cluster: Cluster,
                                           pg_dsn: str) -> None:
    """A role that may connect but not create tables (PostgreSQL 15: public is not writable
    by other roles), then one that may not use the tables another role made."""
    database = pg_dsn.rsplit("/", 1)[1]
    pg_cluster.psql("CREATE ROLE limited LOGIN PASSWORD 'limited-pw'")
    try:
        config = write_config(tmp_path, pg_storage(pg_cluster.dsn(database, "limited",
                                                                  "limited-pw")))
        assert check_lines(tmp_path, config) == [
            f"error: {config}:{dsn_line(config)}: [storage] dsn: cannot create tables: "
            "permission denied for schema public"]
        result = run(tmp_path, "adduser", "a@a.test", "-p", "x", "-c", str(config))
        assert result.returncode == 1
        assert "cannot create the tables: permission denied for schema public" in result.stderr
        # Tables made by the owner, no grant to limited.
        owner = write_config(tmp_path / "owner", pg_storage(pg_dsn))
        assert run(tmp_path, "migrate", "-c", str(owner)).returncode == 0
        (line,) = check_lines(tmp_path, config)
        tables = sorted({"schema_versions", *(t for spec in all_store_specs()
                                              for t in spec.tables)})
        assert line.endswith("[storage] dsn: permission denied for table(s) "
                             + ", ".join(tables)), line
    finally:
        pg_cluster.psql(f'DROP DATABASE "{database}" WITH (FORCE)')
        pg_cluster.psql("DROP ROLE limited")


def test_config_requires_a_dsn_for_postgresql(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[storage]\nbackend = "postgresql"\npool_size = 0\n')
    result = run(tmp_path, "check", "--config", str(config))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    table = next(n for n, line in enumerate(config.read_text().splitlines(), 1)
                 if line == "[storage]")
    assert any(line.startswith(f"error: {config}:") and "[storage] dsn: missing: backend = "
               '"postgresql" needs it; expected a "postgresql://' in line for line in lines), lines
    assert any("[storage] pool_size: expected an integer from 1 to 1000" in line
               for line in lines), lines
    assert table > 0
    bad = write_config(tmp_path / "bad", '[storage]\nbackend = "postgresql"\n'
                                         'dsn = "mysql://u@h/db"\n')
    result = run(tmp_path, "check", "--config", str(bad))
    assert any("[storage] dsn: not a PostgreSQL URI: 'mysql://u@h/db'" in line
               for line in result.stdout.splitlines()), result.stdout
    other = write_config(tmp_path / "other", '[storage]\nbackend = "mongodb"\n')
    result = run(tmp_path, "check", "--config", str(other))
    assert '[storage] backend: expected one of "sqlite", "postgresql"' in result.stdout


async def test_password_used_by_a_server(tmp_path: Path, pg_cluster: Cluster,
                                         pg_dsn: str) -> None:
    """A role with a password (the cluster asks for one over TCP), kept in password_file."""
    database = pg_dsn.rsplit("/", 1)[1]
    pg_cluster.psql("CREATE ROLE withpw LOGIN PASSWORD 'db-secret'")
    try:
        pg_cluster.psql(f'ALTER DATABASE "{database}" OWNER TO withpw')
        (tmp_path / "db.pw").write_text("db-secret\n")
        running = await start_server(tmp_path, pg_storage(
            pg_cluster.dsn(database, "withpw"), password_file=str(tmp_path / "db.pw")))
        try:
            await running.add_user("alice@a.test")
            client = await running.raw_login("alice@a.test", password=PASSWORD)
            await client.close()
        finally:
            await stop_server(running)
        (tmp_path / "db.pw").write_text("wrong\n")
        result = run(tmp_path, "check", "--config", str(running.config_path))
        assert 'cannot connect: password authentication failed for user "withpw"' in \
            result.stdout, result.stdout
    finally:
        pg_cluster.psql(f'DROP DATABASE "{database}" WITH (FORCE)')
        pg_cluster.psql("DROP ROLE withpw")


# -- without PostgreSQL -------------------------------------------------------------------------


def test_without_postgresql_skips_on_a_developer_machine_and_fails_in_ci(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.pgcluster
    import tests.pg

    monkeypatch.setattr(bench.pgcluster, "bin_dir", lambda: None)
    fixture = tests.pg.pg_cluster.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        next(fixture())
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is not installed"):
        next(fixture())


def test_copy_progress_is_a_bar_on_a_terminal_and_lines_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from server.cli import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, expected in ((Terminal(), "\r[###############               ]  50%  roster_items "
                                          "1/2\033[K"),
                             (io.StringIO(), "copied roster_items: 2 row(s)\n")):
        monkeypatch.setattr(sys, "stderr", stream)
        progress = _Progress()
        progress("roster_items", 1, 2, 2, 4)
        progress("roster_items", 2, 2, 4, 4)
        progress.finish()
        assert stream.getvalue().startswith(expected) if stream.isatty() else \
            stream.getvalue() == expected, repr(stream.getvalue())
