"""whistle_pipeline.audio: decoding every format and layout to 16 kHz mono, rejects, telephone augmentation."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import soundfile
import soxr
from conftest import write_clip

from whistle_pipeline.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    augment,
    load_audio,
    telephone,
)


def test_constants_are_whispers():
    assert (SAMPLE_RATE, N_SAMPLES, N_FRAMES) == (16000, 480000, 3000)


@pytest.mark.parametrize(
    "name, rate, channels, options",
    [
        ("int16-48k-stereo.wav", 48000, 2, {"subtype": "PCM_16"}),
        ("float-16k.wav", 16000, 1, {"subtype": "FLOAT"}),
        ("pcm24-44k.flac", 44100, 1, {"subtype": "PCM_24"}),
        ("22k.flac", 22050, 1, {}),
        ("vorbis-32k.ogg", 32000, 1, {}),
        ("stereo-48k.mp3", 48000, 2, {}),
        ("8k.wav", 8000, 1, {"subtype": "PCM_U8"}),
    ],
)
def test_load_audio_decodes_downmixes_and_resamples(tmp_path, name, rate, channels, options):
    path = tmp_path / name
    written = write_clip(path, 1.5, rate, channels, **options)  # (N, C)
    audio = load_audio(path, SAMPLE_RATE)
    assert audio.dtype == np.float32 and audio.ndim == 1
    expected = soxr.resample(written.mean(axis=1), rate, SAMPLE_RATE)
    if name.endswith((".ogg", ".mp3")):  # lossy codecs: same length within a codec frame, same loudness
        assert abs(audio.shape[0] - 1.5 * SAMPLE_RATE) < 0.06 * SAMPLE_RATE
        assert np.sqrt(np.mean(audio**2)) == pytest.approx(np.sqrt(np.mean(expected**2)), rel=0.1)
    else:  # lossless: the downmixed, resampled samples within the PCM quantisation step
        assert audio.shape == expected.shape
        step = 2.0**-6 if options.get("subtype") == "PCM_U8" else 2.0**-14  # (8-bit: the step, filtered)
        np.testing.assert_allclose(audio, expected, atol=step)


def test_load_audio_reads_bytes_like_a_file(tmp_path):
    path = tmp_path / "clip.flac"
    write_clip(path, 1.0, 24000)
    np.testing.assert_array_equal(load_audio(path.read_bytes(), SAMPLE_RATE), load_audio(path, SAMPLE_RATE))


def test_int16_stereo_downmix_is_the_channel_mean(tmp_path):
    left = np.full(1600, 8192, np.int16)
    right = np.full(1600, -4096, np.int16)
    path = tmp_path / "lr.wav"
    soundfile.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="PCM_16")
    np.testing.assert_allclose(load_audio(path, SAMPLE_RATE), (0.25 - 0.125) / 2)


def _reason(source, **kwargs) -> str:
    with pytest.raises(AudioError) as caught:
        load_audio(source, SAMPLE_RATE, **kwargs)
    return caught.value.reason


def test_bad_audio_is_an_audio_error_with_a_grouped_reason(tmp_path):
    assert _reason(tmp_path / "missing.wav") == f"audio not found: {tmp_path / 'missing.wav'}"
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 10)
    assert _reason(garbage).startswith("undecodable audio: ")
    assert _reason(b"\x00\x01garbage").startswith("undecodable audio: ")
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    assert _reason(empty) == "empty audio: 0 samples"
    nan = tmp_path / "nan.wav"
    soundfile.write(nan, np.array([0.0, np.nan, 0.5, np.inf], np.float32), SAMPLE_RATE, subtype="FLOAT")
    assert _reason(nan) == "non-finite audio: NaN or infinite samples"
    long = tmp_path / "long.flac"
    write_clip(long, 3.0, 8000)
    assert _reason(long, max_seconds=2.0) == "too long: 3.0 s, the window is 2 s"
    with pytest.raises(AudioError, match=f"cannot use audio {garbage}"):
        load_audio(garbage, SAMPLE_RATE)


def _rate_in_header(path, rate: int) -> None:
    """Overwrite a canonical WAV header's sample rate (bytes 24-27), as a damaged or hostile file would."""
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)
    path.write_bytes(bytes(data))


def test_a_clip_that_resamples_to_no_sample_is_empty_audio(tmp_path):
    one = tmp_path / "one.wav"
    soundfile.write(one, np.array([0.25], np.float32), 44100)
    assert _reason(one) == "empty audio: 1 sample(s) at 44100 Hz resample to none at 16000 Hz"
    absurd = tmp_path / "absurd.wav"
    soundfile.write(absurd, np.full(100, 0.1, np.float32), SAMPLE_RATE, subtype="PCM_16")
    _rate_in_header(absurd, 2_000_000_000)
    assert _reason(absurd) == "empty audio: 100 sample(s) at 2000000000 Hz resample to none at 16000 Hz"
    silence = tmp_path / "silence.wav"  # all zeros is a clip like any other
    soundfile.write(silence, np.zeros(1600, np.float32), SAMPLE_RATE)
    np.testing.assert_array_equal(load_audio(silence, SAMPLE_RATE), np.zeros(1600, np.float32))


def test_a_folder_or_a_fifo_is_named_for_what_it_is_not_missing(tmp_path):
    folder = tmp_path / "clip.wav"
    folder.mkdir()
    assert _reason(folder) == f"not a file: {folder} is a directory"
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    assert (
        _reason(fifo) == f"not a file: {fifo} is a named pipe (FIFO), not a regular file"
    )  # never opened: it would block
    assert _reason(tmp_path / "missing" / "x.wav") == f"audio not found: {tmp_path / 'missing' / 'x.wav'}"


def _tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x[1600:-1600] ** 2)))  # away from the edges


def test_telephone_keeps_the_voice_band_and_removes_the_rest():
    for freq, kept in ((1000.0, True), (3000.0, True), (100.0, False), (5000.0, False), (7000.0, False)):
        out = telephone(_tone(freq), SAMPLE_RATE)
        assert out.shape == (SAMPLE_RATE,) and out.dtype == np.float32
        ratio = _rms(out) / _rms(_tone(freq))
        assert (ratio > 0.9) if kept else (ratio < 0.05), (freq, ratio)


def test_telephone_quantises_with_mu_law_and_is_deterministic():
    clip = _tone(1000.0, 0.5) * 0.01  # quiet: 8-bit linear codes would flatten it, mu-law keeps it
    out = telephone(clip, SAMPLE_RATE)
    np.testing.assert_array_equal(out, telephone(clip, SAMPLE_RATE))
    error = _rms(out - clip) / _rms(clip)
    assert 0.001 < error < 0.2  # lossy (quantised), yet the quiet tone survives
    odd = telephone(_tone(1000.0, 0.31)[:4801], SAMPLE_RATE)
    assert odd.shape == (4801,)  # the 8 kHz round trip keeps the length


def test_augment_by_name():
    clip = _tone(5000.0)
    assert augment(clip, SAMPLE_RATE, "none") is clip
    np.testing.assert_array_equal(augment(clip, SAMPLE_RATE, "telephone"), telephone(clip, SAMPLE_RATE))
    with pytest.raises(Exception, match="unknown augmentation 'reverb'"):
        augment(clip, SAMPLE_RATE, "reverb")
