"""The one HTTP server (aiohttp) on ``[listen] http`` and ``[listen] https``, with its settings
``[http]``: XMPP over WebSocket at /xmpp-websocket (RFC 7395), BOSH at /http-bind (XEP-0206),
XEP-0156 host-meta, /metrics.
Other modules serve paths of their own through ``route`` (upload: server/modules/upload.py).

    [listen]
    https = ["127.0.0.1:5281"]      # TLS with the [tls] certificates (SNI as for c2s)
    http = []                       # plain, for a reverse proxy in front
    [http]
    external_url = "https://chat.example.org/"   # what clients are told (host-meta, uploads)
    websocket_insecure = false      # ws:// without TLS (behind a proxy: trusted_proxies)
    cors_origins = ["https://..."]  # only these web origins (and our own); unset: any
    metrics_allow = ["127.0.0.1/32", "::1/128"]
    trusted_proxies = []            # proxies whose X-Forwarded-For/-Proto/-Host are believed

A plain-HTTP request counts as secure (a WebSocket or BOSH session may then log in) when
websocket_insecure is true, or when it comes from a trusted proxy that says it terminated TLS
(``X-Forwarded-Proto: https`` or ``Forwarded: proto=https``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

from aiohttp import web

from server import events, listening
from server.config import NETWORKS, Invalid, Network, bool_option, networks, option
from server.http import websocket
from server.http.bosh import Bosh
from server.http.metrics import Metrics
from server.http.tls import https_context, reload_https_context
from server.module import Module, hook

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

WEBSOCKET_PATH = "/xmpp-websocket"
BOSH_PATH = "/http-bind"
XRD_NS = "http://docs.oasis-open.org/ns/xri/xrd-1.0"
REL_WEBSOCKET = "urn:xmpp:alt-connections:websocket"  # XEP-0156
REL_BOSH = "urn:xmpp:alt-connections:xbosh"


def _url(value: Any, _ctx: Any) -> str:
    if not isinstance(value, str):
        raise Invalid
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment:
        raise Invalid(f'"{value}" is not an http:// or https:// URL without query')
    return value.rstrip("/")


def _origins(value: Any, _ctx: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid
    out = []
    for raw in value:
        if raw == "*":
            out.append(raw)
            continue
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname or \
                parts.path not in ("", "/"):
            raise Invalid(f'"{raw}" is not an origin such as "https://chat.example.org"')
        out.append(raw.rstrip("/").lower())
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPSettings:
    # The public base URL of the HTTP server; unset: taken from each request's Host (and the
    # first listener for upload URLs).
    external_url: str | None = field(metadata=option(
        'an http:// or https:// URL such as "https://chat.example.org"', _url))
    websocket_insecure: bool = field(metadata=bool_option(False))
    # Unset: any page may open WebSocket/BOSH sessions and upload (XMPP authenticates inside
    # the stream with SASL, not with cookies: a foreign page gains nothing it could not get
    # with a socket of its own; Prosody 0.12 dropped its origin check too). Set: these only,
    # besides the server's own origin.
    cors_origins: tuple[str, ...] | None = field(metadata=option(
        'a list of origins such as "https://chat.example.org", or ["*"]', _origins))
    metrics_allow: tuple[Network, ...] = field(
        metadata=option(NETWORKS, networks, ["127.0.0.1/32", "::1/128"]))
    trusted_proxies: tuple[Network, ...] = field(metadata=option(NETWORKS, networks, []))


@dataclass(frozen=True, slots=True)
class _Route:
    handler: Handler
    cors: bool


class HTTP(Module):
    name = "http"
    settings = HTTPSettings

    def __init__(self, server: Server, config: HTTPSettings) -> None:
        super().__init__(server, config)
        # The listener carries c2s streams (WebSocket, BOSH) and the metrics of the core: a
        # transport of the core's, so it holds the Server itself, not only the ModuleContext.
        self.core = server
        self._exact: dict[str, _Route] = {}
        self._prefixes: list[tuple[str, _Route]] = []
        self._runner: web.AppRunner | None = None
        self._sites: list[tuple[str, web.TCPSite]] = []
        self._ssl_context: Any = None  # the HTTPS listener's, kept for reloads
        self.route("/.well-known/host-meta", self._host_meta_xrd, cors=True)
        self.route("/.well-known/host-meta.json", self._host_meta_json, cors=True)
        self.route(WEBSOCKET_PATH, self._websocket)
        self.route("/metrics", self._metrics)
        self.bosh = Bosh(server)
        self.route(BOSH_PATH, self._bosh, cors=True)
        self.metrics: Metrics | None = None

    # -- for other modules -------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        listen = self.server.config.listen
        return bool(listen.http or listen.https)

    def route(self, path: str, handler: Handler, *, prefix: bool = False,
              cors: bool = False) -> None:
        """Serve a path (prefix: every path under it); cors: browsers of cors_origins may call
        it from their pages (preflight answered here)."""
        entry = _Route(handler, cors)
        if prefix:
            self._prefixes.append((path, entry))
        else:
            self._exact[path] = entry

    def base_url(self, request: web.Request | None = None) -> str:
        """The public base URL: external_url, else the request's, else the first listener's."""
        if self.config.external_url is not None:
            return str(self.config.external_url)
        if request is not None:
            return f"{self.scheme(request)}://{self.host(request)}"
        for kind, host, port in self.bound_addresses():
            if host in ("0.0.0.0", "::"):
                host = self.server.default_domain
            elif ":" in host:
                host = f"[{host}]"
            return f"{kind}://{host}:{port}"
        return f"https://{self.server.default_domain}"

    def from_proxy(self, request: web.Request) -> bool:
        peer = websocket.peer_of(request)
        if peer is None or not self.config.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            return False
        return any(address in net for net in self.config.trusted_proxies)

    def scheme(self, request: web.Request) -> str:
        if self.from_proxy(request):
            proto = request.headers.get("X-Forwarded-Proto")
            if proto is None:
                forwarded = request.headers.get("Forwarded", "")
                proto = next((p.split("=", 1)[1].strip('"') for p in
                              forwarded.replace(",", ";").split(";")
                              if p.strip().lower().startswith("proto=")), None)
            if proto:
                return "https" if proto.strip().lower() == "https" else "http"
        return "https" if _over_tls(request) else "http"

    def host(self, request: web.Request) -> str:
        if self.from_proxy(request):
            forwarded = request.headers.get("X-Forwarded-Host")
            if forwarded:
                return forwarded.split(",")[0].strip()
        return request.host

    def client_address(self, request: web.Request) -> str | None:
        if self.from_proxy(request):
            forwarded = request.headers.get("X-Forwarded-For")
            if forwarded:
                return forwarded.split(",")[-1].strip()
        peer = websocket.peer_of(request)
        return peer[0] if peer else None

    def allowed_origin(self, request: web.Request) -> str | None:
        """The request's Origin when it may call us (any without [http] cors_origins; else
        the same origin or a listed one), else None."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        origin = origin.rstrip("/").lower()
        allowed = self.config.cors_origins
        if allowed is None or "*" in allowed or origin in allowed:
            return origin
        return origin if origin == self.own_origin(request) else None

    def own_origin(self, request: web.Request) -> str:
        """Our own origin as a browser names it for this request (scheme and Host)."""
        return f"{self.scheme(request)}://{self.host(request)}".lower()

    def foreign_form(self, request: web.Request) -> bool:
        """A form POST from another origin's page (CSRF): unlike XMPP over WebSocket or BOSH,
        which authenticate inside the stream, a form rides on the visitor's cookies, so it is
        refused whatever [http] cors_origins allows. No Origin (old browsers) and 'null'
        (privacy modes) pass: the form's own CSRF token decides."""
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return False
        return origin.rstrip("/").lower() != self.own_origin(request)

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        out = []
        for kind, site in self._sites:
            server = site._server
            for sock in getattr(server, "sockets", None) or ():
                out.append((kind, *sock.getsockname()[:2]))
        return out

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        listen = self.server.config.listen
        if not self.enabled:
            return
        app = web.Application(handler_args={"max_field_size": 16384})
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                              shutdown_timeout=2.0)
        await runner.setup()
        ssl_context = https_context(self.server.config.tls) if listen.https else None
        self._ssl_context = ssl_context
        try:
            for kind, addresses in (("http", listen.http), ("https", listen.https)):
                for address in addresses:
                    site = web.TCPSite(runner, address.host, address.port, backlog=1024,
                                       reuse_address=True, reuse_port=listening.ports_shared(),
                                       ssl_context=ssl_context if kind == "https" else None)
                    await site.start()
                    self._sites.append((kind, site))
        except BaseException:
            await runner.cleanup()
            self._runner = None
            self._sites.clear()
            raise
        for kind, host, port in self.bound_addresses():
            log.info("event=listening kind=%s address=%s:%s", kind, host, port)
        self.metrics = Metrics(self.core)
        self.metrics.start()

    @hook(events.TLS_RELOADED)
    def _reload_tls(self, tls: Any) -> None:
        """presenced ctl reload, SIGHUP (server/ctl.py): new HTTPS connections get the new
        certificates."""
        if self._ssl_context is not None:
            reload_https_context(self._ssl_context, tls)

    @hook(events.SERVER_STOPPING)
    async def _stop_listening(self, _server: Any) -> None:
        for _kind, site in self._sites:
            server = site._server
            if server is not None:
                server.close()

    async def stop(self) -> None:
        self.bosh.close_all()
        if self.metrics is not None:
            await self.metrics.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._sites.clear()

    # -- requests ----------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        entry = self._exact.get(path)
        if entry is None:
            entry = next((e for p, e in self._prefixes if path.startswith(p)), None)
        if entry is None:
            return web.Response(status=404, text="not found\n")
        origin = self.allowed_origin(request) if entry.cors else None
        if request.method == "OPTIONS" and entry.cors:
            response: web.StreamResponse = web.Response(status=204)
            if origin is not None:
                response.headers.update({
                    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, OPTIONS",
                    "Access-Control-Allow-Headers": "Content-Type, Authorization",
                    "Access-Control-Max-Age": "86400"})
        else:
            response = await entry.handler(request)
        if origin is not None and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    def _links(self, request: web.Request) -> list[tuple[str, str]]:
        base = self.base_url(request)
        ws_base = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
        return [(REL_WEBSOCKET, ws_base + WEBSOCKET_PATH), (REL_BOSH, base + BOSH_PATH)]

    async def _host_meta_xrd(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed()
        body = "".join(f"<Link rel={quoteattr(rel)} href={quoteattr(href)}/>"
                       for rel, href in self._links(request))
        xrd = f"<?xml version='1.0' encoding='utf-8'?>\n<XRD xmlns='{XRD_NS}'>{body}</XRD>\n"
        response = web.Response(text=xrd, content_type="application/xrd+xml")
        response.headers["Access-Control-Allow-Origin"] = "*"  # public: any page may ask
        return response

    async def _host_meta_json(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed()
        links = [{"rel": rel, "href": href} for rel, href in self._links(request)]
        response = web.Response(text=json.dumps({"links": links}),
                                content_type="application/json")
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    def _refuse_session(self, request: web.Request, what: str) -> web.Response | None:
        """A reason to refuse a WebSocket or BOSH session: no TLS, or a foreign origin."""
        secure = _over_tls(request) or self.config.websocket_insecure or (
            self.from_proxy(request) and self.scheme(request) == "https")
        if not secure:
            return web.Response(status=403, text=f"XMPP over {what} needs TLS\n")
        if "Origin" in request.headers and self.allowed_origin(request) is None:
            log.info("event=session-refused transport=%s reason=origin origin=%s", what,
                     request.headers["Origin"][:200])
            return web.Response(status=403, text="this origin may not connect\n")
        return None

    async def _bosh(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            refused = self._refuse_session(request, "BOSH")
            if refused is not None:
                return refused
        client = self.client_address(request)
        peer = websocket.peer_of(request)
        if client is not None and self.from_proxy(request):
            peer = (client, 0)
        return await self.bosh.handle(request, peer)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return _not_allowed()
        refused = self._refuse_session(request, "WebSocket")
        if refused is not None:
            return refused
        forwarded = self.client_address(request) if self.from_proxy(request) else None
        limits = self.server.config.limits
        return await websocket.serve(self.core, request,
                                     # room above the stanza limit, so that the stream
                                     # parser refuses a too large stanza with a stream error
                                     max_message=2 * limits.max_stanza_size + 4096,
                                     forwarded_for=forwarded)


    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed()
        client = self.client_address(request)
        try:
            address = ipaddress.ip_address(client or "")
        except ValueError:
            address = None
        if address is None or not any(address in net for net in self.config.metrics_allow):
            return web.Response(status=403, text="not for you ([http] metrics_allow)\n")
        assert self.metrics is not None
        body, content_type = self.metrics.render(request.headers.get("Accept", ""))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response


def _over_tls(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


def _not_allowed() -> web.Response:
    return web.Response(status=405, text="method not allowed\n")
