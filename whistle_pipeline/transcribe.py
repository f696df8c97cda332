"""Transcribe audio sets with Whisper models and score each transcript: what `whistle evaluate` and
finetune's validation on real audio share.

    models = [load_model(Named(label="base", path="openai/whisper-tiny.en"), "main", device, "auto", "sdpa")]
    clips, rejects = open_set(Named(label="test", path="test/manifest.jsonl"), config)
    columns = [Column(label="base", model=models[0]),
               Column(label="base+prompt", model=models[0],
                      decoding=Decoding(prompt_ids=tuple(prompt_ids(models[0].tokenizer, "warfarin, apixaban"))))]
    result = transcribe_set(columns, clips, batch_size=16, max_new_tokens=128)
    result.scores["base+prompt"]  # [ClipScore, ...]

Every set is any source precompute reads (`whistle_pipeline.sources`) and is decoded once per batch
for all columns (a column is a model and how it decodes: beams, a prompt, logits processors such as
shallow fusion); models whose encoder weights are identical (an adapted model and its teacher:
finetune never changes the encoder) share one encoder pass. Generation is transformers' own
(`model.generate`, greedy or beam search) on the real encoder's output — what
`pipeline("automatic-speech-recognition")` does for a clip of at most one window. Scoring uses
Whisper's normalisers (`whistle_pipeline.metrics`).

A *repetition loop* is a transcript that stopped at max_new_tokens without an end token, or one that
repeats a 1-4 word n-gram at least 4 times in a row more often than its reference does; long
fine-tuning produced such loops on source clips, so every score records them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from whistle_pipeline.audio import AudioError, load_audio
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import error_rates, normalize
from whistle_pipeline.sources import Clip, SourceReject, open_source
from whistle_pipeline.teacher import TeacherGeometry, load_teacher, teacher_states
from whistle_pipeline.text import is_multilingual

LOOP_MAX_NGRAM = 4  # longest repeated phrase (words) looked for
LOOP_MIN_REPEATS = 4  # consecutive repeats that make a loop
AUDIO_THREADS = 4  # clips decoded in parallel (soundfile and soxr release the GIL)


@dataclass(frozen=True, kw_only=True)
class Named:
    """A model or audio set with the label it gets in tables ("LABEL=PATH", or the path's last part)."""

    label: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> Named:
        label, sep, path = spec.partition("=")
        if sep and label and "/" not in label and path:
            return cls(label=label, path=path)
        return cls(label=Path(spec.rstrip("/")).name or spec, path=spec)


@dataclass(frozen=True, kw_only=True)
class Transcript:
    text: str
    ended: bool  # the model emitted its end token (False: cut off at max_new_tokens)


@dataclass(frozen=True, kw_only=True)
class ClipScore:
    """One transcript scored against its reference (normalised words)."""

    id: str
    reference: str
    hypothesis: str
    language: str
    ref_words: int
    word_errors: int
    ref_chars: int
    char_errors: int
    loop: bool

    @property
    def wer(self) -> float:
        return self.word_errors / self.ref_words if self.ref_words else float(self.word_errors > 0)


def corpus_wer(scores: Sequence[ClipScore]) -> float:
    """All word errors over all reference words (0 reference words: 0)."""
    return sum(c.word_errors for c in scores) / max(1, sum(c.ref_words for c in scores))


# ---- scoring --------------------------------------------------------------------------------------


def repetition_loop(hypothesis: str, reference: str = "") -> bool:
    """Whether `hypothesis` repeats some 1-4 word n-gram LOOP_MIN_REPEATS+ times in a row more than `reference`."""
    return _longest_run(hypothesis.split()) > max(LOOP_MIN_REPEATS - 1, _longest_run(reference.split()))


def _longest_run(words: list[str]) -> int:
    """The most consecutive repeats of any n-gram (n <= LOOP_MAX_NGRAM) in `words`."""
    best = 1
    for n in range(1, LOOP_MAX_NGRAM + 1):
        for start in range(len(words) - 2 * n + 1):
            repeats = 1
            while words[start + repeats * n : start + (repeats + 1) * n] == words[start : start + n]:
                repeats += 1
            best = max(best, repeats)
    return best


def score_clip(clip_id: str, reference: str, transcript: Transcript, language: str) -> ClipScore:
    """Normalise (Whisper's normaliser for `language`) and count word and character errors."""
    ref, hyp = normalize(reference, language), normalize(transcript.text, language)
    if ref:
        rates = error_rates([reference], [transcript.text], language)
        word_errors = rates.substitutions + rates.deletions + rates.insertions
        char_errors = round(rates.cer * rates.n_chars)
        ref_words, ref_chars = rates.n_words, rates.n_chars
    else:  # nothing left to match: every hypothesis word is an insertion
        word_errors, char_errors, ref_words, ref_chars = len(hyp.split()), len(hyp), 0, 0
    return ClipScore(
        id=clip_id,
        reference=ref,
        hypothesis=hyp,
        language=language,
        ref_words=ref_words,
        word_errors=word_errors,
        ref_chars=ref_chars,
        char_errors=char_errors,
        loop=not transcript.ended or repetition_loop(hyp, ref),
    )


# ---- models and generation ------------------------------------------------------------------------


@dataclass(kw_only=True)
class LoadedModel:
    """A Whisper model ready for batched generation, and what is needed to feed it."""

    named: Named
    model: Any  # WhisperForConditionalGeneration, eval mode, on the device
    tokenizer: Any
    geometry: TeacherGeometry | None  # None: only `generate` is used (encoder states come from elsewhere)
    multilingual: bool
    encoder_key: str  # equal for models whose encoders are bit-identical

    @property
    def device(self) -> torch.device:
        return self.model.device


def encoder_fingerprint(model: Any) -> str:
    """A hash of every encoder weight: equal for models that share an encoder bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def load_model(named: Named, revision: str, device: Any, dtype_name: str, attn: str) -> LoadedModel:
    """Load a complete Whisper (model, tokenizer, feature extractor geometry) for evaluation, through the
    one teacher loader (its revision policy, safetensors only, the feature-extractor fallback)."""
    loaded = load_teacher(named.path, revision, "full", device, dtype_name, attn)
    return LoadedModel(
        named=named,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        geometry=loaded.geometry,
        multilingual=is_multilingual(loaded.model.config, loaded.model.generation_config),
        encoder_key=encoder_fingerprint(loaded.model),
    )


def encode(model: LoadedModel, audio: list[Any]) -> torch.Tensor:
    """Clips (each (N,) float32 at the model's rate, N <= one window) -> encoder states (B, max_frames, D)."""
    batch = torch.zeros(len(audio), model.geometry.n_samples)  # (B, n_samples): zero padding, as Whisper
    for b, clip in enumerate(audio):
        batch[b, : len(clip)] = torch.from_numpy(clip)
    return teacher_states(model.model.model.encoder, batch, model.geometry)  # (B, max_frames, D)


@contextlib.contextmanager
def quiet_generation() -> Iterator[None]:
    """Silence the generation warnings Whisper's own `generate` triggers on every call (its internal
    suppress-token arguments, max_length beside max_new_tokens, no attention mask for encoder outputs):
    they say nothing about the user's input and would repeat once per batch."""
    generation_log = logging.getLogger("transformers.generation.utils")
    level = generation_log.level
    generation_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        generation_log.setLevel(level)


class BeamSearchCache(EncoderDecoderCache):
    """transformers' encoder-decoder cache, except that beam search does not reorder the cross-attention
    keys and values: every beam of a clip attends to the same encoder states, so reordering them (an
    index_select of 2 x layers tensors of (beams, heads, frames, head_dim) per step, what
    `EncoderDecoderCache.reorder_cache` does) copies identical rows onto each other. Skipping it made
    tiny.en's beam search 2.6x (2 beams) and 5x (4 beams) faster on a CPU, same transcripts (bench/RESULTS.md,
    "beam search"). Only the decoder's self-attention cache, which differs per beam, is reordered."""

    def __init__(self) -> None:
        super().__init__(DynamicCache(), DynamicCache())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def generate(
    model: LoadedModel,
    states: torch.Tensor,
    languages: Sequence[str],
    num_beams: int,
    max_new_tokens: int,
    prompt_ids: Sequence[int] = (),
    logits_processors: Sequence[Any] = (),
) -> list[Transcript]:
    """Transcripts of encoder states (B, max_frames, D) with transformers' Whisper generation.

    `prompt_ids`: <|startofprev|> + text tokens (`whistle_pipeline.prompting`), given before the decoder's
    start tokens; `logits_processors`: e.g. `fusion.ShallowFusion`, applied after the log-softmax."""
    options: dict[str, Any] = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "return_timestamps": False}
    if num_beams > 1:
        options["cache"] = BeamSearchCache()
    if model.multilingual:  # English-only models refuse language/task tokens
        options.update(language=list(languages), task="transcribe")
    if prompt_ids:
        options["prompt_ids"] = torch.tensor(list(prompt_ids), device=model.device)  # (P,)
    if logits_processors:
        options["logits_processor"] = list(logits_processors)
    encoder_outputs = BaseModelOutput(last_hidden_state=states.to(model.device, model.model.dtype))
    with torch.inference_mode(), quiet_generation():
        sequences = model.model.generate(encoder_outputs=encoder_outputs, **options)  # (B, S)
        if not torch.is_tensor(sequences):
            sequences = sequences.sequences
    # Whisper's generate strips the prompt and the end token and pads with pad (== end) tokens, so a
    # transcript that was cut off is one with max_new_tokens real tokens.
    pad = model.model.generation_config.pad_token_id
    lengths = (sequences != pad).sum(1).tolist()  # (B,)
    texts = model.tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return [Transcript(text=text.strip(), ended=n < max_new_tokens) for text, n in zip(texts, lengths)]


def start_tokens(model: LoadedModel) -> int:
    """Decoder tokens generate puts before the transcript: <|startoftranscript|> [<|lang|> <|transcribe|>]
    <|notimestamps|>."""
    return 4 if model.multilingual else 2


@dataclass(frozen=True)
class Decoding:
    """How one column decodes: beam width, a prompt, logits processors (e.g. shallow fusion)."""

    num_beams: int = 1
    prompt_ids: tuple[int, ...] = ()
    logits_processors: tuple[Any, ...] = ()


@dataclass(frozen=True, eq=False)
class Column:
    """One column of a results table: a model decoded one way."""

    label: str
    model: LoadedModel
    decoding: Decoding = Decoding()


# ---- audio sets -----------------------------------------------------------------------------------


def open_set(named: Named, config: PipelineConfig) -> tuple[list[Clip], list[dict[str, str]]]:
    """The usable clips of an audio set (read with the [data] kind and columns, at most
    evaluate.max_clips rows) and the rejected rows ({id, reason})."""
    data = dataclasses.replace(config.data, path=named.path, max_clips=config.evaluate.max_clips)
    clips, rejects = [], []
    for row in open_source(data):
        if isinstance(row, SourceReject):
            rejects.append({"id": row.id, "reason": row.reason})
        else:
            clips.append(row)
    return clips, rejects


def decoded_batches(
    clips: Sequence[Clip], sample_rate: int, window_seconds: float, batch_size: int
) -> Iterator[tuple[list[Clip], list[Any], list[dict[str, str]]]]:
    """(clips, audio arrays, rejects) per batch; the next batch decodes on threads while this one runs."""

    def load(clip: Clip) -> Any:
        try:
            return load_audio(clip.audio, sample_rate, max_seconds=window_seconds, name=clip.id, segment=clip.segment)
        except AudioError as err:
            return err

    starts = range(0, len(clips), batch_size)
    with ThreadPoolExecutor(AUDIO_THREADS) as pool:
        pending = [pool.submit(lambda s=s: list(map(load, clips[s : s + batch_size]))) for s in starts[:1]]
        for k, start in enumerate(starts):
            if k + 1 < len(starts):
                pending.append(pool.submit(lambda s=starts[k + 1]: list(map(load, clips[s : s + batch_size]))))
            loaded = pending[k].result()
            batch_clips = clips[start : start + batch_size]
            good = [(clip, audio) for clip, audio in zip(batch_clips, loaded) if not isinstance(audio, Exception)]
            bad = [
                {"id": clip.id, "reason": audio.reason}
                for clip, audio in zip(batch_clips, loaded)
                if isinstance(audio, Exception)
            ]
            yield [c for c, _ in good], [a for _, a in good], bad


def check_geometry(models: Sequence[LoadedModel]) -> None:
    """All models must read audio the same way (one decode per set): same rate and window."""
    first = models[0]
    for model in models[1:]:
        if (model.geometry.sample_rate, model.geometry.n_samples) != (
            first.geometry.sample_rate,
            first.geometry.n_samples,
        ):
            raise WhistleError(
                f"models {first.named.label} and {model.named.label} read audio differently "
                f"({first.geometry.sample_rate} Hz x {first.geometry.n_samples} vs {model.geometry.sample_rate} Hz x "
                f"{model.geometry.n_samples} samples): evaluate them in separate runs"
            )


@dataclass(kw_only=True)
class SetTranscripts:
    """What `transcribe_set` returns, per column label: scored transcripts and timings."""

    scores: dict[str, list[ClipScore]]
    seconds: dict[str, float]  # generation + this column's share of the encoder passes
    decode_seconds: dict[str, float]  # generation alone (the decoding loop, prompt and fusion included)
    rejects: list[dict[str, str]]  # clips whose audio could not be read: {id, reason}


def transcribe_set(
    columns: Sequence[Column], clips: Sequence[Clip], batch_size: int, max_new_tokens: int, progress: Any = None
) -> SetTranscripts:
    """Every column's scored transcripts of `clips`. Each batch's audio is decoded once, each distinct
    encoder runs once per batch (columns of one model, or of models sharing an encoder, share its states).

    `progress` (a tqdm bar, optional) is advanced by the clips of each batch."""
    groups: dict[str, list[Column]] = {}
    for column in columns:
        groups.setdefault(column.model.encoder_key, []).append(column)
    first = columns[0].model
    result = SetTranscripts(
        scores={c.label: [] for c in columns},
        seconds={c.label: 0.0 for c in columns},
        decode_seconds={c.label: 0.0 for c in columns},
        rejects=[],
    )
    for batch, audio, bad in decoded_batches(
        clips, first.geometry.sample_rate, first.geometry.window_seconds, batch_size
    ):
        result.rejects += bad
        if batch:
            languages = [clip.language for clip in batch]
            for group in groups.values():
                started = time.perf_counter()
                states = encode(group[0].model, audio)  # (B, max_frames, D), once for the whole group
                shared = (time.perf_counter() - started) / len(group)
                for column in group:
                    started = time.perf_counter()
                    options = column.decoding
                    transcripts = generate(
                        column.model,
                        states,
                        languages,
                        options.num_beams,
                        max_new_tokens,
                        options.prompt_ids,
                        options.logits_processors,
                    )
                    decoding = time.perf_counter() - started
                    result.decode_seconds[column.label] += decoding
                    result.seconds[column.label] += shared + decoding
                    result.scores[column.label] += [
                        score_clip(c.id, c.text, t, c.language) for c, t in zip(batch, transcripts)
                    ]
        if progress is not None:
            progress.update(len(batch) + len(bad))
    return result
