"""Crash anywhere: SIGKILL a real `whistle precompute` / `train-tle` / `finetune` process and rerun it.

A bounded subset of bench/faults.py's trials (`python bench/faults.py` runs >= 10 precompute kills and
more training kills, and compares training with an uninterrupted run). precompute: the rerun completes
and the store equals a clean run's bit for bit. Training: the rerun resumes from the last complete
checkpoint, logs every step once, and the steps it runs again reproduce the killed run's losses.
A copy of a killed (incomplete) store shows only its complete shards and resumes to the clean store.
tests/test_precompute_resume.py kills precompute at one fixed point; these kill at seeded random ones.
"""

from __future__ import annotations

import re

import pytest
from conftest import load_bench, store_spec, synthetic_utterances, write_synthetic_store

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
    # killed once 4 steps are logged (and up to 0.2 s later): room for a fast machine to run a few more steps,
    # but the run must be struck mid-way and resume from a checkpoint before its end
    trial = faults.training_kill_trial(stage, tmp_path, 0, steps=16, checkpoint_every=2, after=4)
    assert trial.where != "(the run had finished)", trial
    assert trial.ok, trial
    resumed = int(re.search(r"resumed from step (\d+)", trial.outcome).group(1))
    assert resumed in range(2, 16, 2), trial  # 2 when struck before checkpoint 4 was complete


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stored_stream_resumes_exactly_when_a_batch_crosses_an_epoch_end(tmp_path, workers):
    """finetune's saved data position (epoch, items taken) must count only the new epoch's items when a
    batch straddles two epochs; counting the whole batch skipped data on resume."""
    from stages.finetune_data import HeldOut, StoreStream

    spec = store_spec(shard_size=3, chunk_frames=64)
    url = str(tmp_path / "store")
    write_synthetic_store(url, spec, synthetic_utterances(spec, 7, seed=2))  # an epoch is 7 utterances
    keep_all = HeldOut(0.0, 0, False)
    stream = StoreStream(url, keep_all, 5, 4, workers)
    stream.take(5)
    stream.take(5)  # 2 of epoch 0, then 3 of epoch 1
    assert stream.position == (1, 3)
    resumed = StoreStream(url, keep_all, 5, 4, workers, position=stream.position)
    assert [u["id"] for u in resumed.take(6)] == [u["id"] for u in stream.take(6)]
    assert resumed.position == stream.position == (2, 2)
