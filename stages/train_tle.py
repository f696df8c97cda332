"""train-tle: learn the text-to-latent encoder from a feature store (docs/tle.md).

    store ──► held-out split (stable hash of each id)
          ──► per-token durations from the frozen teacher's alignment heads + DTW (cached in output_dir;
              stages/tle_data.py, shared with validate-tle)
          ──► FeatureDataset (ranks x workers, shuffle buffer, length groups) ──► TLE ──► losses ──► AdamW

Two phases. Phase 1 (step < decoder_ce_start) regresses the teacher's speech frames: masked MSE
(+ cosine) in the store's normalised space, beta * KL (annealed from 0, free bits) and the duration
loss. Phase 2 adds the frozen Whisper decoder's cross-entropy on the text given the TLE's full
window ("deep supervision"), the regression terms staying on as an anchor: regression alone gives
states the decoder cannot read, the decoder loss from scratch finds a shortcut. With
decoder_ce_floor = f > 0 the term is max(0, CE_tle - f * CE_real), CE_real being the decoder's
cross-entropy on the same batch's real states: the TLE is made as readable as speech, not more. With
decoder_kl_weight > 0 phase 2 also distils: KL(p_real || p_tle) of the decoder's next-token
distributions reading the real states and the TLE's window, so that it reads both alike
(whistle_pipeline.decoder.phase_2_terms).

`run` reads as the recipe: start, open the inputs, restore, open the batches, the validation data,
the loop (`train`), finish. The loop is written out with accelerate (one Accelerator, prepare, accumulate, mixed precision on
GPU). Every rank streams its own share of the shards and starts its next epoch when its share runs
out, so ranks never wait for each other at epoch ends. Checkpoints hold everything needed to continue
the same run: weights, optimiser state, scheduler, step, each rank's data position and RNG states, as
safetensors + JSON (stages.training): resuming unpickles nothing.

output_dir/  config.json + model.safetensors   the TLE (TLEModel.from_pretrained(output_dir))
             config.toml                       the resolved pipeline configuration
             durations/                        the teacher alignment per shard (JSON; reused on rerun)
             damaged-shards/                   under skip_damaged: each rank's scan of the store (JSON)
             checkpoints/step-NNNNNNN/         resumable state
             train_log.csv, validation.csv     per-step and per-validation metrics (+ tensorboard/)
             loss_curves.png, summary.json
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stages.tle_data import (
    Alignment,
    Collate,
    KeepSplit,
    TrainBatch,
    align_store,
    stream_batches,
    validate,
    validation_batches,
)
from stages.tle_model import build_model, loss_weights, pronunciation_front_end, step_values
from stages.tle_result import TrainTLEResult
from stages.training import (
    CHECKPOINTS_DIR,
    TRAIN_LOG,
    VALIDATION_LOG,
    FiniteGuard,
    Logs,
    Setup,
    build_optimizer,
    latest_checkpoint,
    load_checkpoint,
    open_logs,
    save_checkpoint,
    start_run,
)
from stages.training_data import DamagedShard, damaged_shards, open_store
from store import StoreReader
from store.dataset import FeatureDataset
from whistle_pipeline import preflight
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.corpus import is_held_out
from whistle_pipeline.decoder import FrozenTeacher, load_frozen_teacher, phase_2_terms
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.plots import plot_training_curves
from whistle_pipeline.progress import progress_bar
from whistle_pipeline.tle import LossWeights, TLEModel, tle_loss

log = logging.getLogger(__name__)

DURATIONS_DIR = "durations"
DAMAGE_DIR = "damaged-shards"  # each rank's scan of the store under skip_damaged
TRAIN_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "mse",
    "cosine",
    "kl",
    "beta",
    "length",
    "length_error",
    "decoder_ce",
    "real_decoder_ce",
    "decoder_kl",
    "decoder_ce_weight",
    "lr",
    "frames_per_s",
]
VALIDATION_COLUMNS = [
    "step",
    "mse",
    "cosine",
    "cosine_predicted",
    "length_error",
    "duration_mae",
    "decoder_ce",
    "decoder_ce_predicted",
    "real_decoder_ce",
    "wer_predicted",
    "real_wer",
]


# --- checkpoints and logs ----------------------------------------------------------------------------


def write_weights(model: TLEModel, folder: Path) -> None:
    """The TLE's weights in a checkpoint folder (model.safetensors)."""
    save_file(
        {name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(folder / "model.safetensors")
    )


# loss_curves.png: (title, [(column, log)]) per panel
CURVES = [
    ("training loss", [("loss", "train")]),
    ("masked MSE (normalised)", [("mse", "train"), ("mse", "held-out")]),
    ("decoder cross-entropy", [("decoder_ce", "train"), ("decoder_ce", "held-out"), ("real_decoder_ce", "held-out")]),
    ("held-out cosine / WER", [("cosine", "held-out"), ("wer_predicted", "held-out"), ("real_wer", "held-out")]),
    ("length", [("length", "train"), ("length_error", "held-out")]),
    ("KL (x beta: see beta)", [("kl", "train")]),
]


def _previous_validation(output_dir: Path) -> dict[str, float]:
    """The last row of validation.csv (a rerun of a finished run trains no step and validates nothing)."""
    path = output_dir / VALIDATION_LOG
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", "None")} if rows else {}


# --- the recipe: start (stages.training.start_run), inputs, restore, batches, validation data, the loop, finish ------------------------


@dataclass
class Inputs:
    """The frozen teacher, the store, and what its alignment leaves to train on."""

    teacher: FrozenTeacher
    reader: StoreReader
    damaged: list[DamagedShard]  # left out under skip_damaged
    alignment: Alignment
    languages: list[str]  # of the usable utterances, sorted: the TLE's language embeddings
    held_out: int  # usable utterances held out for validation
    collate: Collate

    @property
    def usable(self) -> int:
        return len(self.alignment.durations)


@dataclass
class Training:
    """The prepared TLE and optimiser, and where the run stands (fresh or restored from a checkpoint)."""

    model: Any  # prepared by accelerate (wrapped across processes)
    tle: TLEModel  # the same model, unwrapped
    optimizer: Any
    scheduler: Any
    step: int
    epoch: int  # this rank's data position: epoch, and batches read in it
    position: int
    resumed_from: int  # 0 = a fresh run


def run(config: PipelineConfig) -> TrainTLEResult:
    """Train the TLE on config.store.path against the teacher config.teacher.name_or_path."""
    preflight.train_tle(config)
    started = time.time()
    setup = start_run(config, "train_tle", ("teacher", "store.path", "tle", "train_tle"))
    inputs = open_inputs(setup)
    training = restore(setup, inputs)
    batches = open_batches(setup, inputs, training)
    val_batches = validation_data(setup, inputs)
    last_validation = train(setup, inputs, training, batches, val_batches)
    return finish(setup, inputs, training, last_validation, started)


def open_inputs(setup: Setup) -> Inputs:
    """The frozen teacher, the store (checked against it), damaged shards under skip_damaged, the alignment
    (cached), and the held-out split; refuses a store that leaves nothing to train or to validate on."""
    config, settings, accelerator = setup.config, setup.settings, setup.accelerator
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    teacher = load_frozen_teacher(
        config.teacher.name_or_path,
        config.teacher.revision,
        accelerator.device,
        teacher_dtype,
        config.teacher.attn_implementation,
    )
    reader = open_store(config.store.path, "store.path", teacher.info)
    damaged: list[DamagedShard] = []
    if settings.skip_damaged:  # a damaged shard is left out whole (its utterances lack durations below)
        damaged = damaged_shards(accelerator, config.store.path, setup.output_dir / DAMAGE_DIR)[0]
    alignment = align_store(
        accelerator,
        reader,
        teacher,
        config.teacher.name_or_path,
        setup.output_dir / DURATIONS_DIR,
        settings.batch_size,
        settings.progress and accelerator.is_main_process,
        frozenset(d.shard for d in damaged),
    )
    usable = alignment.durations.index.keys()
    languages = sorted({alignment.languages[i] for i in usable})
    if not usable:
        raise WhistleError(
            f"no utterance of store {config.store.path} is usable for training: "
            f"{len(alignment.rejects)} rejected, e.g. {next(iter(alignment.rejects.items()), '')}"
        )
    held_out = {i for i in usable if is_held_out(i, settings.val_fraction, settings.seed)}
    if not held_out:
        raise WhistleError(
            f"train_tle.val_fraction = {settings.val_fraction} holds out none of the {len(usable)} "
            "usable utterances: raise it"
        )
    if len(held_out) == len(usable):
        raise WhistleError("every usable utterance is held out: lower train_tle.val_fraction")
    log.info(
        "%d utterances: %d for training, %d held out, %d unusable; languages %s",
        len(alignment.languages),
        len(usable) - len(held_out),
        len(held_out),
        len(alignment.rejects),
        ", ".join(languages),
    )
    front_end = pronunciation_front_end(config.tle.pronunciation, languages)
    collate = Collate(
        teacher.tokenizer, teacher.specials, alignment.durations, languages, teacher.max_positions, front_end
    )
    return Inputs(teacher, reader, damaged, alignment, languages, len(held_out), collate)


def restore(setup: Setup, inputs: Inputs) -> Training:
    """A fresh TLE and optimiser, continued from the newest checkpoint (or started over), prepared."""
    settings, accelerator = setup.settings, setup.accelerator
    model = build_model(setup.config, inputs.reader, inputs.teacher, inputs.languages, inputs.collate.front_end)
    optimizer, scheduler = build_optimizer(model, settings)
    inputs.teacher.set_tail_template(model.tail_template)
    checkpoints = setup.output_dir / CHECKPOINTS_DIR
    resume_from = latest_checkpoint(checkpoints) if settings.resume else None
    if not settings.resume and accelerator.is_main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)
    position = {"step": 0, "epoch": 0, "position": 0}
    if resume_from is not None:
        position = load_checkpoint(accelerator, resume_from, optimizer, scheduler, "train_tle")
        model.load_state_dict(load_file(str(resume_from / "model.safetensors"), device=str(accelerator.device)))
        log.info("resuming from %s (step %d)", resume_from, position["step"])
    # the scheduler is stepped by hand once per optimiser step (a prepared one steps once per process)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return Training(
        prepared,
        accelerator.unwrap_model(prepared),
        optimizer,
        scheduler,
        position["step"],
        position["epoch"],
        position["position"],
        position["step"] if resume_from is not None else 0,
    )


def open_batches(setup: Setup, inputs: Inputs, training: Training) -> Iterator[tuple[int, int, TrainBatch]]:
    """This rank's training batches, forever, from the restored data position."""
    settings = setup.settings
    train_set = FeatureDataset(
        setup.config.store.path,
        shuffle=True,
        seed=settings.seed,
        shuffle_buffer=settings.shuffle_buffer,
        length_bucket=settings.length_bucket,
        keep=KeepSplit(inputs.alignment.durations, False, settings.val_fraction, settings.seed),
        skip_damaged=settings.skip_damaged,
    )
    return stream_batches(
        train_set,
        inputs.collate,
        settings.batch_size,
        settings.num_workers,
        settings.seed,
        training.epoch,
        training.position,
        pin_memory=setup.accelerator.device.type == "cuda",
    )


def validation_data(setup: Setup, inputs: Inputs) -> list[TrainBatch]:
    """The main process's held-out batches (other ranks: none)."""
    settings = setup.settings
    if not setup.accelerator.is_main_process:
        return []
    return validation_batches(
        setup.config.store.path,
        inputs.collate,
        KeepSplit(inputs.alignment.durations, True, settings.val_fraction, settings.seed),
        settings.val_size,
        settings.batch_size,
        settings.skip_damaged,
    )


def train(
    setup: Setup,
    inputs: Inputs,
    training: Training,
    batches: Iterator[tuple[int, int, TrainBatch]],
    val_batches: list[TrainBatch],
) -> dict[str, float]:
    """The loop: phase 1 regression, phase 2 adds the frozen decoder's terms; accumulate, clip, step; log,
    validate and checkpoint on schedule. Returns the last validation's metrics."""
    settings, accelerator, device = setup.settings, setup.accelerator, setup.accelerator.device
    model, tle, optimizer, scheduler = training.model, training.tle, training.optimizer, training.scheduler
    logs = open_logs(
        setup,
        (TRAIN_COLUMNS, VALIDATION_COLUMNS),
        training.step if training.resumed_from else None,
        {**asdict(setup.config.tle), **asdict(settings)},
    )
    bar = progress_bar(
        settings.steps, "train-tle", "step", settings.progress and accelerator.is_main_process, initial=training.step
    )
    window = TrainWindow()
    guard = FiniteGuard(device)  # checked before anything is logged, validated or saved
    validation: dict[str, float] = {}
    model.train()
    while training.step < settings.steps:
        weights = loss_weights(settings, training.step)
        training.epoch, training.position, batch = next(batches)
        batch = batch.to(device)
        with accelerator.accumulate(model), accelerator.autocast():
            total, values = micro_batch_losses(inputs.teacher, model, tle, batch, weights, settings.decoder_ce_floor)
            accelerator.backward(total)
            norm = None
            if accelerator.sync_gradients:  # inf: the norm only
                norm = accelerator.clip_grad_norm_(
                    model.parameters(), settings.grad_clip if settings.grad_clip > 0 else math.inf
                )
            # fp16's gradient scaler skips its overflowing steps itself: only the losses are tested then
            guard.add(
                training.step + 1,
                values,
                None if norm is None or accelerator.scaler is not None else torch.as_tensor(norm, device=device),
            )
            optimizer.step()  # no-ops between accumulation boundaries
            optimizer.zero_grad()
        window.add(values, batch.frames)
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        training.step += 1
        step = training.step
        bar.update(1)
        if step % settings.log_every == 0 or step == settings.steps:
            guard.check()
            frames = accelerator.reduce(torch.tensor(window.frames, device=device), "sum").item()
            row = window.row(step, training.epoch, weights, scheduler.get_last_lr()[0], frames)
            if accelerator.is_main_process:
                logs.train.write(row)
                accelerator.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "epoch")}, step=step)
                bar.set_postfix(
                    loss=f"{row['loss']:.3f}", mse=f"{row['mse']:.3f}", ce=f"{row.get('decoder_ce', float('nan')):.2f}"
                )
            window = TrainWindow()
        if step % settings.val_every == 0 or step == settings.steps:
            guard.check()
            if accelerator.is_main_process:
                validation = validate_step(setup, inputs, training, val_batches, logs, validation)
            accelerator.wait_for_everyone()
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            guard.check()
            checkpoint(setup, training)
    bar.close()
    accelerator.wait_for_everyone()
    return validation


def micro_batch_losses(
    teacher: FrozenTeacher, model: Any, tle: TLEModel, batch: TrainBatch, weights: LossWeights, ce_floor: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's forward: (the loss to back-propagate, what it adds to the train log as () tensors
    on the device). Phase 2 (a decoder weight > 0) adds the frozen decoder's terms. Nothing is read back."""
    target = tle.normalise(batch.states)  # (B, T, D)
    text = batch.text
    out = model(
        text.tle_tokens,
        text.tle_mask,
        batch.language_ids,
        durations=batch.durations,
        target=target,
        longest=batch.states.shape[1],  # the collate cut the states to the longest speech
        pronunciation=text.pronunciation,
    )
    decoder = None
    if weights.decoder_ce > 0 or weights.decoder_kl > 0:  # phase 2
        decoder = phase_2_terms(teacher, tle, out, batch.states, text, ce_floor, weights.decoder_kl)
    terms = tle_loss(
        out,
        target,
        batch.durations,
        text.tle_mask,
        weights,
        None if decoder is None else decoder.charged_ce,
        None if decoder is None else decoder.kl,
    )
    return terms.total, step_values(terms, decoder, length_error(tle, out, batch))


def checkpoint(setup: Setup, training: Training) -> None:
    """Save the resumable state at training.step: weights, optimiser, scheduler, this rank's data position."""
    save_checkpoint(
        setup.accelerator,
        setup.output_dir / CHECKPOINTS_DIR,
        training.step,
        {"epoch": training.epoch, "position": training.position},
        partial(write_weights, training.tle),
        training.optimizer,
        training.scheduler,
        setup.settings.keep_checkpoints,
    )


@torch.no_grad()
def length_error(tle: TLEModel, out: Any, batch: TrainBatch) -> torch.Tensor:
    """|predicted - true| / true speech frames of a training batch, its mean () on the device."""
    predicted = tle.durations_from_log(out.log_durations.detach(), batch.text.tle_mask).sum(1)  # (B,)
    return ((predicted - out.lengths).abs() / out.lengths).float().mean()


@dataclass
class TrainWindow:
    """What the micro-batches since the last log row add up to (sums kept on the device until the row)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    frames: int = 0  # this rank's speech frames
    started: float = field(default_factory=time.time)

    def add(self, values: dict[str, torch.Tensor], frames: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1
        self.frames += frames

    def row(self, step: int, epoch: int, weights: LossWeights, lr: float, frames: float) -> dict[str, Any]:
        """A train_log.csv row: the means since the last row (one read-back); `frames` summed over the ranks."""
        sums = torch.stack(list(self.sums.values())).tolist() if self.sums else []
        row: dict[str, Any] = {name: value / self.count for name, value in zip(self.sums, sums)}
        row.update(
            step=step,
            epoch=epoch,
            beta=weights.beta,
            decoder_ce_weight=weights.decoder_ce,
            lr=lr,
            frames_per_s=frames / (time.time() - self.started),
        )
        return row


def validate_step(
    setup: Setup,
    inputs: Inputs,
    training: Training,
    val_batches: list[TrainBatch],
    logs: Logs,
    previous: dict[str, float],
) -> dict[str, float]:
    """Validate at training.step (main process) and log it. The real states' figures are measured at the
    first validation and carried over from `previous` after that: the teacher and the batches stay fixed."""
    step = training.step
    reference = {k: previous[k] for k in ("real_decoder_ce", "real_wer") if k in previous} if previous else None
    metrics = validate(
        training.tle, inputs.teacher, val_batches, setup.settings.val_wer_size, setup.accelerator.device, reference
    )
    metrics["step"] = step
    logs.validation.write(metrics)
    setup.accelerator.log({f"val/{k}": v for k, v in metrics.items() if k != "step"}, step=step)
    log.info("step %d held-out: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def finish(
    setup: Setup, inputs: Inputs, training: Training, last_validation: dict[str, float], started: float
) -> TrainTLEResult:
    """Save the TLE, its loss curves and the summary."""
    accelerator, output_dir = setup.accelerator, setup.output_dir
    result = TrainTLEResult(
        output_dir=str(output_dir),
        steps=training.step,
        resumed_from=training.resumed_from,
        train_utterances=inputs.usable - inputs.held_out,
        held_out_utterances=inputs.held_out,
        alignment_rejects=inputs.alignment.rejects,
        wall_seconds=time.time() - started,
        validation=last_validation or _previous_validation(output_dir),
        damaged_shards=[asdict(d) for d in inputs.damaged],
        precision_hint=setup.precision_hint(),
    )
    if accelerator.is_main_process:
        training.tle.save_pretrained(output_dir)
        plot_training_curves(
            output_dir / TRAIN_LOG, output_dir / VALIDATION_LOG, CURVES, output_dir / "loss_curves.png"
        )
        (output_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    accelerator.end_training()
    return result
