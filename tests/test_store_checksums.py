"""Format 1.1: every array of a shard and of the cache ends in a crc32c, and shard attributes are type-checked.
Any single flipped bit of a stored array object is a read error naming the shard and the array; stores written
before (format 1.0) read as before and are reported as not verifiable. One flip per array kind through
`inspect-store --check` and the readers: tests/test_faults_damage.py."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from conftest import store_spec, synthetic_utterances, write_synthetic_store

from store import StoreReader, inspect_store
from store.dataset import FeatureDataset
from store.format import DamagedShardError
from store.reader import INDEX_ARRAYS
from store.reduction import CACHE_ARRAYS, SUM_ARRAYS
from whistle_pipeline.cli import cli

SMALL_ARRAYS = INDEX_ARRAYS + SUM_ARRAYS  # every array of a shard but states


@pytest.fixture()
def store(tmp_path):
    """9 utterances in 3 complete shards of 3."""
    spec = store_spec(shard_size=3, chunk_frames=64)
    url = tmp_path / "store"
    write_synthetic_store(url, spec, synthetic_utterances(spec, 9, seed=2))
    return url


def chunk_object(array_folder):
    """The one stored chunk object of a single-chunk array (c/0, c/0/0, ...)."""
    [found] = [path for path in (array_folder / "c").rglob("*") if path.is_file()]
    return found


def flip_bit(path, bit):
    raw = bytearray(path.read_bytes())
    raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))


def edit_attrs(shard_folder, change):
    meta = json.loads((shard_folder / "zarr.json").read_text())
    change(meta["attributes"])
    (shard_folder / "zarr.json").write_text(json.dumps(meta))


def as_format_1_0(url):
    """Rewrite a store as whistle wrote it before format 1.1: the small arrays with zarr's default codecs (no
    crc32c), shard attributes without format_minor and write_id."""
    for shard in sorted((url / "shards").glob("0*")):
        for name in SMALL_ARRAYS:
            values = zarr.open_array(str(shard / name), mode="r")[...]
            shutil.rmtree(shard / name)
            array = zarr.create_array(
                str(shard / name),
                shape=values.shape,
                dtype=str if values.dtype.kind in "OTU" else values.dtype,
                chunks=tuple(max(1, size) for size in values.shape),
                config={"write_empty_chunks": True},
            )
            if values.size:
                array[...] = values
        edit_attrs(shard, lambda attrs: [attrs.pop(key) for key in ("format_minor", "write_id")])


@pytest.mark.parametrize("array", ["text", "ids", "stat_count", "duration"])
def test_every_single_bit_flip_of_an_array_object_is_a_checksum_error(store, array):
    target = chunk_object(store / "shards" / "00001" / array)
    intact = target.read_bytes()
    expected = zarr.open_array(str(store / "shards" / "00001" / array), mode="r")[...]
    for bit in range(8 * len(intact)):
        flip_bit(target, bit)
        with pytest.raises(ValueError, match="checksum"):
            zarr.open_array(str(store / "shards" / "00001" / array), mode="r")[...]
        target.write_bytes(intact)
    np.testing.assert_array_equal(zarr.open_array(str(store / "shards" / "00001" / array), mode="r")[...], expected)


@pytest.mark.parametrize("array", ["text", "tail_sum"])
def test_the_reader_refuses_a_flipped_bit_naming_shard_and_array(store, array):
    flip_bit(chunk_object(store / "shards" / "00001" / array), 8 * 5 + 3)
    reader = StoreReader(str(store))
    assert [u.id for u in reader.iter_shard(0)] == ["utt0000", "utt0001", "utt0002"]
    pattern = rf"shard 00001 of store .*store is damaged: {array} is unreadable \(its stored bytes fail their crc32c"
    with pytest.raises(DamagedShardError, match=pattern) as raised:
        list(reader.iter_shard(1))
        reader.statistics()
    assert "Delete" in str(raised.value) and "whistle precompute" in str(raised.value)


def test_the_dataset_refuses_a_flipped_bit_in_text_or_skips_the_shard_when_asked(store):
    target = chunk_object(store / "shards" / "00002" / "text")
    flip_bit(target, 8 * (target.stat().st_size - 6) + 1)  # in the last characters (before format 1.1: silently)
    with pytest.raises(DamagedShardError, match="shard 00002 of store .* text is unreadable"):
        list(FeatureDataset(str(store), shuffle=False))
    kept = [item["id"] for item in FeatureDataset(str(store), shuffle=False, skip_damaged=True)]
    assert kept == [f"utt{i:04d}" for i in range(6)]


def test_a_store_written_before_format_1_1_reads_as_before_and_is_not_verifiable(store):
    reference = StoreReader(str(store))
    expected = [
        (u.id, u.text, u.language, u.duration, u.states.tobytes()) for k in (0, 1, 2) for u in reference.iter_shard(k)
    ]
    statistics = reference.statistics()
    as_format_1_0(store)
    shutil.rmtree(store / "cache")
    reader = StoreReader(str(store))
    assert [
        (u.id, u.text, u.language, u.duration, u.states.tobytes()) for k in (0, 1, 2) for u in reader.iter_shard(k)
    ] == expected
    np.testing.assert_array_equal(reader.statistics()[0], statistics[0])
    report = inspect_store(store, check=True)
    assert report.ok and report.unverifiable == {"whistle 0.1.0": ["00000", "00001", "00002"]}
    result = CliRunner().invoke(cli, ["inspect-store", str(store), "--check"])
    assert result.exit_code == 0, result.output
    assert "not verifiable: 3 shard(s) written by whistle 0.1.0 < format 1.1 (00000, 00001, 00002)" in result.output
    assert "check        ok" in result.output


def test_a_format_1_1_shard_whose_arrays_lost_their_checksum_is_damaged(store):
    as_format_1_0(store)
    edit_attrs(store / "shards" / "00001", lambda attrs: attrs.update(format_minor=1, write_id="x"))
    with pytest.raises(
        DamagedShardError,
        match="shard 00001 .* offsets, speech_frames, ids, text, language, duration lack the crc32c checksum",
    ):
        StoreReader(str(store)).index(1)


@pytest.mark.parametrize(
    "attribute,value,problem",
    [
        ("rejects", "none", "rejects is 'none', not a list of {id, reason}"),
        ("rejects", [{"id": "a"}], "rejects has 1 entries that are not {id, reason} strings, e.g. {'id': 'a'}"),
        ("n", "3", "n is '3', not a count"),
        ("n_frames", -1, "n_frames is -1, not a count"),
        ("audio_seconds", None, "audio_seconds is None, not a number of seconds"),
    ],
)
def test_malformed_shard_attributes_are_named_as_damage(store, caplog, attribute, value, problem):
    edit_attrs(store / "shards" / "00001", lambda attrs: attrs.update({attribute: value}))
    with caplog.at_level(logging.WARNING, logger="store.reader"):
        reader = StoreReader(str(store))
    assert reader.shards() == [0, 2] and reader.incomplete_shards() == [1] and len(reader) == 6
    assert f"shard 00001 of store {store} is not read: its attributes are malformed: {problem}" in caplog.text
    report = inspect_store(store)
    assert report.utterances == 6 and report.incomplete_shards == ["00001"]
    report = inspect_store(store, check=True)
    assert [fault.shard for fault in report.faults] == ["00001"]
    assert f"its attributes are malformed: {problem}: it counts as incomplete" in report.faults[0].problem
    result = CliRunner().invoke(cli, ["inspect-store", str(store), "--check"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "shard 00001: its attributes" in result.output


def reduction(reader):
    mean, std = reader.statistics()
    return {"tail_template": reader.tail_template(), "tail_count": reader.tail_counts(), "mean": mean, "std": std}


def test_a_damaged_cache_entry_is_named_never_used_and_replaced(store, caplog):
    expected = reduction(StoreReader(str(store)))
    [entry] = [path for path in (store / "cache").iterdir() if path.is_dir()]
    intact = store.parent / "intact"
    shutil.copytree(store, intact)
    for name in CACHE_ARRAYS:
        shutil.rmtree(store)
        shutil.copytree(intact, store)
        flip_bit(chunk_object(entry / name), 8 * 7 + 6)
        report = inspect_store(store, check=True)
        assert [fault.shard for fault in report.faults] == ["cache"]
        assert (
            f"entry {entry.name}: {name} is unreadable (its stored bytes fail their crc32c" in report.faults[0].problem
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="store.reduction"):
            recomputed = reduction(StoreReader(str(store)))
        assert f"{store}/cache/{entry.name} are damaged ({name} is unreadable" in caplog.text
        for array, values in expected.items():
            np.testing.assert_array_equal(recomputed[array], values)
        assert not entry.exists() and inspect_store(store, check=True).ok  # replaced by a whole entry


def test_check_finds_a_cache_entry_that_disagrees_with_the_shards(store):
    reader = StoreReader(str(store))
    reader.statistics()
    [entry] = [path for path in (store / "cache").iterdir() if path.is_dir()]
    mean = zarr.open_array(str(entry / "mean"), mode="r+")
    mean[0] = mean[0] + 1  # rewritten through zarr: its checksum is valid, only the value is wrong
    report = inspect_store(store, check=True)
    assert [(fault.shard, fault.problem.split(";")[0]) for fault in report.faults] == [
        ("cache", f"entry {entry.name}: mean differs from the reduction of the shards' sums")
    ]
