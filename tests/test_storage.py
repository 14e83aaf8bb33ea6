"""Storage: one behavioural suite every backend must pass (SQLite, and PostgreSQL on a private
cluster, see tests/pg.py), then each backend's own concerns (migrations, files, locks)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server.config import StorageConfig, default_config
from server.storage import (
    BACKENDS,
    CORE_STORES,
    Storage,
    StorageError,
    StoreSpec,
    all_store_specs,
    open_storage,
)
from server.storage import sqlite as sqlite_backend
from server.storage.base import AccountExists, Credentials, NoSuchAccount, RosterItem, ScramKeys
from server.storage.db import Database
from server.storage.store import Store
from tests.process import free_port


def credentials(seed: int) -> Credentials:
    """Distinct bytes in every field, so that a swapped column cannot go unnoticed."""
    def keys(kind: int, size: int) -> ScramKeys:
        return ScramKeys(salt=bytes([seed, kind, 1]) * 6, iterations=4096 + seed * 10 + kind,
                         stored_key=bytes([seed, kind, 2]) * size,
                         server_key=bytes([seed, kind, 3]) * size)
    return Credentials(sha1=keys(1, 7), sha256=keys(2, 11))


def storage_config(tmp_path: Path, backend: str, dsn: str | None = None) -> StorageConfig:
    return dataclasses.replace(default_config().storage, backend=backend,
                               path=tmp_path / "data" / "presenced.sqlite", dsn=dsn)


@pytest.fixture(params=sorted(BACKENDS))
def config(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    return storage_config(tmp_path, request.param, dsn)


@pytest.fixture
async def storage(config: StorageConfig) -> AsyncIterator[Storage]:
    opened = await open_storage(config)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def two(config: StorageConfig) -> AsyncIterator[tuple[Storage, Storage]]:
    """Two storages on one database, as the server and the CLI (or two servers) have."""
    first, second = await open_storage(config), await open_storage(config)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


# -- every backend ------------------------------------------------------------------------------


async def test_create_and_read(storage: Storage) -> None:
    accounts = storage.accounts
    assert await accounts.get_credentials("alice", "a.test") is None
    assert not await accounts.exists("alice", "a.test")
    await accounts.create("alice", "a.test", credentials(1))
    assert await accounts.get_credentials("alice", "a.test") == credentials(1)
    assert await accounts.exists("alice", "a.test")
    assert await accounts.list("a.test") == ["alice"]


async def test_accounts_are_per_domain(storage: Storage) -> None:
    accounts = storage.accounts
    await accounts.create("bob", "a.test", credentials(1))
    await accounts.create("bob", "b.test", credentials(2))
    await accounts.create("alice", "a.test", credentials(3))
    assert await accounts.list("a.test") == ["alice", "bob"]
    assert await accounts.list("b.test") == ["bob"]
    assert await accounts.list("c.test") == []
    assert await accounts.get_credentials("bob", "b.test") == credentials(2)
    assert not await accounts.exists("alice", "b.test")
    assert not await accounts.exists("a.test", "alice")


async def test_duplicate_is_refused_and_changes_nothing(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    with pytest.raises(AccountExists):
        await storage.accounts.create("alice", "a.test", credentials(2))
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(1)


async def test_set_credentials(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.accounts.create("alice", "b.test", credentials(1))
    await storage.accounts.set_credentials("alice", "a.test", credentials(2))
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(2)
    assert await storage.accounts.get_credentials("alice", "b.test") == credentials(1)
    with pytest.raises(NoSuchAccount):
        await storage.accounts.set_credentials("nobody", "a.test", credentials(2))
    assert not await storage.accounts.exists("nobody", "a.test")


async def test_credentials_of_one_hash(storage: Storage) -> None:
    """An account imported from a server that kept SCRAM-SHA-1 keys only (server/porting):
    the other hash reads back as None, not as keys."""
    only_sha1 = Credentials(sha1=credentials(1).sha1, sha256=None)
    only_sha256 = Credentials(sha1=None, sha256=credentials(2).sha256)
    await storage.accounts.create("alice", "a.test", only_sha1)
    await storage.accounts.create("bob", "a.test", only_sha256)
    assert await storage.accounts.get_credentials("alice", "a.test") == only_sha1
    assert await storage.accounts.get_credentials("bob", "a.test") == only_sha256
    await storage.accounts.create("carol", "b.test", only_sha1)
    await storage.accounts.create("dave", "b.test", credentials(4))
    assert await storage.accounts.missing_keys() == (1, 2)
    await storage.accounts.set_credentials("alice", "a.test", credentials(3))
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(3)
    assert await storage.accounts.missing_keys() == (1, 1)
    with pytest.raises(ValueError):
        Credentials(sha1=None, sha256=None)


async def test_delete(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.accounts.create("bob", "a.test", credentials(2))
    await storage.accounts.delete("alice", "a.test")
    assert await storage.accounts.get_credentials("alice", "a.test") is None
    assert await storage.accounts.list("a.test") == ["bob"]
    with pytest.raises(NoSuchAccount):
        await storage.accounts.delete("alice", "a.test")
    await storage.accounts.create("alice", "a.test", credentials(3))  # the name is free again
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(3)


async def test_non_ascii_names(storage: Storage) -> None:
    await storage.accounts.create("jürgen", "bücher.test", credentials(1))
    assert await storage.accounts.list("bücher.test") == ["jürgen"]
    assert await storage.accounts.get_credentials("jürgen", "bücher.test") == credentials(1)


async def test_survives_reopening(config: StorageConfig) -> None:
    first = await open_storage(config)
    await first.accounts.create("alice", "a.test", credentials(1))
    await first.close()
    second = await open_storage(config)
    try:
        assert await second.accounts.get_credentials("alice", "a.test") == credentials(1)
    finally:
        await second.close()


async def test_second_connection_sees_writes_at_once(config: StorageConfig) -> None:
    """The CLI changes accounts while the server holds the database open."""
    server = await open_storage(config)
    cli = await open_storage(config)
    try:
        assert await server.accounts.get_credentials("alice", "a.test") is None
        await cli.accounts.create("alice", "a.test", credentials(1))
        assert await server.accounts.get_credentials("alice", "a.test") == credentials(1)
        await cli.accounts.set_credentials("alice", "a.test", credentials(2))
        assert await server.accounts.get_credentials("alice", "a.test") == credentials(2)
        await server.accounts.delete("alice", "a.test")
        assert not await cli.accounts.exists("alice", "a.test")
        # Writers on both connections at once: every write lands.
        await asyncio.gather(*(
            (server if n % 2 else cli).accounts.create(f"user{n:02}", "a.test", credentials(n))
            for n in range(20)))
        assert await server.accounts.list("a.test") == [f"user{n:02}" for n in range(20)]
        assert await cli.accounts.get_credentials("user13", "a.test") == credentials(13)
    finally:
        await cli.close()
        await server.close()


async def test_open_with_a_whole_config(tmp_path: Path) -> None:
    config = dataclasses.replace(default_config(), storage=storage_config(tmp_path, "sqlite"))
    storage = await open_storage(config)
    try:
        await storage.accounts.create("alice", "a.test", credentials(1))
    finally:
        await storage.close()
    assert (tmp_path / "data" / "presenced.sqlite").exists()


def test_every_store_is_a_core_store() -> None:
    names = [spec.name for spec in CORE_STORES]
    assert names == ["accounts", "rosters", "vcards", "private", "last_activity", "offline",
                     "blocklists", "fast_tokens", "secrets"]
    # migrate and storage copy know the core's stores and every module's.
    from server.modules import store_specs
    assert all_store_specs()[:len(CORE_STORES)] == CORE_STORES
    assert [s.name for s in all_store_specs()] == [
        *names, *(s.name for s in store_specs() if s.name not in names)]
    for spec in all_store_specs():
        assert set(spec.migrations) == set(BACKENDS), spec.name


# -- every store, on every backend --------------------------------------------------------------


async def test_storage_has_every_store(storage: Storage, config: StorageConfig) -> None:
    assert storage.backend == config.backend
    for spec in CORE_STORES:
        assert isinstance(getattr(storage, spec.name), spec.factory(config.backend))


def item(contact: str, **fields: Any) -> RosterItem:
    return RosterItem(contact=contact, **fields)


async def test_roster_items_and_versions(storage: Storage) -> None:
    rosters = storage.rosters
    await storage.accounts.create("alice", "a.test", credentials(1))
    assert await rosters.load("alice", "a.test") == (0, [])
    full = item("bob@b.test", name="Bob", groups=("Friends", "Work"), subscription="both",
                pending_out=True, pending_in=True, approved=True, listed=False,
                request="<presence type='subscribe'/>")
    assert await rosters.put("alice", "a.test", full) == 1
    assert await rosters.put("alice", "a.test", item("carol@c.test")) == 2
    version, items = await rosters.load("alice", "a.test")
    assert version == 2
    assert sorted(items, key=lambda i: i.contact) == [full, item("carol@c.test")]
    # Replacing keeps one row per contact; every field is replaced.
    assert await rosters.put("alice", "a.test", item("bob@b.test", name="B")) == 3
    assert await rosters.delete("alice", "a.test", "carol@c.test") == 4
    assert await rosters.delete("alice", "a.test", "nobody@c.test") == 5  # still a change
    assert await rosters.load("alice", "a.test") == (5, [item("bob@b.test", name="B")])


async def test_a_roster_and_its_version_are_read_in_one_statement(
        storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read at every initial presence, before the stream's next stanza: one round trip."""
    rosters = storage.rosters
    await storage.accounts.create("alice", "a.test", credentials(1))
    db = rosters._db
    statements: list[str] = []
    fetch = db.fetch

    async def counting(sql: str, *args: Any) -> Any:
        statements.append(sql)
        return await fetch(sql, *args)

    monkeypatch.setattr(db, "fetch", counting)
    assert await rosters.load("alice", "a.test") == (0, [])
    await rosters.put("alice", "a.test", item("bob@b.test"))
    await rosters.put("alice", "a.test", item("carol@c.test", groups=("G",)))
    statements.clear()
    version, items = await rosters.load("alice", "a.test")
    assert (version, sorted(i.contact for i in items)) == (2, ["bob@b.test", "carol@c.test"])
    assert len(statements) == 1
    # Every item removed: the version stays (XEP-0237 §4: it never goes back).
    await rosters.delete("alice", "a.test", "bob@b.test")
    await rosters.delete("alice", "a.test", "carol@c.test")
    statements.clear()
    assert await rosters.load("alice", "a.test") == (4, [])
    assert len(statements) == 1


async def test_roster_of_a_missing_account(storage: Storage) -> None:
    with pytest.raises(NoSuchAccount):
        await storage.rosters.put("nobody", "a.test", item("bob@b.test"))
    with pytest.raises(NoSuchAccount):
        await storage.rosters.delete("nobody", "a.test", "bob@b.test")
    assert await storage.rosters.load("nobody", "a.test") == (0, [])


async def test_two_writers_on_one_roster(two: tuple[Storage, Storage]) -> None:
    """Every change gets its own version, and the last version counts every change."""
    first, second = two
    await first.accounts.create("alice", "a.test", credentials(1))
    versions = await asyncio.gather(*(
        (first if n % 2 else second).rosters.put("alice", "a.test", item(f"c{n:02}@b.test"))
        for n in range(40)))
    assert sorted(versions) == list(range(1, 41))
    version, items = await second.rosters.load("alice", "a.test")
    assert version == 40
    assert sorted(i.contact for i in items) == [f"c{n:02}@b.test" for n in range(40)]


async def test_a_roster_change_and_its_version_are_one_transaction(
        storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    assert await storage.rosters.put("alice", "a.test", item("bob@b.test")) == 1
    original = Database.fetchrow

    async def failing_bump(self: Database, sql: str, *args: Any) -> Any:
        if "roster_versions" in sql:
            raise RuntimeError("the bump fails")
        return await original(self, sql, *args)

    monkeypatch.setattr(Database, "fetchrow", failing_bump)
    with pytest.raises(RuntimeError, match="the bump fails"):
        await storage.rosters.put("alice", "a.test", item("carol@c.test"))
    with pytest.raises(RuntimeError, match="the bump fails"):
        await storage.rosters.delete("alice", "a.test", "bob@b.test")
    monkeypatch.undo()
    assert await storage.rosters.load("alice", "a.test") == (1, [item("bob@b.test")])
    # The storage still works after the rollbacks.
    assert await storage.rosters.put("alice", "a.test", item("carol@c.test")) == 2


async def test_offline_messages(storage: Storage) -> None:
    offline = storage.offline
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.accounts.create("bob", "a.test", credentials(2))
    for n in range(3):
        assert await offline.store("alice", "a.test", b"<message>%d</message>" % n, 3)
    assert not await offline.store("alice", "a.test", b"<message>over</message>", 3)
    assert await offline.store("bob", "a.test", b"<message>bob</message>", 3)
    stored = await offline.load("alice", "a.test")
    assert [stanza for _, stanza in stored] == [b"<message>%d</message>" % n for n in range(3)]
    ids = [i for i, _ in stored]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert await offline.count("alice", "a.test") == 3
    await offline.delete("alice", "a.test", ids[1])
    assert await offline.load("alice", "a.test") == stored[2:]
    assert await offline.store("alice", "a.test", b"<message>later</message>", 3)
    later = await offline.load("alice", "a.test")
    assert later[-1][0] > ids[2] and later[-1][1] == b"<message>later</message>"
    assert await offline.count("bob", "a.test") == 1
    with pytest.raises(NoSuchAccount):
        await offline.store("nobody", "a.test", b"<message/>", 3)


async def test_offline_owners(storage: Storage) -> None:
    """The accounts holding messages, each once, at most limit of them."""
    offline = storage.offline
    assert await offline.owners(10) == []
    for n, user in enumerate(("alice", "bob", "carol")):
        await storage.accounts.create(user, "a.test", credentials(n + 1))
    for user in ("alice", "alice", "bob"):
        assert await offline.store(user, "a.test", b"<message/>", 10)
    assert sorted(await offline.owners(10)) == [("alice", "a.test"), ("bob", "a.test")]
    assert len(await offline.owners(1)) == 1
    stored = await offline.load("alice", "a.test")
    await offline.delete("alice", "a.test", stored[-1][0])
    assert await offline.owners(10) == [("bob", "a.test")]


async def test_offline_quota_holds_for_concurrent_senders(two: tuple[Storage, Storage]) -> None:
    first, second = two
    await first.accounts.create("alice", "a.test", credentials(1))
    stored = await asyncio.gather(*(
        (first if n % 2 else second).offline.store("alice", "a.test", b"<m>%d</m>" % n, 5)
        for n in range(30)))
    assert stored.count(True) == 5
    assert await first.offline.count("alice", "a.test") == 5


async def test_userdata(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    assert await storage.vcards.get("alice", "a.test") is None
    assert await storage.vcards.avatar_hash("alice", "a.test") is None
    await storage.vcards.set("alice", "a.test", "<vCard>1</vCard>", "")
    await storage.vcards.set("alice", "a.test", "<vCard>2</vCard>", "ab" * 20)
    assert await storage.vcards.get("alice", "a.test") == "<vCard>2</vCard>"
    assert await storage.vcards.avatar_hash("alice", "a.test") == "ab" * 20
    private = storage.private
    await private.set("alice", "a.test", [("urn:a", "a", "<a xmlns='urn:a'/>"),
                                          ("urn:b", "b", "<b xmlns='urn:b'/>")])
    await private.set("alice", "a.test", [("urn:a", "a", "<a xmlns='urn:a'>2</a>"),
                                          ("urn:a", "a", "<a xmlns='urn:a'>3</a>")])
    await private.set("alice", "a.test", [])
    assert await private.get("alice", "a.test", "urn:a", "a") == "<a xmlns='urn:a'>3</a>"
    assert await private.get("alice", "a.test", "urn:b", "b") == "<b xmlns='urn:b'/>"
    assert await private.get("alice", "a.test", "urn:b", "a") is None
    await storage.accounts.create("bob", "a.test", credentials(2))
    await private.set("bob", "a.test", [("urn:b", "b", "<b xmlns='urn:b'>bob</b>")])
    assert await private.all("alice", "a.test") == [("urn:a", "a", "<a xmlns='urn:a'>3</a>"),
                                                    ("urn:b", "b", "<b xmlns='urn:b'/>")]
    assert await private.all("nobody", "a.test") == []
    assert await storage.last_activity.get("alice", "a.test") is None
    await storage.last_activity.set("alice", "a.test", 1_700_000_000, "gone")
    await storage.last_activity.set("alice", "a.test", 4_102_444_800, "back in 2100")
    assert await storage.last_activity.get("alice", "a.test") == (4_102_444_800, "back in 2100")
    for write in (lambda: storage.vcards.set("nobody", "a.test", "<vCard/>", ""),
                  lambda: private.set("nobody", "a.test", [("urn:a", "a", "<a/>")]),
                  lambda: storage.last_activity.set("nobody", "a.test", 1, "")):
        with pytest.raises(NoSuchAccount):
            await write()


async def test_blocklists(storage: Storage) -> None:
    blocklists = storage.blocklists
    await storage.accounts.create("alice", "a.test", credentials(1))
    assert await blocklists.get("alice", "a.test") == []
    await blocklists.add("alice", "a.test", ["spam.test", "eve@b.test", "eve@b.test/r"])
    await blocklists.add("alice", "a.test", ["spam.test", "zoë@b.test"])  # again: no error
    assert await blocklists.get("alice", "a.test") == ["eve@b.test", "eve@b.test/r",
                                                       "spam.test", "zoë@b.test"]
    await blocklists.remove("alice", "a.test", ["eve@b.test", "never@b.test"])
    assert await blocklists.get("alice", "a.test") == ["eve@b.test/r", "spam.test",
                                                       "zoë@b.test"]
    await blocklists.add("alice", "a.test", [])
    await blocklists.remove("alice", "a.test", [])
    await blocklists.clear("alice", "a.test")
    assert await blocklists.get("alice", "a.test") == []
    with pytest.raises(NoSuchAccount):
        await blocklists.add("nobody", "a.test", ["spam.test"])


TEXT = "Grüße, 你好, مرحبا, 🙂 \u00e9\u0301 <&'\">"


async def test_unicode_and_large_payloads(storage: Storage) -> None:
    await storage.accounts.create("jürgen", "bücher.test", credentials(1))
    large_text = (TEXT * 40_000)[:1_000_000]        # about 1.3 MB of UTF-8
    large_bytes = bytes(range(256)) * 4096          # 1 MiB, every byte value (NUL too)
    await storage.vcards.set("jürgen", "bücher.test", large_text, "")
    assert await storage.vcards.get("jürgen", "bücher.test") == large_text
    assert await storage.offline.store("jürgen", "bücher.test", large_bytes, 10)
    assert [m for _, m in await storage.offline.load("jürgen", "bücher.test")] == [large_bytes]
    await storage.private.set("jürgen", "bücher.test", [("urn:ü", TEXT, large_text)])
    assert await storage.private.get("jürgen", "bücher.test", "urn:ü", TEXT) == large_text
    contact = item("straße@bücher.test", name=TEXT, groups=(TEXT, "🙂" * 1000),
                   request=large_text)
    await storage.rosters.put("jürgen", "bücher.test", contact)
    assert await storage.rosters.load("jürgen", "bücher.test") == (1, [contact])
    await storage.last_activity.set("jürgen", "bücher.test", 1, TEXT)
    assert await storage.last_activity.get("jürgen", "bücher.test") == (1, TEXT)
    await storage.blocklists.add("jürgen", "bücher.test", [f"{TEXT}@x.test".replace(" ", "")])
    assert len(await storage.blocklists.get("jürgen", "bücher.test")) == 1


async def own_everything(storage: Storage, user: str, domain: str) -> None:
    await storage.rosters.put(user, domain, item("bob@b.test", subscription="both"))
    await storage.vcards.set(user, domain, "<vCard/>", "00" * 20)
    await storage.private.set(user, domain, [("urn:a", "a", "<a/>")])
    await storage.last_activity.set(user, domain, 5, "away")
    assert await storage.offline.store(user, domain, b"<message/>", 10)
    await storage.blocklists.add(user, domain, ["spam.test"])


async def owns_nothing(storage: Storage, user: str, domain: str) -> None:
    assert await storage.rosters.load(user, domain) == (0, [])
    assert await storage.vcards.get(user, domain) is None
    assert await storage.private.get(user, domain, "urn:a", "a") is None
    assert await storage.last_activity.get(user, domain) is None
    assert await storage.offline.load(user, domain) == []
    assert await storage.blocklists.get(user, domain) == []


async def test_deleting_an_account_removes_everything_it_owns(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.accounts.create("bob", "a.test", credentials(2))
    await own_everything(storage, "alice", "a.test")
    await own_everything(storage, "bob", "a.test")
    await storage.accounts.delete("alice", "a.test")
    await storage.accounts.create("alice", "a.test", credentials(3))  # a new owner, same name
    await owns_nothing(storage, "alice", "a.test")
    assert (await storage.rosters.load("bob", "a.test"))[0] == 1  # the others keep theirs


async def test_an_account_deleted_while_its_data_is_written(two: tuple[Storage, Storage]) -> None:
    """Each write lands before the delete (and goes with it) or fails with NoSuchAccount;
    nothing the account owned survives it."""
    first, second = two
    for attempt in range(5):
        await first.accounts.create("alice", "a.test", credentials(1))
        writes: list[Callable[[], Any]] = [
            lambda n=n: second.rosters.put("alice", "a.test", item(f"c{n}@b.test"))
            for n in range(10)]
        writes += [lambda n=n: second.offline.store("alice", "a.test", b"<m>%d</m>" % n, 100)
                   for n in range(10)]
        writes += [lambda: second.vcards.set("alice", "a.test", "<vCard/>", ""),
                   lambda: second.private.set("alice", "a.test", [("urn:a", "a", "<a/>")]),
                   lambda: second.last_activity.set("alice", "a.test", 1, ""),
                   lambda: second.blocklists.add("alice", "a.test", ["spam.test"])]
        tasks = [asyncio.ensure_future(write()) for write in writes]
        await asyncio.sleep(attempt * 0.002)
        await first.accounts.delete("alice", "a.test")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            assert not isinstance(result, BaseException) or isinstance(result, NoSuchAccount), \
                result
        assert not await first.accounts.exists("alice", "a.test")
        await first.accounts.create("alice", "a.test", credentials(2))
        await owns_nothing(first, "alice", "a.test")
        await first.accounts.delete("alice", "a.test")


async def test_shared_secrets(two: tuple[Storage, Storage], tmp_path: Path) -> None:
    """storage/keystore.py (issue 22 item 5): a secret is made once, the first writer's value
    wins, every connection reads the same; a legacy key file is imported, then not read."""
    from server.storage.keystore import SECRET_SIZE, shared_secret
    first, second = two
    assert await first.secrets.get("fast-token") is None
    assert await first.secrets.create("fast-token", b"\x00one\xff" * 5) == b"\x00one\xff" * 5
    # A second create keeps what is there (INSERT ... ON CONFLICT DO NOTHING, then read).
    assert await second.secrets.create("fast-token", b"two" * 11) == b"\x00one\xff" * 5
    assert await second.secrets.get("fast-token") == b"\x00one\xff" * 5
    # Made by two at once: both get the same, random, value.
    made = await asyncio.gather(*(shared_secret(s.secrets, "upload") for s in (first, second)
                                  for _ in range(4)))
    assert len(set(made)) == 1 and len(made[0]) == SECRET_SIZE
    assert made[0] != await shared_secret(first.secrets, "dialback")
    # An upgrade: the old file's key is imported; a later change of the file is not read.
    legacy = tmp_path / "muc-occupant-id.key"
    legacy.write_bytes(b"k" * 40)
    assert await shared_secret(second.secrets, "muc-occupant-id", legacy) == b"k" * 40
    legacy.write_bytes(b"z" * 40)
    assert await shared_secret(first.secrets, "muc-occupant-id", legacy) == b"k" * 40
    # Too short a file is refused, as reading it was.
    legacy.write_bytes(b"short")
    with pytest.raises(ValueError, match="needs 32 bytes"):
        await shared_secret(first.secrets, "webadmin-cookie", legacy, min_size=32)
    assert await first.secrets.get("webadmin-cookie") is None


async def test_message_of_the_day(config: StorageConfig) -> None:
    """XEP-0133 set-motd/delete-motd (server/modules/admin_adhoc.py): per domain, replaced,
    deleted, and seen by a second connection (another node, the next start)."""
    from server.storage.motd import SPEC as MOTD

    first = await open_storage(config, [*CORE_STORES, MOTD])
    second = await open_storage(config, [*CORE_STORES, MOTD])
    try:
        assert await first.motd.get("a.test") is None
        await first.motd.set("a.test", "Hello\nwörld \U0001f600")
        await first.motd.set("b.test", "other")
        assert await second.motd.get("a.test") == "Hello\nwörld \U0001f600"
        await second.motd.set("a.test", "replaced")
        assert await first.motd.get("a.test") == "replaced"
        assert await first.motd.delete("a.test") is True
        assert await first.motd.delete("a.test") is False
        assert await second.motd.get("a.test") is None
        assert await second.motd.get("b.test") == "other"
    finally:
        await first.close()
        await second.close()


# -- migrations, on every backend ---------------------------------------------------------------


async def store_versions(storage: Storage) -> dict[str, int]:
    return {str(s): int(v) for s, v in
            await storage.db.fetch("SELECT store, version FROM schema_versions")}


async def table_names(storage: Storage) -> set[str]:
    sql = ("SELECT name FROM sqlite_master WHERE type = 'table'" if storage.backend == "sqlite"
           else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return {str(r[0]) for r in await storage.db.fetch(sql)}


LATER_TABLE = ("CREATE TABLE later (domain TEXT NOT NULL, localpart TEXT NOT NULL, "
               "FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart) "
               "ON DELETE CASCADE)")


def later_spec(*migrations: Any) -> StoreSpec:
    """A store a feature module might declare, with the same migrations on both backends."""
    return StoreSpec(name="later", sqlite=Store, postgresql=Store,
                     migrations={"sqlite": migrations, "postgresql": migrations},
                     tables=("later",))


async def test_a_new_database_gets_every_store_at_its_version(storage: Storage) -> None:
    assert await store_versions(storage) == {
        spec.name: len(spec.migrations[storage.backend]) for spec in CORE_STORES}
    assert {"schema_versions", "accounts", "roster_items", "roster_versions", "vcards",
            "private_xml", "last_activity", "offline_messages", "blocklist"} <= \
        await table_names(storage)


async def test_applies_only_missing_migrations(config: StorageConfig) -> None:
    storage = await open_storage(config)
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.close()
    applied: list[str] = []

    async def by_function(db: Database) -> None:
        applied.append(db.dialect)
        await db.execute("INSERT INTO later SELECT domain, localpart FROM accounts")

    spec = later_spec([LATER_TABLE], by_function)
    storage = await open_storage(config, (*CORE_STORES, spec))
    await storage.close()
    assert applied == [config.backend]
    storage = await open_storage(config, (*CORE_STORES, spec))  # up to date: nothing runs
    try:
        assert applied == [config.backend]
        assert (await store_versions(storage))["later"] == 2
        assert await storage.db.fetch("SELECT * FROM later") == [("a.test", "alice")]
        # A third migration later: only it runs.
        await storage.close()
        storage = await open_storage(config, (*CORE_STORES, later_spec(
            [LATER_TABLE], by_function, ["ALTER TABLE later ADD COLUMN note TEXT"])))
        assert applied == [config.backend]
        assert (await store_versions(storage))["later"] == 3
        assert isinstance(storage.later, Store)  # type: ignore[attr-defined]
        # Foreign keys hold: deleting the account removes what it owns.
        await storage.accounts.delete("alice", "a.test")
        assert await storage.db.fetch("SELECT * FROM later") == []
    finally:
        await storage.close()
    # Opened without the module's store, the database is still usable.
    storage = await open_storage(config)
    await storage.close()


async def test_a_failing_migration_changes_nothing(config: StorageConfig) -> None:
    storage = await open_storage(config)
    before = await store_versions(storage)
    await storage.close()
    spec = later_spec(["CREATE TABLE half (x INTEGER)", "INSERT INTO no_such_table VALUES (1)"])
    with pytest.raises(StorageError, match="no_such_table"):
        await open_storage(config, (*CORE_STORES, spec))
    storage = await open_storage(config)
    try:
        assert await store_versions(storage) == before
        assert "half" not in await table_names(storage)
    finally:
        await storage.close()


async def test_refuses_a_store_newer_than_the_code(config: StorageConfig) -> None:
    storage = await open_storage(config)
    await storage.db.execute("UPDATE schema_versions SET version = 7 WHERE store = 'rosters'")
    await storage.close()
    with pytest.raises(StorageError, match="store 'rosters' has schema version 7, newer than "
                                           r"this presenced knows \(1\): upgrade presenced"):
        await open_storage(config)


async def test_specs_are_checked(config: StorageConfig) -> None:
    with pytest.raises(StorageError, match="declared twice"):
        await open_storage(config, (*CORE_STORES, CORE_STORES[1]))
    with pytest.raises(StorageError, match="'later' requires accounts"):
        await open_storage(config, (later_spec([LATER_TABLE]), *CORE_STORES))
    missing = dataclasses.replace(later_spec([LATER_TABLE]), migrations={"other": []})
    with pytest.raises(StorageError, match=f"no {config.backend} implementation"):
        await open_storage(config, (*CORE_STORES, missing))


async def test_two_processes_opening_a_new_database_at_once(config: StorageConfig) -> None:
    """Both migrate an empty database at the same moment: one waits for the other (SQLite's
    write lock, PostgreSQL's advisory lock); neither fails."""
    opened = await asyncio.gather(*(open_storage(config) for _ in range(4)))
    try:
        await opened[0].accounts.create("alice", "a.test", credentials(1))
        assert all([await s.accounts.exists("alice", "a.test") for s in opened])
        assert await store_versions(opened[3]) == {
            spec.name: len(spec.migrations[config.backend]) for spec in CORE_STORES}
    finally:
        for s in opened:
            await s.close()


# -- SQLite: files, pragmas, the schema before per-store versions -------------------------------


def sqlite_config(tmp_path: Path) -> StorageConfig:
    return storage_config(tmp_path, "sqlite")


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


async def test_open_creates_the_directory(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    assert not config.path.parent.exists()
    storage = await open_storage(config)
    await storage.close()
    assert config.path.parent.is_dir()


async def test_unusable_location_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    blocked = dataclasses.replace(sqlite_config(tmp_path),
                                  path=tmp_path / "file" / "sub" / "db.sqlite")
    with pytest.raises(StorageError, match="cannot create"):
        await open_storage(blocked)


async def test_sqlite_file_settings(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    storage = await open_storage(config)
    try:
        assert isinstance(storage.db, sqlite_backend.SQLiteDatabase)

        async def pragma(name: str) -> object:
            (row,) = await storage.db.fetch(f"PRAGMA {name}")
            return row[0]

        assert await pragma("journal_mode") == "wal"
        assert await pragma("foreign_keys") == 1
        assert await pragma("busy_timeout") == 5000
        assert await pragma("synchronous") == 1  # NORMAL
    finally:
        await storage.close()
    # It holds the SCRAM keys: only its owner reads it.
    assert config.path.stat().st_mode & 0o777 == 0o600
    assert config.path.parent.stat().st_mode & 0o777 == 0o700


async def test_migrates_an_empty_file(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    config.path.parent.mkdir()
    config.path.write_bytes(b"")  # an empty file is an empty SQLite database
    storage = await open_storage(config)
    await storage.close()
    assert {"schema_versions", "accounts"} <= tables(config.path)


def legacy_file(path: Path, version: int) -> None:
    """A file as presenced wrote it before per-store versions: the first `version` global
    migrations (their statements are the stores' first migrations) and schema_version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        for stores in sqlite_backend.LEGACY_VERSIONS[:version]:
            for name in stores:
                (spec,) = [s for s in CORE_STORES if s.name == name]
                for statement in spec.migrations["sqlite"][0]:
                    db.execute(statement)  # type: ignore[arg-type]
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        keys = credentials(1)
        db.execute("INSERT INTO accounts (domain, localpart, sha1_salt, sha1_iterations, "
                   "sha1_stored_key, sha1_server_key, sha256_salt, sha256_iterations, "
                   "sha256_stored_key, sha256_server_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   ("a.test", "alice", keys.sha1.salt, keys.sha1.iterations,
                    keys.sha1.stored_key, keys.sha1.server_key, keys.sha256.salt,
                    keys.sha256.iterations, keys.sha256.stored_key, keys.sha256.server_key))
        if version >= 2:
            db.execute("INSERT INTO roster_items (domain, localpart, contact, subscription) "
                       "VALUES ('a.test', 'alice', 'bob@b.test', 'both')")
            db.execute("INSERT INTO roster_versions VALUES ('a.test', 'alice', 7)")


@pytest.mark.parametrize("version", [1, 3, 5])
async def test_upgrades_a_file_with_the_old_global_version(tmp_path: Path, version: int) -> None:
    config = sqlite_config(tmp_path)
    legacy_file(config.path, version)
    storage = await open_storage(config)
    try:
        assert await storage.accounts.get_credentials("alice", "a.test") == credentials(1)
        if version >= 2:
            assert await storage.rosters.load("alice", "a.test") == (
                7, [item("bob@b.test", subscription="both")])
        await own_everything(storage, "alice", "a.test")  # every store's tables are there
        assert await store_versions(storage) == {spec.name: 1 for spec in CORE_STORES}
    finally:
        await storage.close()
    assert "schema_version" not in tables(config.path)


async def test_refuses_a_file_with_a_newer_global_version(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    legacy_file(config.path, 5)
    with sqlite3.connect(config.path) as db:
        db.execute("UPDATE schema_version SET version = 6")
    with pytest.raises(StorageError, match="schema version 6, newer than this presenced"):
        await open_storage(config)
    assert "schema_version" in tables(config.path)
    assert "schema_versions" not in tables(config.path)  # rolled back


async def test_not_a_database(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    config.path.parent.mkdir()
    config.path.write_bytes(b"this is not an SQLite file, it is plain text" * 100)
    with pytest.raises(StorageError, match="cannot use"):
        await open_storage(config)


async def test_waits_for_another_process_writing(tmp_path: Path) -> None:
    """busy_timeout: a write while another connection holds the write lock waits, not fails."""
    config = sqlite_config(tmp_path)
    storage = await open_storage(config)
    other = sqlite3.connect(config.path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO accounts SELECT 'a.test', 'held', x'00', 1, x'00', x'00', "
                      "x'00', 1, x'00', x'00', 0")
        release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
        release.start()
        started = asyncio.get_running_loop().time()
        await storage.accounts.create("alice", "a.test", credentials(1))
        assert asyncio.get_running_loop().time() - started >= 0.25
        release.join()
        assert await storage.accounts.list("a.test") == ["alice", "held"]
    finally:
        other.close()
        await storage.close()


# -- PostgreSQL: connecting ---------------------------------------------------------------------


def pg_config(tmp_path: Path, dsn: str, **changes: Any) -> StorageConfig:
    return dataclasses.replace(storage_config(tmp_path, "postgresql", dsn), **changes)


async def test_postgres_unreachable_database_is_a_storage_error(
        tmp_path: Path, pg_cluster: Any) -> None:
    missing = pg_cluster.dsn("no_such_database")
    with pytest.raises(StorageError, match=r'cannot connect to .*: database "no_such_database" '
                                           r"does not exist") as info:
        await open_storage(pg_config(tmp_path, missing))
    assert "postgres:***@127.0.0.1" in str(info.value)  # never the password
    assert pg_cluster.dsn().split(":")[2].split("@")[0] not in str(info.value)
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    with pytest.raises(StorageError, match=r"cannot connect to .*: Connection refused"):
        await open_storage(pg_config(tmp_path, closed))


async def test_postgres_password_file(tmp_path: Path, pg_cluster: Any, pg_dsn: str) -> None:
    database = pg_dsn.rsplit("/", 1)[1]
    pg_cluster.psql("CREATE ROLE pw_user LOGIN PASSWORD 'right' ")
    try:
        pg_cluster.psql(f'GRANT ALL ON DATABASE "{database}" TO pw_user')
        pg_cluster.psql("GRANT ALL ON SCHEMA public TO pw_user", database)
        (tmp_path / "pw").write_text("right\n")
        dsn = pg_cluster.dsn(database, user="pw_user")
        storage = await open_storage(pg_config(tmp_path, dsn, password_file=tmp_path / "pw"))
        await storage.accounts.create("alice", "a.test", credentials(1))
        await storage.close()
        with pytest.raises(StorageError, match="cannot read the password file"):
            await open_storage(pg_config(tmp_path, dsn, password_file=tmp_path / "none"))
    finally:
        pg_cluster.psql(f'DROP DATABASE "{database}" WITH (FORCE)')
        pg_cluster.psql("DROP ROLE pw_user")


async def test_postgres_pool_size(tmp_path: Path, pg_dsn: str) -> None:
    storage = await open_storage(pg_config(tmp_path, pg_dsn, pool_size=2))
    try:
        pool = storage.db._pool  # type: ignore[attr-defined]
        assert isinstance(pool, asyncpg.Pool) and pool.get_max_size() == 2
        await storage.accounts.create("alice", "a.test", credentials(1))
        # More concurrent calls than connections: they queue, all land.
        await asyncio.gather(*(storage.rosters.put("alice", "a.test", item(f"c{n}@b.test"))
                               for n in range(20)))
        assert (await storage.rosters.load("alice", "a.test"))[0] == 20
    finally:
        await storage.close()


# -- message archives (server/storage/archive.py, XEP-0313), on every backend ------------------


@pytest.fixture
async def archived(config: StorageConfig) -> AsyncIterator[Storage]:
    """The core stores plus the archive the mam module declares, alice and bob created."""
    from server.storage import archive
    opened = await open_storage(config, (*CORE_STORES, archive.SPEC))
    await opened.accounts.create("alice", "a.test", credentials(1))
    await opened.accounts.create("bob", "a.test", credentials(2))
    try:
        yield opened
    finally:
        await opened.close()


def archive_entry(owner: str, with_: str, n: int, *, resource: str = "", outgoing: bool = True,
                  account: bool = True) -> Any:
    from server.storage.archive import ArchiveEntry
    return ArchiveEntry(owner, with_, resource, outgoing, 1_000_000 * n,
                        b"<message xmlns='jabber:client'><body>%d</body></message>" % n,
                        account=account)


async def test_archive_queries(archived: Storage) -> None:
    from server.storage.archive import ArchiveQuery, UnknownArchiveId
    store = archived.archive  # type: ignore[attr-defined]
    entries = [archive_entry("alice@a.test", "bob@a.test" if n % 2 else "carol@b.test", n,
                             resource=f"r{n % 3}", outgoing=n % 4 == 0) for n in range(10)]
    ids = await store.append(entries)
    assert [int(i) for i in ids] == sorted(int(i) for i in ids) and len(set(ids)) == 10

    def numbers(page: Any) -> list[int]:
        return [item.ts // 1_000_000 for item in page.items]

    page = await store.query("alice@a.test", ArchiveQuery(max=4))
    assert numbers(page) == [0, 1, 2, 3] and not page.complete
    assert page.count == 10 and page.first_index == 0
    assert page.items[0].id == ids[0] and page.items[0].stanza == entries[0].stanza
    assert page.items[0].outgoing and not page.items[1].outgoing
    assert (page.items[1].with_bare, page.items[1].with_resource) == ("bob@a.test", "r1")
    page = await store.query("alice@a.test", ArchiveQuery(max=4, after=ids[7]))
    assert numbers(page) == [8, 9] and page.complete
    page = await store.query("alice@a.test", ArchiveQuery(max=3, before=""))
    # No index backward (slixmpp would end its reverse iteration on index + items == count).
    assert numbers(page) == [7, 8, 9] and not page.complete and page.first_index is None
    page = await store.query("alice@a.test", ArchiveQuery(max=3, before=ids[2]))
    assert numbers(page) == [0, 1] and page.complete
    page = await store.query("alice@a.test", ArchiveQuery(with_bare="bob@a.test", max=10))
    assert numbers(page) == [1, 3, 5, 7, 9] and page.count == 5
    page = await store.query("alice@a.test", ArchiveQuery(with_bare="bob@a.test",
                                                          with_resource="r1", max=10))
    assert numbers(page) == [1, 7]
    page = await store.query("alice@a.test", ArchiveQuery(start=2_000_000, end=4_000_000))
    assert numbers(page) == [2, 3, 4]
    page = await store.query("alice@a.test", ArchiveQuery(after_id=ids[5], before_id=ids[9],
                                                          with_bare="bob@a.test"))
    assert numbers(page) == [7] and page.count == 1
    page = await store.query("alice@a.test", ArchiveQuery(ids=(ids[6], ids[2])))
    assert numbers(page) == [2, 6]
    page = await store.query("alice@a.test", ArchiveQuery(max=0))
    assert page.items == [] and page.count == 10 and not page.complete
    assert (await store.query("bob@a.test", ArchiveQuery())).items == []
    for bad in (ArchiveQuery(after="999999"), ArchiveQuery(before="x"),
                ArchiveQuery(ids=(ids[0], "no")), ArchiveQuery(after_id="-1")):
        with pytest.raises(UnknownArchiveId):
            await store.query("alice@a.test", bad)
    with pytest.raises(UnknownArchiveId):  # alice's id is not in bob's archive
        await store.query("bob@a.test", ArchiveQuery(after=ids[0]))
    meta = await store.metadata("alice@a.test")
    assert meta.first == (ids[0], 0) and meta.last == (ids[9], 9_000_000)
    assert await store.metadata("bob@a.test") is None


async def test_archive_order_is_time_then_id(archived: Storage) -> None:
    from server.storage.archive import ArchiveQuery
    store = archived.archive  # type: ignore[attr-defined]
    # Appended out of time order (an import, a clock step): queries follow time.
    ids = await store.append([archive_entry("alice@a.test", "bob@a.test", n) for n in (5, 1, 3)])
    page = await store.query("alice@a.test", ArchiveQuery())
    assert [item.id for item in page.items] == [ids[1], ids[2], ids[0]]
    page = await store.query("alice@a.test", ArchiveQuery(after=ids[1], max=1))
    assert [item.id for item in page.items] == [ids[2]]
    same = await store.append([archive_entry("alice@a.test", "bob@a.test", 3)])
    page = await store.query("alice@a.test", ArchiveQuery(after=ids[2]))
    assert [item.id for item in page.items] == [same[0], ids[0]]


async def test_archive_ids_never_go_back(archived: Storage, config: StorageConfig) -> None:
    from server.storage import archive
    store = archived.archive  # type: ignore[attr-defined]
    first = await store.append([archive_entry("alice@a.test", "bob@a.test", n) for n in range(3)])
    assert await store.purge("alice@a.test") == 3
    second = await store.append([archive_entry("alice@a.test", "bob@a.test", 9)])
    assert int(second[0]) > max(int(i) for i in first)
    assert await store.purge("alice@a.test") == 1
    # Nor after reopening (another process, or a restart), with the newest ones purged.
    reopened = await open_storage(config, (*CORE_STORES, archive.SPEC))
    try:
        third = await reopened.archive.append(  # type: ignore[attr-defined]
            [archive_entry("alice@a.test", "bob@a.test", 10)])
        assert int(third[0]) > int(second[0])
        # The first store's next id is now taken: it notices, and still hands out a new one.
        fourth = await store.append([archive_entry("alice@a.test", "bob@a.test", 11)])
        assert int(fourth[0]) > int(third[0])
    finally:
        await reopened.close()


async def test_archive_purge_prefs_and_owners(archived: Storage) -> None:
    from server.storage.archive import ArchivePrefs, ArchiveQuery
    store = archived.archive  # type: ignore[attr-defined]
    await store.append([archive_entry("alice@a.test", w, n)
                        for n, w in enumerate(["bob@a.test", "carol@b.test", "bob@a.test"])])
    assert await store.purge("alice@a.test", "bob@a.test") == 2
    assert await store.count("alice@a.test") == 1
    assert await store.get_prefs("alice@a.test") is None
    prefs = ArchivePrefs("roster", ("juliet@montague.lit",), ("x@y.test", "z.test"))
    await store.set_prefs("alice@a.test", prefs)
    await store.set_prefs("bob@a.test", ArchivePrefs("never"))
    assert await store.get_prefs("alice@a.test") == prefs
    assert await store.get_prefs("bob@a.test") == ArchivePrefs("never")
    with pytest.raises(NoSuchAccount):
        await store.set_prefs("nobody@a.test", prefs)
    # A batch with an entry for a missing account: that one gets no id, the others land.
    ids = await store.append([archive_entry("alice@a.test", "bob@a.test", 7),
                              archive_entry("nobody@a.test", "bob@a.test", 7),
                              archive_entry("bob@a.test", "alice@a.test", 7, outgoing=False)])
    assert ids[0] is not None and ids[1] is None and ids[2] is not None
    # A room's archive (MUC): an owner without an account.
    room = await store.append([archive_entry("room@muc.a.test", "alice@a.test", 1,
                                             account=False)])
    assert room[0] is not None
    assert "room@muc.a.test" in await store.owners()
    # A moderated message becomes a tombstone in place: same id and time (XEP-0425 §6).
    tombstone = b"<message xmlns='jabber:client'><retracted xmlns='urn:xmpp:message-retract:1'/></message>"
    assert await store.replace("room@muc.a.test", room[0], tombstone) is True
    assert await store.replace("alice@a.test", room[0], tombstone) is False  # not hers
    assert await store.replace("room@muc.a.test", "999999", tombstone) is False
    kept = (await store.query("room@muc.a.test", ArchiveQuery())).items
    assert [(i.id, i.ts, i.stanza) for i in kept] == [(room[0], 1_000_000, tombstone)]
    await store.delete_owner("room@muc.a.test")
    assert "room@muc.a.test" not in await store.owners()
    assert (await store.query("room@muc.a.test", ArchiveQuery())).items == []


async def test_archive_goes_with_its_account(archived: Storage) -> None:
    from server.storage.archive import ArchivePrefs, ArchiveQuery
    store = archived.archive  # type: ignore[attr-defined]
    await store.append([archive_entry("alice@a.test", "bob@a.test", n) for n in range(3)])
    await store.set_prefs("alice@a.test", ArchivePrefs("never"))
    await store.append([archive_entry("bob@a.test", "alice@a.test", 1)])
    await archived.accounts.delete("alice", "a.test")
    assert "alice@a.test" not in await store.owners()
    assert await store.get_prefs("alice@a.test") is None
    # The owner id the store had cached is gone: a write for the vanished account is refused...
    assert await store.append([archive_entry("alice@a.test", "bob@a.test", 5)]) == [None]
    # ... and one for a new account of the same name starts an empty archive.
    await archived.accounts.create("alice", "a.test", credentials(3))
    ids = await store.append([archive_entry("alice@a.test", "bob@a.test", 6)])
    page = await store.query("alice@a.test", ArchiveQuery())
    assert [item.id for item in page.items] == ids
    assert await store.count("bob@a.test") == 1


async def test_archive_expiry_in_batches(archived: Storage) -> None:
    store = archived.archive  # type: ignore[attr-defined]
    await store.append([archive_entry("alice@a.test", "bob@a.test", n) for n in range(25)])
    assert await store.expire("alice@a.test", 20_000_000, 8) == 8
    assert await store.expire("alice@a.test", 20_000_000, 8) == 8
    assert await store.expire("alice@a.test", 20_000_000, 8) == 4
    assert await store.expire("alice@a.test", 20_000_000, 8) == 0
    assert await store.count("alice@a.test") == 5
    assert await store.expire("nobody@a.test", 20_000_000, 8) == 0


async def test_archive_batch_with_new_owners(archived: Storage) -> None:
    """One batch for owners with no row yet (every account's first message after a start):
    accounts get theirs, a room its own (no account), an owner without an account none."""
    store = archived.archive  # type: ignore[attr-defined]
    await archived.accounts.create("carol", "a.test", credentials(3))
    entries = [archive_entry(owner, "bob@a.test", n, account=owner != "room@muc.a.test")
               for n, owner in enumerate(["alice@a.test", "nobody@a.test", "carol@a.test",
                                          "room@muc.a.test", "alice@a.test", "bob@a.test"])]
    ids = await store.append(entries)
    assert ids[1] is None and None not in ids[:1] + ids[2:]
    assert len(set(ids)) == 6
    assert [await store.count(owner) for owner in
            ("alice@a.test", "nobody@a.test", "carol@a.test", "room@muc.a.test", "bob@a.test")
            ] == [2, 0, 1, 1, 1]
    assert "nobody@a.test" not in await store.owners()


async def test_archive_ids_reserved_while_a_batch_is_written(archived: Storage) -> None:
    """Reserving ids does not wait for a batch being written (on SQLite the write lock is
    held meanwhile): messages whose ids ran out would wait for the archive. Ids stay
    unique and ascending."""
    store = archived.archive  # type: ignore[attr-defined]
    first = await store.reserve_ids(4)
    lock = getattr(archived.db, "write_lock", None)
    async with lock if lock is not None else contextlib.nullcontext():
        more = await asyncio.wait_for(store.reserve_ids(4), 5)
    assert more == sorted(more) and min(more) > max(first)
    written = await store.append([archive_entry("alice@a.test", "bob@a.test", n)
                                  for n in range(2)])
    assert min(int(i) for i in written) > max(more)


async def test_archive_concurrent_batches(config: StorageConfig) -> None:
    """Two storages on one database (two processes) append at once: ids stay unique."""
    from server.storage import archive
    first = await open_storage(config, (*CORE_STORES, archive.SPEC))
    second = await open_storage(config, (*CORE_STORES, archive.SPEC))
    try:
        await first.accounts.create("alice", "a.test", credentials(1))
        batches = [(first if n % 2 else second).archive.append(  # type: ignore[attr-defined]
            [archive_entry("alice@a.test", "bob@a.test", n * 10 + k) for k in range(10)])
            for n in range(10)]
        ids = [i for batch in await asyncio.gather(*batches) for i in batch]
        assert None not in ids and len(set(ids)) == 100
        assert await first.archive.count("alice@a.test") == 100  # type: ignore[attr-defined]
    finally:
        await first.close()
        await second.close()


# -- push registrations (server/storage/push.py, XEP-0357), on every backend -------------------


async def test_push_registrations(config: StorageConfig) -> None:
    from server.storage import push
    from server.storage.push import PushRegistration
    opened = await open_storage(config, (*CORE_STORES, push.SPEC))
    try:
        store = opened.push  # type: ignore[attr-defined]
        await opened.accounts.create("alice", "a.test", credentials(1))
        await opened.accounts.create("bob", "a.test", credentials(2))
        assert await store.get("alice", "a.test") == []
        form = b"<x xmlns='jabber:x:data' type='submit'>\xc3\xa9</x>"
        await store.put("alice", "a.test", PushRegistration("push.example", "n2", form))
        await store.put("alice", "a.test", PushRegistration("push.example", "n1", None))
        await store.put("alice", "a.test", PushRegistration("app.example", "n1", None))
        await store.put("bob", "a.test", PushRegistration("push.example", "n1", None))
        # The same service and node again: its options are replaced, no second registration.
        await store.put("alice", "a.test", PushRegistration("push.example", "n1", b"<x/>"))
        assert await store.get("alice", "a.test") == [
            PushRegistration("app.example", "n1", None),
            PushRegistration("push.example", "n1", b"<x/>"),
            PushRegistration("push.example", "n2", form)]
        assert await store.remove("alice", "a.test", "push.example", "n2") == 1
        assert await store.remove("alice", "a.test", "push.example", "n2") == 0
        await store.put("alice", "a.test", PushRegistration("push.example", "n3", None))
        assert await store.remove("alice", "a.test", "push.example", None) == 2  # every node
        assert await store.get("alice", "a.test") == [PushRegistration("app.example", "n1", None)]
        assert await store.get("bob", "a.test") == [PushRegistration("push.example", "n1", None)]
        with pytest.raises(NoSuchAccount):
            await store.put("nobody", "a.test", PushRegistration("push.example", "n1", None))
        await opened.accounts.delete("bob", "a.test")  # registrations go with their account
        assert await store.get("bob", "a.test") == []
    finally:
        await opened.close()


async def test_archive_survives_storage_copy(tmp_path: Path, pg_dsn: str) -> None:
    """SQLite to PostgreSQL and back: ids, order, owners and preferences; new ids come after."""
    from server.storage import archive
    from server.storage.archive import ArchivePrefs, ArchiveQuery
    from server.storage.copy import copy
    specs = (*CORE_STORES, archive.SPEC)
    sqlite = await open_storage(storage_config(tmp_path, "sqlite"), specs)
    pg = await open_storage(storage_config(tmp_path, "postgresql", pg_dsn), specs)
    back = await open_storage(storage_config(tmp_path / "back", "sqlite"), specs)
    try:
        await sqlite.accounts.create("alice", "a.test", credentials(1))
        ids = await sqlite.archive.append(  # type: ignore[attr-defined]
            [archive_entry("alice@a.test", "bob@a.test", n, outgoing=n % 2 == 0)
             for n in range(5)]
            + [archive_entry("room@muc.a.test", "x@y.test", 1, account=False)])
        prefs = ArchivePrefs("roster", ("bob@a.test",))
        await sqlite.archive.set_prefs("alice@a.test", prefs)  # type: ignore[attr-defined]
        await copy(sqlite, pg, lambda *_: None)
        await copy(pg, back, lambda *_: None)
        for target in (pg, back):
            store = target.archive  # type: ignore[attr-defined]
            page = await store.query("alice@a.test", ArchiveQuery(after=ids[1]))
            assert [item.id for item in page.items] == ids[2:5]
            assert [item.outgoing for item in page.items] == [True, False, True]
            assert page.items[0].stanza == archive_entry("a", "b", 2).stanza
            assert await store.get_prefs("alice@a.test") == prefs
            assert await store.count("room@muc.a.test") == 1
            more = await store.append([archive_entry("alice@a.test", "bob@a.test", 9)])
            assert int(more[0]) > max(int(i) for i in ids)
    finally:
        await sqlite.close()
        await pg.close()
        await back.close()


async def test_fast_tokens(storage: Storage) -> None:
    """XEP-0484 tokens: two slots per client, promotion, deletion; a credential change and
    the account's deletion take them all."""
    from server.storage.fast import CURRENT, NEW, FastToken
    store = storage.fast_tokens
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.accounts.create("bob", "a.test", credentials(2))
    first = FastToken(NEW, "HT-SHA-256-NONE", b"\x01" * 16, b"\x02" * 32, 100, 200)
    await store.put("alice", "a.test", "c1", first)
    assert await store.get("alice", "a.test", "c1") == [first]
    assert await store.get("alice", "a.test", "c2") == []
    await store.promote("alice", "a.test", "c1")
    current = dataclasses.replace(first, slot=CURRENT)
    assert await store.get("alice", "a.test", "c1") == [current]
    second = FastToken(NEW, "HT-SHA-256-ENDP", b"\x03" * 16, b"\x04" * 32, 150, 300)
    await store.put("alice", "a.test", "c1", second)
    replaced = dataclasses.replace(second, nonce=b"\x05" * 16)  # a newer unused one replaces it
    await store.put("alice", "a.test", "c1", replaced)
    assert await store.get("alice", "a.test", "c1") == [replaced, current]  # 'new' first
    await store.put("alice", "a.test", "c2", first)
    await store.put("bob", "a.test", "c1", first)
    with pytest.raises(NoSuchAccount):
        await store.put("nobody", "a.test", "c1", first)
    assert await store.purge_expired(200) == 3  # alice c1 current and c2, bob c1
    assert await store.get("alice", "a.test", "c1") == [replaced]
    await store.put("alice", "a.test", "c2", first)
    assert await store.delete("alice", "a.test", "c2") == 1
    await storage.accounts.set_credentials("alice", "a.test", credentials(3))
    assert await store.get("alice", "a.test", "c1") == []  # a new password ends every token
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(3)
    await store.put("bob", "a.test", "c1", second)
    await storage.accounts.delete("bob", "a.test")
    assert await store.get("bob", "a.test", "c1") == []
    with pytest.raises(NoSuchAccount):  # the update and the delete are one transaction
        await storage.accounts.set_credentials("nobody", "a.test", credentials(3))


# -- PEP nodes and items (server/storage/pubsub.py, XEP-0163), on every backend ----------------


async def test_pep_nodes_and_items(config: StorageConfig) -> None:
    from server.storage import pubsub
    from server.storage.pubsub import StoredItem
    opened = await open_storage(config, (*CORE_STORES, pubsub.SPEC))
    try:
        store = opened.pep  # type: ignore[attr-defined]
        await opened.accounts.create("alice", "a.test", credentials(1))
        await opened.accounts.create("bob", "a.test", credentials(2))
        assert await store.nodes("alice", "a.test") == {}
        assert await store.create_node("alice", "a.test", "urn:n", {"max_items": 2})
        assert not await store.create_node("alice", "a.test", "urn:n", {"max_items": 9})
        with pytest.raises(NoSuchAccount):
            await store.create_node("nobody", "a.test", "urn:n", {})
        for n in range(3):
            await store.publish("alice", "a.test", "urn:n",
                                StoredItem(f"i{n}", "alice@a.test", f"<p>{n}</p>"), 2)
        assert [i.id for i in await store.items("alice", "a.test", "urn:n")] == ["i1", "i2"]
        # Republishing an id replaces it and makes it the newest.
        await store.publish("alice", "a.test", "urn:n", StoredItem("i1", "x", "<p>new</p>"), 2)
        got = await store.items("alice", "a.test", "urn:n")
        assert [(i.id, i.payload) for i in got] == [("i2", "<p>2</p>"), ("i1", "<p>new</p>")]
        assert [i.id for i in await store.items("alice", "a.test", "urn:n", max_items=1)] == ["i1"]
        assert [i.id for i in await store.items("alice", "a.test", "urn:n", ids=["i2", "zz"])] \
            == ["i2"]
        assert await store.set_config("alice", "a.test", "urn:n", {"max_items": 5})
        assert await store.nodes("alice", "a.test") == {"urn:n": {"max_items": 5}}
        assert await store.retract("alice", "a.test", "urn:n", "i2")
        assert not await store.retract("alice", "a.test", "urn:n", "i2")
        await store.create_node("bob", "a.test", "urn:n", {})
        await store.publish("bob", "a.test", "urn:n", StoredItem("b", "bob@a.test", "<b/>"), 1)
        assert await store.purge("alice", "a.test", "urn:n") == 1
        assert await store.items("alice", "a.test", "urn:n") == []
        await store.publish("alice", "a.test", "urn:n", StoredItem("a", "alice@a.test", "<a/>"), 1)
        assert await store.delete_node("alice", "a.test", "urn:n")
        assert await store.items("alice", "a.test", "urn:n") == []
        await store.create_node("alice", "a.test", "urn:m", {})
        await opened.accounts.delete("alice", "a.test")  # the account's nodes go with it
        assert await store.nodes("alice", "a.test") == {}
        assert [i.id for i in await store.items("bob", "a.test", "urn:n")] == ["b"]
    finally:
        await opened.close()


async def test_pep_items_published_in_one_batch(config: StorageConfig) -> None:
    """publish_many (the PEP module's group commit): publish() of each in order, committed
    together, and an entry whose node is gone fails alone, as publish() would."""
    from server.storage import pubsub
    from server.storage.pubsub import Published, StoredItem
    opened = await open_storage(config, (*CORE_STORES, pubsub.SPEC))
    try:
        store = opened.pep  # type: ignore[attr-defined]
        for user in ("alice", "bob"):
            await opened.accounts.create(user, "a.test", credentials(1))
            await store.create_node(user, "a.test", "urn:n", {})

        def one(user: str, item: str, max_items: int = 2, node: str = "urn:n") -> Published:
            return Published(user, "a.test", node, StoredItem(item, f"{user}@a.test",
                                                              f"<p>{item}</p>"), max_items)
        assert await store.publish_many([one("alice", "a1"), one("bob", "b1"), one("alice", "a2"),
                                         one("alice", "a3"), one("alice", "a2")]) == [None] * 5
        # Trimmed to the newest two, a republished id the newest.
        assert [i.id for i in await store.items("alice", "a.test", "urn:n")] == ["a3", "a2"]
        assert [i.id for i in await store.items("bob", "a.test", "urn:n")] == ["b1"]
        results = await store.publish_many([one("bob", "b2"), one("alice", "x", node="gone"),
                                            one("bob", "b3", max_items=1)])
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], NoSuchAccount)
        assert [i.id for i in await store.items("bob", "a.test", "urn:n")] == ["b3"]
        assert await store.publish_many([one("alice", "a4", max_items=0),
                                         one("bob", "b4")]) == [None, None]
        assert await store.items("alice", "a.test", "urn:n") == []
        assert [i.id for i in await store.items("bob", "a.test", "urn:n")] == ["b3", "b4"]
    finally:
        await opened.close()


async def test_pep_subscriptions(config: StorageConfig) -> None:
    """Explicit subscriptions to PEP nodes: they go with the node, with its account, and with
    the subscriber's own account."""
    from server.storage import pubsub
    opened = await open_storage(config, (*CORE_STORES, pubsub.SPEC))
    try:
        store = opened.pep  # type: ignore[attr-defined]
        for n, user in enumerate(("alice", "bob", "carol")):
            await opened.accounts.create(user, "a.test", credentials(n + 1))
        await store.create_node("alice", "a.test", "urn:n", {})
        await store.create_node("alice", "a.test", "urn:m", {})
        await store.set_subscription("alice", "a.test", "urn:n", "bob@a.test", "pending",
                                     ("bob", "a.test"))
        await store.set_subscription("alice", "a.test", "urn:n", "bob@a.test", "subscribed",
                                     ("bob", "a.test"))
        await store.set_subscription("alice", "a.test", "urn:n", "carol@a.test/x", "subscribed",
                                     ("carol", "a.test"))
        await store.set_subscription("alice", "a.test", "urn:m", "eve@b.test", "subscribed")
        assert await store.subscriptions("alice", "a.test") == {
            "urn:n": {"bob@a.test": "subscribed", "carol@a.test/x": "subscribed"},
            "urn:m": {"eve@b.test": "subscribed"}}
        with pytest.raises(NoSuchAccount):  # a subscriber account that does not exist
            await store.set_subscription("alice", "a.test", "urn:n", "zed@a.test", "subscribed",
                                         ("zed", "a.test"))
        # §6.3 options: kept with the subscription, replaced with it, gone with it.
        assert await store.subscription_options("alice", "a.test") == {}
        await store.set_subscription("alice", "a.test", "urn:m", "eve@b.test", "subscribed",
                                     options={"deliver": False, "include_body": True})
        assert await store.subscription_options("alice", "a.test") == {
            "urn:m": {"eve@b.test": {"deliver": False, "include_body": True}}}
        assert await store.subscriptions("alice", "a.test") == {
            "urn:n": {"bob@a.test": "subscribed", "carol@a.test/x": "subscribed"},
            "urn:m": {"eve@b.test": "subscribed"}}
        assert await store.remove_subscription("alice", "a.test", "urn:m", "eve@b.test")
        assert not await store.remove_subscription("alice", "a.test", "urn:m", "eve@b.test")
        assert await store.subscription_options("alice", "a.test") == {}
        await opened.accounts.delete("bob", "a.test")  # the subscriber's account goes
        assert await store.subscriptions("alice", "a.test") == {
            "urn:n": {"carol@a.test/x": "subscribed"}}
        await store.delete_node("alice", "a.test", "urn:n")  # the node goes
        assert await store.subscriptions("alice", "a.test") == {}
        await store.create_node("alice", "a.test", "urn:n", {})
        await store.set_subscription("alice", "a.test", "urn:n", "carol@a.test", "subscribed",
                                     ("carol", "a.test"))
        await opened.accounts.delete("alice", "a.test")  # the owner's account goes
        assert await store.subscriptions("alice", "a.test") == {}
    finally:
        await opened.close()


# -- MUC rooms (server/storage/muc.py, XEP-0045), on every backend ------------------------------


async def test_muc_rooms(config: StorageConfig) -> None:
    from server.storage import muc
    from server.storage.muc import StoredRoom
    opened = await open_storage(config, (*CORE_STORES, muc.SPEC))
    try:
        store = opened.muc_rooms  # type: ignore[attr-defined]
        assert await store.load("muc.a.test") == []
        room = StoredRoom("room@muc.a.test", '{"persistent": true}', "Plans", "Alice",
                          {"alice@a.test": ("owner", None), "eve@b.test": ("outcast", "spam")},
                          {"alice@a.test": "Alice"})
        await store.save(room)
        await store.save(StoredRoom("other@muc.b.test", "{}"))
        assert await store.load("muc.a.test") == [room]
        # Saved again: the row and its affiliations are replaced, not added to.
        changed = StoredRoom("room@muc.a.test", '{"persistent": true, "public": false}', None,
                             None, {"bob@a.test": ("member", None)})
        await store.save(changed)
        assert await store.load("muc.a.test") == [changed]
        assert await store.load("muc.b.test") == [StoredRoom("other@muc.b.test", "{}")]
        assert await store.delete("room@muc.a.test") is True
        assert await store.delete("room@muc.a.test") is False
        assert await store.load("muc.a.test") == []
        assert len(await store.load("muc.b.test")) == 1
    finally:
        await opened.close()


async def test_pubsub_service_nodes(config: StorageConfig) -> None:
    """The pubsub service's nodes (server/storage/pubsub.py): keyed by service domain, no
    account behind them."""
    from server.storage import pubsub
    from server.storage.pubsub import StoredItem
    opened = await open_storage(config, (*CORE_STORES, pubsub.SERVICE_SPEC))
    try:
        store = opened.pubsub  # type: ignore[attr-defined]
        state = {"config": {"max_items": 2}, "affiliations": {"alice@a.test": "owner"}}
        assert await store.create_node("", "pubsub.a.test", "news", state)
        assert not await store.create_node("", "pubsub.a.test", "news", {})
        for n in range(3):
            await store.publish("", "pubsub.a.test", "news", StoredItem(str(n), "a", "<x/>"), 2)
        assert [i.id for i in await store.items("", "pubsub.a.test", "news")] == ["1", "2"]
        assert await store.nodes("", "pubsub.a.test") == {"news": state}
        assert await store.nodes("", "pubsub.b.test") == {}
        assert await store.delete_node("", "pubsub.a.test", "news")
        assert await store.items("", "pubsub.a.test", "news") == []
    finally:
        await opened.close()


# -- invitations (server/storage/invites.py, XEP-0401), on every backend ------------------------


async def test_invitations(config: StorageConfig) -> None:
    from server.storage import invites
    from server.storage.invites import Invitation
    opened = await open_storage(config, (*CORE_STORES, invites.SPEC))
    try:
        store = opened.invites  # type: ignore[attr-defined]
        await opened.accounts.create("alice", "a.test", credentials(1))
        mine = Invitation("tok-alice", "a.test", "alice", 2, 100, 1000, "Friends")
        nobodys = Invitation("tok-none", "a.test", None, 1, 101, 1000)
        await store.create(mine)
        await store.create(nobodys)
        assert await store.get("tok-alice") == mine
        assert await store.get("nope") is None
        assert await store.list("a.test") == [mine, nobodys]
        with pytest.raises(NoSuchAccount):
            await store.create(Invitation("tok-ghost", "a.test", "ghost", 1, 1, 1000))
        # Uses run out; another domain, or an expired one, is never consumed.
        assert await store.consume("tok-alice", "b.test", 500) is None
        assert await store.consume("tok-alice", "a.test", 500) == mine
        assert await store.consume("tok-alice", "a.test", 1000) is None  # expired
        assert await store.consume("tok-alice", "a.test", 500) is not None
        assert await store.consume("tok-alice", "a.test", 500) is None
        await store.refund("tok-alice")
        assert (await store.get("tok-alice")).uses_left == 1
        assert await store.purge(500) == 0
        assert await store.purge(1000) == 2
        await store.create(mine)
        await opened.accounts.delete("alice", "a.test")  # goes with its inviter
        assert await store.get("tok-alice") is None
        await store.create(nobodys)
        assert await store.delete("tok-none") and not await store.delete("tok-none")
    finally:
        await opened.close()
