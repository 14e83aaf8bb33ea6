"""XEP-0398: XEP-0084 (PEP) avatars and vCard (XEP-0054/XEP-0153) avatars converted both ways,
over real sockets with raw clients."""

from __future__ import annotations

import base64
import hashlib

from lxml import etree

from tests.conftest import RunningServer
from tests.rawclient import RawClient
from tests.test_pep import (
    CAPS,
    DISCO,
    EVENT,
    PUBSUB,
    ask,
    friends,
    item_ids,
    items,
    next_event,
    online_with_caps,
    publish,
    q,
    wait_caps,
)

VCARD = "vcard-temp"
UPDATE = "vcard-temp:x:update"
DATA = "urn:xmpp:avatar:data"
METADATA = "urn:xmpp:avatar:metadata"
IMAGE = bytes(range(256)) * 3
IMAGE_ID = hashlib.sha1(IMAGE).hexdigest()


async def alice_and_bob(server: RunningServer) -> tuple[RawClient, RawClient]:
    """Two contacts (subscription both), logged in, no presence sent yet."""
    for user in ("alice", "bob"):
        await server.add_user(f"{user}@a.test")
    await friends(server, "alice@a.test", "bob@a.test")
    return await server.raw_login("alice@a.test"), await server.raw_login("bob@a.test")


async def vcard_of(client: RawClient, jid: str) -> etree._Element:
    reply = await ask(client, f"<iq type='get' id='v' to='{jid}'><vCard xmlns='{VCARD}'/></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    vcard = reply.find(q(VCARD, "vCard"))
    assert vcard is not None
    return vcard


async def photo_in_presence(watcher: RawClient, sender: RawClient, jid: str,
                            status: str) -> str | None:
    """The XEP-0153 hash in the presence the sender broadcasts now."""
    await sender.send(f"<presence><status>{status}</status></presence>")
    while True:
        presence = await watcher.next_of("presence")
        if (presence.get("from", "").startswith(jid + "/")
                and presence.findtext(q("jabber:client", "status")) == status):
            return presence.findtext(f"{{{UPDATE}}}x/{{{UPDATE}}}photo")


async def test_pep_avatar_becomes_the_vcard_photo(server: RunningServer) -> None:
    """XEP-0398 §3.1: publishing the metadata puts the data item's image in the vCard (TYPE
    from the info); contacts see the new XEP-0153 hash in presence; an image whose SHA-1 is
    not its id is not converted. The account announces the conversion (§2)."""
    alice, bob = await alice_and_bob(server)
    await bob.send("<presence/>")
    await alice.send("<presence/>")
    reply = await ask(alice, f"<iq type='get' id='d' to='alice@a.test'><query xmlns='{DISCO}'/>"
                             "</iq>")
    assert "urn:xmpp:pep-vcard-conversion:0" in {f.get("var") for f in
                                                  reply.iter(q(DISCO, "feature"))}
    encoded = base64.b64encode(IMAGE).decode()
    assert (await ask(alice, publish(DATA, f"<data xmlns='{DATA}'>{encoded}</data>",
                                     IMAGE_ID))).get("type") == "result"
    info = f"<info id='{IMAGE_ID}' type='image/webp' bytes='{len(IMAGE)}'/>"
    url = "<info id='elsewhere' type='image/png' bytes='1' url='https://a.test/x.png'/>"
    reply = await ask(alice, publish(METADATA, f"<metadata xmlns='{METADATA}'>{url}{info}"
                                               "</metadata>", IMAGE_ID, iq_id="p2"))
    assert reply.get("type") == "result"
    vcard = await vcard_of(bob, "alice@a.test")
    binval = vcard.findtext(f"{{{VCARD}}}PHOTO/{{{VCARD}}}BINVAL")
    assert binval is not None and base64.b64decode(binval) == IMAGE
    assert vcard.findtext(f"{{{VCARD}}}PHOTO/{{{VCARD}}}TYPE") == "image/webp"
    assert await photo_in_presence(bob, alice, "alice@a.test", "new") == IMAGE_ID
    # Data that does not hash to its id: the vCard keeps the old photo.
    forged = base64.b64encode(b"not the image").decode()
    await ask(alice, publish(DATA, f"<data xmlns='{DATA}'>{forged}</data>", "f" * 40, iq_id="p3"))
    await ask(alice, publish(METADATA, f"<metadata xmlns='{METADATA}'><info id='{'f' * 40}' "
                                       "type='image/png' bytes='13'/></metadata>", "f" * 40,
                             iq_id="p4"))
    vcard = await vcard_of(bob, "alice@a.test")
    assert base64.b64decode(vcard.findtext(f"{{{VCARD}}}PHOTO/{{{VCARD}}}BINVAL") or "") == IMAGE
    # Empty metadata (XEP-0084 §4.6, avatar disabled): the photo goes, presence says so.
    await ask(alice, publish(METADATA, f"<metadata xmlns='{METADATA}'/>", "none", iq_id="p5"))
    assert (await vcard_of(bob, "alice@a.test")).find(q(VCARD, "PHOTO")) is None
    assert await photo_in_presence(bob, alice, "alice@a.test", "none") == ""


async def test_vcard_photo_is_published_as_a_pep_avatar(server: RunningServer) -> None:
    """XEP-0398 §3.2: a vCard stored with a new PHOTO is published as avatar data, then
    metadata (id = SHA-1, bytes, type), which a +notify contact is told; the other vCard fields
    stay; removing the photo publishes empty metadata."""
    alice, bob = await alice_and_bob(server)
    await alice.send("<presence/>")
    ver = await online_with_caps(bob, [DISCO, CAPS, f"{METADATA}+notify"])
    await wait_caps(server, ver)
    encoded = base64.b64encode(IMAGE).decode()
    folded = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    reply = await ask(alice, f"<iq type='set' id='v1'><vCard xmlns='{VCARD}'><FN>Alice</FN>"
                             f"<PHOTO><TYPE>image/jpeg</TYPE><BINVAL>{folded}</BINVAL></PHOTO>"
                             "</vCard></iq>")
    assert reply.get("type") == "result", etree.tostring(reply)
    message = await next_event(bob)
    holder = message.find(f"{{{EVENT}}}event/{{{EVENT}}}items")
    assert holder is not None and holder.get("node") == METADATA
    info = holder.find(f"{{{EVENT}}}item/{{{METADATA}}}metadata/{{{METADATA}}}info")
    assert info is not None
    assert (info.get("id"), info.get("type"), info.get("bytes")) == (
        IMAGE_ID, "image/jpeg", str(len(IMAGE)))
    reply = await ask(bob, items("alice@a.test", DATA, inner=f"<item id='{IMAGE_ID}'/>"))
    assert item_ids(reply) == [IMAGE_ID]
    assert base64.b64decode(reply.findtext(f".//{{{PUBSUB}}}item/{{{DATA}}}data") or "") == IMAGE
    # The vCard itself is as stored (converted back it would be the same photo: no loop).
    vcard = await vcard_of(bob, "alice@a.test")
    assert vcard.findtext(q(VCARD, "FN")) == "Alice"
    assert vcard.findtext(f"{{{VCARD}}}PHOTO/{{{VCARD}}}TYPE") == "image/jpeg"
    # The same vCard again: nothing new to publish.
    await ask(alice, f"<iq type='set' id='v2'><vCard xmlns='{VCARD}'><FN>Alice L.</FN><PHOTO>"
                     f"<TYPE>image/jpeg</TYPE><BINVAL>{encoded}</BINVAL></PHOTO></vCard></iq>")
    # The photo removed: empty metadata.
    await ask(alice, f"<iq type='set' id='v3'><vCard xmlns='{VCARD}'><FN>Alice</FN></vCard></iq>")
    message = await next_event(bob)
    metadata = message.find(f".//{{{METADATA}}}metadata")
    assert metadata is not None and len(metadata) == 0
