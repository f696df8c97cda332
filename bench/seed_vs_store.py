"""The seed's method against the store: TLE training that recomputes the teacher every step vs reading it.

The public WhisTLE implementation (the seed) runs the frozen Whisper encoder on every training batch to
get its targets (`get_teacher_states`). whistle runs it once (`whistle precompute`) and trains from the
store. Both sides here train the same TLE (pipeline.toml's [tle] size, fresh weights, AdamW) with the same
phase-1 step (bench/_common.tle_train_step, the loop body of stages/train_tle.py without the decoder term)
on the same clips in the same batch size, on this CPU:

  seed epoch    DataLoader decoding the MP3s (precompute's own ClipDataset: soundfile + soxr, 1 worker)
                -> log-mel + encoder on the padded 30 s windows (teacher_states) -> speech frames -> TLE step
  store epoch   FeatureDataset + pad_batch (1 worker) -> TLE step
  precompute    the whole `stages.precompute.run` (model loading, store creation and run record included)

Each repeat runs all three back to back (the machine's load changes by the minute); medians of
--repeats. Training for k epochs then costs k x seed epoch for the seed and precompute + k x store
epoch for whistle (every epoch does the same work, so totals are computed from the measured
per-epoch medians); `break_even_epochs` = precompute / (seed epoch - store epoch).
The teacher is a random-weight Whisper encoder of a released size (same FLOPs as the real one).

    python bench/seed_vs_store.py                         # tiny and base sizes, 16 clips, ~7 min
    python bench/seed_vs_store.py --sizes base --clips 64
    python bench/seed_vs_store.py --quick                 # a smoke run
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import (
    SIZES,
    default_tle,
    describe_machine,
    emit,
    load_average,
    median,
    save_random_encoder,
    table,
    tle_train_step,
    token_batch,
    write_clips,
)
from torch.utils.data import DataLoader

from stages.audio_batches import ClipDataset, collate
from stages.precompute import run as precompute
from stages.tle_model import loss_weights
from stages.training import build_optimizer
from store.dataset import FeatureDataset, pad_batch
from whistle_pipeline.config import load_config
from whistle_pipeline.sources import open_source
from whistle_pipeline.teacher import load_encoder, speech_frames, teacher_states

EPOCH_COUNTS = (1, 3, 10)


class Trainer:
    """A fresh TLE for the teacher's width and its optimiser; `step(states, lengths)` trains on one batch."""

    def __init__(self, d_model: int, vocab_size: int, seed: int):
        self.settings = load_config().train_tle
        self.model = default_tle(d_model, vocab_size).train()
        self.optimizer, _ = build_optimizer(self.model, self.settings)
        self.weights = loss_weights(self.settings, 0)
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    def step(self, states: torch.Tensor, lengths: np.ndarray) -> None:
        """states (B, T, D) teacher-scale speech frames, zero past each length."""
        tokens, mask, durations = token_batch(lengths, self.rng, self.vocab_size)
        tle_train_step(self.model, self.optimizer, states, tokens, mask, durations, self.weights)


def seed_epoch(trainer: Trainer, encoder, geometry, config, batch_size: int, epoch: int) -> float:
    """The seed's epoch: decode, encode every batch with the frozen teacher, train."""
    source = open_source(config.data)
    loader = DataLoader(
        ClipDataset(source, geometry, "none"),
        batch_size=batch_size,
        shuffle=True,
        num_workers=1,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(epoch),
    )
    began = time.perf_counter()
    for batch in loader:
        windows = teacher_states(encoder, batch.audio, geometry)  # (B, M, D): the teacher, again, every step
        lengths = np.array([speech_frames(n_samples, geometry, 2) for n_samples in batch.n_samples])  # (B,)
        states = windows[:, : lengths.max()].clone()  # (B, T, D)
        states[torch.arange(states.shape[1]) >= torch.from_numpy(lengths)[:, None]] = 0.0
        trainer.step(states, lengths)
    return time.perf_counter() - began


def store_epoch(trainer: Trainer, url: Path, batch_size: int, epoch: int) -> float:
    """whistle's epoch: stream the stored states, train."""
    dataset = FeatureDataset(url, shuffle=True, seed=0, shuffle_buffer=load_config().train_tle.shuffle_buffer)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1, collate_fn=pad_batch)
    began = time.perf_counter()
    for batch in loader:
        trainer.step(batch["states"], batch["lengths"].numpy())
    return time.perf_counter() - began


def measure_size(size: str, tmp: Path, manifest: Path, clips: int, batch_size: int, repeats: int) -> dict[str, float]:
    checkpoint = save_random_encoder(size, tmp / f"teacher-{size}")
    store = tmp / f"store-{size}"
    config = load_config(
        updates={
            "teacher": {"name_or_path": str(checkpoint), "device": "cpu"},
            "data": {"path": str(manifest)},
            "store": {"path": str(store)},
            "precompute": {"batch_size": batch_size, "num_workers": 1, "progress": False, "overwrite": True},
        }
    )

    def run_precompute() -> float:
        result = precompute(config)
        if result.clips != clips:
            raise RuntimeError(f"precompute stored {result.clips} of {clips} clips:\n{result.summary()}")
        return result.seconds

    run_precompute()  # warm-up, and the store the first store epoch reads
    encoder, geometry = load_encoder(str(checkpoint), "main", "cpu", torch.float32)
    vocab = SIZES[size].get("vocab_size", 51865)
    seed_trainer, store_trainer = Trainer(geometry.d_model, vocab, 0), Trainer(geometry.d_model, vocab, 0)
    precompute_s, seed_s, store_s, loads = [], [], [], []
    store_epoch(store_trainer, store, batch_size, 0)  # warm-up: first-call kernels and allocations, both sides
    seed_trainer.step(
        *next(
            (b["states"], b["lengths"].numpy())
            for b in DataLoader(FeatureDataset(store, shuffle=False), batch_size=batch_size, collate_fn=pad_batch)
        )
    )
    for epoch in range(repeats):  # all three back to back, so each repeat's figures share the machine's load
        precompute_s.append(run_precompute())
        seed_s.append(seed_epoch(seed_trainer, encoder, geometry, config, batch_size, epoch))
        store_s.append(store_epoch(store_trainer, store, batch_size, epoch))
        loads.append(load_average())
    return {
        "parameters_m": encoder.num_parameters() / 1e6,
        "tle_parameters_m": store_trainer.model.num_parameters() / 1e6,
        "precompute_s": median(precompute_s),
        "seed_epoch_s": median(seed_s),
        "store_epoch_s": median(store_s),
        "loads": ", ".join(loads),
        "seed_runs": seed_s,
        "store_runs": store_s,
        "precompute_runs": precompute_s,
    }


@click.command()
@click.option("--sizes", default="tiny,base", show_default=True, help="Teacher sizes (random Whisper encoders).")
@click.option("--clips", default=16, show_default=True, help="Clips in the training set (MP3, 48 kHz, 2-8 s).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--repeats", default=2, show_default=True, help="Timings of each side; medians are reported.")
@click.option("--quick", is_flag=True, help="tiny, 4 clips, one repeat: a smoke run.")
def main(sizes: str, clips: int, batch_size: int, repeats: int, quick: bool) -> None:
    if quick:
        sizes, clips, batch_size, repeats = "tiny", 4, 2, 1
    torch.manual_seed(0)
    click.echo(describe_machine())
    results = {}
    with tempfile.TemporaryDirectory(prefix="whistle-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        manifest = write_clips(tmp / "clips", clips)
        for size in sizes.split(","):
            results[size] = measure_size(size, tmp, manifest, clips, batch_size, repeats)
            shutil.rmtree(tmp / f"store-{size}", ignore_errors=True)

    figures = {"clips": clips, "batch_size": batch_size}
    rows = []
    for size, r in results.items():
        saved = r["seed_epoch_s"] - r["store_epoch_s"]
        break_even = r["precompute_s"] / saved if saved > 0 else float("inf")
        totals = {k: (k * r["seed_epoch_s"], r["precompute_s"] + k * r["store_epoch_s"]) for k in EPOCH_COUNTS}
        rows.append(
            [
                f"{size} ({r['parameters_m']:.1f} M enc.)",
                r["precompute_s"],
                r["seed_epoch_s"],
                r["store_epoch_s"],
                r["seed_epoch_s"] / r["store_epoch_s"],
                *(f"{seed:.0f} / {ours:.0f} ({seed / ours:.2f}x)" for seed, ours in totals.values()),
                break_even,
            ]
        )
        key = size.replace("-", "_")
        figures.update(
            {
                f"{key}_precompute_s": r["precompute_s"],
                f"{key}_seed_epoch_s": r["seed_epoch_s"],
                f"{key}_store_epoch_s": r["store_epoch_s"],
                f"{key}_epoch_speedup": r["seed_epoch_s"] / r["store_epoch_s"],
                f"{key}_break_even_epochs": break_even,
            }
        )
        for k, (seed, ours) in totals.items():
            figures[f"{key}_speedup_{k}_epochs"] = seed / ours
    tle_m = next(iter(results.values()))["tle_parameters_m"]
    click.echo(
        f"\n{clips} clips (MP3 48 kHz, 2-8 s), batches of {batch_size}, TLE at the [tle] default size "
        f"({tle_m:.1f} M parameters with the frozen token embeddings), CPU float32; {repeats} repeat(s), medians"
    )
    click.echo(
        table(
            [
                "teacher",
                "precompute s",
                "seed epoch s",
                "store epoch s",
                "epoch x",
                *(f"{k} epoch(s): seed / whistle s" for k in EPOCH_COUNTS),
                "break-even epochs",
            ],
            rows,
        )
    )
    for size, r in results.items():
        click.echo(
            f"{size}: per repeat seed {' '.join(f'{s:.1f}' for s in r['seed_runs'])}, store "
            f"{' '.join(f'{s:.1f}' for s in r['store_runs'])}, precompute "
            f"{' '.join(f'{s:.1f}' for s in r['precompute_runs'])} s; load average {r['loads']}"
        )
    emit(figures)


if __name__ == "__main__":
    main()
