"""`whistle evaluate`: WER and CER of several Whisper models on several audio sets, side by side, with
the decoding aids users pick instead of training (a decoder prompt, shallow fusion with a domain LM)
and rare-word metrics.

Every set is any source precompute reads (manifest, Common Voice folder, `datasets` dataset; the
[data] kind and columns apply). Transcription and scoring are `whistle_pipeline.transcribe`'s: each
batch is decoded once for all columns, models with one encoder share its pass, generation is
transformers' own, scoring uses Whisper's normalisers and lists repetition loops.

Columns. Each model is decoded in every variant of evaluate.variants (`whistle_pipeline.decoding`):
MODEL (plain), MODEL+prompt, MODEL+fusion, MODEL+prompt+fusion. The first column is the baseline.
Fusion weights given as "auto" are chosen per fusion column on a dev split (evaluate.lm_dev, or
evaluate.lm_dev_fraction of the first set's clips, which are then scored in no column).

Outputs in evaluate.output_dir:

    results.json        every score (WER, CER, counts, loops, worst clips, decoding seconds per clip, term
                        metrics), the columns, the prompt, LM and fitted weights, the resolved config
    table.md            sets x columns: WER % (CER %) and the relative WER change from the first column;
                        term error rate, insertions, B-/U-WER (with a term list); decoding seconds per clip
    hypotheses.jsonl    per clip: reference, each column's transcript and word errors
    diffs.md            (write_diffs) per clip where a column's words differ from the first column's:
                        the words that changed, as [-removed-] {+added+}
    domain-lm.arpa      (evaluate.lm a text corpus) the LM built for fusion
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from whistle_pipeline import preflight
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.decoding import (
    Aids,
    build_columns,
    column_label,
    dev_split,
    grid_columns,
    pick_weights,
    prepare_aids,
    resolve_variants,
    term_list,
)
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.sources import Clip
from whistle_pipeline.teacher import resolve_device
from whistle_pipeline.terms import TermRates, term_rates
from whistle_pipeline.transcribe import (
    ClipScore,
    Column,
    LoadedModel,
    Named,
    check_geometry,
    corpus_wer,
    load_model,
    open_set,
    transcribe_set,
)

log = logging.getLogger(__name__)
OpenedSets = dict[str, tuple[list[Clip], list[dict[str, str]]]]  # set label -> (clips, rejects)


def unique_labels(specs: Sequence[str], what: str) -> list[Named]:
    named = [Named.parse(spec) for spec in specs]
    labels = [n.label for n in named]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise WhistleError(f"two {what} share the label {', '.join(duplicates)}: name them as LABEL=PATH")
    return named


def _count(items: Sequence[Any], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


@dataclass(kw_only=True)
class Score:
    """One column (a model decoded one way) on one set."""

    model: str  # the column's label
    audio_set: str
    clips: list[ClipScore]
    seconds: float  # generation + the column's share of the encoder passes
    decode_seconds: float = 0.0  # generation alone
    terms: TermRates | None = None  # with a term list

    @property
    def ref_words(self) -> int:
        return sum(c.ref_words for c in self.clips)

    @property
    def wer(self) -> float:
        return corpus_wer(self.clips)

    @property
    def cer(self) -> float:
        return sum(c.char_errors for c in self.clips) / max(1, sum(c.ref_chars for c in self.clips))

    @property
    def loops(self) -> list[str]:
        return [c.id for c in self.clips if c.loop]

    @property
    def decode_seconds_per_clip(self) -> float:
        return self.decode_seconds / max(1, len(self.clips))

    def worst(self, count: int) -> list[ClipScore]:
        """The clips with the most word errors (ties: higher WER first)."""
        ranked = sorted(self.clips, key=lambda c: (c.word_errors, c.wer), reverse=True)
        return [c for c in ranked[:count] if c.word_errors]

    def to_dict(self, outliers: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "set": self.audio_set,
            "clips": len(self.clips),
            "ref_words": self.ref_words,
            "wer": self.wer,
            "cer": self.cer,
            "word_errors": sum(c.word_errors for c in self.clips),
            "loops": self.loops,
            "seconds": round(self.seconds, 2),
            "decode_seconds": round(self.decode_seconds, 3),
            "decode_seconds_per_clip": round(self.decode_seconds_per_clip, 4),
            **({"terms": self.terms.to_dict()} if self.terms is not None else {}),
            "worst": [
                {
                    "id": c.id,
                    "word_errors": c.word_errors,
                    "ref_words": c.ref_words,
                    "reference": c.reference,
                    "hypothesis": c.hypothesis,
                }
                for c in self.worst(outliers)
            ],
        }


@dataclass(frozen=True, kw_only=True)
class ColumnInfo:
    """What a column is: which model, which variant, how it decoded."""

    label: str
    model: str
    variant: str
    num_beams: int
    prompt_tokens: int  # text tokens after <|startofprev|> (0: no prompt)
    lm_alpha: float | None = None  # fusion columns only
    lm_beta: float | None = None

    @classmethod
    def of(cls, column: Column, variant: str, weights: tuple[float, float] | None) -> ColumnInfo:
        prompt = column.decoding.prompt_ids
        return cls(
            label=column.label,
            model=column.model.named.label,
            variant=variant,
            num_beams=column.decoding.num_beams,
            prompt_tokens=max(0, len(prompt) - 1),
            lm_alpha=weights[0] if weights else None,
            lm_beta=weights[1] if weights else None,
        )

    @property
    def decoder(self) -> str:
        return "greedy" if self.num_beams == 1 else f"{self.num_beams} beams"


@dataclass(kw_only=True)
class EvaluateResult:
    output_dir: str
    models: list[Named]
    columns: list[ColumnInfo]
    sets: list[Named]
    scores: dict[tuple[str, str], Score]  # (column label, set label) -> Score
    rejects: dict[str, list[dict[str, str]]]  # set label -> [{id, reason}]
    aids: dict[str, Any]  # the prompt, the LM, the fitted fusion weights, the term list
    outliers: int
    seconds: float

    def score(self, column: str, audio_set: str) -> Score:
        return self.scores[(column, audio_set)]

    def _grid(self, title: str, first_header: str, first_cell: Any, cell: Any) -> list[str]:
        """A Markdown table: one row per set, one column per column; cells from `cell(score, set label)`."""
        lines = [
            title,
            "",
            f"| set | {first_header} | " + " | ".join(c.label for c in self.columns) + " |",
            "|" + "---|" * (len(self.columns) + 2),
        ]
        for audio_set in self.sets:
            cells = [cell(self.score(c.label, audio_set.label), audio_set.label) for c in self.columns]
            lines.append(f"| {audio_set.label} | {first_cell(audio_set.label)} | " + " | ".join(cells) + " |")
        return lines

    def table(self) -> str:
        """Markdown: WER % (CER %) and the relative WER change from the first column; term metrics (with a
        term list); decoding seconds per clip."""
        first = self.columns[0].label

        def wer_cell(score: Score, audio_set: str) -> str:
            base = self.score(first, audio_set).wer
            text = f"{100 * score.wer:.1f} ({100 * score.cer:.1f})"
            if score.model != first and base > 0:
                text += f" {100 * (score.wer - base) / base:+.0f}%"
            if score.loops:
                text += f" [{len(score.loops)} loop{'s' if len(score.loops) > 1 else ''}]"
            return text

        lines = self._grid(
            "WER % (CER %); relative WER change from the first column:",
            "clips",
            lambda s: len(self.score(first, s).clips),
            wer_cell,
        )
        if "terms" in self.aids:
            lines += [""] + self._grid(
                f"Term error rate % (term insertions) B-WER % / U-WER % ({_count(self.aids['terms']['terms'], 'term')}):",
                "term occurrences",
                lambda s: self.score(first, s).terms.reference_terms,
                lambda score, _: (
                    f"{_percent(score.terms.term_error_rate)} ({score.terms.inserted}) "
                    f"{_percent(score.terms.biased_wer)} / {_percent(score.terms.unbiased_wer)}"
                ),
            )
        decoders = ", ".join(f"{c.label}: {c.decoder}" for c in self.columns)
        lines += [""] + self._grid(
            f"Decoding seconds per clip (generation only; {decoders}):",
            "clips",
            lambda s: len(self.score(first, s).clips),
            lambda score, _: f"{score.decode_seconds_per_clip:.3f}",
        )
        return "\n".join(lines)

    def summary(self) -> str:
        text = [self.table()]
        if "prompt" in self.aids:
            tokens = {c.model: c.prompt_tokens for c in self.columns if c.prompt_tokens}
            text.append(
                f"prompt: {self.aids['prompt']['origin']}; its tokens per model: "
                + ", ".join(f"{model} {count}" for model, count in tokens.items())
            )
        if "lm" in self.aids:
            text.append(f"LM: {self.aids['lm']['path']}, {self.aids['lm']['made']}, {self.aids['lm']['words']} words")
        for label, fit in self.aids.get("fusion_fit", {}).get("columns", {}).items():
            text.append(
                f"{label}: alpha {fit['alpha']:g}, beta {fit['beta']:g} (dev WER {100 * fit['dev_wer']:.1f} % "
                f"on {self.aids['fusion_fit']['dev']['clips']} clips)"
            )
        for audio_set, rejects in self.rejects.items():
            if rejects:
                text.append(
                    f"{audio_set}: {len(rejects)} clip(s) skipped (first: {rejects[0]['id']}: {rejects[0]['reason']})"
                )
        text.append(
            f"wrote {self.output_dir}/results.json, table.md, hypotheses.jsonl"
            + (", diffs.md" if (Path(self.output_dir) / "diffs.md").exists() else "")
            + f" ({self.seconds:.0f} s)"
        )
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": {m.label: m.path for m in self.models},
            "columns": [dataclasses.asdict(c) for c in self.columns],
            "sets": {s.label: s.path for s in self.sets},
            **self.aids,
            "scores": [score.to_dict(self.outliers) for score in self.scores.values()],
            "rejects": self.rejects,
            "seconds": round(self.seconds, 1),
        }


# ---- the stage ------------------------------------------------------------------------------------


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


def run(config: PipelineConfig) -> EvaluateResult:
    """Score every column on every set; write results.json, table.md, hypotheses.jsonl and diffs.md."""
    preflight.evaluate(config)
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
    models = [
        load_model(n, config.teacher.revision, device, config.teacher.dtype, config.teacher.attn_implementation)
        for n in named_models
    ]
    check_geometry(models)
    variants = resolve_variants(settings)
    aids, record = prepare_aids(config, variants, models[0].tokenizer, output_dir)
    terms = term_list(config, models[0].tokenizer)
    if terms is not None:
        record["terms"] = {"origin": terms[0], "terms": terms[1]}
    opened = {audio_set.label: open_usable(audio_set, config) for audio_set in named_sets}
    weights = fusion_weights(models, variants, aids, config, named_sets, opened, record)
    columns = build_columns(models, variants, aids, settings, weights)
    unique_labels([f"{c.label}={c.model.named.path}" for c in columns], "columns")
    log.info(
        "evaluating %d column(s) (%d model(s), variants %s; %d encoder pass(es) per batch) on %d set(s), %s",
        len(columns),
        len(models),
        ", ".join(variants),
        len({m.encoder_key for m in models}),
        len(named_sets),
        device,
    )

    variant_of = {column_label(m.named.label, v): v for m in models for v in variants}
    result = EvaluateResult(
        output_dir=str(output_dir),
        models=named_models,
        sets=named_sets,
        scores={},
        rejects={},
        columns=[ColumnInfo.of(c, variant_of[c.label], weights.get(c.label)) for c in columns],
        aids=record,
        outliers=settings.outliers,
        seconds=0.0,
    )
    for audio_set in named_sets:
        clips, rejects = opened[audio_set.label]
        with tqdm(total=len(clips), desc=f"evaluate {audio_set.label}", unit="clip", disable=None) as progress:
            decoded = transcribe_set(columns, clips, settings.batch_size, settings.max_new_tokens, progress)
        result.rejects[audio_set.label] = rejects + decoded.rejects
        for column in columns:
            result.scores[(column.label, audio_set.label)] = Score(
                model=column.label,
                audio_set=audio_set.label,
                clips=decoded.scores[column.label],
                seconds=decoded.seconds[column.label],
                decode_seconds=decoded.decode_seconds[column.label],
                terms=clip_term_rates(decoded.scores[column.label], terms[1]) if terms is not None else None,
            )
    result.seconds = time.perf_counter() - started
    write_outputs(result, settings.write_diffs)
    return result


def open_usable(audio_set: Named, config: PipelineConfig) -> tuple[list[Clip], list[dict[str, str]]]:
    """`open_set`, refusing a set without a usable clip."""
    clips, rejects = open_set(audio_set, config)
    if not clips:
        raise WhistleError(
            f"audio set {audio_set.label} ({audio_set.path}) has no usable clip"
            + (f" (first reject: {rejects[0]['id']}: {rejects[0]['reason']})" if rejects else "")
        )
    return clips, rejects


def clip_term_rates(clips: Sequence[ClipScore], terms: Sequence[str]) -> TermRates:
    """`terms.term_rates` of scored clips, each language normalised its own way, counts summed."""
    by_language: dict[str, list[ClipScore]] = {}
    for clip in clips:
        by_language.setdefault(clip.language, []).append(clip)
    parts = [
        term_rates([c.reference for c in group], [c.hypothesis for c in group], terms, language)
        for language, group in by_language.items()
    ]
    return TermRates(*(sum(getattr(part, field.name) for part in parts) for field in dataclasses.fields(TermRates)))


def dev_clips(config: PipelineConfig, sets: Sequence[Named], opened: OpenedSets) -> tuple[list[Clip], dict[str, Any]]:
    """The clips fusion weights are chosen on, and a record of them: evaluate.lm_dev's, or the
    lm_dev_fraction of the first set's clips, which are then removed from `opened` (scored nowhere)."""
    settings = config.evaluate
    if settings.lm_dev:
        named = Named.parse(settings.lm_dev)
        if named.path in {s.path for s in sets}:
            raise WhistleError(
                f"evaluate.lm_dev = {settings.lm_dev} is also a test set: fusion weights must not be "
                "chosen on the clips they are scored on"
            )
        clips, _ = open_usable(named, config)
        return clips, {"set": named.label, "path": named.path, "clips": len(clips)}
    first = sets[0].label
    clips, rejects = opened[first]
    kept, dev = dev_split(clips, settings.lm_dev_fraction)
    if not dev or not kept:
        raise WhistleError(
            f"holding out {settings.lm_dev_fraction:g} of {first}'s {len(clips)} clips for the fusion "
            f"dev split leaves {len(dev)} dev and {len(kept)} test clips: give evaluate.lm_dev "
            "(an audio set) or change evaluate.lm_dev_fraction"
        )
    opened[first] = (kept, rejects)
    log.info("fusion dev split: %d of %s's clips (scored in no column)", len(dev), first)
    return dev, {
        "set": first,
        "held_out_fraction": settings.lm_dev_fraction,
        "clips": len(dev),
        "ids": [clip.id for clip in dev],
    }


def fusion_weights(
    models: Sequence[LoadedModel],
    variants: Sequence[str],
    aids: Aids,
    config: PipelineConfig,
    sets: Sequence[Named],
    opened: OpenedSets,
    record: dict[str, Any],
) -> dict[str, tuple[float, float]]:
    """(alpha, beta) per fusion column: the configured numbers, or the best of the grid on the dev split
    (recorded in `record["fusion_fit"]`)."""
    settings = config.evaluate
    labels = [column_label(m.named.label, v) for m in models for v in variants if "fusion" in v]
    if not labels or not settings.fits_fusion:
        return {label: (settings.lm_alpha, settings.lm_beta) for label in labels}
    dev, dev_record = dev_clips(config, sets, opened)
    grids = grid_columns(models, variants, aids, settings)
    with tqdm(total=len(dev), desc="fusion weights (dev)", unit="clip", disable=None) as progress:
        decoded = transcribe_set(
            [c for grid in grids.values() for c in grid.values()],
            dev,
            settings.batch_size,
            settings.max_new_tokens,
            progress,
        )
    fits = pick_weights(grids, lambda label: corpus_wer(decoded.scores[label]))
    record["fusion_fit"] = {
        "dev": dev_record,
        "columns": {
            label: {
                "alpha": fit.alpha,
                "beta": fit.beta,
                "dev_wer": fit.wer,
                "grid": [{"alpha": a, "beta": b, "dev_wer": w} for a, b, w in fit.grid],
            }
            for label, fit in fits.items()
        },
    }
    return {label: (fit.alpha, fit.beta) for label, fit in fits.items()}


def write_outputs(result: EvaluateResult, write_diffs: bool) -> None:
    out = Path(result.output_dir)
    (out / "results.json").write_text(
        json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "table.md").write_text(result.table() + "\n", encoding="utf-8")
    labels = [c.label for c in result.columns]
    with open(out / "hypotheses.jsonl", "w", encoding="utf-8") as handle:
        for audio_set in result.sets:
            per_model = [result.score(label, audio_set.label).clips for label in labels]
            for clips in zip(*per_model):
                handle.write(
                    json.dumps(
                        {
                            "set": audio_set.label,
                            "id": clips[0].id,
                            "language": clips[0].language,
                            "reference": clips[0].reference,
                            "ref_words": clips[0].ref_words,
                            "hypotheses": {label: c.hypothesis for label, c in zip(labels, clips)},
                            "word_errors": {label: c.word_errors for label, c in zip(labels, clips)},
                            "loops": [label for label, c in zip(labels, clips) if c.loop],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    diffs = out / "diffs.md"
    if write_diffs and len(labels) > 1:
        diffs.write_text(diff_report(result), encoding="utf-8")
    elif diffs.exists():
        diffs.unlink()  # a stale file from an earlier run would contradict results.json


def diff_report(result: EvaluateResult) -> str:
    """Per set, every clip where some column's words differ from the first column's."""
    labels = [c.label for c in result.columns]
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
                text = (
                    word_diff(clips[0].hypothesis, clip.hypothesis)
                    if clip.hypothesis != clips[0].hypothesis
                    else "(same)"
                )
                lines.append(f"{label.ljust(width)} : {text}" + ("   <- LOOP" if clip.loop else ""))
            lines += ["```", ""]
    return "\n".join(lines)
