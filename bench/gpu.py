"""One GPU call: where whisper-large-v3-sized work spends an accelerator, stage by stage.

Random weights of the real shapes (whisper-large-v3: d_model 1280, 32 + 32 layers, 20 heads, 128 mel bins,
1500 frames, vocabulary 51866; the WhisperConfig is built here, nothing is downloaded), synthetic speech-like
MP3 clips. For each stage it prints, as `name=value` lines:

  <stage>_seconds        wall seconds of one unit (an encoder batch, a training step, an aligned batch; the
                         precompute stage: the whole run over the clips), median of --repeats after a warm-up
  <stage>_per_s          its items per second (windows, utterances or examples)
  <stage>_tflop          FLOPs of one unit (torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions,
                         attention; a multiply-add counts 2), in TFLOP
  <stage>_mfu            achieved FLOP/s over the datasheet peak of the card (dense bf16; PEAK_TFLOPS, or
                         --peak-tflops); nan when the card is not in the table
  <stage>_mfu_measured   achieved FLOP/s over the best bf16 matmul measured in this run (matmul_tflops)
  <stage>_gpu_busy       share of the wall time some kernel runs (torch.profiler's CUDA kernel intervals,
                         merged, over the same timed units); nan on a CPU
  <stage>_peak_gb        torch.cuda.max_memory_allocated during the stage; nan on a CPU
  <stage>_syncs          host syncs per unit (torch.cuda.set_sync_debug_mode warnings; on a CPU, the
                         bench/tle_step.py count of read-backs) for the training steps and the finetune step

Stages: `encoder` (the encoder alone on ready log-mel batches), `precompute` (a real `whistle precompute` run:
decode, log-mel, encoder, store writes; `precompute_vs_encoder` = its windows/s over the encoder's), `alignment`
(train-tle's alignment of the precomputed store: stages/tle_data.align_shard), `tle_phase1` / `tle_phase2`
(train-tle's loop body at pipeline.toml's [tle] size: stages/train_tle.micro_batch_losses, backward, clipping,
AdamW, bf16 autocast, on the store's batches and the alignment's durations), `finetune` (bench/finetune_step.py's
stored-states decoder update with the tail shared), `loader` (FeatureDataset + DataLoader over the store:
`loader_frames_per_s` vs `tle_phase2_frames_per_s`, the speech frames a phase-2 step consumes per second).

    python bench/gpu.py                 # on a GPU: sized for under 8 minutes on one H100 (not yet run on one)
    python bench/gpu.py --quick         # CPU, whisper-tiny shapes, a few clips: the smoke test CI runs
"""

from __future__ import annotations

import functools
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import (
    default_tle,
    describe_machine,
    emit,
    encoder_flops,
    load_average,
    matmul_peak_tflops,
    median,
    synchronizer,
    write_clips,
)
from alignment import save_teacher
from finetune_step import Finetuner
from precompute import stage_config
from tle_step import count_read_backs
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from stages.precompute import run as run_precompute
from stages.tle_data import Collate, DurationTable, align_shard
from stages.tle_model import loss_weights
from stages.train_tle import micro_batch_losses
from stages.training import build_optimizer
from store import StoreReader
from store.dataset import FeatureDataset, pad_batch
from whistle_pipeline.config import load_config
from whistle_pipeline.decoder import load_frozen_teacher
from whistle_pipeline.teacher import LogMel, load_encoder

# Datasheet dense bf16 tensor-core peaks, TFLOP/s, by a piece of torch.cuda.get_device_name (first match wins).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM (H100 80GB HBM3)
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def datasheet_peak(device: torch.device) -> float:
    """The card's dense bf16 peak in TFLOP/s from PEAK_TFLOPS, nan when unknown (a CPU)."""
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((peak for piece, peak in PEAK_TFLOPS.items() if piece in name), math.nan)


class Probe:
    """Times a stage's unit of work and reads what it cost the device: FLOPs, busy share, peak memory, syncs."""

    def __init__(self, device: torch.device, peak: float, matmul: float, repeats: int):
        self.device, self.peak, self.matmul, self.repeats = device, peak, matmul, repeats
        self.sync = synchronizer(device)
        self.figures: dict[str, Any] = {}

    def flops(self, unit: Callable[[], Any]) -> float:
        with FlopCounterMode(display=False) as counter:
            unit()
        return float(counter.get_total_flops())

    def busy(self, unit: Callable[[], Any]) -> float:
        """Share of one unit's wall time that some CUDA kernel runs (overlapping kernels counted once)."""
        if self.device.type != "cuda":
            return math.nan
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        self.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            began = time.perf_counter()
            unit()
            self.sync()
            wall = time.perf_counter() - began
        spans = sorted(
            (e.time_range.start, e.time_range.end) for e in profiler.events() if e.device_type == DeviceType.CUDA
        )
        busy, end = 0.0, -math.inf
        for start, stop in spans:
            busy += max(0.0, stop - max(start, end))
            end = max(end, stop)
        return busy / 1e6 / wall

    def syncs(self, unit: Callable[[], Any]) -> float:
        """Host syncs of one unit: CUDA's sync debug warnings, or on a CPU the counted read-backs."""
        if self.device.type != "cuda":
            counts = count_read_backs()
            before = sum(counts.values())
            unit()
            return float(sum(counts.values()) - before)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                unit()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return float(sum("synchroniz" in str(w.message) for w in caught))

    def stage(
        self,
        name: str,
        unit: Callable[[], Any],
        items: int,
        flops: float | None = None,
        count_syncs: bool = False,
    ) -> float:
        """Measure `unit` (`items` windows/utterances/examples each; `flops` if known, else counted) -> seconds."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        unit()  # warm-up
        flops = self.flops(unit) if flops is None else flops
        seconds = []
        for _ in range(self.repeats):
            self.sync()
            began = time.perf_counter()
            unit()
            self.sync()
            seconds.append(time.perf_counter() - began)
        wall = median(seconds)
        achieved = flops / wall / 1e12
        self.figures.update(
            {
                f"{name}_seconds": wall,
                f"{name}_per_s": items / wall,
                f"{name}_tflop": flops / 1e12,
                f"{name}_mfu": achieved / self.peak,
                f"{name}_mfu_measured": achieved / self.matmul,
                f"{name}_gpu_busy": self.busy(unit),
                f"{name}_peak_gb": torch.cuda.max_memory_allocated(self.device) / 1e9
                if self.device.type == "cuda"
                else math.nan,
            }
        )
        if count_syncs:
            self.figures[f"{name}_syncs"] = self.syncs(unit)
        return wall


def encoder_alone(probe: Probe, teacher: Path, batch_size: int) -> None:
    """The encoder on a ready log-mel batch, its output cast to float16 as precompute does."""
    device, dtype = probe.device, torch.bfloat16 if probe.device.type == "cuda" else torch.float32
    encoder, geometry = load_encoder(str(teacher), "main", device, dtype)
    log_mel = LogMel(geometry).to(device)
    audio = torch.randn(batch_size, geometry.n_samples) * 0.1
    with torch.inference_mode():
        features = log_mel(audio.to(device)).to(dtype)  # (B, n_mels, 3000)

    def encode() -> None:
        with torch.inference_mode():
            encoder(features).last_hidden_state.to(torch.float16)

    probe.stage("encoder", encode, batch_size, encoder_flops(encoder.config) * batch_size)


def precompute(probe: Probe, folder: Path, manifest: Path, clips: int, batch_size: int) -> Path:
    """A whole precompute run over the clips into folder/store (FLOPs: the encoder's per window) -> the store."""
    from transformers import WhisperConfig

    device = probe.device
    workers = 2 if device.type == "cuda" else 0
    store = folder / "store"
    config = stage_config(folder / "teacher", manifest, store, str(device), "auto", batch_size, workers, clips, 0)
    per_window = encoder_flops(WhisperConfig.from_pretrained(folder / "teacher"))
    probe.stage("precompute", lambda: run_precompute(config), clips, per_window * clips)
    probe.figures["precompute_vs_encoder"] = probe.figures["precompute_per_s"] / probe.figures["encoder_per_s"]
    return store


def training_steps(probe: Probe, folder: Path, store: Path, batch_size: int) -> None:
    """The alignment of the store, then train-tle steps in phase 1 and 2 on its batches."""
    device = probe.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = load_frozen_teacher(str(folder / "teacher"), "main", device, dtype)
    reader = StoreReader(store)
    utterances = len(reader.index(0))
    record = {}

    def align() -> None:
        record.update(align_shard(reader, 0, teacher, batch_size))

    probe.stage("alignment", align, utterances)
    durations = DurationTable(record["durations"])
    collate = Collate(teacher.tokenizer, teacher.specials, durations, ["en"], teacher.max_positions)
    loader = DataLoader(
        FeatureDataset(store, shuffle=True, seed=0, shuffle_buffer=256),
        batch_size=batch_size,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    batches = [batch for batch, _ in zip(loader, range(2))]
    settings = load_config().train_tle
    config = teacher.model.config
    tle = default_tle(config.d_model, config.vocab_size).to(device).train()
    teacher.set_tail_template(tle.tail_template)
    optimizer, _ = build_optimizer(tle, settings)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    steps = iter(range(1 << 30))

    def train_step(weights: Any) -> None:
        batch = batches[next(steps) % len(batches)].to(device)
        with autocast:
            total, _ = micro_batch_losses(teacher, tle, tle, batch, weights, settings.decoder_ce_floor)
        total.backward()
        torch.nn.utils.clip_grad_norm_(tle.parameters(), settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad()

    for phase, step in (("tle_phase1", 0), ("tle_phase2", settings.decoder_ce_start)):
        unit = functools.partial(train_step, loss_weights(settings, step))
        wall = probe.stage(phase, unit, batch_size, count_syncs=True)
        probe.figures[f"{phase}_frames_per_s"] = np.mean([b.frames for b in batches]) / wall


def finetune(probe: Probe, size: str, store: Path, manifest: Path, batch_size: int) -> None:
    """bench/finetune_step.py's decoder update on stored states with the tail shared, bf16 autocast on a GPU."""
    finetuner = Finetuner(size, store, manifest, batch_size, probe.device)
    autocast = torch.autocast(probe.device.type, dtype=torch.bfloat16, enabled=probe.device.type == "cuda")

    def finetune_step() -> None:
        with autocast:
            finetuner.decoder_step(*finetuner.make_windows("stored, tail shared"))

    probe.stage("finetune", finetune_step, batch_size, count_syncs=True)


def loader_rate(store: Path, batch_size: int, workers: int) -> float:
    """Speech frames per second FeatureDataset + DataLoader (float16 batches) deliver over the store."""
    loader = DataLoader(
        FeatureDataset(store, shuffle=True, seed=0, shuffle_buffer=256),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(pad_batch, dtype=torch.float16),
    )
    began = time.perf_counter()
    frames = sum(int(batch["lengths"].sum()) for batch in loader)
    return frames / (time.perf_counter() - began)


@click.command()
@click.option("--clips", default=512, show_default=True, help="Synthetic clips precomputed (then aligned).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--finetune-batch-size", default=16, show_default=True, help="finetune.batch_size's default.")
@click.option("--repeats", default=3, show_default=True, help="Timed units of each stage (after a warm-up).")
@click.option("--peak-tflops", default=None, type=float, help="The card's dense bf16 peak (default: PEAK_TFLOPS).")
@click.option("--quick", is_flag=True, help="CPU, whisper-tiny shapes, 4 clips, one repeat: the CI smoke run.")
def main(
    clips: int, batch_size: int, finetune_batch_size: int, repeats: int, peak_tflops: float | None, quick: bool
) -> None:
    device = torch.device("cpu" if quick or not torch.cuda.is_available() else "cuda")
    size = "tiny" if quick else "large-v3"
    if quick:
        clips, batch_size, finetune_batch_size, repeats = 4, 2, 2, 1
    click.echo(describe_machine(str(device)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul = matmul_peak_tflops(device, dtype, size=1024 if quick else None, repeats=2 if quick else 10)
    peak = peak_tflops or datasheet_peak(device)
    probe = Probe(device, peak, matmul, repeats)
    with tempfile.TemporaryDirectory(prefix="whistle-gpu-") as tmp:
        folder = Path(tmp)
        with torch.device(device):  # random initialisation on the GPU: seconds, not minutes
            save_teacher(size, folder / "teacher", dtype)
        (folder / "clips").mkdir()
        manifest = write_clips(folder / "clips", clips)
        encoder_alone(probe, folder / "teacher", batch_size)
        store = precompute(probe, folder, manifest, clips, batch_size)
        training_steps(probe, folder, store, batch_size)
        finetune(probe, size, store, manifest, finetune_batch_size)
        probe.figures["loader_frames_per_s"] = loader_rate(store, batch_size, 2 if device.type == "cuda" else 0)
    probe.figures["loader_vs_step"] = probe.figures["loader_frames_per_s"] / probe.figures["tle_phase2_frames_per_s"]
    click.echo(
        f"{size} shapes, random weights, {clips} clips, batch {batch_size} (finetune {finetune_batch_size}); "
        f"{repeats} timed units per stage, medians; load after: {load_average()}"
    )
    emit(
        {
            "size": size,
            "device": torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu",
            "peak_tflops": peak,
            "matmul_tflops": matmul,
            **probe.figures,
        }
    )


if __name__ == "__main__":
    sys.exit(main())
