"""The feature store against what users would otherwise write, for the same states on the same disk.

Large-v3-shaped teacher states (d_model 1280, float16, 1500-frame windows) of a Common-Voice-like
length mix (log-normal around 5 s, clipped to 2-15 s), written and read back by:

  whistle-speech   the store, speech frames + tail template (the default), through precompute's own
                   BackgroundWriter as precompute feeds it: speech frames (ShardWriter.add(summed=True))
                   and one set of tail + statistics sums per batch of 16 (add_sums; precompute makes them
                   on the GPU with stages.precompute_device.batch_sums, so here they are made before the clock
                   starts); shard close on 2 threads; blosc-zstd. Its writes are also timed the way
                   precompute wrote before (every tail handed to ShardWriter.add, all sums made on the
                   writer threads): the before/after.
  whistle-full     the store's "full" mode (every 1500-frame window)
  npy-*            one .npy file per utterance (np.save / np.load) + a manifest.jsonl
  arrow-*          Hugging Face datasets: Dataset.from_generator with an Array2D(float16) column (memory-
                   mapped Arrow files); read zero-copy through with_format("arrow"), its fastest path
                   (with_format("numpy") returns float32 copies: measured too, see arrow_numpy_*)
  tar-*            WebDataset-style tar shards ({key}.npy + {key}.json members; read as a stream, random
                   access through a member-offset index built once per shard, as wids does)

Every read lands in a Batch: each utterance's values are copied into one reused float16 buffer, as a
collate function does, so a memory-mapped zero-copy format (Arrow) pays for reading all its bytes as
much as one that decodes into fresh memory. whistle-speech is also read through zarr's own sharding
codec (StoreReader(direct=False), how the store read before its direct path): the read before/after.

"-full" variants store whole windows, "-speech" variants only the speech frames (the best a user could
do with that format; they then lack the tail template a decoder needs). Measured, each the median of
--repeats: write clips/s, streaming read utterances/s from the page cache (warm) and from the disk
(cold: the files are flushed and dropped from the page cache first, as for a store larger than RAM),
random-utterance latency (warm and cold), bytes on disk and files created. Writes, reads and sizes
are in raw float16 bytes (1 MB = 10^6 B) of what each format keeps. Sizes for 5 s clips come from a
separate whistle-speech store of 5 s clips in one full default shard (1024 utterances).

The goals of issue 8 are checked at the end: whistle-speech >= 5x smaller than every full-window
format for 5 s clips; its streaming read >= 1.0x the fastest alternative's (utterances/s); its
writes >= 2x the clips/s one GPU process of precompute produces (large-v3, from the encoder FLOPs
and an H100's bf16 peak at --gpu-mfu, or --gpu-clips-per-s measured with bench/precompute.py).

The checksum cost (format 1.1: every array of a shard, not only the states, ends in a crc32c) is measured in
the same run on a whistle-speech store of the length mix: writing a shard's small arrays (offsets ... the
tail and statistics sums) with crc32c and without (format 1.0's codecs: zarr's default Zstd alone), beside
the whole shard's write; and reading the store back as written and after its small arrays are rewritten
without checksums: streaming every shard's index and states (training's reads), and the tail template and
statistics from every shard's sums (computed once per shard set, then cached): the before/after.

Random normal states compress a little worse than real encoder outputs (~1.07x with zstd on real
tiny.en states, docs/design.md, "The feature store"): sizes of compressed formats are an upper bound.

    python bench/store_compare.py                      # 192 utterances, 3 repeats
    python bench/store_compare.py --quick              # a smoke run
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
import zarr
from _common import (
    MAX_FRAMES,
    clip_seconds,
    describe_machine,
    emit,
    encoder_flops,
    evict,
    files_and_bytes,
    median,
    speech_frames,
    table,
    whisper_config,
)
from datasets import Array2D, Dataset, Features, Value, concatenate_datasets, disable_progress_bars

from stages.background_writer import BackgroundWriter  # imported here: torch's import must not count as writing
from stages.precompute_device import batch_sums
from store import StoreReader, StoreSpec, StoreWriter, TeacherInfo
from store.format import checked_compressors
from store.reader import INDEX_ARRAYS
from store.reduction import SUM_ARRAYS, compute_reduction

D_MODEL = 1280
POOL_FRAMES = 20_000  # distinct random frames the windows are cut from (~51 MB)
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM datasheet, dense bf16 tensor cores
WRITE_THREADS = 2  # precompute.write_threads default
WRITE_QUEUE = 2  # precompute.write_queue default
READ_BATCH = 16  # rows per Arrow record batch read
PRECOMPUTE_BATCH = 16  # precompute.batch_size default: clips per tail sum


@dataclass
class Corpus:
    """`n` utterances: windows cut from a pool of random frames, speech lengths from the length mix."""

    pool: np.ndarray  # (POOL_FRAMES, D) float16
    starts: np.ndarray  # (n,)
    frames: np.ndarray  # (n,) speech frames
    seconds: np.ndarray  # (n,)

    @classmethod
    def make(cls, seconds: np.ndarray, rng: np.random.Generator) -> Corpus:
        pool = rng.standard_normal((POOL_FRAMES, D_MODEL), dtype=np.float32).astype(np.float16)
        return cls(pool, rng.integers(0, POOL_FRAMES - MAX_FRAMES, len(seconds)), speech_frames(seconds), seconds)

    def __len__(self) -> int:
        return len(self.frames)

    def window(self, i: int) -> np.ndarray:
        return self.pool[self.starts[i] : self.starts[i] + MAX_FRAMES]  # (1500, D)

    def key(self, i: int) -> str:
        return f"utt{i:06d}"

    def text(self, i: int) -> str:
        return f"synthetic transcript of utterance {i}"

    def kept(self, i: int, full: bool) -> np.ndarray:
        return self.window(i) if full else self.window(i)[: self.frames[i]]

    def batch_sums(self, shard_size: int) -> dict[int, dict[str, np.ndarray]]:
        """Batch start -> ShardWriter.add_sums arguments, for batches of PRECOMPUTE_BATCH clips within each shard,
        made by precompute's own batch_sums (on this CPU: the GPU's work in a real run)."""
        out = {}
        for first in range(0, len(self), shard_size):
            for start in range(first, min(len(self), first + shard_size), PRECOMPUTE_BATCH):
                rows = range(start, min(len(self), first + shard_size, start + PRECOMPUTE_BATCH))
                windows = torch.from_numpy(np.stack([self.window(i) for i in rows]))  # (B, M, D) float16
                _, sums = batch_sums(windows, [int(self.frames[i]) for i in rows], [0] * len(rows))
                out[start] = {name: values.numpy() for name, values in sums[0].items()}
        return out


# --- the formats ----------------------------------------------------------------------------------------
# Each: write(corpus, path, shard_size); stream(path) -> Iterator[(T, D) float16]; opener(path) -> read(k).


class Whistle:
    def __init__(self, frames: str, codec: str = "blosc-zstd"):
        self.name = f"whistle-{frames}" + ("" if codec == "blosc-zstd" else f" ({codec})")
        self.full, self.codec = frames == "full", codec

    def spec(self, shard_size: int) -> StoreSpec:
        teacher = TeacherInfo("openai/whisper-large-v3", "main", D_MODEL, 128, 16000, 320, 50, MAX_FRAMES)
        return StoreSpec(
            teacher, "full" if self.full else "speech", 2, shard_size, 2048, self.codec, 3, 0, "bench", "none"
        )

    def write(
        self, corpus: Corpus, path: Path, shard_size: int, sums: dict[int, dict[str, np.ndarray]] | None = None
    ) -> None:
        """`sums` (Corpus.batch_sums) given: as precompute writes now; None: each tail to ShardWriter.add."""
        writer = BackgroundWriter(StoreWriter.open(path, self.spec(shard_size)), WRITE_THREADS, WRITE_QUEUE)
        for i in range(len(corpus)):
            window, frames = corpus.window(i), int(corpus.frames[i])
            if sums is not None and i in sums:
                writer.add_sums(i // shard_size, **sums[i])
            summed = sums is not None and not self.full
            writer.add(
                i // shard_size,
                id=corpus.key(i),
                text=corpus.text(i),
                language="en",
                duration_s=float(corpus.seconds[i]),
                states=window if self.full else window[:frames],
                tail=None if self.full or summed else window[frames:],
                speech_frames=frames,
                summed=summed,
            )
            if (i + 1) % shard_size == 0 or i + 1 == len(corpus):
                writer.close(i // shard_size)
        writer.finish()

    def stream(self, path: Path) -> Iterator[np.ndarray]:
        reader = StoreReader(path)
        for shard in reader.shards():
            for utt in reader.iter_shard(shard):
                yield utt.states

    def opener(self, path: Path) -> Callable[[int], np.ndarray]:
        reader = StoreReader(path)
        shard_size = reader.spec.shard_size
        return lambda k: reader.utterance(k // shard_size, k % shard_size).states

    def stream_zarr(self, path: Path) -> Iterator[np.ndarray]:
        """The same stream with every states read through zarr's sharding codec (StoreReader(direct=False)):
        how the store read before the direct path."""
        reader = StoreReader(path, direct=False)
        for shard in reader.shards():
            for utt in reader.iter_shard(shard):
                yield utt.states


class Npy:
    def __init__(self, full: bool):
        self.name, self.full = f"npy-{'full' if full else 'speech'}", full

    def write(self, corpus: Corpus, path: Path, shard_size: int) -> None:
        path.mkdir(parents=True)
        rows = []
        for i in range(len(corpus)):
            np.save(path / f"{corpus.key(i)}.npy", corpus.kept(i, self.full))
            rows.append(
                {
                    "id": corpus.key(i),
                    "text": corpus.text(i),
                    "duration": float(corpus.seconds[i]),
                    "speech_frames": int(corpus.frames[i]),
                }
            )
        (path / "manifest.jsonl").write_text("\n".join(json.dumps(row) for row in rows))

    def _ids(self, path: Path) -> list[str]:
        return [json.loads(line)["id"] for line in (path / "manifest.jsonl").read_text().splitlines()]

    def stream(self, path: Path) -> Iterator[np.ndarray]:
        for utt_id in self._ids(path):
            yield np.load(path / f"{utt_id}.npy")

    def opener(self, path: Path) -> Callable[[int], np.ndarray]:
        ids = self._ids(path)
        return lambda k: np.load(path / f"{ids[k]}.npy")


class Arrow:
    def __init__(self, full: bool):
        self.name, self.full = f"arrow-{'full' if full else 'speech'}", full

    def write(self, corpus: Corpus, path: Path, shard_size: int) -> None:
        features = Features(
            {
                "id": Value("string"),
                "text": Value("string"),
                "duration": Value("float32"),
                "speech_frames": Value("int32"),
                "states": Array2D(shape=(MAX_FRAMES if self.full else None, D_MODEL), dtype="float16"),
            }
        )

        def rows():
            for i in range(len(corpus)):
                yield {
                    "id": corpus.key(i),
                    "text": corpus.text(i),
                    "duration": float(corpus.seconds[i]),
                    "speech_frames": int(corpus.frames[i]),
                    "states": corpus.kept(i, self.full),
                }

        Dataset.from_generator(rows, features=features, cache_dir=str(path))

    def _dataset(self, path: Path):
        return concatenate_datasets([Dataset.from_file(str(f)) for f in sorted(path.rglob("*.arrow"))])

    def stream(self, path: Path) -> Iterator[np.ndarray]:
        for batch in self._dataset(path).with_format("arrow").iter(batch_size=READ_BATCH):
            yield from arrow_states(batch)

    def stream_numpy(self, path: Path) -> Iterator[np.ndarray]:
        """The documented numpy path (float16 comes back as float32 copies)."""
        for batch in self._dataset(path).with_format("numpy").iter(batch_size=READ_BATCH):
            yield from batch["states"]

    def opener(self, path: Path) -> Callable[[int], np.ndarray]:
        dataset = self._dataset(path).with_format("arrow")
        return lambda k: next(arrow_states(dataset[k : k + 1]))


def arrow_states(batch) -> Iterator[np.ndarray]:
    """The float16 (T, D) arrays of an Arrow batch's Array2D column, zero-copy (list<list<halffloat>>)."""
    for chunk in batch.column("states").chunks:
        rows = chunk.storage  # list<list<halffloat>>, maybe a slice: its offsets index the unsliced child
        frames = rows.values  # list<halffloat>, one entry per frame
        values = frames.values.to_numpy(zero_copy_only=True)  # every float16 of the child
        row_offsets, frame_offsets = rows.offsets.to_numpy(), frames.offsets.to_numpy()
        for r in range(len(rows)):
            first, stop = frame_offsets[row_offsets[r]], frame_offsets[row_offsets[r + 1]]
            yield values[first:stop].reshape(-1, D_MODEL)


class Tar:
    def __init__(self, full: bool):
        self.name, self.full = f"tar-{'full' if full else 'speech'}", full

    def write(self, corpus: Corpus, path: Path, shard_size: int) -> None:
        path.mkdir(parents=True)
        for first in range(0, len(corpus), shard_size):
            with tarfile.open(path / f"shard-{first // shard_size:05d}.tar", "w") as tar:
                for i in range(first, min(len(corpus), first + shard_size)):
                    buffer = io.BytesIO()
                    np.save(buffer, corpus.kept(i, self.full))
                    meta = json.dumps(
                        {
                            "text": corpus.text(i),
                            "duration": float(corpus.seconds[i]),
                            "speech_frames": int(corpus.frames[i]),
                        }
                    ).encode()
                    for suffix, data in (("npy", buffer.getvalue()), ("json", meta)):
                        info = tarfile.TarInfo(f"{corpus.key(i)}.{suffix}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))

    def stream(self, path: Path) -> Iterator[np.ndarray]:
        for shard in sorted(path.glob("*.tar")):
            with tarfile.open(shard, "r|") as tar:  # a pure stream, as WebDataset reads
                for member in tar:
                    if member.name.endswith(".npy"):
                        yield np.load(io.BytesIO(tar.extractfile(member).read()))

    def opener(self, path: Path) -> Callable[[int], np.ndarray]:
        index = []  # (tar file, data offset, size) per utterance, in key order
        for shard in sorted(path.glob("*.tar")):
            with tarfile.open(shard) as tar:
                index += [(shard, m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".npy")]

        def read(k: int) -> np.ndarray:
            shard, offset, size = index[k]
            with open(shard, "rb") as handle:
                handle.seek(offset)
                return np.load(io.BytesIO(handle.read(size)))

        return read


FORMATS = [
    Whistle("speech"),
    Whistle("speech", "blosc-lz4"),
    Whistle("speech", "none"),
    Whistle("full"),
    Npy(False),
    Npy(True),
    Arrow(False),
    Arrow(True),
    Tar(False),
    Tar(True),
]


# --- measuring -------------------------------------------------------------------------------------------


class Batch:
    """Where a reader's utterances land, as in a collate function: every value of every utterance is copied
    into one reused float16 buffer. So each format pays for all of its bytes once — a memory-mapped zero-copy
    view (Arrow) as much as an array decoded into fresh memory (whistle, npy, tar) — and none pays for
    allocating the destination."""

    def __init__(self) -> None:
        self.buffer = np.empty((MAX_FRAMES, D_MODEL), np.float16)  # (max_frames, D)

    def take(self, states: np.ndarray) -> None:
        if states.dtype != np.float16 or states.shape[1:] != (D_MODEL,):
            raise RuntimeError(f"a reader returned {states.dtype} {states.shape}, not float16 (T, {D_MODEL})")
        self.buffer[: len(states)] = states


def stream_seconds(stream: Callable[[], Iterator[np.ndarray]], n: int, batch: Batch | None = None) -> float:
    """Seconds to read every utterance once into a Batch (float32 readers: converted, as a loader would);
    checks the count."""
    batch = batch or Batch()
    began = time.perf_counter()
    count = 0
    for states in stream():
        batch.take(states.astype(np.float16, copy=False))
        count += 1
    seconds = time.perf_counter() - began
    if count != n:
        raise RuntimeError(f"read {count} utterances, wrote {n}")
    return seconds


def random_latencies(opener: Callable[[], Callable[[int], np.ndarray]], picks: np.ndarray) -> tuple[float, list[float]]:
    """(seconds to open for random access, seconds per random read)."""
    began = time.perf_counter()
    read = opener()
    opened = time.perf_counter() - began
    latencies = []
    batch = Batch()
    for k in picks:
        began = time.perf_counter()
        batch.take(read(int(k)))
        latencies.append(time.perf_counter() - began)
    return opened, latencies


def measure(
    fmt,
    corpus: Corpus,
    root: Path,
    shard_size: int,
    repeats: int,
    picks: np.ndarray,
    sums: dict[int, dict[str, np.ndarray]],
) -> dict[str, float]:
    path = root / fmt.name
    stored = sum(int(corpus.kept(i, fmt.full).nbytes) for i in range(len(corpus)))
    writes, warm, cold, warm_random, cold_random, opens, numpy_reads, zarr_warm, zarr_cold, host_tail_writes = (
        [] for _ in range(10)
    )
    speech_store = isinstance(fmt, Whistle) and not fmt.full
    for _ in range(repeats):
        if speech_store:  # the write as precompute did it before: tails summed on the writer threads
            shutil.rmtree(path, ignore_errors=True)
            began = time.perf_counter()
            fmt.write(corpus, path, shard_size)
            host_tail_writes.append(time.perf_counter() - began)
        shutil.rmtree(path, ignore_errors=True)
        began = time.perf_counter()
        if speech_store:
            fmt.write(corpus, path, shard_size, sums)
        else:
            fmt.write(corpus, path, shard_size)
        writes.append(time.perf_counter() - began)
        stream_seconds(lambda: fmt.stream(path), len(corpus))  # page cache warm
        warm.append(stream_seconds(lambda: fmt.stream(path), len(corpus)))
        if isinstance(fmt, Arrow):
            numpy_reads.append(stream_seconds(lambda: fmt.stream_numpy(path), len(corpus)))
        if speech_store:
            zarr_warm.append(stream_seconds(lambda: fmt.stream_zarr(path), len(corpus)))
            evict(path)
            zarr_cold.append(stream_seconds(lambda: fmt.stream_zarr(path), len(corpus)))
        opened, latencies = random_latencies(lambda: fmt.opener(path), picks)
        warm_random += latencies
        evict(path)
        cold.append(stream_seconds(lambda: fmt.stream(path), len(corpus)))
        evict(path)
        opened, latencies = random_latencies(lambda: fmt.opener(path), picks)
        opens.append(opened)
        cold_random += latencies
    files, on_disk = files_and_bytes(path)
    shutil.rmtree(path, ignore_errors=True)
    n = len(corpus)
    out = {
        "files": files,
        "bytes": on_disk,
        "bytes_per_utt": on_disk / n,
        "write_clips_per_s": n / median(writes),
        "write_mb_s": stored / 1e6 / median(writes),
        "warm_utt_per_s": n / median(warm),
        "warm_mb_s": stored / 1e6 / median(warm),
        "cold_utt_per_s": n / median(cold),
        "cold_mb_s": stored / 1e6 / median(cold),
        "open_ms": 1e3 * median(opens),
        "random_warm_ms": 1e3 * median(warm_random),
        "random_warm_p95_ms": 1e3 * float(np.percentile(warm_random, 95)),
        "random_cold_ms": 1e3 * median(cold_random),
    }
    if numpy_reads:
        out["numpy_format_warm_utt_per_s"] = n / median(numpy_reads)
    if host_tail_writes:
        out["write_host_tails_clips_per_s"] = n / median(host_tail_writes)
    if zarr_warm:
        out["zarr_path_warm_utt_per_s"], out["zarr_path_cold_utt_per_s"] = n / median(zarr_warm), n / median(zarr_cold)
    return out


def writer_profile(corpus: Corpus, repeats: int) -> list[tuple[str, float]]:
    """Per clip, the host work ShardWriter does for one utterance (the numpy operations of store/shard_writer.py's
    add, _sum, add_sums and close, timed one by one on the same windows): before (each tail handed to
    add) and now (tails summed per batch where the encoder runs, only speech frames reach the host)."""
    import numcodecs

    n = min(len(corpus), 64)
    windows = [corpus.window(i) for i in range(n)]
    frames = [int(f) for f in corpus.frames[:n]]
    tail_sum = np.zeros((MAX_FRAMES, D_MODEL), np.float64)
    stat_sum, stat_sqsum = np.zeros(D_MODEL, np.float64), np.zeros(D_MODEL, np.float64)
    blosc, crc = numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE), numcodecs.CRC32C()
    speech = np.concatenate([w[:f] for w, f in zip(windows, frames)])  # (frames, D)

    def finite(values: np.ndarray) -> bool:  # store/shard_writer.py _finite
        return not ((values.view(np.uint16) & 0x7C00) == 0x7C00).any()

    def stat_sums():
        for w, f in zip(windows, frames):
            x = w[:f].astype(np.float64)
            stat_sum.__iadd__(x.sum(axis=0))
            stat_sqsum.__iadd__(np.einsum("td,td->d", x, x))

    def tail_sums():
        for w, f in zip(windows, frames):
            tail_sum[f:] += w[f:]

    batch_sum = np.ones((MAX_FRAMES, D_MODEL), np.float32)

    def batch_tail_sums():  # ShardWriter._add_sums: one (M, D) float32 sum per batch of PRECOMPUTE_BATCH clips
        for _ in range(-(-n // PRECOMPUTE_BATCH)):
            tail_sum.__iadd__(batch_sum.copy())

    steps = [
        (
            "finite check of speech + tail (whole window)",
            lambda: [finite(w[:f]) and finite(w[f:]) for w, f in zip(windows, frames)],
        ),
        (
            "copies of speech + tail (whole window)",
            lambda: [(w[:f].copy(), w[f:].copy()) for w, f in zip(windows, frames)],
        ),
        ("statistics sums (float64, speech frames)", stat_sums),
        ("tail-template sum (float64, frames after speech)", tail_sums),
        (
            "compress speech frames (Blosc zstd-3 + crc32c)",
            lambda: [crc.encode(blosc.encode(speech[i : i + 2048])) for i in range(0, len(speech), 2048)],
        ),
        (
            "finite check + copy of speech frames only",
            lambda: [finite(w[:f]) and w[:f].copy() for w, f in zip(windows, frames)],
        ),
        (f"add_sums: one batch's sums per {PRECOMPUTE_BATCH} clips (float32 -> float64)", batch_tail_sums),
    ]
    out = []
    for name, function in steps:
        function()
        seconds = []
        for _ in range(max(repeats, 3)):
            began = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - began)
        out.append((name, 1e3 * median(seconds) / n))
    return out


SMALL_ARRAYS = INDEX_ARRAYS + SUM_ARRAYS  # every array of a shard but states


def write_small_arrays(group: zarr.Group, arrays: dict[str, np.ndarray], checksums: bool) -> None:
    """A shard's small arrays written as ShardWriter writes them (one chunk each, in one call), with crc32c
    (format 1.1) or with zarr's default codecs alone (format 1.0)."""
    for name, values in arrays.items():
        array = group.create_array(
            name,
            shape=values.shape,
            dtype=str if values.dtype.kind in "OTU" else values.dtype,
            chunks=tuple(max(1, size) for size in values.shape),
            compressors=checked_compressors() if checksums else "auto",
            config={"write_empty_chunks": True},
            overwrite=True,
        )
        if values.size:
            array[...] = values


def stream_all(path: Path) -> float:
    """Seconds to read every utterance of a store as training does (each shard's index, then its states)."""
    began = time.perf_counter()
    reader = StoreReader(path)
    batch = Batch()
    for shard in reader.shards():
        for utt in reader.iter_shard(shard):
            batch.take(utt.states)
    return time.perf_counter() - began


def reduce_all(path: Path) -> float:
    """Seconds to compute the tail template and statistics from every shard's sums (what the cache then keeps)."""
    began = time.perf_counter()
    reader = StoreReader(path)
    compute_reduction(reader.root, reader.url, reader.teacher, reader.shards())
    return time.perf_counter() - began


def checksum_cost(
    corpus: Corpus, root: Path, shard_size: int, repeats: int, sums: dict[int, dict[str, np.ndarray]]
) -> dict[str, float]:
    """Format 1.1's crc32c on every small array against format 1.0 (see the module docstring): milliseconds per
    shard to write its small arrays each way, beside a whole shard's write; reads of the store each way. The
    two ways alternate, so that both see the same machine."""
    checked, unchecked = root / "checksum-cost-1.1", root / "checksum-cost-1.0"
    began = time.perf_counter()
    Whistle("speech").write(corpus, checked, shard_size, sums)
    shard_seconds = (time.perf_counter() - began) / -(-len(corpus) // shard_size)
    shutil.copytree(checked, unchecked)
    shards = sorted((unchecked / "shards").glob("0*"))
    arrays = [{name: zarr.open_array(str(shard / name), mode="r")[...] for name in SMALL_ARRAYS} for shard in shards]
    for shard, values in zip(shards, arrays):  # the same store as format 1.0 wrote it
        group = zarr.open_group(str(shard), mode="r+")
        write_small_arrays(group, values, checksums=False)
        for key in ("format_minor", "write_id"):
            del group.attrs[key]
    scratch = zarr.open_group(str(root / "small-arrays"), mode="w")
    writes: dict[bool, list[float]] = {True: [], False: []}
    streams: dict[bool, list[float]] = {True: [], False: []}
    reductions: dict[bool, list[float]] = {True: [], False: []}
    for path in (checked, unchecked):  # page cache warm
        stream_all(path), reduce_all(path)
    for _ in range(max(3 * repeats, 10)):  # short measurements on a shared machine: many rounds, medians
        for checksums in (False, True):
            began = time.perf_counter()
            for values in arrays:
                write_small_arrays(scratch, values, checksums)
            writes[checksums].append((time.perf_counter() - began) / len(arrays))
            streams[checksums].append(stream_all(checked if checksums else unchecked))
            reductions[checksums].append(reduce_all(checked if checksums else unchecked))
    for path in (checked, unchecked, root / "small-arrays"):
        shutil.rmtree(path)
    return {
        "small_arrays_write_ms_per_shard_crc32c": 1e3 * median(writes[True]),
        "small_arrays_write_ms_per_shard_no_crc32c": 1e3 * median(writes[False]),
        "shard_write_ms": 1e3 * shard_seconds,
        "stream_utt_per_s_crc32c": len(corpus) / median(streams[True]),
        "stream_utt_per_s_no_crc32c": len(corpus) / median(streams[False]),
        "reduction_ms_per_shard_crc32c": 1e3 * median(reductions[True]) / len(shards),
        "reduction_ms_per_shard_no_crc32c": 1e3 * median(reductions[False]) / len(shards),
    }


def whistle_five_second_bytes(root: Path, n: int, shard_size: int, rng: np.random.Generator) -> float:
    """Bytes per utterance of a whistle-speech store of 5 s clips in one full shard (overhead amortised as
    in a real store)."""
    corpus = Corpus.make(np.full(n, 5.0), rng)
    path = root / "whistle-speech-5s"
    Whistle("speech").write(corpus, path, shard_size)
    _, on_disk = files_and_bytes(path)
    shutil.rmtree(path)
    return on_disk / n


@click.command()
@click.option("--utterances", default=192, show_default=True, help="Utterances of the length mix.")
@click.option(
    "--shard-size",
    default=192,
    show_default=True,
    help="Utterances per whistle shard and per tar (whistle's default is 1024).",
)
@click.option(
    "--five-second-utterances",
    default=1024,
    show_default=True,
    help="5 s clips in the store whose size per utterance is compared (one full default shard).",
)
@click.option("--repeats", default=3, show_default=True)
@click.option("--random-reads", default=32, show_default=True, help="Random utterances read per repeat.")
@click.option(
    "--gpu-clips-per-s",
    type=float,
    default=None,
    help="Clips/s of one GPU precompute process (default: large-v3 FLOPs at --gpu-mfu of an H100's peak).",
)
@click.option("--gpu-mfu", default=0.5, show_default=True, help="Assumed fraction of the H100 bf16 peak.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where to write (default: /tmp).")
@click.option("--seed", default=0, show_default=True)
@click.option("--quick", is_flag=True, help="16 utterances, one repeat: a smoke run.")
def main(
    utterances,
    shard_size,
    five_second_utterances,
    repeats,
    random_reads,
    gpu_clips_per_s,
    gpu_mfu,
    workdir,
    seed,
    quick,
) -> None:
    if quick:
        utterances, shard_size, five_second_utterances, repeats, random_reads = 16, 8, 16, 1, 4
    click.echo(describe_machine())
    disable_progress_bars()
    rng = np.random.default_rng(seed)
    corpus = Corpus.make(clip_seconds(utterances, rng), rng)
    picks = rng.integers(0, utterances, random_reads)
    root = Path(tempfile.mkdtemp(prefix="whistle-bench-", dir=workdir))
    try:
        results = {}
        sums = corpus.batch_sums(shard_size)
        for fmt in FORMATS:
            results[fmt.name] = measure(fmt, corpus, root, shard_size, repeats, picks, sums)
            click.echo(f"  measured {fmt.name}", err=True)
        five_second = whistle_five_second_bytes(root, five_second_utterances, five_second_utterances, rng)
        profile = writer_profile(corpus, repeats)
        checksums = checksum_cost(corpus, root, shard_size, repeats, sums)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gpu_rate = gpu_clips_per_s or gpu_mfu * H100_BF16_DENSE_TFLOPS * 1e12 / encoder_flops(whisper_config("large-v3"))
    ours = results["whistle-speech"]
    full_formats = [name for name, fmt in zip(results, FORMATS) if fmt.full]
    alternatives = [name for name in results if not name.startswith("whistle")]
    smallest_full = min(results[name]["bytes_per_utt"] for name in full_formats)
    fastest_warm = max(alternatives, key=lambda name: results[name]["warm_utt_per_s"])
    fastest_cold = max(alternatives, key=lambda name: results[name]["cold_utt_per_s"])

    click.echo(
        f"\n{utterances} utterances of {corpus.seconds.min():.1f}-{corpus.seconds.max():.1f} s (mean "
        f"{corpus.seconds.mean():.1f} s, {corpus.frames.mean():.0f} speech frames), d_model {D_MODEL} float16; "
        f"{repeats} repeat(s), medians; shards of {shard_size}"
    )
    click.echo(
        table(
            ["format", "files", "MB on disk", "MB/utt", "x whistle-speech", "write clips/s", "write MB/s"],
            [
                [
                    name,
                    r["files"],
                    r["bytes"] / 1e6,
                    r["bytes_per_utt"] / 1e6,
                    r["bytes"] / ours["bytes"],
                    r["write_clips_per_s"],
                    r["write_mb_s"],
                ]
                for name, r in results.items()
            ],
        )
    )
    click.echo("")
    click.echo(
        table(
            [
                "format",
                "stream warm utt/s",
                "MB/s",
                "stream cold utt/s",
                "MB/s",
                "open ms",
                "random warm ms",
                "p95",
                "random cold ms",
            ],
            [
                [
                    name,
                    r["warm_utt_per_s"],
                    r["warm_mb_s"],
                    r["cold_utt_per_s"],
                    r["cold_mb_s"],
                    r["open_ms"],
                    r["random_warm_ms"],
                    r["random_warm_p95_ms"],
                    r["random_cold_ms"],
                ]
                for name, r in results.items()
            ],
        )
    )
    for name, r in results.items():
        if "write_host_tails_clips_per_s" in r:
            click.echo(
                f"{name} written with every tail summed on the writer threads (precompute before): "
                f"{r['write_host_tails_clips_per_s']:.1f} clips/s; with the sums made where the encoder "
                f"runs: {r['write_clips_per_s']:.1f} ({r['write_clips_per_s'] / r['write_host_tails_clips_per_s']:.2f}x)"
            )
        if "zarr_path_warm_utt_per_s" in r:
            click.echo(
                f"{name} read through zarr's sharding codec (StoreReader(direct=False), the read path before "
                f"the direct one): {r['zarr_path_warm_utt_per_s']:.1f} utt/s warm, "
                f"{r['zarr_path_cold_utt_per_s']:.1f} cold; the direct path is "
                f"{r['warm_utt_per_s'] / r['zarr_path_warm_utt_per_s']:.2f}x / "
                f"{r['cold_utt_per_s'] / r['zarr_path_cold_utt_per_s']:.2f}x faster"
            )
        if "numpy_format_warm_utt_per_s" in r:
            click.echo(
                f"{name} read through with_format('numpy') (float32 copies): "
                f"{r['numpy_format_warm_utt_per_s']:.1f} utt/s warm"
            )

    click.echo(
        "\nwhere whistle's write time goes, per clip (the numpy work of store/shard_writer.py, each alone, one thread):"
    )
    click.echo(table(["step", "ms per clip"], profile))
    before_ms = sum(ms for name, ms in profile[:5])
    now_ms = profile[4][1] + profile[5][1] + profile[6][1]
    click.echo(
        f"host work per clip before (tails on the writer threads): {before_ms:.2f} ms (one thread: "
        f"{1e3 / before_ms:.0f} clips/s); now (tail and statistics sums made where the encoder runs, only speech frames "
        f"copied): {now_ms:.2f} ms ({1e3 / now_ms:.0f} clips/s)"
    )

    added_ms = (
        checksums["small_arrays_write_ms_per_shard_crc32c"] - checksums["small_arrays_write_ms_per_shard_no_crc32c"]
    )
    stream_ratio = checksums["stream_utt_per_s_crc32c"] / checksums["stream_utt_per_s_no_crc32c"]
    click.echo(
        f"\nchecksums on every small array (format 1.1) vs states only (1.0), same run: a shard's small arrays "
        f"write in {checksums['small_arrays_write_ms_per_shard_crc32c']:.1f} ms with crc32c, "
        f"{checksums['small_arrays_write_ms_per_shard_no_crc32c']:.1f} ms without ({added_ms:+.1f} ms, "
        f"{100 * added_ms / checksums['shard_write_ms']:+.2f}% of the {checksums['shard_write_ms']:.0f} ms "
        f"a whole shard of {shard_size} takes to write); the store streams (indexes and states) at "
        f"{checksums['stream_utt_per_s_crc32c']:.1f} utt/s with, {checksums['stream_utt_per_s_no_crc32c']:.1f} "
        f"without ({stream_ratio:.3f}x); the reduction of the sums (once per shard set, then cached) takes "
        f"{checksums['reduction_ms_per_shard_crc32c']:.1f} ms per shard with, "
        f"{checksums['reduction_ms_per_shard_no_crc32c']:.1f} without"
    )

    figures = {
        "utterances": utterances,
        "mean_seconds": float(corpus.seconds.mean()),
        "size_ratio_5s": smallest_full / five_second,
        "whistle_speech_bytes_per_5s_utt": five_second,
        "size_ratio_mix": smallest_full / ours["bytes_per_utt"],
        "stream_warm_vs_fastest_alternative": ours["warm_utt_per_s"] / results[fastest_warm]["warm_utt_per_s"],
        "fastest_alternative_warm": fastest_warm,
        "stream_cold_vs_fastest_alternative": ours["cold_utt_per_s"] / results[fastest_cold]["cold_utt_per_s"],
        "fastest_alternative_cold": fastest_cold,
        "direct_vs_zarr_path_warm": ours["warm_utt_per_s"] / ours["zarr_path_warm_utt_per_s"],
        "direct_vs_zarr_path_cold": ours["cold_utt_per_s"] / ours["zarr_path_cold_utt_per_s"],
        "gpu_precompute_clips_per_s": gpu_rate,
        "write_vs_gpu_precompute": ours["write_clips_per_s"] / gpu_rate,
        "write_host_tails_vs_gpu_precompute": ours["write_host_tails_clips_per_s"] / gpu_rate,
        "device_tail_sums_write_speedup": ours["write_clips_per_s"] / ours["write_host_tails_clips_per_s"],
        "writer_host_ms_per_clip_before": before_ms,
        "writer_host_ms_per_clip": now_ms,
        **checksums,
        "checksum_write_overhead_of_shard_write": added_ms / checksums["shard_write_ms"],
        "checksum_stream_ratio": stream_ratio,
    }
    for name, r in results.items():
        key = name.replace("-", "_").replace(" (", "_").replace(")", "")
        for measure_name in (
            "bytes_per_utt",
            "write_clips_per_s",
            "warm_utt_per_s",
            "cold_utt_per_s",
            "random_warm_ms",
            "random_cold_ms",
            "files",
            "zarr_path_warm_utt_per_s",
            "zarr_path_cold_utt_per_s",
            "write_host_tails_clips_per_s",
        ):
            if measure_name in r:
                figures[f"{key}_{measure_name}"] = r[measure_name]
    click.echo(
        f"\ngoals: whistle-speech {figures['size_ratio_5s']:.2f}x smaller than the smallest full-window format "
        f"for 5 s clips (goal >= 5); streaming read {figures['stream_warm_vs_fastest_alternative']:.2f}x warm / "
        f"{figures['stream_cold_vs_fastest_alternative']:.2f}x cold the fastest alternative ({fastest_warm} / "
        f"{fastest_cold}) (goal >= 1.0); writes {figures['write_vs_gpu_precompute']:.2f}x the {gpu_rate:.0f} "
        f"clips/s of one GPU precompute process (goal >= 2)"
    )
    emit(figures)


if __name__ == "__main__":
    main()
