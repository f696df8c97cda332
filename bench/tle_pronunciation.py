"""A new TLE recipe against today's, in the same run, on a finished demo: how close its states come to real
speech of unseen target sentences, and what its whistle arm teaches the decoder, on eSpeak speech and on
speech from a second synthesizer (Debian's flite) whose voices and pronunciations whistle never trained on.

It reads a finished `whistle demo --workdir DEMO` (never writes there) and re-uses what the demo trained:
today's TLE (DEMO/tle), the source-only control, the text-null arm (content-free text windows) and today's
whistle arm, all seeds. Into OUT it adds, each step skipped when a rerun finds it done (OUT/steps.json):

  flite         the target test sentences spoken by flite, voices in turn   audio/flite-target-test/
  precompute    the teacher's states of the target test speech, eSpeak      stores/target-test-espeak,
                (the demo's audio) and flite, with the demo's settings      stores/target-test-flite
  validate-tle  today's TLE on both test stores: normalised cosine to the   validate/today-<synthesizer>.json
                teacher's states (at the true durations, and at the TLE's
                own stretched to the true length), length error, the frozen
                decoder's round-trip WER at true and predicted lengths
  espeak-other  the scale of the cosine: the target test sentences spoken   audio/espeak-other-target-test/,
  voices        by eSpeak again with other voice draws, and the cosine of   stores/target-test-espeak-other
                real speech to real speech of the same sentence re-timed
                token by token (other eSpeak voices -> the test speech,
                eSpeak -> flite)
  train-tle     the new TLE: the demo's [tle] and [train_tle] (DEMO/tle's   tle-new/
                saved config) plus the --arm-set overrides
  validate-tle  the new TLE, the same way                                   validate/new-<synthesizer>.json
  finetune      the whistle arm on the new TLE, every demo seed: the demo's adapted/whistle-new[.s<seed>]
                saved whistle config with only tle_path and output_dir changed
                (and the --arm-set overrides; finetune takes the TLE's own
                settings from the TLE, so tle.* keys change nothing there)
  evaluate      greedy WER of the unadapted model, the control, text-null,  evaluate-reused/,
                today's whistle arm (the demo's models: --reuse takes them) evaluate-new/
                and the new whistle arm, on eSpeak and flite target test
                speech and on the source test speech

and writes results.json and table.md: per set each arm's WER (mean and range over the seeds), the points it
is below the control and below text-null, its change relative to the unadapted model; and the
validate-tle figures of both TLEs on both synthesizers. Without flite (`apt-get install flite`) the flite
set is skipped, and said so.

    python bench/tle_pronunciation.py --demo demo-run --out bench-pron    # tle.pronunciation=espeak
    python bench/tle_pronunciation.py --demo demo-run --out bench-pron-32 --arm-set tle.spelling_channels=32
    python bench/tle_pronunciation.py --demo demo-run --out bench-check --arm-set none  # today's recipe again
    python bench/tle_pronunciation.py --demo demo-run --out bench-paired --reuse bench-pron \
        --arm-set store.path=paired-store    # only the new recipe runs: the rest is bench-pron's
    python bench/tle_pronunciation.py --quick --demo /tmp/demo-smoke --out /tmp/pron-smoke  # a smoke run
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import soundfile
import soxr
from _common import describe_machine, emit, table

from stages import evaluate, finetune, precompute, train_tle, validate_tle
from stages.demo_plan import STATE
from stages.demo_report import BASELINE, CONTROL, method_figures, run_label
from whistle_pipeline import tts
from whistle_pipeline.config import ConfigError, PipelineConfig, load_config
from whistle_pipeline.tts import MANIFEST, MAX_WINDOW_S

log = logging.getLogger("bench.tle_pronunciation")

DEFAULT_ARM_SET = ("tle.pronunciation=espeak",)
# flite's general-purpose voices; awb_time is left out: a limited-domain voice that only speaks times of day
FLITE_VOICES = ("slt", "rms", "awb", "kal16", "kal")  # kal speaks at 8 kHz: resampled like the others
TODAY, NEW = "today", "new"  # the two TLEs
NEW_ARM = "whistle-new"  # the whistle arm fine-tuned on the new TLE
REUSED_ARMS = (CONTROL, "text-null", "whistle")  # the demo's runs, every seed
SYNTHESIZERS = ("espeak", "flite")
NO_FLITE = "the second synthesizer's test set is skipped, no figure on flite speech"
QUICK_CLIPS = 6  # --quick: the first sentences of each test set
OTHER_VOICES_SEED = 7  # the target test sentences spoken again by eSpeak, with other voice draws than the demo's


class Ledger:
    """OUT/steps.json: the run's identity and the steps that finished (seconds and result), written after each;
    a rerun skips those, and refuses an OUT made with other settings."""

    def __init__(self, out: Path, identity: dict[str, Any]):
        self.path = out / "steps.json"
        self.state: dict[str, Any] = {**identity, "steps": {}}
        if self.path.exists():
            previous = json.loads(self.path.read_text())
            if {key: previous.get(key) for key in identity} != identity:
                raise click.ClickException(
                    f"{out} holds a run with other settings ({ {k: previous.get(k) for k in identity} }): "
                    "give another --out, or delete it to start over"
                )
            self.state = previous

    def run(self, name: str, what: str, action: Callable[[], Any]) -> Any:
        """`action()`'s recorded result: run now, or by an earlier run."""
        if name in self.state["steps"]:
            log.info("%s: %s — done by an earlier run, skipped", name, what)
            return self.state["steps"][name]["result"]
        log.info("%s: %s", name, what)
        started = time.perf_counter()
        result = action()
        self.state["steps"][name] = {"seconds": round(time.perf_counter() - started, 1), "result": result}
        self.path.write_text(json.dumps(self.state, indent=2) + "\n")
        log.info("%s: done in %.0f s", name, self.state["steps"][name]["seconds"])
        return result

    def adopt(self, other: Path, names: Sequence[str]) -> None:
        """Take the steps `names` as another OUT's ledger recorded them (--reuse): that OUT must be a run on
        the same demo, seeds and flite with those steps finished."""
        path = other / "steps.json"
        if not path.is_file():
            raise click.ClickException(f"--reuse {other}: no {path.name} there (not an OUT of this script)")
        previous = json.loads(path.read_text())
        for key in ("demo", "quick", "flite"):
            if previous.get(key) != self.state[key]:
                raise click.ClickException(
                    f"--reuse {other}: it measured {key} = {previous.get(key)!r}, this run {self.state[key]!r}"
                )
        unfinished = [name for name in names if name not in previous["steps"]]
        if unfinished:
            raise click.ClickException(
                f"--reuse {other}: it has not finished {', '.join(unfinished)}: rerun it to the end first"
            )
        for name in names:
            self.state["steps"].setdefault(name, {**previous["steps"][name], "reused_from": str(other)})
        self.path.write_text(json.dumps(self.state, indent=2) + "\n")

    def seconds(self) -> dict[str, float]:
        return {name: step["seconds"] for name, step in self.state["steps"].items()}


# --- the demo that is measured ----------------------------------------------------------------------


class Demo:
    """A finished demo workdir (read only): its plan, paths and the saved configuration of each stage run."""

    def __init__(self, workdir: Path):
        self.work = workdir
        state_path = workdir / STATE
        if not state_path.is_file():
            raise click.ClickException(f"{workdir} is not a demo workdir (no {STATE}): run `whistle demo` first")
        state = json.loads(state_path.read_text())
        self.quick, self.seeds = state["quick"], state["plan"]["seeds"]
        needed = ["synthesize-target-test", "synthesize-source-test", "precompute-source", "train-tle"]
        needed += [f"finetune-{run_label(arm, seed)}" for arm in REUSED_ARMS for seed in range(self.seeds)]
        missing = [step for step in needed if step not in state["steps"]]
        if missing:
            raise click.ClickException(
                f"the demo in {workdir} has not finished {', '.join(missing)}: run `whistle demo --workdir "
                f"{workdir}{' --quick' if self.quick else ''}` to finish it first"
            )
        self.record = json.loads((workdir / "stores" / "source" / "precompute.json").read_text())
        self.teacher, self.tle = Path(self.record["config"]["teacher"]["name_or_path"]), workdir / "tle"

    def audio(self, name: str) -> Path:
        return self.work / "audio" / name / MANIFEST

    def adapted(self, label: str) -> Path:
        return self.work / "adapted" / label

    def config(self, saved: Path, overrides: Sequence[str] = (), **sections: dict[str, Any]) -> PipelineConfig:
        """The configuration a stage ran with (its saved config.toml: the demo's own --set overrides are in it),
        with `sections` changed and `overrides` on top."""
        return load_config(saved, overrides=overrides, updates=sections)

    def precompute_config(self, manifest: Path, store: Path, max_clips: int) -> PipelineConfig:
        """The demo's precompute of its source store, on another manifest into another store."""
        saved = self.record["config"]
        return load_config(
            updates={
                "teacher": saved["teacher"],
                "data": {**saved["data"], "path": str(manifest), "max_clips": max_clips},
                "store": {**saved["store"], "path": str(store)},
                "precompute": {**saved["precompute"], "progress": False, "overwrite": False},
            },
        )


# --- the second synthesizer ---------------------------------------------------------------------------


def flite_voices(flite: str) -> list[str]:
    """The voices `flite -lv` lists."""
    listed = subprocess.run([flite, "-lv"], capture_output=True, text=True, check=True).stdout
    return listed.split(":", 1)[1].split()


def find_flite(name: str) -> str | None:
    """The path of the flite program `name`, checked to have FLITE_VOICES; None when it is not installed."""
    path = shutil.which(name)
    if path is not None:
        unknown = sorted(set(FLITE_VOICES) - set(flite_voices(path)))
        if unknown:
            raise click.ClickException(f"{path} lacks the voice(s) {', '.join(unknown)}")
    return path


def flite_version(flite: str) -> str:
    shown = subprocess.run([flite, "--version"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in shown.splitlines() if "version:" in line), "unknown")


def flite_clip(flite: str, voice: str, text: str, folder: Path, sample_rate: int) -> np.ndarray:
    """`text` spoken by flite's `voice`: float32 samples at `sample_rate`; raises RuntimeError with why not."""
    text_path, wav_path = folder / "sentence.txt", folder / "sentence.wav"
    text_path.write_text(text + "\n", encoding="utf-8")
    done = subprocess.run(
        [flite, "-voice", voice, "-f", str(text_path), "-o", str(wav_path)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0 or not wav_path.is_file():
        raise RuntimeError(f"flite exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    audio, rate = soundfile.read(wav_path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)  # (n,) mono
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ")
    seconds = len(audio) / sample_rate
    if not 0 < seconds <= MAX_WINDOW_S:
        raise RuntimeError(f"{seconds:.1f} s of audio: outside (0, {MAX_WINDOW_S:.0f}] s, Whisper's window")
    return audio.astype(np.float32)


def speak_with_flite(flite: str, voices: Sequence[str], sentences: Path, out: Path, limit: int, sample_rate: int):
    """Every sentence of `sentences` (the first `limit`; 0 = all) spoken by `voices` in turn into out/audio/ and
    out/manifest.jsonl, in the demo's manifest format (ids as the demo's synthesis gives them: the set's name
    and the line). Failures are recorded in out/flite.json and left out of the manifest."""
    lines = [line.strip() for line in sentences.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = lines[:limit] if limit else lines
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows, failures, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flite-") as scratch:
        for number, text in enumerate(lines, start=1):
            utt_id, voice = f"{sentences.stem}-{number:05d}", voices[(number - 1) % len(voices)]
            try:
                audio = flite_clip(flite, voice, text, Path(scratch), sample_rate)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
                log.warning("flite could not speak %s with %s: %s", utt_id, voice, err)
                failures[utt_id] = f"{voice}: {err}"
                continue
            soundfile.write(out / "audio" / f"{utt_id}.flac", audio, sample_rate, subtype="PCM_16")
            duration = round(len(audio) / sample_rate, 4)
            rows.append(
                {
                    "audio": f"audio/{utt_id}.flac",
                    "text": text,
                    "language": "en",
                    "id": utt_id,
                    "duration": duration,
                    "voice": f"flite-{voice}",
                }
            )
    record = {
        "flite": flite_version(flite),
        "voices": list(voices),
        "sentences": len(lines),
        "clips": len(rows),
        "audio_seconds": round(sum(row["duration"] for row in rows), 1),
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "flite.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / MANIFEST).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    if not rows:
        raise click.ClickException(f"flite spoke none of the {len(lines)} sentences: {next(iter(failures.values()))}")
    return record


# --- the steps ------------------------------------------------------------------------------------------


def validation_figures(config: PipelineConfig, tle: Path, store: Path, manifest: Path, json_path: Path):
    """validate-tle of `tle` on `store` (per-voice real-speech figures from `manifest`): its metrics."""
    options = validate_tle.ValidateTLEOptions(
        tle_dir=str(tle), store=str(store), voices=str(manifest), examples=3, json_path=str(json_path)
    )
    result = validate_tle.run(config, options)
    click.echo(result.summary())
    return result.metrics


def finetune_summary(result: finetune.FinetuneResult) -> dict[str, Any]:
    return {"steps": result.steps, "saved_step": result.saved_step, "wall_seconds": round(result.wall_seconds, 1)}


def evaluate_scores(config: PipelineConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """{column: {set: {wer, cer, term_error_rate, decode_seconds_per_clip, loops, clips}}} of an evaluate run."""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for (column, audio_set), score in evaluate.run(config).scores.items():
        scores.setdefault(column, {})[audio_set] = {
            "wer": score.wer,
            "cer": score.cer,
            "term_error_rate": score.terms.term_error_rate if score.terms is not None else None,
            "decode_seconds_per_clip": score.decode_seconds_per_clip,
            "loops": len(score.loops),
            "clips": len(score.clips),
        }
    return scores


class Measurement:
    """The steps, each through the ledger, in the order `main` takes them: speech and stores, today's TLE's
    validation, the new TLE and its validation, the new arm's fine-tuning, the evaluation."""

    def __init__(
        self,
        demo: Demo,
        out: Path,
        arm_sets: Sequence[str],
        flite: str | None,
        quick: bool,
        ledger: Ledger,
        shared: Path | None = None,
    ):
        """`shared`: the OUT of an earlier measurement on the same demo whose test speech, stores, today's
        validation and the re-used arms' scores this one takes (--reuse); else `out` makes its own."""
        self.demo, self.out, self.arm_sets, self.flite, self.ledger = demo, out, arm_sets, flite, ledger
        self.seeds = 1 if quick else demo.seeds
        self.limit = QUICK_CLIPS if quick else 0  # clips of each test set; 0: all
        self.shared = shared = shared or out
        self.manifests = {
            "espeak": demo.audio("target-test"),
            "flite": shared / "audio" / "flite-target-test" / MANIFEST,
        }
        self.synthesizers = SYNTHESIZERS if flite else SYNTHESIZERS[:1]
        self.stores = {name: shared / "stores" / f"target-test-{name}" for name in self.synthesizers}
        self.tles = {TODAY: demo.tle, NEW: out / "tle-new"}

    def speech(self) -> dict[str, Any] | None:
        """flite's target test speech (its record; None without flite) and both synthesizers' test stores."""
        demo, record = self.demo, None
        if self.flite:
            record = self.ledger.run(
                "flite",
                f"speak texts/target-test.txt with flite ({', '.join(FLITE_VOICES)} in turn)",
                lambda: speak_with_flite(
                    self.flite,
                    FLITE_VOICES,
                    demo.work / "texts" / "target-test.txt",
                    self.manifests["flite"].parent,
                    self.limit,
                    demo.record["teacher"]["sample_rate"],
                ),
            )
        for name, store in self.stores.items():
            self.ledger.run(
                f"precompute-{name}",
                f"the teacher's states of the {name} target test speech into {store}",
                lambda name=name, store=store: (
                    precompute.run(demo.precompute_config(self.manifests[name], store, self.limit)).store_utterances
                ),
            )
        return record

    def voice_scale(self) -> dict[str, Any]:
        """The cosine scale: real speech against real speech of the same sentences, re-timed token by token
        (validate_tle.voice_cosine) — eSpeak's other voices against the eSpeak test speech, and eSpeak
        against flite. {reference: {cosine, utterances, unmatched}}."""
        demo, folder = self.demo, self.shared / "audio" / "espeak-other-target-test"
        store = self.shared / "stores" / "target-test-espeak-other"

        def speak() -> int:
            lines = (demo.work / "texts" / "target-test.txt").read_text(encoding="utf-8").splitlines()
            texts = self.shared / "texts" / "target-test.txt"  # its name gives the clips the test set's ids
            texts.parent.mkdir(parents=True, exist_ok=True)
            texts.write_text("\n".join(lines[: self.limit or None]) + "\n", encoding="utf-8")
            tts.synthesize(texts, folder, seed=OTHER_VOICES_SEED, workers=os.cpu_count() or 1, overwrite=True)
            return len((folder / MANIFEST).read_text(encoding="utf-8").splitlines())

        self.ledger.run(
            "espeak-other", f"speak the target test sentences with eSpeak, voices of seed {OTHER_VOICES_SEED}", speak
        )
        self.ledger.run(
            "precompute-espeak-other",
            f"the teacher's states of that speech into {store}",
            lambda: precompute.run(demo.precompute_config(folder / MANIFEST, store, self.limit)).store_utterances,
        )
        pairs = {"espeak other voices -> espeak": (self.stores["espeak"], store)}
        if "flite" in self.stores:
            pairs["espeak -> flite"] = (self.stores["flite"], self.stores["espeak"])
        config = demo.config(demo.tle / "config.toml")
        return self.ledger.run(
            "voices",
            "the cosine of real speech to real speech of the same sentences, re-timed token by token",
            lambda: {
                label: validate_tle.voice_cosine(config, str(demo.tle), str(target), str(other))
                for label, (target, other) in pairs.items()
            },
        )

    def train_tle(self) -> None:
        self.ledger.run(
            "train-tle",
            f"train the new TLE on the demo's source store ({' '.join(self.arm_sets) or 'no override'})",
            lambda: (
                train_tle.run(
                    self.demo.config(
                        self.demo.tle / "config.toml",
                        self.arm_sets,
                        train_tle={"output_dir": str(self.tles[NEW]), "progress": False},
                    )
                ).validation
            ),
        )

    def validate(self, tle: str) -> dict[str, Any]:
        """validate-tle's metrics of the TLE `tle` (TODAY or NEW) on each test store: {synthesizer: metrics}."""
        path = self.tles[tle]
        (self.out / "validate").mkdir(exist_ok=True)
        return {
            name: self.ledger.run(
                f"validate-{tle}-{name}",
                f"validate-tle {tle}'s TLE on the {name} target test store",
                lambda name=name: validation_figures(
                    self.demo.config(path / "config.toml"),
                    path,
                    self.stores[name],
                    self.manifests[name],
                    self.out / "validate" / f"{tle}-{name}.json",
                ),
            )
            for name in self.synthesizers
        }

    def shared_steps(self) -> list[str]:
        """The steps that do not depend on the recipe: what --reuse takes from another run."""
        steps = (["flite"] if self.flite else []) + [f"precompute-{name}" for name in self.synthesizers]
        steps += [f"validate-{TODAY}-{name}" for name in self.synthesizers]
        return steps + ["espeak-other", "precompute-espeak-other", "voices", "evaluate-reused"]

    def finetune(self) -> None:
        """The whistle arm on the new TLE: each seed's demo whistle run with only the TLE and the output moved."""
        for seed in range(self.seeds):
            label = run_label(NEW_ARM, seed)
            self.ledger.run(
                f"finetune-{label}",
                f"fine-tune the whistle arm on the new TLE, seed {seed}",
                lambda label=label, seed=seed: finetune_summary(
                    finetune.run(
                        self.demo.config(
                            self.demo.adapted(run_label("whistle", seed)) / "config.toml",
                            self.arm_sets,
                            finetune={
                                "tle_path": str(self.tles[NEW]),
                                "output_dir": str(self.out / "adapted" / label),
                                "progress": False,
                            },
                        )
                    )
                ),
            )

    def evaluate(self) -> dict[str, dict[str, dict[str, Any]]]:
        """evaluate_scores of the unadapted model and every arm's runs on the test sets, greedy: the demo's
        models (the same for every recipe, so --reuse takes them) and the new arm's, in two steps."""
        demo, runs = self.demo, range(self.seeds)
        reused = [f"{BASELINE}={demo.teacher}"]
        reused += [f"{run_label(arm, s)}={demo.adapted(run_label(arm, s))}" for arm in REUSED_ARMS for s in runs]
        new = [f"{run_label(NEW_ARM, s)}={self.out / 'adapted' / run_label(NEW_ARM, s)}" for s in runs]
        sets = {f"target-{name}": self.manifests[name] for name in self.synthesizers}
        sets["source"] = demo.audio("source-test")
        scores: dict[str, dict[str, dict[str, Any]]] = {}
        for step, models in (("evaluate-reused", reused), ("evaluate-new", new)):
            scores |= self.ledger.run(
                step,
                f"greedy WER of {len(models)} models on {', '.join(sets)}",
                lambda step=step, models=models: evaluate_scores(
                    demo.config(
                        demo.work / "eval" / "config.toml",
                        evaluate={
                            "models": models,
                            "sets": [f"{label}={path}" for label, path in sets.items()],
                            "variants": ["plain"],
                            "num_beams": 1,
                            "max_clips": self.limit,
                            "output_dir": str(self.out / step),
                        },
                    )
                ),
            )
        return scores


# --- the report ---------------------------------------------------------------------------------------------


def arm_figures(scores: dict[str, Any], seeds: int) -> dict[str, Any]:
    """method_figures (the demo report's: WER mean, range, relative to unadapted, points below the control)
    of the unadapted model and the four arms, plus each one's points below text-null."""
    columns = {"unadapted": ("plain", [BASELINE])}
    columns.update({arm: ("plain", [run_label(arm, s) for s in range(seeds)]) for arm in (*REUSED_ARMS, NEW_ARM)})
    figures = method_figures(scores, columns, {})
    for method in figures.values():
        for name in scores[BASELINE]:
            method[name]["beyond_text_null"] = figures["text-null"][name]["wer"] - method[name]["wer"]
    return figures


TLE_COLUMNS = (  # validate-tle figure, the table's header, its cell
    ("cosine", "cosine (true durations)", "{:.3f}"),
    ("cosine_predicted", "cosine (predicted durations, stretched)", "{:.3f}"),
    ("length_error", "length error", "{:.3f}"),
    ("wer_true", "round-trip WER % (true lengths)", "{:.1%}"),
    ("wer_predicted", "round-trip WER % (predicted)", "{:.1%}"),
    ("real_wer", "real speech WER %", "{:.1%}"),
    ("utterances", "utterances", "{}"),
)
TLE_HEADERS = ["TLE / synthesizer", *(header for _, header, _ in TLE_COLUMNS)]


def tle_rows(validation: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [
        [f"{tle} / {name}", *(cell.format(m[key]).rstrip("%") for key, _, cell in TLE_COLUMNS)]
        for tle, by_synthesizer in validation.items()
        for name, m in by_synthesizer.items()
    ]


SCALE_HEADERS = ["speech -> test speech", "cosine (normalised)", "utterances"]


def scale_rows(scale: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[label, f"{m['cosine']:.3f}", str(m["utterances"])] for label, m in scale.items()]


def arm_rows(figures: dict[str, Any], audio_set: str) -> list[list[Any]]:
    rows = []
    for method, by_set in figures.items():
        cell = by_set[audio_set]
        rows.append(
            [
                method,
                f"{100 * cell['wer']:.1f} [{100 * cell['wer_min']:.1f}-{100 * cell['wer_max']:.1f}]",
                f"{100 * cell['beyond_control']:+.1f}",
                f"{100 * cell['beyond_text_null']:+.1f}",
                f"{100 * cell['relative_wer']:+.1f}",
            ]
        )
    return rows


ARM_HEADERS = ["arm", "WER % mean [range]", "points below control", "points below text-null", "% vs unadapted"]


def markdown(results: dict[str, Any]) -> str:
    def grid(headers: list[str], rows: list[list[str]]) -> list[str]:
        return [f"| {' | '.join(headers)} |", "|" + "---|" * len(headers), *(f"| {' | '.join(r)} |" for r in rows)]

    lines = [
        f"# TLE with {' '.join(results['arm_sets']) or 'no override'} vs today's TLE on {results['demo']}",
        "",
        f"{results['seeds']} seed(s) per arm; flite: "
        + (
            results["flite"].get("missing") or f"{results['flite']['clips']} clips, voices {results['flite']['voices']}"
        ),
        "",
        "## TLE states vs the teacher's states of real speech of unseen target sentences",
        "",
        *grid(TLE_HEADERS, tle_rows(results["tle_validation"])),
        "",
        "The scale: real speech against real speech of the same sentences, re-timed token by token:",
        "",
        *grid(SCALE_HEADERS, scale_rows(results["voice_scale"])),
    ]
    for audio_set in results["sets"]:
        lines += [
            "",
            f"## Fine-tuned arms on {audio_set}",
            "",
            *grid(ARM_HEADERS, arm_rows(results["arms"], audio_set)),
        ]
    return "\n".join(lines) + "\n"


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The name=value figures: each TLE's cosine and round trips per synthesizer, each arm's WER and margins."""
    figures: dict[str, Any] = {
        "seeds": results["seeds"],
        "flite": "missing" if "missing" in results["flite"] else "yes",
    }
    for tle, by_synthesizer in results["tle_validation"].items():
        for name, m in by_synthesizer.items():
            for key in ("cosine", "cosine_predicted", "wer_true", "wer_predicted", "real_wer"):
                figures[f"tle_{tle}_{name}_{key}"] = m[key]
    for label, m in results["voice_scale"].items():
        figures[f"voice_{label.replace(' -> ', '_to_').replace(' ', '_')}_cosine"] = m["cosine"]
    for method, by_set in results["arms"].items():
        for audio_set, cell in by_set.items():
            if not isinstance(cell, dict):
                continue
            prefix = f"{method}_{audio_set}".replace("-", "_").replace(".", "_")
            figures[f"{prefix}_wer"] = cell["wer"]
            if method != "unadapted":
                figures[f"{prefix}_beyond_control"] = cell["beyond_control"]
                figures[f"{prefix}_beyond_text_null"] = cell["beyond_text_null"]
                figures[f"{prefix}_relative_wer"] = cell["relative_wer"]
    figures["seconds"] = results["seconds"]["total"]
    return figures


@click.command()
@click.option(
    "--demo", "demo_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A finished demo."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where this measurement writes.")
@click.option(
    "--arm-set",
    "arm_sets",
    multiple=True,
    default=DEFAULT_ARM_SET,
    show_default=True,
    help="A --set override of the new TLE's train-tle and its whistle arm's finetune (repeatable); "
    "`none`: no override, today's recipe trained again (on a quick demo's machine it reproduced today's TLE and "
    "whistle arm exactly: a check of the set-up).",
)
@click.option("--flite", default="flite", show_default=True, help="The flite program (skipped when missing).")
@click.option("--quick", is_flag=True, help=f"A smoke run: one seed, the first {QUICK_CLIPS} clips of each test set.")
@click.option(
    "--reuse",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A finished OUT of this script on the same demo: take its test speech and stores, today's TLE's "
    "validation and the demo arms' scores instead of measuring them again (only the new recipe runs).",
)
def main(demo_dir: str, out: str, arm_sets: tuple[str, ...], flite: str, quick: bool, reuse: str | None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    started = time.perf_counter()
    click.echo(describe_machine())
    workdir, out_dir = Path(demo_dir).resolve(), Path(out).resolve()
    if out_dir == workdir or workdir in out_dir.parents:
        raise click.ClickException(f"--out {out_dir} is inside the demo {workdir}: this script never writes there")
    arm_sets = () if arm_sets == ("none",) else arm_sets
    demo = Demo(workdir)
    try:  # an unknown or invalid override fails here, not after an hour
        demo.config(demo.tle / "config.toml", arm_sets)
    except ConfigError as err:
        raise click.ClickException(f"--arm-set: {err}") from err
    flite_path = find_flite(flite)
    missing = None if flite_path else f"{flite} is not installed (apt-get install flite): {NO_FLITE}"
    if missing:
        log.warning("%s", missing)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(
        out_dir, {"demo": str(workdir), "arm_sets": list(arm_sets), "quick": quick, "flite": bool(flite_path)}
    )
    shared = Path(reuse).resolve() if reuse else None
    measurement = Measurement(demo, out_dir, arm_sets, flite_path, quick, ledger, shared)
    if shared is not None:
        ledger.adopt(shared, measurement.shared_steps())
    flite_record = measurement.speech()
    scale = measurement.voice_scale()
    validation = {TODAY: measurement.validate(TODAY)}
    measurement.train_tle()
    validation[NEW] = measurement.validate(NEW)
    measurement.finetune()
    scores = measurement.evaluate()
    seeds = measurement.seeds
    figures = arm_figures(scores, seeds)
    results = {
        "demo": str(workdir),
        "arm_sets": list(arm_sets),
        "quick": quick,
        "seeds": seeds,
        "flite": {"missing": missing} if missing else flite_record,
        "sets": list(scores[BASELINE]),
        "tle_validation": validation,
        "voice_scale": scale,
        "arms": figures,
        "scores": scores,
        "machine": describe_machine(),
        "seconds": {**ledger.seconds(), "total": round(time.perf_counter() - started, 1)},
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown(results), encoding="utf-8")
    click.echo("\nTLE states vs real speech of unseen target sentences (validate-tle):")
    click.echo(table(TLE_HEADERS, tle_rows(validation)))
    click.echo("\nThe scale: real speech against real speech of the same sentences, re-timed token by token:")
    click.echo(table(SCALE_HEADERS, scale_rows(scale)))
    for audio_set in results["sets"]:
        click.echo(f"\n{audio_set} test speech, {seeds} seed(s) per arm:")
        click.echo(table(ARM_HEADERS, arm_rows(figures, audio_set)))
    if missing:
        click.echo(f"\n{missing}")
    emit(headline(results))
    click.echo(
        f"wrote {out_dir / 'results.json'} and {out_dir / 'table.md'}; total {results['seconds']['total']:.0f} s "
        f"(the steps took {sum(ledger.seconds().values()):.0f} s, earlier runs' included)"
    )


if __name__ == "__main__":
    main()
