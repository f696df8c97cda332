"""What the bench/ scripts share: the machine line, Whisper shapes and FLOPs, synthetic clips and states,
timing and memory helpers, and the `name=value` output.

Every script compares against a baseline measured in the same run, repeats each measurement and
reports the median: the development machine is shared, so single timings are noise.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
import numpy as np

# libgomp's worker threads spin while they wait. On this shared machine (load 4-6 on 2 cores) that made a CPU
# TLE step 2-5x slower and erratic (bench/RESULTS.md); PASSIVE waits sleep instead. It must be set before torch
# loads its OpenMP runtime, so every script imports this module first; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Whisper shapes (the released checkpoints' config.json values); vocab 51865, 51866 for large-v3.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        num_mel_bins=80,
    ),
    "base": dict(
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_mel_bins=80,
    ),
    "large-v3": dict(
        d_model=1280,
        encoder_layers=32,
        decoder_layers=32,
        encoder_attention_heads=20,
        decoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_ffn_dim=5120,
        num_mel_bins=128,
        vocab_size=51866,
    ),
}
CLIP_RATE = 48000  # Common Voice MP3s
FRAMES_PER_SECOND, SAMPLES_PER_FRAME, MAX_FRAMES = 50, 320, 1500  # every Whisper: 16 kHz, 30 s windows
VERSIONED = ("torch", "transformers", "zarr", "numcodecs", "numpy", "datasets", "soundfile", "soxr")


# --- the machine ------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def describe_machine(device: str = "cpu") -> str:
    """One paragraph naming the machine, its load, the versions and the date (printed first by every script)."""
    gpu = ""
    if device.startswith("cuda"):
        import torch

        gpu = f"; GPU {torch.cuda.get_device_name(torch.device(device))}"
    shown = ", ".join(f"{k} {v}" for k, v in versions().items())
    return (
        f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores{gpu}; load average {load_average()} "
        f"(1/5/15 min); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}\nversions: {shown}\n"
        f"date: {datetime.datetime.now().isoformat(timespec='minutes')}"
    )


# --- output -------------------------------------------------------------------------------------------


def table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A plain aligned table: the first column left-aligned, the others right-aligned."""
    rows = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def emit(figures: dict[str, Any]) -> None:
    """The headline figures, one `name=value` line each (what tests and RESULTS.md read)."""
    for name, value in figures.items():
        click.echo(f"{name}={round(value, 4) if isinstance(value, float) else value}")


# --- timing -------------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def spread(values: list[float]) -> str:
    """median [min-max] of repeated measurements."""
    return f"{median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def timed(function: Callable[[], Any], repeats: int, synchronize: Callable[[], None] = lambda: None) -> list[float]:
    """Wall seconds of `repeats` calls of `function` (after one untimed warm-up call)."""
    function()
    synchronize()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        synchronize()
        seconds.append(time.perf_counter() - began)
    return seconds


# --- Whisper shapes and FLOPs ---------------------------------------------------------------------------


def whisper_config(size: str, **overrides: Any):
    """A WhisperConfig of a released size (random weights: same FLOPs, no download)."""
    from transformers import WhisperConfig

    return WhisperConfig(**{**SIZES[size], "max_source_positions": MAX_FRAMES, **overrides})


def save_random_encoder(size: str, folder: Path, dtype=None) -> Path:
    """A random-weight encoder of a Whisper size, saved like a checkpoint (config + extractor + weights)."""
    import torch
    from transformers import WhisperFeatureExtractor

    from whistle_pipeline.teacher import TeacherEncoder

    config = whisper_config(size)
    torch.manual_seed(0)
    TeacherEncoder(config).to(dtype or torch.float32).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)
    return folder


def encoder_flops(config) -> float:
    """FLOPs of one 30 s window through a Whisper encoder, from its config (a multiply-add counts 2).

    conv1 (mels -> d, k 3) over 3000 mel frames, conv2 (d -> d, k 3, stride 2) to 1500 frames, then per
    layer: q, k, v, out projections (4 d^2 per frame), attention scores and values (2 n^2 d), FFN (2 d f).
    """
    d, ffn, mels = config.d_model, config.encoder_ffn_dim, config.num_mel_bins
    frames = config.max_source_positions  # 1500
    convs = 2 * mels * d * 3 * (2 * frames) + 2 * d * d * 3 * frames
    layer = 2 * frames * (4 * d * d + 2 * d * ffn) + 2 * 2 * frames * frames * d
    return float(convs + config.encoder_layers * layer)


def matmul_peak_tflops(device, dtype, size: int | None = None, repeats: int = 10) -> float:
    """The best TFLOP/s of a square matmul on `device` in `dtype`: the measured ceiling achieved FLOP/s is
    compared with (vendor peaks are rarely reached: ~70-80 % of the datasheet on an H100)."""
    import torch

    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 4096)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        seconds = timed(lambda: a @ b, repeats, sync)
    return 2 * size**3 / min(seconds) / 1e12


def synchronizer(device) -> Callable[[], None]:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --- synthetic data -----------------------------------------------------------------------------------


def clip_seconds(n: int, rng: np.random.Generator, low: float = 2.0, high: float = 15.0) -> np.ndarray:
    """A Common-Voice-like length mix: log-normal around 5 s (mean ~5.5 s), clipped to [low, high]."""
    return np.clip(rng.lognormal(np.log(5.0), 0.45, n), low, high)


def speech_frames(seconds: np.ndarray, margin: int = 2) -> np.ndarray:
    """Encoder frames covering clips of `seconds` (+ the store's default margin), as precompute computes them."""
    samples = (seconds * FRAMES_PER_SECOND * SAMPLES_PER_FRAME).astype(np.int64)
    return np.minimum(MAX_FRAMES, -(-samples // SAMPLES_PER_FRAME) + margin)


def write_clips(folder: Path, n: int, seconds: tuple[float, float] = (2.0, 8.0), seed: int = 0) -> Path:
    """`n` speech-like MP3 clips (48 kHz mono, harmonic voice + noise) and a manifest.jsonl; returns it."""
    import soundfile

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = np.arange(int(rng.uniform(*seconds) * CLIP_RATE)) / CLIP_RATE
        pitch = rng.uniform(90, 250)
        voice = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in range(1, 8)) * np.sin(2 * np.pi * 3 * t) ** 2
        audio = (0.1 * voice + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
        soundfile.write(folder / f"clip{i:05d}.mp3", audio, CLIP_RATE)
        rows.append({"audio": f"clip{i:05d}.mp3", "text": f"synthetic clip number {i}"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    return manifest


# --- memory and files -----------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory of this process and all its descendants (DataLoader workers), summed, sampled
    every `interval` seconds on a thread while the block runs. `baseline` is the tree's RSS on entry."""

    def __init__(self, interval: float = 0.02, pid: int | None = None):
        self.interval, self.pid = interval, pid or os.getpid()
        self.peak = self.baseline = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def files_and_bytes(path: Path) -> tuple[int, int]:
    """(files, bytes on disk) under `path` (allocated blocks, as `du` counts them)."""
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.stat(os.path.join(root, name)).st_blocks * 512
    return files, size


def evict(path: Path) -> None:
    """Flush the files under `path` and drop them from the page cache, so the next read comes from the disk
    (a store larger than RAM is never cached); other processes' cached files are left alone."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# --- the TLE at its default size ---------------------------------------------------------------------------

TOKENS_PER_SECOND = 3.3  # Whisper BPE tokens per second of English speech (~2.5 words/s x 1.3 tokens/word)


def default_tle(d_model: int, vocab_size: int, embedding_size: int | None = None):
    """A fresh TLE of pipeline.toml's [tle] size for a teacher of width `d_model`, built as train-tle builds it
    (frozen teacher-sized token embeddings), with unit statistics and a zero tail template."""
    import torch

    from stages.tle_model import network_sizes
    from whistle_pipeline.config import load_config
    from whistle_pipeline.tle import TLEConfig, TLEModel

    arch = load_config().tle
    config = TLEConfig(
        vocab_size=vocab_size,
        embedding_size=embedding_size or d_model,
        **network_sizes(arch),
        languages=["en"],
        d_model=d_model,
        max_frames=MAX_FRAMES,
    )
    torch.manual_seed(0)
    model = TLEModel(config)
    model.token_embedding.weight.requires_grad_(arch.token_embeddings == "teacher")
    return model


def token_batch(frames: np.ndarray, rng: np.random.Generator, vocab_size: int):
    """Random transcripts for utterances of `frames` speech frames: ~3.3 tokens per second + the end token, and
    per-token durations that sum to the speech frames (text tokens >= 1 frame, the end token the 2-frame margin),
    as train-tle's teacher alignment gives. -> tokens (B, L), mask (B, L), durations (B, L) torch long/bool."""
    import torch

    seconds = frames / FRAMES_PER_SECOND
    n_text = np.maximum(1, np.round(seconds * TOKENS_PER_SECOND).astype(int))
    longest = int(n_text.max()) + 1
    tokens = torch.zeros(len(frames), longest, dtype=torch.long)  # (B, L)
    mask = torch.zeros(len(frames), longest, dtype=torch.bool)  # (B, L)
    durations = torch.zeros(len(frames), longest, dtype=torch.long)  # (B, L)
    for b, (f, n) in enumerate(zip(frames, n_text)):
        margin = min(2, int(f) - int(n))
        text_frames = 1 + rng.multinomial(int(f) - margin - n, np.full(n, 1.0 / n))  # (n,)
        tokens[b, :n] = torch.from_numpy(rng.integers(0, vocab_size - 1000, n))
        tokens[b, n] = vocab_size - 1  # stands for <|endoftext|>
        mask[b, : n + 1] = True
        durations[b, :n] = torch.from_numpy(text_frames)
        durations[b, n] = margin
    return tokens, mask, durations


def tle_train_step(model, optimizer, states, tokens, mask, durations, weights, grad_clip: float = 1.0) -> float:
    """One phase-1 train-tle step (stages/train_tle.py's loop body without the decoder term): normalise the
    teacher frames, forward at the true durations with the posterior, tle_loss, backward, clip, AdamW."""
    import torch

    from whistle_pipeline.tle import tle_loss

    language_ids = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)  # (B,)
    target = model.normalise(states)  # (B, T, D)
    out = model(tokens, mask, language_ids, durations=durations, target=target)
    terms = tle_loss(out, target, durations, mask, weights)
    terms.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad()
    return float(out.lengths.sum())


def write_store(
    path: Path,
    seconds: np.ndarray,
    d_model: int,
    shard_size: int,
    codec: str = "blosc-zstd",
    seed: int = 0,
    pool_frames: int = 20_000,
) -> None:
    """A speech-frames store of random float16 states (windows cut from a pool of random frames) for clips of
    `seconds`, written through the store API as precompute writes it (add with the tail; shards closed on a
    thread while the next one fills)."""
    from concurrent.futures import ThreadPoolExecutor

    from store import StoreSpec, StoreWriter, TeacherInfo

    rng = np.random.default_rng(seed)
    teacher = TeacherInfo(
        f"random-d{d_model}",
        "main",
        d_model,
        128 if d_model == 1280 else 80,
        16000,
        SAMPLES_PER_FRAME,
        FRAMES_PER_SECOND,
        MAX_FRAMES,
    )
    spec = StoreSpec(teacher, "speech", 2, shard_size, 2048, codec, 3, 0, f"bench-{len(seconds)}", "none")
    pool = rng.standard_normal((pool_frames, d_model), dtype=np.float32).astype(np.float16)  # (F, D)
    frames = speech_frames(seconds)
    writer = StoreWriter.open(path, spec, overwrite=True)
    with ThreadPoolExecutor(2) as closers:
        closing = []
        for k in range(-(-len(seconds) // shard_size)):
            shard = writer.shard(k)
            for i in range(k * shard_size, min(len(seconds), (k + 1) * shard_size)):
                start = int(rng.integers(0, pool_frames - MAX_FRAMES))
                window = pool[start : start + MAX_FRAMES]  # (1500, D)
                shard.add(
                    f"utt{i:07d}",
                    f"synthetic transcript {i}",
                    "en",
                    float(seconds[i]),
                    window[: frames[i]],
                    tail=window[frames[i] :],
                )
            closing.append(closers.submit(shard.close))
        for future in closing:
            future.result()
