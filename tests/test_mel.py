"""whistle_pipeline.teacher: torch log-mel == WhisperFeatureExtractor, encoder-only loading, geometry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_whisper
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.teacher import (
    LogMel,
    TeacherEncoder,
    TeacherGeometry,
    load_encoder,
    speech_frames,
    teacher_states,
)


def _clips(n_samples: int) -> np.ndarray:
    """Speech-like and edge-case clips, zero-padded to the window: (4, n_samples) float32."""
    rng = np.random.default_rng(0)
    t = np.arange(n_samples) / 16000
    clips = np.zeros((4, n_samples), np.float32)
    clips[0, :40000] = 0.3 * np.sin(2 * np.pi * 440 * t[:40000]) * np.sin(2 * np.pi * 3 * t[:40000])
    clips[1, :123457] = 0.05 * rng.standard_normal(123457)  # odd length, quiet noise
    clips[2] = 0.99 * np.sign(np.sin(2 * np.pi * 50 * t))  # a loud full-window square wave
    clips[3, :1000] = 1e-4 * rng.standard_normal(1000)  # nearly silent: the 8-decade floor dominates
    return clips


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_equals_the_feature_extractors_numpy_output(n_mels):
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    geometry = TeacherGeometry.from_pretrained(_config(n_mels), extractor)
    clips = _clips(geometry.n_samples)
    expected = extractor._np_extract_fbank_features(clips, "cpu")  # (4, n_mels, 3000), numpy float64 path
    got = LogMel(geometry)(torch.from_numpy(clips))  # (4, n_mels, 3000)
    assert got.shape == expected.shape == (4, n_mels, 3000)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=0)
    # and the extractor's public call (which pads to the window itself) agrees for an unpadded clip
    public = extractor(clips[1, :123457], sampling_rate=16000, return_tensors="np").input_features
    np.testing.assert_allclose(got[1:2].numpy(), public, atol=1e-4, rtol=0)


def _config(n_mels: int):
    from transformers import WhisperConfig

    return WhisperConfig(num_mel_bins=n_mels, d_model=64, max_source_positions=1500)


def test_geometry_is_read_from_the_checkpoint(tiny_whisper_dir, tmp_path):
    _, geometry = load_encoder(str(tiny_whisper_dir), "main", "cpu", "auto")
    assert geometry == TeacherGeometry(
        sample_rate=16000,
        n_fft=400,
        hop_length=160,
        n_mels=80,
        max_frames=1500,
        frames_per_second=50,
        samples_per_frame=320,
        d_model=64,
    )
    assert (geometry.n_samples, geometry.mel_frames, geometry.window_seconds) == (480000, 3000, 30.0)
    # a large-v3-like checkpoint: 128 mel bins
    _, v3 = load_encoder(str(make_tiny_whisper(tmp_path / "v3", n_mels=128)), "main", "cpu", "float32")
    assert v3.n_mels == 128
    # a checkpoint with a 2 s window: nothing is assumed about 30 s
    encoder, short = load_encoder(str(make_tiny_whisper(tmp_path / "2s", window_seconds=2)), "main", "cpu", "auto")
    assert (short.max_frames, short.n_samples, short.mel_frames, short.frames_per_second) == (100, 32000, 200, 50)
    assert teacher_states(encoder, torch.zeros(3, 20000), short).shape == (3, 100, 64)
    # a config and extractor that disagree are refused with both numbers
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_whisper_dir, mismatched)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(mismatched)
    with pytest.raises(WhistleError, match="makes 128 mel bins, the encoder expects 80"):
        load_encoder(str(mismatched), "main", "cpu", "auto")


def test_encoder_alone_is_loaded_and_matches_the_full_model(tiny_whisper_dir):
    encoder, geometry = load_encoder(str(tiny_whisper_dir), "main", "cpu", "auto")
    assert isinstance(encoder, TeacherEncoder) and not encoder.training and encoder.dtype == torch.float32
    assert encoder.config._attn_implementation == "sdpa"
    assert not any("decoder" in name for name, _ in encoder.named_parameters())
    assert not any(p.requires_grad for p in encoder.parameters())
    full = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).eval()
    reference = full.model.encoder.state_dict()
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)

    audio = torch.from_numpy(_clips(geometry.n_samples)[:2, :64000])  # two 4 s clips, unpadded
    states = teacher_states(encoder, audio, geometry)  # (2, 1500, 64)
    extractor = WhisperFeatureExtractor.from_pretrained(tiny_whisper_dir)
    features = extractor(list(audio.numpy()), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        expected = full.model.encoder(features).last_hidden_state
    assert states.shape == (2, 1500, 64)
    torch.testing.assert_close(states, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher_states(encoder, audio), states)  # default geometry: the config's


def test_bfloat16_encoder_on_request(tiny_whisper_dir):
    encoder, geometry = load_encoder(str(tiny_whisper_dir), "main", "cpu", "bfloat16", attn="eager")
    assert encoder.dtype == torch.bfloat16 and encoder.config._attn_implementation == "eager"
    states = teacher_states(encoder, torch.zeros(1, 16000), geometry)
    assert states.dtype == torch.bfloat16 and torch.isfinite(states.float()).all()


def test_checkpoint_problems_are_clear(tiny_whisper_dir, tmp_path, caplog):
    with pytest.raises(WhistleError, match="cannot read a Whisper config"):
        load_encoder(str(tmp_path / "nowhere"), "main", "cpu", "auto")
    no_extractor = tmp_path / "no-extractor"
    shutil.copytree(tiny_whisper_dir, no_extractor)
    (no_extractor / "preprocessor_config.json").unlink()
    _, geometry = load_encoder(str(no_extractor), "main", "cpu", "auto")
    assert geometry.n_mels == 80 and "standard 80-bin feature extractor" in caplog.text
    # weights without an encoder (here: a decoder-only state dict)
    from safetensors.torch import load_file, save_file

    decoder_only = tmp_path / "decoder-only"
    shutil.copytree(tiny_whisper_dir, decoder_only)
    weights = load_file(decoder_only / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "encoder" not in k},
        decoder_only / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(WhistleError, match="holds no complete Whisper encoder"):
        load_encoder(str(decoder_only), "main", "cpu", "auto")


def test_speech_frames_cover_the_clip_plus_margin():
    geometry = TeacherGeometry(16000, 400, 160, 80, 1500, 50, 320, 64)
    assert speech_frames(48000, geometry, margin=2) == 152  # 3 s = 150 frames
    assert speech_frames(48001, geometry, margin=0) == 151  # a started frame counts
    assert speech_frames(1, geometry, margin=2) == 3
    assert speech_frames(480000, geometry, margin=2) == 1500  # capped at the window
