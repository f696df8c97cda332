"""Audio I/O: decode any file soundfile reads, downmix, resample to the teacher's rate; augmentation.

Whisper's audio geometry, derived once. These are the values every released Whisper uses; the
pipeline itself reads them from the teacher's config (`whistle_pipeline.teacher.TeacherGeometry`)
and these constants serve code that has no teacher at hand (synthesis, tests)::

    audio = load_audio("clip.mp3", SAMPLE_RATE)   # float32 mono at 16 kHz, any input rate / channels

Decoding uses soundfile (libsndfile >= 1.1 reads WAV, FLAC, OGG/Vorbis/Opus and MP3) and
resampling soxr — never torchcodec or ffmpeg, so workers need no system codecs.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable

import numpy as np
import soundfile
import soxr

from whistle_pipeline.errors import WhistleError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
assert N_SAMPLES % HOP_LENGTH == 0, "a window must hold a whole number of hops"

TELEPHONE_RATE = 8000  # narrowband telephony (G.711)
TELEPHONE_BAND_HZ = (300.0, 3400.0)  # ITU-T G.712 pass band
MU_LAW_MU = 255  # G.711 mu-law, 8-bit codes

# A file that yields fewer samples than its header declares was cut short (an interrupted copy or
# download): its transcript no longer matches, so it is rejected. Compressed formats (MP3) estimate
# their length from the header, so a shortfall under TRUNCATION_SLACK_SECONDS is tolerated.
TRUNCATION_SLACK_SECONDS = 0.1
# libsndfile clamps a WAV/AIFF's length to the bytes present and notes it in its log:
# "data : 32000 (should be 15978)". Streaming writers that cannot seek back put a placeholder
# (0xFFFFFFFF, or just under 2 GiB) in the header: sizes from PLACEHOLDER_BYTES on are not a claim.
DATA_CHUNK_LOG = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
PLACEHOLDER_BYTES = 2**31


class AudioError(WhistleError):
    """A clip that cannot be used. `reason` ("kind: detail") is what a store records as its reject reason."""

    def __init__(self, reason: str, name: str):
        self.reason = reason
        super().__init__(f"cannot use audio {name}: {reason}")


AudioSource = str | os.PathLike | bytes


def load_audio(
    source: AudioSource,
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    name: str | None = None,
    segment: tuple[float, float | None] | None = None,
) -> np.ndarray:
    """Decode `source` (a file path or the encoded bytes of a file) to float32 mono at `sample_rate`.

    Integer PCM is scaled to [-1, 1); channels are averaged; other rates are resampled with soxr (HQ).
    `segment` = (start, duration) in seconds reads only that part (duration None: to the end), as a
    NeMo offset or a lhotse supervision asks. Raises AudioError (naming the file, or `name` for bytes)
    when the file is missing, is not a regular file or cannot be decoded, is truncated (fewer samples
    than its header declares), is empty (also when it resamples to no sample at all), holds NaN/inf
    samples, is longer than `max_seconds` (checked before decoding), or ends before the segment does.
    """
    name = name or (f"<{len(source)} bytes>" if isinstance(source, bytes) else os.fspath(source))
    if not isinstance(source, bytes):
        _check_regular_file(source, name)
    if (len(source) if isinstance(source, bytes) else os.path.getsize(source)) == 0:
        raise AudioError("undecodable audio: the file is empty (0 bytes)", name)  # libsndfile: "Format not recognised"
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as handle:
            rate, declared = handle.samplerate, handle.frames
            first, wanted = (0, declared) if segment is None else _segment_frames(segment, rate, declared, name)
            if max_seconds is not None and wanted > max_seconds * rate:
                raise AudioError(f"too long: {wanted / rate:.1f} s, the window is {max_seconds:g} s", name)
            cut = _cut_data_chunk(handle.extra_info)
            if first:
                handle.seek(first)
            samples = handle.read(-1 if segment is None else wanted, dtype="float32", always_2d=True)  # (N, C)
    except soundfile.LibsndfileError as err:
        raise AudioError(f"undecodable audio: {err.error_string}", name) from err
    except (RuntimeError, TypeError, ValueError) as err:  # truncated or malformed streams fail while reading
        raise AudioError(f"undecodable audio: {err}", name) from err
    if cut:
        raise AudioError(
            f"truncated audio: the header declares {cut[0]} bytes of samples, the file holds {cut[1]}", name
        )
    if samples.shape[0] < wanted - TRUNCATION_SLACK_SECONDS * rate:
        raise AudioError(
            f"truncated audio: the header declares {(first + wanted) / rate:.2f} s, only "
            f"{(first + samples.shape[0]) / rate:.2f} s could be decoded",
            name,
        )
    if samples.shape[0] == 0:
        raise AudioError("empty audio: 0 samples", name)
    audio = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]  # (N,)
    if not np.isfinite(audio).all():
        raise AudioError("non-finite audio: NaN or infinite samples", name)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ")
    if audio.shape[0] == 0:  # e.g. 1 sample at 44.1 kHz, or a header claiming an absurd rate
        raise AudioError(
            f"empty audio: {samples.shape[0]} sample(s) at {rate} Hz resample to none at {sample_rate} Hz", name
        )
    return np.ascontiguousarray(audio, dtype=np.float32)


def _segment_frames(segment: tuple[float, float | None], rate: int, declared: int, name: str) -> tuple[int, int]:
    """(first frame, frame count) of a (start, duration) segment of a file of `declared` frames. A segment that
    ends up to TRUNCATION_SLACK_SECONDS after the file (a rounded duration) is cut at the file's end."""
    start, duration = segment
    first = round(start * rate)
    wanted = declared - first if duration is None else round(duration * rate)
    if first >= declared or first + wanted > declared + TRUNCATION_SLACK_SECONDS * rate:
        end = "the end" if duration is None else f"{start + duration:.2f} s"
        raise AudioError(
            f"segment beyond the audio: the file is {declared / rate:.2f} s, the segment is {start:.2f} s to {end}",
            name,
        )
    return first, min(wanted, declared - first)


def _check_regular_file(path: str | os.PathLike, name: str) -> None:
    """Raise AudioError unless `path` is a regular file (a FIFO would block the reader for ever)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise AudioError(f"audio not found: {name}", name) from None
    except OSError as err:
        raise AudioError(f"unreadable audio: {err.strerror}", name) from err
    if stat.S_ISDIR(mode):
        raise AudioError(f"not a file: {name} is a directory", name)
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
        raise AudioError(f"not a file: {name} is {kind}, not a regular file", name)


def _cut_data_chunk(log: str) -> tuple[int, int] | None:
    """(declared, present) bytes of a WAV/AIFF sample chunk that ends early, from libsndfile's log."""
    found = DATA_CHUNK_LOG.search(log)
    if found is None:
        return None
    declared, present = int(found.group(1)), int(found.group(2))
    return (declared, present) if present < declared < PLACEHOLDER_BYTES else None


def telephone(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Narrowband telephone channel: 8 kHz, 300-3400 Hz band, 8-bit mu-law codes, back to `sample_rate`.

    Deterministic (no random parameters), so a resumed run gives the same states as a clean one.
    """
    narrow = soxr.resample(audio, sample_rate, TELEPHONE_RATE, quality="HQ")  # (N8,) anti-aliased to 4 kHz
    spectrum = np.fft.rfft(narrow)
    freqs = np.fft.rfftfreq(narrow.shape[0], d=1.0 / TELEPHONE_RATE)
    low, high = TELEPHONE_BAND_HZ
    spectrum[(freqs < low) | (freqs > high)] = 0.0
    band = np.fft.irfft(spectrum, n=narrow.shape[0])
    band = np.clip(band, -1.0, 1.0)
    # mu-law companding, quantised to the 256 codes of G.711, then expanded again
    compressed = np.sign(band) * np.log1p(MU_LAW_MU * np.abs(band)) / np.log1p(MU_LAW_MU)
    codes = np.round((compressed + 1.0) / 2.0 * MU_LAW_MU)
    decoded = codes / MU_LAW_MU * 2.0 - 1.0
    expanded = np.sign(decoded) * np.expm1(np.abs(decoded) * np.log1p(MU_LAW_MU)) / MU_LAW_MU
    wide = soxr.resample(expanded.astype(np.float32), TELEPHONE_RATE, sample_rate, quality="HQ")
    # the round trip through 8 kHz may gain or lose a sample: keep the clip's length (and duration)
    wide = np.pad(wide[: audio.shape[0]], (0, max(0, audio.shape[0] - wide.shape[0])))
    return np.ascontiguousarray(wide, dtype=np.float32)


AUGMENTATIONS: dict[str, Callable[[np.ndarray, int], np.ndarray] | None] = {"none": None, "telephone": telephone}


def augment(audio: np.ndarray, sample_rate: int, kind: str) -> np.ndarray:
    """Apply the augmentation named `kind` ("none" returns `audio` unchanged)."""
    if kind not in AUGMENTATIONS:
        raise WhistleError(f"unknown augmentation {kind!r}: use one of {', '.join(AUGMENTATIONS)}")
    transform = AUGMENTATIONS[kind]
    return audio if transform is None else transform(audio, sample_rate)
