"""Feature-store write and read throughput for large-v3-shaped states (d_model 1280, float16).

Writes a speech-frames store of utterances with realistic lengths (2-15 s -> 102-752 frames of
the 1500-frame window), through the same calls precompute makes (ShardWriter.add with the tail,
close on a thread pool), then reads it back the ways training does (iter_shard over every shard,
and single utterances at random). The baseline, measured in the same run on the same bytes and
disk, is a plain float16 file written with ndarray.tofile and read with np.fromfile: ratios say
what the store's format (compression, checksums, sharding, tail sums) costs or saves.

MB/s are of raw float16 speech frames (1 MB = 10^6 bytes). Random normal states compress a little
worse than real encoder outputs (~1.07x with zstd on real tiny.en states, docs/design.md, "The feature store"), so the
sizes here are an upper bound. Writes go to the page cache, as in practice, for store and baseline
alike.

    python bench/store_io.py            # 512 utterances (~0.55 GB raw), 4 shards, three codecs
    python bench/store_io.py --quick    # 48 utterances, a smoke run
"""

from __future__ import annotations

import datetime
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import zarr

from store import StoreReader, StoreSpec, StoreWriter, TeacherInfo, inspect_store

CODECS = ("none", "blosc-lz4", "blosc-zstd")
TEACHER = TeacherInfo(
    "openai/whisper-large-v3",
    "main",
    d_model=1280,
    n_mels=128,
    sample_rate=16000,
    samples_per_frame=320,
    frames_per_second=50,
    max_frames=1500,
)
POOL_FRAMES = 20_000  # distinct random frames the utterances are cut from (~51 MB)


def utterance_frames(n: int, rng: np.random.Generator) -> np.ndarray:
    """Speech frames of `n` clips of 2-15 s: ceil(samples / 320) + a 2-frame margin."""
    n_samples = (rng.uniform(2.0, 15.0, n) * TEACHER.sample_rate).astype(np.int64)
    return -(-n_samples // TEACHER.samples_per_frame) + 2


def spec_for(codec: str, shard_size: int, chunk_frames: int) -> StoreSpec:
    return StoreSpec(TEACHER, "speech", 2, shard_size, chunk_frames, codec, 3, 0, "bench", "none")


def write_store(
    path: Path,
    codec: str,
    shard_size: int,
    chunk_frames: int,
    lengths: np.ndarray,
    starts: np.ndarray,
    pool: np.ndarray,
    write_threads: int,
) -> dict[str, float]:
    """Fill a store as precompute does; seconds spent in add() and in the whole write."""
    writer = StoreWriter.open(path, spec_for(codec, shard_size, chunk_frames))
    add_seconds = 0.0
    began = time.perf_counter()
    with ThreadPoolExecutor(write_threads) as closers:
        closing = []
        for k in range(-(-len(lengths) // shard_size)):
            shard = writer.shard(k)
            tic = time.perf_counter()
            for i in range(k * shard_size, min(len(lengths), (k + 1) * shard_size)):
                window = pool[starts[i] : starts[i] + TEACHER.max_frames]  # (1500, 1280)
                shard.add(
                    f"utt{i:06d}", "synthetic", "en", lengths[i] / 50, window[: lengths[i]], tail=window[lengths[i] :]
                )
            add_seconds += time.perf_counter() - tic
            closing.append(closers.submit(shard.close))
        records = [future.result() for future in closing]
    write_s = time.perf_counter() - began
    report = inspect_store(path)
    assert report.utterances == len(lengths) == sum(r.n for r in records)
    return {
        "add_s": add_seconds,
        "write_s": write_s,
        "store_bytes": report.bytes_on_disk,
        "states_bytes": report.states_bytes,
    }


def read_store(path: Path, n_random: int, rng: np.random.Generator) -> dict[str, float]:
    reader = StoreReader(path)
    tic = time.perf_counter()
    frames = sum(len(utt.states) for shard in reader.shards() for utt in reader.iter_shard(shard))
    sequential_s = time.perf_counter() - tic
    picks = [
        (shard, int(i))
        for shard in reader.shards()
        for i in rng.choice(reader.shard_attrs(shard)["n"], n_random // len(reader.shards()), replace=False)
    ]
    reader = StoreReader(path)  # cold index cache
    tic = time.perf_counter()
    for shard, i in picks:
        reader.utterance(shard, i)
    return {"frames": frames, "read_s": sequential_s, "random_s": time.perf_counter() - tic, "random_n": len(picks)}


def baseline(path: Path, lengths: np.ndarray, starts: np.ndarray, pool: np.ndarray) -> dict[str, float]:
    """The same speech frames as one plain float16 file: write with tofile, read with fromfile."""
    tic = time.perf_counter()
    with open(path, "wb") as out:
        for start, length in zip(starts, lengths):
            pool[start : start + length].tofile(out)
    write_s = time.perf_counter() - tic
    tic = time.perf_counter()
    frames = len(np.fromfile(path, dtype=np.float16)) // TEACHER.d_model
    return {"write_s": write_s, "read_s": time.perf_counter() - tic, "frames": frames}


@click.command()
@click.option("--quick", is_flag=True, help="A smoke run: 48 utterances in 3 shards.")
@click.option("--utterances", type=int, default=512, show_default=True, help="Utterances to write.")
@click.option("--shard-size", type=int, default=128, show_default=True, help="Utterances per shard.")
@click.option(
    "--chunk-frames",
    type=int,
    default=2048,
    show_default=True,
    help="Rows per inner chunk (pipeline.toml's store.chunk_frames); smaller = faster random reads.",
)
@click.option("--write-threads", type=int, default=2, show_default=True, help="Threads closing shards.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Where to write (default: a temp dir).")
@click.option("--seed", type=int, default=0, show_default=True)
def main(
    quick: bool, utterances: int, shard_size: int, chunk_frames: int, write_threads: int, workdir: str | None, seed: int
) -> None:
    """Measure the store's write and read MB/s against a plain-file baseline.

    \b
    Examples:
      python bench/store_io.py
      python bench/store_io.py --quick
      python bench/store_io.py --utterances 2048 --shard-size 512 --workdir /mnt/nvme/tmp
      python bench/store_io.py --chunk-frames 512
    """
    if quick:
        utterances, shard_size = 48, 16
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((POOL_FRAMES, TEACHER.d_model), dtype=np.float32).astype(np.float16)  # (F, D)
    lengths = utterance_frames(utterances, rng)
    starts = rng.integers(0, POOL_FRAMES - TEACHER.max_frames, utterances)
    raw_mb = int(lengths.sum()) * TEACHER.d_model * 2 / 1e6
    root = Path(tempfile.mkdtemp(prefix="whistle-bench-", dir=workdir))
    try:
        base = baseline(root / "baseline.f16", lengths, starts, pool)
        assert base["frames"] == lengths.sum()
        rows = []
        for codec in CODECS:
            written = write_store(root / codec, codec, shard_size, chunk_frames, lengths, starts, pool, write_threads)
            read = read_store(root / codec, min(64, utterances), rng)
            assert read["frames"] == lengths.sum()
            rows.append((codec, written, read))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    click.echo(
        f"store_io: {utterances} utterances of 2-15 s ({lengths.mean():.0f} frames on average), "
        f"d_model {TEACHER.d_model} float16, {raw_mb:.1f} MB raw speech frames, shards of {shard_size}, "
        f"{write_threads} write threads"
    )
    click.echo(
        f"machine: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
        f"cores; python {platform.python_version()}, zarr {zarr.__version__}, numpy {np.__version__}; "
        f"{datetime.date.today()}"
    )
    base_write, base_read = raw_mb / base["write_s"], raw_mb / base["read_s"]
    click.echo(
        f"{'codec':<12}{'write MB/s':>11}{'(add only)':>11}{'x base':>8}{'read MB/s':>11}{'x base':>8}"
        f"{'random utt/s':>14}{'ratio':>8}{'+other':>8}"
    )
    click.echo(
        f"{'plain file':<12}{base_write:>11.1f}{'':>11}{1.0:>8.2f}{base_read:>11.1f}{1.0:>8.2f}{'':>14}{1.0:>8.2f}{'':>8}"
    )
    lines = [f"raw_mb={raw_mb:.1f}", f"baseline_write_mb_s={base_write:.1f}", f"baseline_read_mb_s={base_read:.1f}"]
    for codec, written, read in rows:
        write_mb_s, add_mb_s = raw_mb / written["write_s"], raw_mb / written["add_s"]
        read_mb_s, random_per_s = raw_mb / read["read_s"], read["random_n"] / read["random_s"]
        compression = raw_mb * 1e6 / written["states_bytes"]
        overhead = written["store_bytes"] / written["states_bytes"] - 1  # sums, ids, text, metadata
        click.echo(
            f"{codec:<12}{write_mb_s:>11.1f}{add_mb_s:>11.1f}{write_mb_s / base_write:>8.2f}{read_mb_s:>11.1f}"
            f"{read_mb_s / base_read:>8.2f}{random_per_s:>14.1f}{compression:>8.2f}{overhead:>8.1%}"
        )
        key = codec.replace("-", "_")
        lines += [
            f"write_mb_s_{key}={write_mb_s:.1f}",
            f"add_mb_s_{key}={add_mb_s:.1f}",
            f"read_mb_s_{key}={read_mb_s:.1f}",
            f"random_utt_per_s_{key}={random_per_s:.1f}",
            f"compression_{key}={compression:.3f}",
            f"other_arrays_overhead_{key}={overhead:.4f}",
            f"write_vs_baseline_{key}={write_mb_s / base_write:.3f}",
            f"read_vs_baseline_{key}={read_mb_s / base_read:.3f}",
        ]
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
