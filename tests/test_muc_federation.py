"""Multi-User Chat over federation with real peers on loopback (XEP-0045 across servers):
users of a real Prosody 0.12 and of a real ejabberd 23.01 in rooms of ours (muc.a.test), and
our users in rooms of Prosody's MUC component and ejabberd's mod_muc.

Each peer starts once for the module (module-scoped fixtures on a module-scoped event loop), as
does our server; every test uses rooms of its own. Peers find us by their private hosts file
(Prosody) or our dnsmasq's SRV records (ejabberd); we find them by [s2s] routes. Streams with
ejabberd authenticate with certificates of one test CA (SASL EXTERNAL, XEP-0178), those with
Prosody (self-signed) with dialback (XEP-0220), the MUC service domains' as well. On CI a
missing peer is a failure, elsewhere a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from lxml import etree

from bench.peers import (
    CertificateAuthority,
    Certificates,
    EjabberdPeer,
    ProsodyPeer,
    make_ca,
    make_certificates,
)
from server.jid import JID
from server.modules.muc import Muc
from server.storage.base import AccountExists
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.process import free_ports
from tests.rawclient import CLIENT, RawClient
from tests.rawclient import condition as condition_of
from tests.test_interop import need, running
from tests.test_muc import MUC, USER, body, codes, is_subject
from tests.test_muc import item as item_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

OURS, OUR_MUC = "a.test", "muc.a.test"
OUR_HOST = "127.0.0.64"        # Prosody finds a.test and muc.a.test here, on port 5269
PROSODY, PROSODY_MUC, PROSODY_HOST = "prosody.test", "muc.prosody.test", "127.0.0.65"
EJABBERD, EJABBERD_MUC, EJABBERD_HOST = "ejabberd.test", "muc.ejabberd.test", "127.0.0.66"
OTHER, OTHER_MUC, OTHER_HOST = "c.test", "muc.c.test", "127.0.0.67"  # a server we stop
S2S_PORT = 5269

OWNER, ADMIN = MUC + "#owner", MUC + "#admin"
DELAY, MAM, FORWARD = "urn:xmpp:delay", "urn:xmpp:mam:2", "urn:xmpp:forward:0"
CARBONS = "urn:xmpp:carbons:2"
# The first stanza over a new s2s stream waits for TLS and authentication, both ways.
S2S_WAIT = 30.0

Match = Callable[[etree._Element], bool]


# -- stanzas -------------------------------------------------------------------------------------

def is_presence(stanza: etree._Element, sender: str | None = None,
                type_: str | None = None) -> bool:
    return (stanza.tag == f"{{{CLIENT}}}presence" and stanza.get("type") == type_
            and (sender is None or stanza.get("from") == sender))


def presence_from(sender: str, type_: str | None = None) -> Match:
    return lambda s: is_presence(s, sender, type_)


def groupchat(sender: str, text: str) -> Match:
    return lambda s: (s.tag == f"{{{CLIENT}}}message" and s.get("type") == "groupchat"
                      and s.get("from") == sender and body(s) == text)


def chat(sender: str, text: str) -> Match:
    return lambda s: (s.tag == f"{{{CLIENT}}}message" and s.get("from") == sender
                      and body(s) == text)


def iq_reply(id_: str) -> Match:
    return lambda s: s.tag == f"{{{CLIENT}}}iq" and s.get("id") == id_ and \
        s.get("type") in ("result", "error")


class Inbox:
    """A raw client's stanzas, kept until a test asks for them: stanzas over federation come
    over several streams, so one kind may overtake another (an occupant's presence and a room
    message arrive in the order the room sent them only when they share a stream)."""

    def __init__(self, client: RawClient, jid: str) -> None:
        self.client = client
        self.jid = jid
        self.bare = jid.split("/")[0]
        self.backlog: list[etree._Element] = []

    async def send(self, xml: str) -> None:
        await self.client.send(xml)

    async def _read(self, timeout: float) -> etree._Element:
        while True:
            stanza = await self.client.next(timeout)
            if stanza.tag == f"{{{CLIENT}}}iq" and stanza.get("type") == "set" and \
                    stanza.get("from") in (None, "", self.bare):
                # a roster push: acknowledge it (RFC 6121 §2.1.6)
                await self.client.send(f"<iq type='result' id='{stanza.get('id')}'/>")
                continue
            return stanza

    async def get(self, match: Match, timeout: float = 10.0) -> etree._Element:
        """The first stanza (kept or new) that matches."""
        for index, stanza in enumerate(self.backlog):
            if match(stanza):
                return self.backlog.pop(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"{self.jid}: nothing matched in {timeout} s; kept: "
                                     + " ".join(etree.tostring(s, encoding=str)
                                                for s in self.backlog[-6:]))
            try:
                stanza = await self._read(left)
            except TimeoutError:
                continue
            if match(stanza):
                return stanza
            self.backlog.append(stanza)

    async def until(self, match: Match, timeout: float = 10.0) -> list[etree._Element]:
        """Every stanza, in the order received, up to and including the first that matches
        (the backlog first)."""
        seen = []
        while self.backlog:
            stanza = self.backlog.pop(0)
            seen.append(stanza)
            if match(stanza):
                return seen
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                stanza = await self._read(max(deadline - loop.time(), 0.01))
            except TimeoutError:
                raise AssertionError(f"{self.jid}: nothing matched in {timeout} s; got: "
                                     + " ".join(etree.tostring(s, encoding=str)
                                                for s in seen[-6:])) from None
            seen.append(stanza)
            if match(stanza):
                return seen

    def backlog_matching(self, match: Match) -> list[etree._Element]:
        """Takes the kept stanzas that match, in order (what came before an answer)."""
        taken = [s for s in self.backlog if match(s)]
        self.backlog = [s for s in self.backlog if not match(s)]
        return taken

    async def ask(self, xml: str, id_: str, timeout: float = S2S_WAIT) -> etree._Element:
        await self.send(xml)
        return await self.get(iq_reply(id_), timeout)

    async def close(self) -> None:
        await self.client.close()


async def login(host: str, port: int, domain: str, user: str, resource: str) -> Inbox:
    client = await RawClient.connect(host, port)
    jid = await client.login(domain, user, PASSWORD, resource)
    await client.send("<presence/>")
    return Inbox(client, jid)


async def join(who: Inbox, occupant: str, history: str = "",
               timeout: float = S2S_WAIT) -> list[etree._Element]:
    """Joins room/nick; everything up to the subject that ends the join."""
    await who.send(f"<presence to='{occupant}'><x xmlns='{MUC}'>{history}</x></presence>")
    return await who.until(is_subject, timeout)


def self_presence(stanzas: list[etree._Element], occupant: str) -> etree._Element:
    """XEP-0045 §7.2.3: the joiner's own presence, with status 110."""
    for stanza in stanzas:
        if is_presence(stanza, occupant) and "110" in codes(stanza):
            return stanza
    raise AssertionError(f"no self-presence from {occupant} in " + " ".join(
        etree.tostring(s, encoding=str) for s in stanzas))


async def instant_room(owner: Inbox, room: str) -> None:
    """XEP-0045 §10.1.2: accept the default configuration (a locked new room opens)."""
    reply = await owner.ask(f"<iq type='set' to='{room}' id='instant'><query xmlns='{OWNER}'>"
                            "<x xmlns='jabber:x:data' type='submit'/></query></iq>", "instant")
    assert reply.get("type") == "result", etree.tostring(reply)


async def set_subject(who: Inbox, room: str, subject: str) -> None:
    await who.send(f"<message to='{room}' type='groupchat'><subject>{subject}</subject>"
                   "</message>")


# -- the servers ---------------------------------------------------------------------------------

class World:
    """Our server (a.test, muc.a.test) and the test CA that issued its certificate (ejabberd
    trusts it; Prosody does not, so that it uses dialback)."""

    def __init__(self, tmp: Path, ours: RunningServer, ca: CertificateAuthority) -> None:
        self.tmp = tmp
        self.ours = ours
        self.ca = ca
        self.c2s = ours.address("c2s")

    def methods(self, *remotes: str) -> dict[tuple[str, str], str]:
        """How our ready streams to those domains authenticated: (local, remote) -> method."""
        federation = self.ours.server.federation
        assert federation is not None
        return {(s.local, s.remote): s.negotiation.method for s in federation.outbound.values()
                if s.remote in remotes and s.ready and s.negotiation is not None}

    def occupants(self, room: str) -> list[str]:
        """The nicks in one of our rooms, as the MUC service has them."""
        muc = self.ours.server.modules["muc"]
        assert isinstance(muc, Muc)
        return [o.nick for o in muc.rooms[JID.parse(room)].occupants.values()]

    async def user(self, name: str, resource: str = "pc") -> Inbox:
        with contextlib.suppress(AccountExists):
            await self.ours.add_user(f"{name}@{OURS}")
        return await login(*self.c2s, OURS, name, resource)


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("muc-federation")


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    """The peers' ports on their own addresses (ours: s2s on 5269, which Prosody dials)."""
    prosody_c2s, prosody_s2s = free_ports(2, PROSODY_HOST)
    ejabberd_c2s, ejabberd_s2s = free_ports(2, EJABBERD_HOST)
    return {"prosody_c2s": prosody_c2s, "prosody_s2s": prosody_s2s,
            "ejabberd_c2s": ejabberd_c2s, "ejabberd_s2s": ejabberd_s2s}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_module: Path, ports: dict[str, int]) -> AsyncIterator[World]:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    ca = make_ca(tmp_module / "ca")
    certs = make_certificates(tmp_module / "ours-certs", [OURS, OUR_MUC], ca=ca)
    routes = {PROSODY: f"{PROSODY_HOST}:{ports['prosody_s2s']}",
              PROSODY_MUC: f"{PROSODY_HOST}:{ports['prosody_s2s']}",
              EJABBERD: f"{EJABBERD_HOST}:{ports['ejabberd_s2s']}",
              EJABBERD_MUC: f"{EJABBERD_HOST}:{ports['ejabberd_s2s']}"}
    s2s = ("[s2s]\nroutes = { " + ", ".join(f'"{d}" = "{a}"' for d, a in routes.items())
           + " }\nrequire_valid_certificates = false\n")  # dialback with Prosody
    ours = await start_server(tmp_module / "ours", s2s, domains=(OURS,), host=OUR_HOST,
                              s2s=f"{OUR_HOST}:{S2S_PORT}",
                              certificate=(certs.certificate, certs.key), ca_file=ca.certificate)
    try:
        yield World(tmp_module, ours, ca)
    finally:
        await stop_server(ours)


def muc_component(name: str, certs: Certificates) -> str:
    """Prosody's MUC with its archive (mod_muc_mam, XEP-0313 on the room JID); rooms archive
    by default."""
    return (f'Component "{name}" "muc"\n'
            f'  ssl = {{ certificate = "{certs.certificate}"; key = "{certs.key}" }}\n'
            '  modules_enabled = { "muc_mam" }\n'
            "  muc_log_by_default = true\n"
            "  muc_log_all_rooms = true\n")


@pytest.fixture(scope="module")
def prosody(world: World, ports: dict[str, int]) -> Iterator[ProsodyPeer]:
    """Self-signed, and not trusting our CA: Prosody and we authenticate each other with
    dialback (XEP-0220), for the MUC domains too (ejabberd uses certificates)."""
    need("prosody", "prosody lua-unbound")
    certs = make_certificates(world.tmp / "prosody-certs", [PROSODY, PROSODY_MUC])
    peer = ProsodyPeer(world.tmp / "prosody", host=PROSODY_HOST, domains=(PROSODY,),
                       c2s_port=ports["prosody_c2s"], s2s_port=ports["prosody_s2s"],
                       certificates=certs, dialback=True, s2s_secure_auth=False,
                       hosts={OURS: OUR_HOST, OUR_MUC: OUR_HOST, OTHER: OTHER_HOST,
                              OTHER_MUC: OTHER_HOST},
                       extra_config=muc_component(PROSODY_MUC, certs))
    for user in ("bob", "dave"):
        peer.register(user, PROSODY, PASSWORD)
    with running(peer) as started:
        assert isinstance(started, ProsodyPeer)
        yield started


@pytest.fixture(scope="module")
def ejabberd(world: World, ports: dict[str, int]) -> Iterator[EjabberdPeer]:
    need("ejabberdctl", "ejabberd")
    ca = world.ca
    certs = make_certificates(world.tmp / "ejabberd-certs", [EJABBERD, EJABBERD_MUC], ca=ca)
    peer = EjabberdPeer(host=EJABBERD_HOST, domains=(EJABBERD,),
                        c2s_port=ports["ejabberd_c2s"], s2s_port=ports["ejabberd_s2s"],
                        certificates=certs, cafile=ca.certificate,
                        dialback=False, s2s_use_starttls="required",
                        extra_modules={"mod_muc": {"host": "muc.@HOST@"}},
                        s2s_hosts={OURS: (OUR_HOST, S2S_PORT), OUR_MUC: (OUR_HOST, S2S_PORT)})
    with running(peer) as started:
        assert isinstance(started, EjabberdPeer)
        started.register("erin", EJABBERD, PASSWORD)
        yield started


async def prosody_user(ports: dict[str, int], name: str, resource: str = "pc") -> Inbox:
    return await login(PROSODY_HOST, ports["prosody_c2s"], PROSODY, name, resource)


async def ejabberd_user(ports: dict[str, int], name: str, resource: str = "pc") -> Inbox:
    return await login(EJABBERD_HOST, ports["ejabberd_c2s"], EJABBERD, name, resource)


# -- steps the scenarios share --------------------------------------------------------------------

async def open_room(owner: Inbox, room: str, nick: str, subject: str, said: str) -> None:
    """The owner makes the room (accepting the default configuration if it is locked, XEP-0045
    §10.1.2), sets its subject and says something, for the history."""
    got = await join(owner, f"{room}/{nick}")
    mine = self_presence(got, f"{room}/{nick}")
    assert "201" in codes(mine) and item_of(mine).get("affiliation") == "owner"
    await instant_room(owner, room)
    await set_subject(owner, room, subject)
    await owner.get(is_subject)
    await owner.send(f"<message to='{room}' type='groupchat'><body>{said}</body></message>")
    await owner.get(groupchat(f"{room}/{nick}", said))


async def enter(newcomer: Inbox, nick: str, room: str, host: Inbox, host_nick: str, said: str,
                subject: str) -> tuple[etree._Element, etree._Element]:
    """The newcomer joins the host's room: the host's presence, then its own with 110, then the
    history with <delay/>, then the subject (XEP-0045 §7.2.3, §7.2.14, §7.2.15); the host sees
    it come in. Returns (its self-presence, the presence the host got)."""
    got = await join(newcomer, f"{room}/{nick}")
    mine = self_presence(got, f"{room}/{nick}")
    assert mine.get("to") == newcomer.jid
    host_presence = next(s for s in got if is_presence(s, f"{room}/{host_nick}"))
    history = [s for s in got if body(s) == said]
    assert len(history) == 1 and history[0].get("from") == f"{room}/{host_nick}"
    delay = history[0].find(f"{{{DELAY}}}delay")
    assert delay is not None and delay.get("stamp")
    assert got.index(host_presence) < got.index(mine) < got.index(history[0])
    assert (got[-1].get("from"), got[-1].findtext(f"{{{CLIENT}}}subject")) == (
        f"{room}/{host_nick}", subject)
    return mine, await host.get(presence_from(f"{room}/{nick}"))


async def talk(a: Inbox, a_nick: str, b: Inbox, b_nick: str, room: str) -> None:
    """Groupchat both ways, from room/nick to everyone; private messages both ways
    (XEP-0045 §7.4, §7.5), from the sender's occupant JID to the other's real one."""
    for sender, nick, other in ((a, a_nick, b), (b, b_nick, a)):
        text = f"{nick} to all"
        await sender.send(f"<message to='{room}' type='groupchat'><body>{text}</body>"
                          "</message>")
        for who in (sender, other):
            await who.get(groupchat(f"{room}/{nick}", text), S2S_WAIT)
    for sender, nick, other, other_nick in ((a, a_nick, b, b_nick), (b, b_nick, a, a_nick)):
        text = f"{nick} to {other_nick} only"
        await sender.send(f"<message to='{room}/{other_nick}' type='chat'><body>{text}</body>"
                          "</message>")
        private = await other.get(chat(f"{room}/{nick}", text))
        assert private.get("to") == other.jid


async def kick(moderator: Inbox, room: str, nick: str, kicked: Inbox,
               reason: str = "testing") -> None:
    """XEP-0045 §8.2: the kicked occupant gets 307 with 110 and the reason; the moderator
    sees it go with 307."""
    reply = await moderator.ask(
        f"<iq type='set' to='{room}' id='kick'><query xmlns='{ADMIN}'><item nick='{nick}' "
        f"role='none'><reason>{reason}</reason></item></query></iq>", "kick")
    assert reply.get("type") == "result", etree.tostring(reply)
    gone = await kicked.get(presence_from(f"{room}/{nick}", "unavailable"))
    assert {"307", "110"} <= codes(gone)
    assert item_of(gone).findtext(f"{{{USER}}}reason") == reason
    assert "307" in codes(await moderator.get(presence_from(f"{room}/{nick}", "unavailable")))


async def visit(world: World, host: Inbox, room: str, host_nick: str,
                resource: str) -> Inbox:
    """A user of ours, Alice, in a room of another server where its user (the host) is the
    owner: made, entered, talked in. Returns Alice."""
    await open_room(host, room, host_nick, f"{room} subject", "said first")
    alice = await world.user("alice", resource)
    _mine, seen = await enter(alice, "Alice", room, host, host_nick, "said first",
                              f"{room} subject")
    assert item_of(seen).get("role") == "participant"
    await talk(alice, "Alice", host, host_nick, room)
    return alice


async def with_bob(world: World, ports: dict[str, int], room: str,
                   name: str) -> tuple[Inbox, Inbox]:
    """A user of ours (nick: the name, capitalised) and Prosody's Bob in a room of ours."""
    resource = room.partition("@")[0]
    ours = await world.user(name, resource)
    await join(ours, f"{room}/{name.capitalize()}")
    bob = await prosody_user(ports, "bob", resource)
    await join(bob, f"{room}/Bob")
    await ours.get(presence_from(f"{room}/Bob"))
    return ours, bob


async def leave_and_vanish(leaver: Inbox, nick: str, room: str, watcher: Inbox) -> None:
    """Back in (no history), out (XEP-0045 §7.14: its own unavailable with 110), back in, then
    its stream closes: its server tells the room (RFC 6121 §4.6.3) and the watcher sees it go."""
    got = await join(leaver, f"{room}/{nick}", "<history maxstanzas='0'/>")
    assert not [s for s in got if body(s) is not None]  # no history asked
    await watcher.get(presence_from(f"{room}/{nick}"))
    await leaver.send(f"<presence to='{room}/{nick}' type='unavailable'/>")
    assert "110" in codes(await leaver.get(presence_from(f"{room}/{nick}", "unavailable")))
    await watcher.get(presence_from(f"{room}/{nick}", "unavailable"))
    await join(leaver, f"{room}/{nick}", "<history maxstanzas='0'/>")
    await watcher.get(presence_from(f"{room}/{nick}"))
    await leaver.close()
    gone = await watcher.get(presence_from(f"{room}/{nick}", "unavailable"), S2S_WAIT)
    assert "110" not in codes(gone)


# -- a Prosody user in a room of ours ------------------------------------------------------------

async def test_prosody_user_in_our_room(world: World, prosody: ProsodyPeer,
                                        ports: dict[str, int]) -> None:
    room = f"lounge@{OUR_MUC}"
    alice = await world.user("alice")
    await open_room(alice, room, "Alice", "Federation", "before you came")
    bob = await prosody_user(ports, "bob")
    mine, seen = await enter(bob, "Bob", room, alice, "Alice", "before you came", "Federation")
    assert (item_of(mine).get("affiliation"), item_of(mine).get("role")) == (
        "none", "participant")
    assert item_of(seen).get("jid") == bob.jid  # Alice owns the room: a moderator sees JIDs
    await talk(bob, "Bob", alice, "Alice", room)
    # Markup and non-ASCII text cross both streams intact.
    text = "a &lt; b &amp;&amp; c &gt; d — ünïcødé ✓ 💬"
    await bob.send(f"<message to='{room}' type='groupchat'><body>{text}</body></message>")
    for who in (alice, bob):
        got = await who.get(lambda s: s.get("from") == f"{room}/Bob" and "ünïcødé" in (
            body(s) or ""))
        assert body(got) == "a < b && c > d — ünïcødé ✓ 💬"

    # The room archive (XEP-0313 on the room JID) holds Bob's messages; Bob asks for it
    # across federation.
    fin = await bob.ask(f"<iq type='set' to='{room}' id='mam1'><query xmlns='{MAM}' "
                        f"queryid='q1'/></iq>", "mam1")
    assert fin.get("type") == "result", etree.tostring(fin)
    results = bob.backlog_matching(lambda s: s.find(f"{{{MAM}}}result") is not None)
    assert {r.get("from") for r in results} == {room}
    archived = [(m.get("from"), body(m)) for r in results
                for m in r.iterfind(f"{{{MAM}}}result/{{{FORWARD}}}forwarded/{{{CLIENT}}}message")]
    assert (f"{room}/Bob", "Bob to all") in archived, archived
    assert (f"{room}/Alice", "Alice to all") in archived, archived

    # A nick change (XEP-0045 §7.6): unavailable with 303 and the new nick, then the new one.
    await bob.send(f"<presence to='{room}/Robert'/>")
    for who in (bob, alice):
        old = await who.get(presence_from(f"{room}/Bob", "unavailable"))
        assert "303" in codes(old) and item_of(old).get("nick") == "Robert"
        new = await who.get(presence_from(f"{room}/Robert"))
        assert ("110" in codes(new)) == (who is bob)
        assert ("110" in codes(old)) == (who is bob)
    await kick(alice, room, "Robert", bob)
    await leave_and_vanish(bob, "Bob", room, alice)
    await alice.close()
    # The room's own domain had a stream of its own to Prosody, authenticated by dialback.
    assert world.methods(PROSODY, PROSODY_MUC) == {(OUR_MUC, PROSODY): "dialback"}, \
        prosody.log_tail()


async def test_a_prosody_user_owns_a_room_of_ours(world: World, prosody: ProsodyPeer,
                                                  ports: dict[str, int]) -> None:
    """A remote user creates and configures one of our rooms, joins it from two resources,
    pings itself (XEP-0410) and answers an iq relayed through the room (XEP-0045 §7.5)."""
    room = f"garden@{OUR_MUC}"
    bob = await prosody_user(ports, "bob", "garden")
    got = await join(bob, f"{room}/Bob")
    mine = self_presence(got, f"{room}/Bob")
    assert "201" in codes(mine) and item_of(mine).get("affiliation") == "owner"
    # XEP-0045 §10.1.3: the owner configures the room across federation: non-anonymous.
    form = await bob.ask(f"<iq type='get' to='{room}' id='cfg1'><query xmlns='{OWNER}'/></iq>",
                         "cfg1")
    assert form.find(f"{{{OWNER}}}query/{{jabber:x:data}}x") is not None, etree.tostring(form)
    reply = await bob.ask(
        f"<iq type='set' to='{room}' id='cfg2'><query xmlns='{OWNER}'>"
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
        f"<value>{MUC}#roomconfig</value></field><field var='muc#roomconfig_whois'>"
        "<value>anyone</value></field><field var='muc#roomconfig_roomname'>"
        "<value>The garden</value></field></x></query></iq>", "cfg2")
    assert reply.get("type") == "result", etree.tostring(reply)
    await bob.get(lambda s: "172" in codes(s))  # now non-anonymous (§10.2.1)

    alice = await world.user("alice", "garden")
    got = await join(alice, f"{room}/Alice")
    assert "100" in codes(self_presence(got, f"{room}/Alice"))  # everyone sees real JIDs
    owner = next(s for s in got if is_presence(s, f"{room}/Bob"))
    assert item_of(owner).get("jid") == bob.jid
    await bob.get(presence_from(f"{room}/Alice"))
    info = await bob.ask(f"<iq type='get' to='{room}' id='info'><query "
                         "xmlns='http://jabber.org/protocol/disco#info'/></iq>", "info")
    identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None and identity.get("name") == "The garden"

    # A second session of Bob's under the same nick (XEP-0045 §7.2, multi-session): it gets
    # the room; Alice sees no new occupant; both of Bob's sessions get the room's messages.
    phone = await prosody_user(ports, "bob", "phone")
    got = await join(phone, f"{room}/Bob", "<history maxstanzas='0'/>")
    assert self_presence(got, f"{room}/Bob").get("to") == phone.jid
    await alice.send(f"<message to='{room}' type='groupchat'><body>to both</body></message>")
    for who in (bob, phone):
        await who.get(groupchat(f"{room}/Alice", "to both"))

    # XEP-0410: a ping to one's own occupant JID says one is still in.
    pong = await bob.ask(f"<iq type='get' to='{room}/Bob' id='self'><ping xmlns='urn:xmpp:ping'/>"
                         "</iq>", "self")
    assert pong.get("type") == "result", etree.tostring(pong)
    # An iq to an occupant goes to that occupant (its latest session), from the asker's
    # occupant JID; the answer comes back from the occupant JID.
    await alice.send(f"<iq type='get' to='{room}/Bob' id='ver'><query xmlns='jabber:iq:version'/>"
                     "</iq>")
    relayed = await phone.get(lambda s: s.tag == f"{{{CLIENT}}}iq" and s.get("type") == "get")
    assert relayed.get("from") == f"{room}/Alice"
    await phone.send(f"<iq type='result' to='{relayed.get('from')}' id='{relayed.get('id')}'>"
                     "<query xmlns='jabber:iq:version'><name>raw</name></query></iq>")
    answer = await alice.get(iq_reply("ver"), S2S_WAIT)
    assert (answer.get("type"), answer.get("from")) == ("result", f"{room}/Bob")
    assert answer.findtext(".//{jabber:iq:version}name") == "raw"

    # The owner destroys the room (XEP-0045 §10.9): every occupant hears of it.
    reply = await bob.ask(f"<iq type='set' to='{room}' id='destroy'><query xmlns='{OWNER}'>"
                          f"<destroy jid='elsewhere@{OUR_MUC}'><reason>done</reason></destroy>"
                          "</query></iq>", "destroy")
    assert reply.get("type") == "result", etree.tostring(reply)
    for who, nick in ((alice, "Alice"), (bob, "Bob"), (phone, "Bob")):
        gone = await who.get(presence_from(f"{room}/{nick}", "unavailable"))
        destroy = gone.find(f"{{{USER}}}x/{{{USER}}}destroy")
        assert destroy is not None and destroy.get("jid") == f"elsewhere@{OUR_MUC}"
    for who in (alice, bob, phone):
        await who.close()


async def test_our_room_refuses_bans_and_invites_prosody_users(
        world: World, prosody: ProsodyPeer, ports: dict[str, int]) -> None:
    room = f"court@{OUR_MUC}"
    alice, bob = await with_bob(world, ports, room, "alice")
    dave = await prosody_user(ports, "dave", "court")
    # Nick conflict (XEP-0045 §7.2.9): an error presence reaches the remote user.
    await dave.send(f"<presence to='{room}/Bob'><x xmlns='{MUC}'/></presence>")
    refused = await dave.get(presence_from(f"{room}/Bob", "error"), S2S_WAIT)
    assert condition_of(refused) == "conflict"
    # A mediated invitation to a remote user, and the decline (XEP-0045 §7.8.2, §7.8.3).
    await alice.send(f"<message to='{room}'><x xmlns='{USER}'><invite to='dave@{PROSODY}'>"
                     "<reason>come in</reason></invite></x></message>")
    invitation = await dave.get(lambda s: s.find(f"{{{USER}}}x/{{{USER}}}invite") is not None)
    assert invitation.get("from") == room
    invite = invitation.find(f"{{{USER}}}x/{{{USER}}}invite")
    # XEP-0045 §7.8.2: the inviter's bare, full or occupant JID
    assert invite is not None and invite.get("from") in (
        f"alice@{OURS}", alice.jid, f"{room}/Alice"), etree.tostring(invite)
    await dave.send(f"<message to='{room}'><x xmlns='{USER}'><decline to='alice@{OURS}'>"
                    "<reason>busy</reason></decline></x></message>")
    declined = await alice.get(lambda s: s.find(f"{{{USER}}}x/{{{USER}}}decline") is not None,
                               S2S_WAIT)
    decline = declined.find(f"{{{USER}}}x/{{{USER}}}decline")
    assert decline is not None and decline.get("from") == f"dave@{PROSODY}"
    # A ban (XEP-0045 §9.1): 301 to the remote occupant; coming back is forbidden.
    reply = await alice.ask(f"<iq type='set' to='{room}' id='ban'><query xmlns='{ADMIN}'>"
                            f"<item affiliation='outcast' jid='bob@{PROSODY}'/></query></iq>",
                            "ban")
    assert reply.get("type") == "result", etree.tostring(reply)
    banned = await bob.get(presence_from(f"{room}/Bob", "unavailable"))
    assert {"301", "110"} <= codes(banned)
    assert "301" in codes(await alice.get(presence_from(f"{room}/Bob", "unavailable")))
    await bob.send(f"<presence to='{room}/Bob'><x xmlns='{MUC}'/></presence>")
    refused = await bob.get(presence_from(f"{room}/Bob", "error"))
    assert condition_of(refused) == "forbidden"
    # Errors come back across federation, from the room (RFC 6120 §8.3): a self-ping when
    # out (XEP-0410 §4.1), a message from a non-occupant, a room that does not exist.
    out = await bob.ask(f"<iq type='get' to='{room}/Bob' id='ping'><ping xmlns='urn:xmpp:ping'/>"
                        "</iq>", "ping")
    assert (out.get("from"), condition_of(out)) == (f"{room}/Bob", "not-acceptable")
    await bob.send(f"<message to='{room}' type='groupchat' id='g1'><body>let me in</body>"
                   "</message>")
    bounced = await bob.get(lambda s: s.get("id") == "g1")
    assert (bounced.get("from"), bounced.get("type")) == (room, "error")
    await bob.send(f"<message to='nowhere@{OUR_MUC}' type='groupchat' id='g2'><body>hello?"
                   "</body></message>")
    bounced = await bob.get(lambda s: s.get("id") == "g2")
    assert condition_of(bounced) == "item-not-found"
    for who in (alice, bob, dave):
        await who.close()


# -- a user of ours in a room of Prosody's MUC ---------------------------------------------------

async def test_our_user_in_a_prosody_room(world: World, prosody: ProsodyPeer,
                                          ports: dict[str, int]) -> None:
    room = f"kitchen@{PROSODY_MUC}"
    bob = await prosody_user(ports, "bob", "kitchen")
    # Alice's other device has Message Carbons on (XEP-0280): what the room sends her is not
    # copied to it (§6: not private messages from occupants, which Prosody marks with
    # <x xmlns='…muc#user'/>, nor group chat). What she sends is, as Prosody does.
    other = await world.user("alice", "other")
    enabled = await other.ask("<iq type='set' id='carbons'><enable xmlns='urn:xmpp:carbons:2'/>"
                              "</iq>", "carbons")
    assert enabled.get("type") == "result", etree.tostring(enabled)
    alice = await visit(world, bob, room, "Bob", "kitchen")
    await alice.send(f"<message to='bob@{PROSODY}' type='chat'><body>carbon check</body>"
                     "</message>")
    await bob.get(chat(alice.jid, "carbon check"))
    await other.get(lambda s: s.findtext(f".//{{{CARBONS}}}sent//{{{CLIENT}}}body")
                    == "carbon check")
    received = other.backlog_matching(lambda s: s.find(f"{{{CARBONS}}}received") is not None)
    assert not received, [etree.tostring(m) for m in received]
    # XEP-0410: our user asks Prosody's room whether she is still in.
    pong = await alice.ask(f"<iq type='get' to='{room}/Alice' id='self'>"
                           "<ping xmlns='urn:xmpp:ping'/></iq>", "self")
    assert (pong.get("type"), pong.get("from")) == ("result", f"{room}/Alice")
    # The room's archive (Prosody's muc_mam), asked for across federation.
    fin = await alice.ask(f"<iq type='set' to='{room}' id='mam'><query xmlns='{MAM}' "
                          "queryid='k'/></iq>", "mam")
    assert fin.get("type") == "result", etree.tostring(fin)
    archived = [(m.get("from"), body(m)) for r in alice.backlog_matching(
        lambda s: s.find(f"{{{MAM}}}result") is not None)
        for m in r.iterfind(f".//{{{FORWARD}}}forwarded/{{{CLIENT}}}message")]
    assert (f"{room}/Alice", "Alice to all") in archived, archived

    # A new subject reaches our user (XEP-0045 §8.1).
    await set_subject(bob, room, "Dessert")
    subject = await alice.get(is_subject)
    assert (subject.get("from"), subject.findtext(f"{{{CLIENT}}}subject")) == (
        f"{room}/Bob", "Dessert")
    # Prosody's owner kicks her, then invites her back through the room (§7.8.2).
    await kick(bob, room, "Alice", alice)
    await bob.send(f"<message to='{room}'><x xmlns='{USER}'><invite to='alice@{OURS}'>"
                   "<reason>sorry</reason></invite></x></message>")
    invitation = await alice.get(lambda s: s.find(f"{{{USER}}}x/{{{USER}}}invite") is not None)
    assert invitation.get("from") == room
    invite = invitation.find(f"{{{USER}}}x/{{{USER}}}invite")
    # (Prosody names the inviter by occupant JID in a semi-anonymous room)
    assert invite is not None and invite.get("from") in (f"{room}/Bob", f"bob@{PROSODY}")
    await leave_and_vanish(alice, "Alice", room, bob)
    await bob.close()


async def test_our_shutdown_tells_remote_occupants(world: World, prosody: ProsodyPeer,
                                                   ports: dict[str, int]) -> None:
    """A graceful stop tells every occupant, Prosody's too, that the service goes away
    (XEP-0045 status 332) before the streams close: none stays in a room that is gone."""
    certs = make_certificates(world.tmp / "other-certs", [OTHER, OTHER_MUC],
                              ca=world.ca)
    routes = "".join(f'"{d}" = "{PROSODY_HOST}:{ports["prosody_s2s"]}", '
                     for d in (PROSODY, PROSODY_MUC))
    other = await start_server(world.tmp / "other", f"[s2s]\nroutes = {{ {routes[:-2]} }}\n",
                               domains=(OTHER,), host=OTHER_HOST, s2s=f"{OTHER_HOST}:{S2S_PORT}",
                               certificate=(certs.certificate, certs.key),
                               ca_file=world.ca.certificate)
    room = f"cellar@{OTHER_MUC}"
    try:
        await other.add_user(f"carol@{OTHER}")
        carol = await login(*other.address("c2s"), OTHER, "carol", "cellar")
        await join(carol, f"{room}/Carol")
        bob = await prosody_user(ports, "bob", "cellar")
        await join(bob, f"{room}/Bob")
        await carol.get(presence_from(f"{room}/Bob"))
        # Directed presence to Bob himself, and Carol in a room of Prosody's: her going
        # offline ends both (RFC 6121 §4.6.3).
        await carol.send(f"<presence to='{bob.jid}'/>")
        await bob.get(presence_from(carol.jid))
        theirs = f"porch@{PROSODY_MUC}"
        await open_room(bob, theirs, "Bob", "on the porch", "hi")
        await join(carol, f"{theirs}/Carol")
        await bob.get(presence_from(f"{theirs}/Carol"))
    finally:
        await stop_server(other)
    for nick in ("Carol", "Bob"):
        gone = await bob.get(presence_from(f"{room}/{nick}", "unavailable"))
        assert "332" in codes(gone), etree.tostring(gone)
    await bob.get(presence_from(carol.jid, "unavailable"))
    await bob.get(presence_from(f"{theirs}/Carol", "unavailable"))
    await bob.close()


async def test_a_vanished_peer_leaves_no_ghosts(world: World, prosody: ProsodyPeer,
                                               ports: dict[str, int]) -> None:
    """Prosody dies without a word: what the room sends its occupant comes back as
    remote-server-not-found (RFC 6120 §8.3.3), and the room lets the ghost go with status 333
    (XEP-0045: an occupant is removed after a delivery error). Last of the Prosody tests: it
    starts Prosody again afterwards."""
    room = f"attic@{OUR_MUC}"
    carol, _bob = await with_bob(world, ports, room, "carol")
    prosody._kill()
    try:
        # Our stream from the room's domain sees the peer go (else the next stanza would go
        # into a dead connection, lost with it).
        federation = world.ours.server.federation
        assert federation is not None
        for _ in range(100):
            if not any(remote == PROSODY for _local, remote in federation.outbound):
                break
            await asyncio.sleep(0.05)
        await carol.send(f"<message to='{room}' type='groupchat'><body>anyone?</body>"
                         "</message>")
        await carol.get(groupchat(f"{room}/Carol", "anyone?"))
        gone = await carol.get(presence_from(f"{room}/Bob", "unavailable"), S2S_WAIT)
        assert "333" in codes(gone), etree.tostring(gone)
        assert world.occupants(room) == ["Carol"]
    finally:
        await asyncio.to_thread(prosody.restart)
    await carol.close()


# -- ejabberd's users in a room of ours, ours in a room of ejabberd's mod_muc --------------------

async def test_ejabberd_user_in_our_room(world: World, ejabberd: EjabberdPeer,
                                         ports: dict[str, int]) -> None:
    room = f"deck@{OUR_MUC}"
    alice = await world.user("alice", "deck")
    await open_room(alice, room, "Alice", "Sailing", "ahoy")
    erin = await ejabberd_user(ports, "erin")
    _mine, seen = await enter(erin, "Erin", room, alice, "Alice", "ahoy", "Sailing")
    assert item_of(seen).get("jid") == erin.jid
    await talk(erin, "Erin", alice, "Alice", room)
    await kick(alice, room, "Erin", erin)
    await leave_and_vanish(erin, "Erin", room, alice)
    await alice.close()


async def test_our_user_in_an_ejabberd_room(world: World, ejabberd: EjabberdPeer,
                                            ports: dict[str, int]) -> None:
    room = f"hall@{EJABBERD_MUC}"
    erin = await ejabberd_user(ports, "erin", "hall")
    alice = await visit(world, erin, room, "Erin", "hall")
    await kick(erin, room, "Alice", alice)
    await leave_and_vanish(alice, "Alice", room, erin)
    await erin.close()
    # Our user domain to their MUC domain, our MUC domain to their user domain, each with
    # certificates (XEP-0178).
    assert world.methods(EJABBERD, EJABBERD_MUC) == {
        (OURS, EJABBERD_MUC): "sasl-external", (OUR_MUC, EJABBERD): "sasl-external"}, \
        ejabberd.log_tail()
