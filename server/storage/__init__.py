"""Storage: the stores of one backend, opened together by ``open_storage``.

A store is described by a ``StoreSpec``: its name (the attribute on ``Storage`` and the key of
its schema version), a factory per backend, its migrations per backend and its tables. The
server opens ``CORE_STORES`` (plus the specs its feature modules declare); ``storage copy`` and
``migrate`` open ``all_store_specs()``.

The server and the CLI use the same ``Storage``; the server reads credentials at each login, so
account commands take effect at once even while it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.config import Config

if TYPE_CHECKING:
    from server.config import StorageConfig
    from server.storage.base import (
        AccountStore,
        BlocklistStore,
        LastActivityStore,
        OfflineStore,
        PrivateStore,
        RosterStore,
        VCardStore,
    )
    from server.storage.db import Database
    from server.storage.fast import FastTokenStore
    from server.storage.keystore import SecretStore

# [storage] backend -> module with ``async def connect(config: StorageConfig) -> Database``
BACKENDS = {"sqlite": "server.storage.sqlite", "postgresql": "server.storage.postgres"}


class StorageError(Exception):
    """The database cannot be used: not reachable or openable, or written by a newer presenced."""


# A migration is a sequence of SQL statements, or a coroutine function given the Database
# (inside the migration's transaction). A store's version is the number of its migrations
# applied. Never edit one that has shipped: append.
Migration = Sequence[str] | Callable[["Database"], Awaitable[None]]


@dataclass(frozen=True)
class StoreSpec:
    name: str                         # attribute on Storage ("vcards"), also the migration key
    sqlite: Callable[..., Any]        # factory for the SQLite implementation: (Database) -> store
    postgresql: Callable[..., Any]    # factory for the PostgreSQL implementation
    migrations: Mapping[str, Sequence[Migration]]  # backend name -> ordered migrations
    tables: tuple[str, ...]           # its tables, in an order that satisfies foreign keys
    requires: tuple[str, ...] = ("accounts",)  # stores whose tables must exist first

    def factory(self, backend: str) -> Callable[..., Any]:
        factory: Callable[..., Any] = getattr(self, backend)
        return factory


class Storage:
    """One backend's stores, as attributes named by their specs, over one Database."""

    accounts: AccountStore
    rosters: RosterStore
    vcards: VCardStore
    private: PrivateStore
    last_activity: LastActivityStore
    offline: OfflineStore
    blocklists: BlocklistStore
    fast_tokens: FastTokenStore
    secrets: SecretStore

    def __init__(self, db: Database, specs: Sequence[StoreSpec],
                 migrated: Sequence[tuple[str, int, int]] = ()) -> None:
        self.db = db
        self.specs = tuple(specs)
        self.migrated = tuple(migrated)  # (store, from, to) of the migrations run at opening
        for spec in self.specs:
            if spec.name in ("db", "specs", "migrated", "close", "backend"):
                raise StorageError(f"a store cannot be named {spec.name!r}")
            setattr(self, spec.name, spec.factory(db.dialect)(db))

    @property
    def backend(self) -> str:
        return self.db.dialect

    async def close(self) -> None:
        await self.db.close()


async def open_storage(config: StorageConfig | Config,
                       stores: Sequence[StoreSpec] | None = None) -> Storage:
    """Open the configured backend, creating and migrating the stores' tables when needed
    (stores: CORE_STORES when None). Raises StorageError."""
    from server.storage.migrate import check_specs

    storage_config = config.storage if isinstance(config, Config) else config
    specs = CORE_STORES if stores is None else tuple(stores)
    check_specs(specs)
    backend = importlib.import_module(BACKENDS[storage_config.backend])
    db: Database = await backend.connect(storage_config)
    try:
        migrated = await db.migrate(specs)
        return Storage(db, specs, migrated)
    except BaseException:
        await db.close()
        raise


def all_store_specs() -> tuple[StoreSpec, ...]:
    """Every store this installation knows (for ``migrate`` and ``storage copy``): the core's
    and those the feature modules declare (server/modules)."""
    from server.modules import store_specs
    specs = list(CORE_STORES)
    specs += [spec for spec in store_specs() if spec not in specs]
    return tuple(specs)


# Below the names the stores' modules use (StoreSpec, StorageError): they import them from here.
from server.storage import accounts, blocklist, fast, keystore, offline, roster, userdata  # noqa: E402

CORE_STORES: tuple[StoreSpec, ...] = (
    accounts.SPEC,
    roster.SPEC,
    userdata.VCARDS,
    userdata.PRIVATE,
    userdata.LAST_ACTIVITY,
    offline.SPEC,
    blocklist.SPEC,
    fast.SPEC,  # core: a credential change (AccountStore.set_credentials) deletes the tokens
    keystore.SPEC,  # core: keys every node shares (FAST, upload, occupant ids, dialback)
)
