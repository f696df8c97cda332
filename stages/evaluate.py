"""`whistle evaluate`: WER and CER of several Whisper models on several audio sets, side by side.

Every set is any source precompute reads (manifest, Common Voice folder, `datasets` dataset; the
[data] kind and columns apply) and is decoded once per batch for all models; models whose encoder
weights are identical (an adapted model and its teacher: finetune never changes the encoder) share
one encoder pass. Generation is transformers' own (`model.generate`, greedy or beam search) on
the real encoder's output — what `pipeline("automatic-speech-recognition")` does for a clip of at
most one window. Scoring uses Whisper's normalisers (`whistle_pipeline.metrics`).

Outputs in evaluate.output_dir:

    results.json        every score (WER, CER, counts, loops, worst clips) + the resolved config
    table.md            sets x models: WER % (CER %), and the relative WER change from the first model
    hypotheses.jsonl    per clip: reference, each model's transcript and word errors
    diffs.md            (write_diffs) per clip where a model's words differ from the first model's:
                        the words that changed, as [-removed-] {+added+}

A *repetition loop* is a transcript that stopped at max_new_tokens without an end token, or one that
repeats a 1-4 word n-gram at least 4 times in a row more often than its reference does; long
fine-tuning produced such loops on source clips (DESIGN.md §7), so they are always listed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.errors import WhistleError

log = logging.getLogger(__name__)

LOOP_MAX_NGRAM = 4  # longest repeated phrase (words) looked for
LOOP_MIN_REPEATS = 4  # consecutive repeats that make a loop
AUDIO_THREADS = 4  # clips decoded in parallel (soundfile and soxr release the GIL)


@dataclass(frozen=True)
class Named:
    """A model or audio set with the label it gets in tables ("LABEL=PATH", or the path's last part)."""

    label: str
    path: str

    @classmethod
    def parse(cls, spec: str) -> "Named":
        label, sep, path = spec.partition("=")
        if sep and label and "/" not in label and path:
            return cls(label, path)
        return cls(Path(spec.rstrip("/")).name or spec, spec)


def unique_labels(specs: Sequence[str], what: str) -> list[Named]:
    named = [Named.parse(spec) for spec in specs]
    labels = [n.label for n in named]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise WhistleError(f"two {what} share the label {', '.join(duplicates)}: name them as LABEL=PATH")
    return named


@dataclass(frozen=True)
class Clip:
    """One usable clip of a set (audio decoded later, in batches)."""

    id: str
    text: str
    language: str
    audio: str | bytes


@dataclass(frozen=True)
class Transcript:
    text: str
    ended: bool  # the model emitted its end token (False: cut off at max_new_tokens)


@dataclass(frozen=True)
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


@dataclass
class Score:
    """One model on one set."""

    model: str
    audio_set: str
    clips: list[ClipScore]
    seconds: float

    @property
    def ref_words(self) -> int:
        return sum(c.ref_words for c in self.clips)

    @property
    def wer(self) -> float:
        return sum(c.word_errors for c in self.clips) / max(1, self.ref_words)

    @property
    def cer(self) -> float:
        return sum(c.char_errors for c in self.clips) / max(1, sum(c.ref_chars for c in self.clips))

    @property
    def loops(self) -> list[str]:
        return [c.id for c in self.clips if c.loop]

    def worst(self, count: int) -> list[ClipScore]:
        """The clips with the most word errors (ties: higher WER first)."""
        ranked = sorted(self.clips, key=lambda c: (c.word_errors, c.wer), reverse=True)
        return [c for c in ranked[:count] if c.word_errors]

    def to_dict(self, outliers: int) -> dict[str, Any]:
        return {
            "model": self.model, "set": self.audio_set, "clips": len(self.clips), "ref_words": self.ref_words,
            "wer": self.wer, "cer": self.cer, "word_errors": sum(c.word_errors for c in self.clips),
            "loops": self.loops, "seconds": round(self.seconds, 2),
            "worst": [{"id": c.id, "word_errors": c.word_errors, "ref_words": c.ref_words, "reference": c.reference,
                       "hypothesis": c.hypothesis} for c in self.worst(outliers)],
        }


@dataclass
class EvaluateResult:
    output_dir: str
    models: list[Named]
    sets: list[Named]
    scores: dict[tuple[str, str], Score]  # (model label, set label) -> Score
    rejects: dict[str, list[dict[str, str]]]  # set label -> [{id, reason}]
    outliers: int
    seconds: float

    def score(self, model: str, audio_set: str) -> Score:
        return self.scores[(model, audio_set)]

    def table(self) -> str:
        """Markdown: one row per set, one column per model: WER % (CER %), relative WER change vs the first."""
        first = self.models[0].label
        header = "| set | clips | " + " | ".join(m.label for m in self.models) + " |"
        lines = [header, "|" + "---|" * (len(self.models) + 2)]
        for audio_set in self.sets:
            cells = []
            base = self.score(first, audio_set.label).wer
            for model in self.models:
                score = self.score(model.label, audio_set.label)
                cell = f"{100 * score.wer:.1f} ({100 * score.cer:.1f})"
                if model.label != first and base > 0:
                    cell += f" {100 * (score.wer - base) / base:+.0f}%"
                if score.loops:
                    cell += f" [{len(score.loops)} loop{'s' if len(score.loops) > 1 else ''}]"
                cells.append(cell)
            clips = len(self.score(first, audio_set.label).clips)
            lines.append(f"| {audio_set.label} | {clips} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self) -> str:
        text = ["WER % (CER %); relative WER change from the first model:", self.table()]
        for audio_set, rejects in self.rejects.items():
            if rejects:
                text.append(f"{audio_set}: {len(rejects)} clip(s) skipped (first: {rejects[0]['id']}: "
                            f"{rejects[0]['reason']})")
        text.append(f"wrote {self.output_dir}/results.json, table.md, hypotheses.jsonl"
                    + (", diffs.md" if (Path(self.output_dir) / "diffs.md").exists() else "")
                    + f" ({self.seconds:.0f} s)")
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": {m.label: m.path for m in self.models},
            "sets": {s.label: s.path for s in self.sets},
            "scores": [score.to_dict(self.outliers) for score in self.scores.values()],
            "rejects": self.rejects,
            "seconds": round(self.seconds, 1),
        }


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
            while words[start + repeats * n: start + (repeats + 1) * n] == words[start: start + n]:
                repeats += 1
            best = max(best, repeats)
    return best


def score_clip(clip_id: str, reference: str, transcript: Transcript, language: str) -> ClipScore:
    """Normalise (Whisper's normaliser for `language`) and count word and character errors."""
    from whistle_pipeline.metrics import error_rates, normalize

    ref, hyp = normalize(reference, language), normalize(transcript.text, language)
    if ref:
        rates = error_rates([reference], [transcript.text], language)
        word_errors = rates.substitutions + rates.deletions + rates.insertions
        char_errors = round(rates.cer * rates.n_chars)
        ref_words, ref_chars = rates.n_words, rates.n_chars
    else:  # nothing left to match: every hypothesis word is an insertion
        word_errors, char_errors, ref_words, ref_chars = len(hyp.split()), len(hyp), 0, 0
    loop = not transcript.ended or repetition_loop(hyp, ref)
    return ClipScore(clip_id, ref, hyp, language, ref_words, word_errors, ref_chars, char_errors, loop)


def word_diff(before: str, after: str) -> str:
    """`after` as an edit of `before`: unchanged words as they are, [-removed-] and {+added+}."""
    old, new = before.split(), after.split()
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            parts.append(" ".join(old[i1:i2]))
            continue
        if i2 > i1:
            parts.append("[-" + " ".join(old[i1:i2]) + "-]")
        if j2 > j1:
            parts.append("{+" + " ".join(new[j1:j2]) + "+}")
    return " ".join(parts)


# ---- models and generation ------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A Whisper model ready for batched generation, and what is needed to feed it."""

    named: Named
    model: Any  # WhisperForConditionalGeneration, eval mode, on the device
    tokenizer: Any
    geometry: Any  # whistle_pipeline.teacher.TeacherGeometry
    multilingual: bool
    encoder_key: str  # equal for models whose encoders are bit-identical

    @property
    def device(self) -> Any:
        return self.model.device


def resolve_device(name: str) -> Any:
    """teacher.device -> torch.device ("auto": accelerate's device for this process, else CPU)."""
    import torch

    if name == "auto":
        from accelerate import PartialState

        return PartialState().device
    return torch.device(name)


def encoder_fingerprint(model: Any) -> str:
    """A hash of every encoder weight: equal for models that share an encoder bit for bit."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def load_model(named: Named, revision: str, device: Any, dtype_name: str, attn: str) -> LoadedModel:
    """Load a complete Whisper (model, tokenizer, feature extractor geometry) for evaluation."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from whistle_pipeline.teacher import TeacherGeometry, resolve_dtype
    from whistle_pipeline.text import is_multilingual

    dtype = resolve_dtype(dtype_name, device)
    revision = revision if not Path(named.path).is_dir() else None
    try:
        model = WhisperForConditionalGeneration.from_pretrained(named.path, revision=revision, dtype=dtype,
                                                                attn_implementation=attn, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(named.path, revision=revision)
        features = WhisperFeatureExtractor.from_pretrained(named.path, revision=revision)
    except (OSError, ValueError) as err:
        raise WhistleError(
            f"cannot load the Whisper model {named.label} from {named.path!r}: {err}. Give a folder written by "
            "`whistle finetune`, `whistle import-ct2` or save_pretrained (with its tokenizer), or a hub name."
        ) from err
    model.requires_grad_(False).eval().to(device)
    return LoadedModel(named, model, tokenizer, TeacherGeometry.from_pretrained(model.config, features),
                       is_multilingual(model.config, model.generation_config), encoder_fingerprint(model))


def encode(model: LoadedModel, audio: list[Any]) -> Any:
    """Clips (each (N,) float32 at the model's rate, N <= one window) -> encoder states (B, max_frames, D)."""
    import torch

    from whistle_pipeline.teacher import teacher_states

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


def generate(model: LoadedModel, states: Any, languages: Sequence[str], num_beams: int, max_new_tokens: int
             ) -> list[Transcript]:
    """Transcripts of encoder states (B, max_frames, D) with transformers' Whisper generation."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    options: dict[str, Any] = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "return_timestamps": False}
    if model.multilingual:  # English-only models refuse language/task tokens
        options.update(language=list(languages), task="transcribe")
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
    return [Transcript(text.strip(), n < max_new_tokens) for text, n in zip(texts, lengths)]


# ---- audio sets -----------------------------------------------------------------------------------

def open_set(named: Named, config: PipelineConfig) -> tuple[list[Clip], list[dict[str, str]]]:
    """The usable clips of an audio set and the rejected rows ({id, reason})."""
    from whistle_pipeline.sources import SourceReject, open_source

    data = dataclasses.replace(config.data, path=named.path, max_clips=config.evaluate.max_clips)
    source = open_source(data)
    clips, rejects = [], []
    for row in source:
        if isinstance(row, SourceReject):
            rejects.append({"id": row.id, "reason": row.reason})
        else:
            clips.append(Clip(row.id, row.text, row.language, row.audio))
    return clips, rejects


def decoded_batches(clips: Sequence[Clip], sample_rate: int, window_seconds: float, batch_size: int
                    ) -> Iterator[tuple[list[Clip], list[Any], list[dict[str, str]]]]:
    """(clips, audio arrays, rejects) per batch; the next batch decodes on threads while this one runs."""
    from whistle_pipeline.audio import AudioError, load_audio

    def load(clip: Clip) -> Any:
        try:
            return load_audio(clip.audio, sample_rate, max_seconds=window_seconds, name=clip.id)
        except AudioError as err:
            return err

    starts = range(0, len(clips), batch_size)
    with ThreadPoolExecutor(AUDIO_THREADS) as pool:
        pending = [pool.submit(lambda s=s: list(map(load, clips[s: s + batch_size]))) for s in starts[:1]]
        for k, start in enumerate(starts):
            if k + 1 < len(starts):
                pending.append(pool.submit(lambda s=starts[k + 1]: list(map(load, clips[s: s + batch_size]))))
            loaded = pending[k].result()
            batch_clips = clips[start: start + batch_size]
            good = [(clip, audio) for clip, audio in zip(batch_clips, loaded) if not isinstance(audio, Exception)]
            bad = [{"id": clip.id, "reason": audio.reason} for clip, audio in zip(batch_clips, loaded)
                   if isinstance(audio, Exception)]
            yield [c for c, _ in good], [a for _, a in good], bad


# ---- the stage ------------------------------------------------------------------------------------

def transcribe_set(models: Sequence[LoadedModel], clips: Sequence[Clip], batch_size: int, num_beams: int,
                   max_new_tokens: int, progress: Any = None) -> tuple[dict[str, list[ClipScore]], dict[str, float],
                                                                      list[dict[str, str]]]:
    """Every model's scored transcripts of `clips` -> ({model label: scores}, {label: seconds}, rejects)."""
    first = models[0]
    groups: dict[str, list[LoadedModel]] = {}
    for model in models:
        groups.setdefault(model.encoder_key, []).append(model)
    scores: dict[str, list[ClipScore]] = {m.named.label: [] for m in models}
    seconds = {m.named.label: 0.0 for m in models}
    rejects: list[dict[str, str]] = []
    for batch, audio, bad in decoded_batches(clips, first.geometry.sample_rate, first.geometry.window_seconds,
                                             batch_size):
        rejects += bad
        if batch:
            languages = [clip.language for clip in batch]
            for group in groups.values():
                started = time.perf_counter()
                states = encode(group[0], audio)  # (B, max_frames, D), once for the whole group
                shared = (time.perf_counter() - started) / len(group)
                for model in group:
                    started = time.perf_counter()
                    transcripts = generate(model, states, languages, num_beams, max_new_tokens)
                    seconds[model.named.label] += shared + time.perf_counter() - started
                    scores[model.named.label] += [score_clip(c.id, c.text, t, c.language)
                                                  for c, t in zip(batch, transcripts)]
        if progress is not None:
            progress.update(len(batch) + len(bad))
    return scores, seconds, rejects


def check_geometry(models: Sequence[LoadedModel]) -> None:
    """All models must read audio the same way (one decode per set): same rate and window."""
    first = models[0]
    for model in models[1:]:
        if (model.geometry.sample_rate, model.geometry.n_samples) != (first.geometry.sample_rate, first.geometry.n_samples):
            raise WhistleError(
                f"models {first.named.label} and {model.named.label} read audio differently "
                f"({first.geometry.sample_rate} Hz x {first.geometry.n_samples} vs {model.geometry.sample_rate} Hz x "
                f"{model.geometry.n_samples} samples): evaluate them in separate runs"
            )


def run(config: PipelineConfig) -> EvaluateResult:
    """Score every model on every set; write results.json, table.md, hypotheses.jsonl and diffs.md."""
    from tqdm.auto import tqdm

    settings = config.evaluate
    if not settings.models:
        raise WhistleError("no model to evaluate: give MODEL arguments (or evaluate.models)")
    if not settings.sets:
        raise WhistleError("no audio set to evaluate on: give --audio SET (or evaluate.sets)")
    started = time.perf_counter()
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save(output_dir)
    named_models = unique_labels(settings.models, "models")
    named_sets = unique_labels(settings.sets, "audio sets")
    device = resolve_device(config.teacher.device)
    models = [load_model(n, config.teacher.revision, device, config.teacher.dtype, config.teacher.attn_implementation)
              for n in named_models]
    check_geometry(models)
    log.info("evaluating %d model(s) (%d encoder pass(es) per batch) on %d set(s), %s",
             len(models), len({m.encoder_key for m in models}), len(named_sets), device)

    result = EvaluateResult(str(output_dir), named_models, named_sets, {}, {}, settings.outliers, 0.0)
    for audio_set in named_sets:
        clips, rejects = open_set(audio_set, config)
        if not clips:
            raise WhistleError(f"audio set {audio_set.label} ({audio_set.path}) has no usable clip"
                               + (f" (first reject: {rejects[0]['id']}: {rejects[0]['reason']})" if rejects else ""))
        with tqdm(total=len(clips), desc=f"evaluate {audio_set.label}", unit="clip", disable=None) as progress:
            scores, seconds, bad = transcribe_set(models, clips, settings.batch_size, settings.num_beams,
                                                  settings.max_new_tokens, progress)
        result.rejects[audio_set.label] = rejects + bad
        for model in named_models:
            result.scores[(model.label, audio_set.label)] = Score(model.label, audio_set.label, scores[model.label],
                                                                  seconds[model.label])
    result.seconds = time.perf_counter() - started
    write_outputs(result, settings.write_diffs)
    return result


def write_outputs(result: EvaluateResult, write_diffs: bool) -> None:
    out = Path(result.output_dir)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "table.md").write_text(result.table() + "\n", encoding="utf-8")
    labels = [m.label for m in result.models]
    with open(out / "hypotheses.jsonl", "w", encoding="utf-8") as handle:
        for audio_set in result.sets:
            per_model = [result.score(label, audio_set.label).clips for label in labels]
            for clips in zip(*per_model):
                handle.write(json.dumps({
                    "set": audio_set.label, "id": clips[0].id, "language": clips[0].language,
                    "reference": clips[0].reference, "ref_words": clips[0].ref_words,
                    "hypotheses": {label: c.hypothesis for label, c in zip(labels, clips)},
                    "word_errors": {label: c.word_errors for label, c in zip(labels, clips)},
                    "loops": [label for label, c in zip(labels, clips) if c.loop],
                }, ensure_ascii=False) + "\n")
    diffs = out / "diffs.md"
    if write_diffs and len(labels) > 1:
        diffs.write_text(diff_report(result), encoding="utf-8")
    elif diffs.exists():
        diffs.unlink()  # a stale file from an earlier run would contradict results.json


def diff_report(result: EvaluateResult) -> str:
    """Per set, every clip where some model's words differ from the first model's."""
    labels = [m.label for m in result.models]
    width = max(len(label) for label in labels + ["reference"])
    lines = [f"# Words that changed from {labels[0]} (normalised text; [-removed-] {{+added+}})", ""]
    for audio_set in result.sets:
        per_model = [result.score(label, audio_set.label).clips for label in labels]
        changed = [clips for clips in zip(*per_model) if any(c.hypothesis != clips[0].hypothesis for c in clips[1:])]
        lines += [f"## {audio_set.label}: {len(changed)} of {len(per_model[0])} clips changed", ""]
        for clips in changed:
            errors = ", ".join(f"{label} {c.word_errors}" for label, c in zip(labels, clips))
            lines.append(f"### {clips[0].id} ({clips[0].ref_words} words; errors: {errors})")
            lines.append("```")
            lines.append(f"{'reference'.ljust(width)} : {clips[0].reference}")
            lines.append(f"{labels[0].ljust(width)} : {clips[0].hypothesis}")
            for label, clip in zip(labels[1:], clips[1:]):
                text = word_diff(clips[0].hypothesis, clip.hypothesis) if clip.hypothesis != clips[0].hypothesis else "(same)"
                lines.append(f"{label.ljust(width)} : {text}" + ("   <- LOOP" if clip.loop else ""))
            lines += ["```", ""]
    return "\n".join(lines)
