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

Resuming mid-epoch: `set_epoch(epoch, taken, batch_size=, num_workers=)` with the number of items (or
batches) this rank's DataLoader had given in the epoch seeks there without reading what came before.
(epoch, taken) fixes everything else: the DataLoader takes its workers' outputs round-robin (skipping
exhausted workers), so each worker's share of `taken` follows from the lengths of their streams, and
a worker passes its first items through the same shuffle buffer and length pools as metadata only
(ids and frame counts from the shards' small arrays; the shuffle's draws never depend on the data),
then reads on: sequentially from where it stopped, and by random access the few items still held in
the buffer and pool. The resumed stream is the uninterrupted one, item for item.

A shard found damaged while reading (see `whistle inspect-store --check`) ends the iteration with a
DamagedShardError naming it and the repair; with `skip_damaged=True` it is logged as an error and the
worker moves on to its next unit instead (the caller must say so to the user: the data shrank).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from zarr.abc.store import Store

from store.format import StoreError
from store.reader import DamagedShardError, StoreReader, Utterance

log = logging.getLogger(__name__)

Unit = tuple[int, int, int]  # (shard, first utterance, stop utterance)


@dataclass(frozen=True)
class _Unread:
    """An utterance passed while seeking: its place in the shuffle is known, its states are read if it is yielded."""

    shard: int
    index: int  # position within the shard
    n_frames: int


class _Seek:
    """Shared by a worker's stream and its consumer: utterances are passed unread while `seeking`; those passed
    and not yet yielded (held in the shuffle buffer and length pool) are in `passed`."""

    def __init__(self, seeking: bool) -> None:
        self.seeking = seeking
        self.passed: dict[tuple[int, int], _Unread] = {}  # (shard, index) -> item


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
        self.skips: dict[int, int] = {}  # consumer -> its items to pass unread this epoch
        self.rotation = 0  # DataLoader worker j plays worker (j + rotation) % num_workers of the epoch

    def set_epoch(self, epoch: int, taken: int = 0, *, batch_size: int | None = None, num_workers: int = 0) -> None:
        """Choose the shard order and shuffle of this epoch (call it before iterating, on every rank).

        `taken` > 0 resumes the epoch after the first `taken` outputs (items, or batches of `batch_size`)
        of this rank's DataLoader with `num_workers` workers, without reading them: this reads the small
        arrays of the rank's shards here, to know how long each worker's stream is.
        """
        self.epoch = epoch
        self.skips, self.rotation = self._seek(taken, batch_size or 1, max(num_workers, 1)) if taken else ({}, 0)

    def _seek(self, taken: int, batch_size: int, num_workers: int) -> tuple[dict[int, int], int]:
        """Items each of this rank's consumers gave in the first `taken` outputs of its DataLoader, and the
        worker whose output came next: DataLoader worker j plays that worker + j, so that the new DataLoader,
        which starts its round-robin at worker 0, takes the outputs in the order the first one did."""
        rank, world_size = self._world()
        reader = StoreReader(self.url)
        items = np.array(
            [
                _kept_count(
                    reader, self.assigned_units(rank, world_size, worker, num_workers), self.keep, self.skip_damaged
                )
                for worker in range(num_workers)
            ]
        )  # (workers,)
        outputs = -(-items // batch_size)  # (workers,) a worker batches its own stream; the last batch may be short
        counts, following = round_robin_position(outputs, min(taken, int(outputs.sum())))
        skips = {
            rank * num_workers + worker: min(int(n) * batch_size, int(items[worker])) for worker, n in enumerate(counts)
        }
        return skips, following

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
        worker = (worker + self.rotation) % num_workers
        consumer = rank * num_workers + worker
        units = self.assigned_units(rank, world_size, worker, num_workers)
        # Opened here, in the worker: zarr stores and their event loop do not survive a fork.
        reader = StoreReader(self.url)
        skip = self.skips.get(consumer, 0)
        seek = _Seek(skip > 0)
        stream: Iterable[Utterance | _Unread] = _read_units(reader, units, self.keep, self.skip_damaged, seek)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, consumer])
            stream = _shuffled(stream, self.shuffle_buffer, rng)
        if self.length_bucket:
            stream = _length_grouped(stream, self.length_bucket)
        stream = iter(stream)
        for item in islice(stream, skip):
            del seek.passed[item.shard, item.index]
        seek.seeking = False  # from here on the stream reads what it passes
        held = _read_held(reader, seek.passed.values(), self.skip_damaged)
        for item in stream:
            utt = item if isinstance(item, Utterance) else held.pop((item.shard, item.index), None)
            if utt is None:  # in a damaged shard, under skip_damaged
                continue
            yield {
                "id": utt.id,
                "text": utt.text,
                "language": utt.language,
                "duration": utt.duration,
                "states": torch.from_numpy(utt.states),  # (T, D) float16
                "n_frames": len(utt.states),
                "speech_frames": utt.speech_frames,
            }


def round_robin_position(lengths: np.ndarray, taken: int) -> tuple[np.ndarray, int]:
    """After the first `taken` outputs of a round-robin over streams of `lengths`: how many each stream gave,
    and which stream gives the next output (0 when none is left).

    This is the order in which a DataLoader takes its workers' outputs from an IterableDataset: one from
    each worker in turn, skipping the workers whose stream has ended.
    """
    if not 0 <= taken <= lengths.sum():
        raise ValueError(f"{taken} outputs cannot be taken from streams of {lengths.sum()} in all")
    ordered = np.sort(lengths)
    per_round = len(lengths) - np.searchsorted(ordered, np.arange(lengths.max() + 1), side="right")  # (max + 1,)
    before = np.concatenate([[0], np.cumsum(per_round)])  # (max + 2,) outputs before each round
    full_rounds = int(np.searchsorted(before, taken, side="right")) - 1
    counts = np.minimum(lengths, full_rounds)
    in_round = np.flatnonzero(lengths > full_rounds)  # the streams that give an output in this round
    done = taken - int(before[full_rounds])
    counts[in_round[:done]] += 1
    following = np.concatenate([in_round[done:], np.flatnonzero(lengths > full_rounds + 1)])
    return counts, int(following[0]) if len(following) else 0


def _kept_count(reader: StoreReader, units: list[Unit], keep: Callable[[str], bool] | None, skip_damaged: bool) -> int:
    """Utterances of `units` that `keep` accepts, from the shards' ids. Under skip_damaged each shard's index is
    read and checked, since `_read_units` skips a shard whose index is damaged: it counts none."""
    if keep is None and not skip_damaged:
        return sum(stop - first for _, first, stop in units)
    count = 0
    for shard, first, stop in units:
        try:
            ids = (reader.index(shard).ids if skip_damaged else reader.ids(shard))[first:stop]
        except DamagedShardError:
            if not skip_damaged:
                raise
            continue
        count += len(ids) if keep is None else sum(map(keep, ids))
    return count


def _read_units(
    reader: StoreReader,
    units: list[Unit],
    keep: Callable[[str], bool] | None,
    skip_damaged: bool,
    seek: _Seek,
) -> Iterator[Utterance | _Unread]:
    """The units' utterances in order: unread while `seek.seeking`, then read sequentially from there."""
    for shard, first, stop in units:
        try:
            index = reader.index(shard)
            i = first
            while seek.seeking and i < stop:
                if keep is None or keep(index.ids[i]):
                    item = _Unread(shard, i, int(index.offsets[i + 1] - index.offsets[i]))
                    seek.passed[shard, i] = item
                    yield item
                i += 1
            yield from reader.iter_shard(shard, i, stop, keep=keep)
        except DamagedShardError as err:
            if not skip_damaged:
                raise
            log.error("skipping the rest of utterances %d-%d of shard %d: %s", first, stop - 1, shard, err)


def _read_held(reader: StoreReader, items: Iterable[_Unread], skip_damaged: bool) -> dict[tuple[int, int], Utterance]:
    """The utterances of items passed while seeking, read in store order, decoding each chunk that holds one of
    them once and no chunk that holds none; those of a damaged shard are left out under skip_damaged."""
    by_shard: dict[int, list[int]] = {}
    for item in items:
        by_shard.setdefault(item.shard, []).append(item.index)
    held = {}
    for shard, positions in sorted(by_shard.items()):
        try:
            index = reader.index(shard)
            wanted = {index.ids[i] for i in positions}
            for first, last in _chunk_runs(sorted(positions), index.offsets, index.states.chunks[0]):
                for utt in reader.iter_shard(shard, first, last + 1, keep=wanted.__contains__):
                    held[shard, utt.index] = utt
        except DamagedShardError as err:
            if not skip_damaged:
                raise
            log.error("skipping %d utterances of shard %d: %s", len(positions), shard, err)
    return held


def _chunk_runs(positions: list[int], offsets: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Sorted utterance positions grouped into runs (first, last) whose rows span no chunk that holds none of them."""
    runs: list[list[int]] = []  # [first, last, last chunk]
    for i in positions:
        first_chunk, last_chunk = int(offsets[i]) // chunk_rows, (int(offsets[i + 1]) - 1) // chunk_rows
        if runs and first_chunk <= runs[-1][2] + 1:
            runs[-1][1:] = [i, max(runs[-1][2], last_chunk)]
        else:
            runs.append([i, i, last_chunk])
    return [(first, last) for first, last, _ in runs]


def _n_frames(item: Utterance | _Unread) -> int:
    return len(item.states) if isinstance(item, Utterance) else item.n_frames


def _shuffled(stream: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A bounded shuffle: hold `size` items, emit a random one as each new item arrives."""
    buffer: list[Any] = []
    for utt in stream:
        if len(buffer) < size:
            buffer.append(utt)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = utt
    rng.shuffle(buffer)
    yield from buffer


def _length_grouped(stream: Iterable[Utterance | _Unread], pool_size: int) -> Iterator[Utterance | _Unread]:
    """Pools of `pool_size` items sorted by length, ascending then descending (no jump between pools)."""
    pool: list[Utterance | _Unread] = []
    descending = False
    for utt in stream:
        pool.append(utt)
        if len(pool) == pool_size:
            yield from sorted(pool, key=_n_frames, reverse=descending)
            pool, descending = [], not descending
    yield from sorted(pool, key=_n_frames, reverse=descending)


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
