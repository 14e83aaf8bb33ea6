"""Migration from the real thing: a Debian Prosody 0.12 and ejabberd 23.01, populated over c2s
by slixmpp (tests/porting_peers.py), exported by their own tools (prosody-migrator's xep0227
driver, ejabberdctl export_piefxis), imported with `presenced import` (the CLI, in a
subprocess), then a slixmpp client logs in to presenced with the old password and finds
everything: roster with groups and the pending request, vCard, bookmarks, private XML, PEP
(avatar, OMEMO), the archive through MAM, and offline messages.

One export per peer (a module fixture), imported into SQLite and PostgreSQL. What the peers'
exports lack is not asked for: Prosody 0.12's xep0227 driver has no offline store
(unsupported-datastore), ejabberd 23.01's export_piefxis writes neither archives nor PEP.
On CI these tests must run (a missing peer is a failure there, a skip elsewhere).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import slixmpp

from tests import porting_peers as peers
from tests.conftest import RunningServer, start_server, stop_server, write_config
from tests.porting_peers import (
    AVATAR_ID,
    EJABBERD,
    OMEMO_DEVICE,
    PASSWORD,
    PRIVATE_NS,
    PROSODY,
    make_ejabberd_export,
    make_prosody_export,
)
from tests.test_interop import need

ROOT = Path(__file__).resolve().parent.parent
BOOKMARKS = "urn:xmpp:bookmarks:1"


def in_thread(run: Callable[..., object], *args: object) -> None:
    """A fixture may run inside the tests' event loop: the peer's asyncio.run() goes apart."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(run, *args).result()


@pytest.fixture(scope="module")
def prosody_export() -> Iterator[Path]:
    need("prosody", "prosody")
    # In /tmp itself: prosody-migrator runs as the prosody user, who must reach the data.
    work = Path(tempfile.mkdtemp(prefix="porting-prosody-"))
    os.chmod(work, 0o755)
    try:
        in_thread(make_prosody_export, work / "prosody", work / "export")
        yield work / "export"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.fixture(scope="module")
def ejabberd_export() -> Iterator[Path]:
    need("ejabberdctl", "ejabberd")
    work = Path(tempfile.mkdtemp(prefix="porting-ejabberd-"))
    try:
        in_thread(make_ejabberd_export, work / "export")
        yield work / "export"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_table(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return ""
    return f'[storage]\nbackend = "postgresql"\ndsn = "{request.getfixturevalue("pg_dsn")}"\n'


def presenced(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=ROOT)


@pytest.fixture
async def imported(request: pytest.FixtureRequest, tmp_path: Path, storage_table: str
                   ) -> AsyncIterator[tuple[RunningServer, str, str]]:
    """(server, domain, the import's report) after `presenced import` of the peer's export."""
    kind = request.param
    export = request.getfixturevalue(f"{kind}_export")
    domain = PROSODY if kind == "prosody" else EJABBERD
    config = write_config(tmp_path, storage_table, domains=(domain,))
    first = presenced("import", str(export), "--config", str(config))
    assert first.returncode == 0, first.stderr
    again = presenced("import", str(export), "--config", str(config))
    assert again.returncode == 0, again.stderr
    # Idempotent: the second run finds everything there and writes nothing.
    assert again.stdout.splitlines()[0] == "imported: nothing", again.stdout
    assert again.stdout.splitlines()[1].replace("already there (unchanged)", "imported") == \
        first.stdout.splitlines()[0], (first.stdout, again.stdout)
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path, storage_table, domains=(domain,))
    try:
        yield running, domain, first.stdout
    finally:
        await stop_server(running)


async def login(running: RunningServer, jid: str, password: str = PASSWORD,
                plugins: tuple[str, ...] = ()) -> tuple[slixmpp.ClientXMPP, list[str]]:
    """A slixmpp client logged in to presenced (no presence sent yet), and the mechanisms that
    failed before the login succeeded."""
    failed: list[str] = []
    host, port = running.address("c2s")
    xmpp = await peers.login(host, jid, password, port=port, presence=False, plugins=plugins,
                             failed=failed)
    running._clients.append(xmpp)
    return xmpp, failed


async def query(xmpp: slixmpp.ClientXMPP, kind: str, payload: str, to: str | None = None
                ) -> ET.Element:
    request = xmpp.make_iq(ito=to, itype=kind)
    request.append(ET.fromstring(payload))
    return (await request.send(timeout=10)).xml


async def pep_items(xmpp: slixmpp.ClientXMPP, node: str) -> list[ET.Element]:
    reply = await query(xmpp, "get", "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
                                     f"<items node='{node}'/></pubsub>")
    return reply.findall(".//{http://jabber.org/protocol/pubsub}item")


async def check_alice(running: RunningServer, domain: str, *, archive: bool) -> None:
    requests: list[str] = []
    xmpp, failed = await login(running, f"alice@{domain}", plugins=("xep_0313",))
    # At once: with accounts of SHA-1 keys only, SCRAM-SHA-256 is not offered (Server.start).
    assert failed == []
    assert xmpp.plugin["feature_mechanisms"].mech.name.startswith("SCRAM-SHA-1")
    xmpp.add_event_handler("presence_subscribe", lambda p: requests.append(str(p["from"])))
    roster = await query(xmpp, "get", "<query xmlns='jabber:iq:roster'/>")
    items = {i.get("jid"): i for i in roster.iter("{jabber:iq:roster}item")}
    bob = items[f"bob@{domain}"]
    assert (bob.get("name"), bob.get("subscription")) == ("Bob B.", "both")
    assert {g.text for g in bob.iter("{jabber:iq:roster}group")} == {"Friends", "Work"}
    assert f"carol@{domain}" not in items  # a pending request is not a roster item
    xmpp.send_presence()  # the initial presence: pending requests come again (RFC 6121 §3.1.3)
    for _ in range(50):
        if requests:
            break
        await asyncio.sleep(0.1)
    assert requests == [f"carol@{domain}"]
    vcard = await query(xmpp, "get", "<vCard xmlns='vcard-temp'/>")
    assert vcard.findtext(".//{vcard-temp}FN") == "Alice Liddell"
    assert vcard.findtext(".//{vcard-temp}BINVAL")
    private = await query(xmpp, "get", f"<query xmlns='jabber:iq:private'><note "
                                       f"xmlns='{PRIVATE_NS}'/></query>")
    assert private.findtext(f".//{{{PRIVATE_NS}}}note") == "remember the milk"
    bookmarks = await pep_items(xmpp, BOOKMARKS)
    assert [b.get("id") for b in bookmarks] == ["tea@conference.example.org"]
    conference = bookmarks[0].find(f"{{{BOOKMARKS}}}conference")
    assert conference is not None and conference.get("name") == "Tea"
    assert conference.findtext(f"{{{BOOKMARKS}}}nick") == "ali"
    # XEP-0048 clients see the same bookmarks through private XML.
    legacy = await query(xmpp, "get", "<query xmlns='jabber:iq:private'>"
                                      "<storage xmlns='storage:bookmarks'/></query>")
    assert [c.get("jid") for c in legacy.iter("{storage:bookmarks}conference")] == \
        ["tea@conference.example.org"]
    if archive:
        metadata = await pep_items(xmpp, "urn:xmpp:avatar:metadata")
        assert [m.get("id") for m in metadata] == [AVATAR_ID]
        devices = await pep_items(xmpp, "eu.siacs.conversations.axolotl.devicelist")
        assert [d.get("id") for d in devices[0].iter(
            "{eu.siacs.conversations.axolotl}device")] == [OMEMO_DEVICE]
        bundle = await pep_items(xmpp, f"eu.siacs.conversations.axolotl.bundles:{OMEMO_DEVICE}")
        assert bundle and bundle[0].find("{eu.siacs.conversations.axolotl}bundle") is not None
        result = await xmpp.plugin["xep_0313"].retrieve()
        bodies = [b.text for m in result["mam"]["results"]
                  for b in m.xml.iter("{jabber:client}body")]
        assert bodies == ["hello bob, see you at tea", "hi alice, I'll bring scones"]


@pytest.mark.parametrize("imported", ["prosody"], indirect=True)
async def test_from_prosody(imported: tuple[RunningServer, str, str]) -> None:
    running, domain, report = imported
    assert report.splitlines()[0] == (
        "imported: 4 accounts, 4 roster items, 1 vCards, 1 private XML items, 5 PEP nodes, "
        "5 PEP items, 6 archived messages"), report
    await check_alice(running, domain, archive=True)
    # The others log in with their old passwords too.
    for user in ("bob", "carol", "dave"):
        await login(running, f"{user}@{domain}")
    with pytest.raises(AssertionError, match="no login"):
        await login(running, f"bob@{domain}", "not-the-password")


@pytest.mark.parametrize("imported", ["ejabberd"], indirect=True)
async def test_from_ejabberd(imported: tuple[RunningServer, str, str]) -> None:
    running, domain, report = imported
    assert report.splitlines()[0] == (
        "imported: 4 accounts, 4 roster items, 1 vCards, 2 private XML items, 1 PEP nodes, "
        "1 PEP items, 1 offline messages"), report
    await check_alice(running, domain, archive=False)
    waiting: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    dave, _ = await login(running, f"dave@{domain}")
    dave.add_event_handler("message", lambda m: waiting.done() or waiting.set_result(
        str(m["body"])))
    dave.send_presence()  # XEP-0160: offline messages come after the initial presence
    assert await asyncio.wait_for(waiting, 10) == "dave, you missed tea"


@pytest.mark.parametrize("storage_table", ["sqlite"], indirect=True)
@pytest.mark.parametrize("imported", ["prosody"], indirect=True)
async def test_prosody_reads_our_export(imported: tuple[RunningServer, str, str],
                                        tmp_path: Path) -> None:
    """`presenced export DIR` (one <user>@<host>.xml per account) read by prosody-migrator's
    xep0227 driver into a fresh Prosody, where alice logs in with her password and finds her
    roster, vCard and bookmarks."""
    running, domain, _report = imported
    out = tmp_path / "export"
    out.mkdir()
    done = presenced("export", str(out), "--config", str(running.config_path))
    assert done.returncode == 0, done.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{u}@{domain}.xml" for u in ("alice", "bob", "carol",
                                                                     "dave")]
    work = Path(tempfile.mkdtemp(prefix="porting-prosody-back-"))
    os.chmod(work, 0o755)
    peer = peers.prosody_peer(work / "prosody")
    try:
        await asyncio.to_thread(peers.prosody_import, peer, files)
        await asyncio.to_thread(peer.start)
        xmpp = await peers.login(peers.PROSODY_HOST, f"alice@{domain}", presence=False)
        try:
            roster = await query(xmpp, "get", "<query xmlns='jabber:iq:roster'/>")
            bob = next(i for i in roster.iter("{jabber:iq:roster}item")
                       if i.get("jid") == f"bob@{domain}")
            assert (bob.get("name"), bob.get("subscription")) == ("Bob B.", "both")
            assert {g.text for g in bob.iter("{jabber:iq:roster}group")} == {"Friends", "Work"}
            vcard = await query(xmpp, "get", "<vCard xmlns='vcard-temp'/>")
            assert vcard.findtext(".//{vcard-temp}FN") == "Alice Liddell"
            bookmarks = await pep_items(xmpp, BOOKMARKS)
            assert [b.get("id") for b in bookmarks] == ["tea@conference.example.org"]
        finally:
            await peers.disconnect(xmpp)
    finally:
        await asyncio.to_thread(peer.stop)
        subprocess.run(["rm", "-rf", str(work)], check=False)
