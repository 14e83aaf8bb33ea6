"""The one interface stores use to reach their backend's database: a few async calls with
``?`` placeholders, the same SQL on SQLite and PostgreSQL wherever the two dialects agree.

A store is written once against ``Database``; where the dialects differ (a JSON array
parameter, a row lock) its PostgreSQL subclass overrides the one method. Integrity errors
arrive as ``UniqueViolation`` / ``ForeignKeyViolation`` from either backend.
"""

from __future__ import annotations

import abc
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
