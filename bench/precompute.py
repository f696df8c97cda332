"""precompute throughput: the whole stage vs the encoder alone, same model, device and batches.

The encoder's FLOPs per 30 s window are fixed, so its speed on ready-made log-mel inputs is the
ceiling (docs/design.md, "precompute keeps the accelerator fed"). The stage adds everything else: MP3 decoding and resampling in DataLoader
workers, the log-mel on the device, float16 conversion, the device->host copy, template and
statistics sums, compression and Zarr writes on background threads. `ratio` = stage clips/s over
encoder clips/s, measured in the same process on the same clips, batch size, device and dtype; each
repeat times both sides back to back and `ratio` is the median of the repeats' ratios (each pair
shares the machine's load of the moment), the clips/s figures the medians of each side.

Clips are Common-Voice-like: MP3, 48 kHz mono, 2-8 s. Weights are random (same FLOPs as the real
model; no download). Both sides get a warm-up first.

`cpu_ratio` compares CPU seconds instead of wall seconds: encoder-alone CPU time per clip over the
stage's (main process with its torch and writer threads, plus the DataLoader workers, model loading
included). When the encoder keeps every core busy, every extra CPU second is a second the encoder
does not get, so on a dedicated CPU machine `ratio` tends to `cpu_ratio`; on a shared machine
`cpu_ratio` is the steadier figure.

Achieved TFLOP/s use the encoder's FLOPs per window derived from the model config
(`_common.encoder_flops`) and are set against the device's matmul peak measured in the same run
(`mfu` = achieved / measured peak). The profile times each step alone on the same clips (decode,
resample, log-mel, encoder, float16 + copy to host, the device-side sums, ShardWriter.add, compression,
shard close), so the gap between the stage and the encoder can be read off it.

    python bench/precompute.py --size tiny --device cpu            # CPU figures in bench/RESULTS.md
    python bench/precompute.py --size base --device cpu --clips 32
    python bench/precompute.py --size large-v3 --device cuda --dtype bfloat16 --clips 512 --batch-size 32 \\
        --num-workers 8                                             # on a GPU machine
    python bench/precompute.py --quick                              # a smoke run (tests/test_bench_smoke.py)

Prints tables and `name=value` lines (ratio=..., stage_clips_per_s=..., encoder_tflops=..., mfu=...).
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import (
    SIZES,
    PeakRSS,
    describe_machine,
    emit,
    encoder_flops,
    load_average,
    matmul_peak_tflops,
    median,
    save_random_encoder,
    synchronizer,
    table,
    write_clips,
)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its reaped children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def read_manifest(manifest: Path, n: int) -> list[Path]:
    return [manifest.parent / json.loads(line)["audio"] for line in manifest.read_text().splitlines()[:n]]


def padded_audio(paths: list[Path], n_samples: int, sample_rate: int) -> torch.Tensor:
    from whistle_pipeline.audio import load_audio

    audio = torch.zeros(len(paths), n_samples)  # (N, n_samples)
    for i, path in enumerate(paths):
        samples = load_audio(path, sample_rate)
        audio[i, : len(samples)] = torch.from_numpy(samples)
    return audio


def time_encoder(encoder, features: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds for the encoder alone over ready log-mel features (N, n_mels, 3000) on the device,
    in the stage's batches, its output cast to float16 as the stage does."""
    sync = synchronizer(device)
    with torch.inference_mode():
        encoder(features[:batch_size])  # warm-up
        sync()
        began, cpu_began = time.perf_counter(), cpu_seconds()
        for i in range(0, len(features), batch_size):
            encoder(features[i : i + batch_size]).last_hidden_state.to(torch.float16)
        sync()
    return time.perf_counter() - began, cpu_seconds() - cpu_began


def stage_config(
    checkpoint: Path,
    manifest: Path,
    store: Path,
    device: str,
    dtype: str,
    batch_size: int,
    num_workers: int,
    shard_size: int,
    max_clips: int,
):
    from whistle_pipeline.config import load_config

    return load_config(
        updates={
            "teacher": {"name_or_path": str(checkpoint), "device": device, "dtype": dtype},
            "data": {"path": str(manifest), "max_clips": max_clips},
            "store": {"path": str(store), "shard_size": shard_size},
            "precompute": {"batch_size": batch_size, "num_workers": num_workers, "progress": False, "overwrite": True},
        }
    )


def profile_steps(
    encoder, geometry, paths: list[Path], batch_size: int, device: torch.device, store_path: Path
) -> list[tuple[str, str, float, float]]:
    """Each step of the stage alone on the same clips: (step, where it runs, wall ms per clip, CPU ms per clip)."""
    import numcodecs
    import soundfile
    import soxr

    from stages.precompute_device import batch_sums
    from store import StoreSpec, StoreWriter
    from whistle_pipeline.teacher import LogMel, speech_frames

    sync = synchronizer(device)
    n = len(paths)
    rows = []

    def measure(step: str, where: str, function) -> object:
        sync()
        began, cpu_began = time.perf_counter(), time.process_time()
        out = function()
        sync()
        rows.append((step, where, 1e3 * (time.perf_counter() - began) / n, 1e3 * (time.process_time() - cpu_began) / n))
        return out

    from whistle_pipeline.audio import load_audio

    load_audio(paths[0], geometry.sample_rate)  # libsndfile and soxr warm
    decoded = measure(
        "decode (soundfile, MP3 48 kHz)", "workers", lambda: [soundfile.read(p, dtype="float32") for p in paths]
    )
    resampled = measure(
        "resample 48 -> 16 kHz (soxr HQ)",
        "workers",
        lambda: [soxr.resample(a, rate, geometry.sample_rate, quality="HQ") for a, rate in decoded],
    )
    audio = torch.zeros(n, geometry.n_samples)  # (N, n_samples)
    for i, samples in enumerate(resampled):
        audio[i, : len(samples)] = torch.from_numpy(samples[: geometry.n_samples])
    log_mel = LogMel(geometry).to(device)
    batches = [audio[i : i + batch_size].to(device) for i in range(0, n, batch_size)]
    with torch.inference_mode():
        log_mel(batches[0])
        features = measure("log-mel (torch, on the device)", "main", lambda: [log_mel(b) for b in batches])
        features = [f.to(encoder.dtype) for f in features]
        encoder(features[0])
        states = measure("encoder", "main", lambda: [encoder(f).last_hidden_state for f in features])

        def to_host():
            if device.type != "cuda":
                return [s.to(torch.float16).numpy() for s in states]
            hosts = [torch.empty(s.shape, dtype=torch.float16, pin_memory=True) for s in states]
            for host, s in zip(hosts, states):
                host.copy_(s.to(torch.float16), non_blocking=True)
            torch.cuda.synchronize(device)
            return [host.numpy() for host in hosts]

        windows = np.concatenate(measure("float16 + copy to host", "main", to_host))  # (N, M, D)
        frames = [speech_frames(len(samples), geometry, 2) for samples in resampled]

        def sums_on_device():
            return [
                batch_sums(s.to(torch.float16), frames[i * batch_size : (i + 1) * batch_size], [0] * len(s))[1][0]
                for i, s in enumerate(states)
            ]

        sums = measure("tail + statistics sums (batch_sums, on the device)", "main", sums_on_device)

    teacher = geometry.record("bench-random", "")
    spec = StoreSpec(teacher, "speech", 2, n, 2048, "blosc-zstd", 3, 0, "bench-profile", "none")
    shard = StoreWriter.open(store_path, spec, overwrite=True).shard(0)

    def add_all():
        for batch in sums:
            shard.add_sums(**{name: values.cpu().numpy() for name, values in batch.items()})
        for i, window in enumerate(windows):
            shard.add(
                f"clip{i}", "text", "en", len(resampled[i]) / geometry.sample_rate, window[: frames[i]], summed=True
            )

    measure("ShardWriter.add_sums + add (speech frames: checks, copies)", "writer", add_all)
    measure("shard close (compress, shard object and Zarr writes)", "writer", shard.close)
    speech = np.concatenate([window[:f] for window, f in zip(windows, frames)])  # (frames, D)
    blosc, crc = numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE), numcodecs.CRC32C()
    measure(
        "  of which compress (Blosc zstd-3 + crc32c)",
        "writer",
        lambda: [crc.encode(blosc.encode(speech[i : i + 2048])) for i in range(0, len(speech), 2048)],
    )
    return rows


@click.command()
@click.option("--size", type=click.Choice(list(SIZES)), default="tiny", show_default=True)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True
)
@click.option("--clips", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--num-workers", type=int, default=1, show_default=True)
@click.option("--shard-size", type=int, default=32, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timings per side; medians are reported.")
@click.option("--profile/--no-profile", default=True, show_default=True, help="Time each step alone.")
@click.option("--quick", is_flag=True, help="2 clips, batch 1, one repeat: a smoke run.")
def main(size, device, dtype, clips, batch_size, num_workers, shard_size, repeats, profile, quick) -> None:
    from stages.precompute import run
    from whistle_pipeline.teacher import LogMel, load_encoder, resolve_dtype

    if quick:
        clips, batch_size, shard_size, repeats = 2, 1, 1, 1
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    click.echo(describe_machine(device))
    peak = matmul_peak_tflops(torch_device, torch_dtype, size=1024 if quick else None, repeats=2 if quick else 5)
    with tempfile.TemporaryDirectory(prefix="whistle-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint = save_random_encoder(size, tmp / "teacher", torch_dtype)
        (tmp / "clips").mkdir()
        manifest = write_clips(tmp / "clips", clips)
        encoder, geometry = load_encoder(str(checkpoint), "main", torch_device, torch_dtype)
        paths = read_manifest(manifest, clips)
        log_mel = LogMel(geometry).to(torch_device)
        with torch.inference_mode():
            audio = padded_audio(paths, geometry.n_samples, geometry.sample_rate)
            features = torch.cat(
                [log_mel(audio[i : i + batch_size].to(torch_device)) for i in range(0, clips, batch_size)]
            ).to(torch_dtype)  # (N, n_mels, 3000)

        def stage(store: str, max_clips: int):
            return run(
                stage_config(
                    checkpoint, manifest, tmp / store, device, dtype, batch_size, num_workers, shard_size, max_clips
                )
            )

        stage("warm-up", batch_size)  # kernels, allocator and thread pools warm, as for the encoder's warm-up
        loads = [load_average()]
        encoder_s, encoder_cpu, pipeline_s, end_to_end_s, stage_cpu, input_wait, write_wait = ([] for _ in range(7))
        peak_rss = gpu_peak = 0
        for _ in range(repeats):
            wall, cpu = time_encoder(encoder, features, batch_size, torch_device)
            encoder_s.append(wall)
            encoder_cpu.append(cpu)
            if torch_device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(torch_device)
            cpu_began = cpu_seconds()
            with PeakRSS() as memory:
                result = stage("store", 0)
            stage_cpu.append(cpu_seconds() - cpu_began)
            peak_rss = max(peak_rss, memory.peak)
            if torch_device.type == "cuda":
                gpu_peak = max(gpu_peak, torch.cuda.max_memory_allocated(torch_device))
            if result.clips != clips:
                raise RuntimeError(f"the stage stored {result.clips} of {clips} clips:\n{result.summary()}")
            pipeline_s.append(result.pipeline_seconds)
            end_to_end_s.append(result.seconds)
            input_wait.append(result.input_wait_seconds)
            write_wait.append(result.write_wait_seconds)
            loads.append(load_average())
        steps = profile_steps(encoder, geometry, paths, batch_size, torch_device, tmp / "profile") if profile else []

    flops = encoder_flops(encoder.config)
    encoder_rate, stage_rate = clips / median(encoder_s), clips / median(pipeline_s)
    end_to_end_rate = clips / median(end_to_end_s)
    ratios = [e / s for e, s in zip(encoder_s, pipeline_s)]
    figures = {
        "size": size,
        "device": str(torch_device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "clips": clips,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "encoder_clips_per_s": encoder_rate,
        "stage_clips_per_s": stage_rate,
        "stage_end_to_end_clips_per_s": end_to_end_rate,
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_end_to_end": median(e / s for e, s in zip(encoder_s, end_to_end_s)),
        "encoder_cpu_s_per_clip": median(encoder_cpu) / clips,
        "stage_cpu_s_per_clip": median(stage_cpu) / clips,
        "cpu_ratio": median(e / s for e, s in zip(encoder_cpu, stage_cpu)),
        "input_wait_s": median(input_wait),
        "write_wait_s": median(write_wait),
        "encoder_gflop_per_window": flops / 1e9,
        "matmul_peak_tflops": peak,
        "encoder_tflops": encoder_rate * flops / 1e12,
        "stage_tflops": stage_rate * flops / 1e12,
        "encoder_mfu": encoder_rate * flops / 1e12 / peak,
        "mfu": stage_rate * flops / 1e12 / peak,
        "stage_peak_rss_mb": peak_rss / 1e6,
    }
    if torch_device.type == "cuda":
        figures["stage_peak_gpu_mb"] = gpu_peak / 1e6
    click.echo(
        f"\n{size}-sized random Whisper encoder ({encoder.num_parameters() / 1e6:.1f} M parameters, "
        f"{flops / 1e9:.0f} GFLOP per 30 s window) on {torch_device}, {figures['dtype']}; {clips} clips, batches "
        f"of {batch_size}, {num_workers} decode worker(s); {repeats} repeat(s), load average per repeat: "
        f"{', '.join(loads)}"
    )
    click.echo(
        table(
            ["", "clips/s (median)", "per repeat", "TFLOP/s", "of matmul peak", "CPU s/clip"],
            [
                [
                    "encoder alone",
                    encoder_rate,
                    " ".join(f"{clips / s:.3g}" for s in encoder_s),
                    figures["encoder_tflops"],
                    f"{figures['encoder_mfu']:.1%}",
                    figures["encoder_cpu_s_per_clip"],
                ],
                [
                    "whole stage",
                    stage_rate,
                    " ".join(f"{clips / s:.3g}" for s in pipeline_s),
                    figures["stage_tflops"],
                    f"{figures['mfu']:.1%}",
                    figures["stage_cpu_s_per_clip"],
                ],
            ],
        )
    )
    click.echo(
        f"ratio {figures['ratio']:.3f} (per repeat {' '.join(f'{r:.3f}' for r in ratios)}); cpu_ratio "
        f"{figures['cpu_ratio']:.3f}; with model loading and store opening {figures['ratio_end_to_end']:.3f}; "
        f"matmul peak {peak:.3g} TFLOP/s; the stage waited {figures['input_wait_s']:.2f} s for audio and "
        f"{figures['write_wait_s']:.2f} s for the writers; peak RSS {peak_rss / 1e6:.0f} MB (process + workers)"
    )
    if steps:
        encoder_cpu_ms = next(cpu for step, _, _, cpu in steps if step == "encoder")
        others = sum(cpu for step, _, _, cpu in steps if step != "encoder" and not step.startswith("  "))
        figures["profile_cpu_ratio"] = encoder_cpu_ms / (encoder_cpu_ms + others)
        click.echo("\nwhere the time goes (each step alone, same clips; per clip):")
        click.echo(table(["step", "runs on", "wall ms", "CPU ms"], steps))
        click.echo(
            f"encoder share of the stage's CPU work: {figures['profile_cpu_ratio']:.3f} (the CPU ratio the "
            "profile predicts when every core is busy)"
        )
    emit(figures)


if __name__ == "__main__":
    main()
