"""finetune: adapt Whisper's decoder to target-domain text through the frozen TLE (DESIGN.md §7).

Every training example is a full window of encoder states (B, max_frames, D) plus its transcript:

    text   target sentence ──► frozen TLE ──► speech frames (predicted length) + TLE tail template
    audio  stored teacher states of real paired audio (anti-forgetting) + that store's tail template
    tts    stored teacher states of synthesized target speech (WhisTLE + TTS; TTS-only without text)
           ──► WhisperForConditionalGeneration(encoder_outputs=window, decoder_input_ids) ──► cross-entropy

The encoder never runs in training: its states come from the TLE or the stores. Each micro-batch
holds the configured fractions of the three kinds exactly over the run (counts are the differences of
floor(ratio * examples so far), so no random drift). Tokens, prefix and labels follow
whistle_pipeline.text (the convention train-tle used): prefix tokens from the tokenizer, -100 only in
labels. Only the decoder trains: its layers and final layer norm, plus the tied token embeddings /
output projection and the positional embeddings when finetune.train_embeddings is true.

The loop is written out with accelerate (one Accelerator, prepare, accumulate, mixed precision on
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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from store import StoreReader
from store.dataset import FeatureDataset
from stages import training
from whistle_pipeline.config import ConfigError, PipelineConfig
from whistle_pipeline.corpus import TextReject, TextRow, is_held_out, read_corpus
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.text import IGNORE_INDEX, SpecialTokens, TextBatch, encode_texts, is_multilingual, text_tokens
from stages.training import (
    CsvLog,
    DamagedShard,
    WithoutIds,
    build_optimizer,
    damage_summary,
    damaged_shards,
    endless_epochs,
    held_out_items,
    latest_checkpoint,
    make_accelerator,
)

log = logging.getLogger(__name__)

KINDS = ("audio", "tts", "text")  # the order of the kinds inside a batch
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
TRAIN_LOG = "train_log.csv"
VALIDATION_LOG = "validation.csv"
SUMMARY = "finetune.json"
TRAIN_COLUMNS = ["step", "epoch_text", "loss", "loss_audio", "loss_tts", "loss_text", "lr", "grad_norm",
                 "examples_per_s"]
VALIDATION_COLUMNS = ["step", "metric", "loss", "loss_audio", "loss_tts", "loss_text", "wer", "cer", "loops"]
DAMAGE_DIR = "damaged-shards"  # each rank's scan of the stores under skip_damaged
# Keys that may change between a run and its resumption; any other change starts a different run.
RESUMABLE_KEYS = {"progress", "log_every", "val_every", "checkpoint_every", "keep_checkpoints", "num_workers",
                  "resume", "skip_damaged"}


# ---- result ---------------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    output_dir: str
    steps: int
    resumed_from: int  # 0 = a fresh run
    train_examples: dict[str, int]  # kind -> sentences / utterances available for training
    held_out: dict[str, int]  # kind -> examples scored at each validation
    examples_seen: dict[str, int]  # kind -> examples trained on (this run, all ranks)
    corpus_rejects: list[dict[str, str]]
    best_step: int
    select_by: str
    saved_step: int  # the step whose decoder was written to output_dir
    validation: list[dict[str, Any]] = field(default_factory=list)  # every validation of the run
    outliers: list[dict[str, Any]] = field(default_factory=list)  # val_audio's worst clips at the saved step
    wall_seconds: float = 0.0
    damaged_shards: list[dict[str, Any]] = field(default_factory=list)  # left out under finetune.skip_damaged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mix = ", ".join(f"{self.examples_seen[k]} {k}" for k in KINDS if self.examples_seen.get(k))
        lines = [f"fine-tuned the decoder for {self.steps} steps"
                 + (f" (resumed at step {self.resumed_from})" if self.resumed_from else "")
                 + f" in {self.wall_seconds / 60:.1f} min on {mix or 'no new'} examples"]
        if self.corpus_rejects:
            first = self.corpus_rejects[0]
            lines.append(f"  {len(self.corpus_rejects)} sentence(s) not used (first: {first['id']}: {first['reason']})")
        if self.damaged_shards:
            lines.append(damage_summary([DamagedShard(**d) for d in self.damaged_shards]))
        saved = next((v for v in self.validation if v["step"] == self.saved_step), None)
        if saved:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in saved.items()
                              if k not in ("step", "loops") and isinstance(v, float) and not math.isnan(v))
            lines.append(f"  step {self.saved_step} ({'best by ' + self.select_by if self.saved_step == self.best_step else 'last'}): {shown}")
            if saved.get("loops"):
                lines.append(f"  repetition loops on val_audio: {', '.join(saved['loops'])}")
        lines.append(f"  model: {self.output_dir} (Whisper with the adapted decoder; transformers.pipeline loads it)")
        return "\n".join(lines)


# ---- inputs ---------------------------------------------------------------------------------------

def check_inputs(config: PipelineConfig) -> None:
    """The inputs the ratios call for must be given, and inputs given must be used (all problems at once)."""
    settings = config.finetune
    problems = []
    if settings.text_ratio > 1e-9:
        if not settings.text:
            problems.append(f"finetune.text is empty but {settings.text_ratio:.2f} of each batch is text: give a "
                            "target-domain corpus (or set audio_ratio + tts_ratio = 1 for audio-only fine-tuning)")
        if not settings.tle_path:
            problems.append("finetune.tle_path is empty but text examples are drawn: give a `whistle train-tle` output")
        elif not Path(settings.tle_path).is_dir():
            problems.append(f"finetune.tle_path = {settings.tle_path!r} is not a folder: train a TLE first "
                            "(`whistle train-tle`) or point at its output_dir")
    elif settings.text:
        problems.append("finetune.text is given but audio_ratio + tts_ratio = 1 leaves no room for text: lower them")
    for kind, ratio, store in (("audio", settings.audio_ratio, settings.audio_store),
                               ("tts", settings.tts_ratio, settings.tts_store)):
        if ratio > 0 and not store:
            problems.append(f"finetune.{kind}_ratio = {ratio:g} but finetune.{kind}_store is empty: give the store "
                            f"or set {kind}_ratio = 0")
        if store and ratio == 0:
            problems.append(f"finetune.{kind}_store is given but finetune.{kind}_ratio = 0: it would never be read")
    if problems:
        raise ConfigError(problems, "finetune inputs")


def mix_counts(batch_size: int, audio_ratio: float, tts_ratio: float, index: int) -> dict[str, int]:
    """Examples of each kind in micro-batch `index`: floor(ratio * examples so far) differences, so the
    fractions hold exactly over the run and every batch is within one example of them."""
    before, after = index * batch_size, (index + 1) * batch_size
    audio = math.floor(after * audio_ratio + 1e-9) - math.floor(before * audio_ratio + 1e-9)
    upto_tts = math.floor(after * (audio_ratio + tts_ratio) + 1e-9) - math.floor(before * (audio_ratio + tts_ratio) + 1e-9)
    return {"audio": audio, "tts": upto_tts - audio, "text": batch_size - upto_tts}


class HeldOut:
    """FeatureDataset `keep`: utterances on one side of the held-out split (picklable for workers)."""

    def __init__(self, fraction: float, seed: int, held_out: bool):
        self.fraction, self.seed, self.held_out = fraction, seed, held_out

    def __call__(self, utt_id: str) -> bool:
        return is_held_out(utt_id, self.fraction, self.seed) == self.held_out


class StoreStream:
    """Stored utterances for one kind, forever: a new epoch starts when this rank's share runs out.

    `position` (epoch, items taken this epoch) is saved in checkpoints; resuming replays the epoch's
    order and skips the items already taken (read and dropped).
    """

    def __init__(self, url: str, keep: Callable[[str], bool], seed: int, shuffle_buffer: int, num_workers: int,
                 position: tuple[int, int] = (0, 0), skip_damaged: bool = False):
        self.dataset = FeatureDataset(url, shuffle=True, seed=seed, shuffle_buffer=shuffle_buffer, keep=keep,
                                      skip_damaged=skip_damaged)
        self.epoch, self.taken = position
        self._items = endless_epochs(self.dataset, seed, self.epoch, self.taken, batch_size=None,
                                     num_workers=num_workers)

    def take(self, count: int) -> list[dict[str, Any]]:
        items = []
        for _ in range(count):
            self.epoch, self.taken, item = next(self._items)
            items.append(item)
        return items

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.taken


class TextStream:
    """Training sentences, reshuffled each epoch (seed + epoch); rank r of W takes every W-th one."""

    def __init__(self, rows: Sequence[TextRow], seed: int, rank: int, world_size: int,
                 position: tuple[int, int] = (0, 0)):
        self.rows, self.seed, self.rank, self.world_size = list(rows), seed, rank, world_size
        self.epoch, self.taken = position
        if len(self.rows) < world_size:
            raise WhistleError(f"{len(self.rows)} training sentences cannot be shared by {world_size} processes")
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
        return order[self.rank::self.world_size][: len(self.rows) // self.world_size]  # equal shares

    def take(self, count: int) -> list[TextRow]:
        out = []
        for _ in range(count):
            if self.taken == len(self._order):
                self.epoch, self.taken = self.epoch + 1, 0
                self._order = self._epoch_order()
            out.append(self.rows[self._order[self.taken]])
            self.taken += 1
        return out

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.taken


@dataclass
class Example:
    """One training or held-out example before batching: stored states or a sentence for the TLE."""

    kind: str
    text: str
    language: str
    states: torch.Tensor | None = None  # (T, D) stored frames; None for text examples


def stored_examples(kind: str, items: Sequence[dict[str, Any]]) -> list[Example]:
    return [Example(kind, item["text"], item["language"], item["states"]) for item in items]


def text_examples(rows: Sequence[TextRow]) -> list[Example]:
    return [Example("text", row.text, row.language) for row in rows]


# ---- the model --------------------------------------------------------------------------------------

def select_trainable(model: Any, train_embeddings: bool) -> list[str]:
    """Freeze everything but the decoder's layers and final norm (+ embeddings); return the trainable names.

    proj_out is tied to decoder.embed_tokens (one Parameter), so it trains exactly when the embeddings do.
    """
    model.requires_grad_(False)
    decoder = model.model.decoder
    decoder.layers.requires_grad_(True)
    decoder.layer_norm.requires_grad_(True)
    if train_embeddings:
        decoder.embed_tokens.requires_grad_(True)
        decoder.embed_positions.requires_grad_(True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable weights, by name (what checkpoints and best/ hold; the rest is the teacher's)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class Windows:
    """What produces full windows: the frozen TLE and each store's tail template, on the device."""

    tle: Any | None  # whistle_pipeline.tle.TLEModel, eval mode, frozen
    templates: dict[str, torch.Tensor]  # kind -> (max_frames, D) tail template of its store
    sample_latent: bool

    def build(self, examples: Sequence[Example], text: TextBatch, training: bool) -> torch.Tensor:
        """Full windows (B, max_frames, D) for `examples`, in order; `text` is their encode_texts batch."""
        return self.build_with_tail(examples, text, training)[0]

    def build_with_tail(self, examples: Sequence[Example], text: TextBatch,
                        training: bool) -> tuple[torch.Tensor, CommonTail]:
        """build(), and where its windows share their tail template (for SharedTail)."""
        from whistle_pipeline.tle import assemble_window

        parts, groups, longest = [], [], 0
        kinds = [e.kind for e in examples]
        for kind in dict.fromkeys(kinds):  # in the order the examples come
            rows = [i for i, k in enumerate(kinds) if k == kind]
            assert rows == list(range(rows[0], rows[-1] + 1)), "examples are grouped by kind"
            if kind == "text":
                window, lengths = self._tle_windows(text, rows, training)
            else:
                template = self.templates[kind]  # (F, D)
                lengths = torch.tensor([len(examples[i].states) for i in rows], device=template.device)  # (b,)
                states = torch.zeros(len(rows), int(lengths.max()), template.shape[1], device=template.device)
                for b, i in enumerate(rows):
                    states[b, : lengths[b]] = examples[i].states.to(template.device)  # (T, D) float16 -> float32
                window = assemble_window(states, lengths, template)  # (b, F, D)
            parts.append(window)
            groups.append((rows[0], rows[-1] + 1))
            longest = max(longest, int(lengths.max()))
        return torch.cat(parts), CommonTail(longest, tuple(groups))  # (B, F, D)

    @torch.no_grad()
    def _tle_windows(self, text: TextBatch, rows: list[int], training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tle = self.tle
        tokens, mask = text.tle_tokens[rows], text.tle_mask[rows]  # (b, L)
        longest = int(mask.sum(1).max())
        language_ids = tle.language_ids([text.languages[i] for i in rows])
        speech, lengths = tle.speech_frames(tokens[:, :longest], mask[:, :longest], language_ids,
                                            sample_latent=training and self.sample_latent)  # (b, T, D), (b,)
        return tle.full_window(speech, lengths), lengths  # (b, F, D), (b,)


@dataclass(frozen=True)
class CommonTail:
    """Where a batch of full windows repeats itself: from frame `start` on, every row of a group (rows
    [first, end) — one kind, so one tail template) holds the same frames."""

    start: int
    groups: tuple[tuple[int, int], ...]


class SharedTail:
    """The decoder's cross-attention key/value projections, made once per group for the common tail.

    Most of a 30 s window is the tail template, the same in every example of a kind; a projection is per
    frame, so its output there is the same too. Inside `with shared(tail):` each k_proj/v_proj projects
    frames [0, tail.start) of every row and frames [tail.start, F) of one row per group, expanded to the
    group (gradients reach the weights through both parts, as before). Exact: the same logits and
    gradients as projecting every frame (tested); bench/finetune_step.py measured 1.35-1.7x cheaper
    steps. The modules are not replaced (their forward is, on the instance), so state-dict keys and
    save_pretrained are untouched, and outside the context they are plain nn.Linear calls. (train-tle's
    frozen decoder goes further: whistle_pipeline.decoder.TailTemplateProjection projects its one
    template once for the whole run; here the weights train, so the tail is projected every step.)
    """

    def __init__(self, whisper: Any):
        self.tail: CommonTail | None = None
        self.projections = []
        for layer in whisper.model.decoder.layers:
            for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
                projection.forward = partial(self._project, projection)
                self.projections.append(projection)

    def _project(self, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x (B, F, D) -> (B, F, D_out)."""
        tail = self.tail
        if tail is None or x.dim() != 3 or tail.groups[-1][1] != x.shape[0] or tail.start >= x.shape[1]:
            return F.linear(x, linear.weight, linear.bias)
        head = F.linear(x[:, : tail.start], linear.weight, linear.bias)  # (B, T, D_out)
        tails = [F.linear(x[first: first + 1, tail.start:], linear.weight, linear.bias).expand(end - first, -1, -1)
                 for first, end in tail.groups]  # (b, F - T, D_out) each
        return torch.cat([head, torch.cat(tails)], dim=1)

    def __call__(self, tail: CommonTail | None) -> "SharedTail":
        """`with shared(tail):` shares `tail` for the calls in the block (None: project every frame)."""
        self.tail = tail
        return self

    def __enter__(self) -> "SharedTail":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tail = None


def token_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-token cross-entropy (B, S), 0 where labels are -100: logits (B, S, V), labels (B, S)."""
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing, reduction="none")


def kind_losses(per_token: torch.Tensor, labels: torch.Tensor, kinds: Sequence[str]) -> dict[str, tuple[float, int]]:
    """kind -> (summed token loss, label tokens) over a batch, for logging."""
    per_example = per_token.detach().sum(1)  # (B,)
    counts = (labels != IGNORE_INDEX).sum(1)  # (B,)
    out: dict[str, tuple[float, int]] = {}
    for b, kind in enumerate(kinds):
        total, n = out.get(kind, (0.0, 0))
        out[kind] = (total + float(per_example[b]), n + int(counts[b]))
    return out


# ---- validation -------------------------------------------------------------------------------------

@dataclass
class ValidationData:
    """Held-out examples (in memory) and val_audio's cached encoder states."""

    examples: dict[str, list[Example]]  # kind -> held-out examples
    audio_clips: list[Any]  # stages.evaluate.Clip of val_audio
    audio_states: list[torch.Tensor]  # per batch: (b, max_frames, D) encoder states, float16 on CPU
    audio_rejects: list[dict[str, str]]


def held_out_store_examples(url: str, kind: str, keep: Callable[[str], bool], size: int,
                            skip_damaged: bool) -> list[Example]:
    """The first `size` held-out utterances of a store, in store order."""
    return stored_examples(kind, held_out_items(url, keep, size, skip_damaged))


def prepare_val_audio(config: PipelineConfig, model: Any, tokenizer: Any, geometry: Any
                      ) -> tuple[list[Any], list[torch.Tensor], list[dict[str, str]]]:
    """Read val_audio (any precompute source) and run the frozen encoder over it once."""
    from stages.evaluate import LoadedModel, Named, decoded_batches, encode, open_set

    settings = config.finetune
    clips, rejects = open_set(Named("val_audio", settings.val_audio), config)
    clips = clips[: settings.val_size]
    loaded = LoadedModel(Named("teacher", ""), model, tokenizer, geometry, False, "")
    kept, states = [], []
    for batch, audio, bad in decoded_batches(clips, geometry.sample_rate, geometry.window_seconds,
                                             config.evaluate.batch_size):
        rejects += bad
        if batch:
            kept += batch
            states.append(encode(loaded, audio).to("cpu", torch.float16))  # (b, F, D)
    if not kept:
        raise WhistleError(f"finetune.val_audio {settings.val_audio} has no usable clip"
                           + (f" (first reject: {rejects[0]['id']}: {rejects[0]['reason']})" if rejects else ""))
    log.info("val_audio: %d clips encoded once (%d skipped)", len(kept), len(rejects))
    return kept, states, rejects


@torch.no_grad()
def validate(model: Any, windows: Windows, data: ValidationData, tokenizer: Any, specials: SpecialTokens,
             config: PipelineConfig, ratios: dict[str, float]) -> tuple[dict[str, Any], list[Any]]:
    """Held-out decoder loss per kind (plain cross-entropy), their ratio-weighted mean, and val_audio's
    WER/CER/loops with the real encoder's states -> (metrics, val_audio clip scores)."""
    from stages.evaluate import LoadedModel, Named, generate, score_clip

    settings = config.finetune
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics: dict[str, Any] = {}
    for kind, examples in data.examples.items():
        total, tokens = 0.0, 0
        for start in range(0, len(examples), settings.batch_size):
            chunk = examples[start: start + settings.batch_size]
            text = encode_texts(tokenizer, specials, [e.text for e in chunk], [e.language for e in chunk],
                                model.config.max_target_positions).to(device)
            window = windows.build(chunk, text, training=False)
            logits = model(encoder_outputs=(window.to(model.dtype),), decoder_input_ids=text.decoder_input_ids).logits
            total += float(token_losses(logits, text.labels, 0.0).sum())
            tokens += int((text.labels != IGNORE_INDEX).sum())
        metrics[f"loss_{kind}"] = total / max(tokens, 1)
    weights = {kind: ratios[kind] for kind in data.examples if data.examples[kind]}
    metrics["loss"] = sum(metrics[f"loss_{k}"] * w for k, w in weights.items()) / sum(weights.values()) if weights else math.nan
    clip_scores = []
    if data.audio_clips:
        evaluated = LoadedModel(Named("adapted", ""), model, tokenizer, None, specials.multilingual, "")
        clips = iter(data.audio_clips)
        for states in data.audio_states:
            batch = [next(clips) for _ in range(len(states))]
            transcripts = generate(evaluated, states, [c.language for c in batch], config.evaluate.num_beams,
                                   config.evaluate.max_new_tokens)
            clip_scores += [score_clip(c.id, c.text, t, c.language) for c, t in zip(batch, transcripts)]
        words = sum(c.ref_words for c in clip_scores)
        metrics["wer"] = sum(c.word_errors for c in clip_scores) / max(words, 1)
        metrics["cer"] = sum(c.char_errors for c in clip_scores) / max(sum(c.ref_chars for c in clip_scores), 1)
        metrics["loops"] = [c.id for c in clip_scores if c.loop]
    metrics["metric"] = metrics["wer"] if select_by(settings) == "wer" else metrics["loss"]
    model.train(was_training)
    return metrics, clip_scores


def select_by(settings: Any) -> str:
    if settings.select_by == "auto":
        return "wer" if settings.val_audio else "loss"
    return settings.select_by


# ---- checkpoints --------------------------------------------------------------------------------------

def save_checkpoint(accelerator: Any, directory: Path, model: Any, optimizer: Any, scheduler: Any, step: int,
                    positions: dict[str, tuple[int, int]], history: dict[str, Any], best_dir: Path, keep: int) -> None:
    """checkpoints/step-N/ (stages.training): trainable weights, the best weights so far, validation
    history, optimiser, scheduler, every rank's data positions and RNG. Older checkpoints beyond `keep` go."""
    training.save_checkpoint(accelerator, directory, step, {"positions": positions},
                             partial(write_weights, model, history, best_dir), optimizer, scheduler, keep)


def write_weights(model: Any, history: dict[str, Any], best_dir: Path, folder: Path) -> None:
    """The main process's part of a checkpoint: trainable.safetensors, best.safetensors, history.json."""
    from safetensors.torch import save_file

    save_file(trainable_state(model), str(folder / "trainable.safetensors"))
    best = best_dir / "trainable.safetensors"
    if best.exists():  # the best step so far: a resumed run must not see a later (crashed) run's best
        try:
            os.link(best, folder / "best.safetensors")
        except OSError:  # no hard links on this file system
            shutil.copyfile(best, folder / "best.safetensors")
    (folder / "history.json").write_text(json.dumps(history))


def load_trainable(model: Any, path: Path, device: Any) -> None:
    """Copy saved trainable weights into `model`; every saved name must be a trainable weight of it."""
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - {n for n, p in parameters.items() if p.requires_grad})
    if unknown:
        raise WhistleError(f"{path} holds weights this run does not train ({', '.join(unknown[:3])}…): it was "
                           "written with another finetune.train_embeddings; use a new output_dir")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def load_checkpoint(accelerator: Any, path: Path, model: Any, optimizer: Any, scheduler: Any, best_dir: Path
                    ) -> dict[str, Any]:
    """Restore weights, the best weights so far, optimiser, scheduler and this rank's RNG;
    return {step, positions, history}."""
    state = training.load_checkpoint(accelerator, path, optimizer, scheduler, "finetune")
    load_trainable(model, path / "trainable.safetensors", accelerator.device)
    state["history"] = json.loads((path / "history.json").read_text())
    if accelerator.is_main_process:
        shutil.rmtree(best_dir, ignore_errors=True)
        if (path / "best.safetensors").exists():
            best_dir.mkdir(parents=True)
            shutil.copyfile(path / "best.safetensors", best_dir / "trainable.safetensors")
    return state


def check_resumable(output_dir: Path, config: PipelineConfig) -> None:
    """Refuse to continue a run whose settings differ in anything but logging/checkpoint frequencies."""
    from whistle_pipeline.config import load_config

    saved_path = output_dir / "config.toml"
    if not saved_path.exists():
        return
    saved = load_config(saved_path)
    differences = [
        f"{section}.{key}: {getattr(getattr(saved, section), key)!r} (checkpoint) vs {value!r} (now)"
        for section in ("teacher", "finetune")
        for key, value in asdict(getattr(config, section)).items()
        if not (section == "finetune" and key in RESUMABLE_KEYS) and getattr(getattr(saved, section), key) != value
    ]
    if differences:
        raise WhistleError(
            f"{output_dir} holds checkpoints of a run with other settings:\n  - " + "\n  - ".join(differences)
            + "\nUse a new finetune.output_dir, or set finetune.resume=false to start over in this one."
        )


# ---- the stage ----------------------------------------------------------------------------------------

def load_teacher(config: PipelineConfig) -> tuple[Any, Any, Any]:
    """(model, processor, geometry) of the Whisper to adapt, in float32 (the master weights)."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from whistle_pipeline.teacher import TeacherGeometry, resolve_revision

    name, revision = config.teacher.name_or_path, config.teacher.revision
    resolved = resolve_revision(name, revision) or None
    try:
        model = WhisperForConditionalGeneration.from_pretrained(name, revision=resolved, dtype=torch.float32,
                                                                attn_implementation=config.teacher.attn_implementation,
                                                                use_safetensors=True)
        processor = AutoProcessor.from_pretrained(name, revision=resolved)
    except (OSError, ValueError) as err:
        raise WhistleError(
            f"cannot load the Whisper to adapt, {name!r} (revision {revision!r}): {err}. Give a hub name or a folder "
            "written by save_pretrained or `whistle import-ct2` (teacher.name_or_path), with its tokenizer."
        ) from err
    return model, processor, TeacherGeometry.from_pretrained(model.config, processor.feature_extractor)


def teacher_differences(made_by: Any, given: Any, what: str) -> list[str]:
    """Geometry differences between the teacher that made `what` and the one given (which must be none);
    a different name or revision alone is logged: the same weights may live in another folder."""
    differences = made_by.differences(given)
    if any(d.startswith(("teacher.name_or_path", "teacher.revision")) for d in differences):
        log.warning("%s was made with teacher %r (revision %r); fine-tuning %r (revision %r): make sure they are "
                    "the same weights", what, made_by.name_or_path, made_by.revision, given.name_or_path, given.revision)
    return [d for d in differences if not d.startswith(("teacher.name_or_path", "teacher.revision"))]


def open_store(url: str, key: str, teacher_info: Any) -> StoreReader:
    """A store of teacher states for audio steps; refuses an empty one or one of another teacher geometry."""
    reader = StoreReader(url)
    if not reader.shards():
        raise WhistleError(f"{key} {url} has no complete shards: run `whistle precompute` on it (to the end) first")
    differences = teacher_differences(reader.teacher, teacher_info, f"store {url}")
    if differences:
        raise WhistleError(f"{key} {url} holds states of another teacher than the one fine-tuned:\n  - "
                           + "\n  - ".join(differences) + "\nPrecompute it with teacher.name_or_path, or fine-tune "
                           "the teacher that made it.")
    return reader


def load_tle(path: str, teacher_info: Any, device: Any) -> Any:
    """The frozen TLE; refuses one trained against another teacher geometry."""
    from store import TeacherInfo
    from whistle_pipeline.tle import TLEModel

    try:
        tle = TLEModel.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise WhistleError(f"cannot load the TLE from {path!r}: {err}. Give a `whistle train-tle` output folder.") from err
    if tle.config.teacher:
        differences = teacher_differences(TeacherInfo.from_dict(tle.config.teacher), teacher_info, f"the TLE {path}")
        if differences:
            raise WhistleError(
                f"the TLE in {path} was trained on the states of another teacher:\n  - "
                + "\n  - ".join(d.replace("(store)", "(TLE)") for d in differences)
                + "\nFine-tune the teacher the TLE learned from, or train a TLE on this teacher's store."
            )
    return tle.requires_grad_(False).eval().to(device)


def usable_rows(rows: Sequence[TextRow], tokenizer: Any, specials: SpecialTokens, max_positions: int,
                tle_languages: Sequence[str]) -> tuple[list[TextRow], list[TextReject]]:
    """Rows the tokenizer, the decoder and the TLE can take; the others with the reason (never mid-run)."""
    kept, rejects = [], []
    for row in rows:
        if row.language not in tle_languages:
            rejects.append(TextReject(row.id, f"language {row.language!r}: the TLE knows {', '.join(tle_languages)}"))
        elif specials.multilingual and row.language not in specials.languages:
            rejects.append(TextReject(row.id, f"language {row.language!r} has no token in this Whisper"))
        elif len(specials.prefix(row.language)) + len(text_tokens(tokenizer, row.text)) > max_positions:
            rejects.append(TextReject(row.id, f"longer than the decoder's {max_positions} positions"))
        else:
            kept.append(row)
    return kept, rejects


def run(config: PipelineConfig) -> FinetuneResult:
    """Fine-tune the decoder of config.teacher on config.finetune's text (and stores); save the adapted Whisper."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    settings = config.finetune
    check_inputs(config)
    started = time.time()
    output_dir = Path(settings.output_dir)
    checkpoints = output_dir / CHECKPOINTS_DIR
    if settings.resume and latest_checkpoint(checkpoints) is not None:
        check_resumable(output_dir, config)
    accelerator, trackers = make_accelerator(config.teacher.device, settings.mixed_precision, settings.grad_accum,
                                             output_dir)
    device = accelerator.device
    # latent draws and dropout differ per rank; a resumed run restores these generators from its checkpoint
    set_seed(settings.seed + accelerator.process_index)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir)

    model, processor, geometry = load_teacher(config)
    tokenizer = processor.tokenizer
    teacher_info = geometry.teacher_info(config.teacher.name_or_path, config.teacher.revision)
    specials = SpecialTokens.from_tokenizer(tokenizer, is_multilingual(model.config, model.generation_config))
    max_positions = model.config.max_target_positions
    ratios = {"audio": settings.audio_ratio, "tts": settings.tts_ratio, "text": settings.text_ratio}
    kinds = [k for k in KINDS if ratios[k] > 1e-9]

    # inputs: stores, TLE, corpus
    store_urls = {"audio": settings.audio_store, "tts": settings.tts_store}
    readers = {k: open_store(store_urls[k], f"finetune.{k}_store", teacher_info) for k in ("audio", "tts") if k in kinds}
    damaged: list[DamagedShard] = []
    dropped: frozenset[str] = frozenset()  # ids of the damaged shards, left out whole
    if settings.skip_damaged:
        for kind in readers:
            found, ids = damaged_shards(accelerator, store_urls[kind], output_dir / DAMAGE_DIR / kind)
            damaged, dropped = damaged + found, dropped | ids
    templates = {k: torch.from_numpy(np.array(r.tail_template())).to(device) for k, r in readers.items()}
    tle = load_tle(settings.tle_path, teacher_info, device) if "text" in kinds else None
    train_rows: list[TextRow] = []
    held_out_rows: list[TextRow] = []
    corpus_rejects: list[TextReject] = []
    if tle is not None:
        corpus = read_corpus(settings.text, text_column=settings.text_column, language=settings.language,
                             language_column=settings.language_column, split=settings.text_split)
        rows, rejects = usable_rows(corpus.rows, tokenizer, specials, max_positions, list(tle.config.languages))
        corpus_rejects = corpus.rejects + rejects
        held_out_rows = [r for r in rows if is_held_out(r.id, settings.val_fraction, settings.seed)]
        train_rows = [r for r in rows if not is_held_out(r.id, settings.val_fraction, settings.seed)]
        if not train_rows:
            raise WhistleError(f"no usable training sentence in {settings.text} ({len(corpus_rejects)} rejected, "
                               f"{len(held_out_rows)} held out)")
        log.info("text: %s; %d for training, %d held out, %d not usable", corpus.summary(), len(train_rows),
                 len(held_out_rows), len(corpus_rejects))
    windows = Windows(tle, templates, settings.sample_latent)

    select_trainable(model, settings.train_embeddings)
    shared_tail = SharedTail(model)  # training steps project each window's common tail once per kind
    optimizer, scheduler = build_optimizer(model, settings)
    model.to(device)

    resume_from = latest_checkpoint(checkpoints) if settings.resume else None
    if not settings.resume and accelerator.is_main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)
        shutil.rmtree(output_dir / BEST_DIR, ignore_errors=True)
    state: dict[str, Any] = {"step": 0, "positions": {}, "history": {"validation": [], "best_step": 0,
                                                                     "best_metric": None, "examples": {}}}
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, model, optimizer, scheduler, output_dir / BEST_DIR)
        log.info("resuming from %s (step %d)", resume_from, state["step"])
    # the scheduler is stepped by hand once per optimiser step (a prepared one steps once per process)
    model, optimizer = accelerator.prepare(model, optimizer)
    whisper = accelerator.unwrap_model(model)

    positions = state["positions"]
    streams: dict[str, Any] = {
        k: StoreStream(store_urls[k], WithoutIds(HeldOut(settings.val_fraction, settings.seed, False), dropped),
                       settings.seed, settings.shuffle_buffer, settings.num_workers, tuple(positions.get(k, (0, 0))),
                       settings.skip_damaged)
        for k in readers
    }
    if tle is not None:
        streams["text"] = TextStream(train_rows, settings.seed, accelerator.process_index, accelerator.num_processes,
                                     tuple(positions.get("text", (0, 0))))

    history = state["history"]
    val_data = ValidationData({}, [], [], [])
    if accelerator.is_main_process:
        val_data.examples = {k: held_out_store_examples(
            store_urls[k], k, WithoutIds(HeldOut(settings.val_fraction, settings.seed, True), dropped),
            settings.val_size, settings.skip_damaged) for k in readers}
        if tle is not None:
            val_data.examples["text"] = text_examples(held_out_rows[: settings.val_size])
        if settings.val_audio:
            val_data.audio_clips, val_data.audio_states, val_data.audio_rejects = prepare_val_audio(config, whisper,
                                                                                                   tokenizer, geometry)
        resume_step = state["step"] if resume_from is not None else None
        train_log = CsvLog(output_dir / TRAIN_LOG, TRAIN_COLUMNS, resume_step)
        val_log = CsvLog(output_dir / VALIDATION_LOG, VALIDATION_COLUMNS, resume_step)
        if trackers:
            accelerator.init_trackers("tensorboard", config={k: v for k, v in asdict(settings).items()
                                                              if isinstance(v, (int, float, str, bool))})
        if settings.val_fraction > 0 and not any(val_data.examples.values()) and not settings.val_audio:
            log.warning("no held-out example and no val_audio: validation has nothing to score; the last step is kept")

    step = state["step"]
    bar = tqdm(total=settings.steps, initial=step, desc="finetune", unit="step",
               disable=not (settings.progress and accelerator.is_main_process))
    seen = {k: history["examples"].get(k, 0) for k in KINDS}
    window_losses: dict[str, tuple[float, int]] = {}
    window_examples, window_start, grad_norm = 0, time.time(), math.nan
    last_scores: list[Any] = []
    model.train()
    while step < settings.steps:
        for micro in range(settings.grad_accum):
            counts = mix_counts(settings.batch_size, settings.audio_ratio, settings.tts_ratio,
                                step * settings.grad_accum + micro)
            examples: list[Example] = []
            for kind in KINDS:
                if counts[kind]:
                    taken = streams[kind].take(counts[kind])
                    examples += text_examples(taken) if kind == "text" else stored_examples(kind, taken)
            text = encode_texts(tokenizer, specials, [e.text for e in examples], [e.language for e in examples],
                                max_positions).to(device)
            with accelerator.accumulate(model), accelerator.autocast():
                window, tail = windows.build_with_tail(examples, text, training=True)  # (B, F, D)
                with shared_tail(tail):
                    logits = model(encoder_outputs=(window,), decoder_input_ids=text.decoder_input_ids).logits  # (B, S, V)
                per_token = token_losses(logits, text.labels, settings.label_smoothing)  # (B, S)
                loss = per_token.sum() / (text.labels != IGNORE_INDEX).sum()
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.grad_clip > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip))
                optimizer.step()  # no-ops between accumulation boundaries
                optimizer.zero_grad()
            for kind, (total, n) in kind_losses(per_token, text.labels, [e.kind for e in examples]).items():
                old = window_losses.get(kind, (0.0, 0))
                window_losses[kind] = (old[0] + total, old[1] + n)
                seen[kind] += sum(1 for e in examples if e.kind == kind) * accelerator.num_processes
            window_examples += len(examples) * accelerator.num_processes
        scheduler.step()
        step += 1
        bar.update(1)
        if step % settings.log_every == 0 or step == settings.steps:
            row = {f"loss_{k}": total / max(n, 1) for k, (total, n) in window_losses.items()}
            row.update(step=step, loss=sum(t for t, _ in window_losses.values()) / max(1, sum(n for _, n in window_losses.values())),
                       lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                       examples_per_s=window_examples / (time.time() - window_start),
                       epoch_text=streams["text"].epoch if "text" in streams else "")
            if accelerator.is_main_process:
                train_log.write(row)
                accelerator.log({f"train/{k}": v for k, v in row.items() if isinstance(v, float)}, step=step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            window_losses, window_examples, window_start = {}, 0, time.time()
        if step % settings.val_every == 0 or step == settings.steps:
            if accelerator.is_main_process:
                metrics, last_scores = validate(whisper, windows, val_data, tokenizer, specials, config, ratios)
                metrics["step"] = step
                history["validation"].append(metrics)
                val_log.write({**metrics, "loops": len(metrics.get("loops", []))})
                accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
                if not math.isnan(metrics["metric"]) and (history["best_metric"] is None
                                                          or metrics["metric"] < history["best_metric"]):
                    history["best_metric"], history["best_step"] = metrics["metric"], step
                    save_best(whisper, output_dir / BEST_DIR)
                log.info("step %d validation: %s", step, ", ".join(
                    f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            accelerator.wait_for_everyone()
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            history["examples"] = seen
            positions = {k: stream.position for k, stream in streams.items()}
            save_checkpoint(accelerator, checkpoints, whisper, optimizer, scheduler, step, positions, history,
                            output_dir / BEST_DIR, settings.keep_checkpoints)
    bar.close()
    accelerator.wait_for_everyone()

    saved_step = step
    if accelerator.is_main_process:
        if settings.select_best and history["best_step"] != step and (output_dir / BEST_DIR / "trainable.safetensors").exists():
            load_trainable(whisper, output_dir / BEST_DIR / "trainable.safetensors", device)
            saved_step = history["best_step"]
            if val_data.audio_clips:  # per-clip scores of the weights that are saved
                last_scores = validate(whisper, windows, val_data, tokenizer, specials, config, ratios)[1]
        elif val_data.audio_clips and not last_scores:  # a rerun of a finished run validated nothing
            last_scores = validate(whisper, windows, val_data, tokenizer, specials, config, ratios)[1]
        save_adapted(whisper, processor, output_dir)
    result = FinetuneResult(
        output_dir=str(output_dir), steps=step, resumed_from=state["step"] if resume_from is not None else 0,
        train_examples={"text": len(train_rows), **{k: len(r) - sum(d.utterances for d in damaged if d.store == r.url)
                                                    for k, r in readers.items()}},
        held_out={k: len(v) for k, v in val_data.examples.items()} | (
            {"val_audio": len(val_data.audio_clips)} if settings.val_audio else {}),
        examples_seen=seen, corpus_rejects=[asdict(r) for r in corpus_rejects], best_step=history["best_step"],
        select_by=select_by(settings), saved_step=saved_step, validation=history["validation"],
        outliers=outliers(last_scores, config.evaluate.outliers),
        wall_seconds=time.time() - started, damaged_shards=[asdict(d) for d in damaged],
    )
    if accelerator.is_main_process:
        (output_dir / SUMMARY).write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    accelerator.end_training()
    return result


def save_best(model: Any, directory: Path) -> None:
    """best/trainable.safetensors: the trainable weights of the best step so far.

    Written to a new file and renamed over the old one, so hard links to the previous best (kept in
    checkpoints) keep their content.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "trainable.safetensors.partial"
    save_file(trainable_state(model), str(partial))
    os.replace(partial, directory / "trainable.safetensors")


def outliers(clip_scores: Sequence[Any], count: int) -> list[dict[str, Any]]:
    """val_audio's repetition loops, then its clips with the most word errors."""
    ranked = sorted(clip_scores, key=lambda c: (c.loop, c.word_errors), reverse=True)
    return [{"id": c.id, "word_errors": c.word_errors, "ref_words": c.ref_words, "loop": c.loop,
             "reference": c.reference, "hypothesis": c.hypothesis} for c in ranked[:count] if c.word_errors or c.loop]


def save_adapted(model: Any, processor: Any, output_dir: Path) -> None:
    """The complete Whisper (teacher encoder, adapted decoder) + processor + generation config, loadable by
    transformers.pipeline("automatic-speech-recognition", model=output_dir)."""
    model.save_pretrained(output_dir)  # config.json, model.safetensors, generation_config.json
    # the feature extractor and tokenizer on their own (not processor_config.json), which every transformers
    # version reads
    processor.feature_extractor.save_pretrained(output_dir)  # preprocessor_config.json
    processor.tokenizer.save_pretrained(output_dir)
