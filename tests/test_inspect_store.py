"""inspect_store and `whistle inspect-store`: the numbers, --json, --check on damaged stores, --plot."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import store_spec, synthetic_utterances, write_synthetic_store

from store import StoreWriter, inspect_store
from whistle_pipeline.cli import cli

REQUIRED_KEYS = {
    "utterances",
    "audio_seconds",
    "frames",
    "bytes_on_disk",
    "raw_fp16_bytes",
    "full_window_fp16_bytes",
    "complete_shards",
    "incomplete_shards",
    "rejects",
    "teacher",
    "format",
}


@pytest.fixture()
def small_store(tmp_path):
    """11 utterances in 3 complete shards (4, 4, 3), 3 rejects, and one incomplete shard."""
    spec = store_spec(shard_size=4, chunk_frames=128)
    utts = synthetic_utterances(spec, 11, seed=5)
    writer = write_synthetic_store(tmp_path / "store", spec, utts)
    with writer.shard(3) as shard:
        shard.reject("cv_17", "undecodable audio: clips/17.mp3: Format not recognised")
        shard.reject("cv_18", "undecodable audio: clips/18.mp3: truncated")
        shard.reject("cv_19", "empty text: row 19")
    writer.shard(4)  # a run that stopped before closing it
    return tmp_path / "store", spec, utts


def files_size(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_inspect_store_numbers_equal_hand_computed_values(small_store):
    path, spec, utts = small_store
    report = inspect_store(path)
    d_model, max_frames = spec.teacher.d_model, spec.teacher.max_frames
    frames = sum(u["speech_frames"] for u in utts)
    assert report.utterances == 11 and report.frames == frames
    assert report.audio_seconds == pytest.approx(sum(float(np.float32(u["duration"])) for u in utts), rel=1e-9)
    assert report.raw_fp16_bytes == frames * d_model * 2
    assert report.full_window_fp16_bytes == 11 * max_frames * d_model * 2
    assert report.bytes_on_disk == files_size(path)
    assert report.states_bytes == sum(files_size(path / "shards" / f"0000{k}" / "states") for k in range(4))
    assert report.compression_ratio == pytest.approx(report.raw_fp16_bytes / report.states_bytes)
    assert report.trimming_ratio == pytest.approx(max_frames * 11 / frames)
    assert (report.complete_shards, report.incomplete_shards) == (4, ["00004"])
    assert report.rejects == {"undecodable audio": 2, "empty text": 1}
    assert report.teacher == spec.teacher.to_dict() and report.format == 1 and report.frame_policy == "speech"
    assert not report.checked and report.ok
    text = report.to_text()
    assert "4 complete, 1 incomplete (00004)" in text and "utterances   11 " in text
    assert "rejects      3: undecodable audio 2, empty text 1" in text
    assert f"frames       {frames:,}" in text


def test_cli_summary_json_and_check(small_store):
    path, _, _ = small_store
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect-store", str(path)])
    assert result.exit_code == 0, result.output
    assert f"whistle store {path}" in result.output and "utterances   11 " in result.output
    result = runner.invoke(cli, ["inspect-store", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert REQUIRED_KEYS <= set(data)
    assert data["utterances"] == 11 and data["complete_shards"] == 4 and data["incomplete_shards"] == 1
    assert data["rejects"] == {"undecodable audio": 2, "empty text": 1} and data["format"] == 1
    assert data["teacher"]["d_model"] == 32
    result = runner.invoke(cli, ["inspect-store", str(path), "--check"])
    assert result.exit_code == 0, result.output
    assert "check        ok: 4 complete shards read in full, no faults" in result.output


def damage_corrupt_bytes(path):
    target = path / "shards/00001/states/c/0/0"
    raw = bytearray(target.read_bytes())
    raw[200:260] = bytes(60)
    target.write_bytes(bytes(raw))


def damage_truncate(path):
    target = path / "shards/00001/states/c/0/0"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])


def damage_offsets(path):
    offsets = zarr.open_array(str(path / "shards/00001/offsets"), mode="r+")
    values = offsets[...]
    values[2] = values[3] + 5  # no longer increasing
    offsets[...] = values


def damage_nonfinite(path):
    # Rewritten whole through zarr, so every checksum is valid: only the values are wrong.
    states = zarr.open_array(str(path / "shards/00001/states"), mode="r+")
    values = states[...]
    values[7, 3] = np.inf
    states[...] = values


def damage_missing_object(path):
    (path / "shards/00001/tail_count/c/0").unlink()


@pytest.mark.parametrize(
    "damage,problem",
    [
        (damage_corrupt_bytes, "corrupt or truncated"),
        (damage_truncate, "corrupt or truncated"),
        (damage_offsets, "offsets are not strictly increasing"),
        (damage_nonfinite, "1 non-finite values in states"),
        (damage_missing_object, "objects missing from the store: tail_count"),
    ],
)
def test_check_names_the_damaged_shard_and_exits_1(small_store, damage, problem):
    path, _, _ = small_store
    damage(path)
    report = inspect_store(path, check=True)
    assert not report.ok and {fault.shard for fault in report.faults} == {"00001"}
    assert any(problem in fault.problem for fault in report.faults), report.faults
    result = CliRunner().invoke(cli, ["inspect-store", str(path), "--check"])
    assert result.exit_code == 1
    assert "shard 00001:" in result.output and "failed the check" in result.output
    assert "Traceback" not in result.output
    data = json.loads(CliRunner().invoke(cli, ["inspect-store", str(path), "--check", "--json"]).stdout)
    assert data["ok"] is False and data["faults"][0]["shard"] == "00001"


def test_cli_errors_are_one_paragraph(tmp_path):
    result = CliRunner().invoke(cli, ["inspect-store", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "no whistle store at" in result.output and "Traceback" not in result.output


def test_plot_writes_a_png(small_store, tmp_path):
    path, _, utts = small_store
    out = tmp_path / "plots" / "utt.png"
    result = CliRunner().invoke(cli, ["inspect-store", str(path), "--plot", utts[5]["id"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    result = CliRunner().invoke(cli, ["inspect-store", str(path), "--plot", "no-such-id", "--out", str(out)])
    assert result.exit_code == 1 and "no utterance 'no-such-id'" in result.output
    result = CliRunner().invoke(cli, ["inspect-store", str(path), "--plot", utts[5]["id"]])
    assert result.exit_code == 2 and "--plot needs --out" in result.output


def test_plot_without_matplotlib_says_how_to_install_it(small_store, tmp_path, monkeypatch):
    path, _, utts = small_store
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like to import
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    result = CliRunner().invoke(
        cli, ["inspect-store", str(path), "--plot", utts[0]["id"], "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1 and "pip install 'whistle[plot]'" in result.output


def test_full_frames_store_inspects_and_checks(tmp_path):
    spec = store_spec("full", shard_size=3)
    write_synthetic_store(tmp_path / "full", spec, synthetic_utterances(spec, 5))
    report = inspect_store(tmp_path / "full", check=True)
    assert report.ok and report.frames == 5 * 1500 and report.trimming_ratio == 1.0
    StoreWriter.open(tmp_path / "full", spec)  # reopening stays compatible
