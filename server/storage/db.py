"""The one interface stores use to reach their backend's database: a few async calls with
``?`` placeholders, the same SQL on SQLite and PostgreSQL wherever the two dialects agree.

A store is written once against ``Database``; where the dialects differ (a JSON array
parameter, a row lock) its PostgreSQL subclass overrides the one method. Integrity errors
arrive as ``UniqueViolation`` / ``ForeignKeyViolation`` from either backend.
"""

from __future__ import annotations

import abc
import logging
import sys
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from server.storage import StoreSpec


class IntegrityViolation(Exception):
    pass


class UniqueViolation(IntegrityViolation):
    """A row with this key exists already."""


class ForeignKeyViolation(IntegrityViolation):
    """The row refers to a row that does not exist (an account deleted meanwhile)."""


Row = Sequence[Any]

log = logging.getLogger("presenced.storage")


class StorageUnavailable(Exception):
    """The database could not read or write for a reason of its own, not the request's: a full
    disk, a read-only file system, the connection lost or refused (PostgreSQL restarting). It may
    work later: the router answers the stanza with internal-server-error of type 'wait' (RFC 6120
    §8.3.2: retry after waiting), so a message is bounced, never silently lost, and nothing is
    logged per stanza: the backend's Outage logs the outage once."""


def log_failure(logger: logging.Logger, message: str, *args: object) -> None:
    """In an ``except`` block: ``logger.exception(message, *args)``, unless the exception is
    StorageUnavailable, whose Outage has logged the outage once already: then a debug line."""
    exc = sys.exc_info()[1]
    if isinstance(exc, StorageUnavailable):
        logger.debug(message + " reason=storage-unavailable", *args)
    else:
        logger.exception(message, *args)


class Outage:
    """The state of one database's availability, so that an outage is logged once: its first
    failure (a warning with the cause) and its end (with how many operations failed meanwhile),
    never a line or a traceback per stanza. A read-only outage (a full disk lets reads through)
    ends with the first successful write; one where reads failed too, with any success."""

    __slots__ = ("down", "failures", "name", "reads_failed")

    def __init__(self, name: str) -> None:
        self.name = name            # the backend and its file or DSN (without password)
        self.down = False
        self.failures = 0
        self.reads_failed = False

    def failed(self, cause: str, *, write: bool) -> StorageUnavailable:
        """Count a failure (logging the first); the exception for the caller to raise."""
        self.failures += 1
        self.reads_failed = self.reads_failed or not write
        if not self.down:
            self.down = True
            log.warning('event=storage-unavailable database=%s cause="%s"', self.name,
                        cause.splitlines()[0][:200].replace('"', "'") if cause else "unknown")
        return StorageUnavailable(cause)

    def succeeded(self, *, write: bool) -> None:
        """Called after an operation succeeded while `down`."""
        if write or self.reads_failed:
            log.warning("event=storage-recovered database=%s failed=%d", self.name,
                        self.failures)
            self.down = self.reads_failed = False
            self.failures = 0


class Database(abc.ABC):
    """One backend's connection (or pool). Each call outside ``transaction()`` is a transaction
    of its own, committed on return."""

    dialect: ClassVar[str]  # the backend's name: "sqlite" | "postgresql"

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Database]:
        """``async with db.transaction() as tx``: tx's statements commit together or not at
        all; an exception rolls back. Not nestable."""

    @abc.abstractmethod
    async def migrate(self, specs: Sequence[StoreSpec]) -> list[tuple[str, int, int]]:
        """Bring the stores' tables to their newest version; StorageError when impossible.
        Returns (store, from version, to version) for each store migrated."""

    @abc.abstractmethod
    async def columns(self, table: str) -> list[tuple[str, str]]:
        """(name, declared type) of a table's columns, in order (for storage copy)."""

    async def adapt(self, table: str, columns: Sequence[str],
                    rows: list[Row]) -> list[Row]:
        """Rows read from another backend, made fit for this one's column types."""
        return rows

    async def after_copy(self, tables: Sequence[str]) -> None:  # noqa: B027 (optional hook)
        """Called inside the copy's transaction once every row is in (sequences, ...)."""

    @abc.abstractmethod
    async def close(self) -> None: ...
