"""Batching across requests in one replica that pays: batches form when the model is free.

Why not ``@serve.batch`` here (measured in the README; the issue saw batching *lose*, 52 vs
65 req/s on an H200, and gain little on 2 cores):

- ``@serve.batch`` runs the batch function on the replica's event loop. A forward pass is
  synchronous, so while it runs the replica neither takes in new requests nor sends answers:
  compute and I/O never overlap.
- It cuts the next batch as soon as ``batch_wait_timeout_s`` has passed since that batch's
  first request, even while the previous batch is still computing; the requests that arrive
  during the rest of that computation wait for the batch after. Batches stay small exactly
  when the model is busy.
- It waits the whole ``batch_wait_timeout_s`` for a batch to fill even when the replica is
  idle, on every stage, so at low load each request pays the wait once per stage for nothing.

``AdaptiveBatcher`` instead:

- runs each batch in one worker thread (torch releases the GIL in its kernels), so the event
  loop keeps receiving requests during a forward pass;
- forms the next batch when the model is free, from everything queued meanwhile (up to
  ``max_batch_size``), so the batch size follows the load: one request when idle, full
  batches when busy, with no timer involved;
- waits for a batch to fill only in proportion to how full the previous batch was (0 after a
  single-request batch, ``batch_wait_timeout_s`` after a full one), so the wait scales with
  load instead of taxing every request at low load;
- hands the whole batch to one function call: one stacked input, one forward pass per model,
  one device-to-host copy (see ``stages.py``).

It has ``set_max_batch_size`` / ``set_batch_wait_timeout_s`` like a ``@serve.batch`` method,
so ``core.batching.BatchedDeployment.reconfigure`` applies the knobs from ``user_config``.
Plain asyncio and one thread: it works outside Serve too (the flow's tests use it).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class AdaptiveBatcher(Generic[T, R]):
    """``await batcher.submit(item)`` -> ``fn([..., item, ...])[i]``, batched across callers.

    ``fn`` takes a list of items and returns one result per item, in order; it runs in this
    batcher's single worker thread, one batch at a time. A batch that raises fails every
    request in it with that exception.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.0,
        name: str = "batch",
    ) -> None:
        self.fn = fn
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queue: collections.deque[tuple[T, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._last_size = 0
        # What the last batches looked like (GET /model, the benchmark): size and ms.
        self.batches = 0
        self.items = 0

    # The names @serve.batch uses, so core.batching.BatchedDeployment can reconfigure us.
    def set_max_batch_size(self, value: int) -> None:
        self.max_batch_size = int(value)

    def set_batch_wait_timeout_s(self, value: float) -> None:
        self.batch_wait_timeout_s = float(value)

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (tests): start over
            self._loop = loop
            self._arrived = asyncio.Event()
            self._queue.clear()
            self._runner = loop.create_task(self._run(), name=f"{self.name}-batcher")
        future: asyncio.Future = loop.create_future()
        self._queue.append((item, future))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    def _wait_s(self) -> float:
        """How long the next batch may wait to fill: in proportion to the last batch's fill."""
        if self.max_batch_size <= 1 or self._last_size <= 1:
            return 0.0
        fill = (self._last_size - 1) / (self.max_batch_size - 1)
        return self.batch_wait_timeout_s * min(1.0, fill)

    async def _run(self) -> None:
        arrived = self._arrived
        assert arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                arrived.clear()
                await arrived.wait()
            wait_s = self._wait_s()
            if wait_s > 0:
                deadline = time.perf_counter() + wait_s
                while len(self._queue) < self.max_batch_size:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), left)
                    except TimeoutError:
                        break
            batch: list[tuple[T, asyncio.Future]] = []
            while self._queue and len(batch) < self.max_batch_size:
                item, future = self._queue.popleft()
                if not future.cancelled():  # its caller gave up (timeout): skip the work
                    batch.append((item, future))
            if not batch:
                continue
            self._last_size = len(batch)
            self.batches += 1
            self.items += len(batch)
            try:
                results = await loop.run_in_executor(self._pool, self._call, [i for i, _ in batch])
            except Exception as exc:  # the batch failed: every request in it fails with it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    def _call(self, items: list[T]) -> Sequence[R]:
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(
                f"{self.name}: the batch function returned {len(results)} results for "
                f"{len(items)} items"
            )
        return results

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def mean_batch(batcher: AdaptiveBatcher[Any, Any]) -> float:
    return batcher.items / batcher.batches if batcher.batches else 0.0
