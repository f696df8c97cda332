"""Shared pytest fixtures (append yours below with a line here saying what it gives).

- `tiny_whisper_dir` (session): a folder with a tiny random WhisperForConditionalGeneration (d_model 64,
  2 encoder + 1 decoder layers, 80 mel bins, the real 30 s / 1500-frame geometry and vocabulary size)
  and its WhisperFeatureExtractor, written with save_pretrained. Load it by path like a hub checkpoint.
  `make_tiny_whisper(path, n_mels=..., window_seconds=...)` writes another one (e.g. 128 mel bins, as large-v3).
- `write_clip(path, seconds, rate, channels=1, seed=0, **soundfile_options)`: write a noisy two-tone clip in
  any format soundfile writes (format from the suffix, or `format=`/`subtype=`) and return the samples written.
- `make_whisper_tokenizer(languages)`: a small byte-level BPE tokenizer with Whisper's special-token layout
  (<|endoftext|>, <|startoftranscript|>, language tokens, task tokens, <|notimestamps|>), built in-process.
- `tiny_teacher_dir` (session) / `make_tiny_teacher(path, multilingual)`: a complete tiny Whisper teacher
  (model + tokenizer + feature extractor + generation config with alignment heads) with a 2 s window
  (100 encoder frames, d_model 32), for stages that need the decoder and the tokenizer (train-tle, finetune).
- `load_bench(name)`: a bench/ script as a module (e.g. "faults": the fault-injection trials the
  tests/test_faults*.py files run a subset of).
- `fault_world` (session): bench/faults.py's world (2 s-window tiny teacher, 16 clips, one missing) and a
  clean precompute of it: (world, clean store path, its contents for faults.store_differences).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def make_tiny_whisper(path: Path, n_mels: int = 80, seed: int = 0, window_seconds: int = 30) -> Path:
    """Save a tiny random Whisper (model + feature extractor) into `path` and return it."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(
        num_mel_bins=n_mels,
        d_model=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=50 * window_seconds,
        max_target_positions=64,
    )
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=n_mels, chunk_length=window_seconds).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


TOKENIZER_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "whisper reads speech from text",
    "a tiny teacher for fast tests",
    "der schnelle braune fuchs springt",
    "one two three four five six",
]
WHISPER_SPECIAL_TOKENS = [
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]


def make_whisper_tokenizer(languages: tuple[str, ...] = ("en", "de", "yue")):
    """A WhisperTokenizer with a 300-token byte-level BPE and Whisper's special tokens after it."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        TOKENIZER_TEXTS * 3,
        trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in trained["merges"]]
    tokenizer = WhisperTokenizer(vocab=trained["vocab"], merges=merges)  # adds <|endoftext|>
    specials = WHISPER_SPECIAL_TOKENS[:1] + [f"<|{code}|>" for code in languages] + WHISPER_SPECIAL_TOKENS[1:]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def make_tiny_teacher(path: Path, multilingual: bool = False, seed: int = 0) -> Path:
    """Save a tiny random Whisper with tokenizer, feature extractor (2 s window) and generation config."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokenizer = make_whisper_tokenizer()
    vocab = tokenizer.get_vocab()
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=100,
        max_target_positions=64,
        pad_token_id=vocab["<|endoftext|>"],
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        decoder_start_token_id=vocab["<|startoftranscript|>"],
        begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        is_multilingual=multilingual,
        alignment_heads=[[1, 0], [1, 1]],
        no_timestamps_token_id=vocab["<|notimestamps|>"],
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=2).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))


def store_spec(
    frames: str = "speech",
    *,
    d_model: int = 32,
    shard_size: int = 6,
    chunk_frames: int = 256,
    codec: str = "blosc-zstd",
    bitround_keepbits: int = 0,
    fingerprint: str = "synthetic-v1",
    augment: str = "none",
    margin: int = 2,
    name: str = "tiny-random",
):
    """A store spec for a tiny teacher with Whisper's real window geometry (1500 frames, 50/s)."""
    from store.spec import StoreSpec, TeacherInfo

    teacher = TeacherInfo(name, "main", d_model, 80, 16000, 320, 50, 1500)
    return StoreSpec(
        teacher, frames, margin, shard_size, chunk_frames, codec, 3, bitround_keepbits, fingerprint, augment
    )


SYNTHETIC_TEXTS = (
    "the patient received two milligrams",
    "naïve café déjà vu",
    "東京は今日も晴れです",
    "Привет, мир",
    "مرحبا بالعالم",
    "",
)


def synthetic_utterances(spec, n: int, seed: int = 0) -> list[dict]:
    """`n` utterances of 2-15 s: full-window float16 states (channel offsets make the mean non-trivial)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    teacher = spec.teacher
    offsets = rng.normal(0.0, 2.0, teacher.d_model)
    out = []
    for i in range(n):
        n_samples = int(rng.uniform(2.0, 15.0) * teacher.sample_rate)
        speech = min(teacher.max_frames, -(-n_samples // teacher.samples_per_frame) + spec.speech_margin_frames)
        window = (rng.standard_normal((teacher.max_frames, teacher.d_model)) + offsets).astype(np.float16)
        out.append(
            {
                "id": f"utt{i:04d}",
                "text": SYNTHETIC_TEXTS[i % len(SYNTHETIC_TEXTS)],
                "language": ("en", "fr", "ja", "ru", "ar", "en")[i % 6],
                "duration": n_samples / teacher.sample_rate,
                "window": window,
                "speech_frames": speech,
            }
        )
    return out


def add_utterance(shard, spec, utt: dict) -> bool:
    """Add one synthetic utterance the way precompute does for the store's frame policy."""
    speech = utt["speech_frames"]
    if spec.frames == "speech":
        return shard.add(
            utt["id"],
            utt["text"],
            utt["language"],
            utt["duration"],
            utt["window"][:speech],
            tail=utt["window"][speech:],
        )
    return shard.add(utt["id"], utt["text"], utt["language"], utt["duration"], utt["window"])


def write_synthetic_store(url, spec, utterances: list[dict], shards=None):
    """Write `utterances` (all shards, or only those in `shards`); returns the StoreWriter."""
    from store.writer import StoreWriter

    writer = StoreWriter.open(url, spec)
    n_shards = -(-len(utterances) // spec.shard_size)
    for k in range(n_shards) if shards is None else shards:
        with writer.shard(k) as shard:
            for utt in utterances[k * spec.shard_size : (k + 1) * spec.shard_size]:
                add_utterance(shard, spec, utt)
    return writer


def write_clip(path: Path, seconds: float, rate: int, channels: int = 1, seed: int = 0, **soundfile_options):
    """Write a clip of two tones plus noise (amplitude ~0.3) to `path`; returns the float samples (N, C)."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    voices = [
        0.2 * np.sin(2 * np.pi * (220 + 110 * c + 40 * seed) * t)
        + 0.1 * np.sin(2 * np.pi * 1250 * t)
        + 0.03 * rng.standard_normal(t.shape)
        for c in range(channels)
    ]
    samples = np.stack(voices, axis=1).astype(np.float32)  # (N, C)
    soundfile.write(path, samples, rate, **soundfile_options)
    return samples


# `torchrun --standalone --nproc_per_node 2`: what the multi-process tests put before their program
TORCHRUN_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def load_bench(name: str):
    """bench/<name>.py imported as the module `whistle_bench_<name>` (once per session)."""
    import importlib.util
    import sys

    module_name = f"whistle_bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, Path(__file__).parent.parent / "bench" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def fault_world(tmp_path_factory: pytest.TempPathFactory):
    faults = load_bench("faults")
    world = faults.make_world(tmp_path_factory.mktemp("fault-world"))
    store = tmp_path_factory.mktemp("fault-clean") / "store"
    result = faults.precompute(world, str(store))
    assert result.exit_code == 0, result.output
    return world, store, faults.store_contents(str(store))
