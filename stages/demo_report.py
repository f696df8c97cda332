"""The demo's report: every method on one budget, from the scores of its two evaluate calls.

    methods        unadapted, prompt, fusion (decoding-time aids on the unadapted model); the training arms
                   (text-null, source-only, whistle, tts-only, whistle-tts), each over its seeds; whistle+prompt
                   and whistle+fusion (the aids on the whistle arm's first models: [demo] aided_seeds)
    per method     per test set: WER (mean over seeds, min, max, each seed's), CER, term error rate, decoding
                   seconds per clip, WER relative to the unadapted model, WER points below the control; and
                   the fine-tuning minutes
    goals          the issue's goals, each true/false (`goals`) with the numbers it was decided on (`goal_numbers`)

A method's seed spread is the range (max - min) of its seeds' target WERs; a decoding-time method on the
unadapted model is deterministic (spread 0). `markdown` writes report.md's table from report.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean
from typing import Any

from whistle_pipeline.decoding import column_label

BASELINE = "tiny.en"  # the unadapted model's label in evaluate's columns
CONTROL = "source-only"
AIDED = "whistle"  # the arm whose models are decoded with the aids too
TARGET_CUT, SOURCE_RISE = 0.30, 0.05  # relative WER: >= 30 % lower on target, <= 5 % higher on source
TTS_MARGIN = 0.123  # the paper's relative cut of WhisTLE+TTS below TTS-only
TERM_SHARE = 0.5  # whistle's term error rate at most this share of the unadapted model's


def run_label(arm: str, seed: int) -> str:
    """The label (and adapted/ folder) of an arm's run with `seed`: the arm's name for seed 0."""
    return arm if seed == 0 else f"{arm}.s{seed}"


def method_columns(arms: Sequence[str], seeds: int, aided_seeds: int) -> dict[str, tuple[str, list[str]]]:
    """method -> (its decoding variant, the evaluate column labels it averages), in the report's order: the
    arms over `seeds` runs, whistle with the aids over its first `aided_seeds`."""

    def runs(arm: str, variant: str, count: int = seeds) -> list[str]:
        return [column_label(run_label(arm, seed), variant) for seed in range(count)]

    methods = {
        name: (variant, [column_label(BASELINE, variant)])
        for name, variant in (("unadapted", "plain"), ("prompt", "prompt"), ("fusion", "fusion"))
    }
    methods.update({arm: ("plain", runs(arm, "plain")) for arm in arms})
    methods.update(
        {f"{AIDED}+{variant}": (variant, runs(AIDED, variant, aided_seeds)) for variant in ("prompt", "fusion")}
    )
    return methods


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return mean(known) if len(known) == len(values) and known else None


def method_figures(
    scores: dict[str, Any], columns: dict[str, tuple[str, list[str]]], training_minutes: dict[str, float]
) -> dict[str, Any]:
    """Per method and test set: WER (mean, min, max, per seed), CER, term error rate, decoding seconds per
    clip, relative WER and points below the control; and its training minutes (`training_minutes` by run
    label; 0 for a method that trains nothing)."""
    figures: dict[str, Any] = {}
    for method, (variant, labels) in columns.items():
        sets = {}
        for name in scores[labels[0]]:
            cells = [scores[label][name] for label in labels]
            wers = [cell["wer"] for cell in cells]
            sets[name] = {
                "wer": mean(wers),
                "wer_min": min(wers),
                "wer_max": max(wers),
                "wer_seeds": wers,
                "cer": mean(cell["cer"] for cell in cells),
                "term_error_rate": _mean([cell["term_error_rate"] for cell in cells]),
                "decode_seconds_per_clip": mean(cell["decode_seconds_per_clip"] for cell in cells),
            }
        runs = [label.split("+")[0] for label in labels]
        figures[method] = {
            "decoding": variant,
            "columns": labels,
            "seeds": len(labels),
            "training_minutes": mean(training_minutes.get(run, 0.0) for run in runs),
            **sets,
        }
    for method in figures.values():
        for name in scores[BASELINE]:
            cell, before = method[name], figures["unadapted"][name]["wer"]
            cell["relative_wer"] = (cell["wer"] - before) / before if before else 0.0
            cell["beyond_control"] = figures[CONTROL][name]["wer"] - cell["wer"]
    return figures


def spread(*methods: dict[str, Any]) -> float:
    """The larger seed spread (max - min target WER) of the methods compared."""
    return max(m["target"]["wer_max"] - m["target"]["wer_min"] for m in methods)


def goals(methods: dict[str, Any], arms: Sequence[str]) -> tuple[dict[str, bool], dict[str, Any]]:
    """The issue's goals on the methods' figures: ({goal: met}, {goal: the numbers})."""
    met: dict[str, bool] = {}
    numbers: dict[str, Any] = {}
    target = {name: m["target"]["wer"] for name, m in methods.items()}
    source = {name: m["source"]["relative_wer"] for name, m in methods.items()}
    met["whistle cuts target WER >= 30%"] = methods[AIDED]["target"]["relative_wer"] <= -TARGET_CUT
    numbers["whistle cuts target WER >= 30%"] = {"relative_wer": methods[AIDED]["target"]["relative_wer"]}
    met["whistle-tts beats tts-only on target"] = target["whistle-tts"] < target["tts-only"]
    numbers["whistle-tts beats tts-only on target"] = {
        "whistle-tts": target["whistle-tts"],
        "tts-only": target["tts-only"],
    }
    for arm in arms:
        if arm != CONTROL:
            met[f"{arm} raises source WER <= 5%"] = source[arm] <= SOURCE_RISE
            numbers[f"{arm} raises source WER <= 5%"] = {"relative_wer": source[arm]}
    for other in ("prompt", "fusion", "text-null"):
        name = f"whistle below {other} on target by more than the seed spread"
        margin, limit = target[other] - target[AIDED], spread(methods[AIDED], methods[other])
        met[name] = margin > limit
        numbers[name] = {AIDED: target[AIDED], other: target[other], "margin": margin, "spread": limit}
    best = min(("prompt", "fusion"), key=target.__getitem__)
    combined = f"{AIDED}+{best}"
    # whistle alone over the same runs the combination decoded (its first seeds)
    alone = mean(methods[AIDED]["target"]["wer_seeds"][: methods[combined]["seeds"]])
    name = "whistle + the best decoding-time method below either alone"
    met[name] = target[combined] < min(alone, target[best])
    numbers[name] = {"best": best, combined: target[combined], AIDED: alone, best: target[best]}
    name = f"whistle-tts >= {100 * TTS_MARGIN:g}% relative below tts-only"
    cut = (target["tts-only"] - target["whistle-tts"]) / target["tts-only"] if target["tts-only"] else 0.0
    met[name] = cut >= TTS_MARGIN
    numbers[name] = {"relative_cut": cut, "whistle-tts": target["whistle-tts"], "tts-only": target["tts-only"]}
    name = "no arm raises source WER by more than 5%"
    rises = {arm: source[arm] for arm in arms}
    met[name] = max(rises.values()) <= SOURCE_RISE
    numbers[name] = {"relative_wer": rises}
    name = "whistle term error rate <= half the unadapted model's"
    ours, before = methods[AIDED]["target"]["term_error_rate"], methods["unadapted"]["target"]["term_error_rate"]
    met[name] = ours is not None and before is not None and ours <= TERM_SHARE * before
    numbers[name] = {AIDED: ours, "unadapted": before}
    return met, numbers


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _wer_cell(cell: dict[str, Any]) -> str:
    text = _percent(cell["wer"])
    if len(cell["wer_seeds"]) > 1:
        text += f" ({_percent(cell['wer_min'])}–{_percent(cell['wer_max'])})"
    return text


def markdown(report: dict[str, Any]) -> str:
    """report.md: one row per method (target and source figures), then the goals with their numbers."""
    lines = [
        f"# whistle demo{' (quick)' if report['quick'] else ''}: every method on one budget",
        "",
        f"Whisper tiny.en; training arms: {report['seeds']} seed(s) each, WER mean (min–max over seeds); "
        f"{report['steps']['finetune']} fine-tuning steps of {report['steps']['finetune_batch_size']} examples. "
        "Relative: the WER change from the unadapted model; beyond control: target WER points below the "
        f"{CONTROL} control. Training minutes are the fine-tuning's; the TLE took "
        f"{report['seconds'].get('train-tle', 0.0) / 60:.1f} min (shared by the text arms through it), the "
        f"target TTS speech's precompute {report['seconds'].get('precompute-target-tts', 0.0) / 60:.1f} min "
        "(shared by the TTS arms).",
        "",
        "| method | target WER % | target CER % | target term error % | source WER % | source CER % | "
        "relative target WER | relative source WER | beyond control (points) | decoding s/clip (target) | "
        "training min |",
        "|---|" + "---:|" * 10,
    ]
    for name, method in report["methods"].items():
        target, source = method["target"], method["source"]
        lines.append(
            f"| {name} | {_wer_cell(target)} | {_percent(target['cer'])} | "
            f"{_percent(target['term_error_rate'])} | {_wer_cell(source)} | {_percent(source['cer'])} | "
            f"{100 * target['relative_wer']:+.0f}% | {100 * source['relative_wer']:+.0f}% | "
            f"{100 * target['beyond_control']:+.1f} | {target['decode_seconds_per_clip']:.3f} | "
            f"{method['training_minutes']:.1f} |"
        )
    lines += ["", "## Goals", ""]
    for name, ok in report["goals"].items():
        figures = ", ".join(f"{key} {_figure(value)}" for key, value in report["goal_numbers"][name].items())
        lines.append(f"- {'met' if ok else 'NOT met'}: {name} ({figures})")
    return "\n".join(lines) + "\n"


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_figure(v)}" for k, v in value.items()) + "}"
    return str(value)
