"""finetune: adapt Whisper's decoder to target-domain text through the frozen TLE (docs/finetune.md).

Every training example is a full window of encoder states (B, max_frames, D) plus its transcript:

    text   target sentence ──► frozen TLE ──► speech frames (predicted length) + TLE tail template
           (finetune.text_states = "null": no TLE; a store's tail template over the whole window, a
           content-free control: the decoder can learn only the text's language model)
    audio  stored teacher states of real paired audio (anti-forgetting) + that store's tail template
    tts    stored teacher states of synthesized target speech (WhisTLE + TTS; TTS-only without text)
           ──► WhisperForConditionalGeneration(encoder_outputs=window, decoder_input_ids) ──► cross-entropy

The encoder never runs in training: its states come from the TLE or the stores. Each micro-batch
holds the configured fractions of the three kinds exactly over the run (counts are the differences of
floor(ratio * examples so far), so no random drift: stages/finetune_data.py). Tokens, prefix and labels follow
whistle_pipeline.text (the convention train-tle used): prefix tokens from the tokenizer, -100 only in
labels. Only the decoder trains: its layers and final layer norm, plus the tied token embeddings /
output projection and the positional embeddings when finetune.train_embeddings is true. The windows
and the losses are whistle_pipeline.windows.

`run` reads as the recipe: start, open the inputs, restore, open the streams, the validation data,
the loop (`train`), finish. The loop is written out with accelerate (one Accelerator, prepare, accumulate, mixed precision on
GPU, gradient clipping, warmup + cosine). Validation every val_every steps: the decoder loss on
held-out sentences (through the TLE, z = prior mean) and held-out stored utterances, and the WER on
val_audio with the real encoder (its states computed once: the encoder is frozen). The best step by
finetune.select_by is kept (long fine-tuning can fall into repetition loops on source audio).
Checkpoints (stages.training) hold the trainable weights, optimiser state, scheduler, each
rank's data positions and RNG states as safetensors + JSON: resuming unpickles nothing.

output_dir/  config.json, model.safetensors, generation_config.json   the adapted Whisper (original encoder)
             tokenizer + preprocessor_config.json                     pipeline("automatic-speech-recognition", OUT)
             config.toml, finetune.json                               resolved configuration, training summary
             train_log.csv, validation.csv, tensorboard/              logs
             best/, checkpoints/step-NNNNNNN/                         the best step's weights, resumable state
             damaged-shards/                                          under skip_damaged: each rank's scan (JSON)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate.utils import set_seed

from stages.finetune_checkpoints import (
    load_checkpoint,
    load_trainable,
    save_adapted,
    save_best,
    save_checkpoint,
    write_card,
)
from stages.finetune_data import (
    KINDS,
    HeldOut,
    StoreStream,
    TextStream,
    held_out_store_examples,
    mix_counts,
    stored_examples,
    text_examples,
)
from stages.finetune_inputs import Inputs, open_inputs, store_url
from stages.finetune_result import SUMMARY, FinetuneResult
from stages.finetune_validation import ValidationData, outliers, prepare_val_audio, select_by, validate
from stages.training import (
    CHECKPOINTS_DIR,
    TRAIN_LOG,
    VALIDATION_LOG,
    FiniteGuard,
    Logs,
    Setup,
    build_optimizer,
    latest_checkpoint,
    open_logs,
    start_run,
)
from stages.training_data import WithoutIds
from whistle_pipeline import preflight
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.plots import plot_training_curves
from whistle_pipeline.progress import progress_bar
from whistle_pipeline.text import IGNORE_INDEX, encode_texts
from whistle_pipeline.windows import (
    Example,
    SharedTail,
    kind_sums,
    select_trainable,
    token_losses,
)

log = logging.getLogger(__name__)

BEST_DIR = "best"
HOST = torch.device("cpu")  # where the frozen encoder waits while the decoder trains
TRAIN_COLUMNS = [
    "step",
    "epoch_text",
    "loss",
    "loss_audio",
    "loss_tts",
    "loss_text",
    "lr",
    "grad_norm",
    "examples_per_s",
]
VALIDATION_COLUMNS = ["step", "metric", "loss", "loss_audio", "loss_tts", "loss_text", "wer", "cer", "loops"]
# loss_curves.png: (title, [(column, log)]) per panel
CURVES = [
    ("training loss", [(f"loss{k}", "train") for k in ("", "_audio", "_tts", "_text")]),
    ("held-out loss", [(f"loss{k}", "held-out") for k in ("", "_audio", "_tts", "_text")]),
    ("val_audio WER / CER", [("wer", "held-out"), ("cer", "held-out")]),
    ("learning rate", [("lr", "train")]),
    ("gradient norm", [("grad_norm", "train")]),
    ("examples / s", [("examples_per_s", "train")]),
]


# ---- the recipe: start, inputs, restore, streams, validation data, the loop, finish ----------------------


@dataclass
class Training:
    """The prepared model and optimiser, and where the run stands (fresh or restored from a checkpoint)."""

    model: Any  # prepared by accelerate (wrapped across processes)
    whisper: Any  # the same model, unwrapped
    shared_tail: SharedTail
    optimizer: Any
    scheduler: Any
    step: int
    resumed_from: int  # 0 = a fresh run
    positions: dict[str, tuple[int, int]]  # kind -> this rank's stream position
    history: dict[str, Any]  # validation rows, best_step, best_metric, examples seen per kind


def run(config: PipelineConfig) -> FinetuneResult:
    """Fine-tune the decoder of config.teacher on config.finetune's text (and stores); save the adapted Whisper."""
    preflight.finetune(config)
    started = time.time()
    setup = start(config)
    inputs = open_inputs(setup)
    training = restore(setup, inputs)
    streams = open_streams(setup, inputs, training)
    val_data = validation_data(setup, inputs, training)
    last_scores = train(setup, inputs, training, streams, val_data)
    return finish(setup, inputs, training, val_data, last_scores, started)


def start(config: PipelineConfig) -> Setup:
    """That a resumed run keeps its settings (the inputs were checked by preflight); one Accelerator; the resolved
    config saved."""
    setup = start_run(config, "finetune", ("teacher", "finetune"))
    # latent draws and dropout differ per rank; a resumed run restores these generators from its checkpoint
    set_seed(config.finetune.seed + setup.accelerator.process_index)
    return setup


def restore(setup: Setup, inputs: Inputs) -> Training:
    """Choose what trains, build the optimiser, continue from the newest checkpoint (or start over), prepare."""
    settings, accelerator, output_dir = setup.settings, setup.accelerator, setup.output_dir
    model = inputs.teacher.model
    select_trainable(model, settings.train_embeddings)
    shared_tail = SharedTail(model)  # training steps project each window's common tail once per kind
    optimizer, scheduler = build_optimizer(model, settings)
    checkpoints = output_dir / CHECKPOINTS_DIR
    resume_from = latest_checkpoint(checkpoints) if settings.resume else None
    if not settings.resume and accelerator.is_main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)
        shutil.rmtree(output_dir / BEST_DIR, ignore_errors=True)
    state: dict[str, Any] = {
        "step": 0,
        "positions": {},
        "history": {"validation": [], "best_step": 0, "best_metric": None, "examples": {}},
    }
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, model, optimizer, scheduler, output_dir / BEST_DIR)
        log.info("resuming from %s (step %d)", resume_from, state["step"])
    # the scheduler is stepped by hand once per optimiser step (a prepared one steps once per process)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return Training(
        prepared,
        accelerator.unwrap_model(prepared),
        shared_tail,
        optimizer,
        scheduler,
        state["step"],
        state["step"] if resume_from is not None else 0,
        state["positions"],
        state["history"],
    )


def open_streams(setup: Setup, inputs: Inputs, training: Training) -> dict[str, StoreStream | TextStream]:
    """This rank's training examples of each kind drawn, from the restored positions."""
    settings, accelerator = setup.settings, setup.accelerator
    positions = training.positions
    streams: dict[str, StoreStream | TextStream] = {
        k: StoreStream(
            store_url(settings, k),
            WithoutIds(HeldOut(settings.val_fraction, settings.seed, False), inputs.dropped),
            settings.seed,
            settings.shuffle_buffer,
            settings.num_workers,
            tuple(positions.get(k, (0, 0))),
            settings.skip_damaged,
        )
        for k in inputs.stores
    }
    if inputs.text.train:
        streams["text"] = TextStream(
            inputs.text.train,
            settings.seed,
            accelerator.process_index,
            accelerator.num_processes,
            tuple(positions.get("text", (0, 0))),
        )
    return streams


def validation_data(setup: Setup, inputs: Inputs, training: Training) -> ValidationData:
    """The main process's held-out examples and val_audio's encoder states (other ranks: none)."""
    settings = setup.settings
    data = ValidationData({}, [], [], [])
    if not setup.accelerator.is_main_process:
        return data
    data.examples = {
        k: held_out_store_examples(
            store_url(settings, k),
            k,
            WithoutIds(HeldOut(settings.val_fraction, settings.seed, True), inputs.dropped),
            settings.val_size,
            settings.skip_damaged,
        )
        for k in inputs.stores
    }
    if inputs.text.train:
        data.examples["text"] = text_examples(inputs.text.held_out[: settings.val_size])
    if settings.val_audio:
        data.audio_clips, data.audio_states, data.audio_rejects = prepare_val_audio(
            setup.config, training.whisper, inputs.teacher.tokenizer, inputs.teacher.geometry
        )
    if settings.val_fraction > 0 and not any(data.examples.values()) and not settings.val_audio:
        log.warning("no held-out example and no val_audio: validation has nothing to score; the last step is kept")
    return data


def train(
    setup: Setup, inputs: Inputs, training: Training, streams: dict[str, Any], val_data: ValidationData
) -> list[Any]:
    """The loop: mixed micro-batches, accumulate, clip, step; log, validate and checkpoint on schedule.
    Returns val_audio's clip scores at the last validation."""
    settings, accelerator, device = setup.settings, setup.accelerator, setup.accelerator.device
    model, optimizer, scheduler, history = training.model, training.optimizer, training.scheduler, training.history
    tokenizer = inputs.teacher.tokenizer
    logs = open_logs(
        setup, (TRAIN_COLUMNS, VALIDATION_COLUMNS), training.step if training.resumed_from else None, asdict(settings)
    )
    bar = progress_bar(
        settings.steps, "finetune", "step", settings.progress and accelerator.is_main_process, initial=training.step
    )
    seen = {k: history["examples"].get(k, 0) for k in KINDS}
    window = TrainWindow()
    guard = FiniteGuard(device)  # checked before anything is logged, validated or saved
    zero = torch.zeros(2, dtype=torch.float64, device=device)  # (2,) the sums of a kind a batch lacks
    last_scores: list[Any] = []
    model.train()
    encoder_to(training.whisper, HOST)
    while training.step < settings.steps:
        for micro in range(settings.grad_accum):
            examples = next_examples(
                streams,
                mix_counts(
                    settings.batch_size,
                    settings.audio_ratio,
                    settings.tts_ratio,
                    training.step * settings.grad_accum + micro,
                ),
            )
            text = encode_texts(
                tokenizer,
                inputs.specials,
                [e.text for e in examples],
                [e.language for e in examples],
                inputs.max_positions,
                inputs.windows.front_end,
            ).to(device)
            with accelerator.accumulate(model), accelerator.autocast():
                windows, tail = inputs.windows.build_with_tail(examples, text, training=True)  # (B, F, D)
                with training.shared_tail(tail):
                    logits = model(
                        encoder_outputs=(windows,), decoder_input_ids=text.decoder_input_ids
                    ).logits  # (B, S, V)
                per_token = token_losses(logits, text.labels, settings.label_smoothing)  # (B, S)
                loss = per_token.sum() / (text.labels != IGNORE_INDEX).sum()
                kinds = [e.kind for e in examples]
                sums = kind_sums(per_token, text.labels, kinds)
                accelerator.backward(loss)
                norm = None
                if accelerator.sync_gradients:  # inf: the norm only
                    norm = accelerator.clip_grad_norm_(
                        model.parameters(), settings.grad_clip if settings.grad_clip > 0 else math.inf
                    )
                    window.grad_norm = torch.as_tensor(norm, device=device).detach()
                # the same term names every step (a kind this batch lacks counts 0 of 0); fp16's gradient
                # scaler skips its overflowing steps itself: only the losses are tested then
                pairs = {k: sums.get(k, zero) for k in KINDS if k in streams}
                guard.add(
                    training.step + 1,
                    {
                        "loss": loss.detach(),
                        **{f"loss_{k}": pair[0] / pair[1].clamp(min=1) for k, pair in pairs.items()},
                    },
                    None if norm is None or accelerator.scaler is not None else window.grad_norm,
                )
                optimizer.step()  # no-ops between accumulation boundaries
                optimizer.zero_grad()
            window.add(sums, len(examples) * accelerator.num_processes)
            for kind in set(kinds):
                seen[kind] += kinds.count(kind) * accelerator.num_processes
        scheduler.step()
        training.step += 1
        step = training.step
        bar.update(1)
        if step % settings.log_every == 0 or step == settings.steps:
            guard.check()
            row = window.row(step, scheduler.get_last_lr()[0], streams["text"].epoch if "text" in streams else "")
            if accelerator.is_main_process:
                logs.train.write(row)
                accelerator.log({f"train/{k}": v for k, v in row.items() if isinstance(v, float)}, step=step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            window = TrainWindow(grad_norm=window.grad_norm)
        if step % settings.val_every == 0 or step == settings.steps:
            guard.check()
            if accelerator.is_main_process:
                encoder_to(training.whisper, device)
                last_scores = validate_step(setup, inputs, training, val_data, logs)
                encoder_to(training.whisper, HOST)
            accelerator.wait_for_everyone()
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            guard.check()
            history["examples"] = seen
            checkpoint(setup, training, streams)
    bar.close()
    history["examples"] = seen
    encoder_to(training.whisper, device)
    accelerator.wait_for_everyone()
    return last_scores


def encoder_to(whisper: Any, device: torch.device) -> None:
    """Move the frozen encoder: training never runs it (its states come from the TLE and the stores; val_audio's
    were made once), so it waits in host memory while training, leaving the accelerator's memory to the batches,
    and comes back for validation and saving (generate() and device lookups follow the model's first weight,
    the encoder's). A no-op on a CPU run."""
    whisper.model.encoder.to(device)


def checkpoint(setup: Setup, training: Training, streams: dict[str, Any]) -> None:
    """Save the resumable state at training.step: weights, optimiser, scheduler, each rank's stream positions."""
    save_checkpoint(
        setup.accelerator,
        setup.output_dir / CHECKPOINTS_DIR,
        training.whisper,
        training.optimizer,
        training.scheduler,
        training.step,
        {k: stream.position for k, stream in streams.items()},
        training.history,
        setup.output_dir / BEST_DIR,
        setup.settings.keep_checkpoints,
    )


def next_examples(streams: dict[str, Any], counts: dict[str, int]) -> list[Example]:
    """One micro-batch: counts[kind] examples of each kind, grouped by kind in KINDS order."""
    examples: list[Example] = []
    for kind in KINDS:
        if counts[kind]:
            taken = streams[kind].take(counts[kind])
            examples += text_examples(taken) if kind == "text" else stored_examples(kind, taken)
    return examples


@dataclass
class TrainWindow:
    """What the steps since the last log row add up to (sums kept on the device until the row)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (2,) summed token loss, tokens
    examples: int = 0  # all ranks
    started: float = field(default_factory=time.time)
    grad_norm: torch.Tensor | None = None  # () of the last optimiser step

    def add(self, sums: dict[str, torch.Tensor], examples: int) -> None:
        for kind, pair in sums.items():
            self.sums[kind] = self.sums[kind] + pair if kind in self.sums else pair
        self.examples += examples

    def row(self, step: int, lr: float, epoch_text: Any) -> dict[str, Any]:
        """A train_log.csv row: the loss per label token, overall and per kind (one read-back)."""
        parts = list(self.sums.values())  # (2,) each
        if self.grad_norm is not None:
            parts.append(self.grad_norm.to(torch.float64).reshape(1))
        read = torch.cat(parts).tolist() if parts else []
        pairs = [(read[2 * k], read[2 * k + 1]) for k in range(len(self.sums))]
        grad_norm = read[-1] if self.grad_norm is not None else math.nan
        row: dict[str, Any] = {f"loss_{k}": total / max(n, 1) for k, (total, n) in zip(self.sums, pairs)}
        tokens = sum(n for _, n in pairs)
        row.update(
            step=step,
            loss=sum(total for total, _ in pairs) / max(1, tokens),
            lr=lr,
            grad_norm=grad_norm,
            examples_per_s=self.examples / (time.time() - self.started),
            epoch_text=epoch_text,
        )
        return row


def validate_step(setup: Setup, inputs: Inputs, training: Training, val_data: ValidationData, logs: Logs) -> list[Any]:
    """Validate at training.step (main process), log it, keep the best weights; val_audio's clip scores."""
    history, step, accelerator = training.history, training.step, setup.accelerator
    metrics, scores = validate_with(training.whisper, inputs, val_data, setup.config)
    metrics["step"] = step
    history["validation"].append(metrics)
    logs.validation.write({**metrics, "loops": len(metrics.get("loops", []))})
    accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
    if not math.isnan(metrics["metric"]) and (
        history["best_metric"] is None or metrics["metric"] < history["best_metric"]
    ):
        history["best_metric"], history["best_step"] = metrics["metric"], step
        save_best(training.whisper, setup.output_dir / BEST_DIR)
    log.info(
        "step %d validation: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    )
    return scores


def finish(
    setup: Setup, inputs: Inputs, training: Training, val_data: ValidationData, last_scores: list[Any], started: float
) -> FinetuneResult:
    """Save the best (or last) step's Whisper and the summary."""
    settings, accelerator, output_dir = setup.settings, setup.accelerator, setup.output_dir
    history, whisper, step = training.history, training.whisper, training.step
    saved_step = step
    if accelerator.is_main_process:
        best = output_dir / BEST_DIR / "trainable.safetensors"
        if settings.select_best and history["best_step"] != step and best.exists():
            load_trainable(whisper, best, accelerator.device)
            saved_step = history["best_step"]
            if val_data.audio_clips:  # per-clip scores of the weights that are saved
                last_scores = validate_with(whisper, inputs, val_data, setup.config)[1]
        elif val_data.audio_clips and not last_scores:  # a rerun of a finished run validated nothing
            last_scores = validate_with(whisper, inputs, val_data, setup.config)[1]
        save_adapted(whisper, inputs.teacher, output_dir)
    result = FinetuneResult(
        output_dir=str(output_dir),
        steps=step,
        resumed_from=training.resumed_from,
        train_examples={
            "text": len(inputs.text.train),
            **{
                k: len(r)
                - sum(d.utterances for d in inputs.damaged if d.store == r.url)
                - sum(reject["store"] == k for reject in inputs.store_rejects)
                for k, r in inputs.stores.items()
            },
        },
        held_out={k: len(v) for k, v in val_data.examples.items()}
        | ({"val_audio": len(val_data.audio_clips)} if settings.val_audio else {}),
        examples_seen=history["examples"],
        corpus_rejects=[asdict(r) for r in inputs.text.rejects],
        best_step=history["best_step"],
        select_by=select_by(settings),
        saved_step=saved_step,
        validation=history["validation"],
        outliers=outliers(last_scores, setup.config.evaluate.outliers),
        wall_seconds=time.time() - started,
        damaged_shards=[asdict(d) for d in inputs.damaged],
        store_rejects=inputs.store_rejects,
        precision_hint=setup.precision_hint(),
    )
    if accelerator.is_main_process:
        (output_dir / SUMMARY).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
        write_card(output_dir)
        plot_training_curves(
            output_dir / TRAIN_LOG, output_dir / VALIDATION_LOG, CURVES, output_dir / "loss_curves.png"
        )
    accelerator.end_training()
    return result


def validate_with(
    model: Any, inputs: Inputs, data: ValidationData, config: PipelineConfig
) -> tuple[dict[str, Any], list[Any]]:
    """`validate` with this run's windows, ratios and tokenizer."""
    return validate(model, inputs.windows, inputs.ratios, inputs.teacher.tokenizer, inputs.specials, data, config)
