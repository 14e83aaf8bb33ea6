"""The pubsub stores on either backend: `PubsubStore` (nodes and their items: the pubsub
service's at pubsub.<domain>) and `PepStore` (the PEP nodes of each account, XEP-0163, with
their explicit subscriptions).

A node is (account, node name) with its configuration as a JSON object; an item is
(node, item id) with a sequence number (publish order: a republished id moves to the end),
its publisher and its payload as XML text; a subscription is (node, subscriber JID) with its
state (XEP-0060 §6.1: 'subscribed', or 'pending' on an authorize node) and options (§6.3, a
JSON object; NULL: the defaults). Nodes reference the
account with ON DELETE CASCADE, items and subscriptions their node, and a subscription of one of
our own accounts references that account too: deleting an account or a node removes what it
owns, and deleting an account removes its subscriptions to others' nodes. Every call is one SQL
statement, hence atomic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from server.storage import StoreSpec
from server.storage.db import IntegrityViolation
from server.storage.store import Store


@dataclass(frozen=True, slots=True)
class StoredItem:
    id: str
    publisher: str
    payload: str  # XML text ('' for an item without payload)


@dataclass(frozen=True, slots=True)
class Published:
    """One publish() of a batch: the item, to the node (user, domain, node), which keeps the
    newest max_items."""

    user: str
    domain: str
    node: str
    item: StoredItem
    max_items: int


class PubsubStore(Protocol):
    """Nodes of a pubsub service and their items. A service is (user, domain): an account's
    PEP service, or ('', service domain). Items are kept in publish order (a republished id
    becomes the newest)."""

    async def nodes(self, user: str, domain: str) -> dict[str, dict[str, Any]]:
        """Every node of the service: name -> its stored state (a JSON object)."""

    async def create_node(self, user: str, domain: str, node: str,
                          config: dict[str, Any]) -> bool:
        """False when the node exists already (nothing changes); NoSuchAccount for a PEP
        service whose account is gone."""

    async def set_config(self, user: str, domain: str, node: str,
                         config: dict[str, Any]) -> bool: ...

    async def delete_node(self, user: str, domain: str, node: str) -> bool:
        """The node goes with its items (and subscriptions)."""

    async def publish(self, user: str, domain: str, node: str, item: StoredItem,
                      max_items: int) -> None:
        """Add the item as the newest (replacing one with its id), keep the newest max_items."""

    async def publish_many(self, batch: Sequence[Published]) -> list[Exception | None]:
        """publish() of each, in order, committed together on return (the module's group
        commit); per entry None or what publish() alone would have raised for it."""

    async def trim(self, user: str, domain: str, node: str, max_items: int) -> int: ...

    async def items(self, user: str, domain: str, node: str, *,
                    ids: Sequence[str] | None = None,
                    max_items: int | None = None) -> list[StoredItem]:
        """Oldest first: those with these ids, or the newest max_items, or all."""

    async def retract(self, user: str, domain: str, node: str, item_id: str) -> bool: ...

    async def purge(self, user: str, domain: str, node: str) -> int: ...


class PepStore(PubsubStore, Protocol):
    """A PubsubStore whose services are accounts, with the explicit subscriptions to their
    nodes (XEP-0060 §6.1 on PEP nodes) in a table of their own."""

    async def subscriptions(self, user: str, domain: str) -> dict[str, dict[str, str]]:
        """node -> subscriber JID -> state."""

    async def subscription_options(self, user: str,
                                   domain: str) -> dict[str, dict[str, dict[str, bool]]]:
        """node -> subscriber JID -> its §6.3 options (those that have any)."""

    async def set_subscription(self, user: str, domain: str, node: str, jid: str, state: str,
                               account: tuple[str, str] | None = None,
                               options: dict[str, bool] | None = None) -> None: ...

    async def remove_subscription(self, user: str, domain: str, node: str, jid: str) -> bool:
        ...


_NODES = """CREATE TABLE pep_nodes (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        node TEXT NOT NULL,
        config TEXT NOT NULL,
        PRIMARY KEY (domain, localpart, node),
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    )"""



def _items(table: str, nodes: str, seq: str) -> str:
    """The items table of a pubsub store (both stores have the same shape), in publish order
    (seq), each item in a node of `nodes`."""
    return f"""CREATE TABLE {table} (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        node TEXT NOT NULL,
        item_id TEXT NOT NULL,
        seq {seq} NOT NULL,
        publisher TEXT NOT NULL,
        payload TEXT NOT NULL,
        PRIMARY KEY (domain, localpart, node, item_id),
        FOREIGN KEY (domain, localpart, node) REFERENCES {nodes} (domain, localpart, node)
            ON DELETE CASCADE
    )"""


def _order(table: str) -> str:
    return f"CREATE INDEX {table}_order ON {table} (domain, localpart, node, seq)"


# Explicit subscriptions (XEP-0060 §6.1 on PEP nodes, XEP-0163 §4): sub_domain/sub_localpart
# name the subscriber's account when it is one of ours (NULL otherwise: a foreign key with a
# NULL column is not checked), so that deleting it removes its subscriptions.
_SUBSCRIPTIONS = """CREATE TABLE pep_subscriptions (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        node TEXT NOT NULL,
        jid TEXT NOT NULL,
        state TEXT NOT NULL,
        sub_domain TEXT,
        sub_localpart TEXT,
        PRIMARY KEY (domain, localpart, node, jid),
        FOREIGN KEY (domain, localpart, node) REFERENCES pep_nodes (domain, localpart, node)
            ON DELETE CASCADE,
        FOREIGN KEY (sub_domain, sub_localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    )"""
_SUBSCRIBER = ("CREATE INDEX pep_subscriptions_subscriber "
               "ON pep_subscriptions (sub_domain, sub_localpart)")

# XEP-0060 §6.3 subscription options on PEP nodes: NULL until a subscriber sets some.
_OPTIONS = "ALTER TABLE pep_subscriptions ADD COLUMN options TEXT"

MIGRATIONS = {
    "sqlite": [[_NODES + " WITHOUT ROWID",
                _items("pep_items", "pep_nodes", "INTEGER") + " WITHOUT ROWID",
                _order("pep_items")],
               [_SUBSCRIPTIONS + " WITHOUT ROWID", _SUBSCRIBER],
               [_OPTIONS]],
    "postgresql": [[_NODES, _items("pep_items", "pep_nodes", "BIGINT"), _order("pep_items")],
                   [_SUBSCRIPTIONS, _SUBSCRIBER],
                   [_OPTIONS]],
}

_NODE = "domain = ? AND localpart = ? AND node = ?"


class SQLitePepStore(Store):
    """PepStore."""

    _nodes_table = "pep_nodes"
    _items_table = "pep_items"

    async def nodes(self, user: str, domain: str) -> dict[str, dict[str, Any]]:
        """Every node of the account: name -> configuration."""
        rows = await self._db.fetch(
            f"SELECT node, config FROM {self._nodes_table} WHERE domain = ? AND localpart = ?",
            domain, user)
        return {row[0]: json.loads(row[1]) for row in rows}

    async def create_node(self, user: str, domain: str, node: str,
                          config: dict[str, Any]) -> bool:
        """False when the node exists already (nothing changes); NoSuchAccount."""
        changed = await self._write(
            user, domain, f"INSERT INTO {self._nodes_table} (domain, localpart, node, config) "
            "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            domain, user, node, json.dumps(config, sort_keys=True))
        return changed > 0

    async def set_config(self, user: str, domain: str, node: str,
                         config: dict[str, Any]) -> bool:
        changed = await self._db.execute(
            f"UPDATE {self._nodes_table} SET config = ? WHERE {_NODE}",
            json.dumps(config, sort_keys=True), domain, user, node)
        return changed > 0

    async def delete_node(self, user: str, domain: str, node: str) -> bool:
        changed = await self._db.execute(f"DELETE FROM {self._nodes_table} WHERE {_NODE}",
                                         domain, user, node)
        return changed > 0

    async def publish(self, user: str, domain: str, node: str, item: StoredItem,
                      max_items: int) -> None:
        """Add the item as the newest (replacing one with its id), then keep the newest
        max_items."""
        await self._write(user, domain, self._insert_sql(), domain, user, node, item.id, domain,
                          user, node, item.publisher, item.payload)
        await self.trim(user, domain, node, max_items)

    async def publish_many(self, batch: Sequence[Published]) -> list[Exception | None]:
        """The batch in one transaction, two statements for it all (the inserts, then one trim
        per node); if the transaction fails for one entry (its node or account gone), each is
        published on its own so that only that one fails."""
        if len(batch) == 1:  # nothing to share: two statements, no BEGIN and COMMIT
            return [await self._publish_one(batch[0])]
        limits: dict[tuple[str, str, str], int] = {}
        for one in batch:
            limits[(one.domain, one.user, one.node)] = one.max_items  # the last one counts
        try:
            async with self._db.transaction() as tx:
                await tx.executemany(self._insert_sql(), [
                    (p.domain, p.user, p.node, p.item.id, p.domain, p.user, p.node,
                     p.item.publisher, p.item.payload) for p in batch])
                kept = [(*key, *key, limit - 1) for key, limit in limits.items() if limit > 0]
                if kept:
                    await tx.executemany(self._trim_sql(), kept)
                purged = [key for key, limit in limits.items() if limit <= 0]
                if purged:
                    await tx.executemany(
                        f"DELETE FROM {self._items_table} WHERE {_NODE}", purged)
        except IntegrityViolation:
            return [await self._publish_one(one) for one in batch]
        return [None] * len(batch)

    async def _publish_one(self, one: Published) -> Exception | None:
        try:
            await self.publish(one.user, one.domain, one.node, one.item, one.max_items)
        except Exception as exc:
            return exc
        return None

    def _insert_sql(self) -> str:
        return (f"INSERT INTO {self._items_table} "
                "(domain, localpart, node, item_id, seq, publisher, payload) "
                f"VALUES (?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM {self._items_table} "
                f"WHERE {_NODE}), ?, ?) "
                "ON CONFLICT (domain, localpart, node, item_id) DO UPDATE SET seq = excluded.seq, "
                "publisher = excluded.publisher, payload = excluded.payload")

    def _trim_sql(self) -> str:
        return (f"DELETE FROM {self._items_table} WHERE {_NODE} AND seq < "
                f"(SELECT seq FROM {self._items_table} "
                f"WHERE {_NODE} ORDER BY seq DESC LIMIT 1 OFFSET ?)")

    async def trim(self, user: str, domain: str, node: str, max_items: int) -> int:
        """Keep the newest max_items items of the node; the number removed."""
        if max_items <= 0:
            return await self.purge(user, domain, node)
        return await self._db.execute(self._trim_sql(), domain, user, node, domain, user, node,
                                      max_items - 1)

    async def items(self, user: str, domain: str, node: str, *,
                    ids: Sequence[str] | None = None,
                    max_items: int | None = None) -> list[StoredItem]:
        """The node's items, oldest first: those with these ids, or the newest max_items, or
        all."""
        if ids is not None:
            rows = await self._db.fetch(
                f"SELECT item_id, publisher, payload FROM {self._items_table} WHERE {_NODE} "
                f"AND item_id IN ({', '.join('?' * len(ids))}) ORDER BY seq",
                domain, user, node, *ids) if ids else []
        elif max_items is not None:
            rows = await self._db.fetch(
                f"SELECT item_id, publisher, payload FROM {self._items_table} WHERE {_NODE} "
                "ORDER BY seq DESC LIMIT ?", domain, user, node, max_items)
            rows = list(reversed(rows))
        else:
            rows = await self._db.fetch(
                f"SELECT item_id, publisher, payload FROM {self._items_table} WHERE {_NODE} "
                "ORDER BY seq",
                domain, user, node)
        return [StoredItem(row[0], row[1], row[2]) for row in rows]

    async def retract(self, user: str, domain: str, node: str, item_id: str) -> bool:
        changed = await self._db.execute(
            f"DELETE FROM {self._items_table} WHERE {_NODE} AND item_id = ?",
            domain, user, node, item_id)
        return changed > 0

    async def purge(self, user: str, domain: str, node: str) -> int:
        return await self._db.execute(f"DELETE FROM {self._items_table} WHERE {_NODE}",
                                      domain, user, node)

    # -- explicit subscriptions (PEP only: the service keeps them in its node state) ----------

    async def subscriptions(self, user: str, domain: str) -> dict[str, dict[str, str]]:
        """Every subscription to the account's nodes: node -> subscriber JID -> state."""
        rows = await self._db.fetch(
            "SELECT node, jid, state FROM pep_subscriptions WHERE domain = ? AND localpart = ?",
            domain, user)
        found: dict[str, dict[str, str]] = {}
        for node, jid, state in rows:
            found.setdefault(node, {})[jid] = state
        return found

    async def subscription_options(self, user: str,
                                   domain: str) -> dict[str, dict[str, dict[str, bool]]]:
        """node -> subscriber JID -> its §6.3 options, for the subscriptions that have some."""
        rows = await self._db.fetch(
            "SELECT node, jid, options FROM pep_subscriptions "
            "WHERE domain = ? AND localpart = ? AND options IS NOT NULL", domain, user)
        found: dict[str, dict[str, dict[str, bool]]] = {}
        for node, jid, options in rows:
            found.setdefault(node, {})[jid] = json.loads(options)
        return found

    async def set_subscription(self, user: str, domain: str, node: str, jid: str, state: str,
                               account: tuple[str, str] | None = None,
                               options: dict[str, bool] | None = None) -> None:
        """Add or change a subscription (its state and options: None keeps them unset);
        `account` (localpart, domain) when the subscriber is one of our accounts.
        NoSuchAccount when the node's account (or that one) is gone."""
        sub_local, sub_domain = account if account is not None else (None, None)
        text = json.dumps(options, sort_keys=True) if options is not None else None
        await self._write(
            user, domain,
            "INSERT INTO pep_subscriptions "
            "(domain, localpart, node, jid, state, sub_domain, sub_localpart, options) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (domain, localpart, node, jid) "
            "DO UPDATE SET state = excluded.state, options = excluded.options",
            domain, user, node, jid, state, sub_domain, sub_local, text)

    async def remove_subscription(self, user: str, domain: str, node: str, jid: str) -> bool:
        changed = await self._db.execute(
            f"DELETE FROM pep_subscriptions WHERE {_NODE} AND jid = ?", domain, user, node, jid)
        return changed > 0


SPEC: StoreSpec = StoreSpec(name="pep", sqlite=SQLitePepStore, postgresql=SQLitePepStore,
                            migrations=MIGRATIONS,
                            tables=("pep_nodes", "pep_items", "pep_subscriptions"))


# -- the pubsub service (pubsub.<domain>): the same calls, nodes keyed by (service domain, '') --

_SERVICE_NODES = """CREATE TABLE pubsub_nodes (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        node TEXT NOT NULL,
        config TEXT NOT NULL,
        PRIMARY KEY (domain, localpart, node)
    )"""

SERVICE_MIGRATIONS = {
    "sqlite": [[_SERVICE_NODES + " WITHOUT ROWID",
                _items("pubsub_items", "pubsub_nodes", "INTEGER") + " WITHOUT ROWID",
                _order("pubsub_items")]],
    "postgresql": [[_SERVICE_NODES, _items("pubsub_items", "pubsub_nodes", "BIGINT"),
                    _order("pubsub_items")]],
}


class SQLitePubsubStore(SQLitePepStore):
    """The nodes of pubsub services: `user` is '' and `domain` the service's domain; a node's
    configuration holds its affiliations and subscriptions too."""

    _nodes_table = "pubsub_nodes"
    _items_table = "pubsub_items"


SERVICE_SPEC: StoreSpec = StoreSpec(
    name="pubsub", sqlite=SQLitePubsubStore, postgresql=SQLitePubsubStore,
    migrations=SERVICE_MIGRATIONS, tables=("pubsub_nodes", "pubsub_items"), requires=())


if TYPE_CHECKING:  # mypy checks that the implementations are the Protocols
    _PEP: type[PepStore] = SQLitePepStore
    _PUBSUB: type[PubsubStore] = SQLitePubsubStore
