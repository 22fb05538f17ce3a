"""Dynamic batching: concurrent requests gathered into one call of a batch function, each answered on its own; and
the threads that decode their uploads meanwhile."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Collects submitted items until `max_batch` are waiting or the first has waited `max_wait_s`, then runs
    `run(items) -> results` once in a single worker thread (so the event loop keeps accepting and decoding other
    uploads meanwhile) and hands each caller its own result. An exception from `run` goes to every caller of
    that batch; the loop carries on with the next one. Items whose caller has gone away are dropped unrun."""

    def __init__(self, run: Callable[[list[Item]], list[Result]], max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch} and {max_wait_s}")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.sizes: collections.Counter[int] = collections.Counter()  # batch size → how many batches ran
        self._pending: collections.deque[tuple[Item, asyncio.Future[Result]]] = collections.deque()
        self._arrived = asyncio.Event()  # replaced in start(): an event belongs to the loop that first waits on it
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitlab-batch")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()

    async def submit(self, item: Item) -> Result:
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running: call start() first")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._arrived.set()
        return await future

    async def _gather(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        """Wait for a first item, then up to `max_wait_s` for the batch to fill."""
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        taken = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        return [(item, future) for item, future in taken if not future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self.sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as error:  # noqa: BLE001 - handed to the callers, whose handlers answer it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class PixelWork:
    """A fixed pool of threads for the per-request pixel work off the event loop (decoding, resizing, overlays).
    As many threads as cores: more would only compete with the forward pass for them, and give glibc more
    arenas to spread freed memory over."""

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="vitlab-pixels")

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def run(self, function: Callable[..., Result], *args: Any) -> Result:
        if self._executor is None:
            raise RuntimeError("the pixel threads are not running: call start() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
