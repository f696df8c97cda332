"""Generate the bad-input corpus and the outcome each item must have.

    python tests/data/make_bad_inputs.py OUT_DIR        # writes OUT_DIR/clips/, manifests, expected.json

Nothing here is committed as binary: tests/test_bad_inputs.py calls `make_corpus(tmp_path)` and
precomputes the result. Every item is either *processed* (stored, with the duration, text and
language the table gives) or *rejected* with a reason of the given kind (the text before the first
colon, as the store and inspect-store group them) and a detail that names what is wrong.

    OUT_DIR/manifest.jsonl       the main corpus (id column "id"; one line is not UTF-8, one not JSON, one names
                                 a key twice; cells of the wrong JSON type)
    OUT_DIR/rows.csv             CSV rows: short, too long (an unquoted comma), not UTF-8, a quote that never
                                 closes (costing its own row only), zero-width text; the file starts with a BOM
    OUT_DIR/rows.tsv             TSV rows with stray quotes (TSV is unquoted); the file starts with a BOM
    OUT_DIR/missing_column.csv   a manifest without the text column: the whole source is refused
    OUT_DIR/clips/               the audio, made with soundfile from seeded signals
    OUT_DIR/expected.json        {"manifests": {name: [item, ...]}, "refused": {name: fragment}}

An item is {"id", "what", "outcome": "processed" | "rejected", "kind", "detail", "samples", "peak",
"mean", "text", "language"}: `samples` is the clip's length at 16 kHz after decoding, `peak` and
`mean` the expected max |x| and mean of the decoded mono signal (what load_audio must give).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import soundfile

RATE = 16000  # the teacher's rate; other rates are resampled to it
TONE_HZ = 440.0
AMPLITUDE = 0.3
LONG_TEXT_CHARS = 2000


def tone(seconds: float, rate: int, channels: int = 1, amplitude: float = AMPLITUDE) -> np.ndarray:
    """A sine per channel (different frequencies), float32 (N, C); the channel mean is what is kept."""
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([amplitude * np.sin(2 * np.pi * (TONE_HZ + 55 * c) * t) for c in range(channels)], axis=1).astype(
        np.float32
    )


def long_text() -> str:
    words = ("the patient received two milligrams of amoxicillin with food " * 40)[: LONG_TEXT_CHARS - 1]
    return words + "."


def make_corpus(folder: Path) -> dict[str, Any]:
    """Write the corpus into `folder`; returns (and writes as expected.json) the outcome table."""
    folder = Path(folder)
    clips = folder / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    items: list[dict[str, Any]] = []
    lines: list[bytes] = []

    def row(values: dict[str, Any]) -> None:
        lines.append(json.dumps(values, ensure_ascii=False).encode())

    def processed(
        utt_id: str,
        what: str,
        audio: str,
        seconds: float,
        *,
        peak: float = AMPLITUDE,
        mean: float = 0.0,
        text: str | None = None,
        language: str = "en",
    ) -> None:
        text = text if text is not None else f"clip {utt_id}"
        row({"id": utt_id, "audio": f"clips/{audio}", "text": text, "language": language})
        items.append(
            {
                "id": utt_id,
                "what": what,
                "outcome": "processed",
                "samples": round(seconds * RATE),
                "peak": peak,
                "mean": mean,
                "text": text,
                "language": language,
            }
        )

    def rejected(utt_id: str, what: str, kind: str, detail: str, values: dict[str, Any] | None = None) -> None:
        if values is not None:
            row(values)
        items.append({"id": utt_id, "what": what, "outcome": "rejected", "kind": kind, "detail": detail})

    def clip_row(utt_id: str, audio: str) -> dict[str, Any]:
        return {"id": utt_id, "audio": f"clips/{audio}", "text": f"clip {utt_id}", "language": "en"}

    # --- audio that decodes ---------------------------------------------------------------------------------
    soundfile.write(clips / "ok.wav", tone(1.0, RATE), RATE, subtype="PCM_16")
    processed("ok-16k", "16 kHz int16 WAV, 1 s (reference)", "ok.wav", 1.0)
    soundfile.write(clips / "pcm-u8.wav", tone(1.0, RATE), RATE, subtype="PCM_U8")
    processed("pcm-u8", "8-bit unsigned PCM WAV", "pcm-u8.wav", 1.0)
    soundfile.write(clips / "pcm-24.wav", tone(1.0, RATE), RATE, subtype="PCM_24")
    processed("pcm-24", "24-bit PCM WAV", "pcm-24.wav", 1.0)
    six = tone(1.0, RATE, channels=6)
    soundfile.write(clips / "six-channels.wav", six, RATE, subtype="FLOAT")
    processed(
        "six-channels",
        "6 channels (downmixed to their mean)",
        "six-channels.wav",
        1.0,
        peak=float(np.abs(six.mean(axis=1)).max()),
    )
    soundfile.write(clips / "rate-8k.wav", tone(1.0, 8000), 8000, subtype="PCM_16")
    processed("rate-8k", "8 kHz WAV (resampled to 16 kHz)", "rate-8k.wav", 1.0)
    soundfile.write(clips / "rate-48k.flac", tone(1.0, 48000), 48000)
    processed("rate-48k", "48 kHz FLAC (resampled to 16 kHz)", "rate-48k.flac", 1.0)
    soundfile.write(clips / "silence.wav", np.zeros((RATE, 1), np.float32), RATE, subtype="PCM_16")
    processed("silence", "pure digital silence, 1 s", "silence.wav", 1.0, peak=0.0)
    soundfile.write(clips / "dc-offset.wav", tone(1.0, RATE) + 0.5, RATE, subtype="FLOAT")
    processed("dc-offset", "tone on a +0.5 DC offset", "dc-offset.wav", 1.0, peak=0.5 + AMPLITUDE, mean=0.5)
    soundfile.write(clips / "window-30s.wav", tone(30.0, RATE), RATE, subtype="PCM_16")
    processed("window-30s", "exactly the 30 s window", "window-30s.wav", 30.0)
    blip = tone(0.001, RATE)
    soundfile.write(clips / "one-ms.wav", blip, RATE, subtype="PCM_16")
    processed(
        "one-ms", "16 samples (1 ms)", "one-ms.wav", 0.001, peak=float(np.abs(blip).max()), mean=float(blip.mean())
    )

    # --- text and metadata ----------------------------------------------------------------------------------
    processed("text-2000", f"{LONG_TEXT_CHARS}-character transcript (stored whole)", "ok.wav", 1.0, text=long_text())
    processed(
        "lang-unknown", "unknown language code 'xx' (stored; train-tle/finetune judge it)", "ok.wav", 1.0, language="xx"
    )
    rejected("text-empty", "empty transcript", "empty text", "", {**clip_row("text-empty", "ok.wav"), "text": ""})
    rejected(
        "text-space",
        "whitespace-only transcript",
        "empty text",
        "",
        {**clip_row("text-space", "ok.wav"), "text": " \t\u3000 "},
    )
    lines.append(b'{"id": "text-latin1", "audio": "clips/ok.wav", "text": "caf\xe9 cr\xe8me", "language": "en"}')
    rejected(f"row-{len(lines) - 1:08d}", "transcript in Latin-1, not UTF-8", "bad row", "not valid UTF-8")
    rejected(
        "ok-16k",
        "duplicate id (the first row's)",
        "duplicate id",
        "first used by row 0",
        clip_row("ok-16k", "pcm-24.wav"),
    )
    rejected(
        "text-zero-width",
        "transcript of zero-width characters only",
        "empty text",
        "",
        {**clip_row("text-zero-width", "ok.wav"), "text": "\u200b\u200c\u2060"},
    )
    rejected(
        "text-list",
        "transcript that is a JSON list",
        "bad row",
        "'text' holds a JSON list",
        {**clip_row("text-list", "ok.wav"), "text": ["a", "b"]},
    )
    rejected(
        "lang-bool",
        "language that is a JSON boolean",
        "bad row",
        "'language' holds a JSON boolean",
        {**clip_row("lang-bool", "ok.wav"), "language": True},
    )
    lines.append(b'{"id": "key-twice", "audio": "clips/ok.wav", "text": "one", "text": "two", "language": "en"}')
    rejected(f"row-{len(lines) - 1:08d}", "a JSON line with the key 'text' twice", "bad row", "key 'text' twice")

    # --- audio that must be rejected ------------------------------------------------------------------------
    soundfile.write(clips / "whole.wav", tone(1.0, RATE), RATE, subtype="PCM_16")
    whole = (clips / "whole.wav").read_bytes()
    (clips / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (clips / "whole.wav").unlink()
    rejected(
        "truncated-wav",
        "WAV cut in the middle of its samples",
        "truncated audio",
        "header declares",
        clip_row("truncated-wav", "truncated.wav"),
    )
    (clips / "header-only.wav").write_bytes(whole[:30])
    rejected(
        "header-only-wav",
        "WAV cut inside its header",
        "undecodable audio",
        "data",
        clip_row("header-only-wav", "header-only.wav"),
    )
    soundfile.write(clips / "whole.mp3", tone(2.0, RATE), RATE)
    whole = (clips / "whole.mp3").read_bytes()
    (clips / "truncated.mp3").write_bytes(whole[: len(whole) // 2])
    (clips / "whole.mp3").unlink()
    rejected(
        "truncated-mp3",
        "MP3 cut in half",
        "truncated audio",
        "header declares",
        clip_row("truncated-mp3", "truncated.mp3"),
    )
    (clips / "zero-length.wav").write_bytes(b"")
    rejected(
        "zero-length",
        "zero-length file",
        "undecodable audio",
        "empty (0 bytes)",
        clip_row("zero-length", "zero-length.wav"),
    )
    (clips / "random.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    rejected(
        "random-flac",
        "random bytes named .flac",
        "undecodable audio",
        "Format not recognised",
        clip_row("random-flac", "random.flac"),
    )
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        samples = tone(1.0, RATE)
        samples[RATE // 2] = value
        soundfile.write(clips / f"{name}.wav", samples, RATE, subtype="FLOAT")
        rejected(
            f"float-{name}",
            f"float WAV with a {name} sample",
            "non-finite audio",
            "NaN or infinite",
            clip_row(f"float-{name}", f"{name}.wav"),
        )
    soundfile.write(clips / "long-45s.wav", tone(45.0, RATE), RATE, subtype="PCM_16")
    rejected(
        "long-45s",
        "45 s clip (longer than the 30 s window)",
        "too long",
        "45.0 s",
        clip_row("long-45s", "long-45s.wav"),
    )
    rejected(
        "missing-file",
        "audio file that does not exist",
        "audio not found",
        "missing.wav",
        clip_row("missing-file", "missing.wav"),
    )
    rejected(
        "no-text-column",
        "row without the text column",
        "bad row",
        "no 'text'",
        {"id": "no-text-column", "audio": "clips/ok.wav", "language": "en"},
    )
    rejected(
        "no-audio-column",
        "row without the audio column",
        "bad row",
        "no 'audio'",
        {"id": "no-audio-column", "text": "no audio here", "language": "en"},
    )
    lines.append(b'{"id": "broken-json", "audio": "clips/ok.wav", "text": ')
    rejected(f"row-{len(lines) - 1:08d}", "line that is not JSON", "bad row", "not valid JSON")
    (folder / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    # --- CSV / TSV: field counts, encodings, quotes, a byte-order mark --------------------------------------
    csv_items = [
        {
            "id": "csv-ok",
            "what": "CSV row",
            "outcome": "processed",
            "samples": RATE,
            "peak": AMPLITUDE,
            "mean": 0.0,
            "text": "a quoted, comma",
            "language": "en",
        },
        {
            "id": "row-00000001",
            "what": "CSV row with a field missing",
            "outcome": "rejected",
            "kind": "bad row",
            "detail": "3 field(s), the header has 4",
        },
        {
            "id": "row-00000002",
            "what": "CSV row with an unquoted comma (a field too many)",
            "outcome": "rejected",
            "kind": "bad row",
            "detail": "5 field(s), the header has 4",
        },
        {
            "id": "row-00000003",
            "what": "CSV row in Latin-1, not UTF-8",
            "outcome": "rejected",
            "kind": "bad row",
            "detail": "not valid UTF-8",
        },
        {
            "id": "row-00000004",
            "what": "CSV row with a quote that never closes",
            "outcome": "rejected",
            "kind": "bad row",
            "detail": "line 6 of rows.csv has a quote that does not close",
        },
        {
            "id": "csv-after-quote",
            "what": "the row after it (not swallowed)",
            "outcome": "processed",
            "samples": RATE,
            "peak": AMPLITUDE,
            "mean": 0.0,
            "text": "after the quote",
            "language": "en",
        },
        {
            "id": "csv-zero-width",
            "what": "CSV transcript of zero-width characters",
            "outcome": "rejected",
            "kind": "empty text",
            "detail": "line 8 of rows.csv",
        },
    ]
    (folder / "rows.csv").write_bytes(
        b'\xef\xbb\xbfid,audio,text,language\ncsv-ok,clips/ok.wav,"a quoted, comma",en\ncsv-short,clips/ok.wav,en\n'
        b"csv-long,clips/ok.wav,a comma, unquoted,en\ncsv-latin1,clips/ok.wav,caf\xe9,en\n"
        b'csv-quote,clips/ok.wav,"an unclosed quote,en\ncsv-after-quote,clips/ok.wav,after the quote,en\n'
        + "csv-zero-width,clips/ok.wav,\u200b\u200d,en\n".encode()
    )
    tsv_items = [
        {
            "id": "tsv-quote",
            "what": "TSV row with a stray quote (TSV is unquoted: it is text)",
            "outcome": "processed",
            "samples": RATE,
            "peak": AMPLITUDE,
            "mean": 0.0,
            "text": '"she said hi',
            "language": "en",
        },
        {
            "id": "tsv-next",
            "what": "the row after it (not swallowed)",
            "outcome": "processed",
            "samples": RATE,
            "peak": AMPLITUDE,
            "mean": 0.0,
            "text": 'next "row"',
            "language": "en",
        },
    ]
    (folder / "rows.tsv").write_bytes(
        b'\xef\xbb\xbfid\taudio\ttext\tlanguage\ntsv-quote\tclips/ok.wav\t"she said hi\ten\n'
        b'tsv-next\tclips/ok.wav\tnext "row"\ten\n'
    )
    (folder / "missing_column.csv").write_text("id,audio\nm1,clips/ok.wav\n", encoding="utf-8")

    expected = {
        "manifests": {"manifest.jsonl": items, "rows.csv": csv_items, "rows.tsv": tsv_items},
        "refused": {"missing_column.csv": "data.text_column = 'text'"},
    }
    (folder / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False), encoding="utf-8")
    return expected


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
def main(out_dir: str) -> None:
    """Write the bad-input corpus and its expected.json into OUT_DIR."""
    expected = make_corpus(Path(out_dir))
    for name, items in expected["manifests"].items():
        kept = sum(item["outcome"] == "processed" for item in items)
        click.echo(f"{name}: {len(items)} items, {kept} to be processed, {len(items) - kept} rejected")


if __name__ == "__main__":
    main()
