"""Crash anywhere: SIGKILL a real `whistle precompute` / `train-tle` / `finetune` process and rerun it.

A bounded subset of bench/faults.py's trials (`python bench/faults.py` runs >= 10 precompute kills and
more training kills, and compares training with an uninterrupted run). precompute: the rerun completes
and the store equals a clean run's bit for bit. Training: the rerun resumes from the last complete
checkpoint, logs every step once, and the steps it runs again reproduce the killed run's losses.
A copy of a killed (incomplete) store shows only its complete shards and resumes to the clean store.
tests/test_precompute_resume.py kills precompute at one fixed point; these kill at seeded random ones.
"""
from __future__ import annotations

import pytest
from conftest import load_bench

from store import StoreReader, inspect_store

faults = load_bench("faults")
WORK_SECONDS = 2.0  # a lower bound of the 16-clip run's encoding and writing: the kill lands inside it


@pytest.mark.parametrize("seed", [0, 1])
def test_precompute_killed_at_a_random_point_resumes_to_the_clean_store(fault_world, tmp_path, seed):
    world, _, reference = fault_world
    copy = tmp_path / "copy"
    trial = faults.precompute_kill_trial(world, tmp_path, seed, reference, startup=5.0, work=WORK_SECONDS, copy=copy)
    assert trial.where != "(the run had finished)", trial
    assert trial.ok, trial
    # the killed store copied elsewhere (cp -r, gsutil cp) shows only its complete shards, whole,
    # and resumes there to the clean store as well
    if (copy / "zarr.json").exists():
        report = inspect_store(copy, check=True)
        assert report.ok and report.complete_shards == len(StoreReader(str(copy)).shards()), report.faults
        assert faults.precompute(world, str(copy)).exit_code == 0
        assert faults.store_differences(str(copy), reference) == []


@pytest.mark.parametrize("stage", ["train-tle", "finetune"])
def test_training_killed_mid_run_resumes_from_its_checkpoint(stage, tmp_path):
    trial = faults.training_kill_trial(stage, tmp_path, 0, steps=6, checkpoint_every=2, after=4)
    assert trial.where != "(the run had finished)", trial
    assert trial.ok, trial
    assert "resumed from step 2" in trial.outcome or "resumed from step 4" in trial.outcome, trial
