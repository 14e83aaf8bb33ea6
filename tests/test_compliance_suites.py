"""The XEP-0479 (Compliance Suites 2023) server table in docs/features.md, checked against what
a running presenced advertises: each XEP's disco#info feature (or identity, or stream feature)
where the suite's clients look for it. A row of the table that claims support has a line here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import RawClient

INFO = "http://jabber.org/protocol/disco#info"
ITEMS = "http://jabber.org/protocol/disco#items"
FEATURES = Path(__file__).resolve().parent.parent / "docs" / "features.md"

# XEP -> (where, what): a feature var at a JID ("a.test", the account "alice@a.test", a service
# or a room), an identity "category/type", or a post-authentication stream feature (Clark name).
ADVERTISED: dict[str, list[tuple[str, str]]] = {
    "XEP-0030": [("a.test", INFO), ("a.test", ITEMS)],
    "XEP-0054": [("a.test", "vcard-temp")],
    "XEP-0045": [("muc.a.test", "http://jabber.org/protocol/muc")],
    "XEP-0049": [("a.test", "jabber:iq:private")],
    "XEP-0065": [("proxy.a.test", "identity:proxy/bytestreams"),
                 ("proxy.a.test", "http://jabber.org/protocol/bytestreams")],
    "XEP-0163": [("alice@a.test", "identity:pubsub/pep")],
    "XEP-0191": [("a.test", "urn:xmpp:blocking")],
    "XEP-0198": [("stream", "{urn:xmpp:sm:3}sm")],
    "XEP-0215": [("a.test", "urn:xmpp:extdisco:2")],
    "XEP-0223": [("alice@a.test", "http://jabber.org/protocol/pubsub#publish-options")],
    "XEP-0280": [("a.test", "urn:xmpp:carbons:2")],
    "XEP-0313": [("alice@a.test", "urn:xmpp:mam:2"), ("room@muc.a.test", "urn:xmpp:mam:2")],
    "XEP-0352": [("stream", "{urn:xmpp:csi:0}csi")],
    "XEP-0357": [("a.test", "urn:xmpp:push:0")],
    "XEP-0363": [("upload.a.test", "urn:xmpp:http:upload:0")],
    "XEP-0398": [("alice@a.test", "urn:xmpp:pep-vcard-conversion:0")],
    "XEP-0402": [("alice@a.test", "urn:xmpp:bookmarks:1#compat")],
    "XEP-0410": [("muc.a.test", "http://jabber.org/protocol/muc#self-ping-optimization"),
                 ("room@muc.a.test", "http://jabber.org/protocol/muc#self-ping-optimization")],
    "RFC 6121": [("stream", "{urn:xmpp:features:rosterver}ver"),
                 ("stream", "{urn:xmpp:features:pre-approval}sub")],
}


async def _info(client: RawClient, jid: str) -> tuple[set[str], set[str]]:
    reply = await client.ask(f"<iq type='get' to='{jid}' id='d'><query xmlns='{INFO}'/></iq>",
                             skip_others=True)
    assert reply.get("type") == "result", etree.tostring(reply)
    features = {f.get("var") or "" for f in reply.iter(f"{{{INFO}}}feature")}
    identities = {f"identity:{i.get('category')}/{i.get('type')}"
                  for i in reply.iter(f"{{{INFO}}}identity")}
    return features, identities


@pytest.fixture
async def full_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(
        tmp_path, '[turn]\nhost = "turn.a.test"\nsecret = "s"\n'
                  '[proxy65]\nlisten = ["127.0.0.1:0"]\n[upload]\nenabled = true\n',
        listen_extra='http = ["127.0.0.1:0"]')
    try:
        yield running
    finally:
        await stop_server(running)


async def test_what_readme_claims_is_advertised(full_server: RunningServer) -> None:
    if True:
        await full_server.add_user("alice@a.test")
        raw = await full_server.raw()
        await raw.authenticate("a.test", "alice", PASSWORD)
        stream = {child.tag for child in await raw.open("a.test")}
        alice = await full_server.raw_login("alice@a.test")
        await alice.send("<presence to='room@muc.a.test/alice'><x "
                         "xmlns='http://jabber.org/protocol/muc'/></presence>")
        await alice.next_of("presence")
        seen: dict[str, set[str]] = {"stream": stream}
        missing = []
        for xep, places in ADVERTISED.items():
            for where, what in places:
                if where not in seen:
                    features, identities = await _info(alice, where)
                    seen[where] = features | identities
                if what not in seen[where]:
                    missing.append(f"{xep}: {what} at {where}")
        assert not missing, missing
        # Each XEP listed here has a row in the compliance table, and vice versa for
        # the rows marked supported (✓) that a client discovers.
        table = FEATURES.read_text().split("### XMPP Compliance Suites 2023", 1)[1]
        table = table.split("\n\n## ", 1)[0]
        for xep in ADVERTISED:
            assert xep in table, f"{xep} is not in docs/features.md's compliance table"
