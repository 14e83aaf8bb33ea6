"""The presenced command: serve, adduser, deluser, passwd, check, cert, migrate, storage copy,
import, export.

A failure the user can fix is one line on stderr, ``presenced: error: ...``, and exit status 1
(2 for usage errors and for ``serve`` with a bad config); a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import getpass
import importlib.metadata
import logging
import os
import socket
import sys
import time
import tomllib
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar
from urllib.parse import urlsplit

import precis_i18n

from server.certs import (
    check_certificate,
    covers,
    ensure_certificate,
    generate_self_signed,
    names_in_file,
)
from server.config import Address, Config, ConfigErrors, load_config, where
from server.jid import JID, InvalidJID, normalize_domain
from server.storage import StorageError, all_store_specs, open_storage
from server.storage.base import AccountExists, Credentials, NoSuchAccount
from server.xml.numbers import NumberError, parse_int

if TYPE_CHECKING:
    from server.storage import Storage

T = TypeVar("T")


class CLIError(Exception):
    """A failure the user can fix; printed as one line."""


def _error(message: str) -> None:
    print(f"presenced: error: {message}", file=sys.stderr)


def version() -> str:
    try:
        return importlib.metadata.version("presenced")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


# -- helpers ------------------------------------------------------------------------------------


def _account(text: str, config: Config) -> tuple[str, str]:
    """(localpart, domain) of a bare JID at one of our domains."""
    try:
        jid = JID.parse(text)
    except InvalidJID as exc:
        raise CLIError(f"invalid JID {text!r}: {exc}") from None
    if jid.local is None or jid.resource:
        raise CLIError(f"{text!r} is not a bare JID of the form user@domain")
    if jid.domain not in config.domains:
        raise CLIError(f"{jid.domain} is not a domain of this server; it serves "
                       f"{', '.join(config.domains)} (see --config)")
    return jid.local, jid.domain


def _password(given: str | None, confirm: bool) -> str:
    """From --password, else prompted (twice) on a terminal, else one line of stdin."""
    if given is not None:
        password = given
    elif sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            if confirm and password and getpass.getpass("Password (again): ") != password:
                raise CLIError("the passwords do not match")
        except EOFError:
            password = ""
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise CLIError("empty password")
    return password


def _credentials(password: str, config: Config) -> Credentials:
    from server.stream.scram import derive_credentials

    try:  # RFC 8265 §4.2: one that does not prepare could never be used to log in
        precis_i18n.get_profile("OpaqueString").enforce(password)
    except UnicodeError as exc:
        raise CLIError(f"unusable password: {exc} (RFC 8265 OpaqueString)") from None
    return derive_credentials(password, config.c2s.scram_iterations)


def _with_storage(config: Config, use: Callable[[Storage], Awaitable[T]]) -> T:
    async def run() -> T:
        storage = await open_storage(config)
        try:
            return await use(storage)
        finally:
            await storage.close()
    return asyncio.run(run())


# -- commands -----------------------------------------------------------------------------------


def _log_to_stderr(level: str, node: str | None = None) -> None:
    """One line per event: ``time=... level=INFO logger=presenced event=... key=value``; with
    [cluster] ``node=<name>`` after the level, on every line, so that the lines of several nodes
    in one terminal or file (serve --workers) can be told apart. The first ``node=`` of a line
    is always the process's own: a message may carry another (a PEP node, a dead cluster node).
    """
    # Node names are letters, digits, '.', '_', '-' (cluster/settings.py): no '%' to escape.
    named = f"node={node} " if node is not None else ""
    formatter = logging.Formatter(
        f"time=%(asctime)s.%(msecs)03dZ level=%(levelname)s {named}logger=%(name)s %(message)s",
        "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("aiosqlite").setLevel(logging.INFO)  # a line per query, even at debug


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigErrors as exc:
        for e in exc.errors:
            _error(str(e))
        return 2
    _log_to_stderr("DEBUG" if args.debug else config.log.level.upper(), _log_node(args, config))
    if args.worker_node is not None:  # started by serve --workers (server/cluster/workers.py)
        from server import listening
        listening.share_ports()
        config = dataclasses.replace(config, cluster=dataclasses.replace(
            config.cluster, node=args.worker_node))
        return _run_server(config)
    if args.workers is not None:
        return _serve_workers(args, config)
    if config.cluster.enabled and config.cluster.node is None:
        _error(f"{config.path}: [cluster] node: missing: each process of a cluster needs a "
               "name of its own (or run serve --workers N, which derives them)")
        return 2
    ensure_certificate(config)
    if args.config is None:
        print(f"presenced: no --config: serving {', '.join(config.domains)} with the built-in "
              f"defaults, data in {config.data_dir.absolute()}\n"
              f"presenced: add a user with: presenced adduser user@{config.domains[0]}",
              file=sys.stderr)
    _log_data(config, args.config)
    return _run_server(config)


def _log_node(args: argparse.Namespace, config: Config) -> str | None:
    """The node name serve's log lines carry: a worker's, the [cluster] node's, or under
    serve --workers the parent's (the base of its workers' names); None without [cluster]."""
    if args.worker_node is not None:
        return str(args.worker_node)
    if not config.cluster.enabled:
        return None
    if args.workers is not None:
        from server.cluster import workers

        return workers.base_name(config)
    return config.cluster.node


def _serve_workers(args: argparse.Namespace, config: Config) -> int:
    from server.cluster import workers

    problem = workers.problem(config, args.workers)
    if problem is not None:
        _error(problem)
        return 2
    assert config.path is not None  # [cluster] is only in a file
    ensure_certificate(config)  # once, before the workers (they would race to make it)
    _log_data(config, args.config)
    names = workers.worker_names(config, args.workers)
    commands = {name: workers.worker_command(config.path, name, args.debug) for name in names}
    return asyncio.run(workers.supervise(commands))


def _run_server(config: Config) -> int:
    import server.app
    from server.listening import raise_open_files_limit

    # Each connection is a file descriptor: the soft limit (often 1024) up to the hard one.
    before, after = raise_open_files_limit()
    logging.getLogger("presenced").info("event=open-files-limit soft=%d was=%d", after, before)

    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(server.app.serve(config))


def _database(config: Config) -> str:
    """Where the accounts are, for messages: the SQLite file or the PostgreSQL database."""
    storage = config.storage
    if storage.backend == "sqlite":
        return str(storage.path.absolute())
    return f"postgresql {(storage.dsn or '').rpartition('@')[2]}"  # no user or password


def _log_data(config: Config, config_file: Path | None) -> None:
    """At start, where the data is and how many accounts it has (issue 19: a config file
    elsewhere than the one adduser used means another, empty, database)."""
    log = logging.getLogger("presenced")
    try:
        count = _with_storage(config, lambda s: _count_accounts(s, config.domains))
    except Exception as exc:  # the server's own start reports storage problems
        log.warning("event=accounts-uncounted reason=%s", str(exc) or type(exc).__name__)
        return
    log.info("event=data data_dir=%s database=%s accounts=%d", config.data_dir.absolute(),
             _database(config), count)
    if count == 0:
        where_from = f" --config {config_file}" if config_file is not None else ""
        log.warning("event=no-accounts hint=%s", f'"presenced adduser '
                    f'user@{config.domains[0]}{where_from}"')


async def _count_accounts(storage: Storage, domains: Sequence[str]) -> int:
    return sum([len(await storage.accounts.list(domain)) for domain in domains])


def cmd_adduser(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    user, domain = _account(args.jid, config)
    credentials = _credentials(_password(args.password, confirm=True), config)
    try:
        _with_storage(config, lambda s: s.accounts.create(user, domain, credentials))
    except AccountExists:
        raise CLIError(f"{user}@{domain} already exists (change its password with "
                       f"presenced passwd)") from None
    print(f"added {user}@{domain} to {_database(config)}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    user, domain = _account(args.jid, config)
    if not _with_storage(config, lambda s: s.accounts.exists(user, domain)):
        raise CLIError(f"no such user: {user}@{domain}")
    credentials = _credentials(_password(args.password, confirm=True), config)
    try:
        _with_storage(config, lambda s: s.accounts.set_credentials(user, domain, credentials))
    except NoSuchAccount:  # deleted meanwhile
        raise CLIError(f"no such user: {user}@{domain}") from None
    print(f"changed the password of {user}@{domain}")
    return 0


def cmd_deluser(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    user, domain = _account(args.jid, config)
    try:
        _with_storage(config, lambda s: s.accounts.delete(user, domain))
    except NoSuchAccount:
        raise CLIError(f"no such user: {user}@{domain}") from None
    print(f"deleted {user}@{domain}")
    return 0


def _bind_problem(address: Address) -> tuple[str, str] | None:
    """(severity, message) when we could not listen on the address now."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return "error", f"{address}: cannot resolve {address.host}: {exc.strerror}"
    for family, kind, proto, _name, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
                sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # a running presenced is a good reason
                return "warning", f"{address} is in use (by a running presenced?)"
            return "error", f"cannot listen on {address}: {exc.strerror}"
    return None


def _writable_dir(path: Path) -> str | None:
    """Why we could not create or write files in this directory, or None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" if existing == path else \
            f"cannot create {path}: {existing} is not writable"
    return None


def _database_problem(config: Config) -> tuple[str, str] | None:
    """(config key, problem) when the PostgreSQL database cannot be used (SQLite: see the
    directory check)."""
    if config.storage.backend != "postgresql":
        return None
    from server.storage import postgres

    try:
        problem = asyncio.run(postgres.probe(config.storage))
    except StorageError as exc:  # the password file
        return "storage.password_file", str(exc)
    return None if problem is None else ("storage.dsn", problem)


def _external_url_problem(config: Config) -> str | None:
    """[http] external_url names the host clients fetch uploads and find WebSocket/BOSH at:
    served by our HTTPS listener, the certificate must cover it, or every client refuses it
    (behind a proxy, the proxy's certificate is the one that counts: not checked)."""
    http = config.modules.get("http")
    url = getattr(http, "external_url", None)
    if url is None or not config.listen.https:
        return None
    parsed = urlsplit(str(url))
    host = parsed.hostname
    if parsed.scheme != "https" or not host:
        return None
    tls = config.tls
    chosen = tls.domain_certificates.get(host)
    certificate = chosen[0] if chosen else tls.certificate
    names = names_in_file(certificate)
    if names is None:
        if not tls.generated:
            return None  # the certificate's own problem is reported with [tls]
        names = list(config.local_domains)  # what the generated one will name
    if covers(names, host):
        return None
    return (f"{url}: the certificate ({certificate}) does not name {host} (it names "
            f"{', '.join(names)}): clients will refuse uploads and web connections there")


# Below this many open files a process serves too few clients for most deployments.
FEW_OPEN_FILES = 4096


def _open_files_problem() -> str | None:
    """serve raises its soft RLIMIT_NOFILE to the hard limit; a hard limit this low caps the
    connections one process can hold (each is a file descriptor)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= FEW_OPEN_FILES:
        return None
    return (f"the hard limit is {hard} open files, so one process holds fewer than {hard} "
            f"connections; raise it (LimitNOFILE= in the systemd unit, nofile in "
            f"/etc/security/limits.conf) or run serve --workers N")


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(f"error: {e}")
        print(f"{len(exc.errors)} error(s)")
        return 1
    found: list[tuple[str, str, str]] = []  # (severity, where, message)
    tls = config.tls
    if tls.generated and not (tls.certificate.exists() and tls.key.exists()):
        print(f"note: a self-signed certificate for {', '.join(config.local_domains)} will be "
              f"made at first start: {tls.certificate}")
    else:
        # Service hosts (muc.<domain>, components) need the certificate too, for federation.
        # Not the domains with a certificate of their own ([tls] domain_certificates).
        shared = [d for d in config.local_domains if d not in tls.domain_certificates]
        for p in check_certificate(tls.certificate, tls.key, shared):
            found.append((p.severity, where(config, f"tls.{p.subject}"), p.message))
    for domain, (chain, private_key) in tls.domain_certificates.items():
        for p in check_certificate(chain, private_key, [domain]):
            found.append((p.severity, where(config, "tls.domain_certificates"),
                          f"{domain}: {p.message}"))
    external = _external_url_problem(config)
    if external:
        found.append(("warning", where(config, "http.external_url"), external))
    if tls.ca_file is not None and not os.access(tls.ca_file, os.R_OK):
        found.append(("error", where(config, "tls.ca_file"), f"cannot read {tls.ca_file}"))
    directories = [("data_dir", config.data_dir)]
    if config.storage.backend == "sqlite":
        directories.append(("storage.path", config.storage.path.parent))
    for key, directory in directories:
        problem = _writable_dir(directory)
        if problem:
            found.append(("error", where(config, key), problem))
            break
    database = _database_problem(config)
    if database:
        found.append(("error", where(config, database[0]), database[1]))
    if config.cluster.enabled:  # SQLite with [cluster] is refused at load already
        from server.cluster.cli import probe
        assert config.cluster.redis is not None
        redis = asyncio.run(probe(config.cluster.redis))
        if redis:
            found.append(("error", where(config, "cluster.redis"), redis))
        if config.cluster.node is None:
            print("note: [cluster] node is unset: only serve --workers can start (its workers "
                  "are named <host name>-w1 …)")
    for kind in ("c2s", "c2s_tls", "s2s", "s2s_tls", "component", "http", "https"):
        for address in getattr(config.listen, kind):
            bind = _bind_problem(address)
            if bind:
                found.append((bind[0], where(config, f"listen.{kind}"), bind[1]))
    files = _open_files_problem()
    if files:
        found.append(("warning", "open files (RLIMIT_NOFILE)", files))
    for severity, place, message in found:
        print(f"{severity}: {place}: {message}")
    errors = sum(1 for f in found if f[0] == "error")
    warnings = len(found) - errors
    name = config.path or "built-in defaults"
    print(f"{name}: {errors} error(s), {warnings} warning(s)" if found else f"{name}: ok")
    return 1 if errors else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = load_config(args.config)

    async def run() -> None:
        from server.storage.migrate import read_versions

        storage = await open_storage(config, all_store_specs())
        try:
            versions = await read_versions(storage.db)
        finally:
            await storage.close()
        migrated = {name: (old, new) for name, old, new in storage.migrated}
        for spec in storage.specs:
            if spec.name in migrated:
                old, new = migrated[spec.name]
                print(f"{spec.name}: migrated from version {old} to {new}")
            else:
                print(f"{spec.name}: version {versions.get(spec.name, 0)}, up to date")

    asyncio.run(run())
    return 0


class _Progress:
    """A progress bar on a terminal (stderr), else a plain line per table."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, table: str, done: int, total: int, all_done: int, all_total: int
                 ) -> None:
        if not self.tty:
            if done == total:
                print(f"copied {table}: {total} row(s)", file=sys.stderr)
            return
        now = time.monotonic()
        if done not in (0, total) and now - self._last < 0.1:
            return
        self._last = now
        fraction = all_done / all_total if all_total else 1.0
        bar = "#" * int(fraction * 30)
        print(f"\r[{bar:<30}] {fraction:4.0%}  {table} {done}/{total}\033[K", end="",
              file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _same_database(a: Config, b: Config) -> bool:
    if a.storage.backend != b.storage.backend:
        return False
    if a.storage.backend == "sqlite":
        return a.storage.path.resolve() == b.storage.path.resolve()
    return a.storage.dsn == b.storage.dsn


def cmd_storage_copy(args: argparse.Namespace) -> int:
    source_config, target_config = load_config(args.source), load_config(args.target)
    if _same_database(source_config, target_config):
        raise CLIError(f"{args.source} and {args.target} name the same database")
    if source_config.storage.backend == "sqlite" and not source_config.storage.path.exists():
        raise CLIError(f"{args.source}: there is no database at {source_config.storage.path}")
    from server.storage.copy import copy

    progress = _Progress()

    async def run() -> dict[str, int]:
        specs = all_store_specs()
        source = await open_storage(source_config, specs)
        try:
            target = await open_storage(target_config, specs)
            try:
                return await copy(source, target, progress)
            finally:
                await target.close()
        finally:
            await source.close()

    try:
        copied = asyncio.run(run())
    finally:
        progress.finish()
    print(f"copied {sum(copied.values())} row(s) in {len(copied)} table(s) from "
          f"{args.source} ({source_config.storage.backend}) to {args.target} "
          f"({target_config.storage.backend})")
    return 0


def cmd_cert_import(args: argparse.Namespace) -> int:
    """presenced cert import DIR...: certbot's live/<name>/ or any directory of pairs, copied
    to where the configuration reads them (server/certs.py import_certificates)."""
    from server.certs import import_certificates

    if not args.domains[1:]:
        raise CLIError("cert import needs at least one directory (e.g. /etc/letsencrypt)")
    config = load_config(args.config)
    imported, notes = import_certificates(config, [Path(d) for d in args.domains[1:]])
    for done in imported:
        print(f"imported {done.source.certificate} for {', '.join(done.domains)} "
              f"(valid until {done.source.not_after:%Y-%m-%d}) -> {done.certificate}, {done.key}")
    for note in notes:
        print(f"skipped: {note}", file=sys.stderr)
    if not imported:
        raise CLIError("no certificate for any of our domains was found")
    print("a running server uses them after: presenced ctl reload (or SIGHUP)")
    return 0


def _socket_of_broken_config(path: Path) -> Path | None:
    from server import ctl

    try:
        data_dir = tomllib.loads(path.read_text(encoding="utf-8")).get("data_dir")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        data_dir = None
    if not isinstance(data_dir, str):
        return None
    return (path.absolute().parent / data_dir) / ctl.SOCKET_NAME


def cmd_ctl(args: argparse.Namespace) -> int:
    """presenced ctl COMMAND: one request over the running server's admin socket."""
    from server import ctl

    try:
        path = ctl.socket_path(load_config(args.config))
    except ConfigErrors:
        # A file with errors still names the data_dir: reload then reports them, and the
        # running server keeps its configuration.
        found = _socket_of_broken_config(args.config)
        if found is None:
            raise
        path = found
    needs = {"kick": "JID", "announce": "TEXT"}
    if args.action in needs and not args.args:
        raise CLIError(f"ctl {args.action} needs {needs[args.action]}")
    if args.action not in needs and args.args:
        raise CLIError(f"ctl {args.action} takes no argument")
    given = [" ".join(args.args)] if args.action in needs else []
    try:
        ok, output = ctl.call(path, args.action, given)
    except (FileNotFoundError, ConnectionRefusedError):
        raise CLIError(f"no running presenced answers on {path} (started with this "
                       f"--config?)") from None
    except PermissionError:
        raise CLIError(f"{path}: permission denied (run as the server's user)") from None
    except TimeoutError:
        raise CLIError(f"{path}: the server did not answer") from None
    if not ok:
        raise CLIError(output)
    print(output)
    return 0


def cmd_cert(args: argparse.Namespace) -> int:
    if args.domains[0] == "import":
        return cmd_cert_import(args)
    domains: list[str] = []
    for raw in args.domains:
        try:
            domains.append(normalize_domain(raw))
        except ValueError as exc:
            raise CLIError(f"invalid domain {raw!r}: {exc}") from None
    cert_path, key_path = args.out / f"{domains[0]}.pem", args.out / f"{domains[0]}.key"
    for path in (cert_path, key_path):
        if path.exists() and not args.force:
            raise CLIError(f"{path} exists (--force replaces it)")
    generate_self_signed(domains, cert_path, key_path, days=args.days)
    print(cert_path)
    print(key_path)
    return 0


def cmd_invite_create(args: argparse.Namespace) -> int:
    from server.modules.invites import create_for_cli, parse_duration

    config = load_config(args.config)
    try:
        lifetime = parse_duration(args.expires)
        _invitation, lines = asyncio.run(create_for_cli(
            config, inviter=args.inviter, domain=args.domain, admin=args.admin,
            contact=not args.no_contact, uses=args.uses, lifetime=lifetime, group=args.group))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print("\n".join(lines))
    return 0


# -- entry point --------------------------------------------------------------------------------


def _days(text: str) -> int:
    try:
        return parse_int(text, minimum=1, maximum=1_000_000, name="days")
    except NumberError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None


def _workers(text: str) -> int:
    try:
        return parse_int(text, minimum=1, maximum=1024, name="workers")
    except NumberError:
        raise argparse.ArgumentTypeError(f"not a number of workers from 1 to 1024: {text!r}") \
            from None


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000000:
        raise argparse.ArgumentTypeError(f"not a number from 1 to 1000000: {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors too start with ``presenced: error:``, also after a command name."""
        self.print_usage(sys.stderr)
        self.exit(2, f"presenced: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="presenced", description="A federated XMPP server: the presence service.")
    parser.add_argument("--version", action="version", version=f"presenced {version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common = _Parser(add_help=False)
    common.add_argument("--config", "-c", type=Path, metavar="FILE",
                        help="TOML configuration (default: built-in defaults, see "
                             "conf/presenced.toml)")
    # SUPPRESS: absent after the command, the value before it stays.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                parents: list[_Parser] | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help,
                           parents=[common] if parents is None else parents)
        p.set_defaults(run=run)
        return p

    serve = command("serve", cmd_serve, "run the server until SIGTERM or SIGINT")
    serve.add_argument("--workers", type=_workers, metavar="N",
                       help="run N processes behind the same listening ports (SO_REUSEPORT), "
                            "each a node of the cluster: needs [cluster]; the node names are "
                            "<[cluster] node or host name>-w1 … -wN")
    serve.add_argument("--worker-node", metavar="NAME", help=argparse.SUPPRESS)  # one worker
    password_help = "the password (visible to other local users: prefer the prompt or stdin)"
    for name, run, help in (("adduser", cmd_adduser, "create an account"),
                            ("passwd", cmd_passwd, "change an account's password")):
        p = command(name, run, help + " (prompts for the password, or reads a line of stdin)")
        p.add_argument("jid", metavar="JID", help="user@domain")
        p.add_argument("--password", "-p", metavar="PW", help=password_help)
    command("deluser", cmd_deluser, "delete an account and everything it owns").add_argument(
        "jid", metavar="JID", help="user@domain")
    command("check", cmd_check, "check the configuration, certificate and listening addresses")
    command("migrate", cmd_migrate, "create or upgrade the database's tables, store by store "
            "(the server also does it at start)")
    storage = sub.add_parser("storage", help="move data between databases",
                             description="move data between databases")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True,
                                         metavar="COMMAND")
    copy = storage_sub.add_parser(
        "copy", help="copy all data into an empty database (SQLite <-> PostgreSQL)",
        description="copy every account and everything it owns from the database of one "
                    "configuration into the empty database of another; stop the server first")
    copy.set_defaults(run=cmd_storage_copy)
    copy.add_argument("--from", dest="source", type=Path, required=True, metavar="CONFIG",
                      help="the configuration whose [storage] is read")
    copy.add_argument("--to", dest="target", type=Path, required=True, metavar="CONFIG",
                      help="the configuration whose [storage] is filled (must be empty)")
    copy.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)
    invite = sub.add_parser("invite", help="invitations (XEP-0401): a link to a page that "
                            "registers an account", description="invitations (XEP-0401)")
    invite_sub = invite.add_subparsers(dest="invite_command", required=True, metavar="COMMAND")
    create = invite_sub.add_parser(
        "create", parents=[common], help="make an invitation and print its link and xmpp: URI",
        description="make an invitation; prints the page's link, the xmpp: URI and what it "
                    "allows. The new account and the inviter become contacts (XEP-0379).")
    create.set_defaults(run=cmd_invite_create)
    create.add_argument("--from", dest="inviter", metavar="JID",
                        help="the inviting account (default: the first of `admins` on the "
                             "domain)")
    create.add_argument("--admin", action="store_true",
                        help="from the domain's admin (the first account of `admins`)")
    create.add_argument("--no-contact", action="store_true",
                        help="from nobody: the new account gets no contact")
    create.add_argument("--domain", metavar="DOMAIN", help="default: the first domain")
    create.add_argument("--uses", type=_count, default=1, metavar="N",
                        help="how many accounts it may make (default 1)")
    create.add_argument("--expires", default="7d", metavar="TIME",
                        help="valid for this long: 7d, 12h, 30m, 2w (default 7d)")
    create.add_argument("--group", metavar="G",
                        help="the roster group inviter and new account put each other in")
    from server.porting.commands import add_commands as porting_commands

    porting_commands(sub, [common])  # import, export (XEP-0227)
    from server.cluster.cli import add_command as add_cluster_command  # presenced cluster

    add_cluster_command(sub, common)
    cert = command("cert", cmd_cert, "make a self-signed certificate (EC P-256) for the domains, "
                   "written as DIR/FIRST-DOMAIN.pem and .key", parents=[])
    cert.add_argument("domains", nargs="+", metavar="DOMAIN",
                      help="the domains; or: import DIR... (certbot's /etc/letsencrypt or any "
                           "directory of NAME.crt/NAME.key pairs, copied to where --config's "
                           "[tls] reads them)")
    cert.add_argument("--config", "-c", type=Path, metavar="FILE",
                      help="with import: the configuration whose [tls] files are written")
    cert.add_argument("--out", "-o", type=Path, default=Path("."), metavar="DIR",
                      help="directory to write to (default: the current one)")
    cert.add_argument("--days", type=_days, default=825, help="validity in days (default 825)")
    cert.add_argument("--force", action="store_true", help="replace existing files")
    cert.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)
    ctl = command("ctl", cmd_ctl, "control the running server over its admin socket "
                  "(data_dir/presenced.sock, for the server's user only)")
    ctl.add_argument("action", choices=("status", "sessions", "kick", "reload", "announce",
                                        "stats"), metavar="ACTION",
                     help="status | sessions | kick JID | reload | announce TEXT | stats")
    ctl.add_argument("args", nargs="*", metavar="ARG")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except ConfigErrors as exc:
        for e in exc.errors:
            _error(str(e))
    except (CLIError, StorageError) as exc:
        _error(str(exc))
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.filename is not None:  # permissions, full disk, ...
            _error(f"{exc.filename}: {exc.strerror}")
        elif not args.debug:
            _error(f"unexpected {type(exc).__name__}: {exc} (run with --debug to see where)")
    return 1
