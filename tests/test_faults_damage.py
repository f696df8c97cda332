"""Damaged stores: flipped bits, truncated objects, wrong offsets, missing arrays, a cut-short shard
zarr.json, one flipped bit in every array kind and in the cache — several shards at once. `inspect-store
--check` names each damaged shard (and array) and no other; the readers and train-tle and finetune stop with
an error naming the shard (FeatureDataset never skips one unless asked with skip_damaged=True).
tests/test_inspect_store.py checks each damage kind alone, tests/test_store_checksums.py every bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import (
    load_bench,
    make_tiny_teacher,
    store_spec,
    synthetic_utterances,
    write_synthetic_store,
)

from store import StoreError, StoreReader, inspect_store
from store.format import DamagedShardError
from store.reader import INDEX_ARRAYS
from store.reduction import SUM_ARRAYS, shard_sums
from whistle_pipeline.cli import cli

faults = load_bench("faults")


def flip_bits(shard, seed=0, count=8):
    """Flip `count` random bits of the states' shard object (what a bad disk or cable does)."""
    target = shard / "states" / "c" / "0" / "0"
    raw = np.frombuffer(target.read_bytes(), np.uint8).copy()
    rng = np.random.default_rng(seed)
    positions = rng.choice(raw.size, count, replace=False)
    raw[positions] ^= (1 << rng.integers(0, 8, count)).astype(np.uint8)
    target.write_bytes(raw.tobytes())


def truncate_ids(shard):
    target = shard / "ids" / "c" / "0"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def wrong_offsets(shard):
    offsets = zarr.open_array(str(shard / "offsets"), mode="r+")
    values = offsets[...]
    values[1:-1] += 1  # every boundary one frame late: lengths still positive, but not the speech frames
    offsets[...] = values


def missing_array(shard):
    shutil.rmtree(shard / "speech_frames")


def cut_metadata(shard):
    target = shard / "zarr.json"
    target.write_bytes(target.read_bytes()[:100])


DAMAGES = {
    1: (flip_bits, "corrupt or truncated"),
    2: (truncate_ids, "ids is unreadable"),
    3: (wrong_offsets, "stored frames per utterance differ from speech_frames"),
    4: (missing_array, "speech_frames"),
    5: (cut_metadata, "its zarr.json is damaged"),
}


def test_check_names_every_damaged_shard_and_no_other(tmp_path):
    spec = store_spec(shard_size=3, chunk_frames=64)
    url = tmp_path / "store"
    write_synthetic_store(url, spec, synthetic_utterances(spec, 21, seed=3))  # shards 0-6
    for shard, (damage, _) in DAMAGES.items():
        damage(url / "shards" / f"0000{shard}")
    report = inspect_store(url, check=True)
    named = {}
    for fault in report.faults:
        named.setdefault(fault.shard, []).append(fault.problem)
    assert set(named) == {f"0000{k}" for k in DAMAGES}, named
    for shard, (_, problem) in DAMAGES.items():
        assert any(problem in text for text in named[f"0000{shard}"]), (shard, named[f"0000{shard}"])
    result = CliRunner().invoke(cli, ["inspect-store", str(url), "--check"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert all(f"shard 0000{k}:" in result.output for k in DAMAGES)
    # the sound shards still read, and a reader of the store as a whole still opens
    reader = StoreReader(str(url))
    assert [u.id for u in reader.iter_shard(0)] == ["utt0000", "utt0001", "utt0002"]
    assert 5 in reader.incomplete_shards()  # its zarr.json is unreadable: not counted as complete


ARRAY_KINDS = INDEX_ARRAYS + SUM_ARRAYS + ("states",)  # every array of a shard


def flip_one_bit(array_folder, seed=0):
    """Flip one random bit among the last bytes before the final crc32c of an array's one stored object (c/0,
    c/0/0: a single chunk or a shard object): in a small array, the last values (before format 1.1, a silent
    change of them)."""
    [target] = [path for path in (array_folder / "c").rglob("*") if path.is_file()]
    raw = np.frombuffer(target.read_bytes(), np.uint8).copy()
    rng = np.random.default_rng(seed)
    raw[raw.size - 5 - rng.integers(min(8, raw.size - 4))] ^= np.uint8(1 << int(rng.integers(8)))
    target.write_bytes(raw.tobytes())


def test_one_flipped_bit_in_every_array_kind_and_the_cache_is_named_and_refused(tmp_path):
    spec = store_spec(shard_size=2, chunk_frames=64)
    url = tmp_path / "store"
    write_synthetic_store(url, spec, synthetic_utterances(spec, 2 * (len(ARRAY_KINDS) + 1), seed=4))
    StoreReader(str(url)).statistics()  # the reduction, cached in the store
    damaged = {k + 1: array for k, array in enumerate(ARRAY_KINDS)}  # shard 0 stays sound
    for shard, array in damaged.items():
        flip_one_bit(url / "shards" / f"{shard:05d}" / array, seed=shard)
    [entry] = [path for path in (url / "cache").iterdir() if path.is_dir()]
    flip_one_bit(entry / "mean")
    report = inspect_store(url, check=True)
    named = {fault.shard: fault.problem for fault in report.faults}
    assert set(named) == {f"{k:05d}" for k in damaged} | {"cache"}, named
    for shard, array in damaged.items():
        assert (
            f"{array} is unreadable (its stored bytes fail their crc32c checksum)" in named[f"{shard:05d}"]
            or array == "states"
            and "of states" in named[f"{shard:05d}"]
            and "fails its checksum" in named[f"{shard:05d}"]
        )
    assert f"entry {entry.name}: mean is unreadable" in named["cache"]
    result = CliRunner().invoke(cli, ["inspect-store", str(url), "--check"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert all(f"shard {k:05d}:" in result.output for k in damaged) and f"cache: entry {entry.name}" in result.output
    reader = StoreReader(str(url))
    assert len(list(reader.iter_shard(0))) == 2
    for shard, array in damaged.items():
        with pytest.raises(DamagedShardError, match=rf"shard {shard:05d} of store .* is damaged: .*\b{array}\b"):
            list(reader.iter_shard(shard))
            shard_sums(reader.root, reader.url, spec.teacher, shard)
    with pytest.raises(DamagedShardError, match="shard 00007 .* tail_sum is unreadable"):  # the cache is not used
        reader.statistics()


@pytest.fixture(scope="module")
def tle_world(tmp_path_factory):
    from test_train_tle import write_tle_store

    folder = tmp_path_factory.mktemp("damage-tle")
    teacher = make_tiny_teacher(folder / "teacher")
    return teacher, write_tle_store(folder / "store", teacher)


def train_tle_arguments(store, teacher, out, steps):
    from test_train_tle import TINY_TLE

    arguments = [
        "train-tle",
        "--store",
        str(store),
        "--teacher",
        str(teacher),
        "--output-dir",
        str(out),
        "--steps",
        str(steps),
        "--decoder-ce-start",
        "100",
    ]
    for override in TINY_TLE + ["train_tle.val_every=100", "train_tle.checkpoint_every=100"]:
        arguments += ["--set", override]
    return arguments


@pytest.mark.parametrize("aligned_before", [False, True], ids=["fresh", "resumed"])
def test_train_tle_stops_naming_the_damaged_shard(tle_world, tmp_path, aligned_before):
    teacher, intact = tle_world
    store = tmp_path / "store"
    shutil.copytree(intact, store)
    out = tmp_path / "tle"
    if aligned_before:  # durations cached from the sound store: only the training stream reads the damage
        assert CliRunner().invoke(cli, train_tle_arguments(store, teacher, out, 3)).exit_code == 0
    flip_bits(store / "shards" / "00001")
    # more steps are another run (refused as a resume): start over, keeping the cached durations
    result = CliRunner().invoke(cli, train_tle_arguments(store, teacher, out, 40) + ["--no-resume"])
    assert result.exit_code == 1, result.output
    assert "shard 00001 of store" in result.output and "is damaged" in result.output, result.output
    assert "inspect-store --check" in result.output


@pytest.mark.parametrize("array", ["text", "ids", "duration", "tail_sum", "stat_sqsum"])
def test_train_tle_stops_on_one_flipped_bit_in_a_small_array(tle_world, tmp_path, array):
    teacher, intact = tle_world
    store = tmp_path / "store"
    shutil.copytree(intact, store, ignore=shutil.ignore_patterns("cache"))
    flip_one_bit(store / "shards" / "00001" / array)
    result = CliRunner().invoke(cli, train_tle_arguments(store, teacher, tmp_path / "tle", 40))
    assert result.exit_code == 1, result.output
    assert f"shard 00001 of store {store} is damaged: {array} is unreadable" in result.output, result.output


def test_finetune_stops_on_one_flipped_bit_in_text(tmp_path):
    from stages.finetune import run
    from whistle_pipeline.config import load_config

    faults.finetune_config(tmp_path, tmp_path / "out", 6, 100).save(tmp_path, "finetune.toml")
    for shard in sorted((tmp_path / "finetune-world" / "source-store" / "shards").glob("0*")):
        flip_one_bit(shard / "text")
    with pytest.raises(StoreError, match=r"shard 0000\d of store .*source-store is damaged: text is unreadable"):
        run(load_config(tmp_path / "finetune.toml"))


@pytest.mark.parametrize("workers", [0, 1])
def test_finetune_stops_naming_the_damaged_shard(tmp_path, workers):
    from stages.finetune import run
    from whistle_pipeline.config import load_config

    faults.finetune_config(tmp_path, tmp_path / "out", 6, 100).save(tmp_path, "finetune.toml")
    for shard in sorted((tmp_path / "finetune-world" / "source-store" / "shards").glob("0*")):
        flip_bits(shard)  # whichever shard the shuffled stream or the validation reads first
    with pytest.raises(StoreError, match=r"shard 0000\d of store .*source-store is damaged"):
        run(load_config(tmp_path / "finetune.toml", overrides=[f"finetune.num_workers={workers}"]))


def test_train_tle_skip_damaged_leaves_the_shard_out_and_says_so(tle_world, tmp_path):
    teacher, intact = tle_world
    store = tmp_path / "store"
    shutil.copytree(intact, store)
    flip_bits(store / "shards" / "00001")
    out = tmp_path / "tle"
    result = CliRunner().invoke(cli, train_tle_arguments(store, teacher, out, 4) + ["--skip-damaged"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 damaged shard(s) (8 utterances)" in result.output and ": 00001 (first:" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    assert [(d["shard"], d["utterances"]) for d in summary["damaged_shards"]] == [(1, 8)]
    # the 24 utterances of the 3 sound shards, and none of the damaged one's, are trained on or held out
    assert summary["train_utterances"] + summary["held_out_utterances"] + len(summary["alignment_rejects"]) == 24
    assert sorted(p.name for p in (out / "durations").glob("0*.json")) == ["00000.json", "00002.json", "00003.json"]


def test_finetune_skip_damaged_leaves_the_shard_out_and_says_so(tmp_path):
    from stages.finetune import run
    from whistle_pipeline.config import load_config

    faults.finetune_config(tmp_path, tmp_path / "out", 6, 100).save(tmp_path, "finetune.toml")
    source = tmp_path / "finetune-world" / "source-store"
    reader = StoreReader(str(source))
    flip_bits(source / "shards" / "00000")
    result = run(load_config(tmp_path / "finetune.toml", overrides=["finetune.skip_damaged=true"]))
    lost = reader.shard_attrs(0)["n"]
    assert result.steps == 6
    assert [(d["shard"], d["utterances"]) for d in result.damaged_shards] == [(0, lost)]
    assert result.train_examples["audio"] == len(reader) - lost
    assert f"skipped 1 damaged shard(s) ({lost} utterances) of {reader.url}: 00000" in result.summary()
    saved = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert saved["damaged_shards"] == result.damaged_shards


@pytest.mark.parametrize("kind,cache", [("text", False), ("tail_sum", False), ("mean", True)])
def test_bench_bit_flip_trials(fault_world, tmp_path, kind, cache):
    world, clean, reference = fault_world
    trial = faults.bit_flip_trial(world, tmp_path, clean, kind, cache, 0, reference)
    assert trial.ok, trial
