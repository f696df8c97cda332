"""Peak memory of a precompute process against store.shard_size and precompute.write_queue.

Each configuration runs in a fresh process (spawned, so no memory is inherited or left over) whose
resident memory, with its DataLoader workers, the parent samples every 20 ms:

  writer   the stage's host side at large-v3 shape, fed as fast as it takes it: batches of
           precompute.batch_size float16 windows (B, 1500, 1280) handed to precompute's own
           BackgroundWriter exactly as the stage's `deliver` hands them (per batch, the sums that
           stages.precompute_device.batch_sums makes on the device, then views of the speech frames of the
           host copy, which holds the batch's first Tmax frames only), Common-Voice-like clip lengths. The encoder is left out (it runs on the GPU), so
           the writers are the bottleneck and their queues stay full: the worst case for host memory.
  stage    the whole `stages.precompute.run` with a random tiny-sized (or, with --device cuda,
           --stage-size) encoder on MP3 clips, for the same knobs; on a GPU also the peak GPU memory
           (torch.cuda.max_memory_allocated).

"above imports" = peak minus the process's memory once torch and the pipeline are imported. The store
writer holds a shard's utterances until it closes and about twice a shard's raw size while it closes
(store/writer.py), write_queue bounds the shards closing at once, and each writer thread's
message queue (64 utterances) keeps the batch arrays its messages point into alive.

    python bench/memory.py                                  # CPU, ~6 min
    python bench/memory.py --device cuda --stage-size large-v3
    python bench/memory.py --quick                          # a smoke run
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
from _common import (
    SIZES,
    PeakRSS,
    clip_seconds,
    describe_machine,
    emit,
    load_average,
    save_random_encoder,
    speech_frames,
    table,
    write_clips,
)

D_MODEL = 1280  # large-v3
MAX_FRAMES = 1500
POOL_FRAMES = 20_000


def own_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def writer_child(
    store: str, shard_size: int, write_queue: int, write_threads: int, batch_size: int, clips: int, results
) -> None:
    """Feed `clips` large-v3-shaped clips through BackgroundWriter as the stage's deliver() does."""
    import torch

    from stages.background_writer import BackgroundWriter
    from stages.precompute_device import batch_sums
    from store import StoreSpec, StoreWriter, TeacherInfo

    results.put(("imported", own_rss()))
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((POOL_FRAMES, D_MODEL), dtype=np.float32).astype(np.float16)  # (F, D)
    seconds = clip_seconds(clips, rng)
    frames = speech_frames(seconds)
    teacher = TeacherInfo("openai/whisper-large-v3", "main", D_MODEL, 128, 16000, 320, 50, MAX_FRAMES)
    spec = StoreSpec(teacher, "speech", 2, shard_size, 2048, "blosc-zstd", 3, 0, "bench-memory", "none")
    writer = BackgroundWriter(StoreWriter.open(store, spec), write_threads, write_queue)
    began = time.perf_counter()
    for first in range(0, clips, batch_size):
        rows = range(first, min(clips, first + batch_size))
        starts = rng.integers(0, POOL_FRAMES - MAX_FRAMES, len(rows))
        windows = torch.from_numpy(np.stack([pool[s : s + MAX_FRAMES] for s in starts]))  # (B, M, D)
        n_frames = [int(frames[row]) for row in rows]
        _, sums = batch_sums(windows, n_frames, [row // shard_size for row in rows])  # the GPU's work in the stage
        states = windows[:, : max(n_frames)].numpy().copy()  # (B, Tmax, D): a new host array per batch
        for shard, shard_sums in sums.items():
            writer.add_sums(shard, **{name: values.numpy() for name, values in shard_sums.items()})
        for i, row in enumerate(rows):
            n = n_frames[i]
            writer.add(
                row // shard_size,
                id=f"utt{row:07d}",
                text="synthetic",
                language="en",
                duration_s=float(seconds[row]),
                states=states[i, :n],
                speech_frames=n,
                summed=True,
            )
            if (row + 1) % shard_size == 0 or row + 1 == clips:
                writer.close(row // shard_size)
    writer.finish()
    results.put(("seconds", time.perf_counter() - began))


def stage_child(updates: dict, results) -> None:
    """The whole precompute stage; reports its peak GPU memory on CUDA."""
    import torch

    from stages.precompute import run
    from whistle_pipeline.config import load_config

    results.put(("imported", own_rss()))
    config = load_config(updates=updates)
    began = time.perf_counter()
    result = run(config)
    results.put(("seconds", time.perf_counter() - began))
    results.put(("clips", result.clips))
    if torch.cuda.is_available() and config.teacher.device != "cpu":
        results.put(("gpu_peak", torch.cuda.max_memory_allocated()))


def measure(target, args: tuple) -> dict[str, float]:
    """Run `target(*args, results)` in a fresh process; its peak tree RSS and what it reported."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=target, args=(*args, results))
    child.start()
    with PeakRSS(pid=child.pid) as memory:
        child.join()
    if child.exitcode:
        raise RuntimeError(f"{target.__name__}{args} failed with exit code {child.exitcode}")
    reported = {}
    while not results.empty():
        key, value = results.get()
        reported[key] = value
    return {"peak": memory.peak, **reported}


def parse(values: str) -> list[int]:
    return [int(v) for v in values.split(",")]


@click.command()
@click.option("--shard-sizes", default="64,256,1024", show_default=True, help="Writer sweep (write_queue 2).")
@click.option("--queues", default="1,2,4", show_default=True, help="Writer sweep of write_queue (shard size 256).")
@click.option("--shards-per-run", default=4, show_default=True, help="Shards each writer run fills.")
@click.option("--stage-shard-sizes", default="8,32", show_default=True, help="Stage sweep (tiny encoder on CPU).")
@click.option("--stage-clips", default=32, show_default=True)
@click.option("--stage-size", type=click.Choice(list(SIZES)), default="tiny", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Where the stage's encoder runs.")
@click.option("--batch-size", default=None, type=int, help="Clips per batch (default: precompute.batch_size).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
@click.option("--quick", is_flag=True, help="Small shards, one stage run: a smoke run.")
def main(
    shard_sizes, queues, shards_per_run, stage_shard_sizes, stage_clips, stage_size, device, batch_size, workdir, quick
) -> None:
    from whistle_pipeline.config import load_config

    defaults = load_config().precompute
    batch_size = batch_size or defaults.batch_size
    if quick:
        shard_sizes, queues, shards_per_run, stage_shard_sizes, stage_clips, batch_size = "8", "1", 2, "2", 2, 2
    click.echo(describe_machine(device))
    writer_rows, stage_rows, figures = [], [], {}
    with tempfile.TemporaryDirectory(prefix="whistle-bench-", dir=workdir) as tmp:
        tmp = Path(tmp)
        sweep = [(s, 2 if not quick else parse(queues)[0]) for s in parse(shard_sizes)]
        sweep += [(256, q) for q in parse(queues) if (256, q) not in sweep and not quick]
        for shard_size, write_queue in sweep:
            clips = shard_size * shards_per_run
            r = measure(
                writer_child,
                (
                    str(tmp / f"w{shard_size}-{write_queue}"),
                    shard_size,
                    write_queue,
                    defaults.write_threads,
                    batch_size,
                    clips,
                ),
            )
            shard_mb = shard_size * speech_frames(np.full(1, 5.5))[0] * D_MODEL * 2 / 1e6
            writer_rows.append(
                [
                    shard_size,
                    write_queue,
                    clips,
                    shard_mb,
                    r["peak"] / 1e6,
                    (r["peak"] - r["imported"]) / 1e6,
                    clips / r["seconds"],
                    load_average(),
                ]
            )
            figures[f"writer_peak_mb_shard{shard_size}_queue{write_queue}"] = r["peak"] / 1e6
            figures[f"writer_above_imports_mb_shard{shard_size}_queue{write_queue}"] = (r["peak"] - r["imported"]) / 1e6
        (tmp / "clips").mkdir()
        manifest = write_clips(tmp / "clips", stage_clips)
        checkpoint = save_random_encoder(stage_size, tmp / "teacher")
        for shard_size in parse(stage_shard_sizes):
            updates = {
                "teacher": {"name_or_path": str(checkpoint), "device": device},
                "data": {"path": str(manifest)},
                "store": {"path": str(tmp / f"stage{shard_size}"), "shard_size": shard_size},
                "precompute": {
                    "batch_size": min(batch_size, shard_size),
                    "num_workers": 1,
                    "progress": False,
                    "overwrite": True,
                },
            }
            r = measure(stage_child, (updates,))
            stage_rows.append(
                [
                    shard_size,
                    defaults.write_queue,
                    r["clips"],
                    r["peak"] / 1e6,
                    (r["peak"] - r["imported"]) / 1e6,
                    r.get("gpu_peak", 0) / 1e6 or "",
                    load_average(),
                ]
            )
            figures[f"stage_peak_mb_shard{shard_size}"] = r["peak"] / 1e6
            if "gpu_peak" in r:
                figures[f"stage_peak_gpu_mb_shard{shard_size}"] = r["gpu_peak"] / 1e6

    click.echo(
        f"\nwriter path at large-v3 shape (d_model {D_MODEL}, float16, clips of 2-15 s around 5.5 s), batches of "
        f"{batch_size}, {defaults.write_threads} write threads:"
    )
    click.echo(
        table(
            [
                "shard size",
                "write_queue",
                "clips",
                "shard MB (raw)",
                "peak RSS MB",
                "above imports MB",
                "clips/s",
                "load",
            ],
            writer_rows,
        )
    )
    click.echo(
        f"\nthe whole stage, {stage_size}-sized random encoder on {device}, {stage_clips} MP3 clips, 1 decode "
        "worker (RSS of the process and its worker):"
    )
    click.echo(
        table(
            ["shard size", "write_queue", "clips", "peak RSS MB", "above imports MB", "peak GPU MB", "load"], stage_rows
        )
    )
    emit(figures)


if __name__ == "__main__":
    main()
