"""train-tle: learn the text-to-latent encoder from a feature store (DESIGN.md §6).

    store ──► held-out split (stable hash of each id)
          ──► per-token durations from the frozen teacher's alignment heads + DTW (cached in output_dir)
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

The loop is written out with accelerate (one Accelerator, prepare, accumulate, mixed precision on
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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from store import StoreReader
from store.dataset import FeatureDataset, pad_batch
from whistle_pipeline.alignment import align_batch, alignment_heads
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.corpus import is_held_out
from whistle_pipeline.decoder import (
    DecoderTerms,
    FrozenTeacher,
    decoder_cross_entropy,
    phase_2_terms,
    greedy_transcribe,
    load_frozen_teacher,
)
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import corpus_wer
from whistle_pipeline.text import TextBatch, encode_texts, text_tokens
from whistle_pipeline.tle import LossTerms, LossWeights, TLEConfig, TLEModel, masked_cosine, masked_mse, tle_loss
from stages.training import (
    CsvLog,
    DamagedShard,
    build_optimizer,
    damage_summary,
    damaged_shards,
    endless_epochs,
    held_out_items,
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    save_checkpoint,
)

log = logging.getLogger(__name__)

DURATIONS_DIR = "durations"
DAMAGE_DIR = "damaged-shards"  # each rank's scan of the store under skip_damaged
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG = "train_log.csv"
VALIDATION_LOG = "validation.csv"
TRAIN_COLUMNS = ["step", "epoch", "loss", "mse", "cosine", "kl", "beta", "length", "length_error", "decoder_ce",
                 "real_decoder_ce", "decoder_kl", "decoder_ce_weight", "lr", "frames_per_s"]
VALIDATION_COLUMNS = ["step", "mse", "cosine", "length_error", "duration_mae", "decoder_ce", "decoder_ce_predicted",
                      "real_decoder_ce", "wer_predicted", "real_wer"]


# --- result ----------------------------------------------------------------------------------------


@dataclass
class TrainTLEResult:
    output_dir: str
    steps: int
    resumed_from: int  # 0 = a fresh run
    train_utterances: int
    held_out_utterances: int
    alignment_rejects: dict[str, str]  # id -> reason (not trained on)
    wall_seconds: float
    validation: dict[str, float] = field(default_factory=dict)  # the last validation
    damaged_shards: list[dict[str, Any]] = field(default_factory=list)  # left out under train_tle.skip_damaged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"trained the TLE for {self.steps} steps"
            + (f" (resumed at step {self.resumed_from})" if self.resumed_from else "")
            + f" in {self.wall_seconds / 60:.1f} min on {self.train_utterances} utterances "
            f"({self.held_out_utterances} held out)",
        ]
        if self.alignment_rejects:
            first_id, reason = next(iter(self.alignment_rejects.items()))
            lines.append(f"  {len(self.alignment_rejects)} utterance(s) not used (first: {first_id}: {reason})")
        if self.damaged_shards:
            lines.append(damage_summary([DamagedShard(**d) for d in self.damaged_shards]))
        if self.validation:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in self.validation.items() if k != "step" and not math.isnan(v))
            lines.append(f"  held-out: {shown}")
        lines.append(f"  model: {self.output_dir} (TLEModel.from_pretrained); logs, curves and checkpoints beside it")
        return "\n".join(lines)


# --- the store, the teacher and the durations -------------------------------------------------------


def open_store(url: str, teacher: FrozenTeacher, teacher_name: str, revision: str) -> StoreReader:
    """Open the store and refuse it when it is empty or its teacher geometry differs from `teacher`'s."""
    from transformers import WhisperFeatureExtractor

    from whistle_pipeline.teacher import TeacherGeometry

    reader = StoreReader(url)
    if not reader.shards():
        incomplete = len(reader.incomplete_shards())
        raise WhistleError(
            f"store {url} has no complete shards ({incomplete} incomplete): run `whistle precompute` on it first"
            + (" and let it finish (a rerun completes the missing shards)" if incomplete else "")
        )
    try:
        features = WhisperFeatureExtractor.from_pretrained(teacher_name, revision=revision)
    except OSError:
        features = WhisperFeatureExtractor(feature_size=teacher.model.config.num_mel_bins)
    given = TeacherGeometry.from_pretrained(teacher.model.config, features).teacher_info(teacher_name, revision)
    differences = [d for d in reader.teacher.differences(given)
                   if not d.startswith(("teacher.name_or_path", "teacher.revision"))]
    if differences:
        raise WhistleError(
            f"store {url} holds states of a different teacher than {teacher_name!r}: " + "; ".join(differences)
            + ". Train with the teacher that made the store (teacher.name_or_path), or precompute a new store."
        )
    if reader.teacher.name_or_path != teacher_name:
        log.warning("store %s was made with teacher %r; training against %r (same geometry)",
                    url, reader.teacher.name_or_path, teacher_name)
    return reader


class DurationTable:
    """Frames per TLE token of every aligned utterance, packed in two arrays (compact to send to workers)."""

    def __init__(self, durations: dict[str, list[int]]):
        self.index = {utt_id: i for i, utt_id in enumerate(durations)}
        self.offsets = np.cumsum([0] + [len(row) for row in durations.values()])  # (N + 1,)
        self.values = np.concatenate([np.asarray(row, np.int32) for row in durations.values()]) if durations \
            else np.zeros(0, np.int32)

    def __contains__(self, utt_id: str) -> bool:
        return utt_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, utt_id: str) -> np.ndarray:
        i = self.index[utt_id]
        return self.values[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class Alignment:
    """Durations of the usable utterances, every utterance's language, and why the others are unusable."""

    durations: DurationTable
    languages: dict[str, str]
    rejects: dict[str, str]


def _alignment_fingerprint(reader: StoreReader, teacher_name: str, teacher: FrozenTeacher) -> dict[str, Any]:
    """What the cached durations depend on, as it reads back from JSON."""
    return json.loads(json.dumps({"teacher": teacher_name, "vocab_size": teacher.model.config.vocab_size,
                                  "store_teacher": reader.teacher.to_dict(), "heads": alignment_heads(teacher.model)}))


def align_shard(reader: StoreReader, shard: int, teacher: FrozenTeacher, batch_size: int) -> dict[str, Any]:
    """Durations of one shard's utterances from the teacher reading their real full windows."""
    heads = alignment_heads(teacher.model)
    record: dict[str, Any] = {"durations": {}, "languages": {}, "rejects": {}}
    pending = []
    speech_mode = reader.spec.frames == "speech"  # then every window's tail is this store's template
    if speech_mode:
        teacher.set_tail_template(torch.tensor(reader.tail_template()))

    def flush() -> None:
        windows = torch.from_numpy(np.stack([reader.full_window(u.states) for u in pending]))  # (B, F, D)
        windows = windows.to(teacher.model.device)
        batch = encode_texts(teacher.tokenizer, teacher.specials, [u.text for u in pending],
                             [u.language for u in pending], teacher.max_positions)
        lengths = torch.tensor([u.speech_frames for u in pending])
        speech_frames = max(len(u.states) for u in pending) if speech_mode else None
        aligned = align_batch(teacher, heads, windows, batch.to(windows.device), lengths, speech_frames)
        for utt, durations in zip(pending, aligned):
            if durations is None:
                record["rejects"][utt.id] = f"{utt.speech_frames} speech frames for more text tokens"
            else:
                record["durations"][utt.id] = durations.tolist()
        pending.clear()

    for utt in reader.iter_shard(shard):
        record["languages"][utt.id] = utt.language
        if not utt.text.strip():
            record["rejects"][utt.id] = "empty transcript"
            continue
        if teacher.specials.multilingual and utt.language not in teacher.specials.languages:
            record["rejects"][utt.id] = f"language {utt.language!r} has no token in the teacher's tokenizer"
            continue
        n_tokens = len(text_tokens(teacher.tokenizer, utt.text))
        prompt = len(teacher.specials.prefix(utt.language))
        if n_tokens + prompt > teacher.max_positions:
            record["rejects"][utt.id] = f"{n_tokens} text tokens exceed the decoder's {teacher.max_positions} positions"
            continue
        pending.append(utt)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return record


def align_store(accelerator: Any, reader: StoreReader, teacher: FrozenTeacher, teacher_name: str, out_dir: Path,
                batch_size: int, progress: bool, damaged: frozenset[int] = frozenset()) -> Alignment:
    """Align every complete shard but the `damaged` ones once (rank r takes the shards at positions r, r + W,
    ...), cache each shard's result as JSON in out_dir, and return the union. Reruns reuse the cache while the
    teacher and the store's teacher are the same."""
    from tqdm.auto import tqdm

    fingerprint = _alignment_fingerprint(reader, teacher_name, teacher)
    meta_path = out_dir / "alignment.json"
    if accelerator.is_main_process:
        if out_dir.exists() and (not meta_path.exists() or json.loads(meta_path.read_text()) != fingerprint):
            log.info("the cached durations in %s were made with another teacher: aligning again", out_dir)
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(fingerprint, indent=1))
    accelerator.wait_for_everyone()
    shards = [k for k in reader.shards() if k not in damaged]
    mine = [k for k in shards[accelerator.process_index::accelerator.num_processes]
            if not (out_dir / f"{k:05d}.json").exists()]
    for shard in tqdm(mine, desc="aligning tokens", unit="shard", disable=not (progress and mine)):
        record = align_shard(reader, shard, teacher, batch_size)
        partial = out_dir / f"{shard:05d}.json.partial"
        partial.write_text(json.dumps(record))
        os.replace(partial, out_dir / f"{shard:05d}.json")  # a shard's file appears whole or not at all
    accelerator.wait_for_everyone()
    durations: dict[str, list[int]] = {}
    alignment = Alignment(DurationTable({}), {}, {})
    for shard in shards:
        record = json.loads((out_dir / f"{shard:05d}.json").read_text())
        durations.update(record["durations"])
        alignment.languages.update(record["languages"])
        alignment.rejects.update(record["rejects"])
    alignment.durations = DurationTable(durations)
    return alignment


# --- batches -----------------------------------------------------------------------------------------


class KeepSplit:
    """FeatureDataset `keep`: aligned utterances on one side of the held-out split (picklable for workers)."""

    def __init__(self, durations: DurationTable, held_out: bool, fraction: float, seed: int):
        self.durations, self.held_out, self.fraction, self.seed = durations, held_out, fraction, seed

    def __call__(self, utt_id: str) -> bool:
        return utt_id in self.durations and is_held_out(utt_id, self.fraction, self.seed) == self.held_out


@dataclass
class TrainBatch:
    states: torch.Tensor  # (B, T, D) teacher-scale speech frames, zero-padded
    durations: torch.Tensor  # (B, L) frames per TLE token; row sums are the speech frames
    language_ids: torch.Tensor  # (B,)
    text: TextBatch
    ids: list[str]

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(self.states.to(device, non_blocking=True), self.durations.to(device),
                          self.language_ids.to(device), self.text.to(device), self.ids)


class Collate:
    """FeatureDataset items -> TrainBatch (runs in the DataLoader workers; picklable)."""

    def __init__(self, tokenizer: Any, specials: Any, durations: DurationTable, languages: list[str],
                 max_positions: int):
        self.tokenizer, self.specials, self.durations = tokenizer, specials, durations
        self.languages, self.max_positions = languages, max_positions

    def __call__(self, items: list[dict[str, Any]]) -> TrainBatch:
        padded = pad_batch(items)
        text = encode_texts(self.tokenizer, self.specials, padded["texts"], padded["languages"], self.max_positions)
        durations = torch.zeros_like(text.tle_tokens)  # (B, L)
        for b, utt_id in enumerate(padded["ids"]):
            row = self.durations[utt_id]
            if len(row) != int(text.tle_mask[b].sum()) or row.sum() != int(padded["speech_frames"][b]):
                raise WhistleError(f"cached durations of {utt_id!r} do not fit its tokens or frames: delete the "
                                   "durations/ folder of the output directory to align again")
            durations[b, : len(row)] = torch.from_numpy(row)
        speech = int(padded["speech_frames"].max())  # full-window stores: only the speech frames are targets
        language_ids = torch.tensor([self.languages.index(code) for code in padded["languages"]])
        return TrainBatch(padded["states"][:, :speech], durations, language_ids, text, padded["ids"])


def stream_batches(dataset: FeatureDataset, collate: Collate, batch_size: int, num_workers: int, seed: int,
                   epoch: int, skip: int) -> Iterator[tuple[int, int, TrainBatch]]:
    """(epoch, batches read this epoch, batch) forever: a new epoch starts when this rank's share runs out.
    `skip` batches of the first epoch are read and dropped (resuming at a data position)."""
    return endless_epochs(dataset, seed, epoch, skip, batch_size=batch_size, collate_fn=collate,
                          num_workers=num_workers)


def validation_batches(url: str, collate: Collate, keep: KeepSplit, size: int, batch_size: int,
                       skip_damaged: bool) -> list[TrainBatch]:
    """The first `size` held-out utterances in store order, batched once and kept in memory."""
    items = held_out_items(url, keep, size, skip_damaged)
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


# --- model, optimiser, schedule ----------------------------------------------------------------------


def build_model(config: PipelineConfig, reader: StoreReader, teacher: FrozenTeacher, languages: list[str]) -> TLEModel:
    """A fresh TLE sized by [tle], the store's geometry and statistics, and the teacher's vocabulary."""
    arch = config.tle
    decoder_embeddings = teacher.model.model.decoder.embed_tokens.weight  # (V, d_model)
    tle_config = TLEConfig(
        vocab_size=decoder_embeddings.shape[0], embedding_size=decoder_embeddings.shape[1],
        hidden_size=arch.hidden_size, text_layers=arch.text_layers, frame_layers=arch.frame_layers,
        num_heads=arch.num_heads, ffn_multiplier=arch.ffn_multiplier, latent_size=arch.latent_size,
        conv_kernel=arch.conv_kernel, conv_layers=arch.conv_layers, dropout=arch.dropout, posterior=arch.posterior,
        languages=languages, d_model=reader.teacher.d_model, max_frames=reader.teacher.max_frames,
        max_tokens=teacher.max_positions, end_token_id=teacher.specials.end_of_text,
        teacher=reader.teacher.to_dict(), spelling_channels=arch.spelling_channels,
    )
    torch.manual_seed(config.train_tle.seed)
    model = TLEModel(tle_config)
    mean, std = reader.statistics()
    model.set_store_statistics(mean, std, reader.tail_template())
    model.set_token_spellings(teacher.tokenizer)
    if arch.token_embeddings != "random":
        with torch.no_grad():
            model.token_embedding.weight.copy_(decoder_embeddings.float())
        model.token_embedding.weight.requires_grad_(arch.token_embeddings == "teacher")
    return model


def loss_weights(settings: Any, step: int) -> LossWeights:
    """The weights of optimiser step `step`: beta rises linearly from 0, the decoder terms join in phase 2."""
    beta = settings.kl_beta * (min(1.0, step / settings.kl_anneal_steps) if settings.kl_anneal_steps else 1.0)
    phase_2 = step >= settings.decoder_ce_start
    return LossWeights(mse=settings.mse_weight, cosine=settings.cosine_weight, length=settings.length_weight,
                       beta=beta, free_bits=settings.free_bits,
                       decoder_ce=settings.decoder_ce_weight if phase_2 else 0.0,
                       decoder_kl=settings.decoder_kl_weight if phase_2 else 0.0)


def step_values(terms: LossTerms, decoder: DecoderTerms | None, length_error: float) -> dict[str, float]:
    """What one micro-batch adds to the train log: the loss, its terms, and the decoder's CE in phase 2."""
    values = {"loss": terms.total.item(), "mse": terms.mse, "cosine": terms.cosine, "kl": terms.kl,
              "length": terms.length, "length_error": length_error}
    if decoder is not None:
        values["decoder_ce"] = decoder.ce.item()
        if decoder.kl is not None:
            values["decoder_kl"] = decoder.kl.item()
        if decoder.real_ce is not None:
            values["real_decoder_ce"] = decoder.real_ce.item()
    return values


# --- validation --------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model: TLEModel, teacher: FrozenTeacher, batches: list[TrainBatch], wer_size: int,
             device: torch.device, reference: dict[str, float] | None = None) -> dict[str, float]:
    """Held-out metrics of the text-only TLE (z = prior mean, no posterior); the teacher's tail template
    must be the model's (teacher.set_tail_template(model.tail_template)):
    mse, cosine (normalised space, true durations); length_error (|predicted - true| / true frames);
    duration_mae (frames per token); decoder_ce on the TLE full window at true and predicted lengths;
    wer_predicted: greedy round trip text -> TLE -> decoder at predicted lengths on the first
    `wer_size` utterances. `reference` (real_decoder_ce, real_wer on the real states) is computed when
    None and returned in the result either way."""
    model.eval()
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    hypotheses, references, languages = [], [], []
    real_hypotheses = []

    def add(name: str, value: float, weight: int) -> None:
        totals[name] = totals.get(name, 0.0) + value * weight
        counts[name] = counts.get(name, 0) + weight

    for batch in batches:
        batch = batch.to(device)
        text, mask = batch.text, batch.text.tle_mask
        true_lengths = batch.durations.sum(1)  # (B,)
        target = model.normalise(batch.states)  # (B, T, D)
        out = model(text.tle_tokens, mask, batch.language_ids, durations=batch.durations)
        n = len(batch.ids)
        add("mse", masked_mse(out.states.float(), target.float(), out.frame_mask).item(), int(true_lengths.sum()))
        add("cosine", masked_cosine(out.states, target, out.frame_mask).item(), int(true_lengths.sum()))
        predicted = model.durations_from_log(out.log_durations, mask)  # (B, L)
        add("length_error", ((predicted.sum(1) - true_lengths).abs() / true_lengths).mean().item(), n)
        add("duration_mae", ((predicted - batch.durations).abs() * mask).sum().item() / mask.sum().item(),
            int(mask.sum()))
        # every window below is built with the model's tail template, which the teacher knows
        window = model.full_window(model.denormalise(out.states), out.lengths)
        add("decoder_ce", decoder_cross_entropy(teacher, window, text, out.states.shape[1])[0].item(), n)
        speech, lengths = model.speech_frames(text.tle_tokens, mask, batch.language_ids)
        predicted_window = model.full_window(speech, lengths)
        add("decoder_ce_predicted", decoder_cross_entropy(teacher, predicted_window, text, speech.shape[1])[0].item(), n)
        real_window = model.full_window(batch.states, true_lengths)
        if reference is None:
            add("real_decoder_ce", decoder_cross_entropy(teacher, real_window, text, batch.states.shape[1])[0].item(), n)
        decode = max(0, min(n, wer_size - len(hypotheses)))
        if decode:
            longest = 2 * int(mask[:decode].sum(1).max()) + 10
            hypotheses += greedy_transcribe(teacher, predicted_window[:decode], text.languages[:decode], longest,
                                            speech.shape[1])
            references += text.texts[:decode]
            languages += text.languages[:decode]
            if reference is None:
                real_hypotheses += greedy_transcribe(teacher, real_window[:decode], text.languages[:decode], longest,
                                                     batch.states.shape[1])
    metrics = {name: totals[name] / max(counts[name], 1) for name in totals}
    if hypotheses:
        metrics["wer_predicted"] = corpus_wer(references, hypotheses, languages)
        if reference is None:
            metrics["real_wer"] = corpus_wer(references, real_hypotheses, languages)
    if reference is not None:
        metrics.update(reference)
    model.train()
    return metrics


# --- checkpoints and logs ----------------------------------------------------------------------------


def write_weights(model: TLEModel, folder: Path) -> None:
    """The TLE's weights in a checkpoint folder (model.safetensors)."""
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(folder / "model.safetensors"))


def plot_curves(output_dir: Path) -> Path | None:
    """loss_curves.png: training loss terms and held-out metrics against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss_curves.png (pip install 'whistle[plot]')")
        return None

    def read(name: str) -> dict[str, np.ndarray]:
        with open(output_dir / name, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return {k: np.array([float(r[k]) if r[k] not in ("", "None") else np.nan for r in rows]) for k in rows[0]} if rows else {}

    train, val = read(TRAIN_LOG), read(VALIDATION_LOG)
    panels = [("training loss", [("loss", train)]), ("masked MSE (normalised)", [("mse", train), ("mse", val)]),
              ("decoder cross-entropy", [("decoder_ce", train), ("decoder_ce", val), ("real_decoder_ce", val)]),
              ("held-out cosine / WER", [("cosine", val), ("wer_predicted", val), ("real_wer", val)]),
              ("length", [("length", train), ("length_error", val)]), ("KL (x beta: see beta)", [("kl", train)])]
    figure, axes = plt.subplots(2, 3, figsize=(14, 7))
    for axis, (title, series) in zip(axes.flat, panels):
        for name, table in series:
            if table and name in table and np.isfinite(table[name]).any():
                label = f"{name} ({'held-out' if table is val else 'train'})"
                axis.plot(table["step"], table[name], marker="o" if table is val else None, ms=3, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = output_dir / "loss_curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _previous_validation(output_dir: Path) -> dict[str, float]:
    """The last row of validation.csv (a rerun of a finished run trains no step and validates nothing)."""
    path = output_dir / VALIDATION_LOG
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", "None")} if rows else {}


# --- the stage ---------------------------------------------------------------------------------------


def run(config: PipelineConfig) -> TrainTLEResult:
    """Train the TLE on config.store.path against the teacher config.teacher.name_or_path."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    settings = config.train_tle
    started = time.time()
    output_dir = Path(settings.output_dir)
    accelerator, trackers = make_accelerator(config.teacher.device, settings.mixed_precision, settings.grad_accum,
                                             output_dir)
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir)
        log.info("resolved configuration saved to %s", output_dir / "config.toml")

    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    teacher = load_frozen_teacher(config.teacher.name_or_path, config.teacher.revision, device, teacher_dtype)
    reader = open_store(config.store.path, teacher, config.teacher.name_or_path, config.teacher.revision)
    damaged: list[DamagedShard] = []
    if settings.skip_damaged:  # a damaged shard is left out whole (its utterances lack durations below)
        damaged = damaged_shards(accelerator, config.store.path, output_dir / DAMAGE_DIR)[0]
    alignment = align_store(accelerator, reader, teacher, config.teacher.name_or_path, output_dir / DURATIONS_DIR,
                            settings.batch_size, settings.progress and accelerator.is_main_process,
                            frozenset(d.shard for d in damaged))
    usable = alignment.durations.index.keys()
    languages = sorted({alignment.languages[i] for i in usable})
    if not usable:
        raise WhistleError(f"no utterance of store {config.store.path} is usable for training: "
                           f"{len(alignment.rejects)} rejected, e.g. {next(iter(alignment.rejects.items()), '')}")
    held_out = {i for i in usable if is_held_out(i, settings.val_fraction, settings.seed)}
    if not held_out:
        raise WhistleError(f"train_tle.val_fraction = {settings.val_fraction} holds out none of the {len(usable)} "
                           "usable utterances: raise it")
    if len(held_out) == len(usable):
        raise WhistleError("every usable utterance is held out: lower train_tle.val_fraction")
    log.info("%d utterances: %d for training, %d held out, %d unusable; languages %s", len(alignment.languages),
             len(usable) - len(held_out), len(held_out), len(alignment.rejects), ", ".join(languages))

    collate = Collate(teacher.tokenizer, teacher.specials, alignment.durations, languages, teacher.max_positions)
    train_set = FeatureDataset(config.store.path, shuffle=True, seed=settings.seed,
                               shuffle_buffer=settings.shuffle_buffer, length_bucket=settings.length_bucket,
                               keep=KeepSplit(alignment.durations, False, settings.val_fraction, settings.seed),
                               skip_damaged=settings.skip_damaged)
    model = build_model(config, reader, teacher, languages)
    optimizer, scheduler = build_optimizer(model, settings)
    teacher.set_tail_template(model.tail_template)

    checkpoints = output_dir / CHECKPOINTS_DIR
    resume_from = latest_checkpoint(checkpoints) if settings.resume else None
    if not settings.resume and accelerator.is_main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)
    position = {"step": 0, "epoch": 0, "position": 0}
    if resume_from is not None:
        position = load_checkpoint(accelerator, resume_from, optimizer, scheduler, "train_tle")
        model.load_state_dict(load_file(str(resume_from / "model.safetensors"), device=str(device)))
        log.info("resuming from %s (step %d)", resume_from, position["step"])
    # the scheduler is stepped by hand once per optimiser step (a prepared one steps once per process)
    model, optimizer = accelerator.prepare(model, optimizer)
    tle = accelerator.unwrap_model(model)

    val_batches = []
    if accelerator.is_main_process:
        val_batches = validation_batches(config.store.path, collate, KeepSplit(alignment.durations, True,
                                         settings.val_fraction, settings.seed), settings.val_size, settings.batch_size,
                                         settings.skip_damaged)
        resume_step = position["step"] if resume_from is not None else None
        train_log = CsvLog(output_dir / TRAIN_LOG, TRAIN_COLUMNS, resume_step)
        val_log = CsvLog(output_dir / VALIDATION_LOG, VALIDATION_COLUMNS, resume_step)
        if trackers:
            accelerator.init_trackers("tensorboard", config={
                k: v for section in ("tle", "train_tle") for k, v in asdict(getattr(config, section)).items()
                if isinstance(v, (int, float, str, bool))})

    step = position["step"]
    batches = stream_batches(train_set, collate, settings.batch_size, settings.num_workers, settings.seed,
                             position["epoch"], position["position"])
    bar = tqdm(total=settings.steps, initial=step, desc="train-tle", unit="step",
               disable=not (settings.progress and accelerator.is_main_process))
    window_sums: dict[str, float] = {}
    window_count, window_frames, window_start = 0, 0.0, time.time()
    reference: dict[str, float] | None = None
    last_validation: dict[str, float] = {}
    model.train()
    epoch = seen = 0
    while step < settings.steps:
        weights = loss_weights(settings, step)
        epoch, seen, batch = next(batches)
        batch = batch.to(device)
        with accelerator.accumulate(model), accelerator.autocast():
            target = tle.normalise(batch.states)  # (B, T, D)
            out = model(batch.text.tle_tokens, batch.text.tle_mask, batch.language_ids, durations=batch.durations,
                        target=target)
            decoder = None
            if weights.decoder_ce > 0 or weights.decoder_kl > 0:  # phase 2
                decoder = phase_2_terms(teacher, tle, out, batch.states, batch.text, settings.decoder_ce_floor,
                                        weights.decoder_kl)
            terms = tle_loss(out, target, batch.durations, batch.text.tle_mask, weights,
                             decoder and decoder.charged_ce, decoder and decoder.kl)
            accelerator.backward(terms.total)
            if accelerator.sync_gradients and settings.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()  # no-ops between accumulation boundaries
            optimizer.zero_grad()
        with torch.no_grad():
            predicted = tle.durations_from_log(out.log_durations.detach(), batch.text.tle_mask).sum(1)
            length_error = ((predicted - out.lengths).abs() / out.lengths).float().mean().item()
        for name, value in step_values(terms, decoder, length_error).items():
            window_sums[name] = window_sums.get(name, 0.0) + value
        window_count += 1
        window_frames += float(out.lengths.sum())
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step += 1
        bar.update(1)
        if step % settings.log_every == 0 or step == settings.steps:
            frames = accelerator.reduce(torch.tensor(window_frames, device=device), "sum").item()
            row = {name: value / window_count for name, value in window_sums.items()}
            row.update(step=step, epoch=epoch, beta=weights.beta, decoder_ce_weight=weights.decoder_ce,
                       lr=scheduler.get_last_lr()[0], frames_per_s=frames / (time.time() - window_start))
            if accelerator.is_main_process:
                train_log.write(row)
                accelerator.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "epoch")}, step=step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", mse=f"{row['mse']:.3f}",
                                ce=f"{row.get('decoder_ce', float('nan')):.2f}")
            window_sums, window_count, window_frames, window_start = {}, 0, 0.0, time.time()
        if step % settings.val_every == 0 or step == settings.steps:
            if accelerator.is_main_process:
                last_validation = validate(tle, teacher, val_batches, settings.val_wer_size, device, reference)
                reference = {k: last_validation[k] for k in ("real_decoder_ce", "real_wer") if k in last_validation}
                last_validation["step"] = step
                val_log.write(last_validation)
                accelerator.log({f"val/{k}": v for k, v in last_validation.items() if k != "step"}, step=step)
                log.info("step %d held-out: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in last_validation.items()))
            accelerator.wait_for_everyone()
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            save_checkpoint(accelerator, checkpoints, step, {"epoch": epoch, "position": seen},
                            partial(write_weights, tle), optimizer, scheduler, settings.keep_checkpoints)
    bar.close()

    accelerator.wait_for_everyone()
    result = TrainTLEResult(
        output_dir=str(output_dir), steps=step, resumed_from=position["step"] if resume_from else 0,
        train_utterances=len(usable) - len(held_out), held_out_utterances=len(held_out),
        alignment_rejects=alignment.rejects, wall_seconds=time.time() - started,
        validation=last_validation or _previous_validation(output_dir),
        damaged_shards=[asdict(d) for d in damaged],
    )
    if accelerator.is_main_process:
        tle.save_pretrained(output_dir)
        plot_curves(output_dir)
        (output_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    accelerator.end_training()
    return result
