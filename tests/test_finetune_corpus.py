"""Text-only corpora for finetune: every file kind, per-row languages, rejects, the held-out split."""

from __future__ import annotations

import json

import pytest

from whistle_pipeline.corpus import TextReject, TextRow, is_held_out, read_corpus
from whistle_pipeline.errors import WhistleError


def test_txt_one_sentence_per_line_skips_blank_lines(tmp_path):
    path = tmp_path / "target.txt"
    path.write_text("Take two tablets daily.\n\n  the  patient\tis stable \n", encoding="utf-8")
    corpus = read_corpus(str(path), text_column="text", language="en")
    assert corpus.kind == "txt"
    assert corpus.rows == [
        TextRow("target.txt:1", "Take two tablets daily.", "en"),
        TextRow("target.txt:3", "the patient is stable", "en"),
    ]
    assert corpus.rejects == []


def test_jsonl_reads_the_column_and_per_row_language_and_records_bad_rows(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"sentence": "guten Morgen", "lang": "de"}),
        json.dumps({"sentence": "good morning", "lang": ""}),  # empty cell: the corpus language
        "{not json",
        json.dumps({"other": "x"}),
        json.dumps({"sentence": "   "}),
        json.dumps(["a list"]),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = read_corpus(str(path), text_column="sentence", language="en", language_column="lang")
    assert corpus.rows == [
        TextRow("corpus.jsonl:1", "guten Morgen", "de"),
        TextRow("corpus.jsonl:2", "good morning", "en"),
    ]
    reasons = {r.id: r.reason for r in corpus.rejects}
    assert set(reasons) == {"corpus.jsonl:3", "corpus.jsonl:4", "corpus.jsonl:5", "corpus.jsonl:6"}
    assert "not valid JSON" in reasons["corpus.jsonl:3"]
    assert "no 'sentence' field" in reasons["corpus.jsonl:4"]
    assert reasons["corpus.jsonl:5"] == "empty text"
    assert "not a JSON object" in reasons["corpus.jsonl:6"]
    assert "2 sentences" in corpus.summary() and "4 rejected" in corpus.summary()


def test_csv_and_tsv_with_a_missing_column_name_the_columns(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('text,language\n"hello, world",en\nhallo,de\n', encoding="utf-8")
    corpus = read_corpus(str(csv_path), text_column="text", language="", language_column="language")
    assert [(r.id, r.text, r.language) for r in corpus.rows] == [
        ("c.csv:2", "hello, world", "en"),
        ("c.csv:3", "hallo", "de"),
    ]

    tsv_path = tmp_path / "validated.tsv"
    tsv_path.write_text("path\tsentence\nx.mp3\tone two\n", encoding="utf-8")
    assert read_corpus(str(tsv_path), text_column="sentence", language="en").rows[0].text == "one two"
    with pytest.raises(WhistleError, match=r"has no column 'text' \(its columns: path, sentence\)"):
        read_corpus(str(tsv_path), text_column="text", language="en")


def test_corpora_are_read_as_manifests_are(tmp_path):
    """BOM dropped, TSV unquoted, a stray CSV quote costs its own line, invisible text is empty."""
    txt = tmp_path / "bom.txt"
    txt.write_text("\ufeffhello\n\u200b\u200c\n", encoding="utf-8")
    corpus = read_corpus(str(txt), text_column="text", language="en")
    assert corpus.rows == [TextRow("bom.txt:1", "hello", "en")]
    assert corpus.rejects == [TextReject("bom.txt:2", "empty text")]
    tsv = tmp_path / "q.tsv"
    tsv.write_text('\ufeffsentence\n"stray quote\nnext\n', encoding="utf-8")
    assert [r.text for r in read_corpus(str(tsv), text_column="sentence", language="en").rows] == [
        '"stray quote',
        "next",
    ]
    table = tmp_path / "q.csv"
    table.write_text('text\n"never closed\nnext\n', encoding="utf-8")
    corpus = read_corpus(str(table), text_column="text", language="en")
    assert corpus.rows == [TextRow("q.csv:3", "next", "en")]
    assert corpus.rejects[0].id == "q.csv:2" and "quote that does not close" in corpus.rejects[0].reason


def test_datasets_folder_reads_only_the_text_columns(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["alpha beta", ""], "lang": ["fr", "de"], "n": [1, 2]}).save_to_disk(
        str(folder)
    )
    corpus = read_corpus(str(folder), text_column="text", language="en", language_column="lang")
    assert corpus.kind == "datasets"
    assert corpus.rows == [TextRow("ds[0]", "alpha beta", "fr")]
    assert corpus.rejects == [TextReject("ds[1]", "empty text")]


def test_unusable_corpora_raise_with_the_path(tmp_path):
    with pytest.raises(WhistleError, match="does not exist"):
        read_corpus(str(tmp_path / "missing.txt"), text_column="text", language="en")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(WhistleError, match="empty.txt holds no usable sentence"):
        read_corpus(str(empty), text_column="text", language="en")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(WhistleError, match="latin1.txt is not UTF-8"):
        read_corpus(str(latin), text_column="text", language="en")


def test_held_out_split_is_stable_and_near_the_fraction(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(2000)), encoding="utf-8")
    corpus = read_corpus(str(path), text_column="text", language="en")
    train, held_out = corpus.split(0.1, seed=3)
    assert len(train) + len(held_out) == 2000
    assert 150 < len(held_out) < 250
    assert held_out == corpus.split(0.1, seed=3)[1]
    assert held_out != corpus.split(0.1, seed=4)[1]
    assert all(is_held_out(row.id, 0.1, 3) for row in held_out)
    assert corpus.split(0.0, seed=3)[1] == []
