"""validate-tle: how close a trained TLE comes to the teacher, and can the frozen decoder read it?

For every utterance of an evaluation store (sentences the TLE never saw), with the real teacher:

  cosine, mse        TLE frames vs the teacher's, in the store's normalised space, at the true durations
                     (per-token durations from the teacher's alignment heads + DTW, as train-tle uses)
  cosine_predicted   the same cosine of the TLE's frames at its own predicted durations, each utterance
                     stretched linearly in time to its true length (text alone, as finetune uses the TLE)
  length_error       |predicted - true| / true speech frames;  duration_mae: frames per token
  decoder_ce         the frozen decoder's cross-entropy per label token reading the TLE full window
                     (true / predicted lengths) — the baseline is the same on the real states
  wer                greedy round trip text -> TLE full window -> frozen decoder -> text, Whisper's
                     English normaliser, at true and predicted lengths; baseline: the real states
                     (speech frames + tail template, which is what the decoder gets from the store)

The baseline (real audio) is measured in the same run on the same utterances. `text_files` adds the
text-only round trip of other sentences (no audio needed), e.g. the target domain's; `voices` (the
`whistle synthesize` manifest of the store's clips) adds the real audio's decoder CE and WER per voice:
how hard each voice is for the decoder, the scale to read the TLE's own pair of figures on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stages.tle_data import Collate, DurationTable, TrainBatch, align_shard, validate
from stages.training_data import open_store
from store import StoreReader
from whistle_pipeline import preflight
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.decoder import FrozenTeacher, decoder_cross_entropy, greedy_transcribe, load_frozen_teacher
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import corpus_wer
from whistle_pipeline.sources import open_source
from whistle_pipeline.teacher import resolve_device
from whistle_pipeline.text import IGNORE_INDEX, encode_texts
from whistle_pipeline.tle import TLEModel, retimed

log = logging.getLogger(__name__)

# the summary's table: label, the TLE's figure, the real audio's figure on the same utterances
TABLE = [
    ("cosine to teacher (normalised)", "cosine", None),
    ("cosine, predicted lengths (stretched to true)", "cosine_predicted", None),
    ("masked MSE (normalised)", "mse", None),
    ("length error (predicted vs true)", "length_error", None),
    ("duration MAE (frames/token)", "duration_mae", None),
    ("decoder CE/token, true length", "decoder_ce", "real_decoder_ce"),
    ("decoder CE/token, predicted length", "decoder_ce_predicted", "real_decoder_ce"),
    ("round-trip WER, true length", "wer_true", "real_wer"),
    ("round-trip WER, predicted length", "wer_predicted", "real_wer"),
]


@dataclass(frozen=True)
class ValidateTLEOptions:
    """What to validate and what to add; the teacher comes from the configuration's [teacher]."""

    tle_dir: str
    store: str  # an evaluation store of the teacher's states (held-out sentences)
    batch_size: int = 16
    weights: str | None = None  # a checkpoint's model.safetensors to evaluate with tle_dir's configuration
    text_files: tuple[str, ...] = ()  # text-only round trips, figure text_wer_<file stem>
    text_lines: int = 40  # lines of each text file
    voices: str | None = None  # the synthesize manifest of the store's clips: real CE and WER per voice
    examples: int = 5  # round-trip transcripts shown
    json_path: str | None = None  # the metrics as JSON
    figure: str | None = None  # PNG: real vs TLE states of the first utterance


@dataclass
class ValidateTLEResult:
    tle_dir: str
    store: str
    metrics: dict[str, Any]  # figure name -> value; "voices": {voice: {clips, wer, decoder_ce}}
    transcripts: list[dict[str, str]] = field(default_factory=list)  # reference, tle, predicted, real
    text_transcripts: list[dict[str, str]] = field(default_factory=list)  # reference, predicted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        metrics = self.metrics
        lines = [
            f"{metrics['utterances']} held-out utterances of {self.store}; TLE {self.tle_dir}",
            f"{'':38s} {'TLE':>8s} {'real audio':>10s}",
        ]
        for label, name, baseline in TABLE:
            lines.append(f"{label:38s} {metrics[name]:8.4f} " + (f"{metrics[baseline]:10.4f}" if baseline else ""))
        for t in self.transcripts:
            lines.append(f"  ref:  {t['reference']}\n  tle:  {t['tle']}\n  pred: {t['predicted']}\n  real: {t['real']}")
        for t in self.text_transcripts:
            lines.append(f"  text: {t['reference']}\n  pred: {t['predicted']}")
        if "voices" in metrics:
            lines.append(
                f"real audio per voice (TLE: WER {metrics['wer_predicted']:.1%} at CE "
                f"{metrics['decoder_ce_predicted']:.3f}, predicted lengths):"
            )
            for voice, row in sorted(metrics["voices"].items(), key=lambda kv: kv[1]["wer"]):
                lines.append(
                    f"  {voice:20s} {row['clips']:4d} clips  WER {row['wer']:6.1%}  CE/token {row['decoder_ce']:.3f}"
                )
        lines += [
            f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}" for name, value in metrics.items()
        ]
        return "\n".join(lines)


@dataclass
class RoundTrips:
    """Per utterance: the greedy transcripts of the TLE (true and predicted lengths) and of the real states,
    and the decoder's CE per label token on the real states with its label-token count."""

    references: list[str] = field(default_factory=list)
    tle: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)
    real: list[str] = field(default_factory=list)
    real_ce: list[float] = field(default_factory=list)
    label_tokens: list[int] = field(default_factory=list)


def run(config: PipelineConfig, options: ValidateTLEOptions) -> ValidateTLEResult:
    """Validate the TLE in options.tle_dir on options.store against config.teacher."""
    preflight.validate_tle(config, options)
    started = time.time()
    # the voices manifest is read (any manifest format) and matched to the store before anything is computed
    voice_of = read_voices(options.voices, stored_ids(options.store), config) if options.voices else None
    device, teacher, tle, batches, ids, rejects = prepared(
        config, options.tle_dir, options.weights, options.store, options.batch_size
    )
    metrics = validate(tle, teacher, batches, len(ids), device)
    trips = round_trips(tle, teacher, batches, device)
    languages = [language for batch in batches for language in batch.text.languages]
    metrics.update(
        wer_true=corpus_wer(trips.references, trips.tle, languages),
        utterances=len(ids),
        alignment_rejects=len(rejects),
        seconds=time.time() - started,
    )
    text_transcripts = []
    for path in options.text_files:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        lines = lines[: options.text_lines]
        predicted = text_round_trip(tle, teacher, lines, options.batch_size)
        metrics[f"text_wer_{Path(path).stem}"] = corpus_wer(lines, predicted, ["en"] * len(lines))
        text_transcripts += [{"reference": r, "predicted": p} for r, p in zip(lines, predicted)][: options.examples]
    if voice_of is not None:
        metrics["voices"] = per_voice(voice_of, ids, trips.references, trips.real, trips.real_ce, trips.label_tokens)
    if options.weights is not None:
        metrics["weights"] = options.weights
    summary_path = Path(options.tle_dir) / "summary.json"
    if summary_path.exists() and options.weights is None:
        summary = json.loads(summary_path.read_text())
        metrics.update(
            train_steps=summary["steps"],
            train_minutes=summary["wall_seconds"] / 60,
            train_utterances=summary["train_utterances"],
        )
    transcripts = [
        {"reference": r, "tle": t, "predicted": p, "real": a}
        for r, t, p, a in zip(trips.references, trips.tle, trips.predicted, trips.real)
    ][: options.examples]
    result = ValidateTLEResult(options.tle_dir, options.store, metrics, transcripts, text_transcripts)
    if options.json_path:
        Path(options.json_path).write_text(json.dumps(metrics, indent=2))
    if options.figure:
        plot_example(tle, batches[0], options.figure)
    return result


def voice_cosine(
    config: PipelineConfig, tle_dir: str, store: str, other_store: str, batch_size: int = 16
) -> dict[str, Any]:
    """The normalised cosine of real speech to real speech, the scale a TLE's cosine is read on: each
    utterance of `other_store` (the same sentences spoken otherwise: other voices, another synthesizer;
    matched by id and tokens) re-timed token by token to `store`'s durations (both from the teacher's
    alignment), against `store`'s states, in the TLE's normalised space -> cosine, utterances, unmatched."""
    device, teacher, tle, batches, ids, _ = prepared(config, tle_dir, None, store, batch_size)
    other: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for batch in aligned_batches(other_store, teacher, tle, batch_size)[0]:
        for row, uid in enumerate(batch.ids):
            keep = batch.text.tle_mask[row]
            frames = int(batch.durations[row].sum())
            other[uid] = (batch.text.tle_tokens[row][keep], batch.durations[row][keep], batch.states[row, :frames])
    total, frames, matched = 0.0, 0, 0
    for batch in batches:
        for row, uid in enumerate(batch.ids):
            keep = batch.text.tle_mask[row]
            tokens, durations = batch.text.tle_tokens[row][keep], batch.durations[row][keep]
            if uid not in other or not torch.equal(other[uid][0], tokens):
                continue
            length = int(durations.sum())
            target = tle.normalise(batch.states[row, :length].float().to(device))
            moved = tle.normalise(retimed(other[uid][2], other[uid][1], durations).to(device))
            total += F.cosine_similarity(moved, target, dim=-1).sum().item()
            frames, matched = frames + length, matched + 1
    if not matched:
        raise WhistleError(
            f"no utterance of {other_store} matches one of {store} (same id, same tokens): give a store of the "
            "same sentences with the same ids"
        )
    return {"cosine": total / frames, "utterances": matched, "unmatched": len(ids) - matched}


def prepared(config: PipelineConfig, tle_dir: str, weights: str | None, store: str, batch_size: int):
    """The device, the frozen teacher (holding the TLE's tail template), the TLE and the store's aligned
    batches, their ids and the alignment's rejects."""
    device = resolve_device(config.teacher.device)
    teacher = load_frozen_teacher(
        config.teacher.name_or_path, config.teacher.revision, device, torch.float32, config.teacher.attn_implementation
    )
    tle = load_tle(tle_dir, weights, device)
    batches, ids, rejects = aligned_batches(store, teacher, tle, batch_size)
    teacher.set_tail_template(tle.tail_template)  # align_shard set the evaluation store's
    return device, teacher, tle, batches, ids, rejects


def load_tle(tle_dir: str, weights: str | None, device: torch.device) -> TLEModel:
    """The TLE of a train-tle output folder (with a checkpoint's weights instead of the final ones)."""
    try:
        tle = TLEModel.from_pretrained(tle_dir, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise WhistleError(
            f"cannot load the TLE from {tle_dir!r}: {err}. Give a `whistle train-tle` output folder."
        ) from err
    if weights is not None:
        tle.load_state_dict(load_file(weights))
    tle.spelled_languages()  # warns here for each language its front end reads by spelling
    return tle.requires_grad_(False).eval().to(device)


def aligned_batches(
    url: str, teacher: FrozenTeacher, tle: TLEModel, batch_size: int
) -> tuple[list[TrainBatch], list[str], dict[str, str]]:
    """Every alignable utterance of the store, batched in store order -> (batches, their ids, rejects)."""
    reader = open_store(url, "--store", teacher.info)
    durations, rejects = {}, {}
    for shard in reader.shards():
        record = align_shard(reader, shard, teacher, batch_size)
        durations.update(record["durations"])
        rejects.update(record["rejects"])
    collate = Collate(
        teacher.tokenizer,
        teacher.specials,
        DurationTable(durations),
        list(tle.config.languages),
        teacher.max_positions,
        tle.front_end,
    )
    items = [
        {
            "id": u.id,
            "text": u.text,
            "language": u.language,
            "duration": u.duration,
            "states": torch.from_numpy(u.states),
            "n_frames": len(u.states),
            "speech_frames": u.speech_frames,
        }
        for shard in reader.shards()
        for u in reader.iter_shard(shard)
        if u.id in durations
    ]
    if not items:
        raise WhistleError(f"no utterance of {url} could be aligned ({len(rejects)} rejected)")
    batches = [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches, [item["id"] for item in items], rejects


@torch.no_grad()
def round_trips(tle: TLEModel, teacher: FrozenTeacher, batches: list[TrainBatch], device: torch.device) -> RoundTrips:
    """Greedy transcripts of the TLE's windows at the true and predicted lengths and of the real states."""
    trips = RoundTrips()
    for batch in batches:
        batch = batch.to(device)
        text, mask = batch.text, batch.text.tle_mask
        longest = 2 * int(mask.sum(1).max()) + 10
        speech, lengths = tle.speech_frames(
            text.tle_tokens, mask, batch.language_ids, durations=batch.durations, pronunciation=text.pronunciation
        )
        trips.tle += greedy_transcribe(
            teacher, tle.full_window(speech, lengths), text.languages, longest, speech.shape[1]
        )
        speech, lengths = tle.speech_frames(text.tle_tokens, mask, batch.language_ids, pronunciation=text.pronunciation)
        trips.predicted += greedy_transcribe(
            teacher, tle.full_window(speech, lengths), text.languages, longest, speech.shape[1]
        )
        real = tle.full_window(batch.states, batch.durations.sum(1))
        trips.real += greedy_transcribe(teacher, real, text.languages, longest, batch.states.shape[1])
        trips.real_ce += decoder_cross_entropy(teacher, real, text, batch.states.shape[1])[1].tolist()
        trips.label_tokens += (text.labels != IGNORE_INDEX).sum(1).tolist()
        trips.references += text.texts
    return trips


def stored_ids(url: str) -> list[str]:
    """The utterance ids of a store's complete shards (its small index arrays only)."""
    reader = StoreReader(url)
    return [utt_id for shard in reader.shards() for utt_id in reader.index(shard).ids]


def read_voices(manifest: str, ids: list[str], config: PipelineConfig) -> dict[str, str]:
    """{utterance id: voice, without its variant} for every one of `ids`, from the `whistle synthesize` manifest
    (read as a precompute source: any manifest format, the [data] columns, an "id" column by default)."""
    source = open_source(dataclasses.replace(config.data, path=manifest, kind="auto", max_clips=0))
    voices = source.column("voice")
    if voices is None:
        raise WhistleError(
            f"--voices {manifest} has no 'voice' column; pass the `whistle synthesize` manifest "
            "the store was precomputed from"
        )
    voice_of = {source.row_id(row): voice.split("+")[0] for row, voice in enumerate(voices) if voice}
    missing = [utt_id for utt_id in ids if utt_id not in voice_of]
    if missing:
        raise WhistleError(
            f"--voices {manifest}: {len(missing)} of the store's {len(ids)} clips have no row "
            f"with a voice (first: {missing[0]!r}); pass the synthesize manifest the store "
            "was precomputed from"
        )
    return voice_of


def per_voice(
    voice_of: dict[str, str],
    ids: list[str],
    references: list[str],
    hypotheses: list[str],
    ce: list[float],
    tokens: list[int],
) -> dict[str, dict[str, float]]:
    """{voice: {clips, wer, decoder_ce}} of the real audio, by `read_voices`' voice of each utterance."""
    groups: dict[str, list[int]] = {}
    for i, utt_id in enumerate(ids):
        groups.setdefault(voice_of[utt_id], []).append(i)
    return {
        voice: {
            "clips": len(members),
            "wer": corpus_wer(
                [references[i] for i in members], [hypotheses[i] for i in members], ["en"] * len(members)
            ),
            "decoder_ce": sum(ce[i] * tokens[i] for i in members) / sum(tokens[i] for i in members),
        }
        for voice, members in groups.items()
    }


@torch.no_grad()
def text_round_trip(tle: TLEModel, teacher: FrozenTeacher, texts: list[str], batch_size: int) -> list[str]:
    """Text only -> TLE full window at the predicted length -> frozen decoder, greedy (English)."""
    hypotheses = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = encode_texts(
            teacher.tokenizer, teacher.specials, chunk, ["en"] * len(chunk), teacher.max_positions, tle.front_end
        ).to(tle.device)
        speech, lengths = tle.speech_frames(
            batch.tle_tokens, batch.tle_mask, tle.language_ids(batch.languages), pronunciation=batch.pronunciation
        )
        longest = 2 * int(batch.tle_mask.sum(1).max()) + 10
        hypotheses += greedy_transcribe(
            teacher, tle.full_window(speech, lengths), batch.languages, longest, speech.shape[1]
        )
    return hypotheses


def plot_example(tle: TLEModel, batch: TrainBatch, path: str) -> None:
    """Real states and TLE states (true and predicted lengths) of the first utterance, 64 channels."""
    try:
        import matplotlib  # optional: whistle[plot]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'whistle[plot]')", path)
        return
    batch = batch.to(tle.device)
    text, mask = batch.text, batch.text.tle_mask
    first = None if text.pronunciation is None else text.pronunciation[:1]
    n = int(batch.durations[0].sum())
    with torch.no_grad():
        true_len, _ = tle.speech_frames(
            text.tle_tokens[:1], mask[:1], batch.language_ids[:1], durations=batch.durations[:1], pronunciation=first
        )
        predicted, lengths = tle.speech_frames(
            text.tle_tokens[:1], mask[:1], batch.language_ids[:1], pronunciation=first
        )
    panels = [
        ("teacher (real audio)", tle.normalise(batch.states[0, :n])),
        ("TLE, true durations", tle.normalise(true_len[0, :n])),
        (f"TLE, predicted length ({int(lengths[0])} frames)", tle.normalise(predicted[0, : int(lengths[0])])),
    ]
    figure, axes = plt.subplots(3, 1, figsize=(10, 8))
    for axis, (title, states) in zip(axes, panels):
        axis.imshow(
            states[:, :64].T.float().cpu().numpy(), aspect="auto", origin="lower", vmin=-3, vmax=3, cmap="RdBu_r"
        )
        axis.set_title(f"{title}: {text.texts[0]}", fontsize=9)
        axis.set_ylabel("channel")
        bounds = np.cumsum(batch.durations[0, : int(mask[0].sum())].cpu().numpy())
        for bound in bounds[:-1]:
            axis.axvline(bound - 0.5, color="k", lw=0.4)
    axes[-1].set_xlabel("encoder frame (20 ms); lines: token boundaries from the teacher alignment")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
