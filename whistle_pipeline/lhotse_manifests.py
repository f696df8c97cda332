"""lhotse manifests, read as the JSON lines they are: no lhotse install is needed.

lhotse describes a corpus with JSON-lines manifests (usually gzipped), one object per line:

- recordings:   {"id", "sources": [{"type": "file", "channels": [0], "source": PATH}], "sampling_rate",
                 "num_samples", "duration", "transforms"?}
- supervisions: {"id", "recording_id", "start", "duration", "channel", "text", "language", "speaker"}
- cuts:         {"id", "start", "duration", "channel", "recording": {...}, "supervisions": [{...}]}

A recordings + supervisions pair is given by either file: the other is the file beside it whose name
has "recordings" for "supervisions" (or back), as lhotse's recipes name them
(`librispeech_recordings_dev-clean.jsonl.gz`, `librispeech_supervisions_dev-clean.jsonl.gz`).
Each supervision is one row (its id, text, language, and the part of its recording from `start` for
`duration` seconds); each cut of a CutSet is one row (the cut's id and span of its recording, its one
supervision's text and language). Relative audio paths are taken from the current directory, as lhotse
takes them.

A row whose audio whistle cannot read as lhotse means it is rejected with the reason: a recording of
several files (one per channel), a source other than a file (URL, command), transforms other than
Resample (speed or volume perturbation), a supervision on some channels of a multi-channel file
(whistle downmixes every channel), a cut with no supervision or several (split it with
`CutSet.trim_to_supervisions()`), a MixedCut.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.manifest_files import Record, read_json_lines

log = logging.getLogger(__name__)

# A supervision within this of its recording's end covers the whole file: read it without seeking.
WHOLE_RECORDING_SLACK_SECONDS = 1e-3


@dataclass(frozen=True)
class LhotseRow:
    """One supervision or cut: where it is, its id and supervision (text, language, speaker, ...), the audio
    file and the part of it to read; or, with `reason`, why it cannot be used."""

    where: str  # "line N of FILE"
    id: str
    supervision: dict[str, Any] = field(default_factory=dict)
    audio: str = ""
    segment: tuple[float, float] | None = None
    reason: str = ""


class Unusable(ValueError):
    def __init__(self, kind: str, detail: str):
        self.kind = kind
        super().__init__(detail)


def lhotse_layout(cells: dict[str, Any]) -> str | None:
    """ "recordings", "supervisions" or "cuts" by the keys of a manifest's first record; None if not lhotse."""
    keys = set(cells)
    if {"sources", "sampling_rate"} <= keys:
        return "recordings"
    if {"recording_id", "start", "duration"} <= keys:
        return "supervisions"
    if "supervisions" in keys and ({"recording", "tracks"} & keys):
        return "cuts"
    return None


def is_lhotse(cells: dict[str, Any]) -> bool:
    return lhotse_layout(cells) is not None


def read_lhotse(path: Path, records: list[Record]) -> tuple[list[LhotseRow], list[Path]]:
    """The rows of the lhotse manifest `path` (its records already read), and every file they come from."""
    layout = lhotse_layout(next(record.cells for record in records if record.cells is not None))
    if layout == "cuts":
        return [_cut_row(path, record) for record in records], [path]
    other = partner(path, layout)
    recordings_file, supervisions_file = (path, other) if layout == "recordings" else (other, path)
    recording_records = records if layout == "recordings" else read_json_lines(other)
    recordings: dict[str, dict[str, Any]] = {}
    for record in recording_records:
        if record.cells is not None and isinstance(record.cells.get("id"), str):
            recordings.setdefault(record.cells["id"], record.cells)
    if len(recordings) < len(recording_records):
        log.warning(
            "%s: %d line(s) are no usable recording (not JSON, no id, or an id used before)",
            recordings_file,
            len(recording_records) - len(recordings),
        )
    supervisions = records if layout == "supervisions" else read_json_lines(other)
    rows = [_supervision_row(supervisions_file, record, recordings, recordings_file.name) for record in supervisions]
    return rows, [recordings_file, supervisions_file]


def partner(path: Path, layout: str) -> Path:
    """The other file of a recordings + supervisions pair, by its name."""
    this, that = ("recordings", "supervisions") if layout == "recordings" else ("supervisions", "recordings")
    if this not in path.name:
        raise WhistleError(
            f"{path} holds lhotse {layout}: whistle finds their {that} by the file name, with "
            f"'{that}' for '{this}'; rename the pair so (e.g. corpus_{this}_train.jsonl.gz)"
        )
    head, _, tail = path.name.rpartition(this)
    other = path.with_name(head + that + tail)
    if not other.is_file():
        raise WhistleError(
            f"{path} holds lhotse {layout}; their {that} should be beside it as {other.name}, which does not exist"
        )
    return other


def _id(cells: dict[str, Any]) -> str:
    value = cells.get("id")
    return value.strip() if isinstance(value, str) else ""


def _supervision_row(
    file: Path, record: Record, recordings: dict[str, dict[str, Any]], recordings_name: str
) -> LhotseRow:
    where = f"line {record.line} of {file.name}"
    if record.cells is None:
        return LhotseRow(where, "", reason=record.reason)
    supervision = record.cells
    try:
        recording = recordings.get(supervision.get("recording_id"))  # type: ignore[arg-type]
        if recording is None:
            raise Unusable("bad row", f"no recording {supervision.get('recording_id')!r} in {recordings_name}")
        audio = _audio_file(recording, supervision.get("channel", 0))
        segment = _segment(supervision, recording)
    except Unusable as err:
        return LhotseRow(where, _id(supervision), supervision, reason=f"{err.kind}: {where}: {err}")
    return LhotseRow(where, _id(supervision), supervision, audio, segment)


def _cut_row(file: Path, record: Record) -> LhotseRow:
    where = f"line {record.line} of {file.name}"
    if record.cells is None:
        return LhotseRow(where, "", reason=record.reason)
    cut = record.cells
    supervisions = cut.get("supervisions") or []
    try:
        if "tracks" in cut:
            raise Unusable("unsupported audio", "a MixedCut (several tracks): whistle reads cuts of one recording")
        if not isinstance(cut.get("recording"), dict):
            raise Unusable("bad row", "the cut has no recording")
        if not isinstance(supervisions, list) or len(supervisions) != 1 or not isinstance(supervisions[0], dict):
            count = len(supervisions) if isinstance(supervisions, list) else "no list of"
            raise Unusable(
                "bad row",
                f"the cut has {count} supervisions; whistle needs exactly one, its transcript "
                "(split cuts with CutSet.trim_to_supervisions())",
            )
        audio = _audio_file(cut["recording"], cut.get("channel", 0))
        segment = _segment(cut, cut["recording"])
    except Unusable as err:
        return LhotseRow(where, _id(cut), reason=f"{err.kind}: {where}: {err}")
    return LhotseRow(where, _id(cut), supervisions[0], audio, segment)


def _seconds(cells: dict[str, Any], name: str, default: float | None = None) -> float:
    value = cells.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise Unusable("bad row", f"{name!r} is {value!r}, not a number of seconds")
    return float(value)


def _segment(item: dict[str, Any], recording: dict[str, Any]) -> tuple[float, float] | None:
    """(start, duration) of a supervision or cut in its recording; None when it is the whole recording."""
    start, duration = _seconds(item, "start", 0.0), _seconds(item, "duration")
    if duration == 0:
        raise Unusable("bad row", "'duration' is 0")
    whole = recording.get("duration")
    if start == 0 and isinstance(whole, (int, float)) and duration >= whole - WHOLE_RECORDING_SLACK_SECONDS:
        return None
    return start, duration


def _audio_file(recording: dict[str, Any], channel: Any) -> str:
    """The file of a recording's audio (absolute), if whistle reads it as lhotse would."""
    name = recording.get("id")
    sources = recording.get("sources")
    if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
        count = len(sources) if isinstance(sources, list) else "no list of"
        raise Unusable(
            "unsupported audio",
            f"recording {name!r} has {count} audio sources; whistle reads recordings held in one file",
        )
    source = sources[0]
    if source.get("type") != "file" or not isinstance(source.get("source"), str):
        raise Unusable(
            "unsupported audio", f"recording {name!r} is a {source.get('type')!r} source; whistle reads 'file' sources"
        )
    changing = [
        str(t.get("name"))
        for t in recording.get("transforms") or []
        if not isinstance(t, dict) or t.get("name") != "Resample"
    ]
    if changing:
        raise Unusable(
            "unsupported audio",
            f"recording {name!r} has lhotse transforms whistle does not apply ({', '.join(changing)})",
        )
    channels = source.get("channels") or [0]
    wanted = channel if isinstance(channel, list) else [channel]
    if isinstance(channels, list) and len(channels) > 1 and sorted(map(str, wanted)) != sorted(map(str, channels)):
        raise Unusable(
            "unsupported audio",
            f"channel {channel} of the {len(channels)}-channel recording {name!r}: "
            "whistle reads every channel of a file, downmixed",
        )
    return str(Path.cwd() / Path(source["source"]).expanduser())
