"""What train-tle and validate-tle share: the teacher's per-token durations, the held-out split, batches,
and the held-out metrics of a TLE.

    store ──► align_store / align_shard: frames per TLE token from the frozen teacher's alignment heads + DTW
          ──► KeepSplit (stable hash of each id) ──► Collate ──► TrainBatch ──► validate (held-out metrics)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stages.training_data import endless_epochs, held_out_items
from store import StoreReader, Utterance
from store.dataset import FeatureDataset, pad_batch
from whistle_pipeline.alignment import alignment_costs, alignment_heads, durations_from_costs
from whistle_pipeline.corpus import is_held_out
from whistle_pipeline.decoder import FrozenTeacher, decoder_cross_entropy, greedy_transcribe
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import corpus_wer
from whistle_pipeline.pronunciation import PronunciationFrontEnd
from whistle_pipeline.text import TextBatch, encode_texts, transcript_problem
from whistle_pipeline.tle import TLEModel, assemble_window, masked_cosine, masked_mse, stretched_cosine

log = logging.getLogger(__name__)


class DurationTable:
    """Frames per TLE token of every aligned utterance, packed in two arrays (compact to send to workers)."""

    def __init__(self, durations: dict[str, list[int]]):
        self.index = {utt_id: i for i, utt_id in enumerate(durations)}
        self.offsets = np.cumsum([0] + [len(row) for row in durations.values()])  # (N + 1,)
        self.values = (
            np.concatenate([np.asarray(row, np.int32) for row in durations.values()])
            if durations
            else np.zeros(0, np.int32)
        )

    def __contains__(self, utt_id: str) -> bool:
        return utt_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, utt_id: str) -> np.ndarray:
        i = self.index[utt_id]
        return self.values[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class Alignment:
    """Durations of the usable utterances, every utterance's language, and why the others are unusable."""

    durations: DurationTable
    languages: dict[str, str]
    rejects: dict[str, str]


def alignment_fingerprint(reader: StoreReader, teacher_name: str, teacher: FrozenTeacher) -> dict[str, Any]:
    """What the cached durations depend on, as it reads back from JSON."""
    return json.loads(
        json.dumps(
            {
                "teacher": teacher_name,
                "vocab_size": teacher.model.config.vocab_size,
                "store_teacher": reader.teacher.to_dict(),
                "heads": alignment_heads(teacher.model),
            }
        )
    )


POOL_BATCHES = 8  # batches' worth of utterances grouped by length at a time: little padding per batch
DTW_THREADS = 2  # batches whose DTW runs at once beside the device (numpy releases the GIL in its loops)


def align_shard(reader: StoreReader, shard: int, teacher: FrozenTeacher, batch_size: int) -> dict[str, Any]:
    """Durations of one shard's utterances from the teacher reading their real full windows.

    Utterances are batched by length within pools of POOL_BATCHES batches (the decoder projects the speech
    frames up to each batch's longest); the stored float16 frames go to the device as they are and become full
    windows there; each batch's DTW runs on worker threads while the device reads the next batches. The record
    lists the utterances in store order."""
    heads = alignment_heads(teacher.model)
    device = teacher.model.device
    speech_mode = reader.spec.frames == "speech"  # then every window's tail is this store's template
    template = torch.tensor(reader.tail_template(), device=device)  # (F, D) float32
    if speech_mode:
        teacher.set_tail_template(template)
    template = template.to(teacher.model.dtype)
    languages: dict[str, str] = {}
    problems: dict[str, str] = {}  # transcripts the teacher cannot read
    pool: list[Utterance] = []
    aligning: list[tuple[list[tuple[str, int]], Future]] = []  # (ids and speech frames, DTW on the worker)

    def flush(utterances: list[Utterance], worker: ThreadPoolExecutor) -> None:
        stored = torch.tensor([len(u.states) for u in utterances])  # (B,) stored frames
        states = torch.zeros(len(utterances), int(stored.max()), template.shape[1], dtype=torch.float16)  # (B, T, D)
        for b, utt in enumerate(utterances):
            states[b, : len(utt.states)] = torch.from_numpy(utt.states)
        if device.type == "cuda":
            states = states.pin_memory()
        states = states.to(device, non_blocking=True).to(template.dtype)
        windows = assemble_window(states, stored.to(device), template)  # (B, F, D) in the teacher's dtype
        batch = encode_texts(
            teacher.tokenizer,
            teacher.specials,
            [u.text for u in utterances],
            [u.language for u in utterances],
            teacher.max_positions,
        )
        lengths = torch.tensor([u.speech_frames for u in utterances])  # (B,)
        speech_frames = states.shape[1] if speech_mode else None
        costs = alignment_costs(teacher, heads, windows, batch.to(device), lengths, speech_frames)
        ids = [(u.id, u.speech_frames) for u in utterances]
        aligning.append((ids, worker.submit(durations_from_costs, costs)))

    def flush_pool(worker: ThreadPoolExecutor) -> None:
        pool.sort(key=lambda u: len(u.states))
        for start in range(0, len(pool), batch_size):
            flush(pool[start : start + batch_size], worker)
        pool.clear()

    with ThreadPoolExecutor(max_workers=DTW_THREADS, thread_name_prefix="dtw") as worker:
        for utt in reader.iter_shard(shard):
            languages[utt.id] = utt.language
            problem = transcript_problem(
                teacher.tokenizer, teacher.specials, utt.text, utt.language, teacher.max_positions
            )
            if problem:
                problems[utt.id] = problem
                continue
            pool.append(utt)
            if len(pool) == batch_size * POOL_BATCHES:
                flush_pool(worker)
        flush_pool(worker)
        aligned = {
            utt_id: (speech_frames, durations)
            for ids, future in aligning
            for (utt_id, speech_frames), durations in zip(ids, future.result())
        }
    record: dict[str, Any] = {"durations": {}, "languages": languages, "rejects": {}}
    for utt_id in languages:  # store order
        if utt_id in problems:
            record["rejects"][utt_id] = problems[utt_id]
            continue
        speech_frames, durations = aligned[utt_id]
        if durations is None:
            record["rejects"][utt_id] = f"{speech_frames} speech frames for more text tokens"
        else:
            record["durations"][utt_id] = durations.tolist()
    return record


def align_store(
    accelerator: Any,
    reader: StoreReader,
    teacher: FrozenTeacher,
    teacher_name: str,
    out_dir: Path,
    batch_size: int,
    progress: bool,
    damaged: frozenset[int] = frozenset(),
) -> Alignment:
    """Align every complete shard but the `damaged` ones once (rank r takes the shards at positions r, r + W,
    ...), cache each shard's result as JSON in out_dir, and return the union. Reruns reuse the cache while the
    teacher and the store's teacher are the same."""
    fingerprint = alignment_fingerprint(reader, teacher_name, teacher)
    meta_path = out_dir / "alignment.json"
    if accelerator.is_main_process:
        if out_dir.exists() and (not meta_path.exists() or json.loads(meta_path.read_text()) != fingerprint):
            log.info("the cached durations in %s were made with another teacher: aligning again", out_dir)
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(fingerprint, indent=1))
    accelerator.wait_for_everyone()
    shards = [k for k in reader.shards() if k not in damaged]
    mine = [
        k
        for k in shards[accelerator.process_index :: accelerator.num_processes]
        if not (out_dir / f"{k:05d}.json").exists()
    ]
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
    states: torch.Tensor  # (B, T, D) teacher-scale speech frames, zero-padded: float16 (the store's) until `to`
    durations: torch.Tensor  # (B, L) frames per TLE token; row sums are the speech frames
    language_ids: torch.Tensor  # (B,)
    text: TextBatch
    ids: list[str]
    frames: int  # speech frames in the batch (the sum of `durations`), known on the host

    def pin_memory(self) -> TrainBatch:
        """The same batch in page-locked memory (the DataLoader's pin_memory calls this): copies to the GPU
        then run asynchronously."""
        text = self.text
        pinned = TextBatch(
            text.tle_tokens.pin_memory(),
            text.tle_mask.pin_memory(),
            text.decoder_input_ids.pin_memory(),
            text.labels.pin_memory(),
            text.prefix_length,
            text.texts,
            text.languages,
        )
        return TrainBatch(
            self.states.pin_memory(),
            self.durations.pin_memory(),
            self.language_ids.pin_memory(),
            pinned,
            self.ids,
            self.frames,
        )

    def to(self, device: torch.device) -> TrainBatch:
        """The batch on `device`, its states float32 there (float16 is half the bytes to copy; the values are
        the store's either way)."""
        return TrainBatch(
            self.states.to(device, non_blocking=True).float(),
            self.durations.to(device, non_blocking=True),
            self.language_ids.to(device, non_blocking=True),
            self.text.to(device),
            self.ids,
            self.frames,
        )


class Collate:
    """FeatureDataset items -> TrainBatch (runs in the DataLoader workers; picklable). With the TLE's
    pronunciation front end the text batch holds the tokens' pronunciations, computed here, off the loop."""

    def __init__(
        self,
        tokenizer: Any,
        specials: Any,
        durations: DurationTable,
        languages: list[str],
        max_positions: int,
        front_end: PronunciationFrontEnd | None = None,
    ):
        self.tokenizer, self.specials, self.durations = tokenizer, specials, durations
        self.languages, self.max_positions, self.front_end = languages, max_positions, front_end

    def __call__(self, items: list[dict[str, Any]]) -> TrainBatch:
        padded = pad_batch(items, torch.float16)
        text = encode_texts(
            self.tokenizer, self.specials, padded["texts"], padded["languages"], self.max_positions, self.front_end
        )
        durations = torch.zeros_like(text.tle_tokens)  # (B, L)
        for b, utt_id in enumerate(padded["ids"]):
            row = self.durations[utt_id]
            if len(row) != int(text.tle_mask[b].sum()) or row.sum() != int(padded["speech_frames"][b]):
                raise WhistleError(
                    f"cached durations of {utt_id!r} do not fit its tokens or frames: delete the "
                    "durations/ folder of the output directory to align again"
                )
            durations[b, : len(row)] = torch.from_numpy(row)
        speech = int(padded["speech_frames"].max())  # full-window stores: only the speech frames are targets
        language_ids = torch.tensor([self.languages.index(code) for code in padded["languages"]])
        frames = int(padded["speech_frames"].sum())
        return TrainBatch(padded["states"][:, :speech], durations, language_ids, text, padded["ids"], frames)


def stream_batches(
    dataset: FeatureDataset,
    collate: Collate,
    batch_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    skip: int,
    pin_memory: bool = False,
) -> Iterator[tuple[int, int, TrainBatch]]:
    """(epoch, batches read this epoch, batch) forever: a new epoch starts when this rank's share runs out.
    The first epoch starts after its first `skip` batches, without reading them (resuming at a data position).
    pin_memory: batches in page-locked memory (for a GPU: their copies then overlap the step)."""
    return endless_epochs(
        dataset,
        seed,
        epoch,
        skip,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def validation_batches(
    url: str, collate: Collate, keep: KeepSplit, size: int, batch_size: int, skip_damaged: bool
) -> list[TrainBatch]:
    """The first `size` held-out utterances in store order, batched once and kept in memory."""
    items = held_out_items(url, keep, size, skip_damaged)
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


# --- held-out metrics --------------------------------------------------------------------------------------


@torch.no_grad()
def validate(
    model: TLEModel,
    teacher: FrozenTeacher,
    batches: list[TrainBatch],
    wer_size: int,
    device: torch.device,
    reference: dict[str, float] | None = None,
) -> dict[str, float]:
    """Held-out metrics of the text-only TLE (z = prior mean, no posterior); the teacher's tail template
    must be the model's (teacher.set_tail_template(model.tail_template)):
    mse, cosine (normalised space, true durations); cosine_predicted (the frames at the TLE's own predicted
    durations, each utterance stretched linearly in time to its true length); length_error (|predicted - true|
    / true frames);
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
        out = model(
            text.tle_tokens, mask, batch.language_ids, durations=batch.durations, pronunciation=text.pronunciation
        )
        n = len(batch.ids)
        add("mse", masked_mse(out.states.float(), target.float(), out.frame_mask).item(), int(true_lengths.sum()))
        add("cosine", masked_cosine(out.states, target, out.frame_mask).item(), int(true_lengths.sum()))
        predicted = model.durations_from_log(out.log_durations, mask)  # (B, L)
        add("length_error", ((predicted.sum(1) - true_lengths).abs() / true_lengths).mean().item(), n)
        add(
            "duration_mae",
            ((predicted - batch.durations).abs() * mask).sum().item() / mask.sum().item(),
            int(mask.sum()),
        )
        # every window below is built with the model's tail template, which the teacher knows
        window = model.full_window(model.denormalise(out.states), out.lengths)
        add("decoder_ce", decoder_cross_entropy(teacher, window, text, out.states.shape[1])[0].item(), n)
        speech, lengths = model.speech_frames(
            text.tle_tokens, mask, batch.language_ids, pronunciation=text.pronunciation
        )
        add(
            "cosine_predicted",
            stretched_cosine(model.normalise(speech), lengths, target, true_lengths).item(),
            int(true_lengths.sum()),
        )
        predicted_window = model.full_window(speech, lengths)
        add(
            "decoder_ce_predicted", decoder_cross_entropy(teacher, predicted_window, text, speech.shape[1])[0].item(), n
        )
        real_window = model.full_window(batch.states, true_lengths)
        if reference is None:
            add(
                "real_decoder_ce", decoder_cross_entropy(teacher, real_window, text, batch.states.shape[1])[0].item(), n
            )
        decode = max(0, min(n, wer_size - len(hypotheses)))
        if decode:
            longest = 2 * int(mask[:decode].sum(1).max()) + 10
            hypotheses += greedy_transcribe(
                teacher, predicted_window[:decode], text.languages[:decode], longest, speech.shape[1]
            )
            references += text.texts[:decode]
            languages += text.languages[:decode]
            if reference is None:
                real_hypotheses += greedy_transcribe(
                    teacher, real_window[:decode], text.languages[:decode], longest, batch.states.shape[1]
                )
    metrics = {name: totals[name] / max(counts[name], 1) for name in totals}
    if hypotheses:
        metrics["wer_predicted"] = corpus_wer(references, hypotheses, languages)
        if reference is None:
            metrics["real_wer"] = corpus_wer(references, real_hypotheses, languages)
    if reference is not None:
        metrics.update(reference)
    model.train()
    return metrics
