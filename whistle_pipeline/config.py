"""Configuration: one frozen dataclass per `pipeline.toml` table.

Defaults live only in the packaged `pipeline.toml`; the dataclasses declare names, types and
cross-field rules. `load_config` reads the defaults, overlays a user file, then explicit updates
(CLI flags) and `--set section.key=value` overrides, and reports every problem at once::

    cfg = load_config("my.toml", overrides=["store.frames=full"])
    cfg.store.frames  # "full"

Optional values are "" in TOML (empty = not set).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from whistle_pipeline.errors import WhistleError

DEFAULT_CONFIG_PATH = Path(__file__).with_name("pipeline.toml")

log = logging.getLogger(__name__)


class ConfigError(WhistleError):
    """Every problem found in a configuration, reported together."""

    def __init__(self, problems: Sequence[str], source: str):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration ({source}):\n{lines}")


def _in_range(name: str, value: float, low: float | None = None, high: float | None = None) -> list[str]:
    if low is not None and value < low:
        return [f"{name} = {value!r} is below its minimum {low}"]
    if high is not None and value > high:
        return [f"{name} = {value!r} is above its maximum {high}"]
    return []


@dataclass(frozen=True)
class TeacherConfig:
    name_or_path: str
    revision: str
    device: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    attn_implementation: Literal["sdpa", "eager"]

    def problems(self) -> list[str]:
        out = []
        if not self.name_or_path:
            out.append("teacher.name_or_path is empty: give a hub name or a local Whisper folder")
        device_kind = self.device.split(":")[0]
        if device_kind not in ("auto", "cpu", "cuda", "mps", "xpu"):
            out.append(f"teacher.device = {self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        return out


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["auto", "hf", "hf_disk", "manifest", "common_voice"]
    path: str
    subset: str
    split: str
    audio_column: str
    text_column: str
    id_column: str
    language_column: str
    language: str
    max_clips: int

    def problems(self) -> list[str]:
        out = _in_range("data.max_clips", self.max_clips, 0)
        if not self.language and not self.language_column:
            out.append("data.language is empty and data.language_column is not set: every row needs a language")
        return out


@dataclass(frozen=True)
class StoreConfig:
    path: str
    frames: Literal["speech", "full"]
    speech_margin_frames: int
    shard_size: int
    chunk_frames: int
    codec: Literal["blosc-lz4", "blosc-zstd", "none"]
    compression_level: int
    bitround_keepbits: int

    def problems(self) -> list[str]:
        out = []
        if not self.path:
            out.append("store.path is empty: give a folder or an fsspec URL for the feature store")
        out += _in_range("store.speech_margin_frames", self.speech_margin_frames, 0, 100)
        out += _in_range("store.shard_size", self.shard_size, 1)
        out += _in_range("store.chunk_frames", self.chunk_frames, 16)
        out += _in_range("store.compression_level", self.compression_level, 1, 9)
        out += _in_range("store.bitround_keepbits", self.bitround_keepbits, 0, 9)
        if self.bitround_keepbits and self.codec == "none":
            out.append("store.bitround_keepbits > 0 needs a compressing codec: BitRound only helps a compressor")
        return out


@dataclass(frozen=True)
class PrecomputeConfig:
    batch_size: int
    num_workers: int
    prefetch_factor: int
    write_threads: int
    write_queue: int
    augment: Literal["none", "telephone"]
    claim: Literal["dynamic", "static"]
    compile: bool
    strict: bool
    overwrite: bool
    progress: bool

    def problems(self) -> list[str]:
        return (
            _in_range("precompute.batch_size", self.batch_size, 1)
            + _in_range("precompute.num_workers", self.num_workers, 0)
            + _in_range("precompute.prefetch_factor", self.prefetch_factor, 1)
            + _in_range("precompute.write_threads", self.write_threads, 1)
            + _in_range("precompute.write_queue", self.write_queue, 1)
        )


@dataclass(frozen=True)
class TLEArchitectureConfig:
    """[tle]: the TLE's architecture (named apart from whistle_pipeline.tle.TLEConfig, the model's saved config)."""

    hidden_size: int
    text_layers: int
    frame_layers: int
    num_heads: int
    ffn_multiplier: int
    latent_size: int
    conv_kernel: int
    conv_layers: int
    dropout: float
    posterior: bool
    token_embeddings: Literal["teacher-frozen", "teacher", "random"]
    spelling_channels: int
    pronunciation: Literal["none", "espeak"]
    phoneme_channels: int

    def problems(self) -> list[str]:
        out = (
            _in_range("tle.hidden_size", self.hidden_size, 8)
            + _in_range("tle.num_heads", self.num_heads, 1)
            + _in_range("tle.text_layers", self.text_layers, 1)
            + _in_range("tle.frame_layers", self.frame_layers, 0)
            + _in_range("tle.ffn_multiplier", self.ffn_multiplier, 1)
            + _in_range("tle.latent_size", self.latent_size, 1)
            + _in_range("tle.conv_layers", self.conv_layers, 0)
            + _in_range("tle.dropout", self.dropout, 0.0, 0.9)
            + _in_range("tle.spelling_channels", self.spelling_channels, 0)
            + _in_range("tle.phoneme_channels", self.phoneme_channels, 1)
        )
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            out.append(f"tle.hidden_size = {self.hidden_size} is not divisible by tle.num_heads = {self.num_heads}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            out.append(f"tle.conv_kernel = {self.conv_kernel} must be odd and positive (frames stay aligned)")
        return out


MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
# pip extras that install a tracker (setup.cfg); accelerate's other trackers install under their own names
TRACKER_EXTRAS = {"tensorboard": "whistle[tensorboard]", "wandb": "whistle[wandb]", "trackio": "whistle[trackio]"}


def tracker_problems(key: str, log_with: list[str] | str) -> list[str]:
    """`log_with` must name trackers accelerate knows (accelerate.utils.LoggerType) that are installed; "all"
    is every installed one and [] none."""
    if log_with == "all" or not log_with:
        return []
    # accelerate imports torch: only a configuration that names trackers pays for it
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [tracker.value for tracker in LoggerType if tracker.value != "all"]
    installed = {tracker.value for tracker in get_available_trackers()}
    out = []
    for name in log_with:
        if name not in known:
            out.append(
                f"{key}: unknown tracker {name!r}{_suggest(name, known)}; accelerate's trackers are "
                f'{", ".join(known)} (or log_with = "all" for every installed one, [] for none)'
            )
        elif name not in installed:
            package = TRACKER_EXTRAS.get(name, name)
            out.append(
                f"{key} names {name!r}, which is not installed: pip install '{package}', or leave it out of {key}"
            )
    return out


@dataclass(frozen=True)
class LoopConfig:
    """The settings train-tle and finetune share around their loops, written once: both tables list them
    flat (`[train_tle] learning_rate = ...`) and each section's class inherits these fields and checks."""

    output_dir: str
    steps: int
    batch_size: int
    grad_accum: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    mixed_precision: MixedPrecision
    val_fraction: float
    val_size: int
    val_every: int
    checkpoint_every: int
    keep_checkpoints: int
    resume: bool
    skip_damaged: bool
    log_every: int
    log_with: list[str] | Literal["all"]
    shuffle_buffer: int
    num_workers: int
    progress: bool
    seed: int

    def loop_problems(self, section: str) -> list[str]:
        """The rules on the loop settings, named as `section.key`."""
        out = [
            problem
            for name, low, high in (
                ("steps", 1, None),
                ("batch_size", 1, None),
                ("grad_accum", 1, None),
                ("learning_rate", 0.0, None),
                ("warmup_steps", 0, None),
                ("weight_decay", 0.0, None),
                ("grad_clip", 0.0, None),
                ("val_fraction", 0.0, 0.5),
                ("val_size", 1, None),
                ("val_every", 1, None),
                ("checkpoint_every", 1, None),
                ("keep_checkpoints", 1, None),
                ("log_every", 1, None),
                ("shuffle_buffer", 1, None),
                ("num_workers", 0, None),
            )
            for problem in _in_range(f"{section}.{name}", getattr(self, name), low, high)
        ]
        if self.warmup_steps >= self.steps:
            out.append(f"{section}.warmup_steps = {self.warmup_steps} must be below {section}.steps = {self.steps}")
        return out + tracker_problems(f"{section}.log_with", self.log_with)


@dataclass(frozen=True)
class TrainTLEConfig(LoopConfig):
    mse_weight: float
    cosine_weight: float
    length_weight: float
    kl_beta: float
    kl_anneal_steps: int
    free_bits: float
    decoder_ce_weight: float
    decoder_ce_start: int
    decoder_ce_floor: float
    decoder_kl_weight: float
    val_wer_size: int
    length_bucket: int

    def problems(self) -> list[str]:
        out = (
            self.loop_problems("train_tle")
            + _in_range("train_tle.kl_anneal_steps", self.kl_anneal_steps, 0)
            + _in_range("train_tle.free_bits", self.free_bits, 0.0)
            + _in_range("train_tle.decoder_ce_start", self.decoder_ce_start, 0)
            + _in_range("train_tle.decoder_ce_floor", self.decoder_ce_floor, 0.0, 2.0)
            + _in_range("train_tle.val_wer_size", self.val_wer_size, 0)
            + _in_range("train_tle.length_bucket", self.length_bucket, 0)
        )
        if self.val_wer_size > self.val_size:
            out.append(
                f"train_tle.val_wer_size = {self.val_wer_size} exceeds train_tle.val_size = {self.val_size}: "
                "the round-trip WER decodes some of the validation utterances"
            )
        for name in (
            "mse_weight",
            "cosine_weight",
            "length_weight",
            "kl_beta",
            "decoder_ce_weight",
            "decoder_kl_weight",
        ):
            out += _in_range(f"train_tle.{name}", getattr(self, name), 0.0)
        if self.mse_weight == 0 and self.cosine_weight == 0:
            out.append("train_tle.mse_weight and cosine_weight are both 0: the TLE needs a regression anchor")
        return out


@dataclass(frozen=True)
class FinetuneConfig(LoopConfig):
    tle_path: str
    text_states: Literal["tle", "null"]
    text: str
    text_column: str
    text_split: str
    language: str
    language_column: str
    audio_store: str
    tts_store: str
    audio_ratio: float
    tts_ratio: float
    sample_latent: bool
    label_smoothing: float
    train_embeddings: bool
    val_audio: str
    select_by: Literal["auto", "wer", "loss"]
    select_best: bool

    @property
    def text_ratio(self) -> float:
        """Fraction of examples that are target-domain text (through the TLE, or content-free windows)."""
        return 1.0 - self.audio_ratio - self.tts_ratio

    def problems(self) -> list[str]:
        """Rules on the values alone; which inputs must be given follows from the ratios and is checked by
        `whistle_pipeline.preflight.finetune_ratio_problems` (the defaults name no store, so it cannot be a rule here)."""
        out = (
            _in_range("finetune.audio_ratio", self.audio_ratio, 0.0, 1.0)
            + _in_range("finetune.tts_ratio", self.tts_ratio, 0.0, 1.0)
            + self.loop_problems("finetune")
            + _in_range("finetune.label_smoothing", self.label_smoothing, 0.0, 0.5)
        )
        if self.select_by == "wer" and not self.val_audio:
            out.append('finetune.select_by = "wer" needs finetune.val_audio (an audio set to transcribe)')
        if self.audio_ratio + self.tts_ratio > 1.0 + 1e-9:
            out.append(
                f"finetune.audio_ratio + finetune.tts_ratio = {self.audio_ratio + self.tts_ratio:g} exceeds 1: "
                "they are fractions of one batch (the rest is text through the TLE)"
            )
        if not self.language and not self.language_column:
            out.append("finetune.language is empty and finetune.language_column is not set: every row needs a language")
        return out


EVALUATE_VARIANTS = ("plain", "prompt", "fusion", "prompt+fusion")
CORPUS_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")  # text corpora read from a file (else a datasets name)
AutoOrNumber = float | Literal["auto"]


def _file_problems(name: str, path: str, corpus: bool = False) -> list[str]:
    """A local file that must exist; with `corpus`, only paths with a corpus file suffix are files (the
    rest are `datasets` names or folders, checked when they are read)."""
    if not path or (corpus and Path(path).suffix.lower() not in CORPUS_SUFFIXES + (".arpa",)):
        return []
    return [] if Path(path).is_file() else [f"{name} = {path!r}: no such file"]


@dataclass(frozen=True)
class EvaluateConfig:
    models: list[str]
    sets: list[str]
    max_clips: int
    batch_size: int
    num_beams: int
    max_new_tokens: int
    output_dir: str
    write_diffs: bool
    outliers: int
    variants: list[str]
    prompt: str
    prompt_file: str
    prompt_from: str
    exclude_from: str
    lm: str
    lm_order: int
    lm_alpha: AutoOrNumber
    lm_beta: AutoOrNumber
    lm_top_k: int
    fusion_num_beams: int
    lm_dev: str
    lm_dev_fraction: float
    terms: str
    terms_from: str
    max_terms: int

    @property
    def prompt_given(self) -> bool:
        return bool(self.prompt or self.prompt_file or self.prompt_from)

    @property
    def fits_fusion(self) -> bool:
        """Whether alpha or beta is chosen on a dev split."""
        return "auto" in (self.lm_alpha, self.lm_beta)

    def problems(self) -> list[str]:
        out = (
            _in_range("evaluate.max_clips", self.max_clips, 0)
            + _in_range("evaluate.batch_size", self.batch_size, 1)
            + _in_range("evaluate.num_beams", self.num_beams, 1)
            + _in_range("evaluate.max_new_tokens", self.max_new_tokens, 1, 444)
            + _in_range("evaluate.outliers", self.outliers, 0)
            + _in_range("evaluate.lm_order", self.lm_order, 1, 10)
            + _in_range("evaluate.lm_top_k", self.lm_top_k, 0)
            + _in_range("evaluate.fusion_num_beams", self.fusion_num_beams, 2)
            + _in_range("evaluate.lm_dev_fraction", self.lm_dev_fraction, 0.0, 0.5)
            + _in_range("evaluate.max_terms", self.max_terms, 0)
            + self._aid_problems()
        )
        for name in ("prompt_file", "terms"):
            out += _file_problems(f"evaluate.{name}", getattr(self, name))
        for name in ("prompt_from", "exclude_from", "lm", "terms_from"):
            out += _file_problems(f"evaluate.{name}", getattr(self, name), corpus=True)
        return out

    def _aid_problems(self) -> list[str]:
        """Rules that tie the variants to the prompt, LM and term settings they need."""
        out = [
            f"evaluate.variants: unknown variant {v!r}{_suggest(v, EVALUATE_VARIANTS)}; use "
            + ", ".join(EVALUATE_VARIANTS)
            for v in self.variants
            if v not in EVALUATE_VARIANTS
        ]
        out += [
            f"evaluate.variants lists {v!r} twice" for v in sorted(set(self.variants)) if self.variants.count(v) > 1
        ]
        if sum(bool(p) for p in (self.prompt, self.prompt_file, self.prompt_from)) > 1:
            out.append("evaluate.prompt, prompt_file and prompt_from each give the prompt: set only one")
        if self.terms and self.terms_from:
            out.append("evaluate.terms and terms_from each give the term list: set only one")
        if self.exclude_from and not (self.prompt_from or self.terms_from):
            out.append("evaluate.exclude_from only filters the terms derived by prompt_from or terms_from: set one")
        if any("prompt" in v for v in self.variants) and not self.prompt_given:
            out.append("evaluate.variants asks for a prompt: set evaluate.prompt, prompt_file or prompt_from")
        if any("fusion" in v for v in self.variants) and not self.lm:
            out.append("evaluate.variants asks for fusion: set evaluate.lm (an ARPA file or a text corpus)")
        for name in ("lm_alpha", "lm_beta"):
            value = getattr(self, name)
            if value != "auto" and value < 0:
                out.append(f'evaluate.{name} = {value!r} must be "auto" or at least 0')
        if self.lm and self.fits_fusion and not self.lm_dev and not self.lm_dev_fraction:
            out.append(
                'evaluate.lm_alpha/lm_beta = "auto" needs a dev split: evaluate.lm_dev (an audio set) or '
                "evaluate.lm_dev_fraction > 0 (clips held out of the first set)"
            )
        if self.lm_top_k and self.lm_top_k < 2 * self.fusion_num_beams:
            out.append(
                f"evaluate.lm_top_k = {self.lm_top_k} is below 2 x evaluate.fusion_num_beams = "
                f"{2 * self.fusion_num_beams}, the candidates beam search keeps per step (0 = exactly that)"
            )
        return out


@dataclass(frozen=True)
class PipelineConfig:
    teacher: TeacherConfig
    data: DataConfig
    store: StoreConfig
    precompute: PrecomputeConfig
    tle: TLEArchitectureConfig
    train_tle: TrainTLEConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig

    def problems(self) -> list[str]:
        """Rules that span sections."""
        out = []
        if self.finetune.audio_store and self.finetune.audio_store == self.finetune.tts_store:
            out.append("finetune.audio_store and finetune.tts_store name the same store: give it once")
        return out

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML that `load_config` reads back to an equal object."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    def save(self, directory: str | Path, name: str = "config.toml") -> Path:
        """Write the resolved configuration beside a stage's outputs."""
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_toml(), encoding="utf-8")
        return path


SECTIONS: dict[str, type] = typing.get_type_hints(PipelineConfig)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(annotation))
    return {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}.get(
        annotation, str(annotation)
    )


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(ok, value converted to the annotation) — ints are accepted where floats are expected; a float must be
    finite (TOML reads inf and nan, which no setting can use: a learning rate of inf trains NaN)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_type,) = typing.get_args(annotation)
        converted = [_coerce(v, item_type) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, converted = _coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported config annotation {annotation!r}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); value is read as TOML, else taken as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError([f"--set {text!r} is not of the form section.key=value (e.g. store.frames=full)"], "--set")
    target, raw = text.split("=", 1)
    section, key = target.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"configuration file {path} does not exist"], str(path)) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{path} is not valid TOML: {err}"], str(path)) from None


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(base: dict[str, dict[str, Any]], layer: Mapping[str, Any], origin: str, problems: list[str]) -> None:
    """Overlay `layer` on `base` in place, recording unknown sections/keys with a suggestion."""
    for section, values in layer.items():
        if section not in SECTIONS:
            problems.append(f"{origin}: unknown section [{section}]{_suggest(section, list(SECTIONS))}")
            continue
        if not isinstance(values, Mapping):
            problems.append(f"{origin}: [{section}] must be a table of keys, got {values!r}")
            continue
        known = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key, value in values.items():
            if key not in known:
                problems.append(f"{origin}: unknown key {section}.{key}{_suggest(key, known)}")
            else:
                base.setdefault(section, {})[key] = value


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    updates: Mapping[str, Mapping[str, Any]] | None = None,
) -> PipelineConfig:
    """Defaults, then the file at `path`, then `updates` (CLI flags), then `--set` overrides (a `--set` beats a
    flag for the same key whatever their order on the command line: logged when their values differ).

    Raises ConfigError listing every unknown key, missing key, wrong type and broken rule.
    """
    problems: list[str] = []
    defaults: dict[str, dict[str, Any]] = {}
    _merge(defaults, _read_toml(DEFAULT_CONFIG_PATH), str(DEFAULT_CONFIG_PATH), problems)
    values = {section: dict(keys) for section, keys in defaults.items()}
    source = str(DEFAULT_CONFIG_PATH)
    if path is not None:
        source = str(path)
        _merge(values, _read_toml(Path(path)), str(path), problems)
    if updates:
        _merge(
            values,
            {s: {k: v for k, v in kv.items() if v is not None} for s, kv in updates.items()},
            "command-line option",
            problems,
        )
    parsed: dict[str, dict[str, Any]] = {}
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except ConfigError as err:
            problems += err.problems
            continue
        parsed.setdefault(section, {})[key] = value
    for section, keys in parsed.items():
        for key, value in keys.items():
            flag = (updates or {}).get(section, {}).get(key)
            if flag is not None and flag != value:
                log.warning(
                    "--set %s.%s=%r overrides the command-line option's %r (a --set wins over flags)",
                    section,
                    key,
                    value,
                    flag,
                )
    _merge(values, parsed, "--set", problems)

    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        given = values.get(section, {})
        kwargs, ok = {}, True
        for field in dataclasses.fields(cls):
            if field.name not in given:
                problems.append(f"{section}.{field.name} is missing (it has no default outside pipeline.toml)")
                ok = False
                continue
            good, converted = _coerce(given[field.name], hints[field.name])
            if not good:
                problems.append(
                    f"{section}.{field.name} = {given[field.name]!r} should be {_type_name(hints[field.name])}"
                )
                ok = False
                # Check the section's rules with the default in its place, so their problems are reported too.
                converted = _coerce(defaults.get(section, {}).get(field.name), hints[field.name])[1]
            kwargs[field.name] = converted
        if ok:
            sections[section] = cls(**kwargs)
            problems += sections[section].problems()
        elif len(kwargs) == len(hints):
            problems += cls(**kwargs).problems()
    if len(sections) == len(SECTIONS):
        config = PipelineConfig(**sections)
        problems += config.problems()
    if problems:
        raise ConfigError(problems, source)
    return config
