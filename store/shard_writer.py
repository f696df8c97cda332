"""Filling one shard of a store: `ShardWriter` buffers its utterances and writes them whole on close.

    with writer.shard(k) as shard:              # StoreWriter.shard (store/writer.py)
        shard.add(utt_id, text, language, duration_s, speech_states, tail=tail_states)
        shard.reject(other_id, "decode: not a wav file")
    record = shard.close()                      # (done by the with block) may run on a thread pool

A shard buffers its utterances in memory and writes every array whole when it closes (zarr-python
rewrites a whole shard object on any partial write), then marks itself complete in its last write.
While it closes, a shard holds about twice its raw size (its buffers and the compressed shard object:
the states are gathered into the object chunk by chunk, never joined whole). The template and
statistics sums of each utterance are added on the shard's own thread while the caller goes on.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import zarr

from store.format import (
    FORMAT_MINOR,
    SHARDS_GROUP,
    StoreError,
    checked_compressors,
    run_sync,
    shard_name,
    version_stamp,
)
from store.shard_object import create_states_array, write_states

if TYPE_CHECKING:
    from store.writer import StoreWriter

MAX_PENDING_SUMS = 8  # utterances queued for a shard's summing thread before add() waits (bounds memory)
FLOAT16_EXPONENT = 0x7C00  # all exponent bits set: inf or nan
NON_FINITE_REASON = "non-finite states: the encoder produced inf/nan (fp16 overflow?)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRecord:
    """What `ShardWriter.close` wrote: enough to report progress and find the shard again."""

    index: int
    n: int  # utterances stored
    n_frames: int  # rows of `states`
    n_rejects: int
    nbytes: int  # bytes the shard occupies in the store
    audio_seconds: float


class ShardWriter:
    """Buffers one shard's utterances and writes them whole on `close()`.

    Use it as a context manager (closes on success; if the block raises, the partial shard is
    deleted and nothing is marked complete), or call `close()` yourself, from any thread.
    """

    def __init__(self, writer: StoreWriter, index: int) -> None:
        self.writer = writer
        self.spec = writer.spec
        self.index = index
        self.name = shard_name(index)
        teacher = self.spec.teacher
        self.max_frames, self.d_model = teacher.max_frames, teacher.d_model
        self._states: list[np.ndarray] = []  # each (T, D) float16
        self._speech_frames: list[int] = []
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._languages: list[str] = []
        self._durations: list[float] = []
        self._seen: set[str] = set()
        self._rejects: list[dict[str, str]] = []
        self._tail_sum = np.zeros((self.max_frames, self.d_model), np.float64)  # (M, D)
        self._tail_count = np.zeros(self.max_frames, np.int64)  # (M,)
        # add(summed=True) counts what add_sums must bring; close() checks that the two agree
        self._summed_expected = np.zeros(self.max_frames + 1, np.int64)  # (M + 1,): tail count, speech frames
        self._summed_given = np.zeros(self.max_frames + 1, np.int64)  # (M + 1,)
        self._stat_sum = np.zeros(self.d_model, np.float64)  # (D,)
        self._stat_sqsum = np.zeros(self.d_model, np.float64)  # (D,)
        self._stat_count = 0
        self._record: ShardRecord | None = None
        # Template and statistics sums (~5 ms per utterance of large-v3 states) run on one thread per
        # shard, in add() order (reproducible sums), while the caller's loop goes on: numpy frees the GIL.
        self._summer = ThreadPoolExecutor(1, thread_name_prefix=f"whistle-shard-{self.name}")
        self._pending: deque[Future] = deque()
        # Created now (incomplete) so that inspect-store shows shards in progress.
        self._group = writer.root.require_group(SHARDS_GROUP).create_group(
            self.name, attributes={"complete": False, **version_stamp("started")}
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._record is None:
            self._summer.shutdown(cancel_futures=True)
            self._states.clear()
            try:
                run_sync(self.writer.store.delete_dir(f"{SHARDS_GROUP}/{self.name}"))
            finally:
                self.writer.release(self.index)

    def add(
        self,
        id: str,
        text: str,
        language: str,
        duration_s: float,
        states: np.ndarray,
        tail: np.ndarray | None = None,
        *,
        speech_frames: int | None = None,
        summed: bool = False,
    ) -> bool:
        """Add one utterance; returns False when it was recorded as a reject instead.

        speech mode: `states` (T, D) float16 are the speech frames, `tail` (max_frames - T, D)
        float16 the rest of the window (None only when T == max_frames) — or, with `summed`, no
        tail: the caller adds the tail and the speech frames' statistics to the shard's sums itself
        with `add_sums` (precompute sums a batch on the GPU, so only speech frames cross to the
        host), and must then have checked the whole window for inf/nan (this checks `states` only).
        full mode: `states` (max_frames, D) float16, `tail` None; `speech_frames` (where the speech
        ends) defaults to ceil(duration_s * sample_rate / samples_per_frame) + margin, capped.
        Non-finite states become a reject ("non-finite states: ..."), never stored.
        """
        if self._record is not None:
            raise RuntimeError(f"shard {self.name} is closed")
        if id in self._seen:
            raise ValueError(f"utterance id {id!r} was added twice to shard {self.name}")
        if not (isinstance(duration_s, (int, float, np.floating)) and math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"utterance {id!r}: duration_s must be a positive number of seconds, got {duration_s!r}")
        states = np.asarray(states)
        if summed and (self.spec.frames != "speech" or tail is not None):
            raise ValueError(
                f"utterance {id!r} (shard {self.name}): summed is for speech-frames stores and "
                "replaces the tail argument"
            )
        n_speech = self._check_shapes(id, duration_s, states, tail, speech_frames, summed)
        tail = None if tail is None else np.asarray(tail)
        if not _finite(states) or (tail is not None and not _finite(tail)):
            self.reject(id, NON_FINITE_REASON)
            return False
        states = np.array(states, copy=True)  # the caller may reuse its buffers
        tail = None if tail is None else np.array(tail, copy=True)
        self._pending.append(self._summer.submit(self._sum, states, tail, n_speech, summed))
        while len(self._pending) > MAX_PENDING_SUMS or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()  # raises what the summing thread raised
        self._states.append(states)
        self._speech_frames.append(n_speech)
        self._ids.append(str(id))
        self._texts.append(str(text))
        self._languages.append(str(language))
        self._durations.append(float(duration_s))
        self._seen.add(id)
        return True

    def _sum(self, states: np.ndarray, tail: np.ndarray | None, n_speech: int, summed: bool) -> None:
        """Add one utterance to the shard's template and statistics sums (on the summing thread)."""
        self._tail_count[n_speech:] += 1
        if summed:  # its sums come from add_sums
            self._summed_expected[n_speech:-1] += 1
            self._summed_expected[-1] += n_speech
            return
        speech = states[:n_speech].astype(np.float64)  # (T, D)
        self._stat_sum += speech.sum(axis=0)
        self._stat_sqsum += np.einsum("td,td->d", speech, speech)
        self._stat_count += n_speech
        self._tail_sum[n_speech:] += states[n_speech:] if tail is None else tail  # (M - T, D)

    def add_sums(
        self,
        tail_sum: np.ndarray,
        tail_count: np.ndarray,
        stat_sum: np.ndarray,
        stat_sqsum: np.ndarray,
        stat_count: int,
    ) -> None:
        """Add sums made by the caller over utterances added with `summed=True` (precompute: one batch, on the GPU).

        tail_sum (max_frames, D): the sum of their states at each window position p >= their speech frames;
        tail_count (max_frames,): how many utterances each position sums; stat_sum, stat_sqsum (D,): per-channel
        sums of their speech frames and of their squares; stat_count: their speech frames. Sums float32 or
        float64. close() refuses a shard whose counts disagree with the utterances added so.
        """
        if self._record is not None:
            raise RuntimeError(f"shard {self.name} is closed")
        shapes = {
            "tail_sum": (self.max_frames, self.d_model),
            "stat_sum": (self.d_model,),
            "stat_sqsum": (self.d_model,),
        }
        sums = {
            "tail_sum": np.asarray(tail_sum),
            "stat_sum": np.asarray(stat_sum),
            "stat_sqsum": np.asarray(stat_sqsum),
        }
        for name, values in sums.items():
            if values.shape != shapes[name] or values.dtype not in (np.float32, np.float64):
                raise ValueError(
                    f"shard {self.name}: {name} must be {shapes[name]} float32 or float64, got "
                    f"{values.shape} {values.dtype}"
                )
        tail_count = np.asarray(tail_count)
        if tail_count.shape != (self.max_frames,) or tail_count.dtype.kind not in "iu":
            raise ValueError(
                f"shard {self.name}: tail_count must be ({self.max_frames},) integers, got "
                f"{tail_count.shape} {tail_count.dtype}"
            )
        counts = np.append(tail_count, int(stat_count))  # (M + 1,)
        self._pending.append(self._summer.submit(self._add_sums, *(v.copy() for v in sums.values()), counts))

    def _add_sums(self, tail_sum: np.ndarray, stat_sum: np.ndarray, stat_sqsum: np.ndarray, counts: np.ndarray) -> None:
        self._tail_sum += tail_sum
        self._stat_sum += stat_sum
        self._stat_sqsum += stat_sqsum
        self._stat_count += int(counts[-1])
        self._summed_given += counts

    def _check_shapes(
        self,
        id: str,
        duration_s: float,
        states: np.ndarray,
        tail: np.ndarray | None,
        speech_frames: int | None,
        summed: bool,
    ) -> int:
        """The number of speech frames, after checking shapes and dtypes against the spec."""
        where = f"utterance {id!r} (shard {self.name})"
        if states.ndim != 2 or states.shape[1] != self.d_model or states.dtype != np.float16:
            raise ValueError(f"{where}: states must be (T, {self.d_model}) float16, got {states.shape} {states.dtype}")
        n_rows = states.shape[0]
        if self.spec.frames == "full":
            if n_rows != self.max_frames or tail is not None:
                raise ValueError(
                    f"{where}: full-frames store needs states ({self.max_frames}, {self.d_model}) "
                    f"and no tail, got {states.shape} and tail={tail is not None}"
                )
            if speech_frames is None:
                teacher = self.spec.teacher
                n_samples = round(duration_s * teacher.sample_rate)
                speech_frames = -(-n_samples // teacher.samples_per_frame) + self.spec.speech_margin_frames
                speech_frames = min(speech_frames, self.max_frames)
            if not 1 <= speech_frames <= self.max_frames:
                raise ValueError(f"{where}: speech_frames must be 1-{self.max_frames}, got {speech_frames}")
            return int(speech_frames)
        if not 1 <= n_rows <= self.max_frames:
            raise ValueError(f"{where}: speech states must have 1-{self.max_frames} frames, got {n_rows}")
        if speech_frames is not None and speech_frames != n_rows:
            raise ValueError(f"{where}: speech_frames={speech_frames} but states has {n_rows} frames")
        tail_rows = self.max_frames - n_rows
        if tail is None and tail_rows and not summed:
            raise ValueError(
                f"{where}: speech-frames store needs the tail ({tail_rows}, {self.d_model}) for the tail template"
            )
        if tail is not None:
            tail = np.asarray(tail)
            if tail.shape != (tail_rows, self.d_model) or tail.dtype != np.float16:
                raise ValueError(
                    f"{where}: tail must be ({tail_rows}, {self.d_model}) float16, got {tail.shape} {tail.dtype}"
                )
        return n_rows

    def reject(self, id: str, reason: str) -> None:
        """Record an input that was not stored; `reason` reads "kind: detail" (grouped by kind)."""
        if self._record is not None:
            raise RuntimeError(f"shard {self.name} is closed")
        if not reason:
            raise ValueError(f"reject of {id!r} needs a reason")
        self._rejects.append({"id": str(id), "reason": str(reason)})

    def close(self) -> ShardRecord:
        """Write every array whole, then mark the shard complete (its last write). Idempotent."""
        if self._record is not None:
            return self._record
        try:
            record = self._write()
        except Exception as err:
            self.writer.release(self.index)
            raise StoreError(
                f"writing shard {self.name} of store {self.writer.url} failed ({type(err).__name__}: "
                f"{err}); it stays incomplete and is rewritten on the next run"
            ) from err
        self._record = record
        self.writer.release(self.index, complete=True)
        return record

    def _write(self) -> ShardRecord:
        while self._pending:
            self._pending.popleft().result()
        self._summer.shutdown()
        if not np.array_equal(self._summed_expected, self._summed_given):
            raise ValueError(
                f"the sums given with add_sums cover {self._summed_given[-1]} speech frames and "
                f"{self._summed_given[:-1].sum()} tail positions; the utterances added with summed=True "
                f"have {self._summed_expected[-1]} and {self._summed_expected[:-1].sum()}"
            )
        n = len(self._ids)
        speech_frames = np.asarray(self._speech_frames, np.int32)  # (n,)
        lengths = [len(states) for states in self._states]
        offsets = np.zeros(n + 1, np.int64)  # (n + 1,)
        np.cumsum(lengths, out=offsets[1:])
        n_frames = int(offsets[-1])
        group = self._group
        states = create_states_array(group, n_frames, self.spec)
        write_states(self.writer.store, states, self._states, self.spec)
        self._states.clear()
        _write_whole(group, "offsets", offsets)
        _write_whole(group, "speech_frames", speech_frames)
        _write_whole(group, "duration", np.asarray(self._durations, np.float32))
        for name, values in (("ids", self._ids), ("text", self._texts), ("language", self._languages)):
            _write_whole(group, name, np.array(values, dtype=object), dtype=str)
        _write_whole(group, "tail_sum", self._tail_sum)
        _write_whole(group, "tail_count", self._tail_count)
        _write_whole(group, "stat_sum", self._stat_sum)
        _write_whole(group, "stat_sqsum", self._stat_sqsum)
        _write_whole(group, "stat_count", np.asarray([self._stat_count], np.int64))
        audio_seconds = float(np.sum(np.asarray(self._durations, np.float32), dtype=np.float64))
        group.update_attributes(
            {
                "n": n,
                "n_frames": n_frames,
                "audio_seconds": audio_seconds,
                "rejects": self._rejects,
                "format_minor": FORMAT_MINOR,
                "write_id": uuid.uuid4().hex,
                **version_stamp("written"),
                "complete": True,
            }
        )
        nbytes = run_sync(self.writer.store.getsize_prefix(f"{SHARDS_GROUP}/{self.name}"))
        log.debug(
            "shard %s: %d utterances, %d frames, %d rejects, %d bytes",
            self.name,
            n,
            n_frames,
            len(self._rejects),
            nbytes,
        )
        return ShardRecord(self.index, n, n_frames, len(self._rejects), nbytes, audio_seconds)


def _finite(values: np.ndarray) -> bool:
    """No inf/nan in float16 `values`, tested on the bits (6x faster than np.isfinite on float16)."""
    return not ((values.view(np.uint16) & FLOAT16_EXPONENT) == FLOAT16_EXPONENT).any()


def _write_whole(group: zarr.Group, name: str, data: np.ndarray, dtype: Any = None) -> None:
    """A small array as a single chunk ending in its crc32c, written in one call (even when all zeros: readers
    check it exists)."""
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=dtype or data.dtype,
        chunks=tuple(max(1, size) for size in data.shape),
        compressors=checked_compressors(),
        config={"write_empty_chunks": True},
    )
    if data.size:
        array[...] = data
