"""evaluate's records and outputs: a column's Score on a set, what a column is (ColumnInfo), the run's
EvaluateResult with its tables, and the files written from it (results.json, table.md, hypotheses.jsonl,
diffs.md)."""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whistle_pipeline.terms import TermRates
from whistle_pipeline.transcribe import ClipScore, Column, Named, corpus_wer


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


# ---- the outputs ------------------------------------------------------------------------------------


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
