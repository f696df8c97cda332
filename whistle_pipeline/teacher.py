"""The frozen Whisper teacher: one loader, its geometry, and log-mel features in torch.

    teacher = load_teacher("openai/whisper-large-v3", "main", "encoder", "cuda", torch.bfloat16)
    states = teacher_states(teacher.model, audio, teacher.geometry)  # (B, N) 16 kHz -> (B, 1500, 1280)
    n = speech_frames(audio_samples, teacher.geometry, margin=2)     # frames covering the clip

`load_teacher` is the one way every stage loads a Whisper: part "encoder" (precompute: the decoder,
half of the parameters, is never instantiated), "decoder" (train-tle: the encoder is dropped) or
"full" (finetune, evaluate). One revision policy: a hub revision is resolved to its commit once, and
config, feature extractor, tokenizer and weights are all read at that commit; a local folder has none.
Geometry is read from the checkpoint (config.json + preprocessor_config.json), never assumed:
80 mel bins before large-v3 and 128 after, d_model 384..1280.

What a store (or a TLE trained on one) records of its teacher is a `store.TeacherInfo`, with a
fingerprint of the encoder's weights (`encoder_fingerprint`) and, for a hub name, the commit read;
`check_teacher` compares one with the teacher given now: another geometry or other encoder weights
are refused, another name or revision of the same weights is fine (they may live in another folder).
A checkpoint with inf/nan weights is refused at load (`check_finite_weights`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from accelerate import PartialState
from torch import nn
from transformers import AutoTokenizer, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file, extract_commit_hash
from transformers.utils.hub import resolve_revision as hub_resolve_revision

from store.spec import FieldDifference, TeacherInfo
from whistle_pipeline.errors import WhistleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherGeometry:
    """Audio and frame geometry of a Whisper checkpoint (values for large-v3 in comments)."""

    sample_rate: int  # 16000 Hz
    n_fft: int  # 400 samples per STFT window
    hop_length: int  # 160 samples between mel frames
    n_mels: int  # 128 (80 before large-v3)
    max_frames: int  # 1500 encoder frames per 30 s window
    frames_per_second: int  # 50
    samples_per_frame: int  # 320 = hop_length * the conv stack's stride of 2
    d_model: int  # 1280

    @classmethod
    def from_pretrained(cls, config: WhisperConfig, features: WhisperFeatureExtractor) -> TeacherGeometry:
        """Derive the geometry from a model config and its feature extractor, checking they agree."""
        mel_frames = features.n_samples // features.hop_length  # 3000
        problems = []
        if features.feature_size != config.num_mel_bins:
            problems.append(
                f"the feature extractor makes {features.feature_size} mel bins, "
                f"the encoder expects {config.num_mel_bins}"
            )
        if mel_frames % config.max_source_positions:
            problems.append(
                f"{mel_frames} mel frames per window do not divide into {config.max_source_positions} encoder frames"
            )
        samples_per_frame = features.n_samples // config.max_source_positions
        if features.n_samples % config.max_source_positions or features.sampling_rate % samples_per_frame:
            problems.append(
                f"{features.n_samples} samples per window and {features.sampling_rate} Hz do not give a "
                f"whole number of samples per encoder frame and frames per second"
            )
        if problems:
            raise WhistleError("the Whisper checkpoint is inconsistent: " + "; ".join(problems))
        return cls(
            sample_rate=features.sampling_rate,
            n_fft=features.n_fft,
            hop_length=features.hop_length,
            n_mels=config.num_mel_bins,
            max_frames=config.max_source_positions,
            frames_per_second=features.sampling_rate // samples_per_frame,
            samples_per_frame=samples_per_frame,
            d_model=config.d_model,
        )

    @classmethod
    def from_config(cls, config: WhisperConfig) -> TeacherGeometry:
        """The geometry of a model whose feature extractor is Whisper's standard one for its mel bins."""
        return cls.from_pretrained(config, WhisperFeatureExtractor(feature_size=config.num_mel_bins))

    @property
    def n_samples(self) -> int:
        """Samples in one input window (480000 = 30 s)."""
        return self.max_frames * self.samples_per_frame

    @property
    def mel_frames(self) -> int:
        """Mel frames in one input window (3000)."""
        return self.n_samples // self.hop_length

    @property
    def window_seconds(self) -> float:
        return self.n_samples / self.sample_rate

    def record(self, name_or_path: str, resolved_revision: str, encoder_fingerprint: str = "") -> TeacherInfo:
        """The store's record of this teacher (`store.TeacherInfo`), the same from every stage: a local folder
        by its absolute path (revision ""), a hub name with its commit; `encoder_fingerprint` names the weights."""
        local = os.path.isdir(name_or_path)
        return TeacherInfo(
            name_or_path=os.path.abspath(name_or_path) if local else name_or_path,
            revision=resolved_revision,
            d_model=self.d_model,
            n_mels=self.n_mels,
            sample_rate=self.sample_rate,
            samples_per_frame=self.samples_per_frame,
            frames_per_second=self.frames_per_second,
            max_frames=self.max_frames,
            encoder_fingerprint=encoder_fingerprint,
        )


class TeacherEncoder(WhisperEncoder):
    """Whisper's encoder, loadable from a full Whisper checkpoint: the decoder's weights are skipped."""

    _keys_to_ignore_on_load_unexpected = [r"(^|\.)decoder\.", r"^proj_out\."]


# A full checkpoint names encoder weights model.encoder.* (WhisperForConditionalGeneration) or encoder.*
# (WhisperModel); a saved encoder has no prefix.
ENCODER_PREFIX = re.compile(r"^(model\.)?encoder\.")
_ENCODER_KEYS = {ENCODER_PREFIX.pattern: ""}


def resolve_revision(name_or_path: str, revision: str) -> str:
    """The revision to record for a checkpoint: the hub commit `revision` points to ("" for a local folder).

    Falls back to `revision` itself when the hub cannot be asked (offline); loading then uses the cache.
    """
    if os.path.isdir(name_or_path):
        return ""
    resolved = hub_resolve_revision(name_or_path, revision or None)
    return getattr(resolved, "resolved", None) or resolved or revision


def resolve_device(name: str) -> torch.device:
    """`teacher.device` -> torch device: "auto" is accelerate's device for this process (a GPU when there is one)."""
    if name == "auto":
        return PartialState().device
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`teacher.dtype` -> torch dtype. "auto": bfloat16 on GPUs that have it, else float16; float32 on CPU."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        log.info("this GPU has no bfloat16: the encoder runs in float16")
        return torch.float16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): there the encoder runs ~1.7x
    faster in bfloat16 than in float32 (tiny.en on a 2-core AMD EPYC), at the precision GPUs use by default."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def bf16_hint(device: str, dtype: str, setting: str) -> str:
    """A summary's note for float32 work on a CPU that computes bfloat16 in hardware ("" anywhere else): how
    much faster `setting` would run it. Only a hint: "auto" stays float32 on a CPU, as documented."""
    if device != "cpu" or dtype != "float32" or not cpu_has_native_bf16():
        return ""
    return (
        f"this CPU computes bfloat16 in hardware: {setting} would run about 1.5-1.7x faster "
        "(bench/RESULTS.md; the demo does)"
    )


TeacherPart = Literal["encoder", "decoder", "full"]


@dataclass
class LoadedTeacher:
    """A Whisper checkpoint as `load_teacher` gives it: frozen, in eval mode, on its device."""

    model: Any  # part "encoder": TeacherEncoder; "decoder" / "full": WhisperForConditionalGeneration
    geometry: TeacherGeometry
    info: TeacherInfo  # what a store records of this teacher (resolved revision, absolute local path)
    features: WhisperFeatureExtractor
    tokenizer: Any | None  # None for part "encoder"


def load_teacher(
    name_or_path: str,
    revision: str = "main",
    part: TeacherPart = "full",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    attn: str = "sdpa",
) -> LoadedTeacher:
    """Load a Whisper checkpoint (hub name or folder) for `part`; weights from safetensors only.

    "encoder": the encoder alone (the decoder is never instantiated); "decoder": the whole model with
    its encoder dropped (encoder states come from a store or a TLE), which frees its memory; "full":
    the whole model. `revision` (branch, tag or commit) applies to hub names and is resolved to one
    commit. A checkpoint without preprocessor_config.json gets Whisper's standard extractor for its mel
    bins (logged). `dtype`: a torch dtype or a `teacher.dtype` name. Every weight is frozen; a stage
    that trains some turns them back on. Raises WhistleError when the checkpoint cannot be read.
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    resolved = resolve_revision(name_or_path, revision)
    at = resolved or None  # one commit for config, extractor, tokenizer and weights
    config = whisper_config(name_or_path, at)
    features = feature_extractor(name_or_path, at, config.num_mel_bins)
    geometry = TeacherGeometry.from_pretrained(config, features)
    if part == "encoder":
        model, tokenizer = _encoder(name_or_path, at, config, dtype, attn), None
    else:
        try:
            model = WhisperForConditionalGeneration.from_pretrained(
                name_or_path, revision=at, config=config, dtype=dtype, attn_implementation=attn, use_safetensors=True
            )  # never a pickle
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=at)
        except (OSError, ValueError) as err:
            raise WhistleError(
                f"cannot load the Whisper model {name_or_path!r} (revision {revision!r}): {err}. Give a hub name or "
                "a folder written by save_pretrained or `whistle import-ct2` (teacher.name_or_path), with its "
                "tokenizer."
            ) from err
        if part == "decoder":
            model.model.encoder = None
    check_finite_weights(model, f"the Whisper checkpoint {name_or_path!r}")
    files = weight_files(name_or_path, at)
    if not os.path.isdir(name_or_path):  # the commit of the snapshot read, even when the hub could not be asked
        resolved = extract_commit_hash(files[0], None) or resolved
    model.requires_grad_(False)
    return LoadedTeacher(
        model.to(device).eval(),
        geometry,
        geometry.record(name_or_path, resolved, encoder_fingerprint(files)),
        features,
        tokenizer,
    )


def check_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse a model (a Whisper, a TLE) with inf/nan weights: it saw a run that diverged or a damaged file,
    and could only ever give NaN. One pass over the weights, one host sync."""
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point() and t.numel()}
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    bad = [name for name, ok in zip(tensors, finite) if not ok]
    if bad:
        raise WhistleError(
            f"{what} has non-finite weights: {len(bad)} of its {len(tensors)} tensors hold inf/nan (e.g. "
            f"{', '.join(bad[:3])}). It was saved by a training run that diverged, or its file is damaged: use "
            "another checkpoint (one saved before the divergence) or train it again."
        )


def weight_files(name_or_path: str, revision: str | None) -> list[str]:
    """The checkpoint's safetensors files (the one file, or the shards of its index), local or in the hub cache."""
    single = cached_file(
        name_or_path, SAFE_WEIGHTS_NAME, revision=revision, _raise_exceptions_for_missing_entries=False
    )
    if single:
        return [single]
    index = cached_file(
        name_or_path, SAFE_WEIGHTS_INDEX_NAME, revision=revision, _raise_exceptions_for_missing_entries=False
    )
    if not index:
        raise WhistleError(f"{name_or_path!r} has no {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}")
    with open(index, encoding="utf-8") as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    return [cached_file(name_or_path, shard, revision=revision) for shard in shards]


HASH_BLOCK = 16 * 2**20  # bytes read per hash update


def encoder_fingerprint(files: Sequence[str]) -> str:
    """sha256 of the encoder's weights as stored in safetensors `files`: each tensor's name (without its
    model./encoder. prefix, so a saved encoder alone gives the same), dtype, shape and bytes, by name.

    The weights' own bytes, not the headers and sizes: another model of the same size (a fine-tuned one, a
    replaced folder) has the same headers. Only the encoder's bytes are read (1.3 GB of large-v3's 3.1 GB,
    about a second, from the page cache the load just filled); the decoder may change (finetune changes
    only it) without changing what a store holds. Depends on content only: the same weights in another
    folder, or loaded in another dtype, give the same fingerprint.
    """
    tensors: dict[str, tuple[str, int, dict[str, Any]]] = {}  # name -> (file, data start, header entry)
    for path in files:
        try:
            with open(path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, ValueError, struct.error) as err:
            raise WhistleError(f"cannot read the safetensors header of {path}: {err}") from err
        tensors.update({name: (path, 8 + size, entry) for name, entry in header.items() if name != "__metadata__"})
    encoder = {ENCODER_PREFIX.sub("", name): value for name, value in tensors.items() if ENCODER_PREFIX.match(name)}
    digest = hashlib.sha256()
    for name, (path, start, entry) in sorted((encoder or tensors).items()):  # a saved encoder has no prefix
        digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
        begin, end = entry["data_offsets"]
        with open(path, "rb") as handle:
            handle.seek(start + begin)
            while begin < end:
                block = handle.read(min(HASH_BLOCK, end - begin))
                if not block:
                    raise WhistleError(f"{path} ends inside tensor {name}: the file is truncated")
                digest.update(block)
                begin += len(block)
    return digest.hexdigest()


def whisper_config(name_or_path: str, revision: str | None) -> WhisperConfig:
    """The checkpoint's config.json, which must be a Whisper's."""
    try:
        config = WhisperConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as err:
        raise WhistleError(
            f"cannot read a Whisper config from {name_or_path!r} (revision {revision}): {err}. Give a hub name "
            "such as openai/whisper-large-v3 or a folder written by save_pretrained / `whistle import-ct2`."
        ) from err
    if config.model_type != "whisper":
        raise WhistleError(f"{name_or_path!r} is a {config.model_type!r} model, not Whisper")
    return config


def feature_extractor(name_or_path: str, revision: str | None, n_mels: int) -> WhisperFeatureExtractor:
    """The checkpoint's feature extractor, or Whisper's standard one for its mel bins when it has none."""
    try:
        return WhisperFeatureExtractor.from_pretrained(name_or_path, revision=revision)
    except OSError:
        log.warning(
            "%s has no preprocessor_config.json: using Whisper's standard %d-bin feature extractor",
            name_or_path,
            n_mels,
        )
        return WhisperFeatureExtractor(feature_size=n_mels)


def _encoder(
    name_or_path: str, revision: str | None, config: WhisperConfig, dtype: torch.dtype, attn: str
) -> TeacherEncoder:
    """The encoder's weights alone from a full checkpoint (or a saved encoder)."""
    try:
        encoder, info = TeacherEncoder.from_pretrained(
            name_or_path,
            revision=revision,
            config=config,
            dtype=dtype,
            attn_implementation=attn,
            key_mapping=_ENCODER_KEYS,
            output_loading_info=True,
            use_safetensors=True,
        )
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: weights of other shapes than the config's
        raise WhistleError(f"cannot load the Whisper encoder from {name_or_path!r}: {err}") from err
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise WhistleError(
            f"{name_or_path!r} holds no complete Whisper encoder: {len(missing)} weight(s) missing "
            f"(e.g. {', '.join(missing[:3])}). Point teacher.name_or_path at a full Whisper checkpoint."
        )
    return encoder


def load_encoder(
    name_or_path: str,
    revision: str = "main",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    attn: str = "sdpa",
) -> tuple[TeacherEncoder, TeacherGeometry]:
    """(encoder, geometry): load_teacher(part="encoder"), the library's short form for teacher_states."""
    teacher = load_teacher(name_or_path, revision, "encoder", device, dtype, attn)
    return teacher.model, teacher.geometry


# ---- is a store (or a TLE) of this teacher? ---------------------------------------------------------

WEIGHTS_FIELDS = ("name_or_path", "revision", "encoder_fingerprint")  # which weights; the other fields: geometry


def geometry_differences(recorded: TeacherInfo, given: TeacherInfo) -> list[FieldDifference]:
    """The geometry fields on which a recorded teacher and the given one disagree (which weights aside)."""
    return [d for d in recorded.field_differences(given) if d.field not in WEIGHTS_FIELDS]


def check_teacher(recorded: TeacherInfo, given: TeacherInfo, what: str, fix: str, recorded_by: str = "store") -> None:
    """Refuse `what` (made by the `recorded` teacher) for a teacher of another geometry or of other encoder
    weights (fingerprints), saying `fix`. The same weights under another name or revision are fine; a record
    without a fingerprint (written before whistle kept one) is logged as unverifiable, with any other name."""
    differences = geometry_differences(recorded, given)
    if differences:
        raise WhistleError(
            f"{what} holds states of another teacher geometry than {given.name_or_path!r}:\n  - "
            + "\n  - ".join(d.describe(recorded_by) for d in differences)
            + f"\n{fix}"
        )
    if recorded.encoder_fingerprint and given.encoder_fingerprint:
        if recorded.encoder_fingerprint != given.encoder_fingerprint:
            raise WhistleError(
                f"{what} was made by other encoder weights than those of the teacher {given.name_or_path!r} now: "
                f"encoder fingerprint {recorded.encoder_fingerprint} ({recorded_by}, teacher {recorded.name_or_path!r}"
                f"{f' at {recorded.revision}' if recorded.revision else ''}) vs {given.encoder_fingerprint} (given"
                f"{f', at {given.revision}' if given.revision else ''}). Its weights were replaced, or it is another "
                f"model of the same size.\n{fix}"
            )
        return
    if not recorded.encoder_fingerprint:
        log.warning(
            "%s records no fingerprint of its teacher's encoder weights (written before whistle kept one): "
            "whether %r has the same weights cannot be checked",
            what,
            given.name_or_path,
        )
    if (recorded.name_or_path, recorded.revision) != (given.name_or_path, given.revision):
        log.warning(
            "%s was made with teacher %r (revision %r), the teacher now is %r (revision %r): make sure "
            "they are the same weights",
            what,
            recorded.name_or_path,
            recorded.revision,
            given.name_or_path,
            given.revision,
        )


class LogMel(nn.Module):
    """Whisper's log-mel spectrogram in torch, batched, on any device (== WhisperFeatureExtractor within 1e-4).

    forward: audio (B, n_samples) float32 -> (B, n_mels, mel_frames) float32
    """

    def __init__(self, geometry: TeacherGeometry):
        super().__init__()
        self.n_fft = geometry.n_fft
        self.hop_length = geometry.hop_length
        # the filters of transformers' own extractor, so both paths share one definition of the mel scale
        extractor = WhisperFeatureExtractor(
            feature_size=geometry.n_mels,
            sampling_rate=geometry.sample_rate,
            hop_length=geometry.hop_length,
            n_fft=geometry.n_fft,
            chunk_length=round(geometry.window_seconds),
        )
        filters = torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32)).T  # (n_mels, n_freq)
        self.register_buffer("filters", filters.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)  # periodic, as numpy's

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        stft = torch.stft(audio, self.n_fft, self.hop_length, window=self.window, return_complex=True)  # (B, F, M+1)
        power = stft[..., :-1].abs().square()  # (B, F, M): Whisper drops the last frame
        mel = self.filters @ power  # (B, n_mels, M)
        log_spec = mel.clamp(min=1e-10).log10()
        # dynamic range of 8 (80 dB) below each clip's own peak, then Whisper's fixed scaling
        peak = log_spec.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0


@functools.lru_cache(maxsize=8)
def _log_mel(geometry: TeacherGeometry, device: torch.device) -> LogMel:
    return LogMel(geometry).to(device)


@torch.inference_mode()
def teacher_states(
    encoder: WhisperEncoder, audio: torch.Tensor, geometry: TeacherGeometry | None = None
) -> torch.Tensor:
    """Encoder states of 16 kHz clips: audio (B, N <= n_samples) float -> (B, max_frames, d_model).

    Clips shorter than the window are zero-padded to it, as Whisper does. `geometry` defaults to the
    encoder config's with Whisper's standard feature extractor.
    """
    geometry = geometry or TeacherGeometry.from_config(encoder.config)
    device = next(encoder.parameters()).device
    if audio.shape[-1] > geometry.n_samples:
        raise WhistleError(f"audio of {audio.shape[-1]} samples is longer than the {geometry.n_samples}-sample window")
    audio = audio.to(device, torch.float32)
    audio = nn.functional.pad(audio, (0, geometry.n_samples - audio.shape[-1]))  # (B, n_samples)
    features = _log_mel(geometry, device)(audio)  # (B, n_mels, mel_frames)
    return encoder(features.to(encoder.dtype)).last_hidden_state  # (B, max_frames, d_model)


def non_finite_reason(dtype: torch.dtype, peak: float) -> str:
    """The reject reason of a clip whose encoder states hold inf/nan, from what can cause it: audio far out of
    the decoded [-1, 1] range, a float16 encoder overflowing, or values beyond the store's float16."""
    name = str(dtype).removeprefix("torch.")
    if not math.isfinite(peak) or peak > 1.0:
        return (
            f"non-finite states: the input audio is out of range (peak amplitude {peak:.3g}, decoded audio lies "
            f"within [-1, 1]); the {name} encoder produced inf/nan"
        )
    if dtype == torch.float16:
        return (
            f"non-finite states: the float16 encoder overflowed (peak amplitude {peak:.3g}): set "
            "teacher.dtype = float32 or bfloat16"
        )
    return (
        f"non-finite states: the {name} encoder produced inf/nan or values beyond float16, the store's type "
        f"(peak amplitude {peak:.3g})"
    )


def speech_frames(n_samples: int, geometry: TeacherGeometry, margin: int) -> int:
    """Encoder frames that cover a clip of `n_samples` samples, plus `margin` frames, capped at the window."""
    return min(geometry.max_frames, math.ceil(n_samples / geometry.samples_per_frame) + margin)
