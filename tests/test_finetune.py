"""`whistle finetune` end to end on a tiny random teacher, tiny stores and a tiny TLE written in tmp_path."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_teacher, write_clip
from safetensors.torch import load_file

from whistle_pipeline.config import ConfigError, load_config
from whistle_pipeline.preflight import finetune_input_problems, finetune_ratio_problems

D_MODEL, MAX_FRAMES, FRAMES_PER_TOKEN = 32, 100, 3
SOURCE_WORDS = "the quick brown fox jumps over lazy dog hello world".split()
TARGET_SENTENCES = [
    f"take {n} tablets of amoxicillin {when}"
    for n in ("two", "three", "four", "five")
    for when in ("daily", "at night", "with food", "after meals", "twice a day")
] + [
    f"the patient reports {what} since {day}"
    for what in ("nausea", "dizziness", "a rash")
    for day in ("monday", "friday", "yesterday")
]


def write_store(url: Path, teacher_dir: Path, texts: list[str], seed: int, languages: list[str] | None = None) -> Path:
    """Utterances whose states are a fixed vector per token (3 frames each) + noise, then a 2-frame margin."""
    from transformers import AutoTokenizer

    from store import StoreSpec, StoreWriter, TeacherInfo
    from whistle_pipeline.text import text_tokens

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rng = np.random.default_rng(seed)
    token_vectors = rng.normal(0.0, 1.0, (len(tokenizer), D_MODEL))
    tail_vector = rng.normal(0.0, 1.0, D_MODEL)
    teacher = TeacherInfo(str(Path(teacher_dir).resolve()), "", D_MODEL, 80, 16000, 320, 50, MAX_FRAMES)
    spec = StoreSpec(teacher, "speech", 2, 8, 64, "blosc-lz4", 3, 0, f"finetune-test-{seed}", "none")
    writer = StoreWriter.open(str(url), spec)
    for k in range(-(-len(texts) // 8)):
        with writer.shard(k) as shard:
            for i in range(k * 8, min(len(texts), (k + 1) * 8)):
                ids = text_tokens(tokenizer, texts[i])
                speech = np.repeat(token_vectors[ids], FRAMES_PER_TOKEN, axis=0)[: MAX_FRAMES - 2]
                states = np.concatenate([speech, np.tile(tail_vector, (2, 1))])
                states = (states + rng.normal(0.0, 0.1, states.shape)).astype(np.float16)
                tail = (tail_vector + rng.normal(0.0, 0.1, (MAX_FRAMES - len(states), D_MODEL))).astype(np.float16)
                language = languages[i % len(languages)] if languages else "en"
                shard.add(f"utt{seed}-{i:03d}", texts[i], language, len(states) / 50, states, tail=tail)
    return url


def write_tle(
    path: Path, teacher_dir: Path, store: Path, languages: list[str], pronunciation: dict | None = None
) -> Path:
    """A tiny random TLE that knows `languages`, with the store's statistics and tail template (and the
    pronunciation front end of the settings `pronunciation`)."""
    from transformers import AutoTokenizer

    from store import StoreReader
    from whistle_pipeline.tle import TLEConfig, TLEModel

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    reader = StoreReader(str(store))
    torch.manual_seed(0)
    tle = TLEModel(
        TLEConfig(
            vocab_size=len(tokenizer),
            embedding_size=D_MODEL,
            hidden_size=32,
            text_layers=1,
            frame_layers=1,
            num_heads=2,
            ffn_multiplier=2,
            latent_size=4,
            conv_layers=1,
            dropout=0.0,
            languages=languages,
            d_model=D_MODEL,
            max_frames=MAX_FRAMES,
            max_tokens=64,
            end_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            teacher=reader.teacher.to_dict(),
            pronunciation=pronunciation,
            phoneme_channels=8,
        )
    )
    mean, std = reader.statistics()
    tle.set_store_statistics(mean, std, reader.tail_template())
    tle.save_pretrained(path)
    return path


def make_teacher(path: Path, multilingual: bool = False) -> Path:
    """The tiny teacher with token embeddings of a trained model's scale: at the initial std of 0.02 the
    tied output layer cannot express confident logits, and a frozen-embedding fine-tune barely moves."""
    from transformers import WhisperForConditionalGeneration

    make_tiny_teacher(path, multilingual=multilingual)
    model = WhisperForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(25.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-world")
    teacher = make_teacher(root / "teacher")
    rng = np.random.default_rng(0)
    source = [" ".join(rng.choice(SOURCE_WORDS, size=int(rng.integers(2, 6)))) for _ in range(40)]
    audio_store = write_store(root / "source-store", teacher, source, seed=1)
    tts_store = write_store(root / "tts-store", teacher, TARGET_SENTENCES, seed=2)
    tle = write_tle(root / "tle", teacher, audio_store, ["en"])
    corpus = root / "target.txt"
    corpus.write_text("\n".join(TARGET_SENTENCES) + "\n", encoding="utf-8")
    val = root / "val"
    val.mkdir()
    with open(val / "manifest.jsonl", "w") as handle:
        for i, text in enumerate(TARGET_SENTENCES[:3]):
            write_clip(val / f"v{i}.wav", 1.0 + 0.2 * i, 16000, seed=i)
            handle.write(json.dumps({"audio": f"v{i}.wav", "text": text}) + "\n")
    return {
        "teacher": teacher,
        "audio_store": audio_store,
        "tts_store": tts_store,
        "tle": tle,
        "text": corpus,
        "val_audio": val / "manifest.jsonl",
        "root": root,
    }


TINY = [
    "finetune.batch_size=8",
    "finetune.learning_rate=3e-3",
    "finetune.warmup_steps=2",
    "finetune.num_workers=0",
    "finetune.shuffle_buffer=16",
    "finetune.val_fraction=0.15",
    "finetune.val_size=8",
    "finetune.log_every=1",
    "finetune.progress=false",
    "teacher.device=cpu",
    "evaluate.max_new_tokens=8",
    "evaluate.batch_size=4",
]


def finetune_config(world, output_dir: Path, *overrides: str, stores: bool = True):
    paths = {
        "teacher.name_or_path": world["teacher"],
        "finetune.tle_path": world["tle"],
        "finetune.text": world["text"],
        "finetune.output_dir": output_dir,
    }
    if stores:
        paths.update({"finetune.audio_store": world["audio_store"], "finetune.tts_store": world["tts_store"]})
    return load_config(overrides=[f"{k}={json.dumps(str(v))}" for k, v in paths.items()] + TINY + list(overrides))


def text_loss(model_dir: Path, world, sentences: list[str]) -> float:
    """Decoder cross-entropy of `sentences` read from the TLE's full windows (z = prior mean)."""
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    from whistle_pipeline.text import IGNORE_INDEX, SpecialTokens, encode_texts
    from whistle_pipeline.tle import TLEModel
    from whistle_pipeline.windows import Example, Windows, token_losses

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    specials = SpecialTokens.from_tokenizer(tokenizer, False)
    windows = Windows(TLEModel.from_pretrained(world["tle"]).eval(), {}, False)
    examples = [Example("text", s, "en") for s in sentences]
    text = encode_texts(tokenizer, specials, sentences, ["en"] * len(sentences), model.config.max_target_positions)
    with torch.no_grad():
        logits = model(
            encoder_outputs=(windows.build(examples, text, training=False),), decoder_input_ids=text.decoder_input_ids
        ).logits
        return float(token_losses(logits, text.labels, 0.0).sum() / (text.labels != IGNORE_INDEX).sum())


def test_finetune_trains_only_the_decoder_lowers_the_text_loss_and_saves_a_pipeline_model(world, tmp_path):
    from transformers import pipeline

    from stages.finetune import run

    out = tmp_path / "adapted"
    config = finetune_config(
        world,
        out,
        "finetune.steps=30",
        "finetune.val_every=10",
        "finetune.checkpoint_every=15",
        "finetune.audio_ratio=0.25",
        "finetune.tts_ratio=0.25",
        f"finetune.val_audio={json.dumps(str(world['val_audio']))}",
        "finetune.select_by=loss",
    )
    result = run(config)

    teacher = load_file(str(world["teacher"] / "model.safetensors"))
    adapted = load_file(str(out / "model.safetensors"))
    assert set(teacher) == set(adapted)
    changed = {name for name in teacher if not torch.equal(teacher[name], adapted[name])}
    assert changed, "nothing trained"
    assert all(
        name.startswith("model.decoder.layers.") or name.startswith("model.decoder.layer_norm.") for name in changed
    ), sorted(changed)
    assert not any(name.startswith("model.encoder.") for name in changed)  # encoder bit-identical
    assert "model.decoder.embed_tokens.weight" not in changed and "model.decoder.embed_positions.weight" not in changed

    before, after = text_loss(world["teacher"], world, TARGET_SENTENCES), text_loss(out, world, TARGET_SENTENCES)
    assert after < 0.6 * before, (before, after)

    # the kinds were mixed at the configured fractions, exactly: 30 steps x 8 examples
    assert result.examples_seen == {"audio": 60, "tts": 60, "text": 120}
    assert [v["step"] for v in result.validation] == [10, 20, 30]
    assert {"loss_audio", "loss_tts", "loss_text", "wer", "loops"} <= set(result.validation[-1])
    assert result.validation[-1]["loss_text"] < result.validation[0]["loss_text"]
    assert result.saved_step == result.best_step == min(result.validation, key=lambda v: v["loss"])["step"]
    with open(out / "validation.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [10, 20, 30]
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["saved_step"] == result.saved_step and summary["held_out"]["val_audio"] == 3
    assert (out / "config.toml").exists() and (out / "train_log.csv").exists()
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # train and held-out curves drawn

    asr = pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    transcript = asr(np.zeros(16000, dtype=np.float32), generate_kwargs={"max_new_tokens": 5})
    assert isinstance(transcript["text"], str)


def test_resume_continues_exactly_where_the_run_stopped(world, tmp_path):
    """Run 12 steps straight; run again, 'crash' after step 6 (drop later state), resume: same weights."""
    from stages.finetune import run

    common = (
        "finetune.steps=12",
        "finetune.val_every=6",
        "finetune.checkpoint_every=6",
        "finetune.keep_checkpoints=3",
        "finetune.audio_ratio=0.25",
        "finetune.tts_ratio=0.25",
        "finetune.select_best=false",
    )
    straight = tmp_path / "straight"
    run(finetune_config(world, straight, *common))

    resumed = tmp_path / "resumed"
    run(finetune_config(world, resumed, *common))
    shutil.rmtree(resumed / "checkpoints" / "step-0000012")
    (resumed / "model.safetensors").unlink()
    result = run(finetune_config(world, resumed, *common))
    assert result.resumed_from == 6 and result.steps == 12
    assert result.examples_seen == {"audio": 24, "tts": 24, "text": 48}  # counted over both parts

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    with open(resumed / "train_log.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == list(range(1, 13))

    with pytest.raises(Exception, match="other settings"):
        run(finetune_config(world, resumed, *common[1:], "finetune.steps=14", "finetune.learning_rate=1e-3"))


def test_mix_counts_hold_the_fractions_exactly():
    from stages.finetune_data import mix_counts

    totals = {"audio": 0, "tts": 0, "text": 0}
    for index in range(100):
        counts = mix_counts(7, 0.3, 0.2, index)
        assert sum(counts.values()) == 7 and all(v >= 0 for v in counts.values())
        for kind, n in counts.items():
            totals[kind] += n
    assert totals == {"audio": 210, "tts": 140, "text": 350}
    assert mix_counts(8, 0.0, 0.0, 5) == {"audio": 0, "tts": 0, "text": 8}
    assert mix_counts(8, 0.5, 0.5, 3) == {"audio": 4, "tts": 4, "text": 0}


def test_kind_sums_add_each_kinds_token_losses_and_label_tokens_on_the_device():
    """Per kind, the summed token loss and the label-token count of its rows (a kind's rows may come in
    several runs), as (2,) tensors: no float read back for the log or the non-finite guard."""
    from whistle_pipeline.text import IGNORE_INDEX
    from whistle_pipeline.windows import kind_sums

    per_token = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0], [4.0, 4.0, 4.0], [8.0, 0.0, 0.0]])  # (4, 3)
    labels = torch.tensor([[5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX], [1, 2, 3], [9, IGNORE_INDEX, 0]])
    sums = kind_sums(per_token, labels, ["audio", "audio", "text", "audio"])
    assert list(sums) == ["audio", "text"] and all(isinstance(pair, torch.Tensor) for pair in sums.values())
    assert sums["audio"].tolist() == [1.0 + 2.0 + 0.5 + 8.0, 2 + 1 + 2] and sums["text"].tolist() == [12.0, 3]


def test_labels_prefix_and_language_tokens_come_from_the_tokenizer(world, tmp_path):
    """A multilingual teacher: the decoder gets <|sot|> <|lang|> <|transcribe|> <|notimestamps|> + text,
    padding never reaches the inputs as -100, and the loss skips the prefix."""
    from stages.finetune import run
    from whistle_pipeline.text import IGNORE_INDEX
    from whistle_pipeline.windows import token_losses

    root = tmp_path / "multi"
    teacher = make_teacher(root / "teacher", multilingual=True)
    store = write_store(root / "store", teacher, TARGET_SENTENCES[:16], seed=3, languages=["en", "de"])
    tle = write_tle(root / "tle", teacher, store, ["en", "de"])
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"text": s, "lang": "de" if i % 2 else "en"}) for i, s in enumerate(TARGET_SENTENCES)),
        encoding="utf-8",
    )

    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    vocab = tokenizer.get_vocab()
    seen_inputs = []
    original = WhisperForConditionalGeneration.forward

    def spy(self, *args, **kwargs):
        if self.training:
            seen_inputs.append(kwargs["decoder_input_ids"].clone())
        return original(self, *args, **kwargs)

    WhisperForConditionalGeneration.forward = spy
    try:
        run(
            load_config(
                overrides=[
                    f"teacher.name_or_path={json.dumps(str(teacher))}",
                    f"finetune.tle_path={json.dumps(str(tle))}",
                    f"finetune.text={json.dumps(str(corpus))}",
                    "finetune.language_column=lang",
                    f"finetune.audio_store={json.dumps(str(store))}",
                    "finetune.audio_ratio=0.5",
                    f"finetune.output_dir={json.dumps(str(root / 'out'))}",
                    "finetune.steps=3",
                    "finetune.val_every=3",
                    "finetune.checkpoint_every=3",
                    *TINY,
                ]
            )
        )
    finally:
        WhisperForConditionalGeneration.forward = original
    assert len(seen_inputs) == 3
    prefixes = {tuple(row[:4].tolist()) for batch in seen_inputs for row in batch}
    expected = {
        tuple(vocab[t] for t in ("<|startoftranscript|>", f"<|{code}|>", "<|transcribe|>", "<|notimestamps|>"))
        for code in ("en", "de")
    }
    assert prefixes == expected
    assert all((batch >= 0).all() for batch in seen_inputs)

    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX]])
    per_token = token_losses(logits, labels, 0.0)
    manual = -torch.log_softmax(logits[0], -1)[torch.tensor([1, 2]), torch.tensor([3, 4])]
    assert torch.allclose(per_token[0, 1:3], manual) and (per_token[0, [0, 3, 4]] == 0).all()


def test_inputs_are_checked_all_at_once(world, tmp_path):
    config = load_config(
        overrides=[
            "finetune.audio_ratio=0.5",
            "finetune.tts_ratio=0.2",
            'finetune.text=""',
            f"finetune.tle_path={json.dumps(str(tmp_path / 'none'))}",
        ]
    )
    message = "\n".join(finetune_ratio_problems(config) + finetune_input_problems(config, None))
    assert "finetune.text is empty" in message and f"tle_path = {str(tmp_path / 'none')!r} does not exist" in message
    assert "audio_store is empty" in message and "tts_store is empty" in message
    # audio-only (TTS-only baseline): no text, no TLE needed
    assert not finetune_ratio_problems(
        finetune_config(
            world,
            tmp_path,
            "finetune.audio_ratio=0.5",
            "finetune.tts_ratio=0.5",
            'finetune.text=""',
            'finetune.tle_path=""',
        )
    )


def test_null_text_windows_are_the_store_tail_template_over_the_whole_window(world):
    from transformers import AutoTokenizer

    from store import StoreReader
    from whistle_pipeline.text import SpecialTokens, encode_texts
    from whistle_pipeline.windows import Example, Windows

    reader = StoreReader(str(world["audio_store"]))
    template = torch.from_numpy(np.array(reader.tail_template()))  # (F, D)
    windows = Windows(None, {"audio": template, "text": template}, sample_latent=True)
    utterance = reader.utterance(0, 0)
    stored = torch.from_numpy(np.array(utterance.states))  # (T, D) float16
    examples = [Example("audio", utterance.text, "en", stored)] + [
        Example("text", s, "en") for s in TARGET_SENTENCES[:3]
    ]
    tokenizer = AutoTokenizer.from_pretrained(world["teacher"])
    text = encode_texts(
        tokenizer,
        SpecialTokens.from_tokenizer(tokenizer, False),
        [e.text for e in examples],
        ["en"] * len(examples),
        64,
    )
    window, tail = windows.build_with_tail(examples, text, training=True)
    assert window.shape == (4, MAX_FRAMES, D_MODEL)
    for row in range(1, 4):  # every text window is the template, frame for frame: nothing of its sentence
        assert torch.equal(window[row], template)
    assert torch.equal(window[0, : len(stored)], stored.float()) and torch.equal(
        window[0, len(stored) :], template[len(stored) :]
    )
    assert tail.start == len(stored) and tail.groups == ((0, 1), (1, 4))
    only_text, tail = windows.build_with_tail(examples[1:], text, training=False)
    assert only_text.shape == (3, MAX_FRAMES, D_MODEL) and tail.start == 0
    assert torch.equal(only_text, template.expand(3, -1, -1))


def test_null_text_states_need_no_tle_and_a_store_for_the_template(world, tmp_path):
    missing = json.dumps(str(tmp_path / "no-tle"))
    assert not finetune_ratio_problems(
        finetune_config(
            world,
            tmp_path,
            'finetune.text_states="null"',
            f"finetune.tle_path={missing}",
            f"finetune.audio_store={json.dumps(str(world['audio_store']))}",
            stores=False,
        )
    )
    config = load_config(
        overrides=[
            'finetune.text_states="null"',
            "finetune.audio_ratio=0",
            'finetune.tle_path=""',
            f"finetune.text={json.dumps(str(world['text']))}",
        ]
    )
    assert any("tail template from a store" in problem for problem in finetune_ratio_problems(config))
    with pytest.raises(ConfigError, match="text_states"):
        load_config(overrides=['finetune.text_states="zeros"'])


def test_a_null_text_run_reads_no_tle_learns_the_text_and_saves(world, tmp_path):
    from stages.finetune import run

    out, missing = tmp_path / "text-null", tmp_path / "no-tle"
    result = run(
        finetune_config(
            world,
            out,
            'finetune.text_states="null"',
            f"finetune.tle_path={json.dumps(str(missing))}",
            f"finetune.audio_store={json.dumps(str(world['audio_store']))}",
            "finetune.audio_ratio=0.5",
            "finetune.steps=12",
            "finetune.val_every=6",
            "finetune.checkpoint_every=12",
            stores=False,
        )
    )
    assert not missing.exists()  # a TLE would have been loaded from here: nothing was required or read
    assert result.examples_seen == {"audio": 48, "tts": 0, "text": 48}
    assert result.held_out["text"] > 0 and result.held_out["audio"] > 0
    # the held-out sentences' loss on content-free windows falls: the decoder learns the text's language model
    assert result.validation[-1]["loss_text"] < 0.9 * result.validation[0]["loss_text"]
    teacher, adapted = load_file(str(world["teacher"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {name for name in teacher if not torch.equal(teacher[name], adapted[name])}
    assert changed and all(name.startswith("model.decoder.") for name in changed)
    assert json.loads((out / "finetune.json").read_text())["saved_step"] == result.saved_step


def test_cli_runs_a_tts_only_finetune(world, tmp_path):
    from whistle_pipeline.cli import cli

    out = tmp_path / "tts-only"
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            "--teacher",
            str(world["teacher"]),
            "--audio-store",
            str(world["audio_store"]),
            "--tts-store",
            str(world["tts_store"]),
            "--audio-ratio",
            "0.5",
            "--tts-ratio",
            "0.5",
            "--tle",
            "",
            "--output-dir",
            str(out),
            "--steps",
            "4",
            "--device",
            "cpu",
            *sum((["--set", s] for s in TINY), []),
            "--set",
            "finetune.val_every=2",
            "--set",
            "finetune.checkpoint_every=4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "fine-tuned the decoder for 4 steps" in result.output and "16 audio, 16 tts" in result.output
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists()


@pytest.mark.slow
def test_two_processes_fine_tune_one_decoder(world, tmp_path):
    """torchrun with 2 gloo ranks: each draws its own examples (stores split by rank, text by stride),
    gradients are averaged, one model, per-rank resume state."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "whistle_pipeline",
        "finetune",
        "--teacher",
        str(world["teacher"]),
        "--tle",
        str(world["tle"]),
        "--text",
        str(world["text"]),
        "--audio-store",
        str(world["audio_store"]),
        "--audio-ratio",
        "0.5",
        "--output-dir",
        str(out),
        "--steps",
        "4",
    ]
    for override in TINY + ["finetune.val_every=4", "finetune.checkpoint_every=2", "finetune.batch_size=4"]:
        command += ["--set", override]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["examples_seen"] == {"audio": 16, "tts": 0, "text": 16}  # 4 steps x 4 examples x 2 ranks
    last = out / "checkpoints" / "step-0000004"
    assert {"state-rank0.json", "state-rank1.json", "COMPLETE"} <= {p.name for p in last.iterdir()}
    positions = [json.loads((last / f"state-rank{r}.json").read_text())["positions"] for r in (0, 1)]
    assert positions[0]["text"] == positions[1]["text"] == [0, 8]  # each rank took 8 of its own sentences
    with open(out / "train_log.csv", newline="") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4]
    assert (out / "model.safetensors").exists()


def test_shared_tail_gives_the_same_logits_and_gradients_and_leaves_the_checkpoint_alone(world, tmp_path):
    """A batch of three kinds (three different tail templates): projecting each kind's common tail once must
    give exactly what projecting every example's frames gives, in the outputs and in the weights' gradients."""
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    from store import StoreReader
    from whistle_pipeline.text import IGNORE_INDEX, SpecialTokens, encode_texts
    from whistle_pipeline.tle import TLEModel
    from whistle_pipeline.windows import Example, SharedTail, Windows, token_losses

    model = WhisperForConditionalGeneration.from_pretrained(world["teacher"]).train()
    tokenizer = AutoTokenizer.from_pretrained(world["teacher"])
    specials = SpecialTokens.from_tokenizer(tokenizer, False)
    templates = {
        kind: torch.from_numpy(np.array(StoreReader(str(world[f"{kind}_store"])).tail_template())).float()
        for kind in ("audio", "tts")
    }
    assert not torch.equal(templates["audio"], templates["tts"])  # the groups really differ
    windows = Windows(TLEModel.from_pretrained(world["tle"]).eval(), templates, False)
    rng = np.random.default_rng(3)
    examples = [Example("text", s, "en") for s in TARGET_SENTENCES[:3]]
    examples += [
        Example(kind, s, "en", torch.from_numpy(rng.normal(0, 1, (int(n), D_MODEL)).astype(np.float16)))
        for kind, s, n in (
            ("audio", "the quick fox", 20),
            ("audio", "hello world", 35),
            ("tts", "take two tablets daily", 12),
            ("tts", "a rash since monday", 28),
        )
    ]
    text = encode_texts(
        tokenizer, specials, [e.text for e in examples], ["en"] * len(examples), model.config.max_target_positions
    )
    window, tail = windows.build_with_tail(examples, text, training=False)
    assert tail.groups == ((0, 3), (3, 5), (5, 7))
    assert 35 <= tail.start < MAX_FRAMES
    for first, end in tail.groups:  # what the sharing relies on: the frames from tail.start on are common
        assert torch.equal(
            window[first:end, tail.start :], window[first : first + 1, tail.start :].expand(end - first, -1, -1)
        )
    keys = sorted(model.state_dict())
    shared = SharedTail(model)

    def run(share: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with shared(tail if share else None):
            logits = model(encoder_outputs=(window,), decoder_input_ids=text.decoder_input_ids).logits
        loss = token_losses(logits, text.labels, 0.0).sum() / (text.labels != IGNORE_INDEX).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "encoder_attn" in n and p.grad is not None}
        return logits.detach(), grads

    calls = []
    original = torch.nn.functional.linear
    plain_logits, plain_grads = run(False)
    torch.nn.functional.linear = lambda x, *a: calls.append(x.shape) or original(x, *a)
    try:
        shared_logits, shared_grads = run(True)
    finally:
        torch.nn.functional.linear = original
    assert any(shape[1] == MAX_FRAMES - tail.start and shape[0] == 1 for shape in calls)  # the tail was shared
    assert torch.allclose(shared_logits, plain_logits, atol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) >= 4
    for name in plain_grads:
        assert torch.allclose(shared_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4), name
    assert sorted(model.state_dict()) == keys  # nothing renamed: save_pretrained writes the same checkpoint
    model.save_pretrained(tmp_path / "saved")
    assert sorted(load_file(tmp_path / "saved" / "model.safetensors")) == sorted(
        load_file(Path(world["teacher"]) / "model.safetensors")
    )


def test_a_run_in_bf16_then_one_in_fp32_follow_each_other_in_one_process(tmp_path):
    """accelerate keeps one process-wide state: train-tle in bf16 then finetune in fp32 (the demo on a CPU
    without native bf16 after one with it, a notebook) must each get the precision they asked for."""
    from stages.training import make_accelerator

    first, _ = make_accelerator("cpu", "bf16", 1, tmp_path / "a")
    assert first.mixed_precision == "bf16"
    second, _ = make_accelerator("cpu", "no", 2, tmp_path / "b")
    assert (second.mixed_precision, second.gradient_accumulation_steps) == ("no", 2)


def test_stored_utterances_the_decoder_cannot_take_are_left_out_and_counted(world, tmp_path):
    """One over-long transcript (480 tokens for 64 positions) and one empty one in the audio store: counted
    and skipped with their reasons, as train-tle skips them, instead of stopping the run at their batch."""
    from stages.finetune import run

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(SOURCE_WORDS, size=int(rng.integers(2, 6)))) for _ in range(16)]
    texts[3], texts[9] = " ".join(["hello world"] * 60), "   "
    store = write_store(tmp_path / "long-store", world["teacher"], texts, seed=5)
    result = run(
        finetune_config(
            world,
            tmp_path / "out",
            "finetune.steps=3",
            "finetune.audio_ratio=1",
            "finetune.tts_ratio=0",
            "finetune.tle_path=''",
            "finetune.text=''",
            f"finetune.audio_store={json.dumps(str(store))}",
            stores=False,
        )
    )
    assert result.store_rejects == [
        {"store": "audio", "id": "utt5-003", "reason": "480 text tokens exceed the decoder's 64 positions"},
        {"store": "audio", "id": "utt5-009", "reason": "empty transcript"},
    ]
    assert (result.train_examples["audio"], result.examples_seen["audio"]) == (14, 24)
    assert "2 stored utterance(s) not used (first: audio utt5-003: 480 text tokens" in result.summary()


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_no_model(world, tmp_path):
    """finetune.learning_rate=inf is refused by the config; 1e30 (finite) trains NaN from step 2: the run stops
    at its next check, names that step, the loss terms and the gradient norm, and writes no model (it used to
    save 50 of 74 tensors NaN)."""
    from stages.finetune import run
    from stages.training import NonFiniteStep

    with pytest.raises(ConfigError, match="finetune.learning_rate = inf should be a finite number"):
        finetune_config(world, tmp_path / "inf", "finetune.learning_rate=inf")
    out = tmp_path / "nan"
    with pytest.raises(
        NonFiniteStep, match=r"^step 2: non-finite loss, loss_audio, loss_tts, loss_text, gradient norm \(loss nan"
    ):
        run(
            finetune_config(
                world,
                out,
                "finetune.steps=6",
                "finetune.learning_rate=1e30",
                "finetune.warmup_steps=0",
                "finetune.audio_ratio=0.25",
                "finetune.tts_ratio=0.25",
                "finetune.val_every=100",
            )
        )
    assert not (out / "model.safetensors").exists()


@pytest.mark.espeak
def test_a_tle_with_a_pronunciation_front_end_gives_its_text_examples_their_phonemes(world, tmp_path):
    """finetune takes the front end from the TLE alone: its text windows are the TLE's reading of each row's
    phonemes (the same as one row alone, between stored examples), and a run trains and validates on them."""
    from transformers import AutoTokenizer

    from stages.finetune import run
    from whistle_pipeline.pronunciation import PronunciationFrontEnd
    from whistle_pipeline.text import SpecialTokens, encode_texts
    from whistle_pipeline.tle import TLEModel
    from whistle_pipeline.windows import Example, Windows

    tle_dir = write_tle(
        tmp_path / "spoken-tle", world["teacher"], world["audio_store"], ["en"], PronunciationFrontEnd().to_dict()
    )
    tle = TLEModel.from_pretrained(tle_dir).eval()
    windows = Windows(tle, {"audio": tle.tail_template}, False)
    assert windows.front_end is tle.front_end
    tokenizer = AutoTokenizer.from_pretrained(world["teacher"])
    specials = SpecialTokens.from_tokenizer(tokenizer, False)
    states = torch.zeros(4, D_MODEL)
    examples = [Example("audio", "the dog", "en", states), *(Example("text", s, "en") for s in TARGET_SENTENCES[:2])]
    texts = [e.text for e in examples]
    batch = encode_texts(tokenizer, specials, texts, ["en"] * 3, 64, windows.front_end)
    alone = encode_texts(tokenizer, specials, texts[2:], ["en"], 64, windows.front_end)
    with torch.no_grad():
        speech, lengths = tle.speech_frames(
            alone.tle_tokens, alone.tle_mask, tle.language_ids(["en"]), pronunciation=alone.pronunciation
        )
    torch.testing.assert_close(windows.build(examples, batch, training=False)[2], tle.full_window(speech, lengths)[0])

    out = tmp_path / "adapted"
    result = run(
        finetune_config(
            world,
            out,
            f"finetune.tle_path={json.dumps(str(tle_dir))}",
            "finetune.steps=4",
            "finetune.val_every=4",
            "finetune.checkpoint_every=4",
            "finetune.audio_ratio=0.25",
            "finetune.tts_ratio=0.25",
        )
    )
    assert result.examples_seen["text"] == 16 and np.isfinite(result.validation[-1]["loss_text"])
