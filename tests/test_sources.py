"""whistle_pipeline.sources: manifests, Common Voice folders and datasets as rows, with rejects and fingerprints."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_clip

from whistle_pipeline.audio import AudioError, load_audio
from whistle_pipeline.config import load_config
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.sources import Clip, SourceReject, detect_kind, open_source


def data_config(path, **keys):
    return load_config(updates={"data": {"path": str(path), **keys}}).data


@pytest.fixture
def clips(tmp_path) -> Path:
    folder = tmp_path / "audio" / "spk1"
    folder.mkdir(parents=True)
    write_clip(folder / "a.wav", 0.5, 16000)
    write_clip(folder / "b.flac", 0.5, 22050)
    return tmp_path / "audio"


def test_csv_manifest_rows_rejects_and_ids(clips):
    manifest = clips / "manifest.csv"
    manifest.write_text(
        "path,text,language,speaker_id\n"
        "spk1/a.wav,Hello there,,s1\n"
        "spk1/b.flac,  Guten Tag  ,de,s2\n"
        "spk1/a.wav,the same file again,,s3\n"  # duplicate derived id
        "spk1/c.wav,   ,,s4\n"
        ",no audio here,,s5\n"
        "spk1/short.wav\n",  # a short row: no text
        encoding="utf-8",
    )
    source = open_source(data_config(manifest, audio_column="path", language_column="language"))
    assert source.kind == "manifest" and len(source) == 6
    rows = list(source)
    assert rows[0] == Clip(row=0, id="spk1/a", text="Hello there", language="en", audio=str(clips / "spk1" / "a.wav"))
    assert rows[1] == Clip(row=1, id="spk1/b", text="Guten Tag", language="de", audio=str(clips / "spk1" / "b.flac"))
    assert rows[2] == SourceReject(2, "spk1/a", "duplicate id: first used by row 0 (line 4 of manifest.csv)")
    assert rows[3] == SourceReject(3, "spk1/c", "empty text: line 5 of manifest.csv")
    assert rows[4] == SourceReject(4, "row-00000004", "no audio: the audio column is empty (line 6 of manifest.csv)")
    assert rows[5] == SourceReject(
        5, "row-00000005", "bad row: line 7 of manifest.csv has 1 field(s), the header has 4"
    )
    with_ids = open_source(data_config(manifest, audio_column="path", id_column="speaker_id"))
    assert [with_ids.row_id(r) for r in range(6)] == ["s1", "s2", "s3", "s4", "s5", "row-00000005"]
    assert isinstance(with_ids[2], Clip)  # unique ids now


def test_tsv_and_jsonl_manifests(clips):
    tsv = clips / "manifest.tsv"
    tsv.write_text('audio\ttext\nspk1/a.wav\tshe said "hi"\n', encoding="utf-8")
    (item,) = list(open_source(data_config(tsv)))
    assert item.text == 'she said "hi"'
    jsonl = clips / "manifest.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"audio": "spk1/a.wav", "text": "first", "language": "fr", "id": "u1"}),
                "{not json",
                json.dumps({"audio": str(clips / "spk1" / "b.flac"), "text": "absolute path"}),
                json.dumps(["a", "list"]),
                json.dumps({"audio": "spk1/c.flac"}),
                "",
            ]
        ),
        encoding="utf-8",
    )
    source = open_source(data_config(jsonl, id_column="id", language_column="language"))
    rows = list(source)
    assert rows[0] == Clip(row=0, id="u1", text="first", language="fr", audio=str(clips / "spk1" / "a.wav"))
    assert rows[1].reason.startswith("bad row: line 2 of manifest.jsonl is not valid JSON")
    assert rows[2] == Clip(
        row=2, id="spk1/b", text="absolute path", language="en", audio=str(clips / "spk1" / "b.flac")
    )
    assert rows[3].reason == "bad row: line 4 of manifest.jsonl is not a JSON object"
    assert rows[4] == SourceReject(4, "spk1/c", "bad row: line 5 of manifest.jsonl has no 'text'")
    assert len(source) == 5  # the blank line is no row


def test_manifest_problems_name_the_fix(clips):
    manifest = clips / "m.csv"
    manifest.write_text("file,sentence\nspk1/a.wav,hi\n", encoding="utf-8")
    with pytest.raises(
        WhistleError,
        match=r"no column for data.audio_column = 'audio', data.text_column = 'text'; "
        r"its columns are file, sentence",
    ):
        open_source(data_config(manifest))
    with pytest.raises(WhistleError, match="no such file: .*nope.csv; check the path"):
        open_source(data_config(clips / "nope.csv", kind="manifest"))


def _common_voice(root: Path) -> Path:
    folder = root / "cv-corpus-21.0" / "zh-CN"
    (folder / "clips").mkdir(parents=True)
    header = (
        "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents"
        "\tvariant\tlocale\tsegment\n"
    )
    lines = [
        'c1\tcommon_voice_zh-CN_1.mp3\ts1\t他说"你好"。\t\t2\t0\t\t\t\t\tzh-CN\t\n',
        "c2\tcommon_voice_zh-CN_2.mp3\ts2\t\t\t2\t0\t\t\t\t\tzh-CN\t\n",
    ]
    for name in ("common_voice_zh-CN_1.mp3", "common_voice_zh-CN_2.mp3"):
        write_clip(folder / "clips" / name, 0.5, 48000)
    (folder / "train.tsv").write_text(header + "".join(lines), encoding="utf-8")
    (folder / "validated.tsv").write_text(header + lines[0], encoding="utf-8")
    return folder


def test_common_voice_folder(tmp_path):
    folder = _common_voice(tmp_path)
    assert detect_kind(str(folder)) == "common_voice"
    source = open_source(data_config(folder))  # split "train" -> train.tsv
    first, second = list(source)
    assert first == Clip(
        row=0,
        id="common_voice_zh-CN_1",
        text='他说"你好"。',
        language="zh",
        audio=str(folder.resolve() / "clips" / "common_voice_zh-CN_1.mp3"),
    )
    assert second == SourceReject(1, "common_voice_zh-CN_2", "empty text: line 3 of train.tsv")
    assert len(open_source(data_config(folder, subset="validated"))) == 1
    with pytest.raises(WhistleError, match=r"has no dev.tsv .* it has: train, validated"):
        open_source(data_config(folder, subset="dev"))


def _dataset_rows(clips: Path) -> dict[str, list]:
    return {
        "audio": [
            {"bytes": (clips / "spk1" / "a.wav").read_bytes(), "path": "a.wav"},
            {"bytes": None, "path": str(clips / "spk1" / "b.flac")},
            {"bytes": b"", "path": None},
        ],
        "sentence": ["embedded bytes", "a path", "no audio"],
        "lang": ["de", "", "en"],
        "utt": ["x1", "x2", "x3"],
        "unused": [1, 2, 3],
    }


def test_save_to_disk_dataset(clips, tmp_path):
    import datasets

    dataset = datasets.Dataset.from_dict(_dataset_rows(clips)).cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"test": dataset}).save_to_disk(tmp_path / "ds")
    assert detect_kind(str(tmp_path / "ds")) == "hf_disk"
    source = open_source(
        data_config(tmp_path / "ds", split="test", text_column="sentence", language_column="lang", id_column="utt")
    )
    first, second, third = list(source)
    assert isinstance(first.audio, bytes) and first.audio == (clips / "spk1" / "a.wav").read_bytes()
    assert (first.id, first.text, first.language) == ("x1", "embedded bytes", "de")
    # save_to_disk embeds local files: the path row comes back as bytes too
    assert second == Clip(row=1, id="x2", text="a path", language="en", audio=(clips / "spk1" / "b.flac").read_bytes())
    assert third == SourceReject(2, "x3", "no audio: the audio column is empty")
    with pytest.raises(WhistleError, match="has no split 'train'"):
        open_source(data_config(tmp_path / "ds", text_column="sentence"))


def test_hub_style_dataset_folder_with_path_column(clips, tmp_path):
    import datasets

    rows = _dataset_rows(clips)
    rows["audio"] = [str(clips / "spk1" / "a.wav"), str(clips / "spk1" / "b.flac"), ""]
    repo = tmp_path / "hub-repo"
    datasets.Dataset.from_dict(rows).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    assert detect_kind(str(repo)) == "hf"
    source = open_source(data_config(repo, text_column="sentence", max_clips=2))
    assert source.kind == "hf" and len(source) == 2
    assert [item.id for item in source] == ["train-00000000", "train-00000001"]
    assert source[1].audio == str(clips / "spk1" / "b.flac")
    with pytest.raises(WhistleError, match="column 'unused' of dataset .* is Value"):
        open_source(data_config(repo, text_column="sentence", audio_column="unused"))


def test_fingerprint_is_stable_and_follows_the_data(clips):
    manifest = clips / "m.csv"
    manifest.write_text("audio,text\nspk1/a.wav,one\nspk1/b.flac,two\n", encoding="utf-8")
    config = data_config(manifest)
    first = open_source(config).fingerprint
    assert first.startswith("manifest:") and open_source(config).fingerprint == first
    assert open_source(dataclasses.replace(config, max_clips=1)).fingerprint != first
    assert open_source(dataclasses.replace(config, language="de")).fingerprint != first
    with open(manifest, "a", encoding="utf-8") as handle:
        handle.write("spk1/b.flac,three\n")
    assert open_source(config).fingerprint != first


def test_kind_detection(tmp_path):
    with pytest.raises(WhistleError, match="data.path is empty"):
        detect_kind("")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WhistleError, match="is a file but not a manifest"):
        detect_kind(str(tmp_path / "notes.txt"))
    assert detect_kind("openslr/librispeech_asr") == "hf"


# ---- no row lost: quoting, BOM, repeated names, cell types, invisible text ----------------------------


def texts_and_reasons(source) -> list[str]:
    return [item.text if isinstance(item, Clip) else item.reason for item in source]


def test_tsv_is_read_unquoted_so_a_quote_joins_no_rows(clips):
    """Common Voice's TSVs are unquoted: a stray `"` is text, and each line stays its own row."""
    tsv = clips / "m.tsv"
    tsv.write_text(
        'audio\ttext\nspk1/a.wav\t"she said hi\nspk1/b.flac\ttwo\nspk1/c.wav\tthree "quoted"\nspk1/d.wav\tfour\n',
        encoding="utf-8",
    )
    source = open_source(data_config(tsv))
    assert len(source) == 4
    assert texts_and_reasons(source) == ['"she said hi', "two", 'three "quoted"', "four"]


def test_an_unbalanced_csv_quote_costs_exactly_its_own_row(clips):
    never_closed = clips / "never.csv"
    never_closed.write_text(
        'audio,text\nspk1/a.wav,"she said hi\nspk1/b.flac,two\nspk1/c.wav,three\nspk1/d.wav,four\n', encoding="utf-8"
    )
    source = open_source(data_config(never_closed))
    assert len(source) == 4
    first, *rest = list(source)
    assert first.reason.startswith("bad row: line 2 of never.csv has a quote that does not close")
    assert [item.text for item in rest] == ["two", "three", "four"]

    closed_later = clips / "later.csv"  # the stray quote would close on line 4 and swallow lines 2-4
    closed_later.write_text(
        'audio,text\nspk1/a.wav,"she said hi\nspk1/b.flac,two\nspk1/c.wav,"three" and more\nspk1/d.wav,four\n',
        encoding="utf-8",
    )
    reasons = texts_and_reasons(open_source(data_config(closed_later)))
    assert reasons[0].startswith("bad row: line 2 of later.csv has a quote that does not close")
    assert reasons[1] == "two"
    assert reasons[2].startswith("bad row: line 4 of later.csv has a quote that does not close")
    assert reasons[3:] == ["four"]


def test_a_quoted_csv_field_may_span_lines_when_it_closes(clips):
    manifest = clips / "multi.csv"
    manifest.write_text('audio,text\nspk1/a.wav,"line one\nline two, ""quoted"""\nspk1/b.flac,next\n', encoding="utf-8")
    source = open_source(data_config(manifest))
    assert len(source) == 2  # two records over three lines
    assert texts_and_reasons(source) == ['line one\nline two, "quoted"', "next"]


def test_every_record_is_a_row_or_a_reject_naming_its_line(clips):
    """Rows + rejects = the file's records (non-blank lines after the header), each reject with its line."""
    manifest = clips / "mixed.csv"
    manifest.write_text(
        'audio,text\n\nspk1/a.wav,one\nspk1/b.flac\nspk1/c.wav,"open\n\nspk1/d.wav,x,y\n'
        "spk1/e.wav,\u200b\nspk1/e.wav,again\n",
        encoding="utf-8",
    )
    source = open_source(data_config(manifest))
    rows = list(source)
    assert len(rows) == 6
    assert isinstance(rows[0], Clip)
    lines = [3, 4, 5, 7, 8, 9]
    for row, line in zip(rows[1:], lines[1:]):
        assert isinstance(row, SourceReject) and f"line {line} of mixed.csv" in row.reason, row
    assert rows[4].reason == "empty text: line 8 of mixed.csv"


def test_a_byte_order_mark_costs_nothing(clips):
    bom = "\ufeff"
    jsonl = clips / "bom.jsonl"
    jsonl.write_text(bom + json.dumps({"audio": "spk1/a.wav", "text": "first"}) + "\n", encoding="utf-8")
    assert texts_and_reasons(open_source(data_config(jsonl))) == ["first"]
    for name, sep in (("bom.csv", ","), ("bom.tsv", "\t")):
        table = clips / name
        table.write_text(f"{bom}audio{sep}text\nspk1/a.wav{sep}first\n", encoding="utf-8")
        assert texts_and_reasons(open_source(data_config(table))) == ["first"]


def test_a_column_or_key_named_twice_is_refused(clips):
    table = clips / "twice.csv"
    table.write_text("audio,text,text\nspk1/a.wav,one,two\n", encoding="utf-8")
    with pytest.raises(WhistleError, match=r"manifest .*twice.csv: line 1 names the column 'text' twice"):
        open_source(data_config(table))
    jsonl = clips / "twice.jsonl"
    jsonl.write_text(
        '{"audio": "spk1/a.wav", "text": "one", "text": "two"}\n{"audio": "spk1/b.flac", "text": "fine"}\n',
        encoding="utf-8",
    )
    assert texts_and_reasons(open_source(data_config(jsonl))) == [
        "bad row: line 1 of twice.jsonl has the key 'text' twice",
        "fine",
    ]


def test_cells_that_are_not_text_are_rejected_naming_the_column(clips):
    jsonl = clips / "types.jsonl"
    rows = [
        {"audio": "spk1/a.wav", "text": ["a", "b"]},
        {"audio": "spk1/b.flac", "text": "ok", "language": True, "id": "u2"},
        {"audio": "spk1/c.wav", "text": "ok", "id": {"x": 1}},
        {"audio": "spk1/d.wav", "text": 42, "id": "u4"},
        {"audio": 7, "text": "ok", "id": "u5"},
        {"audio": "spk1/f.wav", "text": "number id", "id": 6},
    ]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    source = open_source(data_config(jsonl, language_column="language"))
    assert texts_and_reasons(source)[:5] == [
        "bad row: line 1 of types.jsonl: 'text' holds a JSON list, not text",
        "bad row: line 2 of types.jsonl: 'language' holds a JSON boolean, not text",
        "bad row: line 3 of types.jsonl: 'id' holds a JSON object, not text",
        "bad row: line 4 of types.jsonl: 'text' holds a JSON number, not text",
        "bad row: line 5 of types.jsonl: 'audio' holds a JSON number, not text",
    ]
    assert source[5].id == "6" and source[5].text == "number id"  # an integer id is its digits


@pytest.mark.parametrize("text", ["\u200b\u200c", "\x07\x00", "\u00a0\u2028 \u3000", "\ufeff\u2060"])
def test_text_of_only_invisible_characters_is_empty(clips, text):
    jsonl = clips / "invisible.jsonl"
    jsonl.write_text(json.dumps({"audio": "spk1/a.wav", "text": text}) + "\n", encoding="utf-8")
    (item,) = list(open_source(data_config(jsonl)))
    assert item == SourceReject(0, "spk1/a", "empty text: line 1 of invisible.jsonl")


# ---- the formats people have: NeMo, lhotse, whistle synthesize ---------------------------------------


def test_synthesize_manifest_ids_are_used_as_they_are(clips):
    """`whistle synthesize` writes an "id": it is the utterance id without data.id_column."""
    jsonl = clips / "manifest.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps(row) + "\n"
            for row in [
                {
                    "id": "s-00001",
                    "audio": "spk1/a.wav",
                    "text": "one",
                    "language": "en",
                    "duration": 0.5,
                    "voice": "en-us",
                },
                {
                    "id": "s-00002",
                    "audio": "spk1/b.flac",
                    "text": "two",
                    "language": "en",
                    "duration": 0.5,
                    "voice": "en",
                },
            ]
        ),
        encoding="utf-8",
    )
    source = open_source(data_config(jsonl))
    assert [item.id for item in source] == ["s-00001", "s-00002"]
    assert source.column("voice") == ["en-us", "en"] and source.column("nothing") is None
    table = clips / "ids.csv"
    table.write_text("id,audio,text\nk1,spk1/a.wav,one\n", encoding="utf-8")
    assert [item.id for item in open_source(data_config(table))] == ["k1"]


@pytest.mark.parametrize(
    "path",
    ["./typo.jsonl", "../data/train.csv", "/no/such/dir", "~/clips.tsv", "data/manifest.jsonl", "cuts_train.jsonl.gz"],
)
def test_a_mistyped_local_path_is_missing_not_a_hub_name(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WhistleError, match=f"no such file: {path}; check the path"):
        open_source(data_config(path))


def test_nemo_manifest_ids_durations_languages_and_offsets(tmp_path):
    write_clip(tmp_path / "long.wav", 2.0, 16000)
    write_clip(tmp_path / "short.flac", 0.5, 22050)
    manifest = tmp_path / "train_manifest.json"  # NeMo's usual name: JSON lines in a .json file
    manifest.write_text(
        "".join(
            json.dumps(row) + "\n"
            for row in [
                {"audio_filepath": "short.flac", "text": "whole file", "duration": 0.5, "lang": "de"},
                {"audio_filepath": str(tmp_path / "long.wav"), "text": "first second", "duration": 1.0, "offset": 0.0},
                {"audio_filepath": "long.wav", "text": "second second", "duration": 1.0, "offset": 1.0},
                {"audio_filepath": "long.wav", "text": "past the end", "duration": 1.5, "offset": 0.9},
                {"audio_filepath": "long.wav", "text": "bad", "duration": "1.0"},
            ]
        ),
        encoding="utf-8",
    )
    source = open_source(data_config(manifest))
    rows = list(source)
    assert rows[0] == Clip(
        row=0, id="short", text="whole file", language="de", audio=str(tmp_path / "short.flac"), segment=(0.0, 0.5)
    )
    assert rows[1] == Clip(
        row=1, id="long", text="first second", language="en", audio=str(tmp_path / "long.wav"), segment=(0.0, 1.0)
    )
    assert (rows[2].id, rows[2].segment) == ("long@1", (1.0, 1.0))
    assert rows[4].reason == "bad row: line 5 of train_manifest.json: 'duration' is \"1.0\", not a number of seconds"
    full = load_audio(tmp_path / "long.wav", 16000)
    second = load_audio(rows[2].audio, 16000, segment=rows[2].segment)
    np.testing.assert_array_equal(second, full[16000:32000])
    assert load_audio(rows[0].audio, 16000, segment=rows[0].segment).shape == (8000,)
    with pytest.raises(
        AudioError, match="segment beyond the audio: the file is 2.00 s, the segment is 0.90 s to 2.40 s"
    ):
        load_audio(rows[3].audio, 16000, segment=rows[3].segment)


def _lhotse_recording(tmp_path, name, seconds, rate=16000, **extra) -> dict:
    write_clip(tmp_path / f"{name}.wav", seconds, rate)
    return {
        "id": name,
        "sources": [{"type": "file", "channels": [0], "source": str(tmp_path / f"{name}.wav")}],
        "sampling_rate": rate,
        "num_samples": round(seconds * rate),
        "duration": seconds,
        **extra,
    }


def _write_jsonl_gz(path, rows) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def test_lhotse_recordings_and_supervisions(tmp_path):
    recordings = [
        _lhotse_recording(tmp_path, "rec1", 2.0),
        _lhotse_recording(tmp_path, "rec2", 0.5, 8000),
        {**_lhotse_recording(tmp_path, "rec3", 0.5), "transforms": [{"name": "Speed", "kwargs": {}}]},
    ]
    supervisions = [
        {
            "id": "rec1-a",
            "recording_id": "rec1",
            "start": 0.5,
            "duration": 1.0,
            "channel": 0,
            "text": "part",
            "language": "English",
            "speaker": "s1",
        },
        {
            "id": "rec2-a",
            "recording_id": "rec2",
            "start": 0.0,
            "duration": 0.5,
            "channel": 0,
            "text": "whole",
            "language": "de",
            "speaker": "s2",
        },
        {"id": "rec3-a", "recording_id": "rec3", "start": 0.0, "duration": 0.5, "channel": 0, "text": "fast"},
        {"id": "gone", "recording_id": "rec9", "start": 0.0, "duration": 0.5, "channel": 0, "text": "none"},
    ]
    _write_jsonl_gz(tmp_path / "corpus_recordings_dev.jsonl.gz", recordings)
    _write_jsonl_gz(tmp_path / "corpus_supervisions_dev.jsonl.gz", supervisions)
    for given in ("corpus_supervisions_dev.jsonl.gz", "corpus_recordings_dev.jsonl.gz"):
        source = open_source(data_config(tmp_path / given))
        assert source.kind == "lhotse" and len(source) == 4
        first, second, third, fourth = list(source)
        assert first == Clip(
            row=0, id="rec1-a", text="part", language="en", audio=str(tmp_path / "rec1.wav"), segment=(0.5, 1.0)
        )
        assert second == Clip(row=1, id="rec2-a", text="whole", language="de", audio=str(tmp_path / "rec2.wav"))
        assert third.reason == (
            "unsupported audio: line 3 of corpus_supervisions_dev.jsonl.gz: recording 'rec3' has "
            "lhotse transforms whistle does not apply (Speed)"
        )
        assert fourth.reason == (
            "bad row: line 4 of corpus_supervisions_dev.jsonl.gz: no recording 'rec9' in corpus_recordings_dev.jsonl.gz"
        )
        assert source.column("speaker")[:2] == ["s1", "s2"]
    assert load_audio(first.audio, 16000, segment=first.segment).shape == (16000,)
    _write_jsonl_gz(tmp_path / "lonely_supervisions.jsonl.gz", supervisions)
    with pytest.raises(WhistleError, match="should be beside it as lonely_recordings.jsonl.gz"):
        open_source(data_config(tmp_path / "lonely_supervisions.jsonl.gz"))


def test_lhotse_cuts(tmp_path):
    recording = _lhotse_recording(tmp_path, "rec1", 2.0)
    stereo = {
        **_lhotse_recording(tmp_path, "rec2", 1.0),
        "sources": [{"type": "file", "channels": [0, 1], "source": str(tmp_path / "rec2.wav")}],
    }

    def supervision(sup_id, rec_id, text, channel=0):
        return {
            "id": sup_id,
            "recording_id": rec_id,
            "start": 0.0,
            "duration": 1.0,
            "channel": channel,
            "text": text,
            "language": "en",
        }

    cuts = [
        {
            "id": "cut1",
            "start": 1.0,
            "duration": 1.0,
            "channel": 0,
            "recording": recording,
            "supervisions": [supervision("s1", "rec1", "second half")],
            "type": "MonoCut",
        },
        {
            "id": "cut2",
            "start": 0.0,
            "duration": 2.0,
            "channel": 0,
            "recording": recording,
            "supervisions": [supervision("s2", "rec1", "a"), supervision("s3", "rec1", "b")],
            "type": "MonoCut",
        },
        {
            "id": "cut3",
            "start": 0.0,
            "duration": 1.0,
            "channel": 1,
            "recording": stereo,
            "supervisions": [supervision("s4", "rec2", "right", 1)],
            "type": "MonoCut",
        },
    ]
    _write_jsonl_gz(tmp_path / "cuts_train.jsonl.gz", cuts)
    source = open_source(data_config(tmp_path / "cuts_train.jsonl.gz"))
    first, second, third = list(source)
    assert first == Clip(
        row=0, id="cut1", text="second half", language="en", audio=str(tmp_path / "rec1.wav"), segment=(1.0, 1.0)
    )
    assert second.reason.startswith("bad row: line 2 of cuts_train.jsonl.gz: the cut has 2 supervisions")
    assert third.reason.startswith("unsupported audio: line 3 of cuts_train.jsonl.gz: channel 1 of the 2-channel")
