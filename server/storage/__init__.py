"""Storage: the stores of one backend, opened together by ``open_storage``.

The server and the CLI use the same ``Storage``; the server reads credentials at each login, so
account commands take effect at once even while it runs.
"""

from __future__ import annotations

import abc
import importlib
from typing import TYPE_CHECKING

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

# [storage] backend -> module with ``async def connect(config: StorageConfig) -> Storage``
BACKENDS = {"sqlite": "server.storage.sqlite"}


class StorageError(Exception):
    """The database cannot be used: not openable, or written by a newer presenced."""


class Storage(abc.ABC):
    """One backend's stores. Later concerns add an attribute here (``rosters: RosterStore``)."""

    accounts: AccountStore
    rosters: RosterStore
    vcards: VCardStore
    private: PrivateStore
    last_activity: LastActivityStore
    offline: OfflineStore
    blocklists: BlocklistStore

    @abc.abstractmethod
    async def close(self) -> None: ...


async def open_storage(config: StorageConfig | Config) -> Storage:
    """Open (creating and migrating when needed) the configured backend. Raises StorageError."""
    storage_config = config.storage if isinstance(config, Config) else config
    backend = importlib.import_module(BACKENDS[storage_config.backend])
    storage: Storage = await backend.connect(storage_config)
    return storage
