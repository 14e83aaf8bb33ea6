"""Group commit for published items (issue 25 item 2): the items published during one loop turn,
and while a batch is being written, go to the store together (`PubsubStore.publish_many`: one
transaction, a statement for the inserts and one for the trims) instead of two autocommitted
statements each. A publish still waits until its item is committed before its notifications
and its result go out (XEP-0060 §7.1.2: the item is stored when the node persists items), so
nothing a client sees changes; under load, many publications share one commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from server.storage.pubsub import Published, PubsubStore

_Committed = Callable[[], None]


class ItemWriter:
    __slots__ = ("_batch", "_task", "batches", "store")

    def __init__(self, store: PubsubStore) -> None:
        self.store = store
        self._batch: list[tuple[Published, _Committed | None, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # for tests

    def add(self, one: Published, committed: _Committed | None = None) -> asyncio.Future[None]:
        """Done once the item is committed; its exception is what publish() would raise.
        `committed` is called at once when it is, in commit order (before the future's
        waiter resumes: what it records cannot be overtaken by a later commit)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._batch.append((one, committed, future))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                self.batches += 1
                try:
                    results = await self.store.publish_many([one for one, _, _ in batch])
                except Exception as exc:  # the store is down: every entry fails alike
                    results = [exc] * len(batch)
                for (_, committed, future), error in zip(batch, results, strict=True):
                    if error is None and committed is not None:
                        committed()
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
        finally:
            self._task = None
