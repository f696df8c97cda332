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
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from stages.evaluate_result import ColumnInfo, EvaluateResult, Score, write_outputs
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


# ---- the stage ------------------------------------------------------------------------------------


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
