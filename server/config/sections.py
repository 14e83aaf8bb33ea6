"""The core's sections: [listen], [tls], [storage], [limits], [c2s], [log], [s2s],
[components] and the top-level keys, gathered in ``Config``. A module's own section is declared
in its file (server/module.py: ``settings``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.cluster.settings import ClusterSettings
from server.config.options import (
    BOOL,
    COUNT,
    NETWORKS,
    SECONDS,
    Address,
    Context,
    Invalid,
    Network,
    Report,
    addresses,
    bare_jids,
    boolean,
    choice,
    domain_names,
    integer,
    networks,
    one_of,
    option,
    parse_address,
    path_under,
    seconds,
    section,
)
from server.jid import normalize_domain

ADDRESSES = 'a list of "host:port" strings'

@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    c2s: tuple[Address, ...] = field(metadata=option(ADDRESSES, addresses, ["127.0.0.1:5222"]))
    c2s_tls: tuple[Address, ...] = field(
        metadata=option(ADDRESSES, addresses, ["127.0.0.1:5223"]))
    s2s: tuple[Address, ...] = field(metadata=option(ADDRESSES, addresses, []))
    s2s_tls: tuple[Address, ...] = field(metadata=option(ADDRESSES, addresses, []))
    # XEP-0114 external components ([components] says which may connect).
    component: tuple[Address, ...] = field(metadata=option(ADDRESSES, addresses, []))
    # The one HTTP server (server/http: WebSocket, host-meta, upload, metrics): plain HTTP
    # (for a reverse proxy) and HTTPS with the [tls] certificates. Off when both are empty.
    http: tuple[Address, ...] = field(metadata=option(ADDRESSES, addresses, []))
    https: tuple[Address, ...] = field(
        metadata=option(ADDRESSES, addresses, ["127.0.0.1:5281"]))

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: Report) -> None:
        seen: dict[Address, str] = {}
        for kind in ("c2s", "c2s_tls", "s2s", "s2s_tls", "component", "http", "https"):
            for address in values[kind] or ():
                if address.port and address in seen:
                    report(kind, "distinct addresses", f'"{address}" is also in {seen[address]}')
                seen.setdefault(address, kind)


_FILE = "a file name"


def _domain_certificates(value: Any, ctx: Context) -> dict[str, tuple[Path, Path]]:
    if not isinstance(value, dict):
        raise Invalid
    path = path_under("config")
    out: dict[str, tuple[Path, Path]] = {}
    for raw, files in value.items():
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise Invalid(f'"{raw}": {exc}') from None
        if not isinstance(files, list) or len(files) != 2:
            raise Invalid(f'"{raw}": give [certificate, key]')
        out[domain] = (path(files[0], ctx), path(files[1], ctx))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    certificate: Path = field(
        metadata=option(_FILE, path_under("config"), derive=lambda ctx: ctx.data_dir / "cert.pem"))
    key: Path = field(
        metadata=option(_FILE, path_under("config"), derive=lambda ctx: ctx.data_dir / "key.pem"))
    ca_file: Path | None = field(metadata=option(_FILE, path_under("config")))
    domain_certificates: dict[str, tuple[Path, Path]] = field(metadata=option(
        'a table of "domain" = ["certificate file", "key file"]', _domain_certificates, {}))
    generated: bool  # certificate and key are data_dir's, made at first start when absent

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: Report) -> None:
        if ("certificate" in given) != ("key" in given):
            missing = "key" if "certificate" in given else "certificate"
            report(missing, "certificate and key to be set together", "missing")
        values["generated"] = "certificate" not in given and "key" not in given


def _dsn(value: Any, _ctx: Context) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise Invalid
    scheme, sep, _rest = value.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise Invalid(f"not a PostgreSQL URI: {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    backend: str = field(metadata=option(one_of("sqlite", "postgresql"),
                                         choice("sqlite", "postgresql"), "sqlite"))
    path: Path = field(metadata=option(_FILE, path_under("data_dir"), "presenced.sqlite"))
    # postgresql: libpq's URI form; a password in it is better kept in password_file.
    dsn: str | None = field(metadata=option(
        'a "postgresql://user@host[:port]/database" URI', _dsn))
    pool_size: int = field(metadata=option("an integer from 1 to 1000", integer(1, 1000), 10))
    password_file: Path | None = field(metadata=option(_FILE, path_under("config")))

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: Report) -> None:
        if values["backend"] == "postgresql" and "dsn" not in given:
            report("dsn", 'a "postgresql://user@host[:port]/database" URI',
                   'missing: backend = "postgresql" needs it')


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    # RFC 6120 §13.12: a server must accept stanzas of at least 10000 bytes.
    max_stanza_size: int = field(metadata=option("an integer >= 10000", integer(10000), 262144))
    max_depth: int = field(metadata=option("an integer >= 2", integer(2), 32))
    negotiation_timeout: float = field(metadata=option(SECONDS, seconds, 30.0))
    idle_timeout: float = field(metadata=option(SECONDS, seconds, 300.0))
    max_sessions_per_user: int = field(metadata=option("an integer >= 1", integer(1), 16))
    # Shaping and per-address limits (server/limits.py); 0 turns one off.
    trusted: tuple[Network, ...] = field(
        metadata=option(NETWORKS, networks, ["127.0.0.0/8", "::1/128"]))
    max_connections_per_ip: int = field(metadata=option(COUNT, integer(0), 10))
    max_unauthenticated_per_ip: int = field(metadata=option(COUNT, integer(0), 5))
    c2s_read_rate: int = field(metadata=option(COUNT, integer(0), 10240))
    c2s_read_burst: int = field(metadata=option(COUNT, integer(0), 65536))
    s2s_read_rate: int = field(metadata=option(COUNT, integer(0), 102400))
    s2s_read_burst: int = field(metadata=option(COUNT, integer(0), 524288))
    component_read_rate: int = field(metadata=option(COUNT, integer(0), 0))
    component_read_burst: int = field(metadata=option(COUNT, integer(0), 524288))
    stanza_rate: int = field(metadata=option(COUNT, integer(0), 20))
    stanza_burst: int = field(metadata=option(COUNT, integer(0), 100))
    auth_failures_free: int = field(metadata=option(COUNT, integer(0), 3))
    auth_delay: float = field(metadata=option(SECONDS, seconds, 1.0))
    auth_max_delay: float = field(metadata=option(SECONDS, seconds, 300.0))
    auth_forget: float = field(metadata=option(SECONDS, seconds, 3600.0))


@dataclass(frozen=True, slots=True, kw_only=True)
class C2SConfig:
    require_starttls: bool = field(metadata=option(BOOL, boolean, True))
    allow_plain: bool = field(metadata=option(BOOL, boolean, True))
    # RFC 7677 §4, RFC 5802 §5.1: at least 4096 iterations.
    scram_iterations: int = field(
        metadata=option("an integer from 4096 to 10000000", integer(4096, 10_000_000), 4096))


def _domain_list(value: Any, _ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid
    return domain_names(value, _ctx) if value else ()


def _routes(value: Any, _ctx: Context) -> dict[str, Address]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise Invalid
    routes: dict[str, Address] = {}
    for raw, target in value.items():
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise Invalid(f'"{raw}": {exc}') from None
        address = parse_address(target)
        if not address.port:
            raise Invalid(f'"{raw}": port 0 is no destination')
        routes[domain] = address
    return routes


def _secret(value: Any, _ctx: Context) -> str:
    if not isinstance(value, str) or len(value) < 16:
        raise Invalid
    return value


def _nameservers(value: Any, _ctx: Context) -> tuple[str, ...]:
    """IP addresses, each optionally with a port ("127.0.0.53:5353", "[::1]:53")."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid
    for raw in value:
        try:
            ipaddress.ip_address(raw)
            continue
        except ValueError:
            pass
        try:
            address = parse_address(raw)
            ipaddress.ip_address(address.host)
        except (Invalid, ValueError):
            raise Invalid(f'"{raw}" is not an IP address (with an optional port)') from None
    return tuple(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class S2SConfig:
    # RFC 6120 §5.3.1: STARTTLS is mandatory-to-negotiate, in both directions.
    require_starttls: bool = field(metadata=option(BOOL, boolean, True))
    # false: Server Dialback (XEP-0220) may stand in for a certificate that does not verify.
    require_valid_certificates: bool = field(metadata=option(BOOL, boolean, False))
    # XEP-0288: one TCP connection carries stanzas both ways when the peer supports it too.
    bidi: bool = field(metadata=option(BOOL, boolean, True))
    routes: dict[str, Address] = field(
        metadata=option('a table of "domain" = "host:port"', _routes, {}))
    allow: tuple[str, ...] = field(metadata=option("a list of domain names", _domain_list, []))
    deny: tuple[str, ...] = field(metadata=option("a list of domain names", _domain_list, []))
    connect_timeout: float = field(metadata=option(SECONDS, seconds, 10.0))
    negotiation_timeout: float = field(metadata=option(SECONDS, seconds, 30.0))
    idle_timeout: float = field(metadata=option(SECONDS, seconds, 600.0))
    dialback_secret: str | None = field(
        metadata=option("a string of at least 16 characters", _secret))
    nameservers: tuple[str, ...] = field(
        metadata=option('a list of IP addresses, "ip" or "ip:port"', _nameservers, []))


@dataclass(frozen=True, slots=True)
class ComponentConfig:
    """One external component (XEP-0114): its domain and the shared secret of its handshake."""

    domain: str
    secret: str


def _components(value: Any, _ctx: Context) -> dict[str, ComponentConfig]:
    if not isinstance(value, dict):
        raise Invalid
    out: dict[str, ComponentConfig] = {}
    for raw, settings in value.items():
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise Invalid(f'"{raw}": {exc}') from None
        if not isinstance(settings, dict) or set(settings) != {"secret"}:
            raise Invalid(f'"{raw}": give {{ secret = "..." }}')
        secret = settings["secret"]
        if not isinstance(secret, str) or len(secret) < 8:
            raise Invalid(f'"{raw}": the secret must be a string of at least 8 characters')
        out[domain] = ComponentConfig(domain, secret)
    return out


_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: str = field(metadata=option(one_of(*_LEVELS), choice(*_LEVELS), "info"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None  # the file as given, None for the built-in defaults
    domains: tuple[str, ...] = field(
        metadata=option("a non-empty list of domain names", domain_names, ["localhost"]))
    data_dir: Path = field(
        metadata=option("a directory name", path_under("config"), "./presenced-data"))
    # Accounts with admin rights: they may read any account's watcher information (RFC 2778 §5.1.2).
    admins: tuple[str, ...] = field(metadata=option("a list of bare JIDs", bare_jids, []))
    listen: ListenConfig = field(metadata=section(ListenConfig))
    tls: TLSConfig = field(metadata=section(TLSConfig))
    storage: StorageConfig = field(metadata=section(StorageConfig))
    limits: LimitsConfig = field(metadata=section(LimitsConfig))
    c2s: C2SConfig = field(metadata=section(C2SConfig))
    log: LogConfig = field(metadata=section(LogConfig))
    s2s: S2SConfig = field(metadata=section(S2SConfig))
    cluster: ClusterSettings = field(metadata=section(ClusterSettings))  # server/cluster
    components: dict[str, ComponentConfig] = field(metadata=option(
        'a table of "domain" = { secret = "..." }', _components, {}))
    # Feature modules' own sections ([muc], [mam], ...), by table name: see server/module.py.
    modules: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        """A module's settings (the dataclass its module declares), by table name."""
        return self.modules[name]

    @property
    def service_domains(self) -> tuple[str, ...]:
        """The domains of enabled service hosts (<subdomain>.<domain>) and of components."""
        out = [f"{settings.subdomain}.{domain}"
               for settings in self.modules.values()
               if getattr(settings, "enabled", False) and getattr(settings, "subdomain", None)
               for domain in self.domains]
        out.extend(self.components)
        return tuple(out)

    @property
    def local_domains(self) -> tuple[str, ...]:
        """Every domain this server answers for: user domains, then service domains."""
        return self.domains + tuple(d for d in self.service_domains if d not in self.domains)

