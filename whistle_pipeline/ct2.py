"""CTranslate2 (faster-whisper) Whisper -> `transformers` checkpoint.

A faster-whisper model is a folder: ``model.bin`` (the weights in CTranslate2's binary format),
``config.json`` (suppress lists, alignment heads, language ids), ``tokenizer.json`` and
``vocabulary.txt`` (or ``vocabulary.json``). `import_ct2` reads it and writes a complete
`transformers` Whisper folder with ``save_pretrained``: config, safetensors weights, tokenizer
(with the timestamp tokens), English spelling normaliser, feature extractor (the source's
``preprocessor_config.json`` where it has one), generation config, plus ``whistle-import.json``
(where it came from: file hashes, whistle version, date)::

    result = import_ct2("faster-whisper-tiny.en", "whisper-tiny.en")
    pipeline("automatic-speech-recognition", model="whisper-tiny.en")

``model.bin`` (binary version 6, little-endian)::

    uint32 version; string spec name ("WhisperSpec"); uint32 spec revision; uint32 variable count
    per variable: string name; uint8 rank; uint32 dims[rank]; uint8 dtype; uint32 nbytes; data
    uint32 alias count; per alias: string alias name; string target name
    string = uint16 length (counting the NUL) + UTF-8 bytes + NUL
    dtype: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16

Quantised weights (int8 per row, int16 per tensor) carry a ``<name>_scale`` variable; the
stored integers are ``rint(w * scale)``, so ``w = q / scale`` up to half a quantisation step.
The architecture (widths, layer counts, vocabulary, mel bins) is read from the weight shapes;
the head counts from the ``num_heads`` scalars.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import mmap
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import english_spelling_path
from whistle_pipeline.model_files import ordinary_modes

log = logging.getLogger(__name__)

BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}  # bfloat16 is read as its 16 raw bits, widened in `_to_float32`
DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
TIME_PRECISION = 0.02  # seconds per timestamp token (one encoder frame)
MAX_INITIAL_TIMESTAMP_S = 1.0  # openai/whisper's default: the first timestamp lies within 1 s
MULTILINGUAL_VOCAB_SIZE = 51865  # English-only Whisper has 51864 tokens (CTranslate2's and transformers' rule)
TIMESTAMP_PATTERN = re.compile(r"<\|(\d+\.\d\d)\|>")
PROVENANCE_FILE = "whistle-import.json"
PACKAGE_INSTALL_HINT = "pip install 'whistle[demo]'"
# Scalars a Whisper spec carries, with the value this converter needs (None: any value).
SPEC_SCALARS = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alignment_layer": None,
    "decoder/alignment_heads": None,
}


class Ct2Error(WhistleError):
    """A CTranslate2 model that cannot be read or is not a Whisper this converter understands."""


@dataclass
class Ct2Weights:
    """The variables of a model.bin, aliases resolved on access; `taken` records what the mapping used."""

    path: Path
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtype_names: dict[str, str]  # "float16", "int8", ... as stored
    aliases: dict[str, str]
    taken: set[str] = field(default_factory=set)

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def has(self, name: str) -> bool:
        return self.resolve(name) in self.variables

    def raw(self, name: str) -> np.ndarray:
        target = self.resolve(name)
        if target not in self.variables:
            raise Ct2Error(f"{self.path}: variable {name!r} is missing; this is not a complete Whisper model.bin")
        self.taken.add(target)
        return self.variables[target]

    def scalar(self, name: str) -> int:
        return int(self.raw(name).reshape(-1)[0])

    def float32(self, name: str) -> np.ndarray:
        """The variable as float32, de-quantised with its `<name>_scale` when stored as integers."""
        value = self.raw(name)
        if value.dtype.kind == "f" or self.dtype_name(name) == "bfloat16":
            return _to_float32(value, self.dtype_name(name))
        name = self.resolve(name)  # an alias (decoder/projection) shares its target's scale
        if self.has(name + "_zero"):
            raise Ct2Error(
                f"{self.path}: {name!r} is AWQ/GPTQ-quantised (it has a zero point); only CTranslate2's own "
                "int8/int16 quantisation can be de-quantised — convert the original checkpoint instead"
            )
        if not self.has(name + "_scale"):
            raise Ct2Error(
                f"{self.path}: {name!r} is stored as {value.dtype} without a {name}_scale variable, so it "
                "cannot be de-quantised"
            )
        scale = _to_float32(self.raw(name + "_scale"), self.dtype_name(name + "_scale"))
        if scale.ndim == 0 or scale.size == 1:  # int16: one scale for the tensor
            return value.astype(np.float32) / scale.reshape(())
        if scale.shape[0] != value.shape[0]:
            raise Ct2Error(f"{self.path}: {name}_scale has {scale.shape[0]} rows but {name!r} has {value.shape[0]}")
        return value.astype(np.float32) / scale.reshape((-1,) + (1,) * (value.ndim - 1))  # int8: one scale per row

    def dtype_name(self, name: str) -> str:
        return self.dtype_names[self.resolve(name)]


def _to_float32(value: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "bfloat16":  # the high half of a float32
        return (value.astype(np.uint32) << 16).view(np.float32)
    return value.astype(np.float32)


class _Reader:
    """Bounds-checked reads from a mapped model.bin; errors name the file, offset and what was being read."""

    def __init__(self, path: Path, buffer: Any):
        self.path, self.buffer, self.offset = path, buffer, 0

    def _need(self, size: int, what: str) -> None:
        if self.offset + size > len(self.buffer):
            raise Ct2Error(
                f"{self.path} is truncated: reading {what} needs {size} byte(s) at offset {self.offset}, but the file "
                f"ends at {len(self.buffer)}. Copy or download the model again."
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        self._need(size, what)
        values = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return values

    def string(self, what: str) -> str:
        start = self.offset
        (length,) = self.unpack("<H", f"the length of {what}")
        self._need(length, what)
        raw = bytes(self.buffer[self.offset : self.offset + length])
        self.offset += length
        if length == 0 or raw[-1] != 0:
            raise Ct2Error(
                f"{self.path}: {what} at offset {start} is not a NUL-terminated string; the file is corrupt "
                "or not a CTranslate2 model.bin"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise Ct2Error(f"{self.path}: {what} at offset {start} is not UTF-8 ({err}); the file is corrupt") from err

    def array(self, dtype: np.dtype, shape: tuple[int, ...], nbytes: int, name: str) -> np.ndarray:
        self._need(nbytes, f"the data of {name!r}")
        value = np.frombuffer(self.buffer, dtype=dtype, count=nbytes // dtype.itemsize, offset=self.offset)
        self.offset += nbytes
        return value.reshape(shape)


def read_model_bin(path: str | Path) -> Ct2Weights:
    """Parse a CTranslate2 model.bin (memory-mapped: arrays are views until converted)."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise Ct2Error(f"cannot open {path}: {err.strerror}") from err
    with handle:
        if path.stat().st_size == 0:
            raise Ct2Error(f"{path} is empty; copy or download the model again")
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    reader = _Reader(path, buffer)
    (version,) = reader.unpack("<I", "the binary version")
    if version != BINARY_VERSION:
        raise Ct2Error(
            f"{path} is not a CTranslate2 model.bin this converter reads: its first 4 bytes give binary version "
            f"{version}, expected {BINARY_VERSION} (written by CTranslate2 >= 3). Re-convert the model with a current "
            "ctranslate2, or check that the path points at model.bin."
        )
    spec = reader.string("the spec name")
    (revision,) = reader.unpack("<I", "the spec revision")
    if spec != WHISPER_SPEC:
        raise Ct2Error(
            f"{path} holds a CTranslate2 {spec!r} (revision {revision}), not a Whisper model "
            f"({WHISPER_SPEC}); import-ct2 converts Whisper models only"
        )
    (count,) = reader.unpack("<I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    dtype_names: dict[str, str] = {}
    for index in range(count):
        start = reader.offset
        name = reader.string(f"the name of variable {index}")
        (rank,) = reader.unpack("<B", f"the rank of {name!r}")
        shape = reader.unpack(f"<{rank}I", f"the shape of {name!r}") if rank else ()
        (dtype_id,) = reader.unpack("<B", f"the dtype of {name!r}")
        (nbytes,) = reader.unpack("<I", f"the byte size of {name!r}")
        if dtype_id not in DTYPES:
            raise Ct2Error(
                f"{path}: variable {name!r} (at offset {start}) has unknown dtype id {dtype_id}; known: {DTYPE_NAMES}"
            )
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype_id].itemsize
        if nbytes != expected:
            raise Ct2Error(
                f"{path}: variable {name!r} (at offset {start}) declares {nbytes} bytes but its shape "
                f"{list(shape)} of {DTYPE_NAMES[dtype_id]} needs {expected}; the file is corrupt"
            )
        variables[name] = reader.array(DTYPES[dtype_id], tuple(shape), nbytes, name)
        dtype_names[name] = DTYPE_NAMES[dtype_id]
    (alias_count,) = reader.unpack("<I", "the alias count")
    aliases = {}
    for index in range(alias_count):
        alias = reader.string(f"the name of alias {index}")
        aliases[alias] = reader.string(f"the target of alias {alias!r}")
        if aliases[alias] not in variables:
            raise Ct2Error(f"{path}: alias {alias!r} points at {aliases[alias]!r}, which the file does not hold")
    if reader.offset != len(buffer):
        raise Ct2Error(
            f"{path} has {len(buffer) - reader.offset} unexpected byte(s) after the last alias "
            f"(offset {reader.offset}); the file is corrupt"
        )
    return Ct2Weights(path, spec, revision, variables, dtype_names, aliases)


@dataclass(frozen=True)
class WhisperDims:
    """The architecture read from the weights."""

    d_model: int
    n_mels: int
    vocab_size: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    tied_projection: bool


def _layer_count(weights: Ct2Weights, side: str) -> int:
    numbers = {int(m.group(1)) for name in weights.variables if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    if not numbers or numbers != set(range(len(numbers))):
        raise Ct2Error(
            f"{weights.path}: the {side} layers are {sorted(numbers) or 'missing'}; expected layer_0 ... layer_N-1"
        )
    return len(numbers)


def read_dims(weights: Ct2Weights) -> WhisperDims:
    conv1 = weights.raw("encoder/conv1/weight")  # (d_model, n_mels, 3)
    embeddings = weights.raw("decoder/embeddings/weight")  # (vocab, d_model)
    d_model = conv1.shape[0]
    heads = {}
    for side in ("encoder", "decoder"):
        if weights.has(f"{side}/num_heads"):
            heads[side] = weights.scalar(f"{side}/num_heads")
        else:  # every OpenAI Whisper size has 64-dimensional attention heads
            heads[side] = d_model // 64
            log.warning(
                "%s has no %s/num_heads; assuming Whisper's 64-dimensional heads: %d", weights.path, side, heads[side]
            )
        if heads[side] < 1 or d_model % heads[side]:
            raise Ct2Error(f"{weights.path}: d_model {d_model} is not divisible by {side}/num_heads = {heads[side]}")
    projection = weights.resolve("decoder/projection/weight")
    tied = projection == "decoder/embeddings/weight" or (
        projection in weights.variables and np.array_equal(weights.variables[projection], embeddings)
    )
    return WhisperDims(
        d_model=d_model,
        n_mels=conv1.shape[1],
        vocab_size=embeddings.shape[0],
        encoder_layers=_layer_count(weights, "encoder"),
        decoder_layers=_layer_count(weights, "decoder"),
        encoder_heads=heads["encoder"],
        decoder_heads=heads["decoder"],
        encoder_ffn_dim=weights.raw("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=weights.raw("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=weights.raw("encoder/position_encodings/encodings").shape[0],
        max_target_positions=weights.raw("decoder/position_encodings/encodings").shape[0],
        tied_projection=tied,
    )


def _check_scalars(weights: Ct2Weights) -> None:
    for name, required in SPEC_SCALARS.items():
        if not weights.has(name):
            continue
        value = weights.scalar(name)
        if required is not None and value != required:
            raise Ct2Error(
                f"{weights.path}: {name} = {value}, but Whisper needs {required}; this model.bin is not an "
                "OpenAI Whisper architecture"
            )


def whisper_state_dict(weights: Ct2Weights, dims: WhisperDims) -> dict[str, np.ndarray]:
    """transformers' WhisperForConditionalGeneration state dict (float32) from the CTranslate2 variables.

    CTranslate2 fuses attention projections: self-attention ``linear_0`` is q;k;v stacked on the
    output axis, cross-attention ``linear_0`` is q and ``linear_1`` is k;v. Whisper's key projections
    have no bias; the fused bias holds zeros there (a key bias only adds a per-query constant to the
    attention logits, which softmax cancels), so it is dropped.
    """
    d = dims.d_model
    state: dict[str, np.ndarray] = {}

    def linear(hf: str, ct2: str, rows: slice | None = None, bias: bool = True) -> None:
        weight = weights.float32(f"{ct2}/weight")  # (out, in)
        state[f"{hf}.weight"] = weight if rows is None else weight[rows]
        if bias:
            value = weights.float32(f"{ct2}/bias")
            state[f"{hf}.bias"] = value if rows is None else value[rows]
        elif weights.has(f"{ct2}/bias"):
            weights.raw(f"{ct2}/bias")  # the fused key bias: read (and so accounted for), not kept

    def layer_norm(hf: str, ct2: str) -> None:
        state[f"{hf}.weight"] = weights.float32(f"{ct2}/gamma")
        state[f"{hf}.bias"] = weights.float32(f"{ct2}/beta")

    def fused(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        for i, name in enumerate(names):
            linear(f"{hf}.{name}", ct2, slice(i * d, (i + 1) * d), bias=name != "k_proj")

    for side, layers in (("encoder", dims.encoder_layers), ("decoder", dims.decoder_layers)):
        hf_side = f"model.{side}"
        state[f"{hf_side}.embed_positions.weight"] = weights.float32(f"{side}/position_encodings/encodings")
        layer_norm(f"{hf_side}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            hf, ct2 = f"{hf_side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
                layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
            layer_norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.decoder.embed_tokens.weight"] = weights.float32("decoder/embeddings/weight")
    if weights.has("decoder/projection/bias"):
        raise Ct2Error(f"{weights.path}: decoder/projection has a bias; Whisper's output projection has none")
    projection = weights.float32("decoder/projection/weight")
    if not dims.tied_projection:
        state["proj_out.weight"] = projection
    for name in list(weights.variables):
        if name.endswith("_scale") and name[: -len("_scale")] in weights.taken:
            weights.taken.add(name)
    _check_scalars(weights)
    leftover = sorted(set(weights.variables) - weights.taken - set(SPEC_SCALARS))
    if leftover:
        raise Ct2Error(
            f"{weights.path}: variables this Whisper converter does not know: {', '.join(leftover[:10])}"
            f"{' ...' if len(leftover) > 10 else ''}; the model is not a plain Whisper"
        )
    return state


@dataclass(frozen=True)
class Ct2Source:
    """The files of a faster-whisper folder."""

    directory: Path
    model_bin: Path
    config: dict[str, Any]
    tokenizer_json: Path
    vocabulary: list[str]
    files: tuple[Path, ...]


def read_source(directory: str | Path) -> Ct2Source:
    directory = Path(directory)
    if not directory.is_dir():
        raise Ct2Error(f"{directory} is not a folder; give the CTranslate2 model folder (with model.bin)")
    missing = [name for name in ("model.bin", "config.json", "tokenizer.json") if not (directory / name).is_file()]
    vocabulary_path = next(
        (directory / n for n in ("vocabulary.json", "vocabulary.txt") if (directory / n).is_file()), None
    )
    if vocabulary_path is None:
        missing.append("vocabulary.txt")
    if missing:
        raise Ct2Error(
            f"{directory} lacks {', '.join(missing)}: a faster-whisper model folder holds model.bin, "
            "config.json, tokenizer.json and vocabulary.txt"
        )
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if vocabulary_path.suffix == ".json":
            vocabulary = json.loads(vocabulary_path.read_text(encoding="utf-8"))
        else:
            vocabulary = vocabulary_path.read_text(encoding="utf-8").split("\n")
            vocabulary = vocabulary[:-1] if vocabulary and vocabulary[-1] == "" else vocabulary
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Ct2Error(f"cannot read {directory / 'config.json'} or {vocabulary_path}: {err}") from err
    files = (directory / "model.bin", directory / "config.json", directory / "tokenizer.json", vocabulary_path)
    return Ct2Source(directory, directory / "model.bin", config, directory / "tokenizer.json", vocabulary, files)


@dataclass(frozen=True)
class SpecialIds:
    end_of_text: int
    start_of_transcript: int
    translate: int
    transcribe: int
    start_of_prev: int
    no_timestamps: int
    languages: dict[str, int]  # "<|en|>" -> id


def build_tokenizer(source: Ct2Source, vocab_size: int) -> tuple[Any, SpecialIds]:
    """The package's tokenizer.json plus the timestamp tokens that vocabulary.txt lists after it.

    Every token id is checked against vocabulary.txt (the vocabulary the weights were trained with);
    special tokens are registered so that `decode(..., skip_special_tokens=True)` and timestamp
    decoding (which starts after the last special id) behave as in OpenAI's tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizerFast

    try:
        backend = Tokenizer.from_file(str(source.tokenizer_json))
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise Ct2Error(f"cannot read {source.tokenizer_json} as a tokenizers file: {err}") from err
    vocabulary = source.vocabulary
    if len(vocabulary) != vocab_size:
        raise Ct2Error(
            f"{source.directory}: the vocabulary lists {len(vocabulary)} tokens but the model's embedding "
            f"has {vocab_size} rows; the files come from different models"
        )
    known = backend.get_vocab_size(with_added_tokens=True)
    mismatched = [i for i in range(min(known, vocab_size)) if backend.id_to_token(i) != vocabulary[i]]
    if mismatched:
        i = mismatched[0]
        raise Ct2Error(
            f"{source.tokenizer_json} disagrees with the vocabulary at {len(mismatched)} id(s), first id "
            f"{i}: {backend.id_to_token(i)!r} vs {vocabulary[i]!r}; the files come from different models"
        )
    timestamps = vocabulary[known:]
    for offset, token in enumerate(timestamps):
        if token != f"<|{offset * TIME_PRECISION:.2f}|>":
            raise Ct2Error(
                f"{source.directory}: vocabulary id {known + offset} is {token!r}; after the tokenizer's "
                "tokens only timestamp tokens <|0.00|>, <|0.02|>, ... may follow"
            )
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in timestamps])

    added = backend.get_added_tokens_decoder()
    specials = [added[i].content for i in sorted(added) if added[i].special]
    ids = {token: backend.token_to_id(token) for token in specials}
    required = (
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|translate|>",
        "<|transcribe|>",
        "<|startofprev|>",
        "<|notimestamps|>",
    )
    absent = [token for token in required if token not in ids]
    if absent:
        raise Ct2Error(f"{source.tokenizer_json} lacks Whisper's special token(s) {', '.join(absent)}")
    start = ids["<|startoftranscript|>"]
    languages = {t: i for t, i in ids.items() if start < i < ids["<|translate|>"]}
    special_ids = SpecialIds(
        ids["<|endoftext|>"],
        start,
        ids["<|translate|>"],
        ids["<|transcribe|>"],
        ids["<|startofprev|>"],
        ids["<|notimestamps|>"],
        languages,
    )
    tokenizer = WhisperTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials,
        normalizer_file=str(english_spelling_path()),
        model_max_length=None,
    )
    return tokenizer, special_ids


def _token_list(config: dict[str, Any], key: str, vocab_size: int, path: Path) -> list[int]:
    values = config.get(key)
    if not isinstance(values, list) or not all(isinstance(v, int) and 0 <= v < vocab_size for v in values):
        raise Ct2Error(f"{path}: {key!r} must be a list of token ids below {vocab_size}, got {str(values)[:80]}")
    return list(values)


def build_generation_config(source: Ct2Source, dims: WhisperDims, ids: SpecialIds) -> Any:
    from transformers import GenerationConfig

    path = source.directory / "config.json"
    heads = source.config.get("alignment_heads")
    if heads is None:  # what CTranslate2's converter assumes: every head of the last half of the layers
        heads = [
            [layer, head]
            for layer in range(dims.decoder_layers // 2, dims.decoder_layers)
            for head in range(dims.decoder_heads)
        ]
        log.info(
            "%s has no alignment_heads; using all heads of decoder layers %d-%d",
            path,
            dims.decoder_layers // 2,
            dims.decoder_layers - 1,
        )
    if not all(
        isinstance(h, list) and len(h) == 2 and 0 <= h[0] < dims.decoder_layers and 0 <= h[1] < dims.decoder_heads
        for h in heads
    ):
        raise Ct2Error(
            f"{path}: alignment_heads must be [layer, head] pairs within {dims.decoder_layers} layers x "
            f"{dims.decoder_heads} heads"
        )
    multilingual = dims.vocab_size >= MULTILINGUAL_VOCAB_SIZE
    extra: dict[str, Any] = {}
    if multilingual:
        extra["lang_to_id"] = dict(ids.languages)
        extra["task_to_id"] = {"transcribe": ids.transcribe, "translate": ids.translate}
    return GenerationConfig(
        alignment_heads=heads,
        suppress_tokens=_token_list(source.config, "suppress_ids", dims.vocab_size, path),
        begin_suppress_tokens=_token_list(source.config, "suppress_ids_begin", dims.vocab_size, path),
        bos_token_id=ids.start_of_transcript,
        decoder_start_token_id=ids.start_of_transcript,
        eos_token_id=ids.end_of_text,
        pad_token_id=ids.end_of_text,
        no_timestamps_token_id=ids.no_timestamps,
        prev_sot_token_id=ids.start_of_prev,
        is_multilingual=multilingual,
        max_initial_timestamp_index=round(MAX_INITIAL_TIMESTAMP_S / TIME_PRECISION),
        max_length=dims.max_target_positions,
        return_timestamps=False,
        **extra,
    )


def build_whisper(
    state: dict[str, np.ndarray], dims: WhisperDims, ids: SpecialIds, generation_config: Any, dtype: str
) -> Any:
    """A WhisperForConditionalGeneration holding exactly `state` (built on the meta device: no random init)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.n_mels,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_heads,
        decoder_attention_heads=dims.decoder_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        bos_token_id=ids.start_of_transcript,
        decoder_start_token_id=ids.start_of_transcript,
        eos_token_id=ids.end_of_text,
        pad_token_id=ids.end_of_text,
        tie_word_embeddings=dims.tied_projection,
        scale_embedding=False,
        activation_function="gelu",
        # WhisperConfig's own defaults ([220, 50256]) fit English-only vocabularies only: use the model's lists.
        suppress_tokens=generation_config.suppress_tokens,
        begin_suppress_tokens=generation_config.begin_suppress_tokens,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value)).to(torch_dtype) for name, value in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    allowed_missing = {"proj_out.weight"} if dims.tied_projection else set()
    if set(missing) - allowed_missing or unexpected:
        raise Ct2Error(
            f"internal mapping error: missing {sorted(set(missing) - allowed_missing)}, unexpected "
            f"{sorted(unexpected)} (please report)"
        )
    model.tie_weights()
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:
        raise Ct2Error(f"internal mapping error: {', '.join(unset)} not set (please report)")
    return model.eval()


@dataclass(frozen=True)
class ImportResult:
    output_dir: str
    source: str
    package: str | None
    dims: WhisperDims
    multilingual: bool
    source_dtypes: dict[str, int]
    dtype: str
    n_parameters: int
    seconds: float

    def summary(self) -> str:
        d = self.dims
        kind = "multilingual" if self.multilingual else "English-only"
        stored = ", ".join(f"{n} {t}" for t, n in sorted(self.source_dtypes.items()))
        return (
            f"wrote {self.output_dir} (transformers Whisper, {self.dtype}) from {self.source}"
            f"{f' (package {self.package})' if self.package else ''} in {self.seconds:.1f} s\n"
            f"  {self.n_parameters / 1e6:.1f}M parameters: d_model {d.d_model}, {d.encoder_layers}+{d.decoder_layers} "
            f"layers, {d.encoder_heads} heads, {d.n_mels} mel bins, vocabulary {d.vocab_size} ({kind})\n"
            f"  source variables: {stored}\n"
            f"  use it: transformers.pipeline('automatic-speech-recognition', model='{self.output_dir}')"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_package_model(package: str) -> tuple[Path, str]:
    """The CTranslate2 model folder inside an installed PyPI package, and the package's version."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise Ct2Error(
            f"the package {package!r} is not installed; install it with {PACKAGE_INSTALL_HINT} (or "
            f"pip install {package})"
        ) from None
    folders = sorted(
        {Path(distribution.locate_file(f)).parent for f in distribution.files or [] if Path(str(f)).name == "model.bin"}
    )
    folders = [f for f in folders if (f / "config.json").is_file()]
    if len(folders) != 1:
        found = ", ".join(map(str, folders)) or "none"
        raise Ct2Error(
            f"the package {package} {distribution.version} should hold exactly one CTranslate2 model "
            f"folder (model.bin + config.json); found: {found}"
        )
    return folders[0], distribution.version


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_ct2(
    source_dir: str | Path | None,
    output_dir: str | Path,
    *,
    package: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> ImportResult:
    """Convert a faster-whisper folder (or the one inside `package`) into a transformers Whisper folder.

    The output is written to a temporary sibling folder and renamed into place, so an interrupted
    import never leaves a half-written model at `output_dir`.
    """
    from transformers import WhisperFeatureExtractor

    import whistle_pipeline
    from whistle_pipeline import preflight

    preflight.import_ct2(source_dir, output_dir)
    started = time.perf_counter()
    if (source_dir is None) == (package is None):
        raise WhistleError("give either a CTranslate2 model folder or --from-package NAME, not both or neither")
    package_label = None
    if package is not None:
        source_dir, version = find_package_model(package)
        package_label = f"{package}=={version}"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise WhistleError(f"dtype {dtype!r} is not one of float32, float16, bfloat16")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise WhistleError(f"{output_dir} exists and is not empty; choose another folder or pass --overwrite")

    source = read_source(source_dir)
    weights = read_model_bin(source.model_bin)
    dims = read_dims(weights)
    state = whisper_state_dict(weights, dims)
    tokenizer, ids = build_tokenizer(source, dims.vocab_size)
    generation_config = build_generation_config(source, dims, ids)
    feature_extractor = WhisperFeatureExtractor(feature_size=dims.n_mels)
    if (source.directory / "preprocessor_config.json").is_file():  # the source's own (faster-whisper's large-v3)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(source.directory)
        if feature_extractor.feature_size != dims.n_mels:
            raise Ct2Error(
                f"{source.directory / 'preprocessor_config.json'} makes {feature_extractor.feature_size} "
                f"mel bins, the encoder expects {dims.n_mels}; the files come from different models"
            )
    # The encoder's two convolutions halve the mel frames: a 30 s window of 3000 frames gives 1500 positions.
    if feature_extractor.nb_max_frames != 2 * dims.max_source_positions:
        raise Ct2Error(
            f"{weights.path}: the encoder has {dims.max_source_positions} positions, but Whisper's 30 s "
            f"window gives {feature_extractor.nb_max_frames // 2}; not a standard Whisper encoder"
        )
    model = build_whisper(state, dims, ids, generation_config, dtype)
    model.generation_config = generation_config

    partial = output_dir.with_name(f".{output_dir.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    feature_extractor.save_pretrained(partial)  # preprocessor_config.json, read by every transformers version
    tokenizer.save_pretrained(partial)
    # transformers 5 no longer writes the spelling map it reads back as normalizer.json; copy it so that
    # `tokenizer.normalize(text)` (Whisper's English normaliser) works on the converted checkpoint.
    shutil.copyfile(english_spelling_path(), partial / "normalizer.json")
    source_dtypes: dict[str, int] = {}
    for name, value in weights.variables.items():
        if value.ndim:  # scalars are spec flags (num_heads, activation), not weights
            source_dtypes[weights.dtype_name(name)] = source_dtypes.get(weights.dtype_name(name), 0) + 1
    provenance = {
        "converted_by": f"whistle {whistle_pipeline.__version__} (whistle import-ct2)",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(Path(source.directory).resolve()),
        "package": package_label,
        "ctranslate2_spec": {"name": weights.spec, "revision": weights.revision, "binary_version": BINARY_VERSION},
        "source_dtypes": source_dtypes,
        "dtype": dtype,
        "files": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in source.files},
    }
    (partial / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    ordinary_modes(partial)  # safetensors writes model.safetensors 0600
    if output_dir.exists():
        shutil.rmtree(output_dir)
    partial.rename(output_dir)
    return ImportResult(
        output_dir=str(output_dir),
        source=str(source.directory),
        package=package_label,
        dims=dims,
        multilingual=generation_config.is_multilingual,
        source_dtypes=source_dtypes,
        dtype=dtype,
        n_parameters=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - started,
    )
