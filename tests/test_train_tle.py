"""`whistle train-tle` end to end on a tiny store written with StoreWriter and a tiny random teacher."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from whistle_pipeline.config import load_config
from whistle_pipeline.errors import WhistleError

WORDS = "the quick brown fox jumps over lazy dog hello world whisper reads speech from text one two three".split()
D_MODEL, MAX_FRAMES, FRAMES_PER_TOKEN = 32, 100, 3


def write_tle_store(
    url: Path,
    teacher_dir: Path,
    n: int = 32,
    shard_size: int = 8,
    seed: int = 0,
    max_frames: int = MAX_FRAMES,
    languages: tuple[str, ...] = ("en",),
) -> Path:
    """Utterances whose states are a fixed vector per token (3 frames each) + noise, a constant-ish tail."""
    from transformers import AutoTokenizer

    from store import StoreSpec, StoreWriter, TeacherInfo
    from whistle_pipeline.text import text_tokens

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rng = np.random.default_rng(seed)
    token_vectors = rng.normal(0.0, 1.0, (len(tokenizer), D_MODEL)) + rng.normal(0.0, 2.0, D_MODEL)
    tail_vector = rng.normal(0.0, 1.0, D_MODEL)
    teacher = TeacherInfo(str(teacher_dir), "main", D_MODEL, 80, 16000, 320, 50, max_frames)
    spec = StoreSpec(teacher, "speech", 2, shard_size, 64, "blosc-lz4", 3, 0, f"tle-test-{seed}", "none")
    writer = StoreWriter.open(str(url), spec)
    for k in range(-(-n // shard_size)):
        with writer.shard(k) as shard:
            for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
                text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
                ids = text_tokens(tokenizer, text)
                speech = np.repeat(token_vectors[ids], FRAMES_PER_TOKEN, axis=0)
                speech = np.concatenate([speech, np.tile(tail_vector, (2, 1))])  # the 2-frame margin
                states = (speech + rng.normal(0.0, 0.1, speech.shape)).astype(np.float16)
                tail = (tail_vector + rng.normal(0.0, 0.1, (max_frames - len(states), D_MODEL))).astype(np.float16)
                shard.add(f"utt{i:03d}", text, languages[i % len(languages)], len(states) / 50, states, tail=tail)
    return url


TINY_TLE = [
    "tle.hidden_size=32",
    "tle.text_layers=1",
    "tle.frame_layers=1",
    "tle.num_heads=2",
    "tle.ffn_multiplier=2",
    "tle.latent_size=4",
    "tle.conv_layers=1",
    "tle.dropout=0.0",
    "train_tle.batch_size=8",
    "train_tle.warmup_steps=2",
    "train_tle.learning_rate=3e-3",
    "train_tle.num_workers=0",
    "train_tle.shuffle_buffer=16",
    "train_tle.length_bucket=0",
    "train_tle.val_fraction=0.2",
    "train_tle.val_size=4",
    "train_tle.val_wer_size=2",
    "train_tle.log_every=1",
    "train_tle.progress=false",
    "train_tle.kl_anneal_steps=10",
]


def tle_config(store: Path, teacher_dir: Path, output_dir: Path, *overrides: str):
    return load_config(
        overrides=[
            f"store.path={json.dumps(str(store))}",
            f"teacher.name_or_path={json.dumps(str(teacher_dir))}",
            f"train_tle.output_dir={json.dumps(str(output_dir))}",
            *TINY_TLE,
            *overrides,
        ]
    )


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tle_store(tiny_teacher_dir, tmp_path_factory):
    return write_tle_store(tmp_path_factory.mktemp("tle-store") / "store", tiny_teacher_dir)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def use_true_alignment(output_dir: Path) -> None:
    """Replace the cached teacher alignment by the store's true one (3 frames per token, 2 for the end).

    A tiny random teacher cannot align speech: its durations are noise, which the TLE can only learn
    around slowly. A real teacher's alignment heads follow the speech (see bench/RESULTS.md).
    """
    for path in (output_dir / "durations").glob("0*.json"):
        record = json.loads(path.read_text())
        record["durations"] = {i: [FRAMES_PER_TOKEN] * (len(d) - 1) + [2] for i, d in record["durations"].items()}
        path.write_text(json.dumps(record))


def test_tiny_tle_overfits_a_tiny_store(tle_store, tiny_teacher_dir, tmp_path):
    from stages.train_tle import run
    from whistle_pipeline.tle import TLEModel

    out = tmp_path / "tle"
    run(tle_config(tle_store, tiny_teacher_dir, out, "train_tle.steps=3"))  # aligns the store into out/durations
    aligned = json.loads(next((out / "durations").glob("0*.json")).read_text())["durations"]
    assert all(sum(d) == FRAMES_PER_TOKEN * (len(d) - 1) + 2 for d in aligned.values())  # they cover the speech
    use_true_alignment(out)
    config = tle_config(
        tle_store,
        tiny_teacher_dir,
        out,
        "train_tle.steps=100",
        "train_tle.decoder_ce_start=80",
        "train_tle.val_every=50",
        "train_tle.checkpoint_every=50",
        "train_tle.resume=false",
    )
    result = run(config)
    rows = read_log(out / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 101))
    first, last = np.mean([float(r["mse"]) for r in rows[:3]]), np.mean([float(r["mse"]) for r in rows[-3:]])
    assert last < first / 4, f"masked MSE {first:.3f} -> {last:.3f}"
    assert float(rows[-1]["cosine"]) > 0.85
    # phase 2 starts after 80 optimiser steps: the decoder CE is logged from step 81 on, never before
    assert all(r["decoder_ce"] == "" for r in rows[:80]) and all(r["decoder_ce"] != "" for r in rows[80:])
    assert float(rows[80]["decoder_ce_weight"]) == 1.0 and float(rows[79]["decoder_ce_weight"]) == 0.0
    # with the default floor and distillation, phase 2 also reads the real states
    assert all(r["decoder_kl"] == "" and r["real_decoder_ce"] == "" for r in rows[:80])
    assert all(float(r["decoder_kl"]) > 0 and float(r["real_decoder_ce"]) > 0 for r in rows[80:])
    assert float(rows[0]["beta"]) == 0.0 and float(rows[-1]["beta"]) == pytest.approx(0.01)
    validation = read_log(out / "validation.csv")
    assert [int(r["step"]) for r in validation] == [50, 100]
    assert float(validation[-1]["cosine"]) > 0.5  # held-out sentences: the same words in new orders
    assert 0 < float(validation[-1]["cosine_predicted"]) <= 1  # the same at the TLE's own durations
    assert {"wer_predicted", "real_wer", "real_decoder_ce", "cosine", "length_error"} <= set(result.validation)
    assert result.steps == 100 and result.train_utterances + result.held_out_utterances == 32
    for name in ("config.json", "model.safetensors", "config.toml", "loss_curves.png", "summary.json"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")) or list(out.rglob("events.out.tfevents.*"))
    # the saved TLE rebuilds full windows on its own and records the store's teacher
    tle = TLEModel.from_pretrained(out).eval()
    assert tle.config.teacher["max_frames"] == MAX_FRAMES and tle.config.languages == ["en"]
    tokens = torch.tensor([[5, 6, tle.config.end_token_id]])
    with torch.no_grad():
        speech, lengths = tle.speech_frames(tokens, torch.ones_like(tokens, dtype=torch.bool), tle.language_ids(["en"]))
        assert tle.full_window(speech, lengths).shape == (1, MAX_FRAMES, D_MODEL)


def test_loss_weights_switch_to_phase_2_at_decoder_ce_start():
    from stages.tle_model import loss_weights

    settings = load_config(
        overrides=[
            "train_tle.decoder_ce_start=10",
            "train_tle.kl_anneal_steps=20",
            "train_tle.cosine_weight=0.5",
            "train_tle.decoder_ce_weight=1.5",
            "train_tle.decoder_kl_weight=0.7",
        ]
    ).train_tle
    before, after = loss_weights(settings, 9), loss_weights(settings, 10)
    assert (before.cosine, before.decoder_ce, before.decoder_kl) == (0.5, 0.0, 0.0)
    assert (after.cosine, after.decoder_ce, after.decoder_kl) == (0.5, 1.5, 0.7)
    assert before.beta == pytest.approx(settings.kl_beta * 9 / 20) and after.mse == before.mse == settings.mse_weight


def loud_teacher_and_store(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny teacher that reads its input, and a store of it. A random decoder at init barely reads the
    encoder states and is unsure of every token (KL ~1e-5 between two random windows); with its
    cross-attention 3x and its final norm 30x louder it reads them (KL ~0.4), as a real one does."""
    from conftest import make_tiny_teacher
    from transformers import WhisperForConditionalGeneration

    teacher_dir = make_tiny_teacher(tmp_path / "teacher", seed=1)
    whisper = WhisperForConditionalGeneration.from_pretrained(teacher_dir)
    with torch.no_grad():
        for layer in whisper.model.decoder.layers:
            for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj, layer.encoder_attn.out_proj):
                projection.weight.mul_(3.0)
        whisper.model.decoder.layer_norm.weight.mul_(30.0)
    whisper.save_pretrained(teacher_dir)
    return teacher_dir, write_tle_store(tmp_path / "store", teacher_dir)


def phase_2_only(
    tmp_path: Path, teacher_dir: Path, store: Path, name: str, column: str, *overrides: str
) -> tuple[list[dict[str, str]], float]:
    """80 steps with the decoder terms from step 5, a faint regression anchor and the given decoder term ->
    (log rows, mean of `column` over the last 20 steps). Same data order and initialisation for every name."""
    from stages.train_tle import run

    out = tmp_path / name
    run(tle_config(store, teacher_dir, out, "train_tle.steps=3"))  # aligns the store
    use_true_alignment(out)
    run(
        tle_config(
            store,
            teacher_dir,
            out,
            "train_tle.steps=80",
            "train_tle.decoder_ce_start=5",
            "train_tle.decoder_ce_weight=0.0",
            "train_tle.decoder_kl_weight=0.0",
            "train_tle.mse_weight=1e-4",
            "train_tle.cosine_weight=0.0",
            "train_tle.val_every=100",
            "train_tle.val_wer_size=0",
            "train_tle.checkpoint_every=100",
            "train_tle.resume=false",
            *overrides,
        )
    )
    rows = read_log(out / "train_log.csv")
    return rows, float(np.mean([float(r[column]) for r in rows[-20:]]))


def test_distillation_pulls_the_decoders_reading_toward_the_real_states(tmp_path):
    """Phase 2 with the KL term alone (and a faint regression anchor): the frozen decoder's next-token
    distributions on the TLE's windows approach its distributions on the real states."""
    teacher_dir, store = loud_teacher_and_store(tmp_path)
    # the same run, the KL once pulling and once only measured
    rows, pulled = phase_2_only(
        tmp_path, teacher_dir, store, "pulled", "decoder_kl", "train_tle.decoder_kl_weight=10.0"
    )
    _, measured = phase_2_only(
        tmp_path, teacher_dir, store, "measured", "decoder_kl", "train_tle.decoder_kl_weight=1e-6"
    )
    assert all(r["decoder_kl"] == "" for r in rows[:5]) and all(float(r["decoder_kl"]) > 0 for r in rows[5:])
    assert pulled < 0.7 * measured, f"KL {measured:.4f} (measured only) vs {pulled:.4f} (pulled)"


def test_resume_continues_the_same_run(tle_store, tiny_teacher_dir, tmp_path):
    """Stopped at a checkpoint and resumed, a run logs the same losses as one that never stopped."""
    from stages.train_tle import run

    settings = [
        "train_tle.steps=16",
        "train_tle.checkpoint_every=8",
        "train_tle.val_every=100",
        "train_tle.val_wer_size=0",
        "train_tle.decoder_ce_start=10",
        "tle.dropout=0.1",
    ]
    straight = tmp_path / "straight"
    run(tle_config(tle_store, tiny_teacher_dir, straight, *settings))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-0000008", resumed / "checkpoints" / "step-0000008")
    result = run(tle_config(tle_store, tiny_teacher_dir, resumed, *settings))
    assert result.resumed_from == 8
    expected = read_log(straight / "train_log.csv")[8:]
    got = read_log(resumed / "train_log.csv")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for name in ("loss", "mse", "kl", "decoder_ce", "lr"):
        np.testing.assert_allclose(
            [float(r[name] or 0) for r in got],
            [float(r[name] or 0) for r in expected],
            rtol=1e-4,
            atol=1e-6,
            err_msg=name,
        )


def test_cli_trains_and_writes_a_loadable_tle(tle_store, tiny_teacher_dir, tmp_path):
    from click.testing import CliRunner

    from whistle_pipeline.cli import cli
    from whistle_pipeline.tle import TLEModel

    out = tmp_path / "cli-tle"
    args = [
        "train-tle",
        "--store",
        str(tle_store),
        "--teacher",
        str(tiny_teacher_dir),
        "--output-dir",
        str(out),
        "--steps",
        "6",
        "--decoder-ce-start",
        "3",
    ]
    for override in TINY_TLE + [
        "train_tle.val_every=6",
        "train_tle.checkpoint_every=6",
        "train_tle.decoder_ce_floor=0.9",
    ]:
        args += ["--set", override]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "trained the TLE for 6 steps" in result.output and "held-out:" in result.output
    rows = read_log(out / "train_log.csv")
    # with a floor, phase 2 also reads the real states: both cross-entropies are logged
    assert all(r["real_decoder_ce"] == "" for r in rows[:3]) and all(float(r["real_decoder_ce"]) > 0 for r in rows[3:])
    assert "decoder_ce_floor = 0.9" in (out / "config.toml").read_text()
    assert TLEModel.from_pretrained(out).config.d_model == D_MODEL
    # a second run finds the finished run's checkpoint and has nothing left to do
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "resumed at step 6" in again.output


def test_resume_refuses_changed_settings_and_names_each(tle_store, tiny_teacher_dir, tmp_path):
    """A changed [tle] key or loss weight is another run: refused with the key, both values and the fix; a
    changed logging frequency continues the run."""
    from stages.train_tle import run

    out = tmp_path / "out"
    settings = [
        "train_tle.steps=3",
        "train_tle.checkpoint_every=3",
        "train_tle.val_every=3",
        "train_tle.val_wer_size=0",
    ]
    run(tle_config(tle_store, tiny_teacher_dir, out, *settings))
    with pytest.raises(
        WhistleError,
        match=r"other settings:\n  - tle\.hidden_size: 32 \(checkpoint\) vs 48 \(now\)"
        r"\nUse a new train_tle\.output_dir, or set train_tle\.resume=false",
    ):
        run(tle_config(tle_store, tiny_teacher_dir, out, *settings, "tle.hidden_size=48"))
    with pytest.raises(WhistleError, match=r"train_tle\.mse_weight: 1\.0 \(checkpoint\) vs 2\.0 \(now\)"):
        run(tle_config(tle_store, tiny_teacher_dir, out, *settings, "train_tle.mse_weight=2.0"))
    assert run(tle_config(tle_store, tiny_teacher_dir, out, *settings, "train_tle.log_every=2")).resumed_from == 3
    # starting over is the way to change them
    assert (
        run(
            tle_config(
                tle_store, tiny_teacher_dir, out, *settings, "train_tle.mse_weight=2.0", "train_tle.resume=false"
            )
        ).resumed_from
        == 0
    )


def test_refuses_a_store_of_another_teacher_geometry(tiny_teacher_dir, tmp_path):
    from stages.train_tle import run

    store = write_tle_store(tmp_path / "store", tiny_teacher_dir, n=8, max_frames=1500)
    with pytest.raises(WhistleError, match="max_frames: 1500 \\(store\\) vs 100 \\(given\\)"):
        run(tle_config(store, tiny_teacher_dir, tmp_path / "out", "train_tle.steps=3"))


def test_refuses_an_empty_store(tiny_teacher_dir, tmp_path):
    from stages.train_tle import run
    from store import StoreSpec, StoreWriter, TeacherInfo

    teacher = TeacherInfo(str(tiny_teacher_dir), "main", D_MODEL, 80, 16000, 320, 50, MAX_FRAMES)
    StoreWriter.open(str(tmp_path / "empty"), StoreSpec(teacher, "speech", 2, 8, 64, "blosc-lz4", 3, 0, "x", "none"))
    with pytest.raises(WhistleError, match="no complete shards.*whistle precompute"):
        run(tle_config(tmp_path / "empty", tiny_teacher_dir, tmp_path / "out", "train_tle.steps=3"))


def test_multilingual_teacher_and_store(tmp_path):
    """A multilingual teacher: language/task prompts in the decoder, one language embedding per store language."""
    from conftest import make_tiny_teacher

    from stages.train_tle import run
    from whistle_pipeline.tle import TLEModel

    teacher = make_tiny_teacher(tmp_path / "teacher", multilingual=True)
    store = write_tle_store(tmp_path / "store", teacher, n=16, languages=("en", "de", "fr"))
    out = tmp_path / "out"
    result = run(
        tle_config(
            store,
            teacher,
            out,
            "train_tle.steps=4",
            "train_tle.decoder_ce_start=2",
            "train_tle.val_every=4",
            "train_tle.val_fraction=0.3",
        )
    )
    # the tiny tokenizer has <|en|>, <|de|>, <|yue|>: French utterances cannot be prompted and are not used
    assert len(result.alignment_rejects) == 5
    assert all("'fr' has no token" in reason for reason in result.alignment_rejects.values())
    tle = TLEModel.from_pretrained(out)
    assert tle.config.languages == ["de", "en"]
    assert "wer_predicted" in result.validation


@pytest.mark.slow
def test_two_processes_train_one_tle(tle_store, tiny_teacher_dir, tmp_path):
    """torchrun with 2 gloo ranks: each streams its own shards, one log, per-rank resume state."""
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
        "train-tle",
        "--store",
        str(tle_store),
        "--teacher",
        str(tiny_teacher_dir),
        "--output-dir",
        str(out),
        "--steps",
        "6",
        "--decoder-ce-start",
        "3",
    ]
    for override in TINY_TLE + ["train_tle.val_every=6", "train_tle.checkpoint_every=3", "train_tle.batch_size=4"]:
        command += ["--set", override]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [int(r["step"]) for r in read_log(out / "train_log.csv")] == list(range(1, 7))
    last = out / "checkpoints" / "step-0000006"
    assert {"state-rank0.json", "state-rank1.json", "COMPLETE"} <= {p.name for p in last.iterdir()}
    assert json.loads((last / "COMPLETE").read_text())["processes"] == 2
    assert (out / "model.safetensors").exists()


def test_validate_tle_groups_real_audio_by_voice(tmp_path):
    """validate-tle --voices: WER per voice over its clips, CE per voice weighted by label tokens, the voice's
    variant (+f3) folded in; a clip the manifest lacks is a clear error, not a KeyError."""
    from stages.validate_tle import per_voice, read_voices
    from whistle_pipeline.config import load_config

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                {"id": "a", "voice": "en-us"},
                {"id": "b", "voice": "en-us+f3"},
                {"id": "c", "voice": "en-gb-scotland"},
            ]
        )
    )
    voice_of = read_voices(str(manifest), ["a", "b", "c"], load_config())
    rows = per_voice(
        voice_of,
        ["a", "b", "c"],
        ["red fox", "the cat sat down", "blue sky"],
        ["red fox", "the cat", "blue"],
        [1.0, 2.0, 0.5],
        [2, 6, 3],
    )
    assert rows["en-us"] == {"clips": 2, "wer": pytest.approx(2 / 6), "decoder_ce": pytest.approx((2 + 12) / 8)}
    assert rows["en-gb-scotland"] == {"clips": 1, "wer": pytest.approx(0.5), "decoder_ce": pytest.approx(0.5)}
    with pytest.raises(WhistleError, match="1 of the store's 4 clips have no row with a voice .*'d'"):
        read_voices(str(manifest), ["a", "b", "c", "d"], load_config())


def test_validate_tle_reads_any_manifest_format_before_computing(tle_store, tmp_path):
    """--voices is read as a precompute source (a CSV here) and checked before the teacher or the TLE is
    loaded: a manifest without a voice column fails at once, naming it, with nothing computed."""
    from click.testing import CliRunner

    from stages.validate_tle import read_voices, stored_ids
    from whistle_pipeline.cli import cli
    from whistle_pipeline.config import load_config

    ids = stored_ids(str(tle_store))
    table = tmp_path / "voices.csv"
    table.write_text(
        "id,audio,text,voice\n" + "".join(f"{utt_id},a.wav,x,en-us+m{i % 3}\n" for i, utt_id in enumerate(ids)),
        encoding="utf-8",
    )
    assert set(read_voices(str(table), ids, load_config()).values()) == {"en-us"}
    table.write_text("id,audio,text\n" + "".join(f"{utt_id},a.wav,x\n" for utt_id in ids), encoding="utf-8")
    args = [
        "validate-tle",
        str(tmp_path),
        "--store",
        str(tle_store),
        "--teacher",
        str(tmp_path / "no-teacher"),
        "--voices",
        str(table),
    ]
    failed = CliRunner().invoke(cli, args)
    assert failed.exit_code == 1 and "voices.csv has no 'voice' column" in failed.output, failed.output


def test_the_voice_cosine_of_a_store_against_itself_is_one(tle_store, tiny_teacher_dir, tmp_path):
    """voice_cosine of a store against itself (every utterance matched by id, re-timed to its own durations)
    is 1, over the utterances validate-tle counts; a store of other sentences is refused."""
    from stages.train_tle import run
    from stages.validate_tle import ValidateTLEOptions, voice_cosine
    from stages.validate_tle import run as validate_run

    out = tmp_path / "tle"
    config = tle_config(tle_store, tiny_teacher_dir, out, "train_tle.steps=3", "train_tle.val_wer_size=0")
    run(config)
    utterances = validate_run(config, ValidateTLEOptions(tle_dir=str(out), store=str(tle_store))).metrics["utterances"]
    assert utterances > 0
    same = voice_cosine(config, str(out), str(tle_store), str(tle_store))
    assert same == {"cosine": pytest.approx(1.0, abs=1e-5), "utterances": utterances, "unmatched": 0}
    other_store = write_tle_store(tmp_path / "other", tiny_teacher_dir, n=8, seed=1)  # the ids, other sentences
    with pytest.raises(WhistleError, match="no utterance of .* matches one of"):
        voice_cosine(config, str(out), str(tle_store), str(other_store))


def test_cli_validates_a_tle_against_the_real_states(tle_store, tiny_teacher_dir, tmp_path):
    """`whistle validate-tle`: the table beside the real states' figures, the text-only round trip, per-voice
    figures and the JSON; a voice manifest that lacks the store's clips fails with the reason."""
    from click.testing import CliRunner

    from stages.train_tle import run
    from whistle_pipeline.cli import cli

    out = tmp_path / "tle"
    run(tle_config(tle_store, tiny_teacher_dir, out, "train_tle.steps=3", "train_tle.val_wer_size=0"))
    manifest = tmp_path / "voices.jsonl"
    manifest.write_text(
        "\n".join(json.dumps({"id": f"utt{i:03d}", "voice": "en-us" if i % 2 else "de+m3"}) for i in range(32))
    )
    text = tmp_path / "target.txt"
    text.write_text("the lazy dog\nhello world\n")
    args = [
        "validate-tle",
        str(out),
        "--store",
        str(tle_store),
        "--teacher",
        str(tiny_teacher_dir),
        "--batch-size",
        "8",
        "--text",
        str(text),
        "--voices",
        str(manifest),
        "--json",
        str(tmp_path / "v.json"),
        "--examples",
        "2",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "round-trip WER, predicted length" in result.output and "real audio per voice" in result.output
    assert "utterances=32" in result.output
    figures = json.loads((tmp_path / "v.json").read_text())
    assert "cosine, predicted lengths (stretched to true)" in result.output
    assert {
        "cosine",
        "cosine_predicted",
        "decoder_ce",
        "real_decoder_ce",
        "wer_true",
        "wer_predicted",
        "real_wer",
        "text_wer_target",
    } <= set(figures)
    assert set(figures["voices"]) == {"en-us", "de"} and figures["voices"]["de"]["clips"] == 16
    assert figures["train_steps"] == 3
    manifest.write_text(json.dumps({"id": "utt000", "voice": "en-us"}))
    failed = CliRunner().invoke(cli, args)
    assert failed.exit_code == 1 and "31 of the store's 32 clips have no row with a voice" in failed.output


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing(tle_store, tiny_teacher_dir, tmp_path):
    """A learning rate of 1e30 (finite, so the config takes it) turns the weights to garbage at step 1: step 2's
    loss is NaN. The run stops there naming the step and the terms; no TLE is written, the step-1 checkpoint
    stays the last one."""
    from stages.train_tle import run
    from stages.training import NonFiniteStep

    out = tmp_path / "tle"
    with pytest.raises(NonFiniteStep, match=r"^step 2: non-finite loss.*\(loss nan, mse nan.*learning rate too high"):
        run(
            tle_config(
                tle_store,
                tiny_teacher_dir,
                out,
                "train_tle.steps=6",
                "train_tle.learning_rate=1e30",
                "train_tle.warmup_steps=0",
                "train_tle.checkpoint_every=1",
                "train_tle.val_every=100",
            )
        )
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]


def set_store_fingerprint(store: Path, fingerprint: str) -> None:
    """Write `fingerprint` as the encoder fingerprint the store records of its teacher."""
    attrs = json.loads((store / "zarr.json").read_text())
    attrs["attributes"]["whistle"]["teacher"]["encoder_fingerprint"] = fingerprint
    (store / "zarr.json").write_text(json.dumps(attrs))


def test_refuses_a_store_of_other_teacher_weights_naming_both_fingerprints(tiny_teacher_dir, tmp_path):
    """Same geometry, other encoder weights: the TLE would learn another teacher's states. Refused before any
    training, with both fingerprints and the fix."""
    from stages.train_tle import run
    from whistle_pipeline.teacher import encoder_fingerprint

    given = encoder_fingerprint([str(tiny_teacher_dir / "model.safetensors")])
    store = write_tle_store(tmp_path / "store", tiny_teacher_dir, n=8)
    set_store_fingerprint(store, "f" * 64)
    with pytest.raises(
        WhistleError,
        match=f"(?s)other encoder weights.*{'f' * 64} \\(store, teacher .*\\) vs {given} "
        "\\(given\\).*Use the teacher that made the store",
    ):
        run(tle_config(store, tiny_teacher_dir, tmp_path / "out", "train_tle.steps=3"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_check_teacher_compares_weights_by_fingerprint_not_by_path(caplog):
    from store import TeacherInfo
    from whistle_pipeline.teacher import check_teacher

    def info(path: str, fingerprint: str) -> TeacherInfo:
        return TeacherInfo(path, "", D_MODEL, 80, 16000, 320, 50, MAX_FRAMES, fingerprint)

    with caplog.at_level("WARNING"):
        check_teacher(info("/a", "1" * 64), info("/b", "1" * 64), "store s", "fix")  # same weights, moved
    assert caplog.text == ""
    with pytest.raises(WhistleError, match="other encoder weights"):
        check_teacher(info("/a", "1" * 64), info("/a", "2" * 64), "store s", "fix")  # same path, replaced
    with caplog.at_level("WARNING"):
        check_teacher(info("/a", ""), info("/a", "2" * 64), "store s", "fix")  # a store from before: a warning
    assert "records no fingerprint" in caplog.text


@pytest.mark.espeak
def test_train_tle_with_the_pronunciation_front_end_records_it_and_validate_tle_reads_it(
    tle_store, tiny_teacher_dir, tmp_path
):
    """`--set tle.pronunciation=espeak`: the TLE trains on its tokens' phonemes, its config records the front
    end, and validate-tle (which takes the front end from the TLE alone) reads it."""
    from click.testing import CliRunner

    from stages.train_tle import run
    from whistle_pipeline.cli import cli
    from whistle_pipeline.pronunciation import PronunciationFrontEnd
    from whistle_pipeline.tle import TLEModel

    out = tmp_path / "tle"
    spoken = ("tle.pronunciation=espeak", "tle.phoneme_channels=8", "train_tle.val_wer_size=0")
    result = run(tle_config(tle_store, tiny_teacher_dir, out, "train_tle.steps=3", *spoken))
    assert result.steps == 3 and np.isfinite(result.validation["cosine"])
    tle = TLEModel.from_pretrained(out).eval()
    assert tle.config.pronunciation == PronunciationFrontEnd().to_dict() and tle.config.phoneme_channels == 8
    assert tle.front_end is not None and tle.phoneme_encoder.conv.out_channels == 8
    text = tmp_path / "target.txt"
    text.write_text("the lazy dog\nhello world\n")
    args = ["validate-tle", str(out), "--store", str(tle_store), "--teacher", str(tiny_teacher_dir)]
    args += ["--batch-size", "8", "--text", str(text), "--json", str(tmp_path / "v.json")]
    args += ["--figure", str(tmp_path / "example.png")]
    validated = CliRunner().invoke(cli, args)
    assert validated.exit_code == 0, validated.output
    figures = json.loads((tmp_path / "v.json").read_text())
    assert np.isfinite(figures["cosine"]) and "text_wer_target" in figures
    assert (tmp_path / "example.png").exists()


@pytest.mark.espeak
def test_the_front_end_warns_once_for_each_store_language_it_cannot_speak(caplog):
    from stages.tle_model import pronunciation_front_end

    assert pronunciation_front_end("none", ["en", "yo"]) is None
    with caplog.at_level(logging.WARNING, logger="whistle_pipeline.pronunciation"):
        front_end = pronunciation_front_end("espeak", ["en", "yo"])
        front_end.word_phonemes(["ọjà"], "yo")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'yo'" in warnings[0]
