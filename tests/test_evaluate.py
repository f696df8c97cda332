"""`whistle evaluate` on a set whose WER is known by hand: scripted Whisper models whose transcripts are
fixed by construction, real generation, real audio decoding, real normalisation and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_teacher, write_clip

from stages.evaluate import run
from stages.evaluate_result import word_diff
from whistle_pipeline.cli import cli
from whistle_pipeline.config import load_config
from whistle_pipeline.text import text_tokens
from whistle_pipeline.transcribe import Named, load_model

SCRIPT_SCALE = 10.0  # position signal against the (unit) token signal: the scripted token always wins


def script_decoder(model, tokenizer, script: list[int], prompt_length: int, cycle: bool) -> None:
    """Make the decoder emit `script` (token ids) after a prompt of `prompt_length`, whatever the audio;
    with `cycle`, the script repeats forever, else its last token does.

    Every decoder layer's residual contribution is zeroed, so the last hidden state is
    LayerNorm(token embedding + position embedding). Each scripted token k gets its own axis e_k as
    embedding (all other tokens 0); position p carries SCRIPT_SCALE * e_(token emitted at p), so the
    logits (tied embeddings) peak at the scripted token.
    """
    decoder = model.model.decoder
    axes = {token: axis for axis, token in enumerate(dict.fromkeys(script))}
    assert len(axes) < model.config.d_model
    with torch.no_grad():
        for layer in decoder.layers:
            for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
        decoder.layer_norm.weight.fill_(1.0)
        decoder.layer_norm.bias.zero_()
        decoder.embed_tokens.weight.zero_()
        for token, axis in axes.items():
            decoder.embed_tokens.weight[token, axis] = 1.0
        decoder.embed_positions.weight.zero_()
        for position in range(decoder.embed_positions.weight.shape[0]):
            step = max(position - prompt_length + 1, 0)
            token = script[step % len(script) if cycle else min(step, len(script) - 1)]
            decoder.embed_positions.weight[position, axes[token]] = SCRIPT_SCALE


def scripted_model(teacher_dir: Path, out: Path, words: str, end: bool) -> Path:
    """A copy of the tiny teacher (same encoder) that transcribes everything as `words` (+ the end token
    if `end`, else `words` over and over, never ending)."""
    from transformers import (
        AutoTokenizer,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    model = WhisperForConditionalGeneration.from_pretrained(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    tokens = text_tokens(tokenizer, words)
    eos = model.generation_config.eos_token_id
    # English-only prompt: <|startoftranscript|> <|notimestamps|>
    script_decoder(model, tokenizer, tokens + [eos] if end else tokens, prompt_length=2, cycle=not end)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor.from_pretrained(teacher_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    teacher = make_tiny_teacher(root / "teacher")
    return {
        "hello": scripted_model(teacher, root / "hello", "hello world", end=True),
        "looper": scripted_model(teacher, root / "looper", "hello world", end=False),
    }


@pytest.fixture(scope="module")
def audio_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-set")
    rows = [
        ("a", "Hello world!", 1.0),
        ("b", "hello there world", 1.5),
        ("c", "Goodbye.", 0.8),
        ("long", "too long for the window", 3.0),
    ]
    with open(folder / "manifest.jsonl", "w") as handle:
        for clip_id, text, seconds in rows:
            write_clip(folder / f"{clip_id}.wav", seconds, 16000, seed=len(text))
            handle.write(json.dumps({"audio": f"{clip_id}.wav", "text": text, "id": clip_id}) + "\n")
        handle.write(json.dumps({"audio": "missing.wav", "text": "gone", "id": "missing"}) + "\n")
    return folder / "manifest.jsonl"


def edit_distance(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def test_known_set_gives_the_hand_computed_wer(models, audio_set, tmp_path):
    config = load_config(
        updates={
            "teacher": {"device": "cpu"},
            "data": {"id_column": "id"},
            "evaluate": {
                "models": [f"scripted={models['hello']}", f"looper={models['looper']}"],
                "sets": [f"known={audio_set}"],
                "output_dir": str(tmp_path / "eval"),
                "batch_size": 2,
                "max_new_tokens": 12,
            },
        }
    )
    result = run(config)

    hello = result.score("scripted", "known")
    assert [c.hypothesis for c in hello.clips] == ["hello world"] * 3
    # a: 0 errors / 2 words; b: 1 deletion / 3 words; c: 1 substitution + 1 insertion / 1 word
    assert [(c.id, c.word_errors, c.ref_words) for c in hello.clips] == [("a", 0, 2), ("b", 1, 3), ("c", 2, 1)]
    assert hello.wer == pytest.approx(3 / 6)
    refs, hyp = ["hello world", "hello there world", "goodbye"], "hello world"
    assert hello.cer == pytest.approx(sum(edit_distance(r, hyp) for r in refs) / sum(len(r) for r in refs))
    assert hello.loops == []
    assert {r["id"] for r in result.rejects["known"]} == {"long", "missing"}

    looper = result.score("looper", "known")
    assert looper.loops == ["a", "b", "c"]  # never ends: cut off at max_new_tokens
    assert all(c.hypothesis.startswith("hello world hello") for c in looper.clips)

    out = Path(result.output_dir)
    saved = json.loads((out / "results.json").read_text())
    assert {(s["model"], s["set"]): s["wer"] for s in saved["scores"]}[("scripted", "known")] == pytest.approx(0.5)
    lines = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert [(row["id"], row["word_errors"]["scripted"]) for row in lines] == [("a", 0), ("b", 1), ("c", 2)]
    assert "| known | 3 | 50.0" in (out / "table.md").read_text()
    diffs = (out / "diffs.md").read_text()
    assert "3 of 3 clips changed" in diffs and "<- LOOP" in diffs and "hello world {+hello" in diffs


def test_models_with_one_encoder_share_the_encoder_pass(models):
    loaded = [
        load_model(Named(label=k, path=str(p)), "main", torch.device("cpu"), "float32", "sdpa")
        for k, p in models.items()
    ]
    assert loaded[0].encoder_key == loaded[1].encoder_key


def test_word_diffs():
    assert (
        word_diff("take two tablets daily", "take two tablet daily please")
        == "take two [-tablets-] {+tablet+} daily {+please+}"
    )


def test_cli(models, audio_set, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-eval"
    result = runner.invoke(
        cli,
        [
            "evaluate",
            f"scripted={models['hello']}",
            "--audio",
            str(audio_set),
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--max-new-tokens",
            "8",
            "--set",
            "data.id_column=id",
            "--no-diffs",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| manifest.jsonl | 3 | 50.0 (" in result.output
    assert not (out / "diffs.md").exists()
    result = runner.invoke(
        cli,
        [
            "evaluate",
            str(models["hello"]),
            "--audio",
            str(audio_set),
            "--audio",
            str(audio_set),
            "--output-dir",
            str(out),
        ],
    )
    assert result.exit_code == 1 and "share the label manifest.jsonl" in result.output
