"""The bad-input corpus (tests/data/make_bad_inputs.py) through `precompute`: every item processed
correctly or rejected with its reason, no crash, and the counts of precompute.json and inspect-store
equal the corpus's expected table exactly."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from data.make_bad_inputs import RATE, make_corpus

from stages.precompute import run
from store import StoreReader, inspect_store
from whistle_pipeline.audio import load_audio
from whistle_pipeline.cli import cli
from whistle_pipeline.config import load_config
from whistle_pipeline.errors import WhistleError

MARGIN = 2
SHARD_SIZE = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs")
    return folder, make_corpus(folder)


def precompute(teacher, manifest, store, **precompute):
    return run(
        load_config(
            updates={
                "teacher": {"name_or_path": str(teacher), "device": "cpu"},
                "data": {"path": str(manifest), "id_column": "id", "language_column": "language"},
                "store": {"path": str(store), "shard_size": SHARD_SIZE, "speech_margin_frames": MARGIN},
                "precompute": {"batch_size": 4, "num_workers": 1, "progress": False, **precompute},
            }
        )
    )


def expected_counts(items):
    kept = [item for item in items if item["outcome"] == "processed"]
    return len(kept), dict(collections.Counter(item["kind"] for item in items if item["outcome"] == "rejected"))


def stored_rejects(reader: StoreReader) -> list[tuple[str, str]]:
    return [(r["id"], r["reason"]) for k in reader.shards() for r in reader.shard_attrs(k)["rejects"]]


def check_items(reader: StoreReader, items) -> None:
    """Each processed item stored as the table says; each rejected one recorded with its kind and detail."""
    rejects = stored_rejects(reader)
    for item in items:
        if item["outcome"] == "rejected":
            reasons = [reason for utt_id, reason in rejects if utt_id == item["id"]]
            assert len(reasons) == 1, (item, rejects)
            kind, _, detail = reasons[0].partition(":")
            assert kind == item["kind"] and item["detail"] in detail, (item, reasons[0])
            continue
        utt = reader.utterance(*reader.find(item["id"]))
        assert (utt.text, utt.language) == (item["text"], item["language"]), item["id"]
        assert utt.duration == np.float32(item["samples"] / RATE), item["id"]
        frames = min(math.ceil(item["samples"] / 320) + MARGIN, 1500)  # capped at the window
        assert utt.speech_frames == len(utt.states) == frames, item["id"]
        assert np.isfinite(utt.states.astype(np.float32)).all(), item["id"]


def check_decoded_audio(folder, items) -> None:
    """The processed clips decode to the signal the generator wrote (length, peak and DC level)."""
    rows = {}
    for line in (folder / "manifest.jsonl").read_bytes().splitlines():
        try:
            values = json.loads(line)
        except ValueError:
            continue
        rows.setdefault(values.get("id"), values)
    for item in items:
        if item["outcome"] != "processed":
            continue
        audio = load_audio(folder / rows[item["id"]]["audio"], RATE)
        assert audio.shape == (item["samples"],), item["id"]
        assert abs(np.abs(audio).max() - item["peak"]) < 0.02 and abs(audio.mean() - item["mean"]) < 0.01, item["id"]


def test_every_bad_input_is_processed_or_rejected_as_the_table_says(tiny_whisper_dir, corpus, tmp_path):
    folder, expected = corpus
    items = expected["manifests"]["manifest.jsonl"]
    kept, rejects = expected_counts(items)
    store = tmp_path / "store"
    result = precompute(tiny_whisper_dir, folder / "manifest.jsonl", store)
    assert (result.rows, result.clips, result.rejects) == (len(items), kept, rejects)
    assert (result.store_utterances, result.store_rejects) == (kept, len(items) - kept)

    record = StoreReader(str(store)).record("precompute.json")
    assert (record["clips"], record["rejects"], record["store_utterances"]) == (kept, rejects, kept)
    report = inspect_store(store, check=True)
    assert report.ok, report.faults
    assert (report.utterances, report.rejects, report.incomplete_shards) == (kept, rejects, [])
    cli_report = CliRunner().invoke(cli, ["inspect-store", str(store), "--json"])
    assert cli_report.exit_code == 0, cli_report.output
    assert json.loads(cli_report.stdout)["rejects"] == rejects
    check_items(StoreReader(str(store)), items)
    check_decoded_audio(folder, items)

    again = precompute(tiny_whisper_dir, folder / "manifest.jsonl", store)  # a rerun has nothing left to do
    assert (again.shards_written, again.rows, again.store_utterances) == (0, 0, kept)
    with pytest.raises(WhistleError, match=f"precompute.strict: {len(items) - kept} clip"):
        precompute(tiny_whisper_dir, folder / "manifest.jsonl", store, strict=True)


@pytest.mark.parametrize("name", ["rows.csv", "rows.tsv"])
def test_table_rows_with_wrong_field_counts_encodings_or_quotes(tiny_whisper_dir, corpus, tmp_path, name):
    """Every record of the file is stored or rejected (with its line): a stray quote costs one row at most."""
    folder, expected = corpus
    items = expected["manifests"][name]
    kept, rejects = expected_counts(items)
    result = precompute(tiny_whisper_dir, folder / name, tmp_path / "table")
    assert (result.rows, result.clips, result.rejects) == (len(items), kept, rejects)
    assert inspect_store(tmp_path / "table").rejects == rejects
    check_items(StoreReader(str(tmp_path / "table")), items)


def test_a_manifest_without_a_needed_column_is_refused_naming_it(tiny_whisper_dir, corpus, tmp_path):
    folder, expected = corpus
    for name, fragment in expected["refused"].items():
        with pytest.raises(WhistleError, match=f"has no column for {fragment}"):
            precompute(tiny_whisper_dir, folder / name, tmp_path / name)
        assert not (tmp_path / name).exists()  # refused before the store was created
