"""transformers Whisper checkpoint -> CTranslate2 (faster-whisper) model, verified, with a model card.

`export_ct2` converts through CTranslate2's own converter (`ctranslate2.converters.TransformersConverter`)
and writes the folder faster-whisper loads::

    OUT/  model.bin                  weights in CTranslate2's format, at the chosen quantization
          config.json                suppress lists, alignment heads, language ids (as the converter writes them)
          vocabulary.json            the token list, timestamp tokens included
          tokenizer.json             copied from MODEL (faster-whisper tokenizes with it)
          preprocessor_config.json   copied from MODEL (mel bins, window; faster-whisper reads it)
          README.md                  the model card (`model_card`)

Then `verify_ct2` transcribes the same log-mel windows greedily with `ctranslate2.models.Whisper` on
CPU and with transformers' `generate`, and compares the token ids clip by clip. float32, float16 and
bfloat16 exports must agree exactly: CTranslate2 computes them in float32 on CPU, and the transformers
reference holds the same rounded weights. Integer quantizations (int8*, int16) compute differently, so
their agreement rate is reported, not required. The output is written to a hidden sibling folder and
renamed into place only after the check passes: a failed export leaves nothing at OUT.

ctranslate2 is an optional dependency (``pip install 'whistle[ct2]'``), imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whistle_pipeline.ct2 import PROVENANCE_FILE, read_model_bin
from whistle_pipeline.errors import WhistleError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16")
EXACT_QUANTIZATIONS = ("float32", "float16", "bfloat16")  # same weights as a transformers model rounded alike
COPIED_FILES = ("tokenizer.json", "preprocessor_config.json")  # what faster-whisper reads beside model.bin
CARD_FILE = "README.md"
FILE_MODE = 0o644  # ordinary: readable by all, as any downloaded model
INSTALL_HINT = "pip install 'whistle[ct2]'"
FINETUNE_SUMMARY = "finetune.json"  # stages.finetune_result.SUMMARY (not imported: it would load torch for a card)
FINETUNE_CONFIG = "config.toml"
EVALUATION_TABLE = "table.md"  # written by `whistle evaluate`
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aiff", ".aif")
SYNTHETIC_CLIPS = 4
SAMPLE_RATE = 16000  # Whisper's


class ExportError(WhistleError):
    """A checkpoint that cannot be exported to CTranslate2, or an export that failed its check."""


@dataclass(frozen=True)
class Verification:
    """Greedy token ids of CTranslate2 vs transformers on the same log-mel windows."""

    inputs: str  # "N synthetic clips" or the audio path
    clips: int
    identical: int  # clips whose token ids are equal
    exact_required: bool  # float exports: every clip must agree
    compute_type: str  # CTranslate2's, on CPU
    max_new_tokens: int
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # clip, first differing position, both ids

    @property
    def rate(self) -> float:
        return self.identical / self.clips if self.clips else math.nan

    @property
    def passed(self) -> bool:
        return self.identical == self.clips or not self.exact_required

    def summary(self) -> str:
        need = "exact match required" if self.exact_required else "integer quantization: agreement reported"
        return (
            f"greedy token ids, ctranslate2 ({self.compute_type}, CPU) vs transformers: {self.identical} of "
            f"{self.clips} clips identical ({self.rate:.0%}) on {self.inputs} ({need})"
        )


@dataclass(frozen=True)
class ExportResult:
    output_dir: str
    model_dir: str
    quantization: str
    base_model: str
    files: dict[str, int]  # name -> bytes
    verification: Verification | None
    seconds: float

    def summary(self) -> str:
        size = sum(self.files.values()) / 1e6
        lines = [
            (
                f"wrote {self.output_dir} (CTranslate2 Whisper, {self.quantization}, {size:.1f} MB) from "
                f"{self.model_dir} in {self.seconds:.1f} s"
            ),
            f"  files: {', '.join(sorted(self.files))}",
        ]
        if self.verification is not None:
            lines.append(f"  {self.verification.summary()}")
        lines.append(f"  use it: faster_whisper.WhisperModel('{self.output_dir}', device='cpu', compute_type='int8')")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_ctranslate2() -> Any:
    try:
        import ctranslate2
    except ImportError:
        raise ExportError(f"exporting to CTranslate2 needs the ctranslate2 package: {INSTALL_HINT}") from None
    return ctranslate2


# ---- checks --------------------------------------------------------------------------------------------


def check_model_dir(model_dir: Path) -> list[str]:
    """What keeps `model_dir` from being exported: every problem, each naming the path and the fix."""
    if not model_dir.is_dir():
        return [
            (
                f"MODEL {model_dir} is not a folder: give a Whisper checkpoint folder (a `whistle finetune` or "
                "`whistle import-ct2` output, or any save_pretrained Whisper)"
            )
        ]
    config_path = model_dir / "config.json"
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        return [
            (
                f"MODEL {model_dir} has no config.json, so it is not a transformers checkpoint: give a Whisper "
                "folder written by save_pretrained"
            )
        ]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        return [f"{config_path} is not a JSON object ({err}); write the checkpoint again with save_pretrained"]
    problems = []
    if model_type != "whisper":
        problems.append(
            f"MODEL {model_dir} holds a {model_type!r} model (config.json model_type), not Whisper; "
            "export-ct2 converts Whisper checkpoints only"
        )
    if not any(model_dir.glob("*.safetensors")):
        problems.append(
            f"MODEL {model_dir} has no *.safetensors weights; save the model with save_pretrained "
            "(safetensors is its default)"
        )
    for name in COPIED_FILES:
        if not (model_dir / name).is_file():
            problems.append(
                f"MODEL {model_dir} lacks {name}, which faster-whisper needs beside model.bin; save the "
                "model's WhisperProcessor into the folder (processor.save_pretrained(MODEL))"
            )
    return problems


def check_output_dir(model_dir: Path, out_dir: Path, overwrite: bool) -> list[str]:
    """OUT may not be MODEL, lie inside it or contain it (never overwrite an input), nor exist without overwrite."""
    model, out = model_dir.resolve(), out_dir.resolve()
    if out == model:
        return [f"OUT {out_dir} is MODEL itself; write the export to a new folder (e.g. {out_dir}-ct2)"]
    if out.is_relative_to(model):
        return [f"OUT {out_dir} lies inside MODEL {model_dir}; write the export outside the checkpoint folder"]
    if model.is_relative_to(out):
        return [
            (
                f"OUT {out_dir} contains MODEL {model_dir}, so --overwrite would delete the input; choose an "
                "OUT outside it"
            )
        ]
    if out_dir.exists() and not overwrite:
        return [f"OUT {out_dir} exists; choose another folder or pass --overwrite to replace it"]
    if out_dir.exists() and not out_dir.is_dir():
        return [f"OUT {out_dir} is a file, not a folder; choose another path"]
    return []


# ---- conversion ----------------------------------------------------------------------------------------


def _converter(model_dir: Path) -> Any:
    """CTranslate2's TransformersConverter, with one transformers 5 gap closed.

    transformers 5 renamed the tokenizer's `additional_special_tokens` to `extra_special_tokens`.
    CTranslate2's Whisper loader reads the old name to list the language tokens of a model whose
    generation config has no `lang_to_id` (English-only checkpoints), and would write no lang_ids.
    The weights are read from safetensors only (never a pickled pytorch_model.bin).
    """
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            return super().load_model(model_class, model_name_or_path, use_safetensors=True, **kwargs)

        def load_tokenizer(self, tokenizer_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            tokenizer = super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
            if not hasattr(tokenizer, "additional_special_tokens"):
                tokenizer.additional_special_tokens = list(getattr(tokenizer, "extra_special_tokens", None) or [])
            return tokenizer

    return Converter(str(model_dir), copy_files=list(COPIED_FILES))


def convert(model_dir: Path, out_dir: Path, quantization: str) -> None:
    """Run CTranslate2's converter into `out_dir` (replaced if it exists)."""
    try:
        _converter(model_dir).convert(str(out_dir), quantization=quantization, force=True)
    except (ValueError, NotImplementedError, RuntimeError, OSError) as err:
        raise ExportError(f"CTranslate2's converter failed on {model_dir}: {err}") from err


# ---- verification --------------------------------------------------------------------------------------


def synthetic_clips(n: int = SYNTHETIC_CLIPS, seconds: float = 8.0, seed: int = 0) -> list[np.ndarray]:
    """`n` clips of tones, chirps and noise at 16 kHz: deterministic inputs that need no audio files."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE  # (N,)
    clips = []
    for i in range(n):
        base = rng.uniform(100.0, 400.0)
        tone = 0.25 * np.sin(2 * np.pi * (base + 40.0 * i * t) * t) * (np.sin(2 * np.pi * (1 + i) * t) > 0)
        clips.append((tone + 0.02 * (1 + i) * rng.standard_normal(t.size)).astype(np.float32))
    return clips


def read_verification_audio(path: str | Path, max_clips: int = 16) -> list[np.ndarray]:
    """Clips at 16 kHz from an audio file, a folder of audio files, or a manifest precompute accepts."""
    from whistle_pipeline.audio import load_audio

    path = Path(path)
    window_seconds = 30.0
    if path.is_dir() and not any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)[:max_clips]
        if not files:
            raise ExportError(f"--verify-audio {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
        return [load_audio(f, SAMPLE_RATE, max_seconds=window_seconds) for f in files]
    if path.suffix.lower() in AUDIO_SUFFIXES:
        return [load_audio(path, SAMPLE_RATE, max_seconds=window_seconds)]
    from whistle_pipeline.config import load_config
    from whistle_pipeline.sources import Clip, open_source

    source = open_source(load_config(None, updates={"data": {"path": str(path), "max_clips": max_clips}}).data)
    items = [item for item in source if isinstance(item, Clip)]
    if len(items) < len(source):
        log.warning("%s: %d of %d rows unusable, verifying on the rest", path, len(source) - len(items), len(source))
    if not items:
        raise ExportError(f"--verify-audio {path}: no usable rows ({source.describe()})")
    return [
        load_audio(item.audio, SAMPLE_RATE, max_seconds=window_seconds, name=item.audio_name, segment=item.segment)
        for item in items
    ]


def log_mel(model_dir: str | Path, clips: Sequence[np.ndarray]) -> np.ndarray:
    """The model's own feature extractor over `clips`: (N, n_mels, frames) float32, padded to the window."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(model_dir)
    features = extractor(list(clips), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    return np.ascontiguousarray(features, dtype=np.float32)


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def verify_ct2(
    model_dir: str | Path,
    ct2_dir: str | Path,
    features: np.ndarray,
    *,
    inputs: str = "given features",
    language: str = "en",
    max_new_tokens: int = 224,
    batch_size: int = 8,
) -> Verification:
    """Greedy-transcribe `features` (N, n_mels, frames) with both runtimes on CPU and compare the token ids.

    The prompt is <|startoftranscript|> (+ <|language|><|transcribe|> for multilingual models)
    <|notimestamps|> on both sides; the model's suppress lists apply on both. CTranslate2 generates
    max_length // 2 new tokens, so it gets 2 * max_new_tokens; both stop at the end-of-text token.
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    ctranslate2 = _require_ctranslate2()
    quantization = stored_weight_type(ct2_dir)
    exact = quantization in EXACT_QUANTIZATIONS
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    if quantization in ("float16", "bfloat16"):  # the reference holds the exported (rounded) weights
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(getattr(torch, quantization)).float())
    generation = model.generation_config
    prompt = [generation.decoder_start_token_id]
    options: dict[str, Any] = {}
    if getattr(generation, "lang_to_id", None):
        if f"<|{language}|>" not in generation.lang_to_id:
            raise ExportError(
                f"{model_dir}: the generation config's lang_to_id has no <|{language}|>; verify in one "
                f"of {', '.join(sorted(generation.lang_to_id)[:8])}, ..."
            )
        prompt += [generation.lang_to_id[f"<|{language}|>"], generation.task_to_id["transcribe"]]
        options = {"language": language, "task": "transcribe"}
    prompt.append(generation.no_timestamps_token_id)
    new_tokens = min(max_new_tokens, model.config.max_target_positions // 2 - len(prompt))
    compute_type = "float32" if exact else "int16" if quantization == "int16" else "int8_float32"
    runtime = ctranslate2.models.Whisper(
        str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=torch.get_num_threads()
    )
    identical, mismatches = 0, []
    for start in range(0, len(features), batch_size):
        batch = np.ascontiguousarray(features[start : start + batch_size], dtype=np.float32)  # (B, n_mels, frames)
        with torch.inference_mode():
            # transformers returns the new tokens only, padded with end-of-text
            expected = model.generate(
                torch.from_numpy(batch), num_beams=1, do_sample=False, max_new_tokens=new_tokens, **options
            ).tolist()
        results = runtime.generate(
            ctranslate2.StorageView.from_array(batch),
            [prompt] * len(batch),
            beam_size=1,
            max_length=2 * new_tokens,
            suppress_tokens=[-1],
        )
        for offset, (hf_ids, result) in enumerate(zip(expected, results)):
            hf_ids = _until_eos(hf_ids, generation.eos_token_id)
            ct2_ids = _until_eos(result.sequences_ids[0], generation.eos_token_id)
            if hf_ids == ct2_ids:
                identical += 1
                continue
            position = next(
                (i for i, (a, b) in enumerate(zip(hf_ids, ct2_ids)) if a != b), min(len(hf_ids), len(ct2_ids))
            )
            mismatches.append(
                {"clip": start + offset, "position": position, "transformers": hf_ids, "ctranslate2": ct2_ids}
            )
    return Verification(inputs, len(features), identical, exact, compute_type, new_tokens, mismatches)


def stored_weight_type(ct2_dir: str | Path) -> str:
    """How model.bin stores the layer weights: float32, float16, bfloat16, int8 or int16.

    (int8_float16 and friends store int8 matrices; their suffix is the type of everything else.)
    """
    weights = read_model_bin(Path(ct2_dir) / "model.bin")
    return weights.dtype_name("decoder/layer_0/ffn/linear_0/weight")


# ---- the model card ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def base_model(model_dir: Path) -> str:
    """What the checkpoint was made from: finetune's teacher, import-ct2's source, or config's name."""
    teacher = _read_toml(model_dir / FINETUNE_CONFIG).get("teacher", {})
    if teacher.get("name_or_path"):
        revision = teacher.get("revision")
        return teacher["name_or_path"] + (f" (revision {revision})" if revision and revision != "main" else "")
    imported = _read_json(model_dir / PROVENANCE_FILE)
    if imported:
        return f"{imported.get('package') or imported.get('source')} (CTranslate2, imported by whistle import-ct2)"
    return _read_json(model_dir / "config.json").get("_name_or_path") or "unknown (a save_pretrained Whisper)"


def _method(settings: dict[str, Any]) -> str:
    text = 1.0 - settings.get("audio_ratio", 0.0) - settings.get("tts_ratio", 0.0)
    shares = (
        ("TLE text", text),
        ("stored audio", settings.get("audio_ratio", 0.0)),
        ("TTS audio", settings.get("tts_ratio", 0.0)),
    )
    parts = [f"{name} {ratio:.0%}" for name, ratio in shares if ratio > 1e-9]
    kind = (
        "WhisTLE (text-only domain adaptation through a text-to-latent encoder)"
        if text > 1e-9 and not settings.get("tts_ratio")
        else "WhisTLE + TTS"
        if text > 1e-9
        else "fine-tuning on stored audio"
    )
    return f"{kind}; decoder fine-tuned, encoder unchanged; each batch: {', '.join(parts)}"


def _finetune_section(model_dir: Path) -> list[str]:
    summary = _read_json(model_dir / FINETUNE_SUMMARY)
    settings = _read_toml(model_dir / FINETUNE_CONFIG).get("finetune", {})
    if not summary and not settings:
        return []
    lines = ["## Training", ""]
    if settings:
        lines.append(f"- Method: {_method(settings)}")
        for key, label in (("text", "Target-domain text"), ("audio_store", "Audio store"), ("tts_store", "TTS store")):
            if settings.get(key):
                lines.append(f"- {label}: `{settings[key]}`")
    if summary:
        for key, label in (
            ("train_examples", "Training data"),
            ("held_out", "Held out"),
            ("examples_seen", "Examples trained on"),
        ):
            if summary.get(key):
                lines.append(f"- {label}: " + ", ".join(f"{n} {kind}" for kind, n in summary[key].items()))
        lines.append(
            f"- Steps: {summary.get('steps')}; saved step {summary.get('saved_step')} "
            f"(best by {summary.get('select_by')}: step {summary.get('best_step')})"
        )
        saved = [row for row in summary.get("validation", []) if row.get("step") == summary.get("saved_step")]
        if saved:
            shown = {
                k: v
                for k, v in saved[0].items()
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
            }
            lines += [
                "",
                "Validation at the saved step:",
                "",
                "| " + " | ".join(shown) + " |",
                "|" + "---|" * len(shown),
                "| " + " | ".join(f"{v:.4g}" for v in shown.values()) + " |",
            ]
    if (model_dir / FINETUNE_CONFIG).is_file():
        lines += ["", f"The resolved configuration of the run is in `{FINETUNE_CONFIG}` of the source checkpoint."]
    return lines + [""]


def model_card(
    model_dir: str | Path,
    *,
    quantization: str | None = None,
    verification: Verification | None = None,
    evaluation: str | Path | None = None,
    title: str | None = None,
) -> str:
    """A README.md for a model folder made from `model_dir`.

    Reads what is there: finetune's config.toml and finetune.json (base model, method, data sizes,
    validation), import-ct2's provenance, an evaluation table (`evaluation`: a `whistle evaluate`
    output folder or its table.md; by default MODEL/table.md if present). With `quantization` the
    card describes a CTranslate2 export and how to load it with faster-whisper; without, the
    transformers checkpoint itself.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    lines = [
        f"# {title or model_dir.name}",
        "",
        (
            f"Whisper for CTranslate2 / faster-whisper, exported by whistle from `{model_dir.name}`."
            if quantization
            else "Whisper (transformers checkpoint), made with whistle."
        ),
        "",
        f"- Base model: {base_model(model_dir)}",
    ]
    if config:
        languages = "multilingual" if config.get("vocab_size", 0) >= 51865 else "English-only"
        lines.append(
            f"- Architecture: d_model {config.get('d_model')}, {config.get('encoder_layers')} encoder + "
            f"{config.get('decoder_layers')} decoder layers, {config.get('num_mel_bins')} mel bins, "
            f"vocabulary {config.get('vocab_size')} ({languages})"
        )
    if quantization:
        lines.append(
            f"- Weights: {quantization} (CTranslate2 `model.bin`, converted by CTranslate2's TransformersConverter)"
        )
    if verification is not None:
        lines.append(f"- Verified: {verification.summary()}")
    elif quantization:
        lines.append("- Verified: no (exported with --no-verify: not compared with transformers)")
    lines.append("")
    lines += _finetune_section(model_dir)
    table = Path(evaluation) if evaluation else model_dir / EVALUATION_TABLE
    if table.is_dir():
        table = table / EVALUATION_TABLE
    if table.is_file():
        lines += ["## Evaluation", "", table.read_text(encoding="utf-8").strip(), ""]
    lines += ["## Use", ""]
    if quantization:
        lines += [
            "```python",
            "from faster_whisper import WhisperModel",
            "",
            (
                'model = WhisperModel("path/to/this/folder", device="cpu", compute_type="int8")  '
                '# or device="cuda", compute_type="float16"'
            ),
            'segments, info = model.transcribe("clip.wav", beam_size=5)',
            'print(" ".join(segment.text for segment in segments))',
            "```",
            "",
            (
                "`compute_type` converts the stored weights when the model loads; the stored type only sets "
                "the file size and the precision available."
            ),
            "",
        ]
    else:
        lines += [
            "```python",
            "from transformers import pipeline",
            "",
            'asr = pipeline("automatic-speech-recognition", model="path/to/this/folder")',
            'print(asr({"raw": audio, "sampling_rate": 16000})["text"])  # audio: float32 mono array',
            "```",
            "",
        ]
    return "\n".join(lines)


# ---- the export ----------------------------------------------------------------------------------------


def export_ct2(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    quantization: str = "float16",
    overwrite: bool = False,
    verify: bool = True,
    verify_audio: str | Path | None = None,
    evaluation: str | Path | None = None,
) -> ExportResult:
    """Convert `model_dir` into a faster-whisper folder at `out_dir`, check it, and write its card.

    `verify_audio` (an audio file, folder or manifest) replaces the synthetic clips of the check.
    """
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    problems = (
        []
        if quantization in QUANTIZATIONS
        else [f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"]
    )
    problems += check_model_dir(model_dir) + check_output_dir(model_dir, out_dir, overwrite)
    if evaluation is not None and not Path(evaluation).exists():
        problems.append(
            f"--evaluation {evaluation} does not exist; give a `whistle evaluate` output folder or its "
            f"{EVALUATION_TABLE}"
        )
    if verify_audio is not None and not verify:
        problems.append("--verify-audio was given with --no-verify; drop one of them")
    elif verify_audio is not None and not Path(verify_audio).exists():
        problems.append(f"--verify-audio {verify_audio} does not exist; give an audio file, folder or manifest")
    if problems:
        raise ExportError("cannot export:\n  - " + "\n  - ".join(problems))
    _require_ctranslate2()
    clips = read_verification_audio(verify_audio) if verify and verify_audio else synthetic_clips()
    inputs = f"{len(clips)} clip(s) of {verify_audio}" if verify_audio else f"{len(clips)} synthetic clips"

    partial = out_dir.with_name(f".{out_dir.name}.partial")
    try:
        convert(model_dir, partial, quantization)
        verification = verify_ct2(model_dir, partial, log_mel(model_dir, clips), inputs=inputs) if verify else None
        if verification is not None and not verification.passed:
            first = verification.mismatches[0]
            raise ExportError(
                f"the {quantization} export of {model_dir} transcribes differently from transformers on "
                f"{verification.clips - verification.identical} of {verification.clips} clips (first: clip "
                f"{first['clip']}, token {first['position']}: transformers {first['transformers'][:12]} vs "
                f"ctranslate2 {first['ctranslate2'][:12]}); nothing was written to {out_dir}. Please report this "
                "with the versions of transformers and ctranslate2."
            )
        (partial / CARD_FILE).write_text(
            model_card(
                model_dir,
                quantization=quantization,
                verification=verification,
                evaluation=evaluation,
                title=out_dir.name,
            ),
            encoding="utf-8",
        )
        for path in partial.iterdir():
            os.chmod(path, FILE_MODE)
    except BaseException:  # a failed or interrupted export leaves nothing behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return ExportResult(
        output_dir=str(out_dir),
        model_dir=str(model_dir),
        quantization=quantization,
        base_model=base_model(model_dir),
        files={p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
        verification=verification,
        seconds=time.perf_counter() - started,
    )
