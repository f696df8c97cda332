"""Checks before work: every stage looks at all its inputs and outputs before it creates a folder or loads a
weight, and reports every problem at once (a ConfigError, one line per problem)::

    preflight.train_tle(config)   # the first line of stages.train_tle.run

What is checked, by kind of input:

    a path       it exists and is a folder (or a file) as the setting needs
    a Whisper    a local folder: config.json is a Whisper's, safetensors weights (and a tokenizer where the
                 stage needs one) are there; a hub name (owner/name): its config.json is in the cache or the hub
                 answers one request for it (offline — HF_HUB_OFFLINE or no network — is said at once, not
                 after huggingface_hub's retries)
    a store      it opens, has complete shards, and holds states of the teacher's geometry
    data, text   a local manifest, folder or text file exists (a `datasets` hub name is left to `datasets`)

and for every output (`output_problems`): it is not an input, does not hold one (a rerun, --overwrite or
--no-resume could replace or delete it), and does not lie inside a model folder or a store (they are
written and replaced whole). An output inside a data folder is fine: nothing there is overwritten.
Paths are compared resolved (~, relative parts, symlinks); hub names and URLs are not paths.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import WhisperConfig

from store import StoreReader
from store.format import StoreError
from whistle_pipeline.config import ConfigError, PipelineConfig, load_config
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.sources import MANIFEST_SUFFIXES, open_source
from whistle_pipeline.teacher import (
    TeacherGeometry,
    feature_extractor,
    geometry_differences,
)
from whistle_pipeline.tts import EspeakEngine, TTSError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the hub spells repository ids
HUB_TIMEOUT_S = 10  # one request to ask the hub for a config, without retries
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either one makes a loadable Whisper tokenizer


@dataclass(frozen=True)
class Input:
    """Something a stage reads: `what` names its setting ("teacher.name_or_path"); `whole` marks a model
    folder or a store, which is written and replaced as a unit (nothing may be written inside it)."""

    what: str
    path: str
    whole: bool = False


def refuse(problems: Sequence[str], stage: str) -> None:
    """Raise one ConfigError listing every problem (nothing has been written yet), or return."""
    if problems:
        raise ConfigError(problems, f"whistle {stage}'s inputs and outputs; nothing was written or loaded")


# ---- paths ---------------------------------------------------------------------------------------------


def resolved(path: str | os.PathLike) -> Path:
    """`path` with ~ expanded, made absolute and its symlinks followed (it need not exist)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def is_url(path: str) -> bool:
    return "://" in path


def looks_local(path: str) -> bool:
    """A path meant as a local file or folder even when it is missing: it exists, starts with ., / or ~, or
    names a manifest or a text file. Anything else may be a hub name."""
    return (
        os.path.lexists(os.path.expanduser(path))
        or path.startswith((".", "/", "~", os.sep))
        or Path(path).suffix.lower() in (*MANIFEST_SUFFIXES, ".txt", ".json")
    )


def path_problems(path: str, what: str, kind: str, hint: str = "") -> list[str]:
    """`path` must exist and be a `kind` ("folder", "file" or "any"); `hint` says what to do if not."""
    local, fix = Path(os.path.expanduser(path)), f": {hint}" if hint else ""
    if not path:
        return [f"{what} is empty{fix}"]
    if not local.exists():
        return [f"{what} = {path!r} does not exist{fix}"]
    if kind == "folder" and not local.is_dir():
        return [f"{what} = {path!r} is a file, not a folder{fix}"]
    if kind == "file" and not local.is_file():
        return [f"{what} = {path!r} is a folder, not a file{fix}"]
    return []


def data_problems(path: str, what: str, kind: str = "auto") -> list[str]:
    """An audio set or corpus (manifest, Common Voice folder, `datasets` folder or hub name, text file): a
    local one must exist; a hub dataset name is `datasets`' to find."""
    if not path:
        return [f"{what} is empty: give a manifest (.csv/.tsv/.jsonl), a folder or a dataset name"]
    if kind in ("manifest", "common_voice", "hf_disk") or looks_local(path):
        return path_problems(
            path,
            what,
            "file" if kind == "manifest" else "any",
            "check the path (relative paths start from the current folder)",
        )
    return []


def output_problems(what: str, path: str, inputs: Sequence[Input], kind: str = "folder") -> list[str]:
    """The output `path` (a "folder" or a "file") against the stage's inputs: see the module docstring."""
    if not path or is_url(path):
        return []
    out = resolved(path)
    problems = []
    for given in inputs:
        if not given.path or is_url(given.path) or not os.path.lexists(os.path.expanduser(given.path)):
            continue  # a hub name, a URL, or missing (reported by its own check): nothing here to overwrite
        source = resolved(given.path)
        if out == source:
            problems.append(
                f"{what} = {path!r} is {given.what} itself: the run would write over its input. Choose another {what}."
            )
        elif source.is_relative_to(out):
            problems.append(
                f"{what} = {path!r} holds {given.what} ({given.path}): a rerun, --overwrite or "
                f"--no-resume could replace or delete it. Choose a {what} outside it."
            )
        elif given.whole and out.is_relative_to(source):
            problems.append(
                f"{what} = {path!r} lies inside {given.what} ({given.path}), a model folder or store "
                f"that is written and replaced whole. Choose a {what} outside it."
            )
    if not problems and out.exists() and kind == "folder" and not out.is_dir():
        problems.append(f"{what} = {path!r} is a file, not a folder: choose a folder for the outputs")
    if not problems and out.is_dir() and kind == "file":
        problems.append(f"{what} = {path!r} is a folder, not a file: give a file name")
    return problems


# ---- models --------------------------------------------------------------------------------------------


def _hub_config(name: str, revision: str) -> tuple[Path | None, str | None]:
    """(the folder holding `name`'s config.json and, where the model has one, preprocessor_config.json, None)
    from the cache or one request to the hub; or (None, why not)."""
    revision = revision or None
    cached = huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent, None
    if hub_constants.HF_HUB_OFFLINE:
        return None, (
            "the hub is offline (HF_HUB_OFFLINE is set) and the model is not in the local cache: "
            "download it once with a network, or give a local folder"
        )
    url = huggingface_hub.hf_hub_url(name, "config.json", revision=revision)
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)  # one request, no retries
        config = huggingface_hub.hf_hub_download(name, "config.json", revision=revision)
    except RevisionNotFoundError:
        return None, f"the hub model has no revision {revision!r} (teacher.revision)"
    except RepositoryNotFoundError:
        return None, (
            "there is no such hub model (or it is private or gated: log in with `hf auth login`), "
            "nor a local folder of that name"
        )
    except LocalEntryNotFoundError as err:
        return None, _unreachable(err)
    except EntryNotFoundError:
        return None, "the hub repository has no config.json: it is not a transformers model"
    except Exception as err:  # noqa: BLE001 — httpx and OS errors of an unreachable hub, in many types
        return None, _unreachable(err)
    try:
        huggingface_hub.hf_hub_download(name, "preprocessor_config.json", revision=revision)
    except EntryNotFoundError:
        pass  # Whisper's standard feature extractor for its mel bins (teacher.feature_extractor)
    return Path(config).parent, None


def _unreachable(err: Exception) -> str:
    return (
        f"the hub cannot be reached ({type(err).__name__}: {err}) and the model is not in the local cache: "
        "connect, set HF_HUB_OFFLINE=1 with a filled cache, or give a local folder"
    )


def whisper_problems(
    name_or_path: str, revision: str, what: str, tokenizer: bool = True, extractor: bool = False
) -> tuple[list[str], TeacherGeometry | None]:
    """(problems, geometry): a local Whisper folder or a hub name (owner/name) whose config is a Whisper's;
    a local folder also needs safetensors weights, a tokenizer (`tokenizer`) and preprocessor_config.json
    (`extractor`: loaders without the standard-extractor fallback).

    The geometry (config.json + preprocessor_config.json) is what stores are checked against; None
    when the model cannot be read.
    """
    if not name_or_path:
        return [f"{what} is empty: give a hub name (owner/name) or a local Whisper folder"], None
    local = Path(os.path.expanduser(name_or_path))
    if local.exists() or not HUB_NAME.match(name_or_path):
        problems = path_problems(
            name_or_path,
            what,
            "folder",
            "give a local Whisper folder (save_pretrained, `whistle import-ct2` or "
            "`whistle finetune` output) or a hub name such as openai/whisper-large-v3",
        )
        if problems:
            return problems, None
        folder = local
        if not any(folder.glob("*.safetensors")):
            problems.append(
                f"{what} = {name_or_path!r} has no *.safetensors weights: whistle loads safetensors "
                "only (save the model again with save_pretrained)"
            )
        if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            problems.append(
                f"{what} = {name_or_path!r} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save "
                "the model's WhisperProcessor into it"
            )
        if extractor and not (folder / "preprocessor_config.json").is_file():
            problems.append(
                f"{what} = {name_or_path!r} has no preprocessor_config.json: save the model's WhisperProcessor into it"
            )
    else:
        folder, why = _hub_config(name_or_path, revision)
        if folder is None:
            return [f"{what} = {name_or_path!r}: {why}"], None
        problems = []
    geometry, problem = _geometry(folder, name_or_path, what)
    return problems + ([problem] if problem else []), geometry


def _geometry(folder: Path, name_or_path: str, what: str) -> tuple[TeacherGeometry | None, str | None]:
    config_path = folder / "config.json"
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, (
            f"{what} = {name_or_path!r} has no config.json: it is not a transformers checkpoint (give a "
            "Whisper folder written by save_pretrained)"
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{what} = {name_or_path!r}: {config_path} is not readable JSON ({err})"
    if not isinstance(values, dict) or values.get("model_type") != "whisper":
        kind = values.get("model_type") if isinstance(values, dict) else None
        return None, f"{what} = {name_or_path!r} holds a {kind!r} model (config.json model_type), not a Whisper"
    try:
        config = WhisperConfig.from_dict(values)
        return TeacherGeometry.from_pretrained(config, feature_extractor(str(folder), None, config.num_mel_bins)), None
    except (WhistleError, OSError, ValueError, TypeError) as err:
        return None, f"{what} = {name_or_path!r}: {err}"


# ---- stores --------------------------------------------------------------------------------------------


def store_problems(url: str, what: str, geometry: TeacherGeometry | None, teacher_name: str = "") -> list[str]:
    """A store to read: it opens, has complete shards and (given the teacher's geometry) holds its states."""
    if not url:
        return [f"{what} is empty: give a store folder or URL written by `whistle precompute`"]
    if not is_url(url):
        problems = path_problems(url, what, "folder", "run `whistle precompute` into it first, or fix the path")
        if problems:
            return problems
    try:
        reader = StoreReader(url)
    except (StoreError, OSError, ValueError) as err:
        return [f"{what} = {url!r} is not a readable whistle store: {err}"]
    problems = []
    if not reader.shards():
        incomplete = len(reader.incomplete_shards())
        problems.append(
            f"{what} {url} has no complete shards ({incomplete} incomplete): run `whistle precompute` "
            "on it first" + (" and let it finish (a rerun completes the missing shards)" if incomplete else "")
        )
    if geometry is not None:
        differences = geometry_differences(reader.teacher, geometry.record(teacher_name, ""))
        if differences:
            problems.append(
                f"{what} {url} holds states of another teacher geometry than {teacher_name!r}: "
                + "; ".join(d.describe("store") for d in differences)
                + ". Use the teacher that made the store, or precompute the store with this one."
            )
    return problems


def existing_store_problems(url: str, what: str, geometry: TeacherGeometry | None, teacher_name: str) -> list[str]:
    """precompute's store, resumed when it exists: its teacher geometry must be this teacher's."""
    if is_url(url) or not (Path(os.path.expanduser(url)) / "zarr.json").is_file() or geometry is None:
        return []
    try:
        reader = StoreReader(url)
    except (StoreError, OSError, ValueError):
        return []  # precompute's writer names what is wrong with it (or replaces it under --overwrite)
    differences = geometry_differences(reader.teacher, geometry.record(teacher_name, ""))
    if not differences:
        return []
    return [
        f"{what} {url} already holds states of another teacher geometry: "
        + "; ".join(d.describe("store") for d in differences)
        + ". Precompute into a new store, or pass --overwrite to replace it."
    ]


# ---- the stages ----------------------------------------------------------------------------------------


def _teacher(config: PipelineConfig, tokenizer: bool = True) -> tuple[list[str], TeacherGeometry | None]:
    return whisper_problems(config.teacher.name_or_path, config.teacher.revision, "teacher.name_or_path", tokenizer)


def _model_input(config: PipelineConfig) -> Input:
    return Input("teacher.name_or_path", config.teacher.name_or_path, whole=True)


def precompute(config: PipelineConfig) -> None:
    """The teacher and the source; the store is precompute's output (resumed when it exists)."""
    problems, geometry = _teacher(config, tokenizer=False)
    problems += data_problems(config.data.path, "data.path", config.data.kind)
    if not config.precompute.overwrite:  # else it is replaced (and rank 0 may be replacing it now)
        problems += existing_store_problems(config.store.path, "store.path", geometry, config.teacher.name_or_path)
    problems += output_problems(
        "store.path", config.store.path, [_model_input(config), Input("data.path", config.data.path)]
    )
    refuse(problems, "precompute")


def pronunciation_problems(front_end: str) -> list[str]:
    """[tle] pronunciation's G2P must be installed: found now, not after the store's alignment."""
    missing = [name for name in ("phonemizer", "espeakng_loader") if importlib.util.find_spec(name) is None]
    if front_end == "espeak" and missing:
        return [f"tle.pronunciation = \"espeak\" needs {' and '.join(missing)}: pip install 'whistle[g2p]'"]
    return []


def train_tle(config: PipelineConfig) -> None:
    """The teacher, the store (of the teacher's geometry), the pronunciation front end, and
    train_tle.output_dir against the inputs."""
    problems, geometry = _teacher(config)
    problems += store_problems(config.store.path, "store.path", geometry, config.teacher.name_or_path)
    problems += pronunciation_problems(config.tle.pronunciation)
    problems += output_problems(
        "train_tle.output_dir",
        config.train_tle.output_dir,
        [_model_input(config), Input("store.path", config.store.path, whole=True)],
    )
    refuse(problems, "train-tle")


def finetune_ratio_problems(config: PipelineConfig) -> list[str]:
    """The inputs the ratios call for must be given, and inputs given must be used."""
    settings = config.finetune
    problems = []
    if settings.text_ratio > 1e-9:
        if not settings.text:
            problems.append(
                f"finetune.text is empty but {settings.text_ratio:.2f} of each batch is text: give a "
                "target-domain corpus (or set audio_ratio + tts_ratio = 1 for audio-only fine-tuning)"
            )
        drawn_stores = [
            store
            for ratio, store in ((settings.audio_ratio, settings.audio_store), (settings.tts_ratio, settings.tts_store))
            if ratio > 0 and store
        ]
        if settings.text_states == "null":
            if not drawn_stores:
                problems.append(
                    'finetune.text_states = "null" takes the text windows\' tail template from a store: '
                    "draw audio_store or tts_store (a ratio > 0)"
                )
        elif not settings.tle_path:
            problems.append("finetune.tle_path is empty but text examples are drawn: give a `whistle train-tle` output")
    elif settings.text:
        problems.append("finetune.text is given but audio_ratio + tts_ratio = 1 leaves no room for text: lower them")
    for kind, ratio, store in (
        ("audio", settings.audio_ratio, settings.audio_store),
        ("tts", settings.tts_ratio, settings.tts_store),
    ):
        if ratio > 0 and not store:
            problems.append(
                f"finetune.{kind}_ratio = {ratio:g} but finetune.{kind}_store is empty: give the store "
                f"or set {kind}_ratio = 0"
            )
        if store and ratio == 0:
            problems.append(f"finetune.{kind}_store is given but finetune.{kind}_ratio = 0: it would never be read")
    return problems


def finetune_input_problems(config: PipelineConfig, geometry: TeacherGeometry | None) -> list[str]:
    """The TLE (unless text_states = "null": no TLE is read), corpus, stores and val_audio that the ratios
    draw from, where they are given."""
    settings = config.finetune
    problems = []
    if settings.text_ratio > 1e-9 and settings.text_states == "tle" and settings.tle_path:
        problems += path_problems(
            settings.tle_path,
            "finetune.tle_path",
            "folder",
            "train a TLE first (`whistle train-tle`) or point at its output_dir",
        )
        if not problems and not (Path(os.path.expanduser(settings.tle_path)) / "config.json").is_file():
            problems.append(
                f"finetune.tle_path = {settings.tle_path!r} has no config.json: it is not a `whistle train-tle` output"
            )
    if settings.text_ratio > 1e-9 and settings.text:
        problems += data_problems(settings.text, "finetune.text")
    for key, ratio, url in (
        ("audio_store", settings.audio_ratio, settings.audio_store),
        ("tts_store", settings.tts_ratio, settings.tts_store),
    ):
        if ratio > 0 and url:
            problems += store_problems(url, f"finetune.{key}", geometry, config.teacher.name_or_path)
    if settings.val_audio:
        problems += data_problems(settings.val_audio, "finetune.val_audio", config.data.kind)
    return problems


def finetune(config: PipelineConfig) -> None:
    """The ratios' inputs, the teacher, the TLE, corpus, stores and val_audio, and finetune.output_dir against
    all of them."""
    settings = config.finetune
    problems = finetune_ratio_problems(config)
    teacher_problems, geometry = _teacher(config)
    problems += teacher_problems + finetune_input_problems(config, geometry)
    inputs = [
        _model_input(config),
        Input("finetune.tle_path", settings.tle_path if settings.text_states == "tle" else "", whole=True),
        Input("finetune.text", settings.text),
        Input("finetune.audio_store", settings.audio_store, whole=True),
        Input("finetune.tts_store", settings.tts_store, whole=True),
        Input("finetune.val_audio", settings.val_audio),
    ]
    problems += output_problems("finetune.output_dir", settings.output_dir, inputs)
    refuse(problems, "finetune")


def _labelled(spec: str, kind: str) -> tuple[str, str]:
    """(what to call it, its path) for an evaluate MODEL or SET spec, "LABEL=PATH" or PATH (as
    transcribe.Named reads it)."""
    label, sep, path = spec.partition("=")
    return (f"{kind} {label}", path) if sep and label and "/" not in label and path else (kind, spec)


def evaluate(config: PipelineConfig) -> None:
    """Every model and audio set, and evaluate.output_dir against them."""
    settings = config.evaluate
    problems = [] if settings.models else ["no model to evaluate: give MODEL arguments (or evaluate.models)"]
    if not settings.sets:
        problems.append("no audio set to evaluate on: give --audio SET (or evaluate.sets)")
    inputs = []
    for spec in settings.models:
        what, path = _labelled(spec, "MODEL")
        problems += whisper_problems(path, config.teacher.revision, what, extractor=True)[0]
        inputs.append(Input(what, path, whole=True))
    for spec in settings.sets:
        what, path = _labelled(spec, "audio set")
        problems += data_problems(path, what, config.data.kind)
        inputs.append(Input(what, path))
    problems += output_problems("evaluate.output_dir", settings.output_dir, inputs)
    refuse(problems, "evaluate")


def validate_tle(config: PipelineConfig, options: Any) -> None:
    """The teacher, the TLE folder (and --weights), the evaluation store, --text and --voices files; the
    --json and --figure files against them. `options`: a stages.validate_tle.ValidateTLEOptions."""
    problems, geometry = _teacher(config)
    problems += path_problems(options.tle_dir, "TLE_DIR", "folder", "give a `whistle train-tle` output folder")
    if options.weights is not None:
        problems += path_problems(options.weights, "--weights", "file")
    problems += store_problems(options.store, "--store", geometry, config.teacher.name_or_path)
    for path in options.text_files:
        problems += path_problems(path, "--text", "file")
    if options.voices is not None:
        voice_problems = path_problems(options.voices, "--voices", "file")
        problems += voice_problems or voices_problems(config, options.voices)
    inputs = [
        _model_input(config),
        Input("TLE_DIR", options.tle_dir, whole=True),
        Input("--store", options.store, whole=True),
        Input("--weights", options.weights or ""),
        *(Input("--text", path) for path in options.text_files),
        Input("--voices", options.voices or ""),
    ]
    for what, path in (("--json", options.json_path), ("--figure", options.figure)):
        if path:
            problems += output_problems(what, path, inputs, kind="file")
    refuse(problems, "validate-tle")


def voices_problems(config: PipelineConfig, manifest: str) -> list[str]:
    """The --voices manifest must read as a precompute source and hold a voice column (its rows are matched
    to the store's clips after the store is open)."""
    try:
        source = open_source(dataclasses.replace(config.data, path=manifest, kind="auto", max_clips=0))
    except WhistleError as err:
        return [f"--voices {manifest}: {err}"]
    if source.column("voice") is None:
        return [
            f"--voices {manifest} has no 'voice' column; pass the `whistle synthesize` manifest the store was "
            "precomputed from"
        ]
    return []


def synthesize(texts: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """The sentences file, and OUT against it (--overwrite replaces OUT whole)."""
    problems = path_problems(os.fspath(texts), "TEXTS", "file", "give a text file with one sentence per line")
    problems += output_problems("OUT", os.fspath(out_dir), [Input("TEXTS", os.fspath(texts))])
    refuse(problems, "synthesize")


def import_ct2(source_dir: str | os.PathLike | None, output_dir: str | os.PathLike) -> None:
    """The CTranslate2 folder (when given as a path), and OUT against it (--overwrite replaces OUT whole)."""
    problems = []
    inputs = []
    if source_dir is not None:
        problems += path_problems(
            os.fspath(source_dir), "SRC", "folder", "give the CTranslate2 model folder (with model.bin)"
        )
        inputs.append(Input("SRC", os.fspath(source_dir), whole=True))
    problems += output_problems("OUT", os.fspath(output_dir), inputs)
    refuse(problems, "import-ct2")


def demo(workdir: str, overrides: Sequence[str], examples: Path, package: str, state: str) -> None:
    """The workdir (neither the bundled corpora nor holding them), the --set overrides, and on a first run
    (no `state` file in the workdir yet) eSpeak NG and the package the demo's Whisper comes from."""
    problems = output_problems("--workdir", workdir, [Input("the bundled examples", str(examples))])
    try:
        load_config(overrides=overrides)
    except ConfigError as err:
        problems += err.problems
    if not (resolved(workdir) / state).is_file():
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"the package {package} (Whisper tiny.en) is not installed: pip install 'whistle[demo]'")
        try:
            EspeakEngine.get()
        except TTSError as err:
            problems.append(str(err))
    refuse(problems, "demo")
