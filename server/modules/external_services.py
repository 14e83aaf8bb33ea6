"""External Service Discovery (XEP-0215, urn:xmpp:extdisco:2): the STUN/TURN servers our users'
clients use for audio/video calls (Jingle RTP) and peer-to-peer transfers behind NATs, with
short-lived TURN credentials.

    [turn]
    host = "turn.example.org"  # the TURN server (coturn) as clients reach it; unset: none
    port = 3478
    secret = "..."             # coturn's static-auth-secret (use-auth-secret); unset: STUN only
    ttl = 86400                # seconds the credentials are valid
    transports = ["udp", "tcp"]
    # More services, listed as they are (STUN, TURN, TURNS), each an inline table:
    # services = [{ type = "turns", host = "turn.example.org", port = 5349, secret = "..." }]

Credentials are those of the TURN REST API (draft-uberti-behave-turn-rest-00 §2.2), which
coturn checks with use-auth-secret: username = "<expiry unix time>:<bare JID>", password =
base64(HMAC-SHA1(secret, username)). They are in every <services/> answer (restricted='1'
with username, password and expires, as clients such as Conversations expect) and in answers
to <credentials/> (§3.2). Both are for accounts of our domains only; anyone else gets
<forbidden/>. Without [turn] host and [turn] services the server advertises nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.config import Invalid, int_option, option, seconds_option
from server.errors import StanzaError
from server.module import Module, Stanza, iq_get
from server.sessions import Session
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int

log = logging.getLogger("presenced.external_services")

NS = "urn:xmpp:extdisco:2"
_SERVICE = f"{{{NS}}}service"
_TYPES = ("stun", "stuns", "turn", "turns")
_TRANSPORTS = ("udp", "tcp")


@dataclass(frozen=True, slots=True)
class ExternalService:
    """One <service/> of XEP-0215 §2; secret: credentials are made from it (TURN REST API)."""

    type: str
    host: str
    port: int
    transport: str
    name: str | None = None
    secret: str | None = None
    username: str | None = None
    password: str | None = None

    @property
    def restricted(self) -> bool:
        return self.secret is not None or self.username is not None


def turn_credentials(secret: str, user: str, expires: int) -> tuple[str, str]:
    """(username, password) coturn accepts until `expires` (a Unix time) with this secret."""
    username = f"{expires}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


# -- settings ------------------------------------------------------------------------------------


def _host(value: Any, _ctx: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 253 \
            or any(c.isspace() or c in "/[]@" for c in value):
        raise Invalid
    return value


def _secret(value: Any, _ctx: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid
    return value


def _transports(value: Any, _ctx: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(v not in _TRANSPORTS for v in value) \
            or len(set(value)) != len(value):
        raise Invalid
    return tuple(value)


_SERVICE_KEYS = {"type", "host", "port", "transport", "name", "secret", "username", "password"}


def _services(value: Any, ctx: Any) -> tuple[ExternalService, ...]:
    if not isinstance(value, list):
        raise Invalid
    out = []
    for number, entry in enumerate(value, 1):
        where = f"services entry {number}"
        if not isinstance(entry, dict):
            raise Invalid(f"{where} is not a table")
        unknown = set(entry) - _SERVICE_KEYS
        if unknown:
            raise Invalid(f"{where}: unknown key {sorted(unknown)[0]!r}")
        type_ = entry.get("type")
        if type_ not in _TYPES:
            raise Invalid(f"{where}: type must be one of {', '.join(_TYPES)}")
        try:
            host = _host(entry.get("host"), ctx)
        except Invalid:
            raise Invalid(f"{where}: host must be a host name or address") from None
        port = entry.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise Invalid(f"{where}: port must be an integer from 1 to 65535")
        transport = entry.get("transport", "tcp" if type_ in ("stuns", "turns") else "udp")
        if transport not in _TRANSPORTS:
            raise Invalid(f"{where}: transport must be udp or tcp")
        strings = {k: entry.get(k) for k in ("name", "secret", "username", "password")}
        if any(v is not None and (not isinstance(v, str) or not v) for v in strings.values()):
            raise Invalid(f"{where}: name, secret, username and password are strings")
        if (strings["username"] is None) != (strings["password"] is None):
            raise Invalid(f"{where}: give username and password together")
        if strings["secret"] is not None and strings["username"] is not None:
            raise Invalid(f"{where}: give a secret or a username and password, not both")
        out.append(ExternalService(type_, host, port, transport, **strings))
    return tuple(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnSettings:
    host: str | None = field(metadata=option("a host name or IP address", _host))
    port: int = field(metadata=int_option(1, 65535, 3478))
    secret: str | None = field(metadata=option("a non-empty string", _secret))
    ttl: float = field(metadata=seconds_option(86400))
    transports: tuple[str, ...] = field(metadata=option(
        'a non-empty list of "udp" and "tcp"', _transports, ["udp", "tcp"]))
    services: tuple[ExternalService, ...] = field(metadata=option(
        "a list of tables { type, host, port, transport, name, secret, username, password }",
        _services, []))

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: Any) -> None:
        if "secret" in given and "host" not in given:
            report("host", "the TURN server's host with [turn] secret", "missing")


# -- the module ----------------------------------------------------------------------------------


class ExternalServices(Module):
    """XEP-0215 at the user domains; its settings are the [turn] table."""

    name = "turn"
    settings = TurnSettings

    def __init__(self, server: Any, config: TurnSettings) -> None:
        super().__init__(server, config)
        self.services = self._configured(config)

    @staticmethod
    def _configured(config: TurnSettings) -> tuple[ExternalService, ...]:
        services: list[ExternalService] = []
        if config.host is not None:
            # coturn answers STUN binding requests on its TURN port too; without a secret
            # there are no credentials, and so no TURN: a STUN server alone.
            services += [ExternalService("stun", config.host, config.port, transport)
                         for transport in config.transports]
            if config.secret is not None:
                services += [ExternalService("turn", config.host, config.port, transport,
                                             secret=config.secret)
                             for transport in config.transports]
        return (*services, *config.services)

    async def start(self) -> None:
        # XEP-0215 §6: advertised only when there is something to discover.
        if self.services and NS not in self.server.features:
            self.server.features.append(NS)

    @iq_get(NS, "services")
    def services_query(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """§3.1 (all services) and §3.1.2 (those of one type)."""
        user = self._user(origin)
        wanted = stanza[0].get("type")
        answer = st.element(f"{{{NS}}}services", {"type": wanted} if wanted else None)
        expires = int(time.time() + self.config.ttl)
        for service in self.services:
            if wanted is None or service.type == wanted:
                answer.append(self._element(service, user, expires))
        log.info("event=extdisco-services user=%s type=%s count=%d", user, wanted or "-",
                 len(answer))
        return st.result(stanza, answer)

    @iq_get(NS, "credentials")
    def credentials_query(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """§3.2: credentials for the services named by host and type (and port)."""
        user = self._user(origin)
        requested = [c for c in stanza[0] if isinstance(c.tag, str)]
        if not requested or any(c.tag != _SERVICE for c in requested):
            raise StanzaError("bad-request", "name a <service/> with host and type")
        answer = st.element(f"{{{NS}}}credentials")
        expires = int(time.time() + self.config.ttl)
        for wanted in requested:
            host, type_ = wanted.get("host"), wanted.get("type")
            if not host or not type_:
                raise StanzaError("bad-request", "a <service/> needs host and type")
            port = None
            if wanted.get("port") is not None:
                try:
                    port = parse_int(wanted.get("port"), minimum=1, maximum=65535, name="port")
                except NumberError as exc:
                    raise StanzaError("bad-request", str(exc)) from None
            for service in self.services:
                if (service.restricted and service.host == host and service.type == type_
                        and port in (None, service.port)):
                    answer.append(self._element(service, user, expires))
        if not len(answer):
            # §3.2: "an appropriate stanza error, such as <item-not-found/>".
            raise StanzaError("item-not-found", "no such service with credentials")
        log.info("event=extdisco-credentials user=%s count=%d", user, len(answer))
        return st.result(stanza, answer)

    def _user(self, origin: Session | None) -> str:
        if not self.services:
            raise StanzaError("service-unavailable")
        if (origin is None or not origin.local_client or origin.jid.local is None
                or origin.jid.domain not in self.server.hosts):
            raise StanzaError("forbidden", "external services are for accounts of this server")
        return origin.bare_str

    @staticmethod
    def _element(service: ExternalService, user: str, expires: int) -> Stanza:
        attrs = {"type": service.type, "host": service.host, "port": str(service.port),
                 "transport": service.transport}
        if service.name is not None:
            attrs["name"] = service.name
        if service.secret is not None:
            attrs["username"], attrs["password"] = turn_credentials(service.secret, user,
                                                                    expires)
            attrs["expires"] = datetime.fromtimestamp(expires, UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
        elif service.username is not None and service.password is not None:
            attrs["username"], attrs["password"] = service.username, service.password
        if service.restricted:
            attrs["restricted"] = "1"
        return st.element(_SERVICE, attrs)
