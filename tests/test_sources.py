"""whistle_pipeline.sources: manifests, Common Voice folders and datasets as rows, with rejects and fingerprints."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import write_clip

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
        encoding="utf-8")
    source = open_source(data_config(manifest, audio_column="path", language_column="language"))
    assert source.kind == "manifest" and len(source) == 6
    rows = list(source)
    assert rows[0] == Clip(row=0, id="spk1/a", text="Hello there", language="en", audio=str(clips / "spk1" / "a.wav"))
    assert rows[1] == Clip(row=1, id="spk1/b", text="Guten Tag", language="de", audio=str(clips / "spk1" / "b.flac"))
    assert rows[2] == SourceReject(2, "spk1/a", "duplicate id: first used by row 0")
    assert rows[3] == SourceReject(3, "spk1/c", "empty text")
    assert rows[4] == SourceReject(4, "row-00000004", "no audio: the audio column is empty")
    assert rows[5] == SourceReject(5, "row-00000005", "bad row: line 7 of manifest.csv has 1 field(s), the header has 4")
    with_ids = open_source(data_config(manifest, audio_column="path", id_column="speaker_id"))
    assert [with_ids.row_id(r) for r in range(6)] == ["s1", "s2", "s3", "s4", "s5", "row-00000005"]
    assert isinstance(with_ids[2], Clip)  # unique ids now


def test_tsv_and_jsonl_manifests(clips):
    tsv = clips / "manifest.tsv"
    tsv.write_text('audio\ttext\nspk1/a.wav\tshe said "hi"\n', encoding="utf-8")
    (item,) = list(open_source(data_config(tsv)))
    assert item.text == 'she said "hi"'
    jsonl = clips / "manifest.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"audio": "spk1/a.wav", "text": "first", "language": "fr", "id": "u1"}),
        "{not json",
        json.dumps({"audio": str(clips / "spk1" / "b.flac"), "text": "absolute path"}),
        json.dumps(["a", "list"]),
        json.dumps({"audio": "spk1/c.flac"}),
        "",
    ]), encoding="utf-8")
    source = open_source(data_config(jsonl, id_column="id", language_column="language"))
    rows = list(source)
    assert rows[0] == Clip(row=0, id="u1", text="first", language="fr", audio=str(clips / "spk1" / "a.wav"))
    assert rows[1].reason.startswith("bad row: line 2 of manifest.jsonl is not valid JSON")
    assert rows[2] == Clip(row=2, id="spk1/b", text="absolute path", language="en", audio=str(clips / "spk1" / "b.flac"))
    assert rows[3].reason == "bad row: line 4 of manifest.jsonl is not a JSON object"
    assert rows[4] == SourceReject(4, "spk1/c", "bad row: no 'text' in this row")
    assert len(source) == 5  # the blank line is no row


def test_manifest_problems_name_the_fix(clips):
    manifest = clips / "m.csv"
    manifest.write_text("file,sentence\nspk1/a.wav,hi\n", encoding="utf-8")
    with pytest.raises(WhistleError, match=r"no column for data.audio_column = 'audio', data.text_column = 'text'; "
                                           r"its columns are file, sentence"):
        open_source(data_config(manifest))
    with pytest.raises(WhistleError, match="does not exist"):
        open_source(data_config(clips / "nope.csv", kind="manifest"))


def _common_voice(root: Path) -> Path:
    folder = root / "cv-corpus-21.0" / "zh-CN"
    (folder / "clips").mkdir(parents=True)
    header = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents" \
             "\tvariant\tlocale\tsegment\n"
    lines = [
        "c1\tcommon_voice_zh-CN_1.mp3\ts1\t他说\"你好\"。\t\t2\t0\t\t\t\t\tzh-CN\t\n",
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
    assert first == Clip(row=0, id="common_voice_zh-CN_1", text='他说"你好"。', language="zh",
                         audio=str(folder.resolve() / "clips" / "common_voice_zh-CN_1.mp3"))
    assert second == SourceReject(1, "common_voice_zh-CN_2", "empty text")
    assert len(open_source(data_config(folder, subset="validated"))) == 1
    with pytest.raises(WhistleError, match=r"has no dev.tsv .* it has: train, validated"):
        open_source(data_config(folder, subset="dev"))


def _dataset_rows(clips: Path) -> dict[str, list]:
    return {
        "audio": [{"bytes": (clips / "spk1" / "a.wav").read_bytes(), "path": "a.wav"},
                  {"bytes": None, "path": str(clips / "spk1" / "b.flac")},
                  {"bytes": b"", "path": None}],
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
    source = open_source(data_config(tmp_path / "ds", split="test", text_column="sentence", language_column="lang",
                                     id_column="utt"))
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
