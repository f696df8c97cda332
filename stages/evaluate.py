"""`whistle evaluate`: WER and CER of several Whisper models on several audio sets, side by side.

Every set is any source precompute reads (manifest, Common Voice folder, `datasets` dataset; the
[data] kind and columns apply). Transcription and scoring are `whistle_pipeline.transcribe`'s: each
batch is decoded once for all models, models with one encoder share its pass, generation is
transformers' own, scoring uses Whisper's normalisers and lists repetition loops.

Outputs in evaluate.output_dir:

    results.json        every score (WER, CER, counts, loops, worst clips) + the resolved config
    table.md            sets x models: WER % (CER %), and the relative WER change from the first model
    hypotheses.jsonl    per clip: reference, each model's transcript and word errors
    diffs.md            (write_diffs) per clip where a model's words differ from the first model's:
                        the words that changed, as [-removed-] {+added+}
"""
from __future__ import annotations

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
from whistle_pipeline.errors import WhistleError

# The names marked "finetune" are imported only for stages/finetune.py, which imports them from here until
# it imports them from whistle_pipeline.transcribe (temporary).
from whistle_pipeline.transcribe import (
    ClipScore,
    LoadedModel,  # noqa: F401  finetune
    Named,
    check_geometry,
    decoded_batches,  # noqa: F401  finetune
    encode,  # noqa: F401  finetune
    generate,  # noqa: F401  finetune
    load_model,
    open_set,
    resolve_device,
    score_clip,  # noqa: F401  finetune
    transcribe_set,
)

log = logging.getLogger(__name__)


def unique_labels(specs: Sequence[str], what: str) -> list[Named]:
    named = [Named.parse(spec) for spec in specs]
    labels = [n.label for n in named]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise WhistleError(f"two {what} share the label {', '.join(duplicates)}: name them as LABEL=PATH")
    return named


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
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
    """Score every model on every set; write results.json, table.md, hypotheses.jsonl and diffs.md."""
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
    models = [load_model(n, config.teacher.revision, device, config.teacher.dtype, config.teacher.attn_implementation)
              for n in named_models]
    check_geometry(models)
    log.info("evaluating %d model(s) (%d encoder pass(es) per batch) on %d set(s), %s",
             len(models), len({m.encoder_key for m in models}), len(named_sets), device)

    result = EvaluateResult(output_dir=str(output_dir), models=named_models, sets=named_sets, scores={}, rejects={},
                            outliers=settings.outliers, seconds=0.0)
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
            result.scores[(model.label, audio_set.label)] = Score(
                model=model.label, audio_set=audio_set.label, clips=scores[model.label], seconds=seconds[model.label])
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
