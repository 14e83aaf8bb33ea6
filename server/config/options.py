"""The option API: how a setting is declared, parsed and checked (modules import it).

A section is a frozen dataclass whose fields carry ``option(...)`` metadata::

    @dataclass(frozen=True, slots=True, kw_only=True)
    class RosterSettings:
        max_items: int = field(metadata=int_option(1, 100000, 1000))

A parser is ``(value, Context) -> parsed`` and raises ``Invalid`` (with a text saying what is
wrong, when "expected ..." alone would not) for a value it refuses.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.jid import normalize_domain


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # without brackets, also for IPv6
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Invalid(Exception):
    """A value is not what its option expects; the optional text says what is wrong with it."""


@dataclass
class Context:
    base_dir: Path  # the config file's directory, or cwd without a file
    data_dir: Path


@dataclass(frozen=True)
class Option:
    expected: str
    parse: Callable[[Any, Context], Any]
    default: Any = None  # a raw TOML value, parsed like a given one; None: the field is None
    derive: Callable[[Context], Any] | None = None  # a default that depends on other settings


def option(expected: str, parse: Callable[[Any, Context], Any], default: Any = None, *,
           derive: Callable[[Context], Any] | None = None) -> dict[str, Option]:
    """Field metadata of a setting: ``field(metadata=option(...))``."""
    return {"option": Option(expected, parse, default, derive)}


def section(cls: type) -> dict[str, type]:
    """Field metadata of a table: ``field(metadata=section(cls))``."""
    return {"section": cls}


def integer(minimum: int, maximum: int | None = None) -> Callable[[Any, Context], int]:
    def parse(value: Any, _ctx: Context) -> int:
        if type(value) is not int or value < minimum or (maximum is not None and value > maximum):
            raise Invalid
        return value
    return parse


def seconds(value: Any, _ctx: Context) -> float:
    if type(value) not in (int, float) or not 0 < value < float("inf"):
        raise Invalid
    return float(value)


def boolean(value: Any, _ctx: Context) -> bool:
    if type(value) is not bool:
        raise Invalid
    return value


def choice(*choices: str) -> Callable[[Any, Context], str]:
    def parse(value: Any, _ctx: Context) -> str:
        if value not in choices:
            raise Invalid
        return str(value)
    return parse


def one_of(*choices: str) -> str:
    return "one of " + ", ".join(f'"{c}"' for c in choices)


def path_under(base: str) -> Callable[[Any, Context], Path]:
    """A path; a relative one is taken from the config file's directory or from data_dir."""
    def parse(value: Any, ctx: Context) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise Invalid
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (ctx.data_dir if base == "data_dir" else ctx.base_dir) / path
        return Path(os.path.normpath(path))
    return parse


def domain_names(value: Any, _ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise Invalid
    domains: list[str] = []
    for raw in value:
        try:
            domain = normalize_domain(raw)
        except ValueError as exc:
            raise Invalid(f'"{raw}": {exc}') from None
        if domain in domains:
            raise Invalid(f'"{raw}" is listed twice')
        domains.append(domain)
    return tuple(domains)


def bare_jids(value: Any, _ctx: Context) -> tuple[str, ...]:
    from server.jid import JID, InvalidJID
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid
    out: list[str] = []
    for raw in value:
        try:
            jid = JID.parse(raw)
        except InvalidJID as exc:
            raise Invalid(f'"{raw}": {exc}') from None
        if jid.local is None or jid.resource is not None:
            raise Invalid(f'"{raw}" is not a bare JID user@domain')
        out.append(str(jid))
    return tuple(out)


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def parse_address(text: str) -> Address:
    """``host:port`` with an IPv4 address or a host name, or ``[IPv6]:port``; port 0 = any."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise Invalid(f'"{text}": no port')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f'"{text}": not an IPv6 address in brackets') from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise Invalid(f'"{text}": no port')
        if not host:
            raise Invalid(f'"{text}": no host')
        if ":" in host:
            raise Invalid(f'"{text}": write an IPv6 address in brackets, as "[::1]:5222"')
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise Invalid(f'"{text}": not an IPv4 address') from None
        elif not _HOSTNAME.fullmatch(host):
            raise Invalid(f'"{text}": not a host name')
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise Invalid(f'"{text}": port is not a number from 0 to 65535')
    return Address(host, int(port))


def addresses(value: Any, _ctx: Context) -> tuple[Address, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid
    return tuple(parse_address(v) for v in value)


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def subdomain(value: Any, _ctx: Context) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise Invalid
    return value


class service_fields:
    """The two settings every service host (server/services.py) has."""

    @staticmethod
    def enabled(default: bool) -> dict[str, Option]:
        return option("true or false", boolean, default)

    @staticmethod
    def subdomain(default: str) -> dict[str, Option]:
        return option("a DNS label (lower-case letters, digits, '-')", subdomain, default)

SECONDS = "a number of seconds > 0"
BOOL = "true or false"
COUNT = "an integer >= 0"
NETWORKS = 'a list of networks such as "127.0.0.1/32"'
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(value: Any, _ctx: Context) -> tuple[Network, ...]:
    """A list of IP networks ("10.0.0.0/8", "::1"; host bits may be set)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


# (key in this table, expected, problem): how a section's _finish reports a problem
Report = Callable[[str, str, str | None], None]


def int_option(minimum: int, maximum: int, default: int) -> dict[str, Option]:
    """Field metadata of an integer setting from minimum to maximum (for modules' settings)."""
    return option(f"an integer from {minimum} to {maximum}", integer(minimum, maximum), default)


def bool_option(default: bool) -> dict[str, Option]:
    """Field metadata of a true/false setting (for modules' settings)."""
    return option(BOOL, boolean, default)


def seconds_option(default: float) -> dict[str, Option]:
    """Field metadata of a duration in seconds > 0 (for modules' settings)."""
    return option(SECONDS, seconds, default)



def choice_option(default: str, *choices: str) -> dict[str, Option]:
    """Field metadata of a setting that is one of these strings (for modules' settings)."""
    return option(one_of(*choices), choice(*choices), default)


def path_option(base: str, default: str | None = None) -> dict[str, Option]:
    """Field metadata of a file or directory name; a relative one is taken from data_dir
    (base="data_dir") or from the config file's directory (base="config")."""
    return option("a file name", path_under(base), default)
