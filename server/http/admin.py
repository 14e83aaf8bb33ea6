"""The pieces of the admin web page (server/modules/webadmin.py) that need no server: the
one-hour ring buffer of samples, its graphs as server-rendered SVG, the signed session cookie,
and the HTML frame every page is drawn in. Everything put into HTML goes through ``esc``."""

from __future__ import annotations

import base64
import hmac
import json
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

SPAN = 3600.0          # the graphs show the last hour
SAMPLE_EVERY = 5.0     # seconds between samples: 720 of them fill the hour

# What each graph shows: (Sample attribute, title, unit).
GRAPHS: tuple[tuple[str, str, str], ...] = (
    ("messages", "Messages routed per second", "msg/s"),
    ("sessions", "Client sessions", "sessions"),
    ("s2s", "Server-to-server links", "links"),
    ("memory", "Memory (resident)", "MiB"),
)


def esc(value: object) -> str:
    """Text for HTML content and double-quoted attributes."""
    return escape(str(value), quote=True)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float          # time.time()
    messages: float    # messages routed per second since the previous sample
    sessions: int
    s2s: int
    memory: float      # resident memory, MiB


class History:
    """The samples of the last ``span`` seconds, oldest first (a ring buffer)."""

    def __init__(self, span: float = SPAN, every: float = SAMPLE_EVERY) -> None:
        self.samples: deque[Sample] = deque(maxlen=math.ceil(span / every) + 1)
        self.span = span
        self._last_count: int | None = None
        self._last_at = 0.0

    def add(self, at: float, messages_total: int, sessions: int, s2s: int,
            memory: float) -> Sample:
        """A new sample from the running totals: the message rate is the count's growth since
        the previous sample (0 for the first)."""
        rate = 0.0
        if self._last_count is not None and at > self._last_at:
            rate = max(0, messages_total - self._last_count) / (at - self._last_at)
        self._last_count, self._last_at = messages_total, at
        sample = Sample(at, rate, sessions, s2s, memory)
        self.samples.append(sample)
        return sample

    def series(self, name: str) -> list[tuple[float, float]]:
        return [(s.at, float(getattr(s, name))) for s in self.samples]


def resident_mib() -> float:
    """This process's resident memory in MiB (Linux /proc; elsewhere the peak from rusage)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1048576
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^n at or above value (the y axis's top)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * power:
            return step * power
    return 10.0 * power


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".")


def svg_chart(title: str, unit: str, points: Sequence[tuple[float, float]], now: float,
              span: float = SPAN, width: int = 560, height: int = 170) -> str:
    """A line graph of (time, value) points over the ``span`` seconds before ``now``, as an
    inline <svg> with a title, the y scale, the last value and the time axis in minutes."""
    left, right, top, bottom = 48, 12, 28, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    shown = [(t, v) for t, v in points if now - span <= t <= now + 1]
    peak = max((v for _, v in shown), default=0.0)
    y_top = _nice_top(peak)

    def x(t: float) -> float:
        return left + plot_w * (1 - min(span, max(0.0, now - t)) / span)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" role="img" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f"<title>{esc(title)}</title>",
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfbfd" '
             f'stroke="#ccd"/>']
    for fraction in (0.0, 0.5, 1.0):  # y grid and labels
        gy = top + plot_h * (1 - fraction)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{gy:.1f}" y2="{gy:.1f}" '
                     f'stroke="#e3e3ea"/>')
        parts.append(f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end" '
                     f'class="axis">{esc(_number(y_top * fraction))}</text>')
    for minutes in (60, 45, 30, 15, 0):  # time axis
        gx = x(now - minutes * 60)
        parts.append(f'<text x="{gx:.1f}" y="{height - 6}" text-anchor="middle" '
                     f'class="axis">{"now" if minutes == 0 else f"-{minutes} min"}</text>')
    last = shown[-1][1] if shown else None
    caption = f"{title}: {_number(last)} {unit}" if last is not None else f"{title}: no data yet"
    parts.append(f'<text x="{left}" y="18" class="caption">{esc(caption)}</text>')
    parts.append(f'<text x="{width - right}" y="18" text-anchor="end" class="axis">'
                 f'max {esc(_number(peak))}</text>')
    if shown:
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in shown)
        if len(shown) == 1:
            cx, cy = coords.split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="#3465a4"/>')
        else:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="#3465a4" '
                         f'stroke-width="2" stroke-linejoin="round"/>')
    parts.append("</svg>")
    return "".join(parts)


# -- the session cookie -----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a session cookie says: who, until when, and its nonce (the session's name)."""
    jid: str
    expires: int
    nonce: str


class CookieSigner:
    """Session cookies ``<payload>.<mac>``: the payload is [jid, expires, nonce] as JSON, the MAC
    an HMAC-SHA256 under the key in data_dir over the payload and the account's current SCRAM
    StoredKey, so a password change ends every session signed before it. Nothing secret is in
    the cookie; nothing is stored server-side but the nonces of logged-out sessions."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: str, binding: bytes) -> bytes:
        return hmac.digest(self._key, payload.encode() + b"\0" + binding, "sha256")

    def sign(self, ticket: Ticket, binding: bytes) -> str:
        payload = _b64(json.dumps([ticket.jid, ticket.expires, ticket.nonce]).encode())
        return f"{payload}.{_b64(self._mac(payload, binding))}"

    @staticmethod
    def read(value: str) -> Ticket | None:
        """The cookie's claim, unverified (to know whose StoredKey to check it with)."""
        payload, _, _mac = value.partition(".")
        try:
            jid, expires, nonce = json.loads(_unb64(payload))
        except (ValueError, TypeError):
            return None
        if not (isinstance(jid, str) and type(expires) is int and isinstance(nonce, str)):
            return None
        return Ticket(jid, expires, nonce)

    def verify(self, value: str, binding: bytes, now: float | None = None) -> Ticket | None:
        ticket = self.read(value)
        if ticket is None:
            return None
        payload, _, mac = value.partition(".")
        try:
            given = _unb64(mac)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._mac(payload, binding)):
            return None
        if ticket.expires <= (time.time() if now is None else now):
            return None
        return ticket

    def token(self, purpose: str, nonce: str) -> str:
        """A form token bound to a session (or a login attempt's cookie) nonce."""
        return _b64(hmac.digest(self._key, f"{purpose}\0{nonce}".encode(), "sha256"))[:32]


# -- pages ------------------------------------------------------------------------------------

NAV = (("/admin", "Overview"), ("/admin/accounts", "Accounts"), ("/admin/online", "Online"),
       ("/admin/s2s", "Server links"), ("/admin/rooms", "Rooms"))

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f4f5f7}
header{background:#2e3440;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;
 align-items:center;flex-wrap:wrap}
header a{color:#dfe6f0;text-decoration:none}header a.here{color:#fff;font-weight:bold}
header form{margin-left:auto}main{padding:1em 1.4em;max-width:1200px}
table{border-collapse:collapse;background:#fff;margin:.6em 0}
td,th{border:1px solid #d8dae0;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eceef3}.notice{background:#e6f4ea;border:1px solid #9c9;padding:.5em}
.error{background:#fdecea;border:1px solid #e99;padding:.5em}
.graphs{display:flex;flex-wrap:wrap;gap:1em}.graph{background:#fff;border:1px solid #d8dae0}
.axis{font-size:11px;fill:#667}.caption{font-size:13px;font-weight:bold;fill:#222}
fieldset{background:#fff;border:1px solid #d8dae0;margin:.8em 0}label{margin-right:.8em}
input{margin:.2em}.inline{display:inline}
"""


def page(title: str, body: str, *, here: str = "", admin: str | None = None,
         csrf: str = "") -> str:
    """A whole page: the title, the navigation (when logged in, with a logout button) and the
    body, which the caller has escaped."""
    nav = ""
    if admin is not None:
        links = "".join(f'<a href="{href}"{" class=here" if href == here else ""}>{esc(name)}</a>'
                        for href, name in NAV)
        nav = (f"<header><strong>presenced admin</strong>{links}"
               f'<form method="post" action="/admin/logout" class="inline">'
               f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
               f"{esc(admin)} <button>Log out</button></form></header>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)} · presenced</title><style>{_STYLE}</style></head>"
            f"<body>{nav}<main><h1>{esc(title)}</h1>{body}</main></body></html>")


def table(headings: Iterable[str], rows: Iterable[Iterable[str]], empty: str) -> str:
    """A table; each cell is HTML the caller made (escaped) already."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    if not body:
        return f"<p>{esc(empty)}</p>"
    names = list(headings)
    head = ("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in names) + "</tr></thead>"
            if any(names) else "")
    return f"<table>{head}<tbody>{body}</tbody></table>"
