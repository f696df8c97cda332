"""Paired audio + text sources: the rows precompute reads, as small frozen records.

Three kinds, all random-access by row so that shard k can be given rows
[k*S, (k+1)*S) on any process:

- "hf" / "hf_disk": a `datasets` dataset, by hub name (+ config, split) or a `save_to_disk` folder.
  The audio column is read with `Audio(decode=False)` (file path or encoded bytes) — decoding is
  ours (soundfile), never torchcodec.
- "manifest": a CSV, TSV or JSONL file; audio paths are relative to the manifest's folder.
- "common_voice": an extracted Common Voice release: `clips/*.mp3` and `train.tsv`, `dev.tsv`,
  `test.tsv`, `validated.tsv`, ... with columns `path`, `sentence` and (recent releases) `locale`.

    source = open_source(config.data)
    len(source), source.fingerprint
    source[17]  # Clip(row=17, id=..., text=..., language=..., audio=path or bytes) or SourceReject

A bad row (no audio, empty text, duplicate id, unreadable JSON line) is a SourceReject with the
reason ("kind: detail", as the store groups them), never an exception; a problem with the whole source (missing file, missing column) raises
WhistleError naming it and the fix.
"""
from __future__ import annotations

import abc
import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whistle_pipeline.config import DataConfig
from whistle_pipeline.errors import WhistleError

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
COMMON_VOICE_AUDIO_COLUMN = "path"
COMMON_VOICE_TEXT_COLUMN = "sentence"
COMMON_VOICE_LANGUAGE_COLUMN = "locale"
# Lone surrogates: bytes that were not UTF-8 (read with errors="surrogateescape") or "\udXXX" JSON escapes.
# Zarr stores UTF-8, so such a row is a reject, never a value that fails a whole shard's write.
NOT_UTF8 = re.compile("[\ud800-\udfff]")
NOT_UTF8_FIX = "not valid UTF-8 text: re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


@dataclass(frozen=True, kw_only=True)
class Clip:
    """One usable row of a source: its audio is a file path or the encoded bytes of a file.

    The one record of a clip: precompute reads it, and `whistle evaluate` and finetune's validation
    transcribe it (`whistle_pipeline.transcribe`)."""

    row: int
    id: str
    text: str
    language: str
    audio: str | bytes

    @property
    def audio_name(self) -> str:
        """How to name the audio in messages."""
        return self.audio if isinstance(self.audio, str) else f"{self.id} (embedded audio)"


@dataclass(frozen=True)
class SourceReject:
    """A row that cannot be used, and why."""

    row: int
    id: str
    reason: str


def _clean(value: Any) -> str:
    return "" if value is None else str(value).strip()


class Source(abc.ABC):
    """Rows of (id, text, language, audio) from one of the source kinds; see `open_source`."""

    kind: str

    def __init__(self, config: DataConfig, identity: dict[str, Any], ids: list[str]):
        self.config = config
        limit = config.max_clips or len(ids)
        self._ids = ids[:limit]
        self._first_row: dict[str, int] = {}
        for row, utt_id in enumerate(self._ids):
            self._first_row.setdefault(utt_id, row)
        identity = {**identity, "kind": self.kind, "rows": len(self._ids)}
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        self.fingerprint = f"{self.kind}:{digest[:16]}"

    def __len__(self) -> int:
        return len(self._ids)

    def row_id(self, row: int) -> str:
        """The utterance id of `row` (known even when the row turns out to be unusable)."""
        return self._ids[row]

    def __iter__(self) -> Iterator[Clip | SourceReject]:
        return (self[row] for row in range(len(self)))

    def __getitem__(self, row: int) -> Clip | SourceReject:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside the source's {len(self)} rows")
        utt_id = self._ids[row]
        if self._first_row[utt_id] != row:
            return SourceReject(row, utt_id, f"duplicate id: first used by row {self._first_row[utt_id]}")
        fields = self._fields(row)
        if isinstance(fields, str):
            return SourceReject(row, utt_id, fields)
        text, language, audio = fields
        if not text:
            return SourceReject(row, utt_id, "empty text")
        if not language:
            return SourceReject(row, utt_id, "no language: the language column is empty and data.language is not set")
        if not audio:
            return SourceReject(row, utt_id, "no audio: the audio column is empty")
        return Clip(row=row, id=utt_id, text=text, language=language, audio=audio)

    @abc.abstractmethod
    def _fields(self, row: int) -> tuple[str, str, str | bytes] | str:
        """(text, language, audio) of a row, or the reason it has none."""

    def describe(self) -> str:
        return f"{self.kind} {self.config.path} ({len(self)} rows)"


def _require_columns(what: str, columns: list[str], needed: dict[str, str]) -> None:
    missing = [f"{option} = {name!r}" for option, name in needed.items() if name and name not in columns]
    if missing:
        raise WhistleError(
            f"{what} has no column for {', '.join(missing)}; its columns are {', '.join(columns) or '(none)'}. "
            "Set the data.*_column keys to the right names (e.g. --set data.audio_column=path)."
        )


class TableSource(Source):
    """Rows already in memory as dicts (manifests and Common Voice TSVs)."""

    def __init__(self, config: DataConfig, identity: dict[str, Any], rows: list[dict[str, Any] | str],
                 base: Path, audio_column: str, text_column: str, language_column: str, id_of):
        self._rows = rows
        self._base = base
        self._audio_column, self._text_column, self._language_column = audio_column, text_column, language_column
        # The rows themselves, not only the file's path: a manifest edited in place is other data, and a
        # store must never mix the two (the audio files' bytes are not read here).
        used = rows[: config.max_clips or len(rows)]
        content = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]
        super().__init__(config, {**identity, "content": content},
                         [id_of(row, values) for row, values in enumerate(rows)])

    def _fields(self, row: int) -> tuple[str, str, str] | str:
        values = self._rows[row]
        if isinstance(values, str):  # a line that did not parse
            return values
        missing = [name for name in (self._audio_column, self._text_column) if name not in values]
        if missing:
            return f"bad row: no {' or '.join(repr(m) for m in missing)} in this row"
        language = _clean(values.get(self._language_column)) if self._language_column else ""
        audio = _clean(values[self._audio_column])
        return (
            _clean(values[self._text_column]),
            self._normalise_language(language) or self.config.language,
            str(self._base / audio) if audio else "",
        )

    def _normalise_language(self, language: str) -> str:
        return language


class ManifestSource(TableSource):
    kind = "manifest"

    def __init__(self, config: DataConfig):
        path = Path(config.path)
        if not path.is_file():
            raise WhistleError(f"manifest {path} does not exist (data.path)")
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        else:
            rows, columns = _read_table(path, "\t" if path.suffix.lower() == ".tsv" else ",", csv.QUOTE_MINIMAL)
            _require_columns(f"manifest {path}", columns, {
                "data.audio_column": config.audio_column, "data.text_column": config.text_column,
                "data.id_column": config.id_column, "data.language_column": config.language_column,
            })
        base = path.resolve().parent

        def id_of(row: int, values: dict[str, Any] | str) -> str:
            if isinstance(values, dict):
                if config.id_column and _clean(values.get(config.id_column)):
                    return _clean(values[config.id_column])
                audio = Path(_clean(values.get(config.audio_column)))
                if audio.name:  # the path without its extension, from the manifest's folder: unique, readable
                    if audio.is_absolute() and audio.is_relative_to(base):
                        audio = audio.relative_to(base)
                    return audio.with_suffix("").as_posix()
            return f"row-{row:08d}"

        identity = {"path": str(path.resolve()), "columns": _column_identity(config)}
        super().__init__(config, identity, rows, base, config.audio_column, config.text_column,
                         config.language_column, id_of)


def _read_jsonl(path: Path) -> list[dict[str, Any] | str]:
    rows: list[dict[str, Any] | str] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(f"bad row: line {number} of {path.name} is not valid JSON ({err.msg})")
                continue
            if not isinstance(values, dict):
                rows.append(f"bad row: line {number} of {path.name} is not a JSON object")
            elif any(isinstance(value, str) and NOT_UTF8.search(value) for value in values.values()):
                rows.append(f"bad row: line {number} of {path.name} is {NOT_UTF8_FIX}")
            else:
                rows.append(values)
    return rows


def _read_table(path: Path, delimiter: str, quoting: int) -> tuple[list[dict[str, str] | str], list[str]]:
    """The rows of a CSV/TSV file as dicts, and its columns. A row whose field count differs from the
    header's (a field missing, or an unquoted delimiter inside one) or that is not UTF-8 becomes its
    reject reason: csv.DictReader would fill or shift its fields silently."""
    rows: list[dict[str, str] | str] = []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        columns = next(reader, [])
        for fields in reader:
            if not fields:  # a blank line
                continue
            where = f"line {reader.line_num} of {path.name}"
            if any(NOT_UTF8.search(field) for field in fields):
                rows.append(f"bad row: {where} is {NOT_UTF8_FIX}")
            elif len(fields) != len(columns):
                hint = " (quote fields that contain the delimiter)" if len(fields) > len(columns) else ""
                rows.append(f"bad row: {where} has {len(fields)} field(s), the header has {len(columns)}{hint}")
            else:
                rows.append(dict(zip(columns, fields)))
    return rows, columns


class CommonVoiceSource(TableSource):
    kind = "common_voice"

    def __init__(self, config: DataConfig):
        folder = Path(config.path)
        table = config.subset or config.split
        tsv = folder / f"{table}.tsv"
        if not tsv.is_file():
            have = sorted(p.stem for p in folder.glob("*.tsv"))
            raise WhistleError(
                f"Common Voice folder {folder} has no {tsv.name} (data.subset / data.split = {table!r}); "
                f"it has: {', '.join(have) or 'no .tsv files'}. Give the folder that holds clips/ and the TSVs."
            )
        # Common Voice sentences contain quote characters: the TSVs are unquoted
        rows, columns = _read_table(tsv, "\t", csv.QUOTE_NONE)
        language_column = config.language_column or (
            COMMON_VOICE_LANGUAGE_COLUMN if COMMON_VOICE_LANGUAGE_COLUMN in columns else "")
        _require_columns(f"Common Voice table {tsv}", columns, {
            "audio (Common Voice)": COMMON_VOICE_AUDIO_COLUMN, "text (Common Voice)": COMMON_VOICE_TEXT_COLUMN,
            "data.language_column": language_column,
        })

        def id_of(row: int, values: dict[str, Any] | str) -> str:
            stem = Path(_clean(values.get(COMMON_VOICE_AUDIO_COLUMN))).stem if isinstance(values, dict) else ""
            return stem or f"row-{row:08d}"

        identity = {"path": str(folder.resolve()), "table": table, "language_column": language_column,
                    "language": config.language}
        super().__init__(config, identity, rows, folder.resolve() / "clips", COMMON_VOICE_AUDIO_COLUMN,
                         COMMON_VOICE_TEXT_COLUMN, language_column, id_of)

    def _normalise_language(self, language: str) -> str:
        # Common Voice locales carry regions ("zh-CN", "sv-SE", "pt-BR"); Whisper codes do not
        return language.split("-")[0].lower()


class DatasetSource(Source):
    """A `datasets` Dataset: rows read on demand (audio stays in Arrow until a worker asks for it)."""

    def __init__(self, config: DataConfig, kind: str):
        self.kind = kind
        dataset = _load_dataset(config, kind)
        columns = list(dataset.column_names)
        _require_columns(f"dataset {config.path} ({config.split})", columns, {
            "data.audio_column": config.audio_column, "data.text_column": config.text_column,
            "data.id_column": config.id_column, "data.language_column": config.language_column,
        })
        wanted = [c for c in (config.audio_column, config.text_column, config.id_column, config.language_column) if c]
        dataset = dataset.select_columns(list(dict.fromkeys(wanted)))
        self._dataset = _undecoded_audio(dataset, config.audio_column, config.path)
        limit = min(len(dataset), config.max_clips or len(dataset))
        if config.id_column:
            ids = [_clean(v) for v in dataset.select(range(limit))[config.id_column]]
            ids = [v or f"{config.split}-{row:08d}" for row, v in enumerate(ids)]
        else:
            ids = [f"{config.split}-{row:08d}" for row in range(limit)]
        location = str(Path(config.path).resolve()) if kind == "hf_disk" else config.path
        identity = {"path": location, "subset": config.subset, "split": config.split,
                    "columns": _column_identity(config),
                    "content": getattr(dataset, "_fingerprint", None)}  # datasets' own hash of the data
        super().__init__(config, identity, ids)

    def _fields(self, row: int) -> tuple[str, str, str | bytes] | str:
        values = self._dataset[row]
        audio = values[self.config.audio_column]
        if isinstance(audio, dict):  # Audio(decode=False): {"bytes": ..., "path": ...}
            audio = audio.get("bytes") or _clean(audio.get("path"))
        else:
            audio = _clean(audio)
        language = _clean(values.get(self.config.language_column)) if self.config.language_column else ""
        return _clean(values[self.config.text_column]), language or self.config.language, audio


def _load_dataset(config: DataConfig, kind: str):
    import datasets  # on use: it takes seconds to import, and only the `datasets` kinds need it

    try:
        if kind == "hf_disk":
            loaded = datasets.load_from_disk(config.path)
            if isinstance(loaded, datasets.DatasetDict):
                if config.split not in loaded:
                    raise WhistleError(f"dataset {config.path} has no split {config.split!r} "
                                       f"(it has {', '.join(loaded)}): set --split")
                loaded = loaded[config.split]
            return loaded
        return datasets.load_dataset(config.path, config.subset or None, split=config.split)
    except WhistleError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, DatasetNotFoundError...)
        raise WhistleError(
            f"cannot load the dataset {config.path!r} (subset {config.subset!r}, split {config.split!r}): {err}"
        ) from err


def _undecoded_audio(dataset, column: str, name: str):
    """Make the audio column yield {"bytes", "path"} (never decoded by datasets) or keep a path column."""
    import datasets  # on use, as in _load_dataset

    feature = dataset.features[column]
    if isinstance(feature, datasets.Audio):
        return dataset.cast_column(column, datasets.Audio(decode=False))
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return dataset
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return dataset
    raise WhistleError(
        f"column {column!r} of dataset {name} is {feature}, not audio: give data.audio_column an Audio column "
        "or a column of audio file paths"
    )


def _column_identity(config: DataConfig) -> dict[str, str]:
    return {"audio": config.audio_column, "text": config.text_column, "id": config.id_column,
            "language": config.language_column, "default_language": config.language}


def detect_kind(path: str) -> str:
    """data.kind = "auto": what `path` holds (see pipeline.toml [data])."""
    if not path:
        raise WhistleError("data.path is empty: give a dataset name or folder, a manifest or a Common Voice folder "
                           "(--data)")
    local = Path(path)
    if local.is_dir() and (local / "clips").is_dir() and any(local.glob("*.tsv")):
        return "common_voice"
    if local.is_file() and local.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if local.is_dir() and any((local / name).is_file() for name in ("state.json", "dataset_dict.json")):
        return "hf_disk"
    if local.is_file():
        raise WhistleError(f"{path} is a file but not a manifest: use a {', '.join(MANIFEST_SUFFIXES)} file")
    return "hf"


def open_source(config: DataConfig) -> Source:
    """The source `config` describes (data.kind "auto" infers it from data.path)."""
    kind = detect_kind(config.path) if config.kind == "auto" else config.kind
    if kind in ("manifest", "common_voice", "hf_disk") and not os.path.exists(config.path):
        raise WhistleError(f"{config.path} does not exist (data.path, kind {kind})")
    if kind == "manifest":
        return ManifestSource(config)
    if kind == "common_voice":
        return CommonVoiceSource(config)
    return DatasetSource(config, kind)
