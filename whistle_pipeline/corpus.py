"""Text-only corpora: the target-domain sentences `whistle finetune` adapts the decoder to.

Four kinds, chosen from the path:

- ``*.txt``: one sentence per line (blank lines are skipped); every line is in ``language``; any of these
  files may start with a byte-order mark;
- ``*.jsonl``: one JSON object per line, the sentence in ``text_column``;
- ``*.csv`` / ``*.tsv``: a header row, the sentence in ``text_column``;
  (JSON lines, CSV and TSV are read as manifests are, by `whistle_pipeline.manifest_files`: TSV
  unquoted, a CSV quote that does not close costs its own line, a key named twice is a reject)
- anything else: a Hugging Face ``datasets`` dataset, a ``save_to_disk`` folder or a hub name
  (``split`` / ``subset``); only the text (and language) columns are read, so audio is never decoded.

The language is ``language`` for every row, or per row from ``language_column`` (rows whose cell
is empty fall back to ``language``). Bad rows (no text, unreadable JSON, no language) become
`TextReject`s with the reason; they never stop the read::

    corpus = read_corpus("examples/target/train.txt", text_column="text", language="en")
    corpus.rows[0]  # TextRow(id='train.txt:1', text='...', language='en')
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.manifest_files import is_blank, read_json_lines, read_table

FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class TextRow:
    id: str  # "<file>:<line>" for files, "<name>[<row>]" for datasets: says where to look
    text: str
    language: str


@dataclass(frozen=True)
class TextReject:
    id: str
    reason: str


@dataclass
class TextCorpus:
    path: str
    kind: str  # "txt", "jsonl", "csv", "tsv" or "datasets"
    rows: list[TextRow] = field(default_factory=list)
    rejects: list[TextReject] = field(default_factory=list)

    def split(self, val_fraction: float, seed: int) -> tuple[list[TextRow], list[TextRow]]:
        """(train, held-out) by a stable hash of each row's id, so a rerun holds out the same rows."""
        train, held_out = [], []
        for row in self.rows:
            (held_out if is_held_out(row.id, val_fraction, seed) else train).append(row)
        return train, held_out

    def summary(self) -> str:
        text = f"{len(self.rows)} sentences from {self.path} ({self.kind})"
        if self.rejects:
            first = self.rejects[0]
            text += f", {len(self.rejects)} rejected (first: {first.id}: {first.reason})"
        return text


def is_held_out(item_id: str, fraction: float, seed: int) -> bool:
    """A stable, seed-dependent coin for `item_id` that comes up `fraction` of the time."""
    bucket = zlib.crc32(f"{seed}:{item_id}".encode()) / 0xFFFFFFFF
    return bucket < fraction


def clean_text(text: str) -> str:
    """One line of text with runs of whitespace collapsed (tabs and newlines in a cell included)."""
    return " ".join(text.split())


def read_corpus(
    path: str,
    *,
    text_column: str,
    language: str,
    language_column: str = "",
    split: str = "train",
    subset: str = "",
    max_rows: int = 0,
) -> TextCorpus:
    """Read a text corpus (see the module docstring); raises WhistleError if it cannot be read at all."""
    if not path:
        raise WhistleError("no text corpus given: set finetune.text (a .txt/.jsonl/.csv file or a datasets name)")
    kind = FILE_KINDS.get(Path(path).suffix.lower(), "datasets")
    if kind != "datasets" and not Path(path).is_file():
        raise WhistleError(f"text corpus {path} does not exist (or is not a file)")
    if kind == "txt":
        records = _txt_records(Path(path))
    elif kind == "jsonl":
        records = _jsonl_records(Path(path))
    elif kind in ("csv", "tsv"):
        records = _csv_records(Path(path), "\t" if kind == "tsv" else ",", text_column, language_column)
    else:
        records = _datasets_records(path, split, subset, text_column, language_column)

    corpus = TextCorpus(path=path, kind=kind)
    for row_id, cells in records:
        if isinstance(cells, TextReject):
            corpus.rejects.append(cells)
        else:
            _add_row(corpus, row_id, cells, text_column, language, language_column)
        if max_rows and len(corpus.rows) >= max_rows:
            break
    if not corpus.rows:
        reasons = f" (first reject: {corpus.rejects[0].id}: {corpus.rejects[0].reason})" if corpus.rejects else ""
        raise WhistleError(f"text corpus {path} holds no usable sentence{reasons}")
    return corpus


def _add_row(
    corpus: TextCorpus, row_id: str, cells: dict[str, Any], text_column: str, language: str, language_column: str
) -> None:
    if text_column not in cells:
        corpus.rejects.append(TextReject(row_id, f"no {text_column!r} field (fields: {', '.join(map(str, cells))})"))
        return
    text = cells[text_column]
    if not isinstance(text, str):
        corpus.rejects.append(TextReject(row_id, f"{text_column!r} is {type(text).__name__}, not text"))
        return
    text = clean_text(text)
    if is_blank(text):
        corpus.rejects.append(TextReject(row_id, "empty text"))
        return
    row_language = cells.get(language_column) if language_column else None
    row_language = str(row_language).strip() if row_language not in (None, "") else language
    if not row_language:
        corpus.rejects.append(TextReject(row_id, f"no language: empty {language_column!r} and no default language"))
        return
    corpus.rows.append(TextRow(row_id, text, row_language))


def _txt_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(_lines(path), start=1):
        if line.strip():
            yield f"{path.name}:{number}", {"text": line}


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | TextReject]]:
    # read as manifests are (whistle_pipeline.manifest_files): BOM dropped, a key named twice is a reject
    for record in read_json_lines(path):
        row_id = f"{path.name}:{record.line}"
        yield row_id, record.cells if record.cells is not None else TextReject(row_id, record.reason)


def _csv_records(
    path: Path, delimiter: str, text_column: str, language_column: str
) -> Iterator[tuple[str, dict[str, Any] | TextReject]]:
    # read as manifests are: TSV unquoted, a CSV quote that does not close costs its own line, BOM dropped
    records, columns = read_table(path, delimiter)
    for wanted in filter(None, (text_column, language_column)):
        if wanted not in columns:
            raise WhistleError(
                f"{path} has no column {wanted!r} (its columns: {', '.join(columns) or 'none'}); "
                "set finetune.text_column / finetune.language_column"
            )
    # "file:N" is the line the row starts on (the header is line 1)
    for record in records:
        row_id = f"{path.name}:{record.line}"
        yield row_id, record.cells if record.cells is not None else TextReject(row_id, record.reason)


def _lines(path: Path) -> Iterable[str]:
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark is no part of the first line
            yield from handle
    except UnicodeDecodeError as err:
        raise WhistleError(f"{path} is not UTF-8 text ({err}); convert it, e.g. with iconv") from err


def _datasets_records(
    name: str, split: str, subset: str, text_column: str, language_column: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        if Path(name).is_dir() and any(
            (Path(name) / marker).exists() for marker in ("state.json", "dataset_dict.json", "dataset_info.json")
        ):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise WhistleError(f"{name} has no split {split!r} (splits: {', '.join(loaded)}); set it")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(name, subset or None, split=split)
    except WhistleError:
        raise
    except Exception as err:
        raise WhistleError(
            f"cannot load the text corpus {name!r} with `datasets` ({type(err).__name__}: {err}); give a "
            ".txt/.jsonl/.csv file, a `save_to_disk` folder or a reachable hub dataset"
        ) from err
    wanted = [c for c in (text_column, language_column) if c]
    missing = [c for c in wanted if c not in loaded.column_names]
    if missing:
        raise WhistleError(
            f"dataset {name} has no column(s) {', '.join(map(repr, missing))} "
            f"(its columns: {', '.join(loaded.column_names)}); set finetune.text_column / finetune.language_column"
        )
    for index, row in enumerate(loaded.select_columns(wanted)):
        yield f"{Path(name).name or name}[{index}]", row
