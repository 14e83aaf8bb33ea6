"""Fixtures: a real presenced on loopback (random ports) and real clients (slixmpp, raw)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import logging
import os
import ssl
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from server.app import Server
from server.certs import generate_self_signed
from server.config import ConfigError, load_config
from server.storage import open_storage
from server.stream.scram import derive_credentials
from tests.rawclient import RawClient

PASSWORD = "secret-password"
DOMAINS = ("a.test", "b.test")


def on_ci() -> bool:
    return bool(os.environ.get("CI"))


# -- under CI, a skip is a failure ---------------------------------------------------------------
# CI installs every peer the interop tests need (.ci/run), so a skip there means a test did not
# run that should have. A skipped test's report becomes a failure that names the skip's reason
# (xfail keeps its meaning); a module skipped at collection (pytest.importorskip at module level)
# is listed at the end and makes the run exit 1, without stopping the other modules.

_collection_skips: list[str] = []


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and on_ci():
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI (CI={os.environ['CI']!r}), where nothing may "
                           f"be skipped: {_skip_reason(report)}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    report = yield
    if report.skipped and on_ci():
        if os.environ.get("PYTEST_XDIST_WORKER"):
            # A worker's exit status does not reach pytest-xdist's controller, which hears of
            # failed collections only: the skip fails there.
            report.outcome = "failed"
            report.longrepr = (f"skipped under CI (CI={os.environ['CI']!r}), where nothing "
                               f"may be skipped: {_skip_reason(report)}")
        else:
            _collection_skips.append(f"{report.nodeid}: {_skip_reason(report)}")
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _collection_skips:
        terminalreporter.section("skipped under CI, where nothing may be skipped", red=True)
        for line in _collection_skips:
            terminalreporter.line(f"SKIPPED (a failure under CI) {line}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _collection_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- the default ports ----------------------------------------------------------------------
# The tests of README's defaults listen on 127.0.0.1:5222, 5223 and 5281 (where clients look
# by default). pytest-xdist runs files side by side, and other pytest runs may share the
# machine: whoever holds this lock has those ports.

_DEFAULT_PORTS_LOCK = Path("/tmp/presenced-tests-default-ports.lock")


@contextlib.contextmanager
def default_ports() -> Iterator[None]:
    """Hold 127.0.0.1:5222/5223/5281 for the tests inside (blocks until the holder is done)."""
    with _DEFAULT_PORTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def hold_default_ports() -> Iterator[None]:
    with default_ports():
        yield


# -- a traceback in the server's log fails the test ------------------------------------------
# DESIGN.md rule 4: an unexpected exception is an internal-server-error and one log line with
# its traceback; every bad input we know of must get its proper error instead. So a record at
# ERROR with exc_info from the server's loggers (presenced.*, and asyncio's and aiohttp's, which
# log what escapes a protocol callback, a task or a request handler) fails the test that was
# running, as does a traceback on the stderr of a presenced started as a process
# (tests/process.py keeps those). A test that provokes one on purpose says so:
#     @pytest.mark.server_traceback("why")
# Tests with this marker: tests/test_fuzz.py (the fuzzers report tracebacks as findings, with
# their reproducers).

_WATCHED_LOGGERS = ("presenced", "federation", "asyncio", "aiohttp")


def _from_test_client(record: logging.LogRecord) -> bool:
    """asyncio's logger is shared with the in-process test clients: an error future that a
    slixmpp client dropped ("Future exception was never retrieved": an iq error the test
    expected and caught elsewhere) is the client's, not the server's."""
    error = record.exc_info[1] if record.exc_info else None
    return error is not None and type(error).__module__.startswith("slixmpp")


class TracebackCatcher(logging.Handler):
    """Keeps the records with a traceback that the server's loggers emit at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.name.split(".", 1)[0] in _WATCHED_LOGGERS \
                and not _from_test_client(record):
            self.records.append(record)

    def render(self, limit: int = 3) -> str:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        shown = [formatter.format(r) for r in self.records[:limit]]
        more = len(self.records) - limit
        return "\n".join(shown) + (f"\n... and {more} more" if more > 0 else "")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "server_traceback(reason): this test provokes a traceback in the server's "
        "log on purpose; the suite-wide check (no traceback in the log) leaves it alone")


@pytest.fixture(autouse=True)
def _no_traceback_in_server_log(request: pytest.FixtureRequest) -> Any:
    from tests import process
    catcher = TracebackCatcher()
    root = logging.getLogger()
    root.addHandler(catcher)
    process.stderr_tracebacks.clear()
    try:
        yield catcher
    finally:
        root.removeHandler(catcher)
    check_server_log(catcher, request.node)


def check_server_log(catcher: TracebackCatcher, node: pytest.Item) -> None:
    """Fail (the running test) if the server logged a traceback, unless the test is marked."""
    from tests import process
    found = catcher.render() if catcher.records else ""
    if process.stderr_tracebacks:
        found += "\n" + "\n".join(process.stderr_tracebacks[:3])
        process.stderr_tracebacks.clear()
    if found and node.get_closest_marker("server_traceback") is None:
        pytest.fail("a traceback in the server's log (mark the test "
                    f"@pytest.mark.server_traceback(reason) if it is provoked on purpose):\n{found}",
                    pytrace=False)


@dataclass
class RunningServer:
    server: Server
    data_dir: Path
    config_path: Path
    _clients: list[slixmpp.ClientXMPP] = field(default_factory=list)

    def address(self, kind: str = "c2s") -> tuple[str, int]:
        for k, host, port in self.server.bound_addresses():
            if k == kind:
                return host, port
        raise LookupError(kind)

    async def add_user(self, jid: str, password: str = PASSWORD) -> None:
        user, domain = jid.split("@")
        await self.server.storage.accounts.create(user, domain, derive_credentials(password))

    async def raw(self, *, direct_tls: bool = False) -> RawClient:
        host, port = self.address("c2s_tls" if direct_tls else "c2s")
        return await RawClient.connect(host, port, direct_tls=direct_tls)

    async def raw_login(self, jid: str, resource: str = "raw",
                        password: str = PASSWORD) -> RawClient:
        user, domain = jid.split("@")
        client = await self.raw()
        client.jid = await client.login(domain, user, password, resource)  # type: ignore[attr-defined]
        return client

    async def client(self, jid: str, password: str = PASSWORD, *, resource: str = "slix",
                     presence: bool = True, direct_tls: bool = False,
                     plugins: tuple[str, ...] = ()) -> slixmpp.ClientXMPP:
        """A logged-in slixmpp client (session_start reached)."""
        xmpp = slixmpp.ClientXMPP(f"{jid}/{resource}", password)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        xmpp.ssl_context = ctx
        xmpp.enable_direct_tls = direct_tls
        xmpp.enable_starttls = not direct_tls
        for plugin in plugins:
            xmpp.register_plugin(plugin)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def session_start(_event: object) -> None:
            if presence:
                xmpp.send_presence()
            if not started.done():
                started.set_result(None)

        def failed(event: object) -> None:
            if not started.done():
                started.set_exception(AssertionError(f"login failed: {event}"))

        xmpp.add_event_handler("session_start", session_start)
        xmpp.add_event_handler("failed_auth", failed)
        xmpp.add_event_handler("connection_failed", failed)
        host, port = self.address("c2s_tls" if direct_tls else "c2s")
        xmpp.connect(host, port)
        await asyncio.wait_for(started, 10)
        self._clients.append(xmpp)
        return xmpp



def write_config(tmp: Path, extra: str = "", top: str = "", *,
                 domains: tuple[str, ...] = DOMAINS, host: str = "127.0.0.1",
                 s2s: str | None = None, s2s_tls: str | None = None, certificate: tuple[Path, Path] | None = None,
                 ca_file: Path | None = None, listen_extra: str = "") -> Path:
    """s2s, s2s_tls: federation listeners' "host:port"; certificate: (chain, key) instead of a
    self-signed one made for every domain the config serves (its services' too)."""
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    make_certificate = certificate is None
    if certificate is None:
        cert, key = data_dir / "cert.pem", data_dir / "key.pem"
        make_certificate = not cert.exists()
    else:
        cert, key = certificate
    listen_s2s = f's2s = ["{s2s}"]' if s2s else ""
    listen_s2s_tls = f's2s_tls = ["{s2s_tls}"]' if s2s_tls else ""
    ca = f'ca_file = "{ca_file}"' if ca_file else ""
    path = tmp / "presenced.toml"
    path.write_text(textwrap.dedent(f"""\
        domains = {list(domains)!r}
        data_dir = "{data_dir}"
        {top}
        [listen]
        c2s = ["{host}:0"]
        c2s_tls = ["{host}:0"]
        https = []
        {listen_s2s}
        {listen_s2s_tls}
        {listen_extra}
        [tls]
        certificate = "{cert}"
        key = "{key}"
        {ca}
        """) + textwrap.dedent(extra))
    if make_certificate:
        try:
            names = list(load_config(path).local_domains)
        except ConfigError:
            names = list(domains)  # a test of a bad config: the certificate does not matter
        generate_self_signed(names, cert, key)
    return path


async def start_server(tmp: Path, extra: str = "", top: str = "", **options: Any) -> RunningServer:
    """extra: tables appended at the end; top: top-level keys; options: see write_config."""
    path = write_config(tmp, extra, top, **options)
    server = Server(load_config(path))
    await server.start()
    return RunningServer(server, tmp / "data", path)


STOP_LIMIT = 60.0  # seconds a test server may take to stop before the test fails


async def stop_server(running: RunningServer) -> None:
    """Stop the server; one that has not stopped within STOP_LIMIT fails the test with every
    asyncio task's stack (what the stop waits for), instead of hanging the suite."""
    for xmpp in running._clients:
        xmpp.disconnect(wait=0.1)
    await asyncio.sleep(0)
    stopping = asyncio.ensure_future(running.server.stop())
    done, _ = await asyncio.wait({stopping}, timeout=STOP_LIMIT)
    if stopping in done:
        stopping.result()
        return
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=12, file=stacks)
    stopping.cancel()
    pytest.fail(f"the server did not stop within {STOP_LIMIT:g} s; tasks:\n"
                f"{stacks.getvalue()[-20000:]}")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path)
    try:
        yield running
    finally:
        await stop_server(running)


__all__ = ["PASSWORD", "RunningServer", "on_ci", "open_storage", "start_server", "stop_server"]
pytest_plugins = ["tests.pg"]  # the PostgreSQL cluster fixtures: pg_cluster, pg_dsn
