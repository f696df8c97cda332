"""Reading a feature store: utterances, frame ranges, whole shards, the tail template and statistics.

    reader = StoreReader("whistle-store", expect_teacher=load_teacher(name, revision, "encoder").info)
    for shard in reader.shards():                      # complete shards only
        for utt in reader.iter_shard(shard):           # reads each array of the shard once
            window = reader.full_window(utt.states)    # (max_frames, D): speech + tail template
    mean, std = reader.statistics()                    # per channel, over all speech frames

The reader sees the shards that were complete when it was opened (`refresh()` looks again), so all
ranks of a training run agree on one list while precompute may still be adding shards.

States are read *directly* where store/shard_object.py knows the codecs: the byte range of the
shard object holding the wanted inner chunks in one store request, each chunk checked and decoded
straight into the output (faster than zarr's sharding codec). Anything else is read through zarr;
`direct=False` reads everything so (the reference path). The tail template and the statistics
come from store/reduction.py.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from store.format import (
    SHARDS_GROUP,
    DamagedShardError,
    StoreError,
    array_damage,
    is_checked,
    missing_objects,
    open_root,
    open_zarr_store,
    read_json,
    shard_attrs,
    shard_name,
    url_text,
)
from store.reduction import Reduction, reduce_shards
from store.shard_object import ShardLayout, ShardObjectError, read_chunks, read_layout
from store.spec import StoreSpec, TeacherInfo

log = logging.getLogger(__name__)

READ_BLOCK_BYTES = 64 * 2**20  # iter_shard reads the states in blocks of about this size
INDEX_CACHE_SHARDS = 8  # shard indexes (offsets, ids, text, ...) kept in memory
INDEX_ARRAYS = ("offsets", "speech_frames", "ids", "text", "language", "duration")


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
    for name, values in (
        ("speech_frames", speech_frames),
        ("ids", index.ids),
        ("text", index.texts),
        ("language", index.languages),
        ("duration", index.durations),
    ):
        if len(values) != n:
            out.append(f"{name} has {len(values)} entries, attrs say n={n}")
    if out:
        return out
    if spec.frames == "speech" and not np.array_equal(lengths, speech_frames):
        out.append("stored frames per utterance differ from speech_frames")
    if spec.frames == "full" and (
        (lengths != max_frames).any() or (speech_frames < 1).any() or (speech_frames > max_frames).any()
    ):
        out.append(f"full-frames shard has windows that are not {max_frames} frames, or bad speech_frames")
    if not (np.isfinite(index.durations).all() and (index.durations > 0).all()):
        out.append("duration has non-positive or non-finite entries")
    return out


class StoreReader:
    """Read access to a whistle store (a local path, an fsspec URL, or a zarr Store)."""

    def __init__(
        self, url: str | os.PathLike | Store, expect_teacher: TeacherInfo | None = None, *, direct: bool = True
    ) -> None:
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
        self._reduction: Reduction | None = None
        self.refresh()

    @property
    def teacher(self) -> TeacherInfo:
        return self.spec.teacher

    def refresh(self) -> None:
        """Look again for shards completed since the reader was opened."""
        self._shard_attrs = shard_attrs(self.root)
        self._complete = sorted(k for k, attrs in self._shard_attrs.items() if attrs.get("complete") is True)
        for shard, attrs in sorted(self._shard_attrs.items()):
            if "unreadable" in attrs:
                log.warning(
                    "shard %s of store %s is not read: %s. It counts as incomplete: run `whistle precompute` "
                    "on this store again to rewrite it",
                    shard_name(shard),
                    self.url,
                    attrs["unreadable"],
                )
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
            raise StoreError(
                f"shard {shard_name(shard)} is not a complete shard of store {self.url} "
                f"({len(self._complete)} complete shards)"
            )
        group_path = f"{SHARDS_GROUP}/{shard_name(shard)}"
        try:
            group = self.root[group_path]
            missing = missing_objects(self.store, group, group_path, INDEX_ARRAYS + ("states",))
            if missing:
                raise self._damaged(shard, f"objects missing from the store: {', '.join(missing)}")
            arrays = {name: group[name] for name in INDEX_ARRAYS}
            unchecked = [name for name, array in arrays.items() if not is_checked(array)]
            if unchecked and self._shard_attrs[shard].get("format_minor", 0) >= 1:
                raise self._damaged(
                    shard,
                    f"{', '.join(unchecked)} lack the crc32c checksum every array of a format "
                    "1.1 shard has - their metadata was rewritten",
                )
            values = {}
            for name, array in arrays.items():
                try:
                    values[name] = array[...]
                except Exception as err:
                    raise self._damaged(shard, array_damage(name, err)) from err
            index = ShardIndex(
                offsets=values["offsets"],
                speech_frames=values["speech_frames"],
                ids=values["ids"].tolist(),
                texts=values["text"].tolist(),
                languages=values["language"].tolist(),
                durations=values["duration"],
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

    def ids(self, shard: int) -> list[str]:
        """The utterance ids of a complete shard, reading that array only (unless its index is cached)."""
        if shard in self._indexes:
            return self._indexes[shard].ids
        if shard not in self._complete:
            raise StoreError(f"shard {shard_name(shard)} is not a complete shard of store {self.url}")
        try:
            return self.root[f"{SHARDS_GROUP}/{shard_name(shard)}/ids"][...].tolist()
        except Exception as err:
            raise self._damaged(shard, array_damage("ids", err)) from err

    def layout(self, shard: int) -> ShardLayout | None:
        """The sharding index of a shard's states object (read once), or None when zarr must read the array."""
        index = self.index(shard)
        if shard not in self._layouts:
            try:
                self._layouts[shard] = read_layout(self.store, index.states) if self.direct else None
            except ShardObjectError as err:
                raise self._damaged(shard, str(err)) from err
            except OSError as err:
                raise self._unreadable(shard, "its sharding index", err) from err
        return self._layouts[shard]

    def _unreadable(self, shard: int, what: str, err: OSError) -> StoreError:
        return StoreError(f"reading {what} of shard {shard_name(shard)} of store {self.url} failed: {err}")

    def _direct_chunks(
        self, shard: int, layout: ShardLayout, start: int, stop: int, out: np.ndarray | None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """store.shard_object.read_chunks, its errors naming the shard."""
        try:
            yield from read_chunks(self.store, layout, start, stop, out)
        except ShardObjectError as err:
            raise self._damaged(shard, str(err)) from err
        except OSError as err:
            raise self._unreadable(shard, "states", err) from err

    def _read_zarr(self, shard: int, start: int, stop: int) -> np.ndarray:
        try:
            return self.index(shard).states[start:stop]
        except Exception as err:
            hint = " - the shard object is corrupt or truncated" if "checksum" in str(err) else ""
            raise self._damaged(
                shard, f"reading states rows {start}:{stop} failed ({type(err).__name__}: {err}{hint})"
            ) from err

    def _direct(self, shard: int, start: int, stop: int) -> ShardLayout | None:
        """The layout to read rows [start, stop) with, or None for zarr (unknown codecs, an unwritten chunk)."""
        layout = self.layout(shard) if start < stop else None
        return layout if layout is not None and layout.covers(start, stop) else None

    def read_rows(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a shard's states (only the chunks they touch are read): (stop - start, D)."""
        index = self.index(shard)
        if not 0 <= start <= stop <= index.states.shape[0]:
            raise IndexError(
                f"rows {start}:{stop} are outside the {index.states.shape[0]} rows of shard {shard_name(shard)}"
            )
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
        return Utterance(
            index.ids[i],
            index.texts[i],
            index.languages[i],
            float(index.durations[i]),
            states,
            shard,
            i,
            int(index.speech_frames[i]),
        )

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

    def iter_shard(
        self, shard: int, start: int = 0, stop: int | None = None, keep: Callable[[str], bool] | None = None
    ) -> Iterator[Utterance]:
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
                    raise self._damaged(shard, array_damage("ids", err)) from err
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
        return self._reduce().tail_template

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std (D,) float32 over every speech frame (std floored at 1e-6)."""
        reduction = self._reduce()
        return reduction.mean, reduction.std

    def tail_counts(self) -> np.ndarray:
        """(max_frames,) int64: utterances that contributed to each template position."""
        return self._reduce().tail_count

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

    def _reduce(self) -> Reduction:
        if self._reduction is None:
            complete = {k: self._shard_attrs[k] for k in self._complete}
            self._reduction = reduce_shards(self.root, self.url, self.spec.teacher, complete)
        return self._reduction
