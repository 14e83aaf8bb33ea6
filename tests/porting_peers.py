"""Populate a real Prosody 0.12 or ejabberd 23.01 over c2s with slixmpp, then export it to
XEP-0227 with the peer's own tool (``prosody-migrator``, ``ejabberdctl export_piefxis``).

Used by tests/test_porting_interop.py (one fixture per peer); runnable by hand to look at an
export: ``python -m tests.porting_peers prosody|ejabberd OUTDIR``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import logging
import shutil
import ssl
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import slixmpp

from bench.peers import EjabberdPeer, Peer, ProsodyPeer

PASSWORD = "old-secret-1"
PROSODY, PROSODY_HOST = "old-prosody.test", "127.0.0.87"
PROSODY_DATA = Path("/var/lib/prosody")  # prosody-migrator's CFG_DATADIR
EJABBERD, EJABBERD_HOST = "old-ejabberd.test", "127.0.0.88"

# A 1×1 PNG: the avatar, both as vCard PHOTO (XEP-0153) and XEP-0084 data.
AVATAR = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5Er"
    "kJggg==")
AVATAR_ID = hashlib.sha1(AVATAR).hexdigest()
OMEMO_DEVICE = "1234567"
PRIVATE_NS = "urn:example:porting"


async def login(host: str, jid: str, password: str = PASSWORD, *, port: int = 5222,
                presence: bool = True, plugins: tuple[str, ...] = (),
                failed: list[str] | None = None) -> slixmpp.ClientXMPP:
    """A logged-in slixmpp client with its default choice of mechanism (the best offered);
    failed collects the mechanisms that failed before one succeeded."""
    xmpp = slixmpp.ClientXMPP(f"{jid}/populate", password)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    xmpp.ssl_context = ctx
    xmpp.enable_direct_tls = False
    xmpp.enable_starttls = True
    for plugin in plugins:
        xmpp.register_plugin(plugin)
    tried = failed if failed is not None else []
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def session_start(_event: object) -> None:
        if presence:
            xmpp.send_presence()
        if not started.done():
            started.set_result(None)

    def give_up(event: object) -> None:
        if not started.done():
            started.set_exception(AssertionError(f"{jid}: no login: {event} (tried {tried})"))

    xmpp.add_event_handler("session_start", session_start)
    xmpp.add_event_handler("failed_auth",
                           lambda _e: tried.append(xmpp.plugin["feature_mechanisms"].mech.name))
    xmpp.add_event_handler("connection_failed", give_up)
    xmpp.add_event_handler("failed_all_auth", give_up)
    xmpp.connect(host, port)
    await asyncio.wait_for(started, 20)
    return xmpp


async def iq(xmpp: slixmpp.ClientXMPP, kind: str, payload: str, to: str | None = None) -> Any:
    request = xmpp.make_iq(ito=to, itype=kind)
    request.append(ET.fromstring(payload))
    return await request.send(timeout=10)


async def disconnect(xmpp: slixmpp.ClientXMPP) -> None:
    xmpp.disconnect(wait=1)
    await asyncio.sleep(0.3)


# ejabberd 23.01 refuses pubsub#max_items among publish-options (resource-constraint).
MAX_ITEMS_OPTION = ("<field var='pubsub#max_items'><value>max</value></field>")


def _publish(node: str, item_id: str, payload: str, access: str = "open",
             max_items: bool = True) -> str:
    return (f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'>"
            f"<item id='{item_id}'>{payload}</item></publish>"
            "<publish-options><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE' type='hidden'>"
            "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
            f"<field var='pubsub#access_model'><value>{access}</value></field>"
            "<field var='pubsub#persist_items'><value>true</value></field>"
            f"{MAX_ITEMS_OPTION if max_items else ''}</x></publish-options></pubsub>")


async def populate(host: str, domain: str, *, bookmarks_pep: bool = True,
                   max_items: bool = True) -> None:
    """alice and bob (roster 'both', group Friends), carol's request pending at alice, alice's
    vCard with a photo, her bookmarks, a private XML item, PEP avatar and OMEMO device list and
    bundle, two archived chat messages, and a message for dave (offline)."""
    alice, bob = f"alice@{domain}", f"bob@{domain}"
    a = await login(host, alice)
    b = await login(host, bob)
    await iq(a, "set", "<query xmlns='jabber:iq:roster'>"
                       f"<item jid='{bob}' name='Bob B.'><group>Friends</group>"
                       "<group>Work</group></item></query>")
    a.send_presence(pto=bob, ptype="subscribe")  # bob's slixmpp accepts and asks back
    await asyncio.sleep(1.0)
    photo = base64.b64encode(AVATAR).decode()
    await iq(a, "set", "<vCard xmlns='vcard-temp'><FN>Alice Liddell</FN><NICKNAME>ali"
                       f"</NICKNAME><PHOTO><TYPE>image/png</TYPE><BINVAL>{photo}</BINVAL>"
                       "</PHOTO></vCard>")
    await iq(a, "set", "<query xmlns='jabber:iq:private'>"
                       f"<note xmlns='{PRIVATE_NS}'>remember the milk</note></query>")
    if bookmarks_pep:
        await iq(a, "set", _publish(
            "urn:xmpp:bookmarks:1", "tea@conference.example.org",
            "<conference xmlns='urn:xmpp:bookmarks:1' name='Tea' autojoin='true'>"
            "<nick>ali</nick></conference>", access="whitelist"))
    else:
        await iq(a, "set", "<query xmlns='jabber:iq:private'>"
                           "<storage xmlns='storage:bookmarks'>"
                           "<conference jid='tea@conference.example.org' name='Tea' "
                           "autojoin='true'><nick>ali</nick></conference></storage></query>")
    # PEP: an avatar (XEP-0084), an OMEMO device list and bundle (XEP-0384).
    for node, item_id, payload in (
            ("urn:xmpp:avatar:data", AVATAR_ID,
             f"<data xmlns='urn:xmpp:avatar:data'>{photo}</data>"),
            ("urn:xmpp:avatar:metadata", AVATAR_ID,
             "<metadata xmlns='urn:xmpp:avatar:metadata'>"
             f"<info id='{AVATAR_ID}' bytes='{len(AVATAR)}' type='image/png' width='1' "
             "height='1'/></metadata>"),
            ("eu.siacs.conversations.axolotl.devicelist", "current",
             "<list xmlns='eu.siacs.conversations.axolotl'>"
             f"<device id='{OMEMO_DEVICE}'/></list>"),
            (f"eu.siacs.conversations.axolotl.bundles:{OMEMO_DEVICE}", "current",
             "<bundle xmlns='eu.siacs.conversations.axolotl'>"
             "<signedPreKeyPublic signedPreKeyId='1'>BQ==</signedPreKeyPublic>"
             "<signedPreKeySignature>AA==</signedPreKeySignature><identityKey>BQ==</identityKey>"
             "<prekeys><preKeyPublic preKeyId='1'>BQ==</preKeyPublic></prekeys></bundle>")):
        await iq(a, "set", _publish(node, item_id, payload, max_items=max_items))
    a.send_message(mto=bob, mbody="hello bob, see you at tea", mtype="chat")
    await asyncio.sleep(0.5)
    b.send_message(mto=alice, mbody="hi alice, I'll bring scones", mtype="chat")
    await asyncio.sleep(0.5)
    b.send_message(mto=f"dave@{domain}", mbody="dave, you missed tea", mtype="chat")
    await asyncio.sleep(0.5)
    await disconnect(a)
    await disconnect(b)
    c = await login(host, f"carol@{domain}")  # alice is away: the request waits for her
    c.send_presence(pto=alice, ptype="subscribe")
    await asyncio.sleep(0.5)
    await disconnect(c)


ACCOUNTS = ("alice", "bob", "carol", "dave")


# The stores of prosody-migrator's xep0227 driver in 0.12 (not offline: unsupported-datastore).
_STORES = ", ".join(f'"{s}"' for s in ("accounts", "roster", "vcard", "private",
                                        "archive-archive", "pep-pubsub"))


# Back into Prosody: not the archive, whose host-level pass (user nil) fails in 0.12's migrator
# with xep0227 as input ("no 227 user element found"), before any user's archive.
_BACK_STORES = ", ".join(f'"{s}"' for s in ("accounts", "roster", "vcard", "private",
                                             "pep-pubsub"))


def prosody_peer(workdir: Path) -> ProsodyPeer:
    return ProsodyPeer(
        workdir, host=PROSODY_HOST, domains=(PROSODY,), c2s_port=5222, dialback=False,
        extra_modules=("pep", "private", "vcard", "bookmarks", "mam", "offline"),
        extra_config="default_archive_policy = true\narchive_expires_after = \"never\"")


def prosody_export(peer: ProsodyPeer, out: Path) -> list[Path]:
    """prosody-migrator's xep0227 driver: one <user>@<host>.xml per account. It writes them into
    Debian's data directory (CFG_DATADIR, /var/lib/prosody) whatever the output path says
    (INTEROP.md), so they are moved to out afterwards (our domain name is ours alone). Offline messages are not among its stores (0.12: unsupported-datastore)."""
    config = peer.workdir / "migrator.cfg.lua"
    config.write_text(
        f'input {{ hosts = {{ ["{PROSODY}"] = {{ {_STORES} }} }}; type = "internal"; '
        f'path = "{peer.data_path}"; }}\n'
        f'output {{ type = "xep0227"; path = "{out}"; }}\n')
    # It drops root for the prosody user: that user must own the data (INTEROP.md), and reach
    # it (so workdir sits in a directory others may traverse, such as /tmp).
    subprocess.run(["chown", "-R", "prosody:prosody", str(peer.workdir)], check=True)
    for stale in PROSODY_DATA.glob(f"*@{PROSODY}.xml"):  # of an earlier run
        stale.unlink()
    done = subprocess.run(["prosody-migrator", "--config", str(config), "input", "output"],
                          capture_output=True, text=True, timeout=120, cwd=peer.workdir)
    if done.returncode != 0:
        raise AssertionError(f"prosody-migrator: {done.stdout}{done.stderr}")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for written in sorted(PROSODY_DATA.glob(f"*@{PROSODY}.xml")):
        files.append(Path(shutil.move(str(written), out / written.name)))
    if not files:
        raise AssertionError(f"prosody-migrator wrote no file: {done.stdout}{done.stderr}")
    return files


def prosody_import(peer: ProsodyPeer, files: list[Path]) -> None:
    """The other way: prosody-migrator from xep0227 files (presenced's export, one per
    account) into the peer's internal storage, before it starts. Its xep0227 driver reads them
    from Debian's data directory only."""
    for stale in PROSODY_DATA.glob(f"*@{PROSODY}.xml"):
        stale.unlink()
    for file in files:
        shutil.copy(file, PROSODY_DATA / file.name)
    config = peer.workdir / "import.cfg.lua"
    config.write_text(
        f'input {{ hosts = {{ ["{PROSODY}"] = {{ {_BACK_STORES} }} }}; type = "xep0227"; }}\n'
        f'output {{ type = "internal"; path = "{peer.data_path}"; }}\n')
    subprocess.run(["chown", "-R", "prosody:prosody", str(peer.workdir)], check=True)
    try:
        done = subprocess.run(["prosody-migrator", "--config", str(config), "input", "output"],
                              capture_output=True, text=True, timeout=120, cwd=peer.workdir)
    finally:
        for file in files:
            (PROSODY_DATA / file.name).unlink(missing_ok=True)
    if done.returncode != 0 or "error" in done.stdout + done.stderr:
        raise AssertionError(f"prosody-migrator: {done.stdout}{done.stderr}")


def ejabberd_peer() -> EjabberdPeer:
    return EjabberdPeer(
        host=EJABBERD_HOST, domains=(EJABBERD,), c2s_port=5222,
        extra_modules={"mod_offline": {}, "mod_vcard": {}, "mod_private": {},
                       "mod_mam": {"default": "always"},
                       "mod_pubsub": {"plugins": ["flat", "pep"]}})


def ejabberd_export(peer: EjabberdPeer, out: Path) -> list[Path]:
    """``ejabberdctl export_piefxis DIR``: an index file and one file per host."""
    target = peer.workdir / "export"
    target.mkdir(exist_ok=True)
    shutil.chown(target, "ejabberd", "ejabberd")
    peer.ctl("export_piefxis", str(target))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for written in sorted(target.iterdir()):
        files.append(Path(shutil.copy(written, out / written.name)))
    if not files:
        raise AssertionError("export_piefxis wrote no file")
    return files


def make_prosody_export(workdir: Path, out: Path) -> list[Path]:
    peer = prosody_peer(workdir)
    for user in ACCOUNTS:
        peer.register(user, PROSODY, PASSWORD)
    peer.start()
    try:
        asyncio.run(populate(PROSODY_HOST, PROSODY))
    finally:
        peer.stop()
    return prosody_export(peer, out)


def make_ejabberd_export(out: Path) -> list[Path]:
    peer: Peer = ejabberd_peer()
    assert isinstance(peer, EjabberdPeer)
    peer.start()
    try:
        # ejabberdctl takes seconds per call on a busy machine: the four at once.
        with concurrent.futures.ThreadPoolExecutor(len(ACCOUNTS)) as pool:
            list(pool.map(lambda user: peer.register(user, EJABBERD, PASSWORD), ACCOUNTS))
        asyncio.run(populate(EJABBERD_HOST, EJABBERD, bookmarks_pep=False, max_items=False))
        return ejabberd_export(peer, out)
    finally:
        peer.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    kind, target = sys.argv[1], Path(sys.argv[2]).resolve()
    if kind == "prosody":
        print(make_prosody_export(target / "prosody-work", target / "prosody"))
    else:
        print(make_ejabberd_export(target / "ejabberd"))
