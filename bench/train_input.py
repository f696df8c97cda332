"""Training input: can the store's streaming dataset feed a TLE training step, and is its memory bounded?

1. Loader: `FeatureDataset` (shuffle buffer and length groups as train-tle sets them) in a DataLoader with
   `pad_batch`, batches of train_tle.batch_size, 0 / 1 / 2 workers: speech frames per second delivered,
   over whole epochs of a large-v3-shaped store (d_model 1280 float16, Common-Voice-like 2-15 s clips);
   and with the most workers, `pad_batch(dtype=torch.float16)` (half the bytes through shared memory).
2. Consumer: one phase-1 train-tle step (the TLE at pipeline.toml's [tle] size, masked MSE + KL + duration
   loss, backward, clipping, AdamW — the loop body of stages/train_tle.py without the decoder term) on the
   same batches held in memory: frames per second it consumes, and its FLOPs (torch's FlopCounterMode).
   `loader_vs_step` = loader frames/s over step frames/s; the goal is >= 3 (the loader never the bottleneck).
   With --device cuda the step runs on the GPU (bf16 autocast); on a CPU-only machine the GPU step is
   projected from its FLOPs at --gpu-tflops (labelled as a projection).
3. Memory: peak resident memory (this process + its workers, sampled every 20 ms; measured first, before the
   TLE exists) of one epoch over a store and over a store 10x larger, same settings: bounded means the ratio stays ~1.0. The shuffle buffer holds
   `shuffle_buffer` utterances per worker, so it must be smaller than the small store for the comparison to
   mean anything (--memory-buffer; train-tle's default of 2048 utterances is ~1.4 GB per worker at 5 s
   large-v3 clips, see RESULTS.md).

    python bench/train_input.py                   # CPU, ~6 min
    python bench/train_input.py --device cuda     # the step on a GPU
    python bench/train_input.py --quick           # a smoke run
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import (
    PeakRSS,
    clip_seconds,
    default_tle,
    describe_machine,
    emit,
    load_average,
    median,
    synchronizer,
    table,
    tle_train_step,
    token_batch,
    write_store,
)
from torch.utils.data import DataLoader

from store.dataset import FeatureDataset, pad_batch

D_MODEL = 1280  # large-v3
VOCAB = 51866


def loader_epoch(
    url: Path, workers: int, batch_size: int, shuffle_buffer: int, length_bucket: int, epoch: int, collate=pad_batch
) -> tuple[float, int]:
    """(seconds, speech frames) of one epoch through the DataLoader."""
    dataset = FeatureDataset(url, shuffle=True, seed=0, shuffle_buffer=shuffle_buffer, length_bucket=length_bucket)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    began = time.perf_counter()
    frames = sum(int(batch["lengths"].sum()) for batch in loader)
    return time.perf_counter() - began, frames


def peak_memory(url: Path, workers: int, batch_size: int, shuffle_buffer: int) -> tuple[int, int, float]:
    """(peak RSS, RSS before, seconds) of one epoch, this process and its workers (forked: pages shared with
    this process are counted in each, the same for every store size)."""
    with PeakRSS() as memory:
        seconds, _ = loader_epoch(url, workers, batch_size, shuffle_buffer, 0, 0)
    return memory.peak, memory.baseline, seconds


def step_batches(url: Path, batch_size: int, n_batches: int, device: torch.device, seed: int) -> list[tuple]:
    """The first batches of a shuffled epoch (no length groups: a mix of lengths like the store's), with random
    transcripts and durations, on the device."""
    rng = np.random.default_rng(seed)
    loader = DataLoader(
        FeatureDataset(url, shuffle=True, seed=seed, shuffle_buffer=256), batch_size=batch_size, collate_fn=pad_batch
    )
    out = []
    for batch in loader:
        tokens, mask, durations = token_batch(batch["lengths"].numpy(), rng, VOCAB)
        out.append(tuple(t.to(device) for t in (batch["states"], tokens, mask, durations)))
        if len(out) == n_batches:
            break
    return out


def measure_step(batches: list[tuple], device: torch.device, steps: int) -> tuple[list[float], list[float], float, int]:
    """(seconds per step, frames per step, FLOPs of one step, TLE parameters) of phase-1 train-tle steps."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.tle_model import loss_weights
    from stages.training import build_optimizer
    from whistle_pipeline.config import load_config

    settings = load_config().train_tle
    model = default_tle(D_MODEL, VOCAB).to(device).train()
    optimizer, _ = build_optimizer(model, settings)
    weights = loss_weights(settings, 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = synchronizer(device)
    with autocast, FlopCounterMode(display=False) as counter:
        tle_train_step(model, optimizer, *batches[0], weights)  # also the warm-up
    seconds, frames = [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        sync()
        began = time.perf_counter()
        with autocast:
            frames.append(tle_train_step(model, optimizer, *batch, weights))
        sync()
        seconds.append(time.perf_counter() - began)
    return seconds, frames, float(counter.get_total_flops()), model.num_parameters()


@click.command()
@click.option("--utterances", default=512, show_default=True, help="Utterances in the loader's store.")
@click.option("--shard-size", default=128, show_default=True)
@click.option("--workers", "worker_counts", default="0,1,2", show_default=True, help="DataLoader workers to try.")
@click.option("--repeats", default=3, show_default=True, help="Epochs per worker count; the median is reported.")
@click.option("--steps", default=4, show_default=True, help="Timed TLE steps.")
@click.option("--device", default="cpu", show_default=True, help="Where the TLE step runs.")
@click.option(
    "--gpu-tflops",
    default=100.0,
    show_default=True,
    help="Projection for a CPU-only run: TFLOP/s a GPU step achieves (~10 % of an H100's bf16 peak: the "
    "TLE's 384-wide matmuls are too small to fill it).",
)
@click.option(
    "--memory-utterances",
    default=384,
    show_default=True,
    help="Utterances of the small memory store (the large one has 10x).",
)
@click.option("--memory-buffer", default=64, show_default=True, help="shuffle_buffer in the memory runs.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
@click.option("--quick", is_flag=True, help="Tiny stores, one epoch, one step: a smoke run.")
def main(
    utterances,
    shard_size,
    worker_counts,
    repeats,
    steps,
    device,
    gpu_tflops,
    memory_utterances,
    memory_buffer,
    workdir,
    quick,
) -> None:
    from whistle_pipeline.config import load_config

    settings = load_config().train_tle
    batch_size, shuffle_buffer, length_bucket = settings.batch_size, settings.shuffle_buffer, settings.length_bucket
    if quick:
        utterances, shard_size, repeats, steps, memory_utterances, memory_buffer = 16, 8, 1, 1, 8, 4
        batch_size = 4
    workers = [int(w) for w in worker_counts.split(",")]
    torch_device = torch.device(device)
    click.echo(describe_machine(device))
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="whistle-bench-", dir=workdir))
    try:
        url = root / "store"
        seconds = clip_seconds(utterances, rng)
        write_store(url, seconds, D_MODEL, shard_size)
        small, large = root / "memory-1x", root / "memory-10x"
        write_store(small, clip_seconds(memory_utterances, rng), D_MODEL, shard_size)
        write_store(large, clip_seconds(10 * memory_utterances, rng), D_MODEL, shard_size)
        memory_workers = max(workers)
        memory = {
            name: peak_memory(path, memory_workers, batch_size, memory_buffer)
            for name, path in (("1x", small), ("10x", large))
        }
        store_mb = {
            name: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
            for name, path in (("1x", small), ("10x", large))
        }
        loads, rates = {}, {}
        for w in workers:
            runs = [loader_epoch(url, w, batch_size, shuffle_buffer, length_bucket, epoch) for epoch in range(repeats)]
            rates[w] = [frames / s for s, frames in runs]
            loads[w] = load_average()
        most = max(workers)
        half = [
            loader_epoch(
                url,
                most,
                batch_size,
                shuffle_buffer,
                length_bucket,
                epoch,
                functools.partial(pad_batch, dtype=torch.float16),
            )
            for epoch in range(repeats)
        ]
        rates_float16 = [frames / s for s, frames in half]
        batches = step_batches(url, batch_size, min(steps, 4), torch_device, seed=1)
        step_s, step_frames, flops, parameters = measure_step(batches, torch_device, steps)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    step_rate = median(f / s for f, s in zip(step_frames, step_s))
    frames_per_step = median(step_frames)
    projected = gpu_tflops * 1e12 / flops * frames_per_step if torch_device.type == "cpu" else None
    click.echo(
        f"\nstore: {utterances} utterances, mean {seconds.mean():.1f} s ({frames_per_step / batch_size:.0f} "
        f"speech frames per utterance in the timed batches), d_model {D_MODEL} float16 blosc-zstd, shards of "
        f"{shard_size}; batches of {batch_size}, shuffle buffer {shuffle_buffer}, length groups of "
        f"{length_bucket}"
    )
    rows = [
        [
            f"loader, {w} worker(s) (load {loads[w]})",
            median(rates[w]),
            " ".join(f"{r:.0f}" for r in rates[w]),
            median(rates[w]) / step_rate,
            median(rates[w]) / projected if projected else "",
        ]
        for w in workers
    ]
    rows.append(
        [
            f"loader, {most} worker(s), pad_batch(dtype=torch.float16)",
            median(rates_float16),
            " ".join(f"{r:.0f}" for r in rates_float16),
            median(rates_float16) / step_rate,
            median(rates_float16) / projected if projected else "",
        ]
    )
    rows.append(
        [
            f"TLE step on {torch_device} ({parameters / 1e6:.1f} M parameters, {flops / 1e12:.2f} TFLOP)",
            step_rate,
            " ".join(f"{f / s:.0f}" for f, s in zip(step_frames, step_s)),
            1.0,
            "",
        ]
    )
    if projected:
        rows.append([f"TLE step projected on a GPU at {gpu_tflops:.0f} TFLOP/s", projected, "", "", 1.0])
    click.echo(table(["", "frames/s", "per repeat", "x step", "x GPU step (projected)"], rows))
    click.echo(f"\npeak memory of one epoch ({memory_workers} workers, shuffle buffer {memory_buffer}):")
    click.echo(
        table(
            ["store", "MB on disk", "utterances", "peak RSS MB", "RSS before MB", "epoch s"],
            [
                [name, store_mb[name], memory_utterances * (10 if name == "10x" else 1), peak / 1e6, base / 1e6, s]
                for name, (peak, base, s) in memory.items()
            ],
        )
    )

    figures = {
        "utterances": utterances,
        "batch_size": batch_size,
        "step_device": str(torch_device),
        "tle_parameters_m": parameters / 1e6,
        "tle_step_tflop": flops / 1e12,
        "step_seconds": median(step_s),
        "step_frames_per_s": step_rate,
    }
    for w in workers:
        figures[f"loader_frames_per_s_{w}_workers"] = median(rates[w])
        figures[f"loader_vs_step_{w}_workers"] = median(rates[w]) / step_rate
    figures[f"loader_frames_per_s_{most}_workers_float16_collation"] = median(rates_float16)
    figures["loader_vs_step_best"] = max(median(rates[w]) for w in workers) / step_rate
    if projected:
        figures["gpu_step_frames_per_s_projected"] = projected
        figures["loader_vs_gpu_step_projected_best"] = max(median(rates[w]) for w in workers) / projected
    figures["peak_rss_mb_1x"] = memory["1x"][0] / 1e6
    figures["peak_rss_mb_10x"] = memory["10x"][0] / 1e6
    figures["peak_rss_ratio_10x_vs_1x"] = memory["10x"][0] / memory["1x"][0]
    emit(figures)


if __name__ == "__main__":
    main()
