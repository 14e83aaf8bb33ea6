"""PostgreSQL backend on asyncpg: a connection pool, per-store versioned migrations.

Stores write their SQL with ``?`` placeholders (shared with SQLite); they become ``$1, $2, ...``
here. Each call outside a transaction runs on a pooled connection in autocommit, so it is
committed on return. Migrations run in one transaction under an advisory lock: two processes
starting at once on an empty database take turns, and the second finds nothing left to do.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg

from server.config import StorageConfig
from server.storage import StorageError
from server.storage import migrate as migrations
from server.storage.db import (
    Database,
    ForeignKeyViolation,
    Outage,
    Row,
    StorageUnavailable,
    UniqueViolation,
)
from server.xml.numbers import NumberError, parse_int

if TYPE_CHECKING:
    from server.storage import StoreSpec

# pg_advisory_xact_lock key of schema migrations: "presencd" in ASCII.
MIGRATION_LOCK = 0x70726573656E6364
CONNECT_TIMEOUT = 10.0
# A database that cannot work now, whatever the statement: the connection lost or refused (a
# restart: asyncpg's pool connects again on the next acquire), shutting down or starting up,
# out of disk or connections, a read-only standby.
_UNAVAILABLE = (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError,
                asyncpg.InsufficientResourcesError, asyncpg.ReadOnlySQLTransactionError,
                asyncpg.InterfaceError, OSError, TimeoutError)
_CONNECT_ERRORS = (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                   ValueError)


@functools.lru_cache(maxsize=512)
def placeholders(sql: str) -> str:
    """``?`` -> ``$n``, in order (our SQL has no ``?`` inside literals)."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _m: f"${next(counter)}", sql)


def _integrity(exc: asyncpg.PostgresError) -> Exception:
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return ForeignKeyViolation(str(exc))
    if isinstance(exc, asyncpg.UniqueViolationError):
        return UniqueViolation(str(exc))
    return exc


def _status_count(status: str) -> int:
    """Rows changed, from a command tag: "INSERT 0 1", "UPDATE 3", "DELETE 0"."""
    try:
        return parse_int(status.rsplit(" ", 1)[-1], maximum=2**63 - 1, name="row count")
    except NumberError:
        return 0


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool | asyncpg.Connection, name: str,
                 outage: Outage | None = None) -> None:
        self._pool = pool   # a pool, or inside transaction() the transaction's connection
        self.name = name    # the DSN without password, for messages
        self.outage = outage or Outage(f"postgresql:{name}")
        self._in_transaction = not isinstance(pool, asyncpg.Pool)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            rows = list(await self._pool.fetch(placeholders(sql), *args))
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise _integrity(exc) from None
        except _UNAVAILABLE as exc:
            raise self._failed(exc, write=False) from None
        if self.outage.down:
            self.outage.succeeded(write=False)
        return rows

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            status = await self._pool.execute(placeholders(sql), *args)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise _integrity(exc) from None
        except _UNAVAILABLE as exc:
            raise self._failed(exc, write=True) from None
        if self.outage.down and not self._in_transaction:
            self.outage.succeeded(write=True)
        return _status_count(status)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._pool.executemany(placeholders(sql), rows)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise _integrity(exc) from None
        except _UNAVAILABLE as exc:
            raise self._failed(exc, write=True) from None
        if self.outage.down and not self._in_transaction:
            self.outage.succeeded(write=True)

    def _failed(self, exc: BaseException, *, write: bool) -> Exception:
        """StorageUnavailable for a database that cannot work now (asyncpg's pool connects
        again on the next acquire, so the server recovers when PostgreSQL is back)."""
        if isinstance(exc, asyncpg.InterfaceError) and "closed" not in str(exc):
            return exc  # a misuse of the connection: a bug, not an outage
        return self.outage.failed(connect_error(exc), write=write)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        if not isinstance(self._pool, asyncpg.Pool):
            raise RuntimeError("transactions do not nest")
        try:
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        yield PostgresDatabase(conn, self.name, self.outage)
                except asyncpg.IntegrityConstraintViolationError as exc:  # at COMMIT (deferred)
                    raise _integrity(exc) from None
        except _UNAVAILABLE as exc:
            raise self._failed(exc, write=True) from None
        if self.outage.down:
            self.outage.succeeded(write=True)

    async def columns(self, table: str) -> list[tuple[str, str]]:
        rows = await self.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            table)
        return [(str(r[0]), str(r[1])) for r in rows]

    async def adapt(self, table: str, columns: Sequence[str], rows: list[Row]) -> list[Row]:
        """SQLite keeps booleans as integers; asyncpg wants bool for a boolean column."""
        types = dict(await self.columns(table))
        booleans = [i for i, c in enumerate(columns) if types.get(c) == "boolean"]
        if not booleans:
            return rows
        adapted: list[Row] = []
        for row in rows:
            values = list(row)
            for i in booleans:
                if values[i] is not None:
                    values[i] = bool(values[i])
            adapted.append(values)
        return adapted

    async def after_copy(self, tables: Sequence[str]) -> None:
        """Rows came with their ids: move identity sequences past them."""
        for table in tables:
            for (column,) in await self.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                    "current_schema() AND table_name = ? AND is_identity = 'YES'", table):
                await self.fetch(
                    f"SELECT setval(pg_get_serial_sequence(?, ?), "
                    f'coalesce((SELECT max("{column}") FROM "{table}"), 0) + 1, false)',
                    table, column)

    async def migrate(self, specs: Sequence[StoreSpec]) -> migrations.Applied:
        try:
            if await self._versions_current(specs):
                return []  # the usual case: no lock
            async with self.transaction() as tx:
                # Held until commit: a second process starting now waits here, then sees ours.
                await tx.execute("SELECT pg_advisory_xact_lock(?)", MIGRATION_LOCK)
                await tx.execute(migrations.CREATE_TABLE)
                steps = migrations.pending(specs, await migrations.read_versions(tx),
                                           self.dialect, self.name)
                applied = await migrations.apply(tx, steps)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise StorageError(f"{self.name}: cannot create the tables: {exc}") from None
        except (asyncpg.PostgresError, ForeignKeyViolation, UniqueViolation,
                StorageUnavailable) as exc:
            raise StorageError(f"cannot use {self.name}: {exc}") from None
        return applied

    async def _versions_current(self, specs: Sequence[StoreSpec]) -> bool:
        row = await self.fetchrow("SELECT to_regclass('schema_versions') IS NOT NULL")
        if row is None or not row[0]:
            return False
        return not migrations.pending(specs, await migrations.read_versions(self),
                                      self.dialect, self.name)

    async def close(self) -> None:
        await self._pool.close()


def _password(config: StorageConfig) -> str | None:
    if config.password_file is None:
        return None
    try:
        return config.password_file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StorageError(f"cannot read the password file {config.password_file}: "
                           f"{reason}") from None


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """asyncpg's default resets a connection's session (a round trip) each time it goes back
    to the pool, doubling the cost of a one-statement call. We leave nothing in a session:
    no LISTEN, cursors, session settings or session-level advisory locks."""


def connect_error(exc: BaseException) -> str:
    """One line saying why we could not connect."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, OSError):
        return os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


async def connect(config: StorageConfig) -> PostgresDatabase:
    """A pool of connections to the configured database; StorageError when unreachable."""
    assert config.dsn is not None  # the config requires it for this backend
    name = describe_dsn(config.dsn)
    try:
        # min_size 0: asyncpg keeps no floor of connections, so while PostgreSQL is down it runs
        # no background reconnect loop logging a traceback per retry; a query connects again
        # (the Outage logs the outage once). One connection is made now, to fail early.
        pool = await asyncpg.create_pool(
            config.dsn, password=_password(config), min_size=0, max_size=config.pool_size,
            timeout=CONNECT_TIMEOUT, command_timeout=None, reset=_no_reset)
    except _CONNECT_ERRORS as exc:
        raise StorageError(f"cannot connect to {name}: {connect_error(exc)}") from None
    try:
        async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
            await conn.fetchval("SELECT 1")
    except _CONNECT_ERRORS as exc:
        await pool.close()
        raise StorageError(f"cannot connect to {name}: {connect_error(exc)}") from None
    return PostgresDatabase(pool, name)


async def probe(config: StorageConfig) -> str | None:
    """For ``presenced check``: why this database cannot be used, or None. Connects once, and
    checks that we may create the tables (when they do not exist yet) or use them."""
    assert config.dsn is not None
    try:
        conn = await asyncpg.connect(config.dsn, password=_password(config),
                                     timeout=CONNECT_TIMEOUT)
    except _CONNECT_ERRORS as exc:
        return f"cannot connect: {connect_error(exc)}"
    try:
        if await conn.fetchval("SELECT to_regclass('schema_versions') IS NULL"):
            if not await conn.fetchval("SELECT has_schema_privilege(current_schema(), 'CREATE')"):
                return (f"cannot create tables: permission denied for schema "
                        f"{await conn.fetchval('SELECT current_schema()')}")
            return None
        denied = await conn.fetchval(
            "SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_class c "
            "WHERE c.relnamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = current_schema()) "
            "AND c.relkind = 'r' "
            "AND NOT has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE')")
        if denied:
            return f"permission denied for table(s) {denied}"
        return None
    except asyncpg.PostgresError as exc:
        return f"cannot use the database: {exc}"
    finally:
        await conn.close()
