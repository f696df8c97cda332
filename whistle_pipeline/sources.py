"""Paired audio + text sources: the rows precompute reads, as small frozen records.

Four kinds, all random-access by row so that shard k can be given rows
[k*S, (k+1)*S) on any process:

- "hf" / "hf_disk": a `datasets` dataset, by hub name (+ config, split) or a `save_to_disk` folder.
  The audio column is read with `Audio(decode=False)` (file path or encoded bytes) — decoding is
  ours (soundfile), never torchcodec.
- "manifest": a CSV, TSV or JSON-lines file (optionally gzipped; how each is read, quoting included,
  is in `whistle_pipeline.manifest_files`); audio paths are relative to the manifest's folder. The
  layout is told by the keys of the first record: whistle's own (data.*_column), NeMo's
  (`audio_filepath`, `text`, `duration`, optional `offset` and `lang`), or lhotse's (a recordings +
  supervisions pair, or a CutSet; `whistle_pipeline.lhotse_manifests`).
- "common_voice": an extracted Common Voice release: `clips/*.mp3` and `train.tsv`, `dev.tsv`,
  `test.tsv`, `validated.tsv`, ... with columns `path`, `sentence` and (recent releases) `locale`.

    source = open_source(config.data)
    len(source), source.fingerprint
    source[17]  # Clip(row=17, id=..., text=..., language=..., audio=path or bytes) or SourceReject

A bad row (no audio, empty text, duplicate id, unreadable JSON line, a cell of the wrong type) is a
SourceReject with the reason ("kind: detail", as the store groups them; a manifest's names its line),
never an exception; a problem with the whole source (missing file, missing or repeated column)
raises WhistleError naming it and the fix.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whistle_pipeline.config import DataConfig
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.lhotse_manifests import LhotseRow, is_lhotse, read_lhotse
from whistle_pipeline.manifest_files import (
    JSON_LINES_SUFFIXES,
    TABLE_SUFFIXES,
    BadCell,
    Record,
    cell_text,
    is_blank,
    manifest_suffix,
    nemo_segment,
    read_records,
    read_table,
)

MANIFEST_SUFFIXES = TABLE_SUFFIXES + JSON_LINES_SUFFIXES
# data.id_column = "": the column "id" if the source has one (whistle synthesize writes it), else derived
AUTO_ID_COLUMN = "id"
NEMO_AUDIO_COLUMN = "audio_filepath"
NEMO_LANGUAGE_COLUMN = "lang"
COMMON_VOICE_AUDIO_COLUMN = "path"
COMMON_VOICE_TEXT_COLUMN = "sentence"
COMMON_VOICE_LANGUAGE_COLUMN = "locale"

Segment = tuple[float, float | None]  # (start, duration or None = to the end) in seconds


@dataclass(frozen=True, kw_only=True)
class Clip:
    """One usable row of a source: its audio is a file path or the encoded bytes of a file.

    The one record of a clip: precompute reads it, and `whistle evaluate` and finetune's validation
    transcribe it (`whistle_pipeline.transcribe`). `segment` is the part of the audio to use (NeMo
    offsets, lhotse supervisions); None is the whole file."""

    row: int
    id: str
    text: str
    language: str
    audio: str | bytes
    segment: Segment | None = None

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


def whisper_language(value: str) -> str:
    """A language as Whisper names it: "zh-CN" -> "zh", "English" -> "en", "" -> ""."""
    code = value.split("-")[0].split("_")[0].strip().lower()
    if len(code) > 3:
        # on use: the table lives in transformers (seconds to import); only language names need it
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        return TO_LANGUAGE_CODE.get(value.strip().lower(), value.strip())
    return code


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
            return self._reject(row, "duplicate id", f"first used by row {self._first_row[utt_id]}")
        fields = self._fields(row)
        if isinstance(fields, str):
            return SourceReject(row, utt_id, fields)
        text, language, audio, segment = fields
        if is_blank(text):
            return self._reject(row, "empty text")
        if not language:
            return self._reject(row, "no language", "the language column is empty and data.language is not set")
        if not audio:
            return self._reject(row, "no audio", "the audio column is empty")
        return Clip(row=row, id=utt_id, text=text, language=language, audio=audio, segment=segment)

    def _reject(self, row: int, kind: str, detail: str = "") -> SourceReject:
        """A reject "kind: detail (where)", or "kind: where" — where, for a file, is the row's line."""
        where = self._where(row)
        reason = f"{kind}: {detail} ({where})" if detail and where else f"{kind}: {detail or where}"
        return SourceReject(row, self._ids[row], reason.rstrip(": "))

    def _where(self, row: int) -> str:
        """Where `row` is in the source, for messages ("" when its row number says it)."""
        return ""

    @abc.abstractmethod
    def _fields(self, row: int) -> tuple[str, str, str | bytes, Segment | None] | str:
        """(text, language, audio, segment) of a row, or the reason it has none."""

    def column(self, name: str) -> list[str] | None:
        """Another column's cells as text, one per row ("" where a row has none); None if no row has it."""
        return None

    def describe(self) -> str:
        return f"{self.kind} {self.config.path} ({len(self)} rows)"


def _require_columns(what: str, columns: list[str], needed: dict[str, str]) -> None:
    missing = [f"{option} = {name!r}" for option, name in needed.items() if name and name not in columns]
    if missing:
        raise WhistleError(
            f"{what} has no column for {', '.join(missing)}; its columns are {', '.join(columns) or '(none)'}. "
            "Set the data.*_column keys to the right names (e.g. --set data.audio_column=path)."
        )


@dataclass(frozen=True)
class Layout:
    """Which cells of a table row are what: the data.*_column settings, NeMo's names, or Common Voice's."""

    audio: str
    text: str
    language: str
    id: str  # "" = derived from the audio path
    segments: bool = False  # NeMo: "offset" and "duration" (seconds) say which part of the file


class TableSource(Source):
    """Records already in memory (manifests and Common Voice TSVs), one row each."""

    def __init__(
        self,
        config: DataConfig,
        identity: dict[str, Any],
        records: list[Record],
        file_name: str,
        base: Path,
        layout: Layout,
    ):
        self._records = records
        self._file_name = file_name
        self._base = base
        self._layout = layout
        # The rows themselves, not only the file's path: a manifest edited in place is other data, and a
        # store must never mix the two (the audio files' bytes are not read here).
        used = [r.cells if r.cells is not None else r.reason for r in records[: config.max_clips or len(records)]]
        content = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:16]
        super().__init__(
            config, {**identity, "content": content}, [self._id_of(row, record) for row, record in enumerate(records)]
        )

    def _id_of(self, row: int, record: Record) -> str:
        cells = record.cells
        if cells is None:
            return f"row-{row:08d}"
        try:
            if self._layout.id and cell_text(cells, self._layout.id, integers=True):
                return cell_text(cells, self._layout.id, integers=True)
            audio = Path(cell_text(cells, self._layout.audio))
            segment = nemo_segment(cells) if self._layout.segments else None
        except BadCell:
            return f"row-{row:08d}"  # the row is rejected by _fields
        if not audio.name:
            return f"row-{row:08d}"
        return self._derived_id(audio) + (f"@{segment[0]:g}" if segment and segment[0] else "")

    def _derived_id(self, audio: Path) -> str:
        """The path without its extension, from the manifest's folder: unique, readable."""
        if audio.is_absolute() and audio.is_relative_to(self._base):
            audio = audio.relative_to(self._base)
        return audio.with_suffix("").as_posix()

    def _where(self, row: int) -> str:
        return f"line {self._records[row].line} of {self._file_name}"

    def _fields(self, row: int) -> tuple[str, str, str, Segment | None] | str:
        record, layout = self._records[row], self._layout
        if record.cells is None:  # a line that did not parse
            return record.reason
        cells = record.cells
        missing = [name for name in (layout.audio, layout.text) if name not in cells]
        if missing:
            return f"bad row: {self._where(row)} has no {' or '.join(repr(m) for m in missing)}"
        try:
            if layout.id:
                cell_text(cells, layout.id, integers=True)
            language = cell_text(cells, layout.language) if layout.language else ""
            audio = cell_text(cells, layout.audio)
            text = cell_text(cells, layout.text)
            segment = nemo_segment(cells) if layout.segments else None
        except BadCell as err:
            return f"bad row: {self._where(row)}: {err}"
        return (
            text,
            self._normalise_language(language) or self.config.language,
            str(self._base / audio) if audio else "",
            segment,
        )

    def _normalise_language(self, language: str) -> str:
        return language

    def column(self, name: str) -> list[str] | None:
        if not any(record.cells is not None and name in record.cells for record in self._records):
            return None
        return [_clean(record.cells.get(name)) if record.cells is not None else "" for record in self._records][
            : len(self)
        ]


class ManifestSource(TableSource):
    """A CSV/TSV/JSON-lines manifest in whistle's layout (data.*_column) or NeMo's."""

    kind = "manifest"

    def __init__(self, config: DataConfig, path: Path, records: list[Record], columns: list[str] | None):
        layout = manifest_layout(config, records, columns)
        if columns is not None:
            _require_columns(
                f"manifest {path}",
                columns,
                {
                    "data.audio_column": layout.audio,
                    "data.text_column": layout.text,
                    "data.id_column": layout.id,
                    "data.language_column": layout.language,
                },
            )
        identity = {"path": str(path.resolve()), "columns": _column_identity(config)}
        if layout.id != config.id_column:  # recorded only when chosen: older stores keep their fingerprint
            identity["id_column"] = layout.id
        if layout.segments:
            identity["layout"] = "nemo"
        super().__init__(config, identity, records, path.name, path.resolve().parent, layout)


def manifest_layout(config: DataConfig, records: list[Record], columns: list[str] | None) -> Layout:
    """whistle's layout (data.*_column), or NeMo's when the first JSON record has `audio_filepath` and no
    data.audio_column; the id column is data.id_column, else "id" when the manifest has one."""
    keys = set(columns) if columns is not None else {key for r in records if r.cells is not None for key in r.cells}
    first = next((r.cells for r in records if r.cells is not None), {})
    nemo = columns is None and NEMO_AUDIO_COLUMN in first and config.audio_column not in first
    language = config.language_column or (NEMO_LANGUAGE_COLUMN if nemo and NEMO_LANGUAGE_COLUMN in keys else "")
    return Layout(
        audio=NEMO_AUDIO_COLUMN if nemo else config.audio_column,
        text=config.text_column,
        language=language,
        id=config.id_column or (AUTO_ID_COLUMN if AUTO_ID_COLUMN in keys else ""),
        segments=nemo,
    )


class LhotseSource(Source):
    """lhotse supervisions (with their recordings) or cuts: one row each; see `whistle_pipeline.lhotse_manifests`."""

    kind = "lhotse"

    def __init__(self, config: DataConfig, path: Path, records: list[Record]):
        self._rows, files = read_lhotse(path, records)
        digests = [hashlib.sha256(file.read_bytes()).hexdigest()[:16] for file in files]
        identity = {"path": str(path.resolve()), "files": digests, "default_language": config.language}
        super().__init__(config, identity, [row.id or f"row-{n:08d}" for n, row in enumerate(self._rows)])

    def _where(self, row: int) -> str:
        return self._rows[row].where

    def _fields(self, row: int) -> tuple[str, str, str, Segment | None] | str:
        item: LhotseRow = self._rows[row]
        if item.reason:
            return item.reason
        try:
            text = cell_text(item.supervision, "text")
            language = whisper_language(cell_text(item.supervision, "language"))
        except BadCell as err:
            return f"bad row: {item.where}: {err}"
        return text, language or self.config.language, item.audio, item.segment

    def column(self, name: str) -> list[str] | None:
        rows = self._rows[: len(self)]
        if not any(name in row.supervision for row in rows):
            return None
        return [_clean(row.supervision.get(name)) for row in rows]


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
        records, columns = read_table(tsv, "\t")  # unquoted: Common Voice sentences contain quote characters
        language_column = config.language_column or (
            COMMON_VOICE_LANGUAGE_COLUMN if COMMON_VOICE_LANGUAGE_COLUMN in columns else ""
        )
        _require_columns(
            f"Common Voice table {tsv}",
            columns,
            {
                "audio (Common Voice)": COMMON_VOICE_AUDIO_COLUMN,
                "text (Common Voice)": COMMON_VOICE_TEXT_COLUMN,
                "data.language_column": language_column,
            },
        )
        identity = {
            "path": str(folder.resolve()),
            "table": table,
            "language_column": language_column,
            "language": config.language,
        }
        layout = Layout(audio=COMMON_VOICE_AUDIO_COLUMN, text=COMMON_VOICE_TEXT_COLUMN, language=language_column, id="")
        super().__init__(config, identity, records, tsv.name, folder.resolve() / "clips", layout)

    def _derived_id(self, audio: Path) -> str:
        return audio.stem

    def _normalise_language(self, language: str) -> str:
        # Common Voice locales carry regions ("zh-CN", "sv-SE", "pt-BR"); Whisper codes do not
        return language.split("-")[0].lower()


class DatasetSource(Source):
    """A `datasets` Dataset: rows read on demand (audio stays in Arrow until a worker asks for it)."""

    def __init__(self, config: DataConfig, kind: str):
        self.kind = kind
        dataset = _load_dataset(config, kind)
        columns = list(dataset.column_names)
        id_column = config.id_column or (AUTO_ID_COLUMN if AUTO_ID_COLUMN in columns else "")
        _require_columns(
            f"dataset {config.path} ({config.split})",
            columns,
            {
                "data.audio_column": config.audio_column,
                "data.text_column": config.text_column,
                "data.id_column": id_column,
                "data.language_column": config.language_column,
            },
        )
        self._all_columns = dataset  # for `column`
        wanted = [c for c in (config.audio_column, config.text_column, id_column, config.language_column) if c]
        dataset = dataset.select_columns(list(dict.fromkeys(wanted)))
        self._dataset = _undecoded_audio(dataset, config.audio_column, config.path)
        limit = min(len(dataset), config.max_clips or len(dataset))
        if id_column:
            ids = [_clean(v) for v in dataset.select(range(limit))[id_column]]
            ids = [v or f"{config.split}-{row:08d}" for row, v in enumerate(ids)]
        else:
            ids = [f"{config.split}-{row:08d}" for row in range(limit)]
        location = str(Path(config.path).resolve()) if kind == "hf_disk" else config.path
        identity = {
            "path": location,
            "subset": config.subset,
            "split": config.split,
            "columns": _column_identity(config),
            "content": getattr(dataset, "_fingerprint", None),
        }  # datasets' own hash of the data
        if id_column != config.id_column:  # recorded only when chosen: older stores keep their fingerprint
            identity["id_column"] = id_column
        super().__init__(config, identity, ids)

    def _fields(self, row: int) -> tuple[str, str, str | bytes, None] | str:
        values = self._dataset[row]
        audio = values[self.config.audio_column]
        if isinstance(audio, dict):  # Audio(decode=False): {"bytes": ..., "path": ...}
            audio = audio.get("bytes") or _clean(audio.get("path"))
        else:
            audio = _clean(audio)
        language = _clean(values.get(self.config.language_column)) if self.config.language_column else ""
        return _clean(values[self.config.text_column]), language or self.config.language, audio, None

    def column(self, name: str) -> list[str] | None:
        if name not in self._all_columns.column_names:
            return None
        return [_clean(value) for value in self._all_columns.select(range(len(self)))[name]]


def _load_dataset(config: DataConfig, kind: str):
    import datasets  # on use: it takes seconds to import, and only the `datasets` kinds need it

    try:
        if kind == "hf_disk":
            loaded = datasets.load_from_disk(config.path)
            if isinstance(loaded, datasets.DatasetDict):
                if config.split not in loaded:
                    raise WhistleError(
                        f"dataset {config.path} has no split {config.split!r} (it has {', '.join(loaded)}): set --split"
                    )
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
    return {
        "audio": config.audio_column,
        "text": config.text_column,
        "id": config.id_column,
        "language": config.language_column,
        "default_language": config.language,
    }


def looks_like_a_path(path: str) -> bool:
    """True for what can only be meant as a local file or folder: "./x", "../x", "/x", "~/x", "x.csv"."""
    return (
        path.startswith(("./", "../", "/", "~"))
        or manifest_suffix(path) in MANIFEST_SUFFIXES
        or Path(path).suffix.lower() == ".gz"
    )


def detect_kind(path: str) -> str:
    """data.kind = "auto": what `path` holds (see pipeline.toml [data])."""
    if not path:
        raise WhistleError(
            "data.path is empty: give a dataset name or folder, a manifest or a Common Voice folder (--data)"
        )
    local = Path(path)
    if local.is_dir() and (local / "clips").is_dir() and any(local.glob("*.tsv")):
        return "common_voice"
    if local.is_file() and manifest_suffix(local) in MANIFEST_SUFFIXES:
        return "manifest"
    if local.is_dir() and any((local / name).is_file() for name in ("state.json", "dataset_dict.json")):
        return "hf_disk"
    if local.is_file():
        raise WhistleError(
            f"{path} is a file but not a manifest: use a {', '.join(MANIFEST_SUFFIXES)} file (optionally .gz)"
        )
    if not local.exists() and looks_like_a_path(path):
        raise WhistleError(f"no such file: {path}; check the path (a name like this is not a hub dataset)")
    return "hf"


def open_source(config: DataConfig) -> Source:
    """The source `config` describes (data.kind "auto" infers it from data.path)."""
    kind = detect_kind(config.path) if config.kind == "auto" else config.kind
    if kind in ("manifest", "common_voice", "hf_disk") and not os.path.exists(config.path):
        raise WhistleError(f"no such file: {config.path}; check the path (data.path, kind {kind})")
    if kind == "manifest":
        return open_manifest(config)
    if kind == "common_voice":
        return CommonVoiceSource(config)
    return DatasetSource(config, kind)


def open_manifest(config: DataConfig) -> Source:
    """A manifest file in whistle's, NeMo's or lhotse's layout, told by its first record."""
    path = Path(config.path)
    if not path.is_file():
        raise WhistleError(f"manifest {path} is not a file (data.path)")
    records, columns = read_records(path)
    first = next((record.cells for record in records if record.cells is not None), {})
    if columns is None and is_lhotse(first):
        return LhotseSource(config, path, records)
    return ManifestSource(config, path, records, columns)
