"""precompute's writer side: each shard's ShardWriter calls, in order, on background threads.

The main process hands every utterance, reject, set of sums and close to `BackgroundWriter`, which runs
them on thread `shard % threads`, so compression and writes overlap the encoder. Queues are bounded:
when the writers fall behind, the main process waits (and counts the wait, the sign of a write-bound run).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from store import ShardRecord, StoreWriter

MESSAGES_PER_WRITER = 64  # utterances queued per writer thread before the main process waits


class BackgroundWriter:
    """Runs each shard's ShardWriter calls, in order, on thread `shard % threads`.

    Per-thread queues are bounded (the main process waits when writers fall behind), and at most
    `max_closing` shards may be waiting to be compressed and written at once (bounds host memory).
    An error on a writer thread is re-raised in the main process at its next call.
    """

    def __init__(self, store: StoreWriter, threads: int, max_closing: int):
        self.store = store
        self.records: list[ShardRecord] = []
        self.wait_seconds = 0.0  # the main process blocked on full queues: the writers are the bottleneck
        self._queues = [queue.Queue(maxsize=MESSAGES_PER_WRITER) for _ in range(threads)]
        self._closing = threading.Semaphore(max_closing)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name=f"shard-writer-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    def add(self, shard: int, **utterance: Any) -> None:
        self._put(shard, ("add", utterance))

    def add_sums(self, shard: int, **sums: Any) -> None:
        self._put(shard, ("add_sums", sums))

    def reject(self, shard: int, utt_id: str, reason: str) -> None:
        self._put(shard, ("reject", {"id": utt_id, "reason": reason}))

    def close(self, shard: int) -> None:
        began = time.perf_counter()
        while not self._closing.acquire(timeout=1.0):
            self.raise_if_failed()  # a writer that failed never frees its closing slot
        self.wait_seconds += time.perf_counter() - began
        self._put(shard, ("close", {}))

    def _put(self, shard: int, message: tuple[str, dict[str, Any]]) -> None:
        target = self._queues[shard % len(self._queues)]
        began = time.perf_counter()
        while True:
            self.raise_if_failed()
            try:
                target.put((shard, message), timeout=1.0)
                break
            except queue.Full:
                continue
        self.wait_seconds += time.perf_counter() - began

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self, messages: queue.Queue) -> None:
        open_shards: dict[int, Any] = {}
        while True:
            item = messages.get()
            if item is None:
                return
            shard, (kind, arguments) = item
            if self._error is not None:
                continue  # drain: the main process is stopping
            try:
                if shard not in open_shards:
                    open_shards[shard] = self.store.shard(shard)  # deletes an incomplete shard left by a crash
                writer = open_shards[shard]
                if kind == "add":
                    writer.add(**arguments)
                elif kind == "add_sums":
                    writer.add_sums(**arguments)
                elif kind == "reject":
                    writer.reject(**arguments)
                else:
                    try:
                        record = open_shards.pop(shard).close()
                    finally:
                        self._closing.release()
                    with self._lock:
                        self.records.append(record)
            except BaseException as err:  # noqa: BLE001 — handed to the main process
                self._error = err

    def finish(self) -> list[ShardRecord]:
        """Wait for every queued call; return the records of the shards written."""
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
        self.raise_if_failed()
        return sorted(self.records, key=lambda record: record.index)

    def abandon(self) -> None:
        """Stop after a failure in the main process; shards not closed stay incomplete (redone on resume)."""
        self._error = self._error or RuntimeError("precompute stopped")
        for q in self._queues:
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            q.put(None)
        for thread in self._threads:
            thread.join()
