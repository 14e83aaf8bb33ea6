"""vcard-temp (XEP-0054) and the avatar hash for presence (XEP-0153), over real sockets."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from slixmpp import JID as SlixJID
from slixmpp.plugins.xep_0054.stanza import VCardTemp

from server.modules import vcard as vcard_module
from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import condition

VCARD_NS = "vcard-temp"
IMAGE = bytes(range(256)) * 8  # not an image, but the hash is over whatever bytes BINVAL holds






async def test_publish_and_read_vcard_with_slixmpp(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.client("alice@a.test", plugins=("xep_0054",))
    bob = await server.client("bob@a.test", plugins=("xep_0054",))
    card = VCardTemp()
    card["FN"] = "Alice Liddell"
    card["NICKNAME"] = "alice"
    card["PHOTO"]["TYPE"] = "image/png"
    card["PHOTO"]["BINVAL"] = IMAGE
    await alice.plugin["xep_0054"].publish_vcard(card)

    for client in (alice, bob):
        reply = await client.plugin["xep_0054"].get_vcard(SlixJID("alice@a.test"))
        got = reply["vcard_temp"]
        assert got["FN"] == "Alice Liddell"
        assert got["NICKNAME"] == ["alice"]
        assert got["PHOTO"]["BINVAL"] == IMAGE
    # XEP-0153: the SHA-1 of the decoded image, for presence.
    assert await server.server.modules["vcard"].avatar_hash("alice", "a.test") == hashlib.sha1(IMAGE).hexdigest()


async def test_own_vcard_without_to_and_replacement(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    reply = await client.ask("<iq type='get' id='g0'><vCard xmlns='vcard-temp'/></iq>")
    vcard = reply.find(f"{{{VCARD_NS}}}vCard")
    # XEP-0054 §3.1: nothing stored yet is an empty vCard.
    assert reply.get("type") == "result" and vcard is not None and len(vcard) == 0
    assert await server.server.modules["vcard"].avatar_hash("alice", "a.test") is None

    reply = await client.ask("<iq type='set' id='s1'><vCard xmlns='vcard-temp'>"
                              "<FN>First</FN><PHOTO><BINVAL>aGVsbG8=</BINVAL></PHOTO></vCard></iq>")
    assert reply.get("type") == "result" and reply.get("id") == "s1"
    assert await server.server.modules["vcard"].avatar_hash("alice", "a.test") == hashlib.sha1(b"hello").hexdigest()
    reply = await client.ask("<iq type='set' id='s2'><vCard xmlns='vcard-temp'>"
                              "<FN>Second</FN><x:note xmlns:x='urn:x'>kept</x:note></vCard></iq>")
    assert reply.get("type") == "result"
    # A vCard without a photo: '' (presence then carries an empty <photo/>).
    assert await server.server.modules["vcard"].avatar_hash("alice", "a.test") == ""
    reply = await client.ask("<iq type='get' id='g1'><vCard xmlns='vcard-temp'/></iq>")
    vcard = reply.find(f"{{{VCARD_NS}}}vCard")
    assert vcard is not None
    assert vcard.findtext(f"{{{VCARD_NS}}}FN") == "Second"
    assert vcard.find(f"{{{VCARD_NS}}}PHOTO") is None
    assert vcard.findtext("{urn:x}note") == "kept"  # stored verbatim, foreign elements too
    await client.close()


async def test_other_accounts_vcard_errors_and_empty(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    client = await server.raw_login("alice@a.test")
    reply = await client.ask("<iq type='get' id='b' to='bob@a.test'>"
                              "<vCard xmlns='vcard-temp'/></iq>")
    assert reply.get("type") == "result" and reply.get("from") == "bob@a.test"
    vcard = reply.find(f"{{{VCARD_NS}}}vCard")
    assert vcard is not None and len(vcard) == 0
    reply = await client.ask("<iq type='get' id='n' to='nobody@a.test'>"
                              "<vCard xmlns='vcard-temp'/></iq>")
    assert condition(reply) == "service-unavailable"
    reply = await client.ask("<iq type='set' id='f' to='bob@a.test'>"
                              "<vCard xmlns='vcard-temp'><FN>Mallory</FN></vCard></iq>")
    assert condition(reply) == "forbidden"
    reply = await client.ask("<iq type='get' id='b2' to='bob@a.test'>"
                              "<vCard xmlns='vcard-temp'/></iq>")
    assert len(reply.find(f"{{{VCARD_NS}}}vCard")) == 0
    await client.close()


async def test_bad_vcards_are_refused(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    big = "x" * (vcard_module.MAX_VCARD_SIZE + 1)
    reply = await client.ask(f"<iq type='set' id='big'><vCard xmlns='vcard-temp'><DESC>{big}"
                              "</DESC></vCard></iq>")
    assert condition(reply) == "not-acceptable"
    reply = await client.ask("<iq type='set' id='b64'><vCard xmlns='vcard-temp'><PHOTO>"
                              "<BINVAL>not*base64!</BINVAL></PHOTO></vCard></iq>")
    assert condition(reply) == "bad-request"
    reply = await client.ask("<iq type='set' id='el'><card xmlns='vcard-temp'/></iq>")
    assert condition(reply) == "bad-request"  # no <card/> in vcard-temp
    # Nothing of the refused sets was stored.
    reply = await client.ask("<iq type='get' id='g'><vCard xmlns='vcard-temp'/></iq>")
    assert len(reply.find(f"{{{VCARD_NS}}}vCard")) == 0
    await client.close()


async def test_folded_binval_hash(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    encoded = base64.b64encode(IMAGE).decode()
    folded = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    reply = await client.ask("<iq type='set' id='s'><vCard xmlns='vcard-temp'><PHOTO>"
                              f"<TYPE>image/png</TYPE><BINVAL>{folded}</BINVAL></PHOTO></vCard></iq>")
    assert reply.get("type") == "result"
    assert await server.server.modules["vcard"].avatar_hash("alice", "a.test") == hashlib.sha1(IMAGE).hexdigest()
    await client.close()


async def test_server_vcard_and_disco_feature(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    reply = await client.ask("<iq type='get' id='s' to='b.test'><vCard xmlns='vcard-temp'/></iq>")
    assert reply.get("type") == "result" and reply.get("from") == "b.test"
    assert reply.findtext(f"{{{VCARD_NS}}}vCard/{{{VCARD_NS}}}FN") == "b.test"
    reply = await client.ask("<iq type='get' id='d' to='a.test'>"
                              "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    features = {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert "vcard-temp" in features
    await client.close()


async def test_vcard_survives_restart_and_account_deletion(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        client = await running.raw_login("alice@a.test")
        reply = await client.ask("<iq type='set' id='s'><vCard xmlns='vcard-temp'>"
                                  "<PHOTO><BINVAL>aGVsbG8=</BINVAL></PHOTO></vCard></iq>")
        assert reply.get("type") == "result"
        await client.close()
    finally:
        await stop_server(running)
    running = await start_server(tmp_path)
    try:
        # A fresh server (and cache) reads the stored hash back.
        assert await running.server.modules["vcard"].avatar_hash("alice", "a.test") == \
            hashlib.sha1(b"hello").hexdigest()
        client = await running.raw_login("bob@a.test")
        reply = await client.ask("<iq type='get' id='g' to='alice@a.test'>"
                                  "<vCard xmlns='vcard-temp'/></iq>")
        assert reply.findtext(f"{{{VCARD_NS}}}vCard/{{{VCARD_NS}}}PHOTO/{{{VCARD_NS}}}BINVAL") \
            == "aGVsbG8="
        # Deleting the account deletes its vCard (ON DELETE CASCADE).
        await running.server.storage.accounts.delete("alice", "a.test")
        assert await running.server.storage.vcards.get("alice", "a.test") is None
        await client.close()
    finally:
        await stop_server(running)


async def test_avatar_hash_added_to_presence(server: RunningServer) -> None:
    """XEP-0153: the server adds <x xmlns='vcard-temp:x:update'><photo>SHA-1</photo></x>."""
    import hashlib
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    await client.ask("<iq type='set' id='v'><vCard xmlns='vcard-temp'>"
                      "<PHOTO><BINVAL>aGVsbG8=</BINVAL></PHOTO></vCard></iq>")
    await client.send("<presence/>")
    while True:
        el = await client.next()
        if el.tag == "{jabber:client}presence":
            break
    photo = el.findtext("{vcard-temp:x:update}x/{vcard-temp:x:update}photo")
    assert photo == hashlib.sha1(b"hello").hexdigest()


async def test_avatar_hash_read_at_bind_and_not_kept_when_forgotten_meanwhile(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The avatar hash is read ahead at bind and the initial presence shares that read; one
    forgotten while it is read ([cluster]: a vCard stored on another node) is not kept."""
    import asyncio

    from server.jid import JID
    from tests.test_roster import held_reads

    await server.add_user("alice@a.test")
    reads, release = held_reads(monkeypatch, server.server.storage.vcards, "avatar_hash")
    alice = await server.raw_login("alice@a.test")
    assert reads == ["alice"]  # read at bind, before the presence that carries it
    await alice.send("<presence/>")
    await asyncio.sleep(0.2)
    assert reads == ["alice"]  # the presence waits for that same read
    module = server.server.module(vcard_module.VCard)
    assert module is not None
    module.forget(JID.parse("alice@a.test"))
    release.set()
    await alice.next_of("presence")
    second = await server.raw_login("alice@a.test", resource="second")
    await second.send("<presence/>")
    await second.next_of("presence")
    assert reads == ["alice", "alice"]  # the forgotten hash was read again, then kept
    third = await server.raw_login("alice@a.test", resource="third")
    await third.send("<presence/>")
    await third.next_of("presence")
    assert reads == ["alice", "alice"]
