"""XMPP addresses: RFC 7622 parsing, PRECIS/IDNA normalisation, equality and caching."""

from __future__ import annotations

import copy
import itertools
import pickle
from typing import Any

import pytest

import server.jid as jid_module
from server.jid import (
    JID,
    InvalidJID,
    normalize_domain,
    normalize_localpart,
    normalize_resource,
)

# (input, local, domain, resource) — RFC 7622 §3.5.1, numbered as in the RFC.
RFC_VALID = [
    ("juliet@example.com", "juliet", "example.com", None),  # 1
    ("juliet@example.com/foo", "juliet", "example.com", "foo"),  # 2
    ("juliet@example.com/foo bar", "juliet", "example.com", "foo bar"),  # 3
    ("juliet@example.com/foo@bar", "juliet", "example.com", "foo@bar"),  # 4
    ("foo\\20bar@example.com", "foo\\20bar", "example.com", None),  # 5
    ("fussball@example.com", "fussball", "example.com", None),  # 6
    ("fußball@example.com", "fußball", "example.com", None),  # 7
    ("π@example.com", "π", "example.com", None),  # 8
    ("Σ@example.com/foo", "σ", "example.com", "foo"),  # 9
    ("σ@example.com/foo", "σ", "example.com", "foo"),  # 10
    ("ς@example.com/foo", "ς", "example.com", "foo"),  # 11
    ("king@example.com/♚", "king", "example.com", "♚"),  # 12
    ("example.com", None, "example.com", None),  # 13
    ("example.com/foobar", None, "example.com", "foobar"),  # 14
    ("a.example.com/b@example.net", None, "a.example.com", "b@example.net"),  # 15
]

# RFC 7622 §3.5.2, numbered as in the RFC. Example 18 is left out: see test_rfc_example_18.
RFC_INVALID = [
    '"juliet"@example.com',  # 16: quotation marks in the localpart (§3.3.1)
    "foo bar@example.com",  # 17: space in the localpart
    "@example.com/",  # 19: empty localpart and resourcepart
    "henryⅣ@example.com",  # 20: compatibility-decomposable U+2163 in the localpart
    "♚@example.com",  # 21: symbol in the localpart
    "juliet@",  # 22: empty domainpart
    "/foobar",  # 23: no domainpart
]

# (input, canonical string, local, domain, resource) beyond the RFC's own examples.
VALID = [
    # Case: localpart and domainpart are case-mapped, the resourcepart keeps its case.
    ("User@Example.COM/Res", "user@example.com/Res", "user", "example.com", "Res"),
    ("ÉLODIE@EXAMPLE.com", "élodie@example.com", "élodie", "example.com", None),
    # Unicode toLowerCase maps a word-final capital sigma to final sigma ς (SpecialCasing.txt).
    ("ΣΑΣ@example.com", "σας@example.com", "σας", "example.com", None),
    # Fullwidth: width-mapped in localpart (RFC 8265 §3.3.2) and domain (UTS #46), kept in resource.
    ("ＪＵＬＩＥＴ@ＥＸＡＭＰＬＥ．ｃｏｍ/ＲＥＳ", "juliet@example.com/ＲＥＳ",
     "juliet", "example.com", "ＲＥＳ"),
    # NFC in every part.
    ("e\u0301@example.com/Re\u0301s", "é@example.com/Rés", "é", "example.com", "Rés"),
    # OpaqueString maps non-ASCII spaces to U+0020 (RFC 8265 §4.2.1).
    ("juliet@example.com/a\u00a0b", "juliet@example.com/a b", "juliet", "example.com", "a b"),
    ("juliet@example.com/\u3000x", "juliet@example.com/ x", "juliet", "example.com", " x"),
    # The first "/" starts the resource; "@" and "/" are fine inside it (RFC 7622 §3.1).
    ("a@b.example/c/d@e", "a@b.example/c/d@e", "a", "b.example", "c/d@e"),
    ("b.example/@", "b.example/@", None, "b.example", "@"),
    ("a@b.example//", "a@b.example//", "a", "b.example", "/"),
    ("b.example/a@b.example", "b.example/a@b.example", None, "b.example", "a@b.example"),
    # Characters the localpart may hold although they look special.
    ("a.b-c_d+e=f!g#h$i%j*k?l^m`n{o|p}q~r@example.com", None, None, "example.com", None),
    ("\\@example.com", "\\@example.com", "\\", "example.com", None),
    # IDN: U-label and A-label spell the same domain; output is the lower-case U-label.
    ("bücher.example", "bücher.example", None, "bücher.example", None),
    ("xn--bcher-kva.example", "bücher.example", None, "bücher.example", None),
    ("XN--BCHER-KVA.EXAMPLE", "bücher.example", None, "bücher.example", None),
    ("BÜCHER.example", "bücher.example", None, "bücher.example", None),
    ("u@faß.de", "u@faß.de", "u", "faß.de", None),  # IDNA2008: ß is not mapped to ss
    ("u@xn--fa-hia.de", "u@faß.de", "u", "faß.de", None),
    ("例え.テスト", "例え.テスト", None, "例え.テスト", None),
    ("example\u3002com", "example.com", None, "example.com", None),  # ideographic full stop
    # One trailing dot is removed (RFC 7622 §3.2).
    ("example.com.", "example.com", None, "example.com", None),
    ("u@Example.COM./r", "u@example.com/r", "u", "example.com", "r"),
    ("example.com\u3002", "example.com", None, "example.com", None),
    ("localhost", "localhost", None, "localhost", None),
    ("x.123abc", "x.123abc", None, "x.123abc", None),
    ("9abc.example", "9abc.example", None, "9abc.example", None),
    # IP literals (RFC 7622 §3.2).
    ("127.0.0.1", "127.0.0.1", None, "127.0.0.1", None),
    ("u@192.0.2.1/r", "u@192.0.2.1/r", "u", "192.0.2.1", "r"),
    ("192.0.2.1.", "192.0.2.1", None, "192.0.2.1", None),
    ("１９２.０.２.１", "192.0.2.1", None, "192.0.2.1", None),  # fullwidth digits map to ASCII
    ("[::1]", "[::1]", None, "[::1]", None),
    ("u@[0:0:0:0:0:0:0:1]/r", "u@[::1]/r", "u", "[::1]", "r"),
    ("[2001:DB8::A]", "[2001:db8::a]", None, "[2001:db8::a]", None),
]

INVALID = [
    # Empty input and empty parts.
    "", "@", "/", "@/", "@example.com", "u@", "example.com/", "u@example.com/", "u@/r", "@/r",
    # Localpart characters forbidden by RFC 7622 §3.3.1 (besides "@" and "/" which split).
    'a"b@example.com', "a&b@example.com", "a'b@example.com", "a:b@example.com",
    "a<b@example.com", "a>b@example.com",
    "a＠b@example.com",  # fullwidth "@" width-maps to "@"
    "a＂b@example.com",  # fullwidth quotation mark width-maps to '"'
    # Spaces, controls, surrogates, ignorables.
    " juliet@example.com", "juliet @example.com", "jul\tiet@example.com",
    "a\u00a0b@example.com", "jul\x00iet@example.com", "a\x7f@example.com",
    "\ud800@example.com", "a\u200bb@example.com",
    "u@example.com/a\tb", "u@example.com/\x00", "u@example.com/\ud83d", "u@example.com/a\u200bb",
    "u@example.com/\u200d",
    # Compatibility characters and symbols the IdentifierClass disallows in a localpart.
    "ﬁ@example.com", "ǅ@example.com", "ſ@example.com", "☃@example.com",
    # Domain labels: empty, too long, hyphens, characters outside LDH/IDNA2008.
    "a..b", ".example.com", "example.com..", ".", "..", "u@.",
    "a" * 64 + ".example",
    "-a.example", "a-.example", "u@example-.com",
    "_xmpp.example.com", "a b.example", "exa mple.com", "exa\x00mple.com", "\ud800.example",
    "a:b.example", "example.com＠", "a\u200db.example",
    "a#b.example", "a*b.example",
    "xn--a.example",  # A-label that does not decode
    "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63,  # 255 octets > DNS 253
    # Domains that are neither IPv4 addresses nor names (RFC 3696 §2: no numeric TLD).
    "1.2.3", "256.1.1.1", "01.2.3.4x.5", "1.2.3.4.5", "example.123",
    # IPv6 literals: brackets required, no zone identifier, must parse.
    "::1", "[::1", "::1]", "[::g]", "[::1%eth0]", "[1.2.3.4]", "[]", "u@[::1]x", "[::1]]",
    # "@" in what would be the domainpart.
    "a@b@example.com",
]


def short_id(value: object) -> str:
    """Readable test ids for very long strings."""
    if isinstance(value, str) and len(value) > 40:
        return f"{value[:1]!r}x{len(value)}"
    return repr(value)


def parts(jid: JID) -> tuple[str | None, str, str | None]:
    return jid.local, jid.domain, jid.resource


# --- RFC 7622 §3.5 examples ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "local", "domain", "resource"), RFC_VALID)
def test_rfc_valid_examples(text: str, local: str | None, domain: str,
                            resource: str | None) -> None:
    assert parts(JID.parse(text)) == (local, domain, resource)


@pytest.mark.parametrize("text", RFC_INVALID)
def test_rfc_invalid_examples(text: str) -> None:
    with pytest.raises(InvalidJID):
        JID.parse(text)


def test_rfc_example_18() -> None:
    # RFC 7622 §3.5.2 lists "juliet@example.com/ foo" as invalid, but verified erratum EID 4560
    # removes it: OpaqueString does not forbid a leading space. We follow the erratum.
    jid = JID.parse("juliet@example.com/ foo")
    assert parts(jid) == ("juliet", "example.com", " foo")
    assert jid != JID.parse("juliet@example.com/foo")


def test_rfc_case_mapped_examples_relate_as_specified() -> None:
    # Examples 9-11: Σ lower-cases to σ; final sigma ς is a different code point and stays.
    assert JID.parse("Σ@example.com/foo") == JID.parse("σ@example.com/foo")
    assert JID.parse("ς@example.com/foo") != JID.parse("σ@example.com/foo")
    # Examples 6-7: RFC 8265 dropped case folding, so ß is not ss.
    assert JID.parse("fussball@example.com") != JID.parse("fußball@example.com")


# --- normalisation table ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "canonical", "local", "domain", "resource"), VALID)
def test_valid(text: str, canonical: str | None, local: str | None, domain: str,
               resource: str | None) -> None:
    jid = JID.parse(text)
    if canonical is not None:
        assert str(jid) == canonical
        assert parts(jid) == (local, domain, resource)
    else:  # the input was already canonical
        assert str(jid) == text
    assert jid.domain == domain


@pytest.mark.parametrize("text", [row[0] for row in RFC_VALID + VALID]
                         + ["juliet@example.com/ foo"])
def test_canonical_string_round_trips(text: str) -> None:
    jid = JID.parse(text)
    again = JID.parse(str(jid))
    assert again == jid
    assert parts(again) == parts(jid)
    assert str(again) == str(jid)
    assert JID.from_parts(*parts(jid)) == jid


@pytest.mark.parametrize("text", INVALID)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidJID):
        JID.parse(text)


def test_invalid_jid_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        JID.parse("@example.com")


@pytest.mark.parametrize("value", [None, b"juliet@example.com", 42, ["a@b"], bytearray(b"x")])
def test_non_str_input_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidJID):
        JID.parse(value)
    with pytest.raises(InvalidJID):
        normalize_localpart(value)
    with pytest.raises(InvalidJID):
        normalize_domain(value)
    with pytest.raises(InvalidJID):
        normalize_resource(value)
    if value is not None:  # None means "absent" for localpart and resource
        with pytest.raises(InvalidJID):
            JID.from_parts(value, "example.com")
        with pytest.raises(InvalidJID):
            JID.from_parts("u", "example.com", value)
    with pytest.raises(InvalidJID):
        JID.from_parts("u", value)


# --- length limits (RFC 7622 §3.2-§3.4: 1023 octets after normalisation) -----------------------

@pytest.mark.parametrize(("local", "ok"), [
    ("a" * 1023, True),
    ("a" * 1024, False),
    ("é" * 511 + "a", True),  # 1023 octets in 512 code points
    ("é" * 512, False),  # 1024 octets in 512 code points
    ("A" * 1023, True),
    ("Ａ" * 1023, True),  # 3069 octets in, 1023 after width mapping
    ("Ａ" * 1024, False),
    ("a" * 100_000, False),  # refused before PRECIS sees it
], ids=short_id)
def test_localpart_length(local: str, ok: bool) -> None:
    text = f"{local}@example.com"
    if ok:
        assert len(JID.parse(text).local.encode()) <= 1023  # type: ignore[union-attr]
    else:
        with pytest.raises(InvalidJID):
            JID.parse(text)


@pytest.mark.parametrize(("resource", "ok"), [
    ("r" * 1023, True),
    ("r" * 1024, False),
    ("♚" * 341, True),  # 1023 octets
    ("♚" * 342, False),  # 1026 octets
    ("x" * 1022 + "/", True),
    ("r" * 100_000, False),
], ids=short_id)
def test_resourcepart_length(resource: str, ok: bool) -> None:
    text = f"juliet@example.com/{resource}"
    if ok:
        assert JID.parse(text).resource == resource
    else:
        with pytest.raises(InvalidJID):
            JID.parse(text)


def test_domainpart_at_dns_length_limit() -> None:
    longest = "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61  # 253 octets
    assert JID.parse(longest).domain == longest
    assert JID.parse(longest + ".").domain == longest
    with pytest.raises(InvalidJID):
        JID.parse("x" * 100_000)


# --- the normalise_* functions ---------------------------------------------------------------

@pytest.mark.parametrize(("func", "given", "expected"), [
    (normalize_localpart, "Juliet", "juliet"),
    (normalize_localpart, "ＪＵＬＩＥＴ", "juliet"),
    (normalize_localpart, "fußball", "fußball"),
    (normalize_domain, "Example.COM.", "example.com"),
    (normalize_domain, "xn--bcher-kva.example", "bücher.example"),
    (normalize_domain, "[::0:1]", "[::1]"),
    (normalize_domain, "10.0.0.1", "10.0.0.1"),
    (normalize_resource, "Balcony", "Balcony"),
    (normalize_resource, "a\u2000b", "a b"),
    (normalize_resource, "foo@bar/baz", "foo@bar/baz"),
])
def test_normalize_functions(func: Any, given: str, expected: str) -> None:
    assert func(given) == expected
    assert func(expected) == expected  # idempotent


@pytest.mark.parametrize(("func", "given"), [
    (normalize_localpart, ""),
    (normalize_localpart, "a@b"),
    (normalize_localpart, "a/b"),
    (normalize_localpart, "a b"),
    (normalize_domain, ""),
    (normalize_domain, "a..b"),
    (normalize_domain, "a/b"),
    (normalize_domain, "a@b"),
    (normalize_resource, ""),
    (normalize_resource, "\x00"),
])
def test_normalize_functions_reject(func: Any, given: str) -> None:
    with pytest.raises(InvalidJID):
        func(given)


# --- equality and hashing --------------------------------------------------------------------

EQUAL = [
    ("User@Example.COM/Res", "user@example.com/Res"),
    ("juliet@bücher.example", "JULIET@xn--bcher-kva.example"),
    ("ＪＵＬＩＥＴ@example.com", "juliet@example.com"),
    ("é@example.com", "e\u0301@example.com"),
    ("example.com.", "example.com"),
    ("[::1]/r", "[0::1]/r"),
    ("u@example.com/a\u00a0b", "u@example.com/a b"),
]

UNEQUAL = [
    ("u@example.com/Res", "u@example.com/res"),  # resource case is significant
    ("u@example.com/ＲＥＳ", "u@example.com/RES"),  # and OpaqueString does no width mapping
    ("u@example.com", "u@example.com/r"),
    ("example.com", "u@example.com"),
    ("example.com", "example.com/r"),
    ("u@example.com", "u@example.net"),
    ("u@a.example", "a.example/u"),
    ("u@example.com/r", "example.com/u@example.com/r"),
]


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_equal(a: str, b: str) -> None:
    ja, jb = JID.parse(a), JID.parse(b)
    assert ja == jb
    assert not ja != jb  # noqa: SIM202 -- __ne__ must agree with __eq__
    assert hash(ja) == hash(jb)
    assert str(ja) == str(jb)
    assert len({ja, jb}) == 1
    assert {ja: 1}[jb] == 1


@pytest.mark.parametrize(("a", "b"), UNEQUAL)
def test_unequal(a: str, b: str) -> None:
    ja, jb = JID.parse(a), JID.parse(b)
    assert ja != jb
    assert not ja == jb  # noqa: SIM201
    assert len({ja, jb}) == 2


def test_not_equal_to_strings_or_other_types() -> None:
    jid = JID.parse("juliet@example.com")
    assert jid != "juliet@example.com"
    assert "juliet@example.com" != jid  # noqa: SIM300 -- the reflected comparison
    assert jid != None  # noqa: E711
    assert jid != ("juliet", "example.com", None)


def test_constructors_agree() -> None:
    want = JID.parse("juliet@example.com/balcony")
    assert JID.from_parts("Juliet", "EXAMPLE.com", "balcony") == want
    assert JID("juliet", "example.com", "balcony") == want
    assert JID.from_parts(None, "example.com") == JID.parse("example.com")
    assert JID.from_parts("juliet", "example.com") == JID.parse("juliet@example.com")
    assert JID.from_parts(None, "example.com", "r") == JID.parse("example.com/r")


@pytest.mark.parametrize(("local", "domain", "resource"), [
    ("", "example.com", None),
    ("juliet", "", None),
    ("juliet", "example.com", ""),
    ("a@b", "example.com", None),
    ("a/b", "example.com", None),
    ("a:b", "example.com", None),
    ("a b", "example.com", None),
    (None, "example.com/r", None),
    (None, "u@example.com", None),
    ("u", "a..b", None),
    ("u", "example.com", "\x00"),
])
def test_from_parts_validates_each_part(local: str | None, domain: str,
                                        resource: str | None) -> None:
    with pytest.raises(InvalidJID):
        JID.from_parts(local, domain, resource)


def test_from_parts_allows_separators_inside_resource() -> None:
    jid = JID.from_parts("u", "example.com", "a/b@c")
    assert str(jid) == "u@example.com/a/b@c"
    assert JID.parse(str(jid)) == jid


# --- bare, with_resource, kinds --------------------------------------------------------------

@pytest.mark.parametrize(("text", "is_bare", "is_domain"), [
    ("example.com", True, True),
    ("example.com/r", False, False),
    ("u@example.com", True, False),
    ("u@example.com/r", False, False),
    ("[::1]", True, True),
])
def test_kinds(text: str, is_bare: bool, is_domain: bool) -> None:
    jid = JID.parse(text)
    assert jid.is_bare is is_bare
    assert jid.is_domain is is_domain


@pytest.mark.parametrize(("text", "bare"), [
    ("u@example.com/r", "u@example.com"),
    ("U@Example.com/R/S@T", "u@example.com"),
    ("example.com/r", "example.com"),
    ("Example.com./r", "example.com"),
])
def test_bare(text: str, bare: str) -> None:
    full = JID.parse(text)
    assert str(full.bare) == bare
    assert full.bare == JID.parse(bare)
    assert full.bare.is_bare
    assert full.bare.resource is None
    assert full.bare is full.bare  # cached
    assert full.bare.bare is full.bare  # a bare JID is its own bare JID
    # Shared with the parse cache entry of the text before the "/".
    assert full.bare is JID.parse(text.partition("/")[0])


def test_bare_of_bare_is_self() -> None:
    for text in ("u@example.com", "example.com"):
        jid = JID.parse(text)
        assert jid.bare is jid


def test_with_resource() -> None:
    bare = JID.parse("juliet@example.com")
    full = bare.with_resource("Balcony\u00a01")
    assert str(full) == "juliet@example.com/Balcony 1"
    assert full.bare is bare
    assert full == JID.parse("juliet@example.com/Balcony 1")
    other = full.with_resource("garden")
    assert str(other) == "juliet@example.com/garden"
    assert other.bare is bare
    assert str(JID.parse("example.com").with_resource("x@y/z")) == "example.com/x@y/z"
    assert bare.resource is None  # the original is unchanged
    for bad in ("", "a\x00b", "\ud800"):
        with pytest.raises(InvalidJID):
            bare.with_resource(bad)
    with pytest.raises(InvalidJID):
        bare.with_resource(None)  # type: ignore[arg-type]


def test_from_parts_full_jid_has_a_bare() -> None:
    full = JID.from_parts("u", "example.com", "r")
    assert full.bare == JID.parse("u@example.com")
    assert full.bare is full.bare


# --- caching ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["juliet@example.com/balcony", "example.com", "u@[::1]",
                                  "User@Example.COM/Res"])
def test_parse_is_cached(text: str) -> None:
    assert JID.parse(text) is JID.parse(text)


class _CountingProfile:
    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[str] = []

    def enforce(self, s: str) -> str:
        self.calls.append(s)
        result: str = self.real.enforce(s)
        return result


_fresh = itertools.count()


def test_precis_runs_once_per_part(monkeypatch: pytest.MonkeyPatch) -> None:
    username = _CountingProfile(jid_module._USERNAME)
    opaque = _CountingProfile(jid_module._OPAQUE)
    monkeypatch.setattr(jid_module, "_USERNAME", username)
    monkeypatch.setattr(jid_module, "_OPAQUE", opaque)
    # Other tests fill the per-part caches ("one" is a common resource): start empty.
    for cached in (jid_module._localpart, jid_module._resource, jid_module._domain,
                   jid_module._parse):
        cached.cache_clear()
    local = f"Cache{next(_fresh)}-{id(username)}"  # never seen by the caches before

    full = JID.parse(f"{local}@example.com/one")
    assert username.calls == [local]
    assert opaque.calls == ["one"]
    # Deriving the bare JID, another resource of the same account, and re-parsing cost nothing.
    assert full.bare.local == local.lower()
    second = JID.parse(f"{local}@example.com/two")
    assert second.bare is full.bare
    third = full.with_resource("three")
    assert third.bare is full.bare
    assert JID.parse(f"{local}@example.com/one") is full
    assert JID.parse(f"{local}@example.com") is full.bare
    assert username.calls == [local]
    assert opaque.calls == ["one", "two", "three"]


def test_parse_failures_are_not_cached_as_success() -> None:
    for _ in range(2):
        with pytest.raises(InvalidJID):
            JID.parse("a..b")


# --- immutability, copying, representation --------------------------------------------------

def test_immutable() -> None:
    jid = JID.parse("juliet@example.com/balcony")
    for name in ("local", "domain", "resource", "_str", "_hash", "_bare", "other"):
        with pytest.raises(AttributeError):
            setattr(jid, name, "x")
        with pytest.raises(AttributeError):
            delattr(jid, name)
    assert not hasattr(jid, "__dict__")
    assert str(jid) == "juliet@example.com/balcony"


def test_copy_and_pickle() -> None:
    jid = JID.parse("Juliet@Example.com/Balcony")
    assert copy.copy(jid) is jid
    assert copy.deepcopy(jid) is jid
    clone = pickle.loads(pickle.dumps(jid))
    assert clone == jid
    assert parts(clone) == ("juliet", "example.com", "Balcony")
    assert clone.bare == jid.bare


def test_str_and_repr() -> None:
    jid = JID.parse("Juliet@Example.com/Balcony")
    assert str(jid) == "juliet@example.com/Balcony"
    assert repr(jid) == "JID('juliet@example.com/Balcony')"
    assert f"{jid}" == "juliet@example.com/Balcony"
