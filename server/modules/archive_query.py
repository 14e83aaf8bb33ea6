"""The XEP-0313 query protocol shared by every archive we serve: a user's (server/modules/mam.py)
and a MUC room's (server/modules/muc/): the query form, parsing a query into an ArchiveQuery,
the result messages and the <fin/> that ends a page; XEP-0082 stamps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza
from server.storage.archive import ArchivePage, ArchiveQuery
from server.xml import ns
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int
from server.xml.stanza import child, element

if TYPE_CHECKING:
    from server.config import Config

MAM2 = "urn:xmpp:mam:2"
MAM1 = "urn:xmpp:mam:1"
FORWARD = "urn:xmpp:forward:0"
RSM = "http://jabber.org/protocol/rsm"
XDATA_VALIDATE = "http://jabber.org/protocol/xdata-validate"

_DELAY = ns.q(ns.DELAY, "delay")
_X = ns.q(ns.DATA_FORMS, "x")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_DEFAULT_PAGE = 50
_MAX_ASKED = 10**18  # a larger <max/> is not a number a client means: bad-request, not a page


DEFAULT_MAX_PAGE = 250  # [mam] max_page's default (server/modules/mam.py)


def max_page(config: Config) -> int:
    """The one page limit of every archive query, a user's and a room's: `[mam] max_page`
    (a room archive lives in the MAM module's store, so it follows that module's setting)."""
    settings = config.modules.get("mam")
    return int(settings.max_page) if settings is not None else DEFAULT_MAX_PAGE


def stamp(us: int) -> str:
    """XEP-0082 DateTime of microseconds since the epoch, UTC, to the microsecond (so that a
    stamp given back as start/end matches its message exactly)."""
    seconds, micro = divmod(us, 1_000_000)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{micro:06d}Z"


def parse_stamp(text: str) -> int:
    """Microseconds since the epoch of an XEP-0082 DateTime; StanzaError when invalid."""
    text = text.strip()
    if "T" not in text:
        raise StanzaError("bad-request", f"not an XEP-0082 DateTime: {text!r}")
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise StanzaError("bad-request", f"not an XEP-0082 DateTime: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_query(query_el: Stanza, xmlns: str, max_page: int) -> tuple[ArchiveQuery, bool]:
    """A XEP-0313 query (its form and RSM set) as an ArchiveQuery, and whether the page is
    to be flipped (<flip-page/>); StanzaError for what it cannot be."""
    fields: dict[str, list[str]] = {}
    given = query_el.find(_X)
    if given is not None:
        for f in given.iterfind(ns.q(ns.DATA_FORMS, "field")):
            var = f.get("var", "")
            fields[var] = [v.text or "" for v in f.iterfind(ns.q(ns.DATA_FORMS, "value"))]
    form_type = fields.pop("FORM_TYPE", [xmlns])
    if form_type and form_type[0] != xmlns:
        raise StanzaError("bad-request", f"FORM_TYPE must be {xmlns}")
    known = {"with", "start", "end"} | ({"before-id", "after-id", "ids"}
                                        if xmlns == MAM2 else set())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise StanzaError("bad-request", f"unsupported field {unknown[0]!r}")

    def single(name: str) -> str | None:
        values = fields.get(name)
        if not values or not values[0].strip():
            return None
        return values[0].strip()

    with_bare = with_resource = None
    if (text := single("with")) is not None:
        try:
            with_jid = JID.parse(text)
        except InvalidJID as exc:
            raise StanzaError("jid-malformed", f"'with': {exc}") from None
        with_bare, with_resource = str(with_jid.bare), with_jid.resource
    start = parse_stamp(text) if (text := single("start")) is not None else None
    end = parse_stamp(text) if (text := single("end")) is not None else None
    ids = None
    if "ids" in fields:
        ids = tuple(dict.fromkeys(v.strip() for v in fields["ids"] if v.strip()))
        if len(ids) > max_page:
            raise StanzaError("policy-violation",
                              f"at most {max_page} ids per query")
    rsm = query_el.find(ns.q(RSM, "set"))
    limit = min(_DEFAULT_PAGE, max_page)
    after = before = None
    if rsm is not None:
        max_text = rsm.findtext(ns.q(RSM, "max"))
        if max_text is not None:
            try:  # XEP-0059 §2.1: a non-negative integer; '²' or 5,000 digits is bad-request
                limit = parse_int(max_text.strip(), maximum=_MAX_ASKED, name="<max/>")
            except NumberError as err:
                raise StanzaError("bad-request", str(err)) from None
            if limit > max_page:
                raise StanzaError("policy-violation",
                                  f"at most {max_page} messages per page")
        after_el = rsm.find(ns.q(RSM, "after"))
        if after_el is not None:
            after = (after_el.text or "").strip()
            if not after:
                raise StanzaError("bad-request", "<after/> needs an id")
        before_el = rsm.find(ns.q(RSM, "before"))
        if before_el is not None:
            before = (before_el.text or "").strip()
        if rsm.find(ns.q(RSM, "index")) is not None:
            raise StanzaError("feature-not-implemented", "paging by <index/>")
    flip = query_el.find(ns.q(xmlns, "flip-page")) is not None
    return ArchiveQuery(with_bare=with_bare, with_resource=with_resource, start=start,
                        end=end, after_id=single("after-id"), before_id=single("before-id"),
                        ids=ids, after=after, before=before, max=limit), flip


def form(xmlns: str) -> Stanza:
    """XEP-0313 §4.1.1: the query form, with the #extended fields on mam:2."""
    query = element(ns.q(xmlns, "query"))
    form = child(query, _X, {"type": "form"})
    field_tag = ns.q(ns.DATA_FORMS, "field")
    hidden = child(form, field_tag, {"type": "hidden", "var": "FORM_TYPE"})
    child(hidden, ns.q(ns.DATA_FORMS, "value"), text=xmlns)
    # XEP-0004 §3.2: a label for each field a client shows (profanity prints the var and
    # "(null)" without one: issue 19).
    child(form, field_tag, {"type": "jid-single", "var": "with", "label": "With"})
    child(form, field_tag, {"type": "text-single", "var": "start",
                            "label": "From this time (XEP-0082)"})
    child(form, field_tag, {"type": "text-single", "var": "end",
                            "label": "Until this time (XEP-0082)"})
    if xmlns == MAM2:
        child(form, field_tag, {"type": "text-single", "var": "before-id",
                                "label": "Before this archive id"})
        child(form, field_tag, {"type": "text-single", "var": "after-id",
                                "label": "After this archive id"})
        ids = child(form, field_tag, {"type": "list-multi", "var": "ids",
                                      "label": "These archive ids"})
        validate = child(ids, ns.q(XDATA_VALIDATE, "validate"), {"datatype": "xs:string"})
        child(validate, ns.q(XDATA_VALIDATE, "open"))
    return query


def result_message(archive_id: str, ts: int, data: bytes, xmlns: str, queryid: str | None,
                    to: str, archive_from: str | None) -> Stanza:
    message = element(st.MESSAGE, {"to": to})
    if archive_from:
        message.set("from", archive_from)
    attrs = {"id": archive_id}
    if queryid is not None:
        attrs["queryid"] = queryid
    res = child(message, ns.q(xmlns, "result"), attrs)
    forwarded = child(res, ns.q(FORWARD, "forwarded"))
    child(forwarded, _DELAY, {"stamp": stamp(ts)})
    forwarded.append(etree.fromstring(data, _PARSER))
    return message


def fin(page: ArchivePage, xmlns: str, queryid: str | None) -> Stanza:
    fin = element(ns.q(xmlns, "fin"))
    if queryid is not None and xmlns == MAM2:
        fin.set("queryid", queryid)
    if page.complete:
        fin.set("complete", "true")
    rsm = child(fin, ns.q(RSM, "set"))
    if page.items:
        first = child(rsm, ns.q(RSM, "first"), text=page.items[0].id)
        if page.first_index is not None:
            first.set("index", str(page.first_index))
        child(rsm, ns.q(RSM, "last"), text=page.items[-1].id)
    if page.count is not None:
        child(rsm, ns.q(RSM, "count"), text=str(page.count))
    return fin


__all__ = ["MAM1", "MAM2", "fin", "form", "parse_query", "parse_stamp", "result_message", "stamp"]
