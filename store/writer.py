"""Writing a feature store: `StoreWriter` opens or creates it, `ShardWriter` fills one shard.

    writer = StoreWriter.open("whistle-store", spec)
    for k in my_shards:                         # k % world_size == rank
        if k in writer.complete_shards():
            continue                            # resume: complete shards are kept
        shard = writer.shard(k)                 # drops an incomplete shard k left by a crash
        for row in rows_of_shard(k):
            shard.add(row.id, row.text, row.language, row.duration, speech_states, tail=tail_states)
        record = shard.close()                  # may run on a thread pool: Blosc releases the GIL

A shard buffers its utterances in memory and writes every array whole when it closes (zarr-python
rewrites a whole shard object on any partial write), then marks itself complete in its last write.
While it closes, a shard holds about twice its raw size (its buffers and the compressed shard object:
the states are gathered into the object chunk by chunk, never joined whole).

Two runs on one store. `shard(k)` first *claims* shard k: on a local store, an OS lock
(fcntl.flock) on STORE/locks/<k>, held until the shard is closed and released by the OS when the
process dies. So a shard another live process is writing is never touched (`claim` says False,
`shard` raises ShardBusy), and an incomplete shard whose lock is free was left by a crash and is
redone. Object stores (s3://, gs://, memory://) have no such lock: one run at a time there.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.errors import ContainsGroupError
from zarr.storage import LocalStore

try:
    import fcntl
except ImportError:  # not POSIX: no shard locks (one run at a time per store)
    fcntl = None

from store.format import (
    ATTRS_KEY,
    SHARDS_GROUP,
    StoreError,
    StoreSpec,
    is_empty,
    open_root,
    open_zarr_store,
    read_json,
    read_shard_attrs,
    run_sync,
    shard_attrs,
    direct_compression,
    encode_shard_object,
    shard_name,
    states_codecs,
    states_compressor,
    url_text,
    version_stamp,
    write_json,
)

log = logging.getLogger(__name__)

RECORD_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.json$")
MAX_PENDING_SUMS = 8  # utterances queued for a shard's summing thread before add() waits (bounds memory)
FLOAT16_EXPONENT = 0x7C00  # all exponent bits set: inf or nan
ROOT_WAIT_TRIES = 20  # x 0.1 s: how long to wait for a root zarr.json another process is writing
LOCKS_DIR = "locks"  # STORE/locks/<shard name>: the OS lock of a shard being written (local stores)
NON_FINITE_REASON = "non-finite states: the encoder produced inf/nan (fp16 overflow?)"


class ShardBusy(StoreError):
    """Another live process is writing this shard, or completed it since this one looked."""


@dataclass(frozen=True)
class ShardRecord:
    """What `ShardWriter.close` wrote: enough to report progress and find the shard again."""

    index: int
    n: int  # utterances stored
    n_frames: int  # rows of `states`
    n_rejects: int
    nbytes: int  # bytes the shard occupies in the store
    audio_seconds: float


class StoreWriter:
    """One process's handle on a store it adds shards to (see `open`)."""

    def __init__(self, store: Store, root: zarr.Group, spec: StoreSpec, url: str) -> None:
        self.store = store
        self.root = root
        self.spec = spec  # the store's own spec (its codec wins over a requested one on reopen)
        self.url = url
        self._claims: dict[int, Any] = {}  # shard index -> its open lock file (local stores)

    @classmethod
    def open(cls, url: str | os.PathLike | Store, spec: StoreSpec, overwrite: bool = False) -> StoreWriter:
        """Create the store at `url`, or open the existing one if its spec agrees with `spec`.

        Refuses (StoreError) a store whose teacher, frame policy, margin, shard size, dataset
        fingerprint or augmentation differ, listing each difference. `overwrite=True` deletes an
        existing whistle store first (only one process may do that); anything that is not a
        whistle store is never deleted.
        """
        text = url_text(url)
        problems = spec.problems()
        if problems:
            raise StoreError(f"cannot write store {text}, its spec is invalid:\n  - " + "\n  - ".join(problems))
        store = open_zarr_store(url, read_only=False)
        try:
            if overwrite and not is_empty(store):
                try:
                    open_root(store, text)
                except StoreError as err:
                    raise StoreError(f"{err}. overwrite only replaces whistle stores: nothing was deleted; "
                                     "choose another store path") from err
                log.info("overwrite: deleting the existing store %s", text)
                run_sync(store.clear())
            root, spec = cls._create_or_reopen(store, spec, text)
            try:
                root.require_group(SHARDS_GROUP)
            except ContainsGroupError:
                pass  # another rank created it between require_group's check and its write
            except ValueError:  # its zarr.json was cut short (a full disk on a store without atomic writes)
                run_sync(store.delete(f"{SHARDS_GROUP}/zarr.json"))
                root.require_group(SHARDS_GROUP)
        except OSError as err:  # a full disk, no permission, a lost mount
            raise StoreError(f"cannot write store {text}: {err}. Free space or fix the path, then run again "
                             "(complete shards are kept)") from err
        return cls(store, root, spec, text)

    @staticmethod
    def _create_or_reopen(store: Store, spec: StoreSpec, url: str) -> tuple[zarr.Group, StoreSpec]:
        """Reopen the store if its root exists, else create it; safe when all ranks do it at once."""
        for _ in range(ROOT_WAIT_TRIES):
            names = run_sync(_top_level(store))
            leftovers = [name for name in names if name.endswith(".partial")]
            if set(names) == {"zarr.json", *leftovers} and _unreadable(store, "zarr.json"):
                # a creation whose one write was cut short (a full disk on a store without atomic writes)
                log.warning("%s holds only the damaged zarr.json of a creation that did not finish: creating it "
                            "again", url)
                run_sync(store.clear())
                return StoreWriter._create(store, spec, url)
            if "zarr.json" in names:
                return StoreWriter._reopen(store, spec, url)
            if not names:
                return StoreWriter._create(store, spec, url)
            if len(leftovers) != len(names):
                break
            time.sleep(0.1)  # LocalStore writes zarr.json as zarr.<uuid>.partial and renames it a moment later
        else:  # only temporary files, for ROOT_WAIT_TRIES x 0.1 s: left by a creation that was killed
            log.warning("%s holds only temporary files of a creation that did not finish: creating it again", url)
            for name in leftovers:
                run_sync(store.delete(name))
            return StoreWriter._create(store, spec, url)
        raise StoreError(f"{url} is not empty and is not a whistle store (no zarr.json at its top); "
                         "choose a new or empty path for the store")

    @staticmethod
    def _create(store: Store, spec: StoreSpec, url: str) -> tuple[zarr.Group, StoreSpec]:
        attrs = {**spec.to_attrs(), **version_stamp("created"), **version_stamp("updated")}
        try:
            # The attributes go into the group's first and only zarr.json write, so another rank
            # opening the store at the same moment never sees a group without them.
            root = zarr.create_group(store, attributes={ATTRS_KEY: attrs}, overwrite=False)
        except ContainsGroupError:
            return StoreWriter._reopen(store, spec, url)  # another rank created it just now
        log.info("created store %s (format %d, %s frames)", url, attrs["format"], spec.frames)
        return root, spec

    @staticmethod
    def _reopen(store: Store, spec: StoreSpec, url: str) -> tuple[zarr.Group, StoreSpec]:
        root, attrs = open_root(store, url)
        stored = StoreSpec.from_attrs(attrs, url)
        differences = stored.differences(spec)
        if differences:
            raise StoreError(
                f"store {url} was written with a different spec:\n  - " + "\n  - ".join(differences)
                + "\nUse a new store path, or --overwrite to replace this store."
            )
        for name in ("codec", "compression_level", "bitround_keepbits", "chunk_frames"):
            if getattr(stored, name) != getattr(spec, name):
                log.warning("store %s keeps its %s=%r (requested %r applies to new stores only)",
                            url, name, getattr(stored, name), getattr(spec, name))
        root.update_attributes({ATTRS_KEY: {**attrs, **version_stamp("updated")}})
        return root, stored

    def complete_shards(self) -> set[int]:
        """Indices of the shards marked complete (they are skipped on resume)."""
        return {index for index, attrs in shard_attrs(self.root).items() if attrs.get("complete") is True}

    def claim(self, index: int) -> bool:
        """Take shard `index` for this process (idempotent); False when another live process is writing
        it or it is complete. The claim lasts until its ShardWriter closes or this process ends."""
        if index in self._claims:
            return True
        handle = None
        if fcntl is not None and isinstance(self.store, LocalStore):
            folder = os.path.join(str(self.store.root), LOCKS_DIR)
            os.makedirs(folder, exist_ok=True)
            handle = open(os.path.join(folder, shard_name(index)), "a")  # noqa: SIM115 — held until release()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            except OSError as err:
                handle.close()
                if err.errno != errno.ENOLCK:
                    raise
                raise StoreError(
                    f"cannot lock {handle.name}: the file system of store {self.url} has no working file locks "
                    f"({err.strerror}). Mount it with locking (NFSv4, or NFSv3 with lockd; Lustre/GPFS with flock), "
                    "or write the store to a local disk or an object store URL and run one precompute per store "
                    "at a time") from err
        self._claims[index] = handle
        if self._is_complete(index):  # completed by another run since this one listed the shards
            self.release(index)
            return False
        return True

    def release(self, index: int, complete: bool = False) -> None:
        """Give up the claim on shard `index` (ShardWriter does this when it closes or fails)."""
        handle = self._claims.pop(index, None)
        if handle is None:
            return
        if complete:  # no one writes it again: whoever locks the old or a new file next sees it complete
            os.unlink(handle.name)
        handle.close()  # closing the file releases the lock

    def _is_complete(self, index: int) -> bool:
        attrs = read_shard_attrs(self.store, index)
        return attrs is not None and attrs.get("complete") is True

    def shard(self, index: int) -> ShardWriter:
        """A writer for shard `index`, replacing an incomplete shard `index` left by an earlier run.

        Raises ShardBusy when another live process holds the shard (see `claim`)."""
        name = shard_name(index)
        if not self.claim(index):
            state = ("is already complete; skip it (see StoreWriter.complete_shards())" if self._is_complete(index)
                     else "is being written by another process; skip it")
            raise ShardBusy(f"shard {name} of store {self.url} {state}")
        if read_shard_attrs(self.store, index) is not None:  # this shard only: no store listing
            # incomplete (claim checked), and no live process holds it: left by a crashed run
            log.info("deleting incomplete shard %s of %s (it will be written again)", name, self.url)
            run_sync(self.store.delete_dir(f"{SHARDS_GROUP}/{name}"))
        try:
            return ShardWriter(self, index)
        except OSError as err:
            self.release(index)
            raise StoreError(f"starting shard {name} of store {self.url} failed ({err}); free space or fix the "
                             "store, then run again (complete shards are kept)") from err

    def write_record(self, name: str, data: dict[str, Any]) -> None:
        """Store a JSON run record (e.g. "precompute.json") in the store root, replacing an older one."""
        if not RECORD_NAME.match(name) or name == "zarr.json":
            raise ValueError(f"record name must look like 'precompute.json' (letters, digits, ._-), got {name!r}")
        try:
            write_json(self.store, name, data)
        except OSError as err:
            raise StoreError(f"writing the run record {name} of store {self.url} failed ({err}); the shards are "
                             "written: free space and run again to rewrite it") from err


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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._record is None:
            self._summer.shutdown(cancel_futures=True)
            self._states.clear()
            try:
                run_sync(self.writer.store.delete_dir(f"{SHARDS_GROUP}/{self.name}"))
            finally:
                self.writer.release(self.index)

    def add(self, id: str, text: str, language: str, duration_s: float, states: np.ndarray,
            tail: np.ndarray | None = None, *, speech_frames: int | None = None, summed: bool = False) -> bool:
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
            raise ValueError(f"utterance {id!r} (shard {self.name}): summed is for speech-frames stores and "
                             "replaces the tail argument")
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

    def add_sums(self, tail_sum: np.ndarray, tail_count: np.ndarray, stat_sum: np.ndarray, stat_sqsum: np.ndarray,
                 stat_count: int) -> None:
        """Add sums made by the caller over utterances added with `summed=True` (precompute: one batch, on the GPU).

        tail_sum (max_frames, D): the sum of their states at each window position p >= their speech frames;
        tail_count (max_frames,): how many utterances each position sums; stat_sum, stat_sqsum (D,): per-channel
        sums of their speech frames and of their squares; stat_count: their speech frames. Sums float32 or
        float64. close() refuses a shard whose counts disagree with the utterances added so.
        """
        if self._record is not None:
            raise RuntimeError(f"shard {self.name} is closed")
        shapes = {"tail_sum": (self.max_frames, self.d_model), "stat_sum": (self.d_model,),
                  "stat_sqsum": (self.d_model,)}
        sums = {"tail_sum": np.asarray(tail_sum), "stat_sum": np.asarray(stat_sum), "stat_sqsum": np.asarray(stat_sqsum)}
        for name, values in sums.items():
            if values.shape != shapes[name] or values.dtype not in (np.float32, np.float64):
                raise ValueError(f"shard {self.name}: {name} must be {shapes[name]} float32 or float64, got "
                                 f"{values.shape} {values.dtype}")
        tail_count = np.asarray(tail_count)
        if tail_count.shape != (self.max_frames,) or tail_count.dtype.kind not in "iu":
            raise ValueError(f"shard {self.name}: tail_count must be ({self.max_frames},) integers, got "
                             f"{tail_count.shape} {tail_count.dtype}")
        counts = np.append(tail_count, int(stat_count))  # (M + 1,)
        self._pending.append(self._summer.submit(self._add_sums, *(v.copy() for v in sums.values()), counts))

    def _add_sums(self, tail_sum: np.ndarray, stat_sum: np.ndarray, stat_sqsum: np.ndarray, counts: np.ndarray) -> None:
        self._tail_sum += tail_sum
        self._stat_sum += stat_sum
        self._stat_sqsum += stat_sqsum
        self._stat_count += int(counts[-1])
        self._summed_given += counts

    def _check_shapes(self, id: str, duration_s: float, states: np.ndarray, tail: np.ndarray | None,
                      speech_frames: int | None, summed: bool) -> int:
        """The number of speech frames, after checking shapes and dtypes against the spec."""
        where = f"utterance {id!r} (shard {self.name})"
        if states.ndim != 2 or states.shape[1] != self.d_model or states.dtype != np.float16:
            raise ValueError(f"{where}: states must be (T, {self.d_model}) float16, got {states.shape} {states.dtype}")
        n_rows = states.shape[0]
        if self.spec.frames == "full":
            if n_rows != self.max_frames or tail is not None:
                raise ValueError(f"{where}: full-frames store needs states ({self.max_frames}, {self.d_model}) "
                                 f"and no tail, got {states.shape} and tail={tail is not None}")
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
            raise ValueError(f"{where}: speech-frames store needs the tail ({tail_rows}, {self.d_model}) "
                             "for the tail template")
        if tail is not None:
            tail = np.asarray(tail)
            if tail.shape != (tail_rows, self.d_model) or tail.dtype != np.float16:
                raise ValueError(f"{where}: tail must be ({tail_rows}, {self.d_model}) float16, "
                                 f"got {tail.shape} {tail.dtype}")
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
            raise StoreError(f"writing shard {self.name} of store {self.writer.url} failed ({type(err).__name__}: "
                             f"{err}); it stays incomplete and is rewritten on the next run") from err
        self._record = record
        self.writer.release(self.index, complete=True)
        return record

    def _write(self) -> ShardRecord:
        while self._pending:
            self._pending.popleft().result()
        self._summer.shutdown()
        if not np.array_equal(self._summed_expected, self._summed_given):
            raise ValueError(f"the sums given with add_sums cover {self._summed_given[-1]} speech frames and "
                             f"{self._summed_given[:-1].sum()} tail positions; the utterances added with summed=True "
                             f"have {self._summed_expected[-1]} and {self._summed_expected[:-1].sum()}")
        n = len(self._ids)
        speech_frames = np.asarray(self._speech_frames, np.int32)  # (n,)
        lengths = [len(states) for states in self._states]
        offsets = np.zeros(n + 1, np.int64)  # (n + 1,)
        np.cumsum(lengths, out=offsets[1:])
        n_frames = int(offsets[-1])
        chunk = self.spec.chunk_frames
        shard_rows = max(1, -(-n_frames // chunk)) * chunk  # one shard object holds the whole array
        group = self._group
        array = group.create_array(
            "states", shape=(n_frames, self.d_model), dtype=np.float16, chunks=(chunk, self.d_model),
            shards=(shard_rows, self.d_model), fill_value=0, config={"write_empty_chunks": True},
            **states_codecs(self.spec),
        )
        if n_frames and direct_compression(array) is not None:
            # The shard object made here, as zarr's sharding codec makes it (same bytes), in one store write:
            # zarr would first join the states and assemble every chunk through its buffers.
            key = f"{SHARDS_GROUP}/{self.name}/states/{array.metadata.encode_chunk_key((0, 0))}"
            shard_object = encode_shard_object(self._states, self.d_model, chunk, states_compressor(self.spec))
            run_sync(self.writer.store.set(key, default_buffer_prototype().buffer.from_bytes(shard_object)))
            del shard_object
        elif n_frames:
            array[...] = np.concatenate(self._states)  # (n_frames, D), one write: the whole shard object
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
        group.update_attributes({
            "n": n, "n_frames": n_frames, "audio_seconds": audio_seconds, "rejects": self._rejects,
            **version_stamp("written"), "complete": True,
        })
        nbytes = run_sync(self.writer.store.getsize_prefix(f"{SHARDS_GROUP}/{self.name}"))
        log.debug("shard %s: %d utterances, %d frames, %d rejects, %d bytes", self.name, n, n_frames,
                  len(self._rejects), nbytes)
        return ShardRecord(self.index, n, n_frames, len(self._rejects), nbytes, audio_seconds)


def _unreadable(store: Store, key: str) -> bool:
    try:
        read_json(store, key)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return True
    return False


async def _top_level(store: Store) -> list[str]:
    try:
        return [name async for name in store.list_dir("")]
    except FileNotFoundError:
        return []


def _finite(values: np.ndarray) -> bool:
    """No inf/nan in float16 `values`, tested on the bits (6x faster than np.isfinite on float16)."""
    return not ((values.view(np.uint16) & FLOAT16_EXPONENT) == FLOAT16_EXPONENT).any()


def _write_whole(group: zarr.Group, name: str, data: np.ndarray, dtype: Any = None) -> None:
    """A small array as a single chunk, written in one call (even when all zeros: readers check it exists)."""
    array = group.create_array(name, shape=data.shape, dtype=dtype or data.dtype,
                               chunks=tuple(max(1, size) for size in data.shape), config={"write_empty_chunks": True})
    if data.size:
        array[...] = data
