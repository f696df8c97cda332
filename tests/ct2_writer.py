"""Test helper: write a `transformers` Whisper in CTranslate2's faster-whisper layout.

The inverse of `whistle_pipeline.ct2`, written from CTranslate2's spec (ctranslate2.specs.whisper_spec,
model_spec._serialize / _quantize) so the converter can be tested without ctranslate2 or a hub model:
fused q;k;v / k;v projections with a zero key bias, the spec scalars, the projection stored as an
alias of the embeddings, and CTranslate2's quantisation (int8: one scale per row, int16: one per tensor,
``q = rint(w * scale)``). Also a tokenizer with Whisper's real layout and vocabulary sizes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

DTYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
# Whisper's tokens after the text vocabulary, in order (languages go after <|startoftranscript|>).
TASK_TOKENS = [
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>


def whisper_tokenizer(multilingual: bool, n_languages: int = 99):
    """A byte-level BPE `tokenizers.Tokenizer` with the real Whisper id layout.

    English-only: 50256 text tokens, <|endoftext|> = 50256 (vocabulary 51864 with timestamps);
    multilingual: 50257 text tokens, <|endoftext|> = 50257 (51865; 51866 with 100 languages as large-v3).
    The text tokens are the 256 byte symbols, a few merges, and unreachable filler tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_gpt2_byte_order)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("Ġ", "s"), ("e", "r"), ("o", "n")]
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    n_text = 50257 if multilingual else 50256
    for i in range(n_text - len(vocab)):
        vocab[f"Ġfiller{i}"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    languages = [f"<|{code}|>" for code in list(LANGUAGES)[:n_languages]]
    tokenizer.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>", *languages, *TASK_TOKENS])
    return tokenizer


def _gpt2_byte_order(symbol: str) -> int:
    """GPT-2 orders its 256 byte symbols printable bytes first, so id 220 is 'Ġ' (the space)."""
    code = ord(symbol)
    return code if code < 256 else 1000 + code


def ct2_variables(model, quantization: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(variables, aliases) of a WhisperForConditionalGeneration in CTranslate2's naming."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    config = model.config
    out: dict[str, np.ndarray] = {}

    def linear(ct2: str, *hf: str) -> None:
        out[f"{ct2}/weight"] = np.concatenate([state[f"{h}.weight"] for h in hf])
        biases = [state.get(f"{h}.bias", np.zeros(state[f"{h}.weight"].shape[0], np.float32)) for h in hf]
        out[f"{ct2}/bias"] = np.concatenate(biases)

    def layer_norm(ct2: str, hf: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = state[f"{hf}.weight"], state[f"{hf}.bias"]

    for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf_side = f"model.{side}"
        out[f"{side}/position_encodings/encodings"] = state[f"{hf_side}.embed_positions.weight"]
        layer_norm(f"{side}/layer_norm", f"{hf_side}.layer_norm")
        for i in range(layers):
            hf, ct2 = f"{hf_side}.layers.{i}", f"{side}/layer_{i}"
            linear(f"{ct2}/self_attention/linear_0", *(f"{hf}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")))
            linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
            layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
                linear(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj")
                linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
                layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
            layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["decoder/embeddings/weight"] = state["model.decoder.embed_tokens.weight"]
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}

    variables = {name: _quantize(name, value, quantization, out) for name, value in list(out.items())}
    variables.update({k: v for k, v in out.items() if k.endswith("_scale")})
    variables.update(
        {
            "encoder/num_heads": np.array(config.encoder_attention_heads, np.int16),
            "decoder/num_heads": np.array(config.decoder_attention_heads, np.int16),
            "decoder/activation": np.array(3, np.int8),  # GELU
            "decoder/alibi": np.array(0, np.int8),
            "decoder/alignment_heads": np.array(1, np.int16),
            "decoder/alignment_layer": np.array(-1, np.int16),
            "decoder/pre_norm": np.array(1, np.int8),
            "decoder/scale_embeddings": np.array(0, np.int8),
            "decoder/start_from_zero_embedding": np.array(0, np.int8),
        }
    )
    return variables, aliases


def _quantize(name: str, value: np.ndarray, quantization: str, out: dict[str, np.ndarray]) -> np.ndarray:
    """CTranslate2's `_quantize`: weights of linear/conv/embedding layers become integers plus a scale."""
    quantizable = name.endswith("/weight")
    if quantization == "int8" and quantizable:
        rows = value.reshape(value.shape[0], -1)
        amax = np.abs(rows).max(axis=1)
        amax[amax == 0] = 127.0
        scale = (127.0 / amax).astype(np.float32)
        out[f"{name}_scale"] = scale
        return np.rint(rows * scale[:, None]).astype(np.int8).reshape(value.shape)
    if quantization == "int16" and quantizable:
        scale = np.float32(2**10 / np.abs(value).max())
        out[f"{name}_scale"] = np.array(scale, np.float32)
        return np.clip(np.rint(value * scale), -32768, 32767).astype(np.int16)
    if quantization == "float16":
        return value.astype(np.float16)
    if quantization == "bfloat16":
        return torch.from_numpy(value).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return value.astype(np.float32)


def _dtype_name(value: np.ndarray) -> str:
    return "bfloat16" if value.dtype == np.uint16 else str(value.dtype)


def write_model_bin(
    path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], spec: str = "WhisperSpec", version: int = 6
) -> None:
    """CTranslate2's `ModelSpec._serialize`: variables in name order, then the aliases."""

    def string(text: str) -> bytes:
        data = text.encode("utf-8")
        return struct.pack("<H", len(data) + 1) + data + b"\0"

    parts = [struct.pack("<I", version), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name in sorted(variables):
        value = variables[name]  # tobytes() writes C order; 0-d scalars stay rank 0 as in CTranslate2
        parts += [
            string(name),
            struct.pack("<B", value.ndim),
            struct.pack(f"<{value.ndim}I", *value.shape),
            struct.pack("<B", DTYPE_IDS[_dtype_name(value)]),
            struct.pack("<I", value.nbytes),
            value.tobytes(),
        ]
    parts.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        parts += [string(alias), string(target)]
    path.write_bytes(b"".join(parts))


def write_ct2_whisper(model, tokenizer, out_dir: Path, quantization: str = "float32") -> Path:
    """A complete faster-whisper folder: model.bin, config.json, tokenizer.json, vocabulary.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    variables, aliases = ct2_variables(model, quantization)
    write_model_bin(out_dir / "model.bin", variables, aliases)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    size = tokenizer.get_vocab_size()
    tokens = [tokenizer.id_to_token(i) for i in range(size)]
    tokens += [f"<|{i * 0.02:.2f}|>" for i in range(model.config.vocab_size - size)]
    (out_dir / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    ids = tokenizer.get_vocab()
    start = ids["<|startoftranscript|>"]
    config = {
        "alignment_heads": [[model.config.decoder_layers - 1, 0], [model.config.decoder_layers - 1, 1]],
        "lang_ids": sorted(i for t, i in ids.items() if start < i < ids["<|translate|>"]),
        "suppress_ids": [1, 2, 7, start, *(ids[t] for t in TASK_TOKENS[:-1])],
        "suppress_ids_begin": [220, ids["<|endoftext|>"]],
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir
