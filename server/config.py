"""Configuration: a TOML file read once into frozen dataclasses, validated in one pass.

Every problem is collected (``ConfigErrors``) so that ``presenced check`` can show them all, each
with file, line and key. A section is a dataclass whose fields carry ``option(...)`` metadata;
adding a table to the file format is one such dataclass plus one ``section(...)`` field in
``Config``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.jid import normalize_domain

# -- errors -------------------------------------------------------------------------------------


class ConfigError(Exception):
    """One problem: ``conf/x.toml:12: [listen] c2s: expected a list of "host:port" strings``.

    ``key`` is dotted (``listen.c2s``); ``line`` is 0 when the problem has none (unreadable file).
    ``problem`` says what is wrong when "expected ..." alone would not.
    """

    def __init__(self, file: str, line: int, key: str, expected: str,
                 problem: str | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.expected = expected
        self.problem = problem
        super().__init__(self._format())

    def _format(self) -> str:
        what = f"expected {self.expected}"
        return f"{_where(self.file, self.line, self.key)}: " + (
            f"{self.problem}; {what}" if self.problem else what)


class ConfigErrors(ConfigError):
    """Every problem found in one file; ``str()`` gives one line each. Its own attributes are
    those of the first problem, so ``except ConfigError`` sees a sensible single error too."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.file, first.line, first.key, first.expected, first.problem)
        self.errors = errors
        self.args = ("\n".join(str(e) for e in errors),)

    def __str__(self) -> str:
        return str(self.args[0])


def _where(file: str, line: int, key: str) -> str:
    if not key:
        return f"{file}:{line}"
    table, _, name = key.rpartition(".")
    return f"{file}:{line}: [{table}] {name}" if table else f"{file}:{line}: {name}"


def where(config: Config, key: str) -> str:
    """``file:line: [table] key`` of a dotted key, for messages about its value."""
    if config.path is None:
        return f"<defaults>: {key}"
    try:
        locator = _Locator(config.path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        locator = _Locator("")
    return _where(str(config.path), locator.line(tuple(key.split("."))), key)


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # without brackets, also for IPv6
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _Invalid(Exception):
    """A value is not what its option expects; the optional text says what is wrong with it."""


@dataclass
class _Context:
    base_dir: Path  # the config file's directory, or cwd without a file
    data_dir: Path


@dataclass(frozen=True)
class Option:
    expected: str
    parse: Callable[[Any, _Context], Any]
    default: Any = None  # a raw TOML value, parsed like a given one; None: the field is None
    derive: Callable[[_Context], Any] | None = None  # a default that depends on other settings


def option(expected: str, parse: Callable[[Any, _Context], Any], default: Any = None, *,
           derive: Callable[[_Context], Any] | None = None) -> dict[str, Option]:
    """Field metadata of a setting: ``field(metadata=option(...))``."""
    return {"option": Option(expected, parse, default, derive)}


def section(cls: type) -> dict[str, type]:
    """Field metadata of a table: ``field(metadata=section(cls))``."""
    return {"section": cls}


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any, _Context], int]:
    def parse(value: Any, _ctx: _Context) -> int:
        if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
            raise _Invalid
        return value
    return parse


def _seconds(value: Any, _ctx: _Context) -> float:
    if type(value) not in (int, float) or not 0 < value < float("inf"):
        raise _Invalid
    return float(value)


def _bool(value: Any, _ctx: _Context) -> bool:
    if type(value) is not bool:
        raise _Invalid
    return value


def _choice(*choices: str) -> Callable[[Any, _Context], str]:
    def parse(value: Any, _ctx: _Context) -> str:
        if value not in choices:
            raise _Invalid
        return str(value)
    return parse


def _one_of(*choices: str) -> str:
    return "one of " + ", ".join(f'"{c}"' for c in choices)


def _path(base: str) -> Callable[[Any, _Context], Path]:
    """A path; a relative one is taken from the config file's directory or from data_dir."""
    def parse(value: Any, ctx: _Context) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise _Invalid
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (ctx.data_dir if base == "data_dir" else ctx.base_dir) / path
        return Path(os.path.normpath(path))
    return parse


def _domains(value: Any, _ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _Invalid
    domains: list[str] = []
    for raw in value:
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise _Invalid(f'"{raw}": {exc}') from None
        if domain in domains:
            raise _Invalid(f'"{raw}" is listed twice')
        domains.append(domain)
    return tuple(domains)


def _bare_jids(value: Any, _ctx: _Context) -> tuple[str, ...]:
    from server.jid import JID, InvalidJID
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid
    out: list[str] = []
    for raw in value:
        try:
            jid = JID.parse(raw)
        except InvalidJID as exc:
            raise _Invalid(f'"{raw}": {exc}') from None
        if jid.local is None or jid.resource is not None:
            raise _Invalid(f'"{raw}" is not a bare JID user@domain')
        out.append(str(jid))
    return tuple(out)


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def parse_address(text: str) -> Address:
    """``host:port`` with an IPv4 address or a host name, or ``[IPv6]:port``; port 0 = any."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Invalid(f'"{text}": no port')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f'"{text}": not an IPv6 address in brackets') from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise _Invalid(f'"{text}": no port')
        if not host:
            raise _Invalid(f'"{text}": no host')
        if ":" in host:
            raise _Invalid(f'"{text}": write an IPv6 address in brackets, as "[::1]:5222"')
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise _Invalid(f'"{text}": not an IPv4 address') from None
        elif not _HOSTNAME.fullmatch(host):
            raise _Invalid(f'"{text}": not a host name')
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise _Invalid(f'"{text}": port is not a number from 0 to 65535')
    return Address(host, int(port))


def _addresses(value: Any, _ctx: _Context) -> tuple[Address, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid
    return tuple(parse_address(v) for v in value)


_ADDRESSES = 'a list of "host:port" strings'

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _subdomain(value: Any, _ctx: _Context) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise _Invalid
    return value


class service_fields:
    """The two settings every service host (server/services.py) has."""

    @staticmethod
    def enabled(default: bool) -> dict[str, Option]:
        return option("true or false", _bool, default)

    @staticmethod
    def subdomain(default: str) -> dict[str, Option]:
        return option("a DNS label (lower-case letters, digits, '-')", _subdomain, default)

# -- sections -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    c2s: tuple[Address, ...] = field(metadata=option(_ADDRESSES, _addresses, ["127.0.0.1:5222"]))
    c2s_tls: tuple[Address, ...] = field(
        metadata=option(_ADDRESSES, _addresses, ["127.0.0.1:5223"]))
    s2s: tuple[Address, ...] = field(metadata=option(_ADDRESSES, _addresses, []))
    s2s_tls: tuple[Address, ...] = field(metadata=option(_ADDRESSES, _addresses, []))
    # XEP-0114 external components ([components] says which may connect).
    component: tuple[Address, ...] = field(metadata=option(_ADDRESSES, _addresses, []))
    # The one HTTP server (server/http: WebSocket, host-meta, upload, metrics): plain HTTP
    # (for a reverse proxy) and HTTPS with the [tls] certificates. Off when both are empty.
    http: tuple[Address, ...] = field(metadata=option(_ADDRESSES, _addresses, []))
    https: tuple[Address, ...] = field(
        metadata=option(_ADDRESSES, _addresses, ["127.0.0.1:5281"]))

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: _Report) -> None:
        seen: dict[Address, str] = {}
        for kind in ("c2s", "c2s_tls", "s2s", "s2s_tls", "component", "http", "https"):
            for address in values[kind] or ():
                if address.port and address in seen:
                    report(kind, "distinct addresses", f'"{address}" is also in {seen[address]}')
                seen.setdefault(address, kind)


_FILE = "a file name"


def _domain_certificates(value: Any, ctx: _Context) -> dict[str, tuple[Path, Path]]:
    if not isinstance(value, dict):
        raise _Invalid
    path = _path("config")
    out: dict[str, tuple[Path, Path]] = {}
    for raw, files in value.items():
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise _Invalid(f'"{raw}": {exc}') from None
        if not isinstance(files, list) or len(files) != 2:
            raise _Invalid(f'"{raw}": give [certificate, key]')
        out[domain] = (path(files[0], ctx), path(files[1], ctx))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    certificate: Path = field(
        metadata=option(_FILE, _path("config"), derive=lambda ctx: ctx.data_dir / "cert.pem"))
    key: Path = field(
        metadata=option(_FILE, _path("config"), derive=lambda ctx: ctx.data_dir / "key.pem"))
    ca_file: Path | None = field(metadata=option(_FILE, _path("config")))
    domain_certificates: dict[str, tuple[Path, Path]] = field(metadata=option(
        'a table of "domain" = ["certificate file", "key file"]', _domain_certificates, {}))
    generated: bool  # certificate and key are data_dir's, made at first start when absent

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: _Report) -> None:
        if ("certificate" in given) != ("key" in given):
            missing = "key" if "certificate" in given else "certificate"
            report(missing, "certificate and key to be set together", "missing")
        values["generated"] = "certificate" not in given and "key" not in given


def _dsn(value: Any, _ctx: _Context) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise _Invalid
    scheme, sep, _rest = value.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise _Invalid(f"not a PostgreSQL URI: {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    backend: str = field(metadata=option(_one_of("sqlite", "postgresql"),
                                         _choice("sqlite", "postgresql"), "sqlite"))
    path: Path = field(metadata=option(_FILE, _path("data_dir"), "presenced.sqlite"))
    # postgresql: libpq's URI form; a password in it is better kept in password_file.
    dsn: str | None = field(metadata=option(
        'a "postgresql://user@host[:port]/database" URI', _dsn))
    pool_size: int = field(metadata=option("an integer from 1 to 1000", _int(1, 1000), 10))
    password_file: Path | None = field(metadata=option(_FILE, _path("config")))

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any], report: _Report) -> None:
        if values["backend"] == "postgresql" and "dsn" not in given:
            report("dsn", 'a "postgresql://user@host[:port]/database" URI',
                   'missing: backend = "postgresql" needs it')


_SECONDS = "a number of seconds > 0"
_COUNT = "an integer >= 0"
_NETWORKS = 'a list of networks such as "127.0.0.1/32"'
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(value: Any, _ctx: _Context) -> tuple[Network, ...]:
    """A list of IP networks ("10.0.0.0/8", "::1"; host bits may be set)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    # RFC 6120 §13.12: a server must accept stanzas of at least 10000 bytes.
    max_stanza_size: int = field(metadata=option("an integer >= 10000", _int(10000), 262144))
    max_depth: int = field(metadata=option("an integer >= 2", _int(2), 32))
    negotiation_timeout: float = field(metadata=option(_SECONDS, _seconds, 30.0))
    idle_timeout: float = field(metadata=option(_SECONDS, _seconds, 300.0))
    max_sessions_per_user: int = field(metadata=option("an integer >= 1", _int(1), 16))
    # Shaping and per-address limits (server/limits.py); 0 turns one off.
    trusted: tuple[Network, ...] = field(
        metadata=option(_NETWORKS, networks, ["127.0.0.0/8", "::1/128"]))
    max_connections_per_ip: int = field(metadata=option(_COUNT, _int(0), 10))
    max_unauthenticated_per_ip: int = field(metadata=option(_COUNT, _int(0), 5))
    c2s_read_rate: int = field(metadata=option(_COUNT, _int(0), 10240))
    c2s_read_burst: int = field(metadata=option(_COUNT, _int(0), 65536))
    s2s_read_rate: int = field(metadata=option(_COUNT, _int(0), 102400))
    s2s_read_burst: int = field(metadata=option(_COUNT, _int(0), 524288))
    component_read_rate: int = field(metadata=option(_COUNT, _int(0), 0))
    component_read_burst: int = field(metadata=option(_COUNT, _int(0), 524288))
    stanza_rate: int = field(metadata=option(_COUNT, _int(0), 20))
    stanza_burst: int = field(metadata=option(_COUNT, _int(0), 100))
    auth_failures_free: int = field(metadata=option(_COUNT, _int(0), 3))
    auth_delay: float = field(metadata=option(_SECONDS, _seconds, 1.0))
    auth_max_delay: float = field(metadata=option(_SECONDS, _seconds, 300.0))
    auth_forget: float = field(metadata=option(_SECONDS, _seconds, 3600.0))


_BOOL = "true or false"


@dataclass(frozen=True, slots=True, kw_only=True)
class C2SConfig:
    require_starttls: bool = field(metadata=option(_BOOL, _bool, True))
    allow_plain: bool = field(metadata=option(_BOOL, _bool, True))
    # RFC 7677 §4, RFC 5802 §5.1: at least 4096 iterations.
    scram_iterations: int = field(
        metadata=option("an integer from 4096 to 10000000", _int(4096, 10_000_000), 4096))


def int_option(minimum: int, maximum: int, default: int) -> dict[str, Option]:
    """Field metadata of an integer setting from minimum to maximum (for modules' settings)."""
    return option(f"an integer from {minimum} to {maximum}", _int(minimum, maximum), default)


def bool_option(default: bool) -> dict[str, Option]:
    """Field metadata of a true/false setting (for modules' settings)."""
    return option(_BOOL, _bool, default)


def seconds_option(default: float) -> dict[str, Option]:
    """Field metadata of a duration in seconds > 0 (for modules' settings)."""
    return option(_SECONDS, _seconds, default)


def _domain_list(value: Any, _ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid
    return _domains(value, _ctx) if value else ()


def _routes(value: Any, _ctx: _Context) -> dict[str, Address]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _Invalid
    routes: dict[str, Address] = {}
    for raw, target in value.items():
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise _Invalid(f'"{raw}": {exc}') from None
        address = parse_address(target)
        if not address.port:
            raise _Invalid(f'"{raw}": port 0 is no destination')
        routes[domain] = address
    return routes


def _secret(value: Any, _ctx: _Context) -> str:
    if not isinstance(value, str) or len(value) < 16:
        raise _Invalid
    return value


def _nameservers(value: Any, _ctx: _Context) -> tuple[str, ...]:
    """IP addresses, each optionally with a port ("127.0.0.53:5353", "[::1]:53")."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid
    for raw in value:
        try:
            ipaddress.ip_address(raw)
            continue
        except ValueError:
            pass
        try:
            address = parse_address(raw)
            ipaddress.ip_address(address.host)
        except (_Invalid, ValueError):
            raise _Invalid(f'"{raw}" is not an IP address (with an optional port)') from None
    return tuple(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class S2SConfig:
    # RFC 6120 §5.3.1: STARTTLS is mandatory-to-negotiate, in both directions.
    require_starttls: bool = field(metadata=option(_BOOL, _bool, True))
    # false: Server Dialback (XEP-0220) may stand in for a certificate that does not verify.
    require_valid_certificates: bool = field(metadata=option(_BOOL, _bool, False))
    # XEP-0288: one TCP connection carries stanzas both ways when the peer supports it too.
    bidi: bool = field(metadata=option(_BOOL, _bool, True))
    routes: dict[str, Address] = field(
        metadata=option('a table of "domain" = "host:port"', _routes, {}))
    allow: tuple[str, ...] = field(metadata=option("a list of domain names", _domain_list, []))
    deny: tuple[str, ...] = field(metadata=option("a list of domain names", _domain_list, []))
    connect_timeout: float = field(metadata=option(_SECONDS, _seconds, 10.0))
    negotiation_timeout: float = field(metadata=option(_SECONDS, _seconds, 30.0))
    idle_timeout: float = field(metadata=option(_SECONDS, _seconds, 600.0))
    dialback_secret: str | None = field(
        metadata=option("a string of at least 16 characters", _secret))
    nameservers: tuple[str, ...] = field(
        metadata=option('a list of IP addresses, "ip" or "ip:port"', _nameservers, []))


@dataclass(frozen=True, slots=True)
class ComponentConfig:
    """One external component (XEP-0114): its domain and the shared secret of its handshake."""

    domain: str
    secret: str


def _components(value: Any, _ctx: _Context) -> dict[str, ComponentConfig]:
    if not isinstance(value, dict):
        raise _Invalid
    out: dict[str, ComponentConfig] = {}
    for raw, settings in value.items():
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise _Invalid(f'"{raw}": {exc}') from None
        if not isinstance(settings, dict) or set(settings) != {"secret"}:
            raise _Invalid(f'"{raw}": give {{ secret = "..." }}')
        secret = settings["secret"]
        if not isinstance(secret, str) or len(secret) < 8:
            raise _Invalid(f'"{raw}": the secret must be a string of at least 8 characters')
        out[domain] = ComponentConfig(domain, secret)
    return out


_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: str = field(metadata=option(_one_of(*_LEVELS), _choice(*_LEVELS), "info"))


from server.cluster.settings import ClusterSettings, storage_problem  # noqa: E402 (uses option)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None  # the file as given, None for the built-in defaults
    domains: tuple[str, ...] = field(
        metadata=option("a non-empty list of domain names", _domains, ["localhost"]))
    data_dir: Path = field(metadata=option("a directory name", _path("config"), "./presenced-data"))
    # Accounts with admin rights: they may read any account's watcher information (RFC 2778 §5.1.2).
    admins: tuple[str, ...] = field(metadata=option("a list of bare JIDs", _bare_jids, []))
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


# -- loading ------------------------------------------------------------------------------------

_Report = Callable[[str, str, str | None], None]  # (key in this table, expected, problem)


def load_config(path: Path | str | None,
                sections: dict[str, type] | None = None) -> Config:
    """Read and validate a config file (None: the built-in defaults). Raises ConfigErrors.

    sections: the modules' tables (name -> settings dataclass); by default those of every
    module in server/modules."""
    if sections is None:
        from server.modules import config_sections
        sections = config_sections()
    if path is None:
        return _build(None, {}, _Locator(""), "<defaults>", Path.cwd(), sections)
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors([ConfigError(file, 0, "", "a readable UTF-8 TOML file",
                                        f"cannot read it: {reason}")]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        raise ConfigErrors([ConfigError(file, int(match[1]) if match else 0, "", "valid TOML",
                                        str(exc))]) from None
    return _build(path, document, _Locator(text), file, path.absolute().parent, sections)


def default_config() -> Config:
    return load_config(None)


def _build(path: Path | None, document: dict[str, Any], locator: _Locator, file: str,
           base_dir: Path, sections: dict[str, type]) -> Config:
    errors: list[ConfigError] = []
    ctx = _Context(base_dir=base_dir, data_dir=base_dir)
    core = {f.name for f in dataclasses.fields(Config)}
    clash = core & set(sections)
    if clash:
        raise ValueError(f"module sections {sorted(clash)} clash with core settings")
    values = _load(Config, {k: v for k, v in document.items() if k not in sections}, (), ctx,
                   locator, file, errors, known=tuple(sorted(sections)))
    if (shared := storage_problem(values, document)) is not None:  # [cluster] needs PostgreSQL
        errors.append(ConfigError(file, locator.line(shared[0]), ".".join(shared[0]), *shared[1:]))
    modules: dict[str, Any] = {}
    for name, cls in sections.items():
        table = document.get(name, {})
        if not isinstance(table, dict):
            errors.append(ConfigError(file, locator.line((name,)), name, "a table"))
            table = {}
        modules[name] = cls(**_load(cls, table, (name,), ctx, locator, file, errors))
    for domain in values.get("components") or {}:
        if domain in (values.get("domains") or ()):
            errors.append(ConfigError(file, locator.line(("components", domain)), "components",
                                      "domains that are not user domains",
                                      f'"{domain}" is also in domains'))
    if errors:
        errors.sort(key=lambda e: e.line)  # stable: keys of one line stay in table order
        raise ConfigErrors(errors)
    return Config(path=path, modules=modules, **values)


def _load(cls: type, table: dict[str, Any], at: tuple[str, ...], ctx: _Context,
          locator: _Locator, file: str, errors: list[ConfigError],
          known: tuple[str, ...] = ()) -> dict[str, Any]:
    """The constructor arguments of ``cls`` from one TOML table; problems go to ``errors``.

    A section may define ``_finish(values, given, report)`` for checks across its keys and for
    fields derived from them; a value that failed its own check is None there.
    """

    def report(key: str, expected: str, problem: str | None = None) -> None:
        path = (*at, key)
        errors.append(ConfigError(file, locator.line(path), ".".join(path), expected, problem))

    fields = {f.name: f for f in dataclasses.fields(cls)
              if "option" in f.metadata or "section" in f.metadata}
    for key in table:
        if key not in fields:
            kind = "table" if isinstance(table[key], dict) else "key"
            report(key, "one of " + ", ".join([*fields, *known]), f"unknown {kind}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        opt: Option | None = f.metadata.get("option")
        if opt is None:
            continue
        try:
            if name in table:
                values[name] = opt.parse(table[name], ctx)
            elif opt.derive is not None:
                values[name] = opt.derive(ctx)
            else:
                values[name] = None if opt.default is None else opt.parse(opt.default, ctx)
        except _Invalid as exc:
            report(name, opt.expected, str(exc) or None)
            values[name] = None  # no Config is made; _finish skips it
        if cls is Config and name == "data_dir" and values[name] is not None:
            ctx.data_dir = values[name]
    for name, f in fields.items():
        sub_cls = f.metadata.get("section")
        if sub_cls is None:
            continue
        sub = table.get(name, {})
        if not isinstance(sub, dict):
            report(name, "a table", None)
            sub = {}
        values[name] = sub_cls(**_load(sub_cls, sub, (*at, name), ctx, locator, file, errors))
    finish = getattr(cls, "_finish", None)
    if finish is not None:
        finish(values, table, report)
    return values


# -- where keys are -----------------------------------------------------------------------------


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}#\r\n]+")


class _Locator:
    """The line of each table and key of a TOML document; tomllib reports none.

    A scanner for documents tomllib has already accepted: headers (``[a.b]``, ``[[a]]``), dotted
    and quoted keys, inline tables and arrays (also across lines), the four kinds of string.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._i = 0
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lines: dict[tuple[str, ...], int] = {}
        with contextlib.suppress(IndexError, ValueError):  # not on valid TOML; keep what we found
            self._document()

    def line(self, path: tuple[str, ...]) -> int:
        """Line of the key, else of its nearest enclosing table, else 0."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 0

    def _record(self, path: tuple[str, ...], at: int) -> None:
        line = bisect.bisect_right(self._starts, at)
        for n in range(1, len(path) + 1):  # [a.b] and a.b = 1 define table a too
            self.lines.setdefault(path[:n], line)

    def _peek(self, n: int = 1) -> str:
        return self._text[self._i:self._i + n]

    def _skip(self, newlines: bool) -> None:
        text, n = self._text, len(self._text)
        while self._i < n:
            c = text[self._i]
            if c in " \t" or (newlines and c in "\r\n"):
                self._i += 1
            elif c == "#":
                end = text.find("\n", self._i)
                self._i = n if end < 0 else end
            else:
                break

    def _document(self) -> None:
        table: tuple[str, ...] = ()
        while True:
            self._skip(newlines=True)
            if self._i >= len(self._text):
                return
            at = self._i
            if self._peek() == "[":
                double = self._peek(2) == "[["
                self._i += 2 if double else 1
                table = tuple(self._key())
                self._i += 2 if double else 1
                self._record(table, at)
            else:
                path = (*table, *self._key())
                self._record(path, at)
                self._skip(newlines=False)
                self._i += 1  # "="
                self._skip(newlines=False)
                self._value(path)

    def _key(self) -> Iterator[str]:
        while True:
            self._skip(newlines=False)
            c = self._peek()
            if c in "\"'":
                start = self._i
                self._string()
                yield tomllib.loads("k = " + self._text[start:self._i])["k"]
            else:
                m = _BARE_KEY.match(self._text, self._i)
                if m is None:
                    raise ValueError("not a key")
                self._i = m.end()
                yield m[0]
            self._skip(newlines=False)
            if self._peek() != ".":
                return
            self._i += 1

    def _value(self, path: tuple[str, ...]) -> None:
        c = self._peek()
        if c == "{":
            self._i += 1
            while True:
                self._skip(newlines=True)
                if self._peek() == "}":
                    self._i += 1
                    return
                at = self._i
                key = (*path, *self._key())
                self._record(key, at)
                self._skip(newlines=False)
                self._i += 1  # "="
                self._skip(newlines=False)
                self._value(key)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        elif c == "[":
            self._i += 1
            while True:
                self._skip(newlines=True)
                if self._peek() == "]":
                    self._i += 1
                    return
                self._value(path)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        elif c in "\"'":
            self._string()
        else:  # number, boolean, date-time (which may hold a space)
            m = _SCALAR.match(self._text, self._i)
            if m is None:
                raise ValueError("not a value")
            self._i = m.end()

    def _string(self) -> None:
        text, quote = self._text, self._peek()
        if self._peek(3) == quote * 3:
            self._i += 3
            while not text.startswith(quote * 3, self._i):
                self._i += 2 if quote == '"' and text[self._i] == "\\" else 1
            self._i += 3
            while self._peek() == quote:  # up to two quotes may end the content
                self._i += 1
        else:
            self._i += 1
            while text[self._i] != quote:
                self._i += 2 if quote == '"' and text[self._i] == "\\" else 1
            self._i += 1
