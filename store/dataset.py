"""Streaming a store into torch: `FeatureDataset` (an IterableDataset) and `pad_batch` (a collate_fn).

    dataset = FeatureDataset("whistle-store", seed=0, shuffle_buffer=1024, length_bucket=256,
                             keep=in_training_split)       # a module-level function: picklable
    loader = DataLoader(dataset, batch_size=16, num_workers=4, collate_fn=pad_batch)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader: ...            # batch["states"] (B, Tmax, D) float32, batch["lengths"] (B,)
    # collate_fn=functools.partial(pad_batch, dtype=torch.float16): the stored float16, half the bytes

How the work is split. The store's complete shards (as of construction) are the units of work.
Each epoch they are put in an order drawn from `seed + epoch` (the same on every rank), and
consumer c = rank * num_workers + worker (rank-major) takes units c, c + C, c + 2C, ... of the
C = world_size * num_workers consumers. So every utterance is read exactly once per epoch, by one
worker of one rank, and each worker reads whole shards sequentially. When there are fewer shards
than consumers, each shard is cut into ceil(C / shards) contiguous parts first, so that no worker
sits idle; parts of one shard read only the chunks they cover (plus at most one shared chunk at
each cut). Shards and their utterances rarely divide evenly, so ranks may get a few more or fewer
utterances than each other: under DDP, end the epoch when the first rank runs out (accelerate's
`join_uneven_inputs`, or a fixed number of steps per epoch).

Shuffling: a buffer of `shuffle_buffer` utterances per worker (memory: that many utterances of
(T, D) float16 each; ~0.6 MB for 5 s of large-v3 states), seeded from (seed, epoch, consumer).
Length grouping: with `length_bucket` = N > 0, utterances leaving the buffer are gathered N at a
time and sorted by length (ascending and descending in turn), so consecutive items — the batches a
DataLoader forms — have similar lengths and little padding; N should be several batch sizes.
`keep(utt_id)` (picklable, since workers may be spawned) drops utterances, e.g. a held-out split.

`set_epoch` changes this object in the main process: DataLoader workers see it when they start,
so create the DataLoader without `persistent_workers` (or anew each epoch).

A shard found damaged while reading (see `whistle inspect-store --check`) ends the iteration with a
DamagedShardError naming it and the repair; with `skip_damaged=True` it is logged as an error and the
worker moves on to its next unit instead (the caller must say so to the user: the data shrank).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from zarr.abc.store import Store

from store.format import StoreError
from store.reader import DamagedShardError, StoreReader, Utterance

log = logging.getLogger(__name__)

Unit = tuple[int, int, int]  # (shard, first utterance, stop utterance)


class FeatureDataset(IterableDataset):
    """Utterances of a store's complete shards, split across ranks and DataLoader workers.

    Yields dict(id, text, language, duration, states (T, D) torch.float16, n_frames, speech_frames).
    """

    def __init__(
        self,
        url: str | os.PathLike | Store,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        length_bucket: int = 0,
        keep: Callable[[str], bool] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        skip_damaged: bool = False,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if shuffle_buffer < 1 or length_bucket < 0:
            raise ValueError(
                f"shuffle_buffer must be >= 1 and length_bucket >= 0, got {shuffle_buffer}, {length_bucket}"
            )
        reader = StoreReader(url)
        self.url = url
        self.shards = reader.shards()  # fixed now, so every rank and epoch sees the same list
        if not self.shards:
            raise StoreError(f"store {reader.url} has no complete shards to read")
        self.shard_sizes = {k: reader.shard_attrs(k)["n"] for k in self.shards}
        self.spec = reader.spec
        self.shuffle, self.seed = shuffle, seed
        self.shuffle_buffer, self.length_bucket = shuffle_buffer, length_bucket
        self.keep = keep
        self.rank, self.world_size = rank, world_size
        self.skip_damaged = skip_damaged
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the shard order and shuffle of this epoch (call it before iterating, on every rank)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Utterances in the store (before `keep`), over all ranks."""
        return sum(self.shard_sizes.values())

    def _world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def units(self, consumers: int, epoch: int) -> list[Unit]:
        """All units of work of an epoch, in the order consumers take them round-robin."""
        order = list(self.shards)
        if self.shuffle:
            order = [self.shards[i] for i in np.random.default_rng(self.seed + epoch).permutation(len(order))]
        parts = max(1, math.ceil(consumers / len(order)))
        units = []
        for shard in order:
            bounds = np.linspace(0, self.shard_sizes[shard], parts + 1).round().astype(int)
            units += [(shard, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        return units

    def assigned_units(self, rank: int, world_size: int, worker: int, num_workers: int) -> list[Unit]:
        """The units consumer (rank, worker) reads this epoch."""
        consumers = world_size * num_workers
        return self.units(consumers, self.epoch)[rank * num_workers + worker :: consumers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = self._world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = self.assigned_units(rank, world_size, worker, num_workers)
        # Opened here, in the worker: zarr stores and their event loop do not survive a fork.
        reader = StoreReader(self.url)
        stream: Iterable[Utterance] = _read_units(reader, units, self.keep, self.skip_damaged)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, rank * num_workers + worker])
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        if self.length_bucket:
            stream = _length_grouped(stream, self.length_bucket)
        for utt in stream:
            yield {
                "id": utt.id,
                "text": utt.text,
                "language": utt.language,
                "duration": utt.duration,
                "states": torch.from_numpy(utt.states),  # (T, D) float16
                "n_frames": len(utt.states),
                "speech_frames": utt.speech_frames,
            }


def _read_units(
    reader: StoreReader, units: list[Unit], keep: Callable[[str], bool] | None, skip_damaged: bool
) -> Iterator[Utterance]:
    for shard, first, stop in units:
        try:
            yield from reader.iter_shard(shard, first, stop, keep=keep)
        except DamagedShardError as err:
            if not skip_damaged:
                raise
            log.error("skipping the rest of utterances %d-%d of shard %d: %s", first, stop - 1, shard, err)


def _shuffled(stream: Iterable[Utterance], size: int, rng: np.random.Generator) -> Iterator[Utterance]:
    """A bounded shuffle: hold `size` items, emit a random one as each new item arrives."""
    buffer: list[Utterance] = []
    for utt in stream:
        if len(buffer) < size:
            buffer.append(utt)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = utt
    rng.shuffle(buffer)
    yield from buffer


def _length_grouped(stream: Iterable[Utterance], pool_size: int) -> Iterator[Utterance]:
    """Pools of `pool_size` items sorted by length, ascending then descending (no jump between pools)."""
    pool: list[Utterance] = []
    descending = False
    for utt in stream:
        pool.append(utt)
        if len(pool) == pool_size:
            yield from sorted(pool, key=lambda u: len(u.states), reverse=descending)
            pool, descending = [], not descending
    yield from sorted(pool, key=lambda u: len(u.states), reverse=descending)


def pad_batch(items: list[dict[str, Any]], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Collate FeatureDataset items: states (B, Tmax, D) zero-padded, lengths (B,) int64, ...

    `dtype` torch.float16 keeps the store's own values (exactly) at half the bytes of float32 through
    the DataLoader workers' shared memory and to the device; convert there (`.float()`) if the model
    needs float32. Use `functools.partial(pad_batch, dtype=torch.float16)` as the collate_fn.
    """
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"pad_batch collates to torch.float32 or torch.float16 (the store's dtype), not {dtype}")
    lengths = torch.tensor([item["n_frames"] for item in items], dtype=torch.long)  # (B,)
    d_model = items[0]["states"].shape[1]
    states = torch.zeros(len(items), int(lengths.max()), d_model, dtype=dtype)  # (B, Tmax, D)
    for b, item in enumerate(items):
        states[b, : item["n_frames"]] = item["states"]
    return {
        "states": states,
        "lengths": lengths,
        "speech_frames": torch.tensor([item["speech_frames"] for item in items], dtype=torch.long),  # (B,)
        "durations": torch.tensor([item["duration"] for item in items], dtype=torch.float32),  # (B,)
        "ids": [item["id"] for item in items],
        "texts": [item["text"] for item in items],
        "languages": [item["language"] for item in items],
    }
