"""Reading manifest files — CSV, TSV, JSON lines, each optionally gzipped — so that no row is lost.

Every record of a file becomes one row: a dict of its cells, or the reason it is unusable, with the
number of the line it starts on. Nothing is merged, dropped or filled silently:

- the text is UTF-8; a byte-order mark (BOM) at the start is dropped. Bytes that are not UTF-8 make
  their row a reject (read with errors="surrogateescape", found as lone surrogates);
- blank lines (nothing but white space) are no rows: they separate nothing and are skipped;
- JSON lines: one JSON object per line. A line that is not JSON, not an object, or names a key twice
  is a reject naming the line and the key (json would keep the last value silently);
- TSV is read unquoted (`csv.QUOTE_NONE`), as Common Voice and most speech corpora write it: a `"`
  is a character like any other, and every line is one row;
- CSV is read with the usual quoting: a field in double quotes may hold commas, `""` and line breaks.
  A record is one line, or the lines that one quoted field joins and closes. A quote that does not
  close properly (it never closes, or a character other than the delimiter follows the closing
  quote) costs its first line only: that line is a reject naming it, and reading starts again on the
  next line, so one stray `"` never swallows the rows after it;
- CSV/TSV: the first line names the columns; a column named twice is an error for the whole file
  (which one would be meant?), and a row with another number of fields than the header is a reject.

So a file's rows plus its rejects are exactly its records: its non-blank lines after the header,
less the extra lines of CSV fields that span lines (logged, with their lines, when there are any).

The cell helpers the manifest sources share are here too: `cell_text` (a cell as text, or BadCell for
a list, object, boolean or number), `is_blank` (nothing visible) and `nemo_segment` (NeMo's offset and
duration).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import re
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from whistle_pipeline.errors import WhistleError

log = logging.getLogger(__name__)

# Lone surrogates: bytes that were not UTF-8 (read with errors="surrogateescape") or "\udXXX" JSON escapes.
# Zarr stores UTF-8, so such a row is a reject, never a value that fails a whole shard's write.
NOT_UTF8 = re.compile("[\ud800-\udfff]")
NOT_UTF8_FIX = "not valid UTF-8 text: re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")
TABLE_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class Record:
    """One row of a manifest file: its cells, or why it has none, and the line it starts on."""

    line: int
    cells: dict[str, Any] | None
    reason: str = ""  # "bad row: line N of FILE ..." when cells is None


def manifest_suffix(path: str | Path) -> str:
    """The suffix that says a file's format, a trailing ".gz" aside: "x.jsonl.gz" -> ".jsonl"."""
    path = Path(path)
    if path.suffix.lower() == ".gz":
        path = path.with_suffix("")
    return path.suffix.lower()


@contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """A manifest's text, gunzipped if it ends in .gz, without its BOM; newline="" as csv needs."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with (
        opener(path, "rb") as raw,
        io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="") as text,
    ):
        yield text


def read_json_lines(path: Path) -> list[Record]:
    """Every non-blank line of a JSON-lines file as a Record."""
    records = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if not records and line.lstrip().startswith("["):
                raise WhistleError(
                    f"{path} holds a JSON array; whistle reads JSON lines, one object per line "
                    f"(convert it with: jq -c '.[]' {path.name} > {Path(path.stem).stem}.jsonl)"
                )
            records.append(_json_record(path, number, line))
    return records


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(key)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise DuplicateKey(key)
        values[key] = value
    return values


def _json_record(path: Path, number: int, line: str) -> Record:
    where = f"line {number} of {path.name}"
    try:
        values = json.loads(line, object_pairs_hook=_unique_keys)
    except DuplicateKey as err:
        return Record(number, None, f"bad row: {where} has the key {err.key!r} twice")
    except json.JSONDecodeError as err:
        return Record(number, None, f"bad row: {where} is not valid JSON ({err.msg})")
    if not isinstance(values, dict):
        return Record(number, None, f"bad row: {where} is not a JSON object")
    if NOT_UTF8.search(line) or any(isinstance(value, str) and NOT_UTF8.search(value) for value in values.values()):
        return Record(number, None, f"bad row: {where} is {NOT_UTF8_FIX}")
    return Record(number, values)


def read_table(path: Path, delimiter: str) -> tuple[list[Record], list[str]]:
    """The records of a CSV (delimiter ",") or TSV ("\\t") file after its header, and its columns."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open_text(path) as handle:
        lines = handle.readlines()  # split at \n, \r\n and \r, as csv splits them
    first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    columns = _header(path, lines[first : first + 1], delimiter, quoting)
    records: list[Record] = []
    spanning: list[str] = []
    start = first + 1
    while start < len(lines):
        start = _read_from(path, lines, start, columns, delimiter, quoting, records, spanning)
    if spanning:
        log.warning(
            "%s: %d record(s) span several lines (a quoted field with line breaks): lines %s",
            path,
            len(spanning),
            ", ".join(spanning[:10]) + (" ..." if len(spanning) > 10 else ""),
        )
    return records, columns


def _header(path: Path, lines: list[str], delimiter: str, quoting: int) -> list[str]:
    try:
        columns = next(csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True), [])
    except csv.Error as err:
        raise WhistleError(f"manifest {path}: cannot read its header line ({err})") from err
    seen: set[str] = set()
    for column in columns:
        if column in seen:
            raise WhistleError(f"manifest {path}: line 1 names the column {column!r} twice; rename one of them")
        seen.add(column)
    return columns


def _read_from(
    path: Path,
    lines: list[str],
    start: int,
    columns: list[str],
    delimiter: str,
    quoting: int,
    records: list[Record],
    spanning: list[str],
) -> int:
    """Read records from lines[start] on; returns where to start again after a bad quote (or the end)."""
    reader = csv.reader(islice(lines, start, None), delimiter=delimiter, quoting=quoting, strict=True)
    consumed = 0  # lines of `lines[start:]` the reader has taken
    try:
        for fields in reader:
            first, taken, consumed = start + consumed, reader.line_num - consumed, reader.line_num
            if taken == 1 and not lines[first].strip():
                continue  # a blank line
            record = _table_record(path, first + 1, fields, columns)
            if taken > 1 and record.cells is None:  # a quote that joined rows it should not have
                records.append(Record(first + 1, None, _unclosed(path, first + 1)))
                return first + 1
            if taken > 1:
                spanning.append(f"{first + 1}-{first + taken}")
            records.append(record)
    except csv.Error as err:
        first = start + consumed
        records.append(Record(first + 1, None, _unclosed(path, first + 1, str(err))))
        return first + 1
    return len(lines)


def _unclosed(path: Path, number: int, detail: str = "") -> str:
    what = f" ({detail})" if detail else ""
    return (
        f"bad row: line {number} of {path.name} has a quote that does not close{what}: double a quote "
        'inside a quoted field (""), or quote the whole field'
    )


def _table_record(path: Path, number: int, fields: list[str], columns: list[str]) -> Record:
    where = f"line {number} of {path.name}"
    if any(NOT_UTF8.search(field) for field in fields):
        return Record(number, None, f"bad row: {where} is {NOT_UTF8_FIX}")
    if len(fields) != len(columns):
        hint = " (quote fields that contain the delimiter)" if len(fields) > len(columns) else ""
        return Record(number, None, f"bad row: {where} has {len(fields)} field(s), the header has {len(columns)}{hint}")
    return Record(number, dict(zip(columns, fields)))


def read_records(path: Path) -> tuple[list[Record], list[str] | None]:
    """The records of any manifest file, and its columns (None for JSON lines: each row has its keys)."""
    suffix = manifest_suffix(path)
    if suffix in TABLE_SUFFIXES:
        return read_table(path, "\t" if suffix == ".tsv" else ",")
    if suffix in JSON_LINES_SUFFIXES:
        return read_json_lines(path), None
    raise WhistleError(
        f"{path} is not a manifest: use a {', '.join(TABLE_SUFFIXES + JSON_LINES_SUFFIXES)} file (optionally .gz)"
    )


def json_type(value: Any) -> str:
    """How JSON calls the type of `value`, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {list: "list", dict: "object", str: "string"}.get(type(value), type(value).__name__)


def is_blank(text: str) -> bool:
    """True for text with nothing to read: empty, or only white space, control, format and zero-width
    characters (Unicode categories Z* and C*: zero-width space, no-break space, BEL, ...)."""
    return all(unicodedata.category(char)[0] in "CZ" for char in text)


class BadCell(ValueError):
    """A manifest cell of the wrong type; its message is the reject's detail."""


def cell_text(cells: dict[str, Any], column: str, *, integers: bool = False) -> str:
    """A manifest cell as text: a string (stripped), "" for a missing cell or JSON null, and with `integers`
    an integer's digits (ids). Anything else — a list, an object, a boolean, a number — raises BadCell:
    str() would store its Python spelling ("['a', 'b']", "True") as if it were the text."""
    value = cells.get(column)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if integers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadCell(f"{column!r} holds a JSON {json_type(value)}, not text")


def nemo_segment(cells: dict[str, Any]) -> tuple[float, float | None] | None:
    """The (offset, duration) a NeMo row gives — NeMo's datasets read exactly that part of the file."""
    times = {name: cells.get(name) for name in ("offset", "duration")}
    for name, value in times.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
        ):
            raise BadCell(f"{name!r} is {json.dumps(value)}, not a number of seconds")
    if times["duration"] == 0:
        raise BadCell("'duration' is 0")
    offset, duration = float(times["offset"] or 0.0), times["duration"]
    if duration is None:
        return (offset, None) if offset else None
    return offset, float(duration)
