"""The records that say what a store holds: its teacher (TeacherInfo) and its layout (StoreSpec), with
the rules each must follow and how two of them differ."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from store.format import (
    CODECS,
    FORMAT_VERSION,
    FRAME_POLICIES,
    MAX_BITROUND_KEEPBITS,
    STATES_DTYPE,
    StoreError,
    whistle_version,
)


@dataclass(frozen=True)
class FieldDifference:
    """One field of a TeacherInfo on which the recorded teacher and the given one disagree."""

    field: str
    recorded: Any  # what the store (or a model trained on it) recorded
    given: Any

    def describe(self, recorded_by: str = "store") -> str:
        return f"teacher.{self.field}: {self.recorded!r} ({recorded_by}) vs {self.given!r} (given)"


@dataclass(frozen=True)
class TeacherInfo:
    """Identity and geometry of the Whisper encoder whose states a store holds."""

    name_or_path: str
    revision: str
    d_model: int  # channels per frame, 1280 for large-v3
    n_mels: int  # 128 for large-v3, 80 before
    sample_rate: int  # 16000
    samples_per_frame: int  # 320 = hop 160 x conv stride 2
    frames_per_second: int  # 50 = sample_rate / samples_per_frame
    max_frames: int  # 1500 encoder frames per 30 s window
    # sha256 of the encoder's weights as stored (whistle_pipeline.teacher.encoder_fingerprint): the same
    # weights give the same one from any folder; "" when not known (stores written before it was recorded)
    encoder_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherInfo:
        return cls(
            **{
                field.name: data[field.name]
                for field in dataclasses.fields(cls)
                if field.name in data or field.default is dataclasses.MISSING
            }
        )

    def field_differences(self, other: TeacherInfo) -> list[FieldDifference]:
        """The fields that differ, with this (recorded) value and the other's (given) one. Fingerprints are
        compared when both records have one; when they match, the weights are the same wherever they were
        read from, so name and revision are not compared (the other way round when one is unknown)."""
        if self.encoder_fingerprint and other.encoder_fingerprint:
            same_weights = self.encoder_fingerprint == other.encoder_fingerprint
            skipped = {"name_or_path", "revision"} if same_weights else set()
        else:
            skipped = {"encoder_fingerprint"}
        return [
            FieldDifference(field.name, getattr(self, field.name), getattr(other, field.name))
            for field in dataclasses.fields(self)
            if field.name not in skipped and getattr(self, field.name) != getattr(other, field.name)
        ]

    def differences(self, other: TeacherInfo) -> list[str]:
        """One line per field that differs: "teacher.d_model: 384 (store) vs 1280 (given)"."""
        return [difference.describe() for difference in self.field_differences(other)]

    def problems(self) -> list[str]:
        out = [
            f"teacher.{name} must be a positive integer, got {getattr(self, name)!r}"
            for name in ("d_model", "n_mels", "sample_rate", "samples_per_frame", "frames_per_second", "max_frames")
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0
        ]
        if not out and self.frames_per_second * self.samples_per_frame != self.sample_rate:
            out.append(
                f"teacher geometry is inconsistent: frames_per_second {self.frames_per_second} x samples_per_frame "
                f"{self.samples_per_frame} != sample_rate {self.sample_rate}"
            )
        return out


# The fields that decide what a store's states mean; a writer may only add shards to a store whose
# spec agrees on all of them (codec and chunking may differ without changing any value read back).
IDENTITY_FIELDS = ("frames", "speech_margin_frames", "shard_size", "dataset_fingerprint", "augment")


@dataclass(frozen=True)
class StoreSpec:
    """How a store is laid out: the teacher, the frame policy, sharding and compression."""

    teacher: TeacherInfo
    frames: Literal["speech", "full"]
    speech_margin_frames: int
    shard_size: int  # source rows per shard
    chunk_frames: int  # rows per inner Zarr chunk (the unit read for a frame range)
    codec: str  # one of CODECS
    compression_level: int  # Blosc level 1-9
    bitround_keepbits: int  # 0 = lossless; 1-9 = float16 mantissa bits kept (lossy)
    dataset_fingerprint: str
    augment: str

    def problems(self) -> list[str]:
        """Every rule the spec breaks, one message each (empty when valid)."""
        out = list(self.teacher.problems())
        if self.frames not in FRAME_POLICIES:
            out.append(f"frames must be one of {', '.join(FRAME_POLICIES)}, got {self.frames!r}")
        if self.speech_margin_frames < 0:
            out.append(f"speech_margin_frames must be >= 0, got {self.speech_margin_frames}")
        if self.shard_size < 1:
            out.append(f"shard_size must be >= 1, got {self.shard_size}")
        if self.chunk_frames < 1:
            out.append(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.codec not in CODECS:
            out.append(f"codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.codec != "none" and not 1 <= self.compression_level <= 9:
            out.append(f"compression_level must be 1-9 for {self.codec}, got {self.compression_level}")
        if not 0 <= self.bitround_keepbits <= MAX_BITROUND_KEEPBITS:
            out.append(f"bitround_keepbits must be 0 (off) to {MAX_BITROUND_KEEPBITS}, got {self.bitround_keepbits}")
        return out

    def differences(self, other: StoreSpec) -> list[str]:
        """The identity fields (teacher included) on which `other` disagrees with this (stored) spec."""
        out = self.teacher.differences(other.teacher)
        out += [
            f"{name}: {getattr(self, name)!r} (store) vs {getattr(other, name)!r} (given)"
            for name in IDENTITY_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]
        return out

    def to_attrs(self) -> dict[str, Any]:
        """The store root's `whistle` attribute (without the version stamps)."""
        attrs = {"format": FORMAT_VERSION, "dtype": STATES_DTYPE, **dataclasses.asdict(self)}
        attrs["teacher"] = self.teacher.to_dict()
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], url: str) -> StoreSpec:
        """Parse the root `whistle` attribute, refusing unknown formats and damaged metadata."""
        version = attrs.get("format")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"store {url} has format {version!r}, but this whistle ({whistle_version()}) reads format "
                f"{FORMAT_VERSION} only. Use the whistle version that wrote it (created_by: "
                f"{attrs.get('created_by', 'unknown')}), or precompute the store again."
            )
        if attrs.get("dtype") != STATES_DTYPE:
            raise StoreError(f"store {url} holds {attrs.get('dtype')!r} states; format 1 stores float16 only")
        try:
            teacher = TeacherInfo.from_dict(attrs["teacher"])
            fields = {f.name: attrs[f.name] for f in dataclasses.fields(cls) if f.name != "teacher"}
        except (KeyError, TypeError) as err:
            raise StoreError(
                f"store {url} has damaged root metadata (zarr.json attributes.whistle lacks {err}); "
                "precompute the store again"
            ) from err
        spec = cls(teacher=teacher, **fields)
        problems = spec.problems()
        if problems:
            raise StoreError(f"store {url} has damaged root metadata: " + "; ".join(problems))
        return spec
