"""The server the socket fuzzers attack: a real presenced in this process (so its log is
watched record by record), with every optional surface on (plain HTTP for BOSH, WebSocket
and upload; the echo service), two accounts, and a log watcher."""

from __future__ import annotations

import contextlib
import logging
import traceback
from pathlib import Path

from server.app import Server
from server.config import load_config
from tests.conftest import PASSWORD, RunningServer, TracebackCatcher, stop_server, write_config
from tests.rawclient import RawClient

USERS = ("alice@a.test", "bob@a.test")
# BOSH and WebSocket log in over TLS only: the fuzzers speak plain HTTP as if behind a proxy
# that terminated TLS (X-Forwarded-Proto: https from a trusted address).
# No server-to-server lookups: a stanza to another domain ("fuzz") is refused at once instead
# of waiting for DNS, which on a machine without network outlasts the fuzzers' 10 s limit for
# an answer (seen in CI).
EXTRA = """
[echo]
enabled = true
[http]
trusted_proxies = ["127.0.0.1/32"]
[s2s]
allow = ["peer.fuzz.test"]
"""
PROXY_HEADERS = {"X-Forwarded-Proto": "https"}


async def start(tmp: Path) -> RunningServer:
    path = write_config(tmp, EXTRA)
    text = path.read_text().replace("https = []", 'https = []\nhttp = ["127.0.0.1:0"]', 1)
    path.write_text(text)
    server = Server(load_config(path))
    await server.start()
    running = RunningServer(server, tmp / "data", path)
    for jid in USERS:
        await running.add_user(jid)
    return running


async def stop(running: RunningServer) -> None:
    await stop_server(running)


async def ensure_accounts(running: RunningServer) -> None:
    """A fuzz case may have deleted an account (jabber:iq:register <remove/>) or changed its
    password: put them back before logging in again."""
    from server.stream.scram import derive_credentials
    accounts = running.server.storage.accounts
    for jid in USERS:
        user, domain = jid.split("@")
        if await accounts.exists(user, domain):
            await accounts.set_credentials(user, domain, derive_credentials(PASSWORD))
        else:
            await running.add_user(jid)


async def login(running: RunningServer, jid: str, resource: str = "raw") -> RawClient:
    await ensure_accounts(running)
    return await running.raw_login(jid, resource)


class LogWatch:
    """The server's tracebacks since the last look."""

    def __init__(self) -> None:
        self.catcher = TracebackCatcher()
        self.seen = 0

    def __enter__(self) -> LogWatch:
        logging.getLogger().addHandler(self.catcher)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self.catcher)

    def new(self) -> list[logging.LogRecord]:
        records = self.catcher.records[self.seen:]
        self.seen = len(self.catcher.records)
        return records


def where(record: logging.LogRecord) -> str:
    """The exception and the innermost frame of the server's own code: the defect's place."""
    exc_info = record.exc_info
    if not exc_info or exc_info[1] is None:
        return record.getMessage()[:80]
    exc = exc_info[1]
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/server/" in f.filename or "/federation/" in f.filename]
    frame = (ours or frames or [None])[-1]
    place = "?" if frame is None else \
        f"{frame.filename.split('/server/')[-1].split('/federation/')[-1]}:{frame.lineno}"
    return f"{type(exc).__name__} at {place}"


def describe(record: logging.LogRecord) -> str:
    exc = record.exc_info[1] if record.exc_info else None
    return f"{record.name}: {record.getMessage()[:120]} | {type(exc).__name__}: {str(exc)[:160]}"


async def close_quietly(client: RawClient | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await client.close()
