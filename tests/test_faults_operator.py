"""Operator mistakes: another teacher / frame policy / shard size / dataset into the same store is
refused naming what differs; two identical runs at once share the work and leave the clean store
(a store copied while incomplete: tests/test_faults_crash.py).

The trial machinery is bench/faults.py (which runs more of each); a 2 s-window tiny teacher and 16
clips make a run take seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import load_bench, make_tiny_whisper

from whistle_pipeline.cli import cli

faults = load_bench("faults")


@pytest.fixture()
def world(fault_world):
    return fault_world[0]


@pytest.fixture()
def clean(fault_world):
    return fault_world[1], fault_world[2]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rerun_with(world, store: Path, tmp_path: Path, change: str) -> list[str]:
    arguments = faults.precompute_arguments(world, str(store))
    if change == "teacher":  # another teacher of the same size: a store never mixes encoder weights (the same
        #                      weights in another folder are the same teacher: test_precompute_resume.py)
        other = make_tiny_whisper(tmp_path / "other-teacher", window_seconds=2, seed=1)
        arguments[arguments.index("--teacher") + 1] = str(other)
    elif change == "frames":
        arguments += ["--frames", "full"]
    elif change == "shard size":
        arguments[arguments.index("--shard-size") + 1] = "4"
    elif change == "dataset":
        other = world.manifest.with_name("other.jsonl")
        other.write_text(world.manifest.read_text(), encoding="utf-8")
        arguments[arguments.index("--data") + 1] = str(other)
    return arguments


@pytest.mark.parametrize(
    "change,named",
    [
        ("teacher", "teacher.encoder_fingerprint: "),
        ("frames", "frames: 'speech' (store) vs 'full' (given)"),
        ("shard size", "shard_size: 2 (store) vs 4 (given)"),
        ("dataset", "dataset_fingerprint: 'manifest:"),
    ],
)
def test_a_run_with_other_settings_is_refused_naming_the_difference(world, clean, tmp_path, change, named):
    store = tmp_path / "store"
    shutil.copytree(clean[0], store)
    before = snapshot(store)
    result = CliRunner().invoke(cli, rerun_with(world, store, tmp_path, change))
    assert result.exit_code == 1, result.output
    assert "was written with a different spec" in result.output and named in result.output
    assert "Use a new store path, or --overwrite to replace this store." in result.output
    assert "Traceback" not in result.output
    assert snapshot(store) == before  # refused before anything was written


def test_the_same_manifest_edited_is_another_dataset(world, tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [json.loads(line) for line in world.manifest.read_text().splitlines()[:4]]
    for row in rows:
        row["audio"] = str(world.manifest.parent / row["audio"])
    manifest.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    arguments = faults.precompute_arguments(world, str(tmp_path / "store"))
    arguments[arguments.index("--data") + 1] = str(manifest)
    assert CliRunner().invoke(cli, arguments).exit_code == 0
    rows[2]["text"] = "a corrected transcript"  # same path, same row count: other data all the same
    manifest.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 1 and "dataset_fingerprint" in result.output, result.output


def test_two_identical_runs_at_once_share_the_work(world, clean, tmp_path):
    trial = faults.concurrent_trial(world, tmp_path, 0, clean[1], work=3.0)
    assert trial.ok, trial
