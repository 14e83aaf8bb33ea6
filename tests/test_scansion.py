"""The scansion runner (tests/scansion.py): its parser and matcher, and Prosody's own scansion
scripts (spec/scansion of Debian's prosody 13.0.1 source) played against presenced.

Every one of the 50 scripts is in one list. Scripts that pass are in PASSING. One that cannot
pass is in PROSODY_SPECIFIC (its first mismatch is a choice the XEP/RFC leaves open, which
Prosody's script hard-codes), KNOWN_BUGS (presenced is wrong) or RUNNER_LIMITS (the runner's
reading of scansion is the question): each entry names the script line of the action that fails
first, and a test checks that it still fails there, so that the lists cannot rot. A change to
presenced that makes such a test fail moves the script: to PASSING, or to the line it now fails
at, with the reason (`python -m tests.scansion NAME` shows it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from lxml import etree

from tests import scansion
from tests.scansion import Script, ScriptError, match, parse, parse_stanzas, substitute

in_loop = pytest.mark.asyncio(loop_scope="module")

PASSING = ("basic", "basic_message", "basic_roster", "bookmarks2", "disco_self",
           "empty_bookmarks", "issue1224", "issue505", "issue978-multi", "keep_full_sub_req",
           "lastactivity", "mam_prefs_prep", "muc_affiliation_notify", "muc_mediated_invite",
           "muc_members_only_change", "muc_members_only_deregister", "muc_nickname_change",
           "muc_password", "muc_presence_probe", "muc_subject_issue_667",
           "muc_whois_anyone_member", "pep_nickname", "pep_pubsub_max", "pubsub_basic",
           "pubsub_config", "pubsub_createdelete", "pubsub_max_items", "pubsub_multi_items",
           "pubsub_resend_on_sub", "uptime", "vcard_temp")

_ROSTER_VER = ("RFC 6121 §2.6: roster versions are opaque strings; Prosody's empty roster "
               "is ver '1' (presenced: '0') and the script hard-codes Prosody's numbers")
_ACK_UNAVAILABLE = ("Prosody answers an inbound subscription request with an 'unavailable' "
                    "presence 'acknowledging receipt'; RFC 6121 §3.1.3 asks for no such stanza")

# script -> (lines of the action allowed to fail first, the reason)
PROSODY_SPECIFIC: dict[str, tuple[tuple[int, ...], str]] = {
    "blocking": ((34,), _ACK_UNAVAILABLE),
    "issue1121": ((32,), _ACK_UNAVAILABLE),
    "pep_itemreply": ((39,), _ROSTER_VER),
    "pep_publish_subscribe": ((35,), _ROSTER_VER),
    "extdisco": ((16,), "XEP-0215 (external services) is not served: optional"),
    "http_upload": ((16,), "XEP-0363 §5 orders no <get/> and <put/> in the slot (Prosody: get "
                           "first; the XEP's example: put first) and the <slot/> is strict"),
    "server_contact_info": ((19,), "XEP-0157 contact addresses are configuration "
                                   "(prosody.cfg.lua's contact_info); presenced has none"),
    "tombstones": ((34,), "mod_tombstones (Prosody's own: deleted accounts bounce presence "
                          "with an error); no XEP"),
    "version": ((18,), "XEP-0092 §2: <name/> is the software's own name ('Prosody')"),
    "presence_preapproval": ((55,), "the roster push (subscription 'to') comes before the "
                                    "'subscribed' presence; RFC 6121 §3.1.6 asks for both, in "
                                    "no wire order"),
    "pubsub_advanced": ((26,), "XEP-0060 §8.1.1 lets a service restrict node creation; "
                               "Prosody's config lets only admins create, presenced any local "
                               "user"),
    "pubsub_preconditions": ((260,), "RFC 6120 §8.3.2: the error <text/> SHOULD have xml:lang "
                                     "(presenced sets it, Prosody not; the <text/> is strict)"),
    "muc_create_destroy": ((24,), "Prosody's vcard_legacy adds <x xmlns='vcard-temp:x:update'>"
                                  " to presence the client sent without it (XEP-0153 §3.2 "
                                  "leaves that to the server)"),
    "muc_nickname_robotface": ((39,), "RFC 7622 §3.4 (PRECIS) keeps U+FE0F in a resource; "
                                      "Prosody's stringprep maps it to nothing (RFC 3454 B.1)"),
    "mam_extended": ((97,), "XEP-0203 stamps: Prosody's have whole seconds, so the script's "
                            "flipped page expects the second message with the first one's "
                            "stamp (capture:start); presenced's have microseconds"),
    "muc_outcast_reason": ((39,), "the message telling occupants of a non-occupant's ban: "
                                  "Prosody adds status 301 and the <reason/>; XEP-0045 §9.1 "
                                  "asks that of the banned occupant's presence (to check)"),
}

# script -> (lines, the presenced bug)
KNOWN_BUGS: dict[str, tuple[tuple[int, ...], str]] = {}

# script -> (lines, why the runner cannot tell): our reading of scansion may be what fails.
_TIMING = ("real scansion drops stanzas nobody waits for by timing we do not reproduce: here "
           "Romeo gets {}, which the script never expects, and sends nothing before his next "
           "receive (Debian's Prosody 0.12 fails here the same way)")
RUNNER_LIMITS: dict[str, tuple[tuple[int, ...], str]] = {
    "muc_register": ((199,), _TIMING.format("Juliet's unavailable presence")),
    "muc_show_offline": ((204,), _TIMING.format("Juliet's unavailable presence")),
    "issue978": ((67,), _TIMING.format("the 104/172 message of the whois change (XEP-0045 "
                                       "§10.2.1 asks for 172)")),
}


# -- the parser --------------------------------------------------------------------------------

SAMPLE = """\
# A title
## tag: value

[Client] Romeo
\tjid: romeo@localhost/balcony
\tpassword: password

[Client] Juliet's phone
\tjid: juliet@localhost
\tpassword: pw
\tresource: mobile

-----
-- a comment
// another
Romeo connects

# a comment between actions
Romeo sends
\t<presence/>

\t<message to="${Juliet's phone's full JID}"><body>hi &amp; bye</body></message>

Juliet's phone receives: nothing

Juliet's phone receives:
\t<message from="${Romeo's JID}"/>

Romeo disconnects
"""


def test_parse_clients_and_actions() -> None:
    script = parse(SAMPLE, "sample")
    assert script.title == "A title"
    assert script.tags == ["tag: value"]
    assert list(script.clients) == ["Romeo", "Juliet's phone"]
    romeo, phone = script.clients["Romeo"], script.clients["Juliet's phone"]
    assert (romeo.bare, romeo.bind_resource, romeo.password) == ("romeo@localhost", "balcony",
                                                                 "password")
    assert (phone.bare, phone.bind_resource) == ("juliet@localhost", "mobile")
    assert [(a.client, a.verb, a.nothing, a.line) for a in script.actions] == [
        ("Romeo", "connects", False, 16), ("Romeo", "sends", False, 19),
        ("Juliet's phone", "receives", True, 24), ("Juliet's phone", "receives", False, 26),
        ("Romeo", "disconnects", False, 29)]
    # a block runs to the next unindented line, blank lines included: two stanzas
    full = {"Juliet's phone": "juliet@localhost/mobile"}
    sent = parse_stanzas(substitute(script.actions[1].block, full, script.clients))
    assert [etree.QName(s).localname for s in sent] == ["presence", "message"]
    assert sent[1].get("to") == "juliet@localhost/mobile"
    assert sent[1].findtext("{jabber:client}body") == "hi & bye"
    expected = parse_stanzas(substitute(script.actions[3].block, full, script.clients))
    assert expected[0].get("from") == "romeo@localhost"


@pytest.mark.parametrize("text", [
    "[Client] R\n\tjid: r@localhost\n---\nJuliet connects\n",        # unknown client
    "[Client] R\n\tjid: r@localhost\n---\nR sends:\nR disconnects\n",  # sends without XML
    "[Server] S\n\tjid: s\n---\n",                                      # unknown class
    "[Client] R\n\tpassword: x\n---\n",                                 # no jid
    "[Client] R\n\tjid: r@localhost\n\tcolour: red\n---\n",             # unknown property
])
def test_parse_errors(text: str) -> None:
    with pytest.raises(ScriptError):
        parse(text)


def test_variables() -> None:
    script = parse("[Client] A\n\tjid: a@localhost\n---\n")
    assert substitute("<x to=\"${A's JID}\"/>", {}, script.clients) == '<x to="a@localhost"/>'
    assert substitute("${A's full JID}", {"A": "a@localhost/r'1"}, script.clients) \
        == "a@localhost/r&apos;1"
    with pytest.raises(ScriptError):   # not connected yet: no full JID
        substitute("${A's full JID}", {}, script.clients)
    with pytest.raises(ScriptError):
        substitute("${B's JID}", {}, script.clients)


# -- the matcher ---------------------------------------------------------------------------------

def _el(xml: str) -> etree._Element:
    (el,) = parse_stanzas(xml)
    return el


def _why(expected: str, received: str, captures: dict[str, str] | None = None) -> str | None:
    return match(_el(expected), _el(received), captures)


def test_attributes() -> None:
    assert _why("<iq type='result'/>", "<iq type='result' id='1' to='a@b'/>") is None
    assert "attribute 'type'" in (_why("<iq type='result'/>", "<iq type='error'/>") or "")
    assert "missing" in (_why("<iq id='1'/>", "<iq/>") or "")
    assert _why("<iq id='{scansion:any}'/>", "<iq id='x'/>") is None
    assert "missing" in (_why("<iq id='{scansion:any}'/>", "<iq/>") or "")
    # strict (an element in its own namespace): no extra attribute
    assert "unexpected attribute" in (
        _why("<iq><query xmlns='q' a='1'/></iq>", "<iq><query xmlns='q' a='1' b='2'/></iq>") or "")
    assert _why("<iq><query xmlns='q' a='1' scansion:strict='false'/></iq>",
                "<iq><query xmlns='q' a='1' b='2'/></iq>") is None


def test_names_and_namespaces() -> None:
    assert "expected <{jabber:client}message>" in (_why("<message/>", "<presence/>") or "")
    assert _why("<iq><query xmlns='a'/></iq>", "<iq><query xmlns='b'/></iq>") is not None


def test_children_non_strict() -> None:
    # the default namespace: any order, extra children allowed
    assert _why("<message><body>hi</body><thread>t</thread></message>",
                "<message><thread>t</thread><x xmlns='y'/><body>hi</body></message>") is None
    why = _why("<message><body>hi</body><subject/></message>", "<message><body>hi</body></message>")
    assert why is not None and "missing child <subject>" in why
    # each expected child needs a distinct received one
    two = ("<presence><x xmlns='u' scansion:strict='false'><item jid='a'/><item/></x>"
           "</presence>")
    assert _why(two, "<presence><x xmlns='u'><item jid='a'/></x></presence>") is not None
    assert _why(two, "<presence><x xmlns='u'><item jid='b'/><item jid='a'/></x></presence>") \
        is None


def test_children_strict() -> None:
    exp = "<iq><query xmlns='q'><a/><b/></query></iq>"
    assert _why(exp, "<iq><query xmlns='q'><a/><b/></query></iq>") is None
    assert "unexpected child <c>" in (
        _why(exp, "<iq><query xmlns='q'><a/><b/><c/></query></iq>") or "")
    assert _why(exp, "<iq><query xmlns='q'><b/><a/></query></iq>") is not None   # order
    assert "missing child <b>" in (_why(exp, "<iq><query xmlns='q'><a/></query></iq>") or "")
    # strictness is inherited, also by a jabber:client element inside (mam_extended.scs)
    fwd = ("<message><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' "
           "id='1'/></forwarded></message>")
    assert _why(fwd, fwd.replace("id='1'", "id='1' xml:lang='en'")) is not None
    # ... and switched off below
    loose = "<iq><query xmlns='q' scansion:strict='false'><a/></query></iq>"
    assert _why(loose, "<iq><query xmlns='q'><b/><a x='1'/></query></iq>") is None


def test_text() -> None:
    assert _why("<message><body>hi</body></message>",
                "<message><body> hi\n</body></message>") is None
    assert "text" in (_why("<message><body>hi</body></message>",
                           "<message><body>ho</body></message>") or "")
    assert _why("<message><body/></message>", "<message><body>any</body></message>") is None
    # strict: text given is compared; no text expected accepts any (http_upload.scs: the
    # Authorization <header/> Prosody fills with a token)
    assert "text" in (_why("<iq><q xmlns='v'><name>Prosody</name></q></iq>",
                           "<iq><q xmlns='v'><name>presenced</name></q></iq>") or "")
    assert _why("<iq><slot xmlns='u'><header name='A'></header></slot></iq>",
                "<iq><slot xmlns='u'><header name='A'>Bearer x</header></slot></iq>") is None


def test_captures() -> None:
    caps: dict[str, str] = {}
    assert _why("<iq id='{scansion:capture:x}'/>", "<iq id='42'/>", caps) is None
    assert caps == {"x": "42"}
    assert _why("<iq id='{scansion:capture:x}'/>", "<iq id='42'/>", caps) is None
    why = _why("<iq id='{scansion:capture:x}'/>", "<iq id='43'/>", caps)
    assert why is not None and "'42'" in why and "'43'" in why
    # a failed match binds nothing
    caps2: dict[str, str] = {}
    assert _why("<iq id='{scansion:capture:y}' type='a'/>", "<iq id='1' type='b'/>", caps2)
    assert caps2 == {}
    # embedded placeholders
    assert _why("<x a='pre-{scansion:any}-post'/>", "<x a='pre-1-post'/>") is None
    assert _why("<x a='pre-{scansion:any}-post'/>", "<x a='pre-1-pots'/>") is not None


# -- the runner against presenced --------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return scansion.make_certificate(tmp_path_factory.mktemp("scansion-cert"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stops() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Servers stop in the background (presenced waits for a PEP caps query to time out);
    all of them are awaited at the end of the module."""
    logging.getLogger("server").setLevel(logging.CRITICAL)
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    await asyncio.gather(*tasks)


async def _run(text: str, tmp: Path, certificate: tuple[Path, Path],
               stops: list[asyncio.Task[None]], timeout: float = scansion.TIMEOUT
               ) -> scansion.Result:
    return await scansion.run_on_presenced(parse(text, "inline"), tmp, certificate=certificate,
                                           stops=stops, timeout=timeout)


INLINE_HEAD = """\
[Client] Romeo
\tjid: romeo@localhost/garden
\tpassword: s3cret

-----

Romeo connects
"""


@in_loop
async def test_inline_script_passes(tmp_path: Path, certificate: tuple[Path, Path],
                                    stops: list[asyncio.Task[None]]) -> None:
    text = INLINE_HEAD + """
Romeo sends:
\t<presence/>

Romeo receives:
\t<presence from="${Romeo's full JID}"/>

Romeo sends:
\t<iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>

Romeo receives:
\t<iq type='result' id='{scansion:capture:v}' from='localhost'>
\t\t<query xmlns='jabber:iq:version' scansion:strict='true'>
\t\t\t<name>presenced</name>
\t\t\t<version scansion:strict='false'/>
\t\t</query>
\t</iq>

Romeo receives: nothing

Romeo disconnects
"""
    result = await _run(text, tmp_path, certificate, stops)
    assert result.passed, result.describe()


PRESENCE = "\nRomeo sends:\n\t<presence/>\n"
PING = "\nRomeo sends:\n\t<iq type='get' id='{}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>\n"
RECEIVES = "\nRomeo receives:\n\t{}\n"

# name -> (the script after INLINE_HEAD, timeout, line that fails, in the reason, in the
# received stanza, stanzas discarded before)
FAILING_INLINE = {
    # scansion skips nothing: the reflected presence is not the message the script waits for
    "unexpected stanza": (PRESENCE + RECEIVES.format("<message/>"), 3.0, 12,
                          "expected <{jabber:client}message>, got <{jabber:client}presence>",
                          "<presence", 0),
    # ... but Romeo's next send discards it (bookmarks2.scs)
    "discarded at sends": (PRESENCE + PING.format("p1") + RECEIVES.format(
        "<iq type='result' id='p1'/>") + RECEIVES.format("<message/>"), 0.5, 18,
        "no stanza within 0.5s", "", 1),
    "receives nothing": (PRESENCE + "\nRomeo receives: nothing\n", 3.0, 12, "expected nothing",
                         "<presence", 0),
    "capture mismatch": (PING.format("p1") + RECEIVES.format(
        "<iq type='result' id='{scansion:capture:id}'/>") + PING.format("p2") + RECEIVES.format(
        "<iq type='result' id='{scansion:capture:id}'/>"), 3.0, 18,
        "{capture:id='p1'}\", got 'p2'", "id=\"p2\"", 0),
}


@in_loop
@pytest.mark.parametrize("name", FAILING_INLINE)
async def test_inline_script_fails(name: str, tmp_path: Path, certificate: tuple[Path, Path],
                                   stops: list[asyncio.Task[None]]) -> None:
    body, timeout, line, reason, received, discarded = FAILING_INLINE[name]
    result = await _run(INLINE_HEAD + body, tmp_path, certificate, stops, timeout)
    assert result.failure is not None and result.failure.line == line, result.describe()
    assert reason in result.failure.reason, result.describe()
    assert received in result.failure.received
    assert len(result.failure.discarded) == discarded, result.describe()


# -- Prosody's scripts ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prosody_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """spec/scansion from Debian's prosody source tarball ($PROSODY_SOURCE_TARBALL, else
    downloaded once per test session), sha256-checked."""
    where = tmp_path_factory.mktemp("prosody-source")
    try:
        return scansion.prosody_scripts(where)
    except (OSError, ScriptError) as e:
        source = os.environ.get("PROSODY_SOURCE_TARBALL") or scansion.TARBALL_URL
        pytest.skip(f"cannot get Prosody's scansion scripts from {source}: {e}")


def _load(prosody_dir: Path, name: str) -> Script:
    return scansion.load(prosody_dir / f"{name}.scs")


def test_lists_cover_the_issues_scripts() -> None:
    # the scripts issues 13 (PEP/pubsub) and 14 (MUC) are checked with, and the core ones
    named = {"pep_nickname", "pep_publish_subscribe", "pep_pubsub_max", "pubsub_advanced",
             "pubsub_basic", "pubsub_config", "pubsub_createdelete", "pubsub_max_items",
             "pubsub_multi_items", "pubsub_preconditions", "pubsub_resend_on_sub",
             "empty_bookmarks", "issue1224", "issue505", "issue978", "issue978-multi",
             "muc_affiliation_notify", "muc_create_destroy", "muc_mediated_invite",
             "muc_members_only_change", "muc_members_only_deregister", "muc_nickname_change",
             "muc_nickname_robotface", "muc_password", "muc_presence_probe", "muc_register",
             "muc_show_offline", "muc_subject_issue_667", "muc_whois_anyone_member", "basic",
             "basic_message", "basic_roster", "blocking", "vcard_temp", "version",
             "lastactivity", "presence_preapproval", "keep_full_sub_req", "mam_extended",
             "bookmarks2", "pep_itemreply"}
    lists = [set(PASSING), set(PROSODY_SPECIFIC), set(KNOWN_BUGS), set(RUNNER_LIMITS)]
    assert sum(map(len, lists)) == len(set().union(*lists))   # each script in one list
    assert named <= set().union(*lists)


def test_every_script_parses(prosody_dir: Path) -> None:
    scripts = sorted(prosody_dir.glob("*.scs"))
    assert len(scripts) >= 50
    for path in scripts:
        script = scansion.load(path)
        assert script.actions and script.clients, path.name
    listed = set(PASSING) | set(PROSODY_SPECIFIC) | set(KNOWN_BUGS) | set(RUNNER_LIMITS)
    assert {path.stem for path in scripts} == listed   # every script is run, in one list


@in_loop
@pytest.mark.parametrize("name", PASSING)
async def test_prosody_script_passes(name: str, prosody_dir: Path, tmp_path: Path,
                                     certificate: tuple[Path, Path],
                                     stops: list[asyncio.Task[None]]) -> None:
    result = await scansion.run_on_presenced(_load(prosody_dir, name), tmp_path,
                                             certificate=certificate, stops=stops)
    assert result.passed, result.describe()


@in_loop
@pytest.mark.parametrize("name", sorted(PROSODY_SPECIFIC) + sorted(KNOWN_BUGS)
                         + sorted(RUNNER_LIMITS))
async def test_prosody_script_still_fails(name: str, prosody_dir: Path, tmp_path: Path,
                                          certificate: tuple[Path, Path],
                                          stops: list[asyncio.Task[None]]) -> None:
    lines, reason = PROSODY_SPECIFIC.get(name) or KNOWN_BUGS.get(name) or RUNNER_LIMITS[name]
    result = await scansion.run_on_presenced(_load(prosody_dir, name), tmp_path,
                                             certificate=certificate, stops=stops)
    assert result.failure is not None, f"{name} passes now: move it to PASSING ({reason})"
    assert result.failure.line in lines, (
        f"{name} now fails elsewhere than line(s) {lines} ({reason}):\n{result.describe()}")
