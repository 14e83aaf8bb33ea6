"""Running a cluster as an admin (issue 22 items 5 and 7, serve --workers): the secrets every
node shares in the database, ``presenced serve --workers N``, ``presenced check`` of
[cluster], and /metrics with the cluster's gauges. Real redis-server (tests/redis.py) and
PostgreSQL (tests/pg.py), real clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from server.modules.fast import Fast
from server.modules.muc import Muc
from tests.conftest import RunningServer, start_server, stop_server
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_cluster import cluster_tables
from tests.test_http import fetch, put_file, request_slot, slot_urls
from tests.test_sasl2 import FAST, S2, fast_login, q, scram_sasl2

ALICE = "alice@a.test"


def token_of(success: etree._Element) -> str:
    """The XEP-0484 token in a SASL2 <success/>."""
    found = success.find(q(FAST, "token"))
    assert found is not None and found.get("token"), etree.tostring(success)
    return found.get("token", "")


def http_listener(host: str) -> str:
    return f'http = ["{host}:0"]'


@pytest.fixture
async def nodes(tmp_path: Path, pg_dsn: str, redis_url: str  # noqa: F811
                ) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two nodes of a.test on one PostgreSQL, with plain HTTP and uploads on one shared path."""
    shared = tmp_path / "uploads"
    extra = f'[upload]\npath = "{shared}"\n'
    one = await start_server(tmp_path / "node1", cluster_tables(pg_dsn, redis_url, "node1") +
                             extra, domains=("a.test",), host="127.0.0.1",
                             listen_extra=http_listener("127.0.0.1"))
    try:
        two = await start_server(tmp_path / "node2", cluster_tables(pg_dsn, redis_url, "node2")
                                 + extra, domains=("a.test",), host="127.0.0.2",
                                 listen_extra=http_listener("127.0.0.2"))
    except BaseException:
        await stop_server(one)
        raise
    await one.add_user(ALICE)
    try:
        yield one, two
    finally:
        await stop_server(two)
        await stop_server(one)


# -- item 5: secrets in the database -------------------------------------------------------------


async def test_a_fast_token_of_one_node_logs_in_on_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    client = await one.raw()
    success, _after = await scram_sasl2(
        client, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>")
    token = token_of(success)
    await client.close()
    other = await two.raw()
    answer = await fast_login(other, token)
    assert answer.tag == q(S2, "success"), etree.tostring(answer)
    await other.close()
    fast_one, fast_two = one.server.module(Fast), two.server.module(Fast)
    assert fast_one is not None and fast_two is not None
    assert fast_one._key == fast_two._key


async def test_an_upload_url_of_one_node_is_good_on_the_other(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    client = await one.raw_login(ALICE)
    put_url, get_url = slot_urls(await request_slot(client, "notes.txt", 11))
    await client.close()
    base_one, base_two = ("http://{}:{}".format(*node.address("http")) for node in (one, two))
    assert put_url.startswith(base_one)
    # Signed by node1, PUT through node2: its HMAC key is the same (storage/keystore.py) and the
    # file lands on the path both share; either node serves it.
    status, _headers, _body = await put_file(put_url.replace(base_one, base_two), b"hello world")
    assert status == 201, status
    for url in (get_url, get_url.replace(base_one, base_two)):
        status, _headers, body = await fetch(url)
        assert (status, body) == (200, b"hello world")
    # A token made with another key is refused: the check does look at it.
    forged = put_url.split("token=")[0] + "token=" + "0" * 64
    status, _headers, _body = await put_file(forged.replace(base_one, base_two), b"other text!")
    assert status == 403, status


async def test_occupant_ids_are_the_same_on_every_node(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    muc_one, muc_two = one.server.module(Muc), two.server.module(Muc)
    assert muc_one is not None and muc_two is not None
    assert len(muc_one.id_key) == 32 and muc_one.id_key == muc_two.id_key
    key = await one.server.storage.secrets.get("muc-occupant-id")
    assert key == muc_one.id_key


async def test_an_upgrade_keeps_the_keys_of_the_old_files(tmp_path: Path) -> None:
    """A data_dir of a version that kept the keys in files: the first start imports them (FAST
    tokens, occupant ids and web admin cookies stay valid), after which the files are not read."""
    data = tmp_path / "data"
    data.mkdir()
    fast_key, muc_key = bytes(range(32)), bytes(range(100, 140))
    (data / "fast-token.key").write_bytes(fast_key)
    (data / "muc-occupant-id.key").write_bytes(muc_key)
    running = await start_server(tmp_path)
    try:
        await running.add_user(ALICE)
        fast, muc = running.server.module(Fast), running.server.module(Muc)
        assert fast is not None and muc is not None
        assert fast._key == fast_key and muc.id_key == muc_key
        secrets = running.server.storage.secrets
        assert await secrets.get("fast-token") == fast_key
        assert await secrets.get("muc-occupant-id") == muc_key
        client = await running.raw()
        success, _after = await scram_sasl2(
            client, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>")
        token = token_of(success)
        await client.close()
    finally:
        await stop_server(running)
    (data / "fast-token.key").unlink()
    (data / "muc-occupant-id.key").write_bytes(b"x" * 32)
    running = await start_server(tmp_path)
    try:
        muc = running.server.module(Muc)
        assert muc is not None and muc.id_key == muc_key
        client = await running.raw()
        answer = await fast_login(client, token)
        assert answer.tag == q(S2, "success"), etree.tostring(answer)
        await client.close()
    finally:
        await stop_server(running)
