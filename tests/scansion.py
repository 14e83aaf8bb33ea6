"""A Python runner of the scansion language (Prosody's XMPP test scripts, spec/scansion/*.scs).

scansion (https://matthewwild.co.uk/projects/scansion/, Lua) is not installable here; this
module reads its scripts and plays them against presenced over real sockets.

Command line (stable: other helpers use it):

    python -m tests.scansion [--timeout S] [--lenient] [--report FILE] [--server HOST:PORT]
                             (SCRIPT ... | --all)

SCRIPT is a path to a .scs file or the name of one of Prosody 13.0.1's scripts (``version``,
``muc_password.scs``): those come from Debian's source tarball (sha256-checked), downloaded once
into ``$XDG_CACHE_HOME/presenced-scansion`` or taken from ``$PROSODY_SOURCE_TARBALL``. ``--all``
runs every script of the tarball. Each script gets a fresh in-process presenced (domain
localhost, MUC at conference.localhost, pubsub at pubsub.localhost, upload at upload.localhost,
admins = admin@localhost, as Prosody's spec/scansion/prosody.cfg.lua) with every [Client]
account created (its password). Prints ``PASS name`` or ``FAIL name`` with the first mismatch:
the step number (1-based, among the actions), the script line, the action, the reason, the
expected and the received XML, and what was discarded before (see below). Exit status 0 when
every script passed. ``--report FILE`` writes a Markdown table (with tests/test_scansion.py's
classification and a ``--lenient`` rerun of each failure). ``--lenient`` is a diagnostic that
is not scansion (strict matching off, stanzas may come in another order: see run_script).
``--server HOST:PORT`` plays the scripts against another server instead (its accounts must
exist with the scripts' passwords; no STARTTLS needed if it offers none).

The language, as we read it (the scansion docs: script-basics.md and
character-classes/client.md, checked against Prosody's scripts):

- Metadata: leading ``# title`` (then description) lines, ``## tag`` lines. Comments: lines
  starting with ``#``, ``//`` or ``--`` (an indented line is never a comment: it belongs to a
  block). Blank lines are ignored.
- Characters: ``[Client] Name`` followed by indented ``key: value`` lines: ``jid`` (a full JID
  is bound with its resource), ``password``, ``resource`` (the resource to bind), and
  ``connect_host``/``connect_port`` (ignored: we connect to our own server). Names may contain
  spaces and apostrophes (``Juliet's phone``).
- A line of three or more dashes ends the definitions; actions follow:
  ``Name connects`` (STARTTLS, SCRAM, resource binding; no presence is sent; the stream
  header says xml:lang='en', as scansion's XMPP library verse does),
  ``Name disconnects`` (``</stream:stream>``, waiting for the server to close),
  ``Name sends:`` and ``Name receives:`` (the colon may be missing) followed by an indented block
  of one or more stanzas, and ``Name receives: nothing`` (no stanza may arrive within
  NOTHING_WAIT seconds).
- Variables, substituted in blocks before parsing: ``${Name's full JID}`` (the JID the server
  bound) and ``${Name's JID}`` (bare).
- Blocks are parsed as XML in the default namespace ``jabber:client`` with the ``scansion:``
  prefix declared; whitespace-only text is dropped. Sent stanzas go out as written (after
  substitution), placeholders included.
- A client's received stanzas queue up; each expected stanza is compared with the next one (a
  stanza that does not match is a failure: a ``receives`` skips nothing), waiting up to
  ``timeout``. But when a client ``sends``, the stanzas it has received and no ``receives``
  took are discarded (listed in a failure's report as "discarded earlier"): real scansion
  reacts to stanzas as they arrive and drops those it is not waiting for, and Prosody's scripts
  count on it. bookmarks2.scs never expects the reflected initial presence (RFC 6121 §4.2.2;
  basic.scs does expect it) and goes on sending; in muc_presence_probe.scs Romeo never expects
  Juliet's join presence (XEP-0045 §7.2.3) and probes her next. Checked against Debian's
  Prosody 0.12.3 (``--server``, a fresh instance per script, accounts made with prosodyctl):
  keeping stanzas queued passes 27 of the 50 scripts, discarding at sends 31, and fails none
  that keeping passes (the rest are 0.12/13.0 differences and unconfigured modules, but for
  basic_message.scs, where an unexpected stanza comes with no send of that client before the
  next receive: real scansion's timing is not reproduced exactly).
- Matching (client.md, "Matching rules"): names and namespaces must be equal. Non-strict: every
  expected attribute present with its value (extra received attributes are fine), every expected
  child matched by a distinct received child in any order (extra received children are fine).
  Strict: the same attributes exactly, the same children in the same order, nothing extra.
  "Tags in the default namespace are matched using the non-strict rules, but tags with their
  own namespace" strictly: an element whose namespace is not jabber:client and differs from its
  parent's starts strict matching; other elements inherit their parent's mode (so a
  ``<message xmlns='jabber:client'>`` forwarded inside a strict MAM result is strict, as
  mam_extended.scs needs); ``scansion:strict='true'|'false'`` sets the mode of an element and
  of its descendants (issue978-multi.scs: ``<x xmlns='…muc#user' scansion:strict='false'>``
  lists status codes in another order than Prosody sends them; mam_extended.scs:
  ``<fin scansion:strict='false'>`` for "unstable tag order").
- Text (the element's own text, whitespace-trimmed): compared when the expected element has
  text, in both modes. An element without expected text accepts any: http_upload.scs expects
  ``<header name='Authorization'></header>`` inside the strict ``<slot/>`` where Prosody (whose
  CI runs these scripts) sends ``Bearer …``; version.scs's ``<version scansion:strict='false'/>``
  is then redundant, not a sign that strict mode compares empty text.
- Values (attributes and text): ``{scansion:any}`` matches anything (the attribute must be
  there); ``{scansion:capture:NAME}`` captures the value the first time and must equal it
  afterwards (captures are script-wide).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import ssl
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from tests.rawclient import RawClient, StreamClosedError

SCANSION_NS = "https://matthewwild.co.uk/projects/scansion"
CLIENT_NS = "jabber:client"
STRICT_ATTR = f"{{{SCANSION_NS}}}strict"
TIMEOUT = 3.0          # seconds a `receives` waits for its stanza
NOTHING_WAIT = 0.5     # seconds `receives: nothing` listens
DISCARD_WAIT = 0.02    # seconds a `sends` listens for what has already arrived, to discard it

PROSODY_VERSION = "13.0.1"
TARBALL_URL = ("http://deb.debian.org/debian/pool/main/p/prosody/"
               f"prosody_{PROSODY_VERSION}.orig.tar.gz")
TARBALL_SHA256 = "7bde8a5bf3cce195fd454970001b9faeac1a4601bcaa5c74eed7c6b74e48d806"

# presenced configured as Prosody's spec/scansion/prosody.cfg.lua (localhost, admins.txt, the
# components conference./pubsub./upload.localhost with http_file_share_size_limit).
SERVER_TOP = 'admins = ["admin@localhost"]'
SERVER_LISTEN = 'http = ["127.0.0.1:0"]'   # upload needs an HTTP listener
SERVER_EXTRA = """
[muc]
subdomain = "conference"
[pubsub]
subdomain = "pubsub"
[upload]
subdomain = "upload"
max_file_size = 10000000
"""


class ScriptError(ValueError):
    """The script cannot be read (or uses something the runner does not know)."""


# -- parsing ---------------------------------------------------------------------------------

@dataclass
class ClientSpec:
    name: str
    jid: str = ""
    password: str = ""
    resource: str | None = None
    line: int = 0

    @property
    def bare(self) -> str:
        return self.jid.split("/", 1)[0]

    @property
    def bind_resource(self) -> str | None:
        if self.resource:
            return self.resource
        return self.jid.split("/", 1)[1] if "/" in self.jid else None


@dataclass
class Action:
    client: str
    verb: str            # connects, disconnects, sends, receives
    line: int
    block: str = ""      # the indented XML (sends / receives)
    nothing: bool = False

    def title(self) -> str:
        return f"{self.client} {self.verb}" + (": nothing" if self.nothing else "")


@dataclass
class Script:
    name: str
    title: str
    clients: dict[str, ClientSpec]
    actions: list[Action]
    tags: list[str] = field(default_factory=list)


_VERBS = ("connects", "disconnects", "sends", "receives")
_DASHES = re.compile(r"^-{3,}\s*$")
_COMMENT = ("#", "//", "--")


def parse(text: str, name: str = "script") -> Script:
    lines = text.splitlines()
    title, tags = "", []
    clients: dict[str, ClientSpec] = {}
    actions: list[Action] = []
    in_actions = False
    current: ClientSpec | None = None
    i = 0
    while i < len(lines):
        raw = lines[i]
        lineno = i + 1
        i += 1
        stripped = raw.strip()
        if not stripped:
            continue
        indented = raw[0] in " \t"
        if not indented and _DASHES.match(raw):
            in_actions, current = True, None
            continue
        if not indented and raw.startswith(_COMMENT):
            if raw.startswith("##"):
                tags.append(raw[2:].strip())
            elif raw.startswith("#") and not title and not clients and not actions:
                title = raw[1:].strip()
            continue
        if not in_actions:
            if not indented:
                m = re.match(r"^\[(\w+)\]\s+(.+?)\s*$", raw)
                if not m:
                    raise ScriptError(f"{name}:{lineno}: expected [Client] Name, got {raw!r}")
                if m.group(1) != "Client":
                    raise ScriptError(f"{name}:{lineno}: character class {m.group(1)} "
                                      "is not supported")
                current = ClientSpec(m.group(2), line=lineno)
                clients[current.name] = current
                continue
            if current is None:
                raise ScriptError(f"{name}:{lineno}: property outside a [Client] block")
            m = re.match(r"^\s+([A-Za-z_]+)\s*:\s*(.*?)\s*$", raw)
            if not m:
                raise ScriptError(f"{name}:{lineno}: expected 'key: value', got {raw!r}")
            key, value = m.groups()
            if key in ("jid", "password", "resource"):
                setattr(current, key, value)
            elif key not in ("connect_host", "connect_port"):
                raise ScriptError(f"{name}:{lineno}: unknown client property {key!r}")
            continue
        if indented:
            raise ScriptError(f"{name}:{lineno}: indented line outside a block: {raw!r}")
        action = _parse_action(raw, lineno, clients, name)
        if action.verb in ("sends", "receives") and not action.nothing:
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i][0] in " \t"):
                block.append(lines[i])
                i += 1
            action.block = "\n".join(block).strip()
            if not action.block:
                raise ScriptError(f"{name}:{lineno}: {action.title()} without XML")
        actions.append(action)
    for spec in clients.values():
        if not spec.jid:
            raise ScriptError(f"{name}:{spec.line}: [Client] {spec.name} has no jid")
    return Script(name, title, clients, actions, tags)


def _parse_action(raw: str, lineno: int, clients: dict[str, ClientSpec], name: str) -> Action:
    # The longest client name that starts the line (names contain spaces: "Juliet's phone").
    for client in sorted(clients, key=len, reverse=True):
        if not raw.startswith(client + " "):
            continue
        rest = raw[len(client) + 1:].strip()
        m = re.match(r"^(connects|disconnects|sends|receives)\s*(:?)\s*(.*)$", rest)
        if not m:
            continue
        verb, _colon, tail = m.groups()
        if verb in ("sends", "receives") and tail:
            if verb == "receives" and tail == "nothing":
                return Action(client, verb, lineno, nothing=True)
            raise ScriptError(f"{name}:{lineno}: unexpected {tail!r} after {verb}")
        if verb in ("connects", "disconnects") and (tail or _colon):
            raise ScriptError(f"{name}:{lineno}: unexpected text after {verb}")
        return Action(client, verb, lineno)
    raise ScriptError(f"{name}:{lineno}: not an action of a defined client: {raw!r}")


_VARIABLE = re.compile(r"\$\{([^}]*?)'s (full JID|JID)\}")


def substitute(block: str, full_jids: dict[str, str], clients: dict[str, ClientSpec]) -> str:
    """Replace ${Name's full JID} and ${Name's JID} (XML-escaped: attribute or text)."""
    def one(m: re.Match[str]) -> str:
        who, what = m.groups()
        spec = clients.get(who)
        if spec is None:
            raise ScriptError(f"unknown client in {m.group(0)}")
        if what == "JID":
            value = spec.bare
        elif who in full_jids:
            value = full_jids[who]
        elif "/" in spec.jid:
            value = spec.jid
        else:
            raise ScriptError(f"{m.group(0)} before {who} connected")
        return (value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")
                .replace('"', "&quot;"))
    return _VARIABLE.sub(one, block)


def parse_stanzas(block: str) -> list[etree._Element]:
    """The top-level elements of a block, in jabber:client, whitespace-only text dropped."""
    wrapped = (f"<scansion:block xmlns='{CLIENT_NS}' xmlns:scansion='{SCANSION_NS}'>"
               f"{block}</scansion:block>")
    try:
        root = etree.fromstring(wrapped, etree.XMLParser(resolve_entities=False,
                                                          remove_comments=True))
    except etree.XMLSyntaxError as e:
        raise ScriptError(f"bad XML: {e}") from e
    for el in root.iter():
        if el.text is not None and not el.text.strip():
            el.text = None
        if el.tail is not None and not el.tail.strip():
            el.tail = None
    out = list(root)
    if not out:
        raise ScriptError("a block without stanza")
    return out


def to_text(el: etree._Element) -> str:
    """One stanza as the wire carries it (no scansion namespace declaration)."""
    copy = etree.fromstring(etree.tostring(el))
    etree.cleanup_namespaces(copy)
    return etree.tostring(copy, encoding="unicode")


# -- matching --------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{scansion:(any|capture:([^}]+))\}")


def _value_matches(pattern: str, actual: str, captures: dict[str, str]) -> str | None:
    """None when `actual` fits `pattern`; else why not. Binds new captures on success."""
    if "{scansion:" not in pattern:
        return None if pattern == actual else f"expected {pattern!r}, got {actual!r}"
    regex, new = "", list[str]()
    pos = 0
    for m in _PLACEHOLDER.finditer(pattern):
        regex += re.escape(pattern[pos:m.start()])
        pos = m.end()
        name = m.group(2)
        if name is None:
            regex += "(.*?)"
        elif name in captures:
            regex += re.escape(captures[name])
        elif name in new:
            regex += f"(?P=c{new.index(name)})"
        else:
            regex += f"(?P<c{len(new)}>.*?)"
            new.append(name)
    regex += re.escape(pattern[pos:])
    found = re.fullmatch(regex, actual, re.DOTALL)
    if found is None:
        shown = _PLACEHOLDER.sub(
            lambda m: f"{{capture:{m.group(2)}={captures[m.group(2)]!r}}}"
            if m.group(2) in captures else m.group(0), pattern)
        return f"expected {shown!r}, got {actual!r}"
    for n, name in enumerate(new):
        captures[name] = found.group(f"c{n}")
    return None


def _own_text(el: etree._Element) -> str:
    parts = [el.text or ""] + [child.tail or "" for child in el]
    return "".join(parts).strip()


def _label(el: etree._Element) -> str:
    q = etree.QName(el)
    return q.localname


def _strict_for(expected: etree._Element, parent_strict: bool, parent_ns: str | None) -> bool:
    flag = expected.get(STRICT_ATTR)
    if flag is not None:
        return flag.strip().lower() not in ("false", "0", "no")
    ns = etree.QName(expected).namespace
    if ns != CLIENT_NS and ns != parent_ns:
        return True   # client.md: "tags with their own namespace are matched using the strict rules"
    return parent_strict


def _children(el: etree._Element) -> list[etree._Element]:
    return [c for c in el if isinstance(c.tag, str)]


def _match(expected: etree._Element, received: etree._Element, captures: dict[str, str],
           parent_strict: bool, parent_ns: str | None, path: str,
           never_strict: bool = False) -> str | None:
    if expected.tag != received.tag:
        return f"{path}: expected <{expected.tag}>, got <{received.tag}>"
    strict = _strict_for(expected, parent_strict, parent_ns) and not never_strict
    mode = "strict" if strict else "non-strict"
    attrs = {k: v for k, v in expected.attrib.items() if not k.startswith(f"{{{SCANSION_NS}}}")}
    for key, value in attrs.items():
        if key not in received.attrib:
            return f"{path}: attribute {key!r} missing ({mode})"
        why = _value_matches(value, received.attrib[key], captures)
        if why:
            return f"{path}: attribute {key!r}: {why}"
    if strict:
        extra = sorted(set(received.attrib) - set(attrs))
        if extra:
            return f"{path}: unexpected attribute(s) {', '.join(extra)} (strict)"
    want = _own_text(expected)
    if want:   # no expected text: any (also when strict: http_upload.scs's <header/>)
        why = _value_matches(want, _own_text(received), captures)
        if why:
            return f"{path}: text: {why}"
    ns = etree.QName(expected).namespace
    exp_children, rec_children = _children(expected), _children(received)
    if strict:
        for n, (e, r) in enumerate(zip(exp_children, rec_children, strict=False)):
            why = _match(e, r, captures, strict, ns, f"{path}/{_label(e)}[{n + 1}]")
            if why:
                return why
        if len(rec_children) > len(exp_children):
            extra_el = rec_children[len(exp_children)]
            return (f"{path}: unexpected child <{_label(extra_el)}> "
                    f"(strict: {len(exp_children)} expected, {len(rec_children)} received)")
        if len(exp_children) > len(rec_children):
            return f"{path}: missing child <{_label(exp_children[len(rec_children)])}> (strict)"
        return None
    return _assign(exp_children, rec_children, captures, ns, path, never_strict)


def _assign(exp_children: list[etree._Element], rec_children: list[etree._Element],
            captures: dict[str, str], ns: str | None, path: str,
            never_strict: bool) -> str | None:
    """Non-strict children: each expected child matches a distinct received one, any order."""
    def search(i: int, used: frozenset[int], caps: dict[str, str]) -> dict[str, str] | None:
        if i == len(exp_children):
            return caps
        for j, r in enumerate(rec_children):
            if j in used or r.tag != exp_children[i].tag:
                continue
            trial = dict(caps)
            if _match(exp_children[i], r, trial, False, ns, "", never_strict) is None:
                done = search(i + 1, used | {j}, trial)
                if done is not None:
                    return done
        return None

    found = search(0, frozenset(), dict(captures))
    if found is not None:
        captures.update(found)
        return None
    # Explain: the first expected child that no received child matches on its own.
    for n, e in enumerate(exp_children):
        where = f"{path}/{_label(e)}[{n + 1}]"
        same = [r for r in rec_children if r.tag == e.tag]
        if not same:
            return f"{where}: missing child <{_label(e)}> (non-strict: no <{e.tag}> received)"
        reasons = []
        for r in same:
            why = _match(e, r, dict(captures), False, ns, where, never_strict)
            if why is None:
                break
            reasons.append(why)
        else:
            # the candidate that got furthest (deepest path, then most attributes matched)
            best = max(reasons, key=lambda why: why.split(": ", 1)[0].count("/"))
            return best if len(reasons) == 1 else (
                f"{where}: none of the {len(same)} received <{_label(e)}> matches; "
                f"closest: {best}")
    return f"{path}: the expected children cannot each match a distinct received child"


def match(expected: etree._Element, received: etree._Element,
          captures: dict[str, str] | None = None, *, strict: bool | None = None) -> str | None:
    """None when `received` matches `expected` (scansion's rules, see the module docstring);
    else the first reason it does not. New captures go into `captures` only on a match.
    strict=False: never strict (the lenient diagnostic)."""
    caps = dict(captures or {})
    why = _match(expected, received, caps, False, None, f"/{_label(expected)}",
                 never_strict=strict is False)
    if why is None and captures is not None:
        captures.update(caps)
    return why


# -- running ---------------------------------------------------------------------------------

@dataclass
class Failure:
    step: int            # 1-based index among the actions
    line: int            # the action's line in the script
    action: str          # "Romeo receives"
    reason: str
    expected: str = ""
    received: str = ""
    discarded: list[str] = field(default_factory=list)   # by this client's earlier sends

    def describe(self) -> str:
        out = f"step {self.step} (line {self.line}) {self.action}: {self.reason}"
        if self.expected:
            out += f"\n  expected: {self.expected}"
        if self.received:
            out += f"\n  received: {self.received}"
        for text in self.discarded[-3:]:
            out += f"\n  discarded earlier: {text}"
        return out


@dataclass
class Result:
    script: str
    failure: Failure | None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.failure is None

    def describe(self) -> str:
        if self.failure is None:
            return f"PASS {self.script} ({self.seconds:.1f}s)"
        return f"FAIL {self.script} ({self.seconds:.1f}s): {self.failure.describe()}"


class _StepFailed(Exception):
    def __init__(self, reason: str, expected: str = "", received: str = "") -> None:
        super().__init__(reason)
        self.reason, self.expected, self.received = reason, expected, received


class _Client:
    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.raw: RawClient | None = None
        self.full_jid: str | None = None
        self.pending: list[etree._Element] = []   # read, not yet matched (lenient mode)
        self.discarded: list[str] = []              # "step N: <stanza/>"

    async def discard(self, step: int) -> None:
        """Drop what has arrived and was not expected (see the module docstring)."""
        assert self.raw is not None
        dropped = self.pending + self.raw._queue
        self.pending, self.raw._queue = [], []
        with contextlib.suppress(TimeoutError, StreamClosedError):
            while True:
                dropped.append(await self.raw.next(DISCARD_WAIT))
        self.discarded += [f"step {step}: {_show(el)}" for el in dropped]

    async def next(self, timeout: float) -> etree._Element:
        assert self.raw is not None
        if self.pending:
            return self.pending.pop(0)
        return await self.raw.next(timeout)

    async def connect(self, host: str, port: int) -> str:
        user, domain = self.spec.bare.split("@", 1)
        self.raw = await RawClient.connect(host, port)
        self.raw.header_extra = " xml:lang='en'"   # as verse, scansion's XMPP library, does
        self.full_jid = await self.raw.login(domain, user, self.spec.password,
                                             self.spec.bind_resource)
        return self.full_jid

    async def disconnect(self, timeout: float = 2.0) -> None:
        raw, self.raw = self.raw, None
        self.pending.clear()
        if raw is None:
            return
        with contextlib.suppress(ConnectionError, TimeoutError, StreamClosedError, RuntimeError,
                                 ssl.SSLError, OSError):
            await raw.send(b"</stream:stream>")
            # RFC 6120 §4.4: wait for the server's own closing tag, then the TCP close.
            while not raw.closed:
                await raw._read_more(timeout)
        await raw.close()


async def run_script(script: Script, host: str, port: int, *, timeout: float = TIMEOUT,
                     lenient: bool = False, discard: bool = True) -> Failure | None:
    """Play `script` against the server at host:port (its accounts must exist).

    lenient (a diagnostic, not scansion): strict matching is off, and a `receives` takes the
    first matching stanza that arrives within the timeout, leaving the others queued for later
    steps; it shows the failures that remain once element order, stanza order, form labels and
    the like are forgiven.
    discard=False (and lenient): a stanza nobody waited for stays queued until a `receives`
    meets it, instead of being discarded at its client's next `sends`."""
    clients = {name: _Client(spec) for name, spec in script.clients.items()}
    full_jids: dict[str, str] = {}
    captures: dict[str, str] = {}
    step = 0
    try:
        for step, action in enumerate(script.actions, 1):
            client = clients[action.client]
            try:
                await _play(action, client, full_jids, captures, host, port, timeout, script,
                            lenient, step if discard and not lenient else 0)
            except _StepFailed as e:
                return Failure(step, action.line, action.title(), e.reason, e.expected,
                               e.received, client.discarded)
            except ScriptError as e:
                return Failure(step, action.line, action.title(), f"script error: {e}")
        return None
    finally:
        for client in clients.values():
            await client.disconnect(timeout=1.0)


async def _play(action: Action, client: _Client, full_jids: dict[str, str],
                captures: dict[str, str], host: str, port: int, timeout: float, script: Script,
                lenient: bool, discard_step: int) -> None:
    if action.verb == "connects":
        if client.raw is not None:
            raise ScriptError(f"{action.client} is already connected")
        try:
            full_jids[action.client] = await client.connect(host, port)
        except (AssertionError, OSError, TimeoutError) as e:
            raise _StepFailed(f"cannot log in: {e}") from e
        return
    if action.verb == "disconnects":
        await client.disconnect()
        return
    raw = client.raw
    if raw is None:
        raise ScriptError(f"{action.client} is not connected")
    if action.nothing:
        try:
            got = await client.next(NOTHING_WAIT)
        except TimeoutError:
            return
        except StreamClosedError as e:
            raise _StepFailed(f"stream closed: {e}") from e
        raise _StepFailed("expected nothing, received a stanza", received=_show(got))
    stanzas = parse_stanzas(substitute(action.block, full_jids, script.clients))
    if action.verb == "sends":
        if discard_step:
            await client.discard(discard_step)
        try:
            await raw.send("".join(to_text(s) for s in stanzas))
        except (ConnectionError, RuntimeError) as e:
            raise _StepFailed(f"cannot send: {e}") from e
        return
    for expected in stanzas:
        if lenient:
            await _receive_lenient(client, expected, captures, timeout)
            continue
        try:
            got = await client.next(timeout)
        except TimeoutError as e:
            raise _StepFailed(f"no stanza within {timeout:g}s",
                              expected=to_text(expected)) from e
        except StreamClosedError as e:
            raise _StepFailed(f"stream closed: {e}", expected=to_text(expected)) from e
        why = match(expected, got, captures)
        if why:
            raise _StepFailed(why, expected=to_text(expected), received=_show(got))


async def _receive_lenient(client: _Client, expected: etree._Element,
                           captures: dict[str, str], timeout: float) -> None:
    assert client.raw is not None
    for n, got in enumerate(client.pending):
        if match(expected, got, captures, strict=False) is None:
            del client.pending[n]
            return
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        try:
            if left <= 0:
                raise TimeoutError
            got = await client.raw.next(left)
        except (TimeoutError, StreamClosedError) as e:
            near = next((g for g in client.pending if g.tag == expected.tag), None)
            why = "" if near is None else (
                f"; nearest: {match(expected, near, dict(captures), strict=False)}")
            raise _StepFailed(f"no matching stanza within {timeout:g}s "
                              f"({len(client.pending)} others queued){why}",
                              expected=to_text(expected),
                              received=_show(near) if near is not None else "") from e
        if match(expected, got, captures, strict=False) is None:
            return
        client.pending.append(got)


def _show(el: etree._Element) -> str:
    return etree.tostring(el, encoding="unicode", with_tail=False)


# -- presenced ---------------------------------------------------------------------------------

async def run_on_presenced(script: Script, workdir: Path, *, timeout: float = TIMEOUT,
                           lenient: bool = False,
                           certificate: tuple[Path, Path] | None = None,
                           stops: list[asyncio.Task[None]] | None = None) -> Result:
    """A fresh in-process presenced configured like Prosody's scansion setup, the script's
    accounts, the script. stops: stop the server in a task put there (the caller awaits it)
    instead of waiting here: presenced's shutdown waits for outstanding work (a PEP caps query
    to a client that left waits for its 10 s timeout)."""
    from tests.conftest import start_server, stop_server

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    running = await start_server(workdir, SERVER_EXTRA, SERVER_TOP, domains=("localhost",),
                                 certificate=certificate, listen_extra=SERVER_LISTEN)
    try:
        made: set[str] = set()
        for spec in script.clients.values():
            if spec.bare not in made:
                made.add(spec.bare)
                await running.add_user(spec.bare, spec.password)
        host, port = running.address("c2s")
        failure = await run_script(script, host, port, timeout=timeout, lenient=lenient)
    finally:
        if stops is None:
            await stop_server(running)
        else:
            stops.append(asyncio.ensure_future(stop_server(running)))
    return Result(script.name, failure, time.monotonic() - started)


def make_certificate(where: Path) -> tuple[Path, Path]:
    """One self-signed certificate for every script's server (saves a key per script)."""
    from server.certs import generate_self_signed

    where.mkdir(parents=True, exist_ok=True)
    cert, key = where / "cert.pem", where / "key.pem"
    if not cert.exists():
        generate_self_signed(["localhost", "conference.localhost", "pubsub.localhost",
                              "upload.localhost"], cert, key)
    return cert, key


# -- Prosody's scripts ---------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def prosody_scripts(cache: Path, download: Callable[[str, Path], None] | None = None) -> Path:
    """spec/scansion of Prosody's source (Debian's orig tarball, sha256-checked): from
    $PROSODY_SOURCE_TARBALL, else downloaded into `cache` (once)."""
    target = cache / f"prosody-{PROSODY_VERSION}" / "spec" / "scansion"
    if target.is_dir():
        return target
    given = os.environ.get("PROSODY_SOURCE_TARBALL")
    if given:
        tarball = Path(given)
    else:
        tarball = cache / f"prosody_{PROSODY_VERSION}.orig.tar.gz"
        if not tarball.exists():
            cache.mkdir(parents=True, exist_ok=True)
            partial = tarball.with_suffix(".part")
            (download or _download)(TARBALL_URL, partial)
            partial.rename(tarball)
    digest = _sha256(tarball)
    if digest != TARBALL_SHA256:
        raise ScriptError(f"{tarball}: sha256 {digest}, expected {TARBALL_SHA256} "
                          f"(Debian's prosody_{PROSODY_VERSION}.orig.tar.gz)")
    prefix = f"prosody-{PROSODY_VERSION}/spec/scansion/"
    with tarfile.open(tarball) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        archive.extractall(cache, members=members, filter="data")
    return target


def _download(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=120) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "presenced-scansion"


def load(path: Path) -> Script:
    return parse(path.read_text(encoding="utf-8"), path.stem)


# -- command line ------------------------------------------------------------------------------

def _notes() -> dict[str, str]:
    """The classification of tests/test_scansion.py's lists, for the report."""
    try:
        from tests import test_scansion as t
    except ImportError:
        return {}
    notes = {name: "pass" for name in t.PASSING}
    notes |= {name: f"(b) {why}" for name, (_lines, why) in t.PROSODY_SPECIFIC.items()}
    notes |= {name: f"(a) {why}" for name, (_lines, why) in t.KNOWN_BUGS.items()}
    notes |= {name: f"(c) {why}" for name, (_lines, why) in t.RUNNER_LIMITS.items()}
    return notes


def write_report(results: list[Result], path: Path,
                 lenient: dict[str, Result] | None = None) -> None:
    """A Markdown table: result, first mismatch, its class (tests/test_scansion.py's lists) and
    the first failure of a --lenient run (a hint of what lies behind)."""
    notes = _notes()

    def cell(text: str) -> str:
        return text.replace("|", "/").replace("\n", " ")

    rows = ["| script | result | first mismatch (faithful) | class and cause | "
            "--lenient diagnostic |", "|---|---|---|---|---|"]
    for r in results:
        detail = "" if r.failure is None else (
            f"step {r.failure.step} (line {r.failure.line}) {r.failure.action}: "
            f"{r.failure.reason}")
        hint = ""
        if lenient and r.script in lenient:
            lr = lenient[r.script]
            hint = "PASS" if lr.failure is None else (
                f"line {lr.failure.line} {lr.failure.action}: {lr.failure.reason}")
        rows.append(f"| {r.script} | {'PASS' if r.passed else 'FAIL'} | {cell(detail)} | "
                    f"{cell(notes.get(r.script, 'unclassified'))} | {cell(hint)} |")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


async def _run_one(script: Script, workdir: Path, timeout: float, lenient: bool,
                   cert: tuple[Path, Path], stops: list[asyncio.Task[None]],
                   server: tuple[str, int] | None) -> Result:
    if server is None:
        return await run_on_presenced(script, workdir, timeout=timeout, lenient=lenient,
                                      certificate=cert, stops=stops)
    started = time.monotonic()
    failure = await run_script(script, *server, timeout=timeout, lenient=lenient)
    return Result(script.name, failure, time.monotonic() - started)


async def _main_async(names: list[str], timeout: float, run_all: bool,
                      lenient: bool, report: Path | None = None,
                      server: tuple[str, int] | None = None) -> list[Result]:
    paths: list[Path] = []
    scripts_dir: Path | None = None
    for name in names:
        p = Path(name)
        if p.suffix == ".scs" and p.exists():
            paths.append(p)
            continue
        scripts_dir = scripts_dir or prosody_scripts(default_cache())
        candidate = scripts_dir / (name if name.endswith(".scs") else f"{name}.scs")
        if not candidate.exists():
            raise SystemExit(f"no script {name!r} (not a file, not in {scripts_dir})")
        paths.append(candidate)
    if run_all:
        scripts_dir = scripts_dir or prosody_scripts(default_cache())
        paths += sorted(scripts_dir.glob("*.scs"))
    results = []
    stops: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory(prefix="scansion-") as tmp:
        cert = make_certificate(Path(tmp) / "cert")
        try:
            for n, path in enumerate(paths):
                try:
                    script = load(path)
                except ScriptError as e:
                    results.append(Result(path.stem, Failure(0, 0, "parse", str(e))))
                else:
                    results.append(await _run_one(script, Path(tmp) / f"{n}-{path.stem}",
                                                  timeout, lenient, cert, stops, server))
                print(results[-1].describe(), flush=True)
            if report is not None and server is None:
                # --report: what a lenient run of each failed script finds behind
                again: dict[str, Result] = {}
                for n, path in enumerate(paths):
                    r = results[n]
                    if r.failure is not None and r.failure.step > 0 and not lenient:
                        again[r.script] = await run_on_presenced(
                            load(path), Path(tmp) / f"lenient-{n}-{path.stem}", timeout=timeout,
                            lenient=True, certificate=cert, stops=stops)
                write_report(results, report, again)
        finally:
            await asyncio.gather(*stops, return_exceptions=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.scansion",
                                     description="Run scansion scripts against presenced.")
    parser.add_argument("scripts", nargs="*", help=".scs files or names of Prosody's scripts")
    parser.add_argument("--all", action="store_true", help="every script of Prosody's tarball")
    parser.add_argument("--timeout", type=float, default=TIMEOUT,
                        help=f"seconds to wait for each expected stanza (default {TIMEOUT:g})")
    parser.add_argument("--report", type=Path,
                        help="write a Markdown table of the results (with the classification of "
                             "tests/test_scansion.py and a --lenient rerun of each failure)")
    parser.add_argument("--lenient", action="store_true",
                        help="diagnostic, not scansion: no strict matching, and a receive may "
                             "take a later stanza (see run_script)")
    parser.add_argument("--server", metavar="HOST:PORT",
                        help="another server to play the scripts against (accounts must exist)")
    args = parser.parse_args(argv)
    server = None
    if args.server:
        host, _, port = args.server.rpartition(":")
        server = (host, int(port))
    if not args.scripts and not args.all:
        parser.error("name at least one script, or --all")
    import logging
    logging.basicConfig(level=logging.CRITICAL)
    results = asyncio.run(_main_async(args.scripts, args.timeout, args.all, args.lenient,
                                      args.report, server))
    passed = sum(r.passed for r in results)
    print(f"{passed}/{len(results)} passed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
