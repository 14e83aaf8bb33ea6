"""XEP-0227 import and export (server/porting): the reader on the shapes Prosody's xep0227
driver and ejabberd's export_piefxis write (samples cut from real exports, see
tests/test_porting_interop.py for the real thing), the import into the stores on SQLite and
PostgreSQL (idempotent, with a report of what was skipped), the round trip through export, the
CLI, and logging in to an account that has SCRAM-SHA-1 keys only.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from server.porting import load, pie
from server.storage import Storage, all_store_specs, open_storage
from server.storage.base import Credentials, RosterItem, ScramKeys
from server.stream.scram import derive_keys, verify_password
from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import SASL_NS, TLS_NS
from tests.test_cli import assert_fails, presenced
from tests.test_storage import storage_config

PASSWORD = "old-secret-1"
DOMAIN = "old.test"


def scram_sha1(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """RFC 5802 §3 StoredKey and ServerKey, computed here apart from server/stream/scram.py."""
    salted = hashlib.pbkdf2_hmac("sha1", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha1")
    return hashlib.sha1(client_key).digest(), hmac.digest(salted, b"Server Key", "sha1")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Prosody 0.12's xep0227 driver: one file per account; the salt is a UUID string.
PROSODY_SALT = b"a3892189-0a31-401a-92a0-9856e9de92d0"
_stored, _server = scram_sha1(PASSWORD, PROSODY_SALT, 10000)
PROSODY_ALICE = f"""<?xml version='1.0'?>
<server-data xmlns='urn:xmpp:pie:0'><host jid='{DOMAIN}'><user name='Alice'>
  <scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-1'>
    <server-key>{b64(_server)}</server-key><stored-key>{b64(_stored)}</stored-key>
    <iter-count>10000</iter-count><salt>{b64(PROSODY_SALT)}</salt></scram-credentials>
  <query xmlns='jabber:iq:roster' version='6'>
    <item jid='bob@{DOMAIN}' name='Bob B.' subscription='both'>
      <group>Work</group><group>Friends</group><group>Work</group></item>
    <item jid='eve@elsewhere.test' subscription='none' ask='subscribe'/>
    <item jid='not a jid@@' subscription='both'/>
  </query>
  <presence type='subscribe' from='carol@{DOMAIN}'/>
  <vCard xmlns='vcard-temp'><FN>Alice Liddell</FN><PHOTO><TYPE>image/png</TYPE>
    <BINVAL>iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==</BINVAL></PHOTO></vCard>
  <query xmlns='jabber:iq:private'><note xmlns='urn:example:porting'>milk</note></query>
  <archive xmlns='urn:xmpp:pie:0#mam'>
    <result xmlns='urn:xmpp:mam:2' id='D5W7UKOihPC6P7e'><forwarded xmlns='urn:xmpp:forward:0'>
      <delay xmlns='urn:xmpp:delay' stamp='2026-12-07T17:33:40Z'/>
      <message xmlns='jabber:client' type='chat' to='bob@{DOMAIN}' from='alice@{DOMAIN}/pc'
        id='m1'><body>hello bob</body></message></forwarded></result>
    <result xmlns='urn:xmpp:mam:2' id='jkuw77F8r8rl'><forwarded xmlns='urn:xmpp:forward:0'>
      <delay xmlns='urn:xmpp:delay' stamp='2026-12-07T17:33:41.250Z'/>
      <message xmlns='jabber:client' type='chat' to='alice@{DOMAIN}' from='bob@{DOMAIN}/phone'
        id='m2'><body>hi alice</body></message></forwarded></result>
    <result xmlns='urn:xmpp:mam:2' id='broken'><forwarded xmlns='urn:xmpp:forward:0'>
      <message xmlns='jabber:client' to='alice@{DOMAIN}' from='bob@{DOMAIN}'/></forwarded>
    </result>
  </archive>
  <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>
    <configure node='urn:xmpp:bookmarks:1'><x xmlns='jabber:x:data' type='submit'>
      <field type='hidden' var='FORM_TYPE'>
        <value>http://jabber.org/protocol/pubsub#node_config</value></field>
      <field type='text-single' var='pubsub#title'/>
      <field type='text-single' var='pubsub#max_items'><value>max</value></field>
      <field type='list-single' var='pubsub#access_model'><value>whitelist</value></field>
      <field type='list-single' var='pubsub#publish_model'/>
      <field type='list-single' var='pubsub#send_last_published_item'><value>never</value>
      </field></x></configure>
    <configure node='storage:bookmarks'><x xmlns='jabber:x:data' type='submit'>
      <field type='hidden' var='FORM_TYPE'>
        <value>http://jabber.org/protocol/pubsub#node_config</value></field></x></configure>
    <affiliations node='storage:bookmarks'>
      <affiliation jid='alice@{DOMAIN}' affiliation='owner'/></affiliations>
    <configure node='eu.siacs.conversations.axolotl.devicelist'>
      <x xmlns='jabber:x:data' type='submit'>
      <field type='hidden' var='FORM_TYPE'>
        <value>http://jabber.org/protocol/pubsub#node_config</value></field>
      <field type='list-single' var='pubsub#access_model'><value>open</value></field>
      </x></configure>
    <configure node='urn:xmpp:avatar:metadata'><x xmlns='jabber:x:data' type='submit'>
      <field type='hidden' var='FORM_TYPE'>
        <value>http://jabber.org/protocol/pubsub#node_config</value></field>
      <field type='list-single' var='pubsub#access_model'><value>nonsense</value></field>
      </x></configure>
  </pubsub>
  <pubsub xmlns='http://jabber.org/protocol/pubsub'>
    <items node='urn:xmpp:bookmarks:1'><item id='tea@conference.example.org'>
      <conference xmlns='urn:xmpp:bookmarks:1' autojoin='true' name='Tea'><nick>ali</nick>
      </conference></item></items>
    <items node='eu.siacs.conversations.axolotl.devicelist'><item id='current'>
      <list xmlns='eu.siacs.conversations.axolotl'><device id='1234567'/></list></item></items>
    <items node='urn:xmpp:avatar:metadata'><item id='4a5eb7'>
      <metadata xmlns='urn:xmpp:avatar:metadata'><info id='4a5eb7' bytes='70'/></metadata>
    </item></items>
  </pubsub>
  <unknown xmlns='urn:example:other'/>
</user></host></server-data>
"""

# ejabberd 23.01's export_piefxis: an index with XInclude, one file per host; SCRAM keys and
# salt as its stored base64 text, base64-encoded again.
EJABBERD_SALT = bytes(range(16))
_ej_stored, _ej_server = scram_sha1(PASSWORD, EJABBERD_SALT, 4096)


def _twice(data: bytes) -> str:
    return b64(b64(data).encode())


EJABBERD_INDEX = """<?xml version='1.0'?>
<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>
<xi:include href='20261207-173556_old_test.xml'/></server-data>"""
EJABBERD_HOST = f"""<?xml version='1.0'?>
<host xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude' jid='{DOMAIN}'>
<user name='dave'>
  <scram-credentials xmlns='urn:xmpp:pie:0#scram' mechanism='SCRAM-SHA-1'>
    <iter-count>4096</iter-count><salt>{_twice(EJABBERD_SALT)}</salt>
    <server-key>{_twice(_ej_server)}</server-key><stored-key>{_twice(_ej_stored)}</stored-key>
  </scram-credentials>
  <query xmlns='jabber:iq:roster'><item subscription='from' jid='alice@{DOMAIN}'/></query>
  <presence xmlns='jabber:client' to='dave@{DOMAIN}' from='alice@{DOMAIN}' type='subscribe'/>
  <query xmlns='jabber:iq:private'><storage xmlns='storage:bookmarks'>
    <conference jid='tea@conference.example.org' name='Tea' autojoin='true'><nick>d</nick>
    </conference><url name='Home' url='https://example.org/'/></storage></query>
  <offline-messages>
    <message xmlns='jabber:client' to='dave@{DOMAIN}' from='bob@{DOMAIN}/x' type='chat'
      id='o1'><delay xmlns='urn:xmpp:delay' stamp='2026-12-07T17:35:50.027892Z'/>
      <body>you missed tea</body></message>
    <message to='dave@{DOMAIN}' from='bob@{DOMAIN}/x' id='o2'><body>and scones</body></message>
  </offline-messages>
</user>
<user name='plain' password='{PASSWORD}'/>
<user name='nokeys'/>
<user name='bad@name'/>
</host>"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


def ejabberd_export(directory: Path) -> Path:
    write(directory, "20261207-173556_old_test.xml", EJABBERD_HOST)
    return write(directory, "20261207-173556.xml", EJABBERD_INDEX)


# -- the reader (pure) --------------------------------------------------------------------------


def test_reads_prosody_accounts(tmp_path: Path) -> None:
    [alice] = list(pie.read(write(tmp_path, f"alice@{DOMAIN}.xml", PROSODY_ALICE)))
    assert (alice.user, alice.domain, alice.error) == ("alice", DOMAIN, None)  # normalised
    assert alice.credentials is not None and alice.credentials.sha256 is None
    assert alice.credentials.sha1 == ScramKeys(PROSODY_SALT, 10000, _stored, _server)
    assert verify_password(PASSWORD, alice.credentials.sha1)
    assert alice.roster == [
        RosterItem(f"bob@{DOMAIN}", "Bob B.", ("Work", "Friends"), "both"),
        RosterItem("eve@elsewhere.test", None, (), "none", pending_out=True),
        RosterItem(f"carol@{DOMAIN}", listed=False, pending_in=True,
                   request=f'<presence xmlns="jabber:client" from="carol@{DOMAIN}" '
                           'type="subscribe"/>')]
    assert alice.vcard is not None and "<FN>Alice Liddell</FN>" in alice.vcard
    assert alice.private == [("urn:example:porting", "note",
                              '<note xmlns="urn:example:porting">milk</note>')]
    assert [(m.outgoing, m.with_bare, m.with_resource, m.ts) for m in alice.archive] == [
        (True, f"bob@{DOMAIN}", "", 1796664820_000000),
        (False, f"bob@{DOMAIN}", "phone", 1796664821_250000)]
    assert etree.fromstring(alice.archive[0].stanza).findtext("{jabber:client}body") == \
        "hello bob"
    bookmarks = alice.pep["urn:xmpp:bookmarks:1"]
    assert (bookmarks.config["access_model"], bookmarks.config["max_items"],
            bookmarks.config["send_last_published_item"], bookmarks.config["publish_model"]) \
        == ("whitelist", "max", "never", "publishers")  # an empty field: the default
    assert [i.id for i in bookmarks.items] == ["tea@conference.example.org"]
    assert bookmarks.items[0].publisher == f"alice@{DOMAIN}"
    assert alice.pep["eu.siacs.conversations.axolotl.devicelist"].config["access_model"] == \
        "open"
    assert "storage:bookmarks" not in alice.pep
    assert alice.pep["urn:xmpp:avatar:metadata"].config["access_model"] == "presence"
    assert sorted(alice.skipped) == sorted([
        "roster item 'not a jid@@': not a valid JID",
        "archived message 'broken': not a XEP-0082 DateTime: None",
        "PEP node urn:xmpp:avatar:metadata: configuration not used (invalid value for "
        "pubsub#access_model); the defaults apply",
        "PEP node storage:bookmarks: empty (the compatibility node of XEP-0048; bookmarks "
        "live in urn:xmpp:bookmarks:1)",
        "{urn:example:other}unknown: not understood"])


def test_reads_ejabberd_index_and_host_files(tmp_path: Path) -> None:
    accounts = {a.user: a for a in pie.read(ejabberd_export(tmp_path))}
    assert set(accounts) == {"dave", "plain", "nokeys", "bad@name"}
    dave = accounts["dave"]
    # Decoded twice: the real salt and keys, with which the password checks.
    assert dave.credentials is not None and dave.credentials.sha1 is not None
    assert dave.credentials.sha1.salt == EJABBERD_SALT
    assert verify_password(PASSWORD, dave.credentials.sha1)
    # 'from' already: the pending request from alice is moot (she is approved).
    assert dave.roster == [RosterItem(f"alice@{DOMAIN}", subscription="from")]
    assert [etree.fromstring(m).findtext("{jabber:client}body") for m in dave.offline] == \
        ["you missed tea", "and scones"]  # the second written without a namespace
    # XEP-0048 bookmarks in private XML also become XEP-0402 items.
    [room] = dave.pep["urn:xmpp:bookmarks:1"].items
    conference = etree.fromstring(room.payload)
    assert (room.id, conference.get("name"), conference.findtext(
        "{urn:xmpp:bookmarks:1}nick")) == ("tea@conference.example.org", "Tea", "d")
    assert dave.pep["urn:xmpp:bookmarks:1"].config["access_model"] == "whitelist"
    assert [p[:2] for p in dave.private] == [("storage:bookmarks", "storage")]
    assert accounts["plain"].password == PASSWORD and accounts["plain"].credentials is None
    assert accounts["nokeys"].error == "no credentials (neither SCRAM keys nor a password)"
    assert accounts["bad@name"].error is not None


@pytest.mark.parametrize("text, words", [
    ("<foo/>", ("not a XEP-0227 file",)),
    ("<server-data xmlns='urn:xmpp:pie:0'><host jid='a.test'><user name='x'>",
     ("not well-formed",)),
    ("<server-data xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude'>"
     "<xi:include href='../etc/passwd'/></server-data>", ("XInclude", "no file next to it")),
])
def test_unreadable_files(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    with pytest.raises(pie.PieError) as caught:
        list(pie.read(write(tmp_path, "x.xml", text)))
    for word in words:
        assert word in str(caught.value)


def test_entities_are_not_expanded(tmp_path: Path) -> None:
    """An export is data: no DTD, no entity expansion (a billion laughs stays one word)."""
    text = ("<?xml version='1.0'?><!DOCTYPE server-data [<!ENTITY a 'AAAAAAAAAA'>"
            "<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>]>"
            "<server-data xmlns='urn:xmpp:pie:0'><host jid='old.test'>"
            "<user name='x' password='p'><vCard xmlns='vcard-temp'><FN>&b;</FN></vCard>"
            "</user></host></server-data>")
    [account] = list(pie.read(write(tmp_path, "x.xml", text)))
    assert "AAAAAAAAAA" not in (account.vcard or "")


def test_progress_reaches_the_end_of_each_file(tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    list(pie.read(ejabberd_export(tmp_path), lambda p, done, size: seen.append(
        (p.name, done, size))))
    assert seen[-1][1] == seen[-1][2] and seen[-1][0] == "20261207-173556.xml"
    host = [s for s in seen if s[0] == "20261207-173556_old_test.xml"]
    assert host and host[-1][1] == host[-1][2]


# -- into the stores ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    opened = await open_storage(storage_config(tmp_path, request.param, dsn), all_store_specs())
    try:
        yield opened
    finally:
        await opened.close()


TARGET = load.Target(domains=(DOMAIN,), iterations=4096, pep_max_items=256)


async def import_files(storage: Storage, *paths: Path) -> load.Report:
    report = load.Report()
    for path in paths:
        for account in pie.read(path):
            await load.import_account(storage, account, TARGET, report)
    return report


async def test_import_is_idempotent(storage: Storage, tmp_path: Path) -> None:
    files = (write(tmp_path, "alice.xml", PROSODY_ALICE), ejabberd_export(tmp_path / "ej"))
    first = await import_files(storage, *files)
    assert dict(first.added) == {"accounts": 3, "roster items": 4, "vCards": 1,
                                 "private XML items": 2, "PEP nodes": 4, "PEP items": 4,
                                 "offline messages": 2, "archived messages": 2}
    assert not first.unchanged
    skipped = [f"{where}: {why}" for where, why in first.skipped]
    assert f"nokeys@{DOMAIN}: no credentials (neither SCRAM keys nor a password)" in skipped
    assert any(s.startswith("bad@name@old.test: not a valid JID") for s in skipped), skipped
    assert f"alice@{DOMAIN}: {{urn:example:other}}unknown: not understood" in skipped
    second = await import_files(storage, *files)
    assert not second.added
    assert second.unchanged == first.added
    assert second.skipped == first.skipped
    # What the import wrote, as the server reads it.
    assert await storage.accounts.list(DOMAIN) == ["alice", "dave", "plain"]
    keys = await storage.accounts.get_credentials("dave", DOMAIN)
    assert keys is not None and keys.sha256 is None and keys.sha1 is not None
    assert verify_password(PASSWORD, keys.sha1)
    _version, roster = await storage.rosters.load("alice", DOMAIN)
    assert {i.contact: (i.groups, i.subscription, i.pending_in, i.listed) for i in roster} == {
        f"bob@{DOMAIN}": (("Work", "Friends"), "both", False, True),
        "eve@elsewhere.test": ((), "none", False, True),
        f"carol@{DOMAIN}": ((), "none", True, False)}
    assert await storage.vcards.avatar_hash("alice", DOMAIN) == \
        "4a5eb7171b58e08a6881721e3b43d5a44419a2be"
    nodes = await storage.pep.nodes("alice", DOMAIN)  # type: ignore[attr-defined]
    assert nodes["urn:xmpp:bookmarks:1"]["access_model"] == "whitelist"
    page = await storage.archive.query(  # type: ignore[attr-defined]
        f"alice@{DOMAIN}", load.ArchiveQuery(max=10))
    assert [(m.ts, m.outgoing) for m in page.items] == [(1796664820_000000, True),
                                                        (1796664821_250000, False)]
    assert len(await storage.offline.load("dave", DOMAIN)) == 2


async def test_import_merges_into_what_is_there(storage: Storage, tmp_path: Path) -> None:
    """An existing account keeps its password and what it has; the file's data is added and
    a changed item is put back as the file says."""
    mine = Credentials(sha1=derive_keys("new-password", "sha1"),
                       sha256=derive_keys("new-password", "sha256"))
    await storage.accounts.create("alice", DOMAIN, mine)
    await storage.rosters.put("alice", DOMAIN, RosterItem("zed@x.test", subscription="to"))
    await storage.rosters.put("alice", DOMAIN, RosterItem(f"bob@{DOMAIN}", "Bobby"))
    report = await import_files(storage, write(tmp_path, "alice.xml", PROSODY_ALICE))
    assert (f"alice@{DOMAIN}", "the account exists here with another password: kept that "
            "one") in report.skipped
    assert await storage.accounts.get_credentials("alice", DOMAIN) == mine
    _version, roster = await storage.rosters.load("alice", DOMAIN)
    items = {i.contact: i for i in roster}
    assert items["zed@x.test"].subscription == "to"
    assert (items[f"bob@{DOMAIN}"].name, items[f"bob@{DOMAIN}"].subscription) == \
        ("Bob B.", "both")
    assert report.added["roster items"] == 3 and report.added["accounts"] == 0


async def test_accounts_of_other_domains_are_skipped(storage: Storage, tmp_path: Path) -> None:
    report = load.Report()
    target = dataclasses.replace(TARGET, domains=("new.test",))
    for account in pie.read(write(tmp_path, "alice.xml", PROSODY_ALICE)):
        await load.import_account(storage, account, target, report)
    assert report.skipped == [(f"alice@{DOMAIN}", f"{DOMAIN} is not a domain of this server "
                                                  "(it serves new.test)")]
    assert await storage.accounts.list(DOMAIN) == []


async def test_plain_passwords_get_both_hashes(storage: Storage, tmp_path: Path) -> None:
    await import_files(storage, ejabberd_export(tmp_path))
    keys = await storage.accounts.get_credentials("plain", DOMAIN)
    assert keys is not None and keys.sha1 is not None and keys.sha256 is not None
    assert verify_password(PASSWORD, keys.sha1) and verify_password(PASSWORD, keys.sha256)
    again = await import_files(storage, ejabberd_export(tmp_path))
    assert again.unchanged["accounts"] == 2 and not again.added


async def test_round_trip(storage: Storage, tmp_path: Path) -> None:
    """Import, export, import the export into an empty database, export again: the two
    exports are the same file, and the second import found what the first had."""
    await import_files(storage, write(tmp_path, "alice.xml", PROSODY_ALICE),
                       ejabberd_export(tmp_path / "ej"))
    first = tmp_path / "first.xml"
    assert await load.export(storage, [DOMAIN], first) == 3
    other = await open_storage(storage_config(tmp_path / "other", "sqlite"), all_store_specs())
    try:
        report = await import_files(other, first)
        assert report.skipped == []
        assert report.added["accounts"] == 3 and report.added["archived messages"] == 2
        second = tmp_path / "second.xml"
        await load.export(other, [DOMAIN], second)
    finally:
        await other.close()
    assert first.read_bytes() == second.read_bytes()
    [alice] = [a for a in pie.read(first) if a.user == "alice"]
    assert alice.credentials is not None and verify_password(PASSWORD, alice.credentials.sha1)
    assert {i.contact for i in alice.roster} == {f"bob@{DOMAIN}", "eve@elsewhere.test",
                                                 f"carol@{DOMAIN}"}
    assert set(alice.pep) == {"urn:xmpp:bookmarks:1", "eu.siacs.conversations.axolotl.devicelist",
                              "urn:xmpp:avatar:metadata"}


def test_export_is_what_prosody_reads(tmp_path: Path) -> None:
    """The elements Prosody's mod_storage_xep0227 looks for: scram-credentials with
    mechanism SCRAM-SHA-1 (its default password_hash), pending requests as jabber:client
    presence, archive results in urn:xmpp:mam:2 with forwarded/delay, PEP configure forms."""
    [alice] = list(pie.read(write(tmp_path, "alice.xml", PROSODY_ALICE)))
    user = pie.user_element(alice)
    scram = user.find("{urn:xmpp:pie:0#scram}scram-credentials[@mechanism='SCRAM-SHA-1']")
    assert scram is not None
    assert base64.b64decode(scram.findtext("{urn:xmpp:pie:0#scram}salt") or "") == PROSODY_SALT
    assert user.find("{jabber:client}presence[@from='carol@old.test']") is not None
    assert user.find("{urn:xmpp:pie:0#mam}archive/{urn:xmpp:mam:2}result/"
                     "{urn:xmpp:forward:0}forwarded/{urn:xmpp:delay}delay") is not None
    assert user.find("{http://jabber.org/protocol/pubsub#owner}pubsub/"
                     "{http://jabber.org/protocol/pubsub#owner}configure/"
                     "{jabber:x:data}x") is not None


# -- the CLI ------------------------------------------------------------------------------------


def config_file(tmp_path: Path) -> Path:
    return write(tmp_path, "presenced.toml", textwrap.dedent(f"""\
        domains = ["{DOMAIN}"]
        data_dir = "{tmp_path / 'data'}"
        """))


def test_cli_import_and_export(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    exports = tmp_path / "exports"
    write(exports, f"alice@{DOMAIN}.xml", PROSODY_ALICE)
    ejabberd_export(exports)
    result = presenced(tmp_path, "import", str(exports), "--config", str(config))
    assert result.code == 0, result
    # The host file is read through the index only, not a second time on its own.
    assert [line for line in result.err.splitlines() if line.startswith("read ")] == [
        f"read {exports / '20261207-173556.xml'}: 4 account(s)",
        f"read {exports / f'alice@{DOMAIN}.xml'}: 1 account(s)"]
    out = result.out.splitlines()
    assert out[0].startswith("imported: 3 accounts, ")
    assert out[1] == "already there (unchanged): nothing"
    assert f"  nokeys@{DOMAIN}: no credentials (neither SCRAM keys nor a password)" in out
    again = presenced(tmp_path, "import", str(exports), "--config", str(config))
    assert again.out.splitlines()[0] == "imported: nothing"
    target = tmp_path / "all.xml"
    done = presenced(tmp_path, "export", str(target), "--config", str(config))
    assert done.code == 0, done
    assert done.out == f"exported 3 account(s) of {DOMAIN} to {target}\n"
    assert sorted(a.user for a in pie.read(target)) == ["alice", "dave", "plain"]
    assert_fails(presenced(tmp_path, "export", str(target), "--config", str(config)), 1,
                 "exists", "--force")
    # Into a directory: one file per account, as Prosody keeps them.
    each = tmp_path / "each"
    each.mkdir()
    done = presenced(tmp_path, "export", str(each), "--config", str(config))
    assert done.code == 0, done
    assert sorted(p.name for p in each.iterdir()) == [
        f"{user}@{DOMAIN}.xml" for user in ("alice", "dave", "plain")]
    [dave] = list(pie.read(each / f"dave@{DOMAIN}.xml"))
    assert dave.user == "dave" and len(dave.offline) == 2
    assert_fails(presenced(tmp_path, "export", str(each), "--config", str(config)), 1,
                 f"alice@{DOMAIN}.xml exists", "--force")
    assert_fails(presenced(tmp_path, "export", str(tmp_path / "x.xml"), "--domain", "no.test",
                           "--config", str(config)), 1, "no.test", "not a domain")
    assert_fails(presenced(tmp_path, "import", str(tmp_path / "missing"), "--config",
                           str(config)), 1, "no such file")


def test_cli_reports_a_file_it_cannot_read(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    bad = write(tmp_path, "bad.xml", "<html/>")
    result = presenced(tmp_path, "import", str(bad), "--config", str(config))
    assert result.code == 1 and "Traceback" not in result.err
    assert f"  {bad}: {bad}: not a XEP-0227 file (the root element is html, not " \
           "{urn:xmpp:pie:0}server-data) (after 0 account(s))" in result.out.splitlines()


# -- logging in with SCRAM-SHA-1 keys only ------------------------------------------------------


async def test_login_with_sha1_keys_only(server: RunningServer) -> None:
    """An account imported with SCRAM-SHA-1 keys only logs in with SCRAM-SHA-1(-PLUS) and
    PLAIN; SCRAM-SHA-256 fails as a wrong password does (there are no keys to check)."""
    stored, server_key = scram_sha1(PASSWORD, PROSODY_SALT, 10000)
    await server.server.storage.accounts.create("alice", "a.test", Credentials(
        sha1=ScramKeys(PROSODY_SALT, 10000, stored, server_key), sha256=None))
    for mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"):
        client = await server.raw()
        try:
            await client.authenticate("a.test", "alice", PASSWORD, mechanism)
        finally:
            await client.close()
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"):
        client = await server.raw()
        try:
            with pytest.raises(AssertionError, match="not-authorized"):
                await client.authenticate("a.test", "alice", PASSWORD, mechanism)
        finally:
            await client.close()
    for password, answer in ((PASSWORD, "success"), ("wrong", "failure")):
        client = await server.raw()
        try:
            await client.open("a.test")
            await client.send(f"<starttls xmlns='{TLS_NS}'/>")
            await client.expect(f"{{{TLS_NS}}}proceed")
            await client.starttls()
            await client.open("a.test")
            plain = b64(f"\0alice\0{password}".encode())
            await client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{plain}</auth>")
            assert (await client.next()).tag == f"{{{SASL_NS}}}{answer}"
        finally:
            await client.close()


async def test_sha256_is_not_offered_while_accounts_have_sha1_keys_only(tmp_path: Path) -> None:
    """A client that takes the first mechanism's failure as a wrong password (slixmpp as the
    tests' client() uses it, Conversations) logs in to an imported account at once: at start,
    the server finds accounts with SHA-1 keys only and leaves SCRAM-SHA-256 out."""
    running = await start_server(tmp_path)
    try:
        await running.add_user("bob@a.test")
        stored, server_key = scram_sha1(PASSWORD, PROSODY_SALT, 10000)
        await running.server.storage.accounts.create("alice", "a.test", Credentials(
            sha1=ScramKeys(PROSODY_SALT, 10000, stored, server_key), sha256=None))
        assert running.server.c2s_policy.scram_sha256  # decided at start
    finally:
        await stop_server(running)
    running = await start_server(tmp_path)
    try:
        assert not running.server.c2s_policy.scram_sha256
        client = await running.raw()
        features = await client.open("a.test")
        await client.send(f"<starttls xmlns='{TLS_NS}'/>")
        await client.expect(f"{{{TLS_NS}}}proceed")
        await client.starttls()
        features = await client.open("a.test")
        offered = [m.text for m in features.iter(f"{{{SASL_NS}}}mechanism")]
        assert "SCRAM-SHA-1" in offered and not any("SHA-256" in (m or "") for m in offered)
        await client.close()
        assert (await running.client("alice@a.test", PASSWORD)).authenticated
        assert (await running.client("bob@a.test")).authenticated  # both: SHA-1 serves too
    finally:
        await stop_server(running)
