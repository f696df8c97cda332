"""precompute throughput: the whole stage vs the encoder alone, same model, device and batches.

The encoder's FLOPs per 30 s window are fixed, so its speed on ready-made log-mel inputs is the
ceiling (DESIGN.md §5). The stage adds everything else: MP3 decoding and resampling in DataLoader
workers, the log-mel on the device, float16 conversion, the device->host copy, template and
statistics sums, compression and Zarr writes on background threads. `ratio` = stage clips/s over
encoder clips/s, measured in the same process on the same clips, batch size, device and dtype.

Clips are Common-Voice-like: MP3, 48 kHz mono, 2-8 s. Weights are random (same FLOPs as the real
model; no download). Both sides get a warm-up batch first, and the best of `--repeats` timings is
kept for each (other processes on a shared machine only ever slow a run down).

`cpu_ratio` compares CPU seconds instead of wall seconds: encoder-alone CPU time per clip over the
stage's (main process with its torch and writer threads, plus the DataLoader workers, model loading
included). When the encoder keeps every core busy, every extra CPU second is a second the encoder
does not get, so on a dedicated CPU machine `ratio` tends to `cpu_ratio`; on a shared machine
`cpu_ratio` is the steadier figure.

    python bench/precompute.py --size tiny --device cpu            # the CPU figure in bench/RESULTS.md
    python bench/precompute.py --size large-v3 --device cuda --clips 512 --batch-size 32
    python bench/precompute.py --quick                              # a smoke run (tests/test_bench_smoke.py)

Prints a table and `name=value` lines (ratio=..., stage_clips_per_s=..., encoder_tflops=...).
"""
from __future__ import annotations

import datetime
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

SIZES = {  # Whisper encoder shapes: d_model, layers, heads, ffn, mel bins
    "tiny": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80),
    "base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80),
    "large-v3": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                     num_mel_bins=128),
}
CLIP_RATE = 48000  # Common Voice MP3s
CLIP_SECONDS = (2.0, 8.0)


def save_random_encoder(size: str, folder: Path, dtype: torch.dtype) -> Path:
    """A random-weight encoder of a Whisper size, saved like a checkpoint (config + extractor + weights)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor

    from whistle_pipeline.teacher import TeacherEncoder

    config = WhisperConfig(**SIZES[size], max_source_positions=1500)
    torch.manual_seed(0)
    TeacherEncoder(config).to(dtype).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)
    return folder


def write_clips(folder: Path, n: int) -> Path:
    """`n` speech-like MP3 clips and a manifest; returns the manifest."""
    import soundfile

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        t = np.arange(int(rng.uniform(*CLIP_SECONDS) * CLIP_RATE)) / CLIP_RATE
        pitch = rng.uniform(90, 250)
        voice = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in range(1, 8)) * np.sin(2 * np.pi * 3 * t) ** 2
        audio = (0.1 * voice + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
        soundfile.write(folder / f"clip{i:05d}.mp3", audio, CLIP_RATE)
        rows.append({"audio": f"clip{i:05d}.mp3", "text": f"synthetic clip {i}"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    return manifest


def encoder_flops(size: str) -> float:
    """FLOPs of one 30 s window through the encoder (a multiply-add counts 2)."""
    shape = SIZES[size]
    d, ffn, mels, frames = shape["d_model"], shape["encoder_ffn_dim"], shape["num_mel_bins"], 1500
    convs = 2 * mels * d * 3 * 2 * frames + 2 * d * d * 3 * frames
    layer = 8 * d * d * frames + 4 * frames * frames * d + 4 * d * ffn * frames
    return float(convs + shape["encoder_layers"] * layer)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its reaped children (DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_encoder(encoder, geometry, manifest: Path, n: int, batch_size: int,
                 device: torch.device) -> tuple[float, float]:
    """Wall and CPU seconds for the encoder alone over the same clips in the same batches, inputs already
    on the device."""
    from whistle_pipeline.audio import load_audio
    from whistle_pipeline.teacher import LogMel

    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:n]
    audio = torch.zeros(n, geometry.n_samples)  # (N, n_samples)
    for i, row in enumerate(rows):
        samples = load_audio(manifest.parent / row["audio"], geometry.sample_rate)
        audio[i, : len(samples)] = torch.from_numpy(samples)
    log_mel = LogMel(geometry).to(device)
    with torch.inference_mode():
        features = torch.cat([log_mel(audio[i : i + batch_size].to(device))
                              for i in range(0, n, batch_size)]).to(encoder.dtype)  # (N, n_mels, 3000)
        encoder(features[:batch_size])  # warm-up
        synchronize(device)
        began, cpu_began = time.perf_counter(), cpu_seconds()
        for i in range(0, n, batch_size):
            encoder(features[i : i + batch_size]).last_hidden_state.to(torch.float16)
        synchronize(device)
    return time.perf_counter() - began, cpu_seconds() - cpu_began


def stage_config(checkpoint: Path, manifest: Path, store: Path, device: str, dtype: str, batch_size: int,
                 num_workers: int, shard_size: int, max_clips: int):
    from whistle_pipeline.config import load_config

    return load_config(updates={
        "teacher": {"name_or_path": str(checkpoint), "device": device, "dtype": dtype},
        "data": {"path": str(manifest), "max_clips": max_clips},
        "store": {"path": str(store), "shard_size": shard_size},
        "precompute": {"batch_size": batch_size, "num_workers": num_workers, "progress": False, "overwrite": True},
    })


@click.command()
@click.option("--size", type=click.Choice(list(SIZES)), default="tiny", show_default=True)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
@click.option("--clips", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--num-workers", type=int, default=1, show_default=True)
@click.option("--shard-size", type=int, default=32, show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True, help="Timings per side; the best is kept.")
@click.option("--quick", is_flag=True, help="4 clips, batch 2, one repeat: a smoke run.")
def main(size, device, dtype, clips, batch_size, num_workers, shard_size, repeats, quick) -> None:
    import transformers

    from stages.precompute import run
    from whistle_pipeline.teacher import load_encoder, resolve_dtype

    if quick:
        clips, batch_size, shard_size, repeats = 4, 2, 2, 1
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with tempfile.TemporaryDirectory(prefix="whistle-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint = save_random_encoder(size, tmp / "teacher", torch_dtype)
        (tmp / "clips").mkdir()
        manifest = write_clips(tmp / "clips", clips)
        encoder, geometry = load_encoder(str(checkpoint), "main", torch_device, torch_dtype)

        def stage(store: str, max_clips: int):
            return run(stage_config(checkpoint, manifest, tmp / store, device, dtype, batch_size, num_workers,
                                    shard_size, max_clips))

        stage("warm-up", batch_size)  # kernels, allocator and thread pools warm, as for the encoder's warm-up
        encoder_s, encoder_cpu, pipeline_s, end_to_end_s, stage_cpu = [], [], [], [], []
        for _ in range(repeats):
            wall, cpu = time_encoder(encoder, geometry, manifest, clips, batch_size, torch_device)
            encoder_s.append(wall)
            encoder_cpu.append(cpu)
            cpu_began = cpu_seconds()
            result = stage("store", 0)
            stage_cpu.append(cpu_seconds() - cpu_began)
            assert result.clips == clips, result.summary()
            pipeline_s.append(result.pipeline_seconds)
            end_to_end_s.append(result.seconds)

    encoder_rate, stage_rate = clips / min(encoder_s), clips / min(pipeline_s)
    end_to_end_rate = clips / min(end_to_end_s)
    flops = encoder_flops(size)
    figures = {
        "size": size, "device": str(torch_device), "dtype": str(torch_dtype).removeprefix("torch."),
        "clips": clips, "batch_size": batch_size, "num_workers": num_workers, "torch_threads": torch.get_num_threads(),
        "encoder_clips_per_s": round(encoder_rate, 3), "stage_clips_per_s": round(stage_rate, 3),
        "stage_end_to_end_clips_per_s": round(end_to_end_rate, 3),
        "ratio": round(stage_rate / encoder_rate, 3), "ratio_end_to_end": round(end_to_end_rate / encoder_rate, 3),
        "encoder_cpu_s_per_clip": round(min(encoder_cpu) / clips, 4),
        "stage_cpu_s_per_clip": round(min(stage_cpu) / clips, 4),
        "cpu_ratio": round(min(encoder_cpu) / min(stage_cpu), 3),
        "encoder_tflops": round(encoder_rate * flops / 1e12, 4), "stage_tflops": round(stage_rate * flops / 1e12, 4),
    }
    click.echo(f"precompute bench — {platform.processor() or platform.machine()}, {datetime.date.today()}, "
               f"torch {torch.__version__}, transformers {transformers.__version__}")
    click.echo(f"  encoder alone  {encoder_rate:8.2f} clips/s  ({figures['encoder_tflops']} TFLOP/s)")
    click.echo(f"  whole stage    {stage_rate:8.2f} clips/s  (pipeline; {end_to_end_rate:.2f} clips/s with model "
               "loading and store opening)")
    click.echo(f"  ratio          {figures['ratio']:8.3f}  (CPU seconds per clip: encoder "
               f"{figures['encoder_cpu_s_per_clip']}, stage {figures['stage_cpu_s_per_clip']}, "
               f"cpu_ratio {figures['cpu_ratio']})")
    for name, value in figures.items():
        click.echo(f"{name}={value}")


if __name__ == "__main__":
    main()
