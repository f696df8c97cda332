"""Reading a feature store: utterances, frame ranges, whole shards, the tail template and statistics.

    reader = StoreReader("whistle-store", expect_teacher=geometry.teacher_info(name, revision))
    for shard in reader.shards():                      # complete shards only
        for utt in reader.iter_shard(shard):           # reads each array of the shard once
            window = reader.full_window(utt.states)    # (max_frames, D): speech + tail template
    mean, std = reader.statistics()                    # per channel, over all speech frames

The reader sees the shards that were complete when it was opened (`refresh()` looks again), so all
ranks of a training run agree on one list while precompute may still be adding shards.

States are read *directly*: the byte range of a shard object that holds the wanted inner chunks is
fetched in one store request, the Zarr v3 sharding index (at the object's end: one little-endian
uint64 (offset, nbytes) pair per inner chunk, then a crc32c of the index) tells where each chunk
lies, and each chunk's crc32c is checked before Blosc decodes it straight into the output array.
That is what zarr's sharding codec does too, minus its per-chunk buffer assembly (most of its read
time for float16 states). Arrays this path does not know (BitRound filters, other codecs, several
shard objects, an unwritten chunk) are read through zarr; `direct=False` reads everything so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numcodecs.blosc
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype

from store.format import (
    BLOSC_HEADER_BYTES,
    CACHE_GROUP,
    CHECKSUM_BYTES,
    INDEX_ENTRY_BYTES,
    MISSING_CHUNK,
    SHARDS_GROUP,
    StoreError,
    StoreSpec,
    TeacherInfo,
    checksum_ok,
    direct_compression,
    open_root,
    open_zarr_store,
    read_json,
    run_sync,
    shard_attrs,
    shard_name,
    url_text,
    version_stamp,
)

log = logging.getLogger(__name__)

READ_BLOCK_BYTES = 64 * 2**20  # iter_shard reads the states in blocks of about this size
STD_FLOOR = 1e-6  # statistics() floors the std so that a dead channel never divides by zero
INDEX_CACHE_SHARDS = 8  # shard indexes (offsets, ids, text, ...) kept in memory
REDUCE_THREADS = 8  # shards read at once when reducing the template (I/O bound)
INDEX_ARRAYS = ("offsets", "speech_frames", "ids", "text", "language", "duration")
CACHE_ARRAYS = ("tail_template", "tail_count", "mean", "std")


class DamagedShardError(StoreError):
    """A complete shard that cannot be read back; says how to repair it."""

    def __init__(self, url: str, shard: int | None = None, detail: str | None = None) -> None:
        self.shard, self.detail = shard, detail
        if shard is None:  # rebuilt from its message alone (torch re-raises a DataLoader worker's error so)
            super().__init__(url)
            return
        name = shard_name(shard)
        super().__init__(
            f"shard {name} of store {url} is damaged: {detail}. Delete {url}/{SHARDS_GROUP}/{name} and run "
            "`whistle precompute` on this store again to recompute it (`whistle inspect-store --check` lists "
            "every damaged shard)."
        )


@dataclass(frozen=True)
class Utterance:
    """One stored utterance; `states` are the stored frames (speech frames in speech mode)."""

    id: str
    text: str
    language: str
    duration: float  # seconds of audio
    states: np.ndarray  # (T, D) float16
    shard: int
    index: int  # position within the shard
    speech_frames: int  # frames covering the audio (+ margin); == T in speech mode


@dataclass(frozen=True)
class ShardIndex:
    """The small arrays of one shard, read once, plus a handle on its states."""

    offsets: np.ndarray  # (n + 1,) int64
    speech_frames: np.ndarray  # (n,) int32
    ids: list[str]
    texts: list[str]
    languages: list[str]
    durations: np.ndarray  # (n,) float32
    states: zarr.Array  # (n_frames, D) float16, not read yet

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ShardLayout:
    """Where the inner chunks of a shard's states object lie, for reading them without zarr's sharding codec."""

    key: str  # the shard object's key in the store
    chunk_rows: int  # rows per inner chunk (the last one is padded with zeros)
    blosc: bool  # Blosc-compressed chunks (else raw little-endian float16)
    chunks: np.ndarray  # (n_chunks, 2) uint64: byte offset and length of each chunk in the object


def index_problems(index: ShardIndex, attrs: dict[str, Any], spec: StoreSpec) -> list[str]:
    """What is inconsistent in a shard's index, its states' shape and its attrs (empty when sound)."""
    n, n_frames = attrs.get("n"), attrs.get("n_frames")
    d_model, max_frames = spec.teacher.d_model, spec.teacher.max_frames
    offsets, speech_frames = index.offsets, index.speech_frames
    out = []
    if offsets.shape != (n + 1,):
        return [f"offsets has shape {offsets.shape}, attrs say n={n} (expected ({n + 1},))"]
    lengths = np.diff(offsets)
    if offsets[0] != 0 or (lengths <= 0).any():
        out.append(f"offsets are not strictly increasing from 0 (first {offsets[:3].tolist()}...)")
    if offsets[-1] != n_frames:
        out.append(f"offsets end at {int(offsets[-1])}, attrs say n_frames={n_frames}")
    if index.states.shape != (n_frames, d_model):
        out.append(f"states has shape {index.states.shape}, expected ({n_frames}, {d_model})")
    if index.states.dtype != np.float16:
        out.append(f"states has dtype {index.states.dtype}, expected float16")
    for name, values in (("speech_frames", speech_frames), ("ids", index.ids), ("text", index.texts),
                         ("language", index.languages), ("duration", index.durations)):
        if len(values) != n:
            out.append(f"{name} has {len(values)} entries, attrs say n={n}")
    if out:
        return out
    if spec.frames == "speech" and not np.array_equal(lengths, speech_frames):
        out.append("stored frames per utterance differ from speech_frames")
    if spec.frames == "full" and ((lengths != max_frames).any() or (speech_frames < 1).any()
                                  or (speech_frames > max_frames).any()):
        out.append(f"full-frames shard has windows that are not {max_frames} frames, or bad speech_frames")
    if not (np.isfinite(index.durations).all() and (index.durations > 0).all()):
        out.append("duration has non-positive or non-finite entries")
    return out


class StoreReader:
    """Read access to a whistle store (a local path, an fsspec URL, or a zarr Store)."""

    def __init__(self, url: str | os.PathLike | Store, expect_teacher: TeacherInfo | None = None, *,
                 direct: bool = True) -> None:
        self.url = url_text(url)
        self.direct = direct  # False: every states read goes through zarr's sharding codec (the reference path)
        self.store = open_zarr_store(url, read_only=True)
        self.root, self.attrs = open_root(self.store, self.url)
        self.spec = StoreSpec.from_attrs(self.attrs, self.url)
        if expect_teacher is not None:
            differences = self.spec.teacher.differences(expect_teacher)
            if differences:
                raise StoreError(
                    f"store {self.url} holds the states of another teacher than the one given:\n  - "
                    + "\n  - ".join(differences)
                    + "\nUse the [teacher] settings the store was precomputed with, or precompute a store for "
                    "this teacher."
                )
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._layouts: dict[int, ShardLayout | None] = {}  # for the shards in self._indexes
        self._id_index: dict[str, tuple[int, int]] | None = None
        self._reduction: dict[str, np.ndarray] | None = None
        self.refresh()

    @property
    def teacher(self) -> TeacherInfo:
        return self.spec.teacher

    def refresh(self) -> None:
        """Look again for shards completed since the reader was opened."""
        self._shard_attrs = shard_attrs(self.root)
        self._complete = sorted(k for k, attrs in self._shard_attrs.items() if attrs.get("complete") is True)
        self._reduction = None
        self._id_index = None

    def shards(self) -> list[int]:
        """Indices of the complete shards, ascending."""
        return list(self._complete)

    def incomplete_shards(self) -> list[int]:
        """Shards being written, or left by a crashed run (invisible to everything else)."""
        return sorted(k for k, attrs in self._shard_attrs.items() if attrs.get("complete") is not True)

    def shard_attrs(self, shard: int) -> dict[str, Any]:
        """A shard's attributes: n, n_frames, audio_seconds, rejects [{id, reason}], complete, ..."""
        if shard not in self._shard_attrs:
            raise KeyError(f"store {self.url} has no shard {shard_name(shard)}")
        return dict(self._shard_attrs[shard])

    def __len__(self) -> int:
        """Utterances in the complete shards."""
        return sum(self._shard_attrs[k]["n"] for k in self._complete)

    def record(self, name: str) -> dict[str, Any] | None:
        """A JSON run record stored by `StoreWriter.write_record`, or None."""
        return read_json(self.store, name)

    # --- one shard -------------------------------------------------------------------------------

    def _damaged(self, shard: int, detail: str) -> DamagedShardError:
        return DamagedShardError(self.url, shard, detail)

    def index(self, shard: int) -> ShardIndex:
        """The small arrays of a complete shard (cached for the last few shards)."""
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        if shard not in self._complete:
            raise StoreError(f"shard {shard_name(shard)} is not a complete shard of store {self.url} "
                             f"({len(self._complete)} complete shards)")
        group_path = f"{SHARDS_GROUP}/{shard_name(shard)}"
        try:
            group = self.root[group_path]
            missing = missing_objects(self.store, group, group_path, INDEX_ARRAYS + ("states",))
            if missing:
                raise self._damaged(shard, f"objects missing from the store: {', '.join(missing)}")
            values = {}
            for name in INDEX_ARRAYS:
                try:
                    values[name] = group[name][...]
                except Exception as err:
                    raise self._damaged(shard, f"{name} is unreadable ({type(err).__name__}: {err}) - its object is "
                                               "corrupt or truncated") from err
            index = ShardIndex(
                offsets=values["offsets"], speech_frames=values["speech_frames"], ids=values["ids"].tolist(),
                texts=values["text"].tolist(), languages=values["language"].tolist(), durations=values["duration"],
                states=group["states"],
            )
        except DamagedShardError:
            raise
        except Exception as err:
            raise self._damaged(shard, f"{type(err).__name__}: {err}") from err
        problems = index_problems(index, self._shard_attrs[shard], self.spec)
        if problems:
            raise self._damaged(shard, "; ".join(problems))
        self._indexes[shard] = index
        if len(self._indexes) > INDEX_CACHE_SHARDS:
            evicted, _ = self._indexes.popitem(last=False)
            self._layouts.pop(evicted, None)
        return index

    def layout(self, shard: int) -> ShardLayout | None:
        """The sharding index of a shard's states object (read once), or None when zarr must read the array."""
        index = self.index(shard)
        if shard in self._layouts:
            return self._layouts[shard]
        blosc = direct_compression(index.states) if self.direct else None
        layout = None
        if blosc is not None and index.states.size:
            group_path = f"{SHARDS_GROUP}/{shard_name(shard)}/states"
            key = f"{group_path}/{index.states.metadata.encode_chunk_key((0, 0))}"
            chunk_rows = index.states.chunks[0]
            n_chunks = index.states.shards[0] // chunk_rows
            size = n_chunks * INDEX_ENTRY_BYTES + CHECKSUM_BYTES
            raw = self._fetch(shard, key, SuffixByteRequest(size), size, "its sharding index")
            if not checksum_ok(raw):
                raise self._damaged(shard, "the sharding index of states fails its checksum - the shard object is "
                                           "corrupt or truncated")
            chunks = raw[:-CHECKSUM_BYTES].view("<u8").reshape(n_chunks, 2)  # (n_chunks, 2): offset, nbytes
            layout = ShardLayout(key, chunk_rows, blosc, chunks)
        self._layouts[shard] = layout
        return layout

    def _fetch(self, shard: int, key: str, request: Any, size: int, what: str) -> np.ndarray:
        """`size` bytes of an object as (size,) uint8; a shorter answer is damage (a truncated object)."""
        try:
            buffer = run_sync(self.store.get(key, prototype=default_buffer_prototype(), byte_range=request))
        except OSError as err:
            raise StoreError(f"reading {what} of shard {shard_name(shard)} of store {self.url} failed: {err}") from err
        if buffer is None:
            raise self._damaged(shard, f"the states object {key} is missing")
        data = buffer.as_numpy_array().view(np.uint8).reshape(-1)
        if data.size != size:
            raise self._damaged(shard, f"{what} is {data.size} bytes where the index says {size} - the shard object "
                                       "is corrupt or truncated")
        return data

    def _direct_chunks(self, shard: int, layout: ShardLayout, start: int, stop: int,
                       out: np.ndarray | None) -> Iterator[tuple[int, np.ndarray]]:
        """Rows [start, stop) through the sharding index, one inner chunk at a time: (first row, rows) pairs in
        order. Decoded into `out` ((chunks x chunk_rows, D): every row of the chunks touched) when given, else
        into one reused chunk buffer, so a pair is valid only until the next one is asked for."""
        d_model = self.spec.teacher.d_model
        rows = layout.chunk_rows
        first, last = start // rows, -(-stop // rows)  # inner chunks [first, last)
        entries = layout.chunks[first:last]  # (k, 2)
        offsets, lengths = entries[:, 0].astype(np.int64), entries[:, 1].astype(np.int64)  # (k,)
        begin, end = int(offsets.min()), int((offsets + lengths).max())
        contiguous = end - begin == int(lengths.sum())  # zarr writes a shard's chunks back to back
        data = None
        if contiguous:
            data = self._fetch(shard, layout.key, RangeByteRequest(begin, end), end - begin, "states")
        buffer = np.empty((rows, d_model), np.float16) if out is None else None  # (rows, D)
        chunk_bytes = rows * d_model * 2
        for c, (offset, length) in enumerate(zip(offsets.tolist(), lengths.tolist())):
            if data is None:
                payload = self._fetch(shard, layout.key, RangeByteRequest(offset, offset + length), length, "states")
            else:
                payload = data[offset - begin : offset - begin + length]
            row = (first + c) * rows
            where = f"inner chunk {first + c} of states (rows {row}-{row + rows - 1})"
            if length <= CHECKSUM_BYTES or not checksum_ok(payload):
                raise self._damaged(shard, f"{where} fails its checksum - the shard object is corrupt or truncated")
            body = payload[:-CHECKSUM_BYTES]
            target = buffer if out is None else out[c * rows : (c + 1) * rows]  # (rows, D)
            try:
                if layout.blosc:
                    # Blosc's 16-byte header holds the decoded size at bytes 4-7 (little-endian uint32)
                    decoded = int.from_bytes(body[4:8].tobytes(), "little") if body.size >= BLOSC_HEADER_BYTES else -1
                    if decoded != chunk_bytes:
                        raise ValueError(f"it decodes to {decoded} bytes, not {chunk_bytes}")
                    numcodecs.blosc.decompress(body, target)
                elif body.size == chunk_bytes and out is None:
                    target = body.view(np.float16).reshape(rows, d_model)  # uncompressed: the fetched bytes as they are
                elif body.size == chunk_bytes:
                    target.view(np.uint8).reshape(-1)[:] = body
                else:
                    raise ValueError(f"it holds {body.size} bytes, not {chunk_bytes}")
            except (ValueError, RuntimeError) as err:
                raise self._damaged(shard, f"{where} cannot be decoded ({err}) - the shard object is corrupt or "
                                           "truncated") from err
            low, high = max(start, row), min(stop, row + rows)
            yield low, target[low - row : high - row]

    def _read_zarr(self, shard: int, start: int, stop: int) -> np.ndarray:
        try:
            return self.index(shard).states[start:stop]
        except Exception as err:
            hint = " - the shard object is corrupt or truncated" if "checksum" in str(err) else ""
            raise self._damaged(shard, f"reading states rows {start}:{stop} failed ({type(err).__name__}: {err}{hint})") from err

    def _direct(self, shard: int, start: int, stop: int) -> ShardLayout | None:
        """The layout to read rows [start, stop) with, or None for zarr (unknown codecs, an unwritten chunk)."""
        layout = self.layout(shard) if start < stop else None
        if layout is None:
            return None
        rows = layout.chunk_rows
        return None if (layout.chunks[start // rows : -(-stop // rows)] == MISSING_CHUNK).any() else layout

    def read_rows(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a shard's states (only the chunks they touch are read): (stop - start, D)."""
        index = self.index(shard)
        if not 0 <= start <= stop <= index.states.shape[0]:
            raise IndexError(f"rows {start}:{stop} are outside the {index.states.shape[0]} rows of shard "
                             f"{shard_name(shard)}")
        layout = self._direct(shard, start, stop)
        if layout is None:
            return self._read_zarr(shard, start, stop)
        rows = layout.chunk_rows
        first = start // rows
        out = np.empty(((-(-stop // rows) - first) * rows, self.spec.teacher.d_model), np.float16)  # (k x rows, D)
        for _ in self._direct_chunks(shard, layout, start, stop, out):
            pass
        return out[start - first * rows : stop - first * rows]

    def _row_pieces(self, shard: int, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rows [start, stop) of a shard's states as consecutive (first row, rows) pieces, each valid until the
        next is asked for: one inner chunk at a time on the direct path, blocks of ~64 MiB through zarr. Blocks
        end on chunk boundaries, so every chunk is decoded once, and memory stays bounded."""
        chunk = self.index(shard).states.chunks[0]
        block_rows = max(chunk, READ_BLOCK_BYTES // (2 * self.spec.teacher.d_model) // chunk * chunk)
        row = start
        while row < stop:
            block_stop = min(stop, row // chunk * chunk + block_rows)
            layout = self._direct(shard, row, block_stop)
            if layout is None:
                yield row, self._read_zarr(shard, row, block_stop)
            else:
                yield from self._direct_chunks(shard, layout, row, block_stop, None)
            row = block_stop

    def _utterance(self, shard: int, index: ShardIndex, i: int, states: np.ndarray) -> Utterance:
        return Utterance(index.ids[i], index.texts[i], index.languages[i], float(index.durations[i]), states,
                         shard, i, int(index.speech_frames[i]))

    def _check_position(self, shard: int, index: ShardIndex, i: int) -> None:
        if not 0 <= i < len(index):
            raise IndexError(f"shard {shard_name(shard)} of {self.url} has {len(index)} utterances, asked for #{i}")

    def utterance(self, shard: int, i: int) -> Utterance:
        """Utterance `i` of `shard`, reading only the chunks that hold its frames."""
        index = self.index(shard)
        self._check_position(shard, index, i)
        states = self.read_rows(shard, int(index.offsets[i]), int(index.offsets[i + 1]))  # (T, D)
        return self._utterance(shard, index, i, states)

    def frames(self, shard: int, i: int, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) of utterance `i` of `shard`, (stop - start, D) float16, a partial read."""
        index = self.index(shard)
        self._check_position(shard, index, i)
        first, n_frames = int(index.offsets[i]), int(index.offsets[i + 1] - index.offsets[i])
        if not 0 <= start <= stop <= n_frames:
            raise IndexError(f"frames {start}:{stop} are outside utterance {index.ids[i]!r}, which has {n_frames}")
        return self.read_rows(shard, first + start, first + stop)

    def iter_shard(self, shard: int, start: int = 0, stop: int | None = None,
                   keep: Callable[[str], bool] | None = None) -> Iterator[Utterance]:
        """Utterances start..stop-1 of a shard in order, reading each states chunk once.

        The states are fetched in blocks of ~64 MiB aligned to the inner chunks and decoded one chunk
        at a time, so memory stays bounded however large the shard is; each utterance is a fresh
        contiguous (T, D) array. `keep(id)` False skips an utterance.
        """
        index = self.index(shard)
        stop = len(index) if stop is None else stop
        if not 0 <= start <= stop <= len(index):
            raise IndexError(f"utterances {start}:{stop} are outside shard {shard_name(shard)} ({len(index)})")
        if start == stop:
            return
        offsets = index.offsets
        d_model = self.spec.teacher.d_model
        pieces = self._row_pieces(shard, int(offsets[start]), int(offsets[stop]))
        piece_row, piece = int(offsets[start]), np.zeros((0, d_model), np.float16)  # rows [piece_row, + len)
        for i in range(start, stop):
            first, end = int(offsets[i]), int(offsets[i + 1])
            wanted = keep is None or keep(index.ids[i])
            # A fresh array per utterance: a view would pin a whole block for as long as the utterance lives.
            states = np.empty((end - first, d_model), np.float16) if wanted else None  # (T, D)
            row = first
            while row < end:
                if row >= piece_row + len(piece):
                    piece_row, piece = next(pieces)
                    continue
                take = min(end, piece_row + len(piece)) - row
                if wanted:
                    states[row - first : row - first + take] = piece[row - piece_row : row - piece_row + take]
                row += take
            if wanted:
                yield self._utterance(shard, index, i, states)

    def find(self, utt_id: str) -> tuple[int, int]:
        """(shard, position) of an utterance id (the first time this is called, reads every ids array)."""
        if self._id_index is None:
            self._id_index = {}
            for shard in self._complete:
                try:
                    ids = self.root[f"{SHARDS_GROUP}/{shard_name(shard)}/ids"][...].tolist()
                except Exception as err:
                    raise self._damaged(shard, f"ids unreadable ({type(err).__name__}: {err})") from err
                for i, found in enumerate(ids):
                    self._id_index.setdefault(found, (shard, i))
        if utt_id not in self._id_index:
            raise StoreError(f"no utterance {utt_id!r} in the {len(self._complete)} complete shards of {self.url}")
        return self._id_index[utt_id]

    # --- the reduction over complete shards ------------------------------------------------------

    def tail_template(self) -> np.ndarray:
        """(max_frames, D) float32: the mean teacher state at each window position after the speech.

        Position p averages every utterance whose speech ends at or before p. Positions no
        utterance reached (a prefix: earlier than the shortest utterance's end) repeat the first
        observed position, the encoder's answer to padding right after speech; with no tail
        frames at all, every position holds the per-channel mean.
        """
        return self._reduce()["tail_template"]

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std (D,) float32 over every speech frame (std floored at 1e-6)."""
        reduction = self._reduce()
        return reduction["mean"], reduction["std"]

    def tail_counts(self) -> np.ndarray:
        """(max_frames,) int64: utterances that contributed to each template position."""
        return self._reduce()["tail_count"]

    def full_window(self, states: np.ndarray) -> np.ndarray:
        """(max_frames, D) float32: `states` (T, D) followed by tail_template()[T:]."""
        template = self.tail_template()
        n_frames = len(states)
        if n_frames > len(template):
            raise ValueError(f"states have {n_frames} frames, more than the {len(template)}-frame window")
        window = np.empty_like(template)  # (M, D)
        window[:n_frames] = states
        window[n_frames:] = template[n_frames:]
        return window

    def _reduction_key(self) -> str:
        shards = [[k, self._shard_attrs[k]["n"], self._shard_attrs[k]["n_frames"]] for k in self._complete]
        return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]

    def _reduce(self) -> dict[str, np.ndarray]:
        if self._reduction is not None:
            return self._reduction
        if not self._complete:
            raise StoreError(f"store {self.url} has no complete shards yet: there is no tail template or statistics")
        key = self._reduction_key()
        reduction = self._read_cache(key)
        if reduction is None:
            reduction = self._compute_reduction()
            self._write_cache(key, reduction)
        for array in reduction.values():
            array.flags.writeable = False  # shared by every caller
        self._reduction = reduction
        return reduction

    def _shard_sums(self, shard: int) -> tuple[np.ndarray, ...]:
        group_path = f"{SHARDS_GROUP}/{shard_name(shard)}"
        try:
            group = self.root[group_path]
            return tuple(group[name][...] for name in ("tail_sum", "tail_count", "stat_sum", "stat_sqsum", "stat_count"))
        except Exception as err:
            raise self._damaged(shard, f"its sums are unreadable ({type(err).__name__}: {err})") from err

    def _compute_reduction(self) -> dict[str, np.ndarray]:
        teacher = self.spec.teacher
        tail_sum = np.zeros((teacher.max_frames, teacher.d_model), np.float64)  # (M, D)
        tail_count = np.zeros(teacher.max_frames, np.int64)  # (M,)
        stat_sum = np.zeros(teacher.d_model, np.float64)  # (D,)
        stat_sqsum = np.zeros(teacher.d_model, np.float64)  # (D,)
        stat_count = 0
        with ThreadPoolExecutor(REDUCE_THREADS) as pool:
            for sums in pool.map(self._shard_sums, self._complete):  # summed in shard order: reproducible
                tail_sum += sums[0]
                tail_count += sums[1]
                stat_sum += sums[2]
                stat_sqsum += sums[3]
                stat_count += int(sums[4][0])
        if stat_count == 0:
            raise StoreError(f"store {self.url} has complete shards but no utterances: nothing to reduce")
        mean = stat_sum / stat_count  # (D,)
        std = np.sqrt(np.maximum(stat_sqsum / stat_count - mean**2, 0.0))  # (D,)
        seen = tail_count > 0
        template = np.empty_like(tail_sum)  # (M, D)
        template[seen] = tail_sum[seen] / tail_count[seen, None]
        if seen.any():
            # Counts only grow with p (an utterance contributes to every p >= its end), so unseen
            # positions form a prefix; each takes the first seen position after it.
            first_seen = int(np.argmax(seen))
            template[~seen] = template[first_seen]
        else:
            template[:] = mean
        return {
            "tail_template": template.astype(np.float32),
            "tail_count": tail_count,
            "mean": mean.astype(np.float32),
            "std": np.maximum(std, STD_FLOOR).astype(np.float32),
        }

    def _read_cache(self, key: str) -> dict[str, np.ndarray] | None:
        """A complete, whole cache entry for `key`, or None (then the caller computes the reduction)."""
        teacher = self.spec.teacher
        try:
            entries = list(self.root[CACHE_GROUP].groups())
        except (KeyError, ValueError, TypeError):  # no cache yet, or an entry whose write was cut short
            return None
        for name, group in entries:
            try:
                if name.split(".")[0] != key or group.attrs.get("complete") is not True:
                    continue
                if missing_objects(self.store, group, f"{CACHE_GROUP}/{name}", CACHE_ARRAYS):
                    continue  # being deleted by another reader: zarr would read zeros
                reduction = {array: group[array][...] for array in CACHE_ARRAYS}
            except Exception as err:  # replaced while we read it
                log.debug("cache entry %s of %s unusable: %s", name, self.url, err)
                continue
            if reduction["tail_template"].shape == (teacher.max_frames, teacher.d_model):
                return reduction
        return None

    def _write_cache(self, key: str, reduction: dict[str, np.ndarray]) -> None:
        """Keep the reduction in the store for the next reader; a read-only store just goes without.

        Every writer makes its own entry `<key>.<random>` and marks it complete last, so ranks that
        open the store at the same moment never write into each other's entry. Entries for other
        shard sets are stale and deleted.
        """
        try:
            writable = self.store.with_read_only(False)
            cache = zarr.open_group(writable, path=CACHE_GROUP, mode="a")
            for stale in list(cache.group_keys()):
                if stale.split(".")[0] != key:
                    run_sync(writable.delete_dir(f"{CACHE_GROUP}/{stale}"))
            group = cache.create_group(f"{key}.{uuid.uuid4().hex[:8]}", attributes={"complete": False})
            for name in CACHE_ARRAYS:
                group.create_array(name, data=reduction[name], chunks=reduction[name].shape,
                                   config={"write_empty_chunks": True})
            group.update_attributes({"complete": True, "shards": self._complete, **version_stamp("written")})
        except Exception as err:
            log.info("could not cache the tail template in %s (%s); it is recomputed next time", self.url, err)


def missing_objects(store: Store, group: zarr.Group, group_path: str, names: tuple[str, ...]) -> list[str]:
    """Arrays among `names` whose one stored object is absent (zarr would silently read zeros)."""
    missing = []
    for name in names:
        array = group[name]
        if array.size and not run_sync(store.exists(f"{group_path}/{name}/{array.metadata.encode_chunk_key((0,) * array.ndim)}")):
            missing.append(name)
    return missing
