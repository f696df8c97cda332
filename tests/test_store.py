"""The feature store: write -> read round trips, partial reads, resume, spec and bad-store errors."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr
from conftest import add_utterance, store_spec, synthetic_utterances, write_synthetic_store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

import store.reader
from store import StoreError, StoreReader, StoreWriter, TeacherInfo


def expected_states(spec, utt):
    return utt["window"][: utt["speech_frames"]] if spec.frames == "speech" else utt["window"]


@pytest.mark.parametrize("frames", ["speech", "full"])
@pytest.mark.parametrize(
    "shard_size,chunk_frames,codec", [(4, 64, "blosc-lz4"), (7, 1000, "blosc-zstd"), (16, 4096, "none")]
)
def test_round_trip_is_bit_exact(tmp_path, monkeypatch, frames, shard_size, chunk_frames, codec):
    spec = store_spec(frames, shard_size=shard_size, chunk_frames=chunk_frames, codec=codec)
    utts = synthetic_utterances(spec, 16, seed=shard_size)
    write_synthetic_store(tmp_path / "store", spec, utts)
    # Small read blocks make iter_shard cross many block boundaries inside utterances.
    monkeypatch.setattr(store.reader, "READ_BLOCK_BYTES", 3000 * 2 * spec.teacher.d_model)
    reader = StoreReader(tmp_path / "store", expect_teacher=spec.teacher)
    assert reader.shards() == list(range(-(-16 // shard_size))) and reader.incomplete_shards() == []
    assert len(reader) == 16
    seen = []
    for shard in reader.shards():
        for utt in reader.iter_shard(shard):
            truth = utts[shard * shard_size + utt.index]
            assert utt.id == truth["id"] and utt.text == truth["text"] and utt.language == truth["language"]
            assert utt.duration == np.float32(truth["duration"])
            assert utt.speech_frames == truth["speech_frames"]
            assert utt.states.dtype == np.float16
            np.testing.assert_array_equal(utt.states, expected_states(spec, truth))
            seen.append(utt.id)
    assert seen == [u["id"] for u in utts]
    for i in (0, 5, 15):
        shard, index = reader.find(utts[i]["id"])
        assert (shard, index) == (i // shard_size, i % shard_size)
        np.testing.assert_array_equal(reader.utterance(shard, index).states, expected_states(spec, utts[i]))


def test_non_latin_text_round_trips(tmp_path):
    spec = store_spec()
    utts = synthetic_utterances(spec, 6)
    write_synthetic_store(tmp_path / "s", spec, utts)
    reader = StoreReader(tmp_path / "s")
    assert [u.text for u in reader.iter_shard(0)] == [u["text"] for u in utts]
    assert reader.utterance(0, 2).text == "東京は今日も晴れです" and reader.utterance(0, 4).text == "مرحبا بالعالم"


class ByteCountingStore(WrapperStore):
    """A real LocalStore that counts the bytes its reads return."""

    bytes_read = 0

    async def get(self, key: str, prototype: BufferPrototype, byte_range=None) -> Buffer | None:
        buffer = await self._store.get(key, prototype, byte_range)
        if buffer is not None:
            ByteCountingStore.bytes_read += len(buffer)
        return buffer


def test_frame_range_reads_only_the_chunks_it_touches(tmp_path):
    spec = store_spec(shard_size=40, chunk_frames=128, codec="none")
    utts = synthetic_utterances(spec, 40)
    write_synthetic_store(tmp_path / "big", spec, utts)
    states_object = tmp_path / "big" / "shards" / "00000" / "states" / "c" / "0" / "0"
    shard_bytes = states_object.stat().st_size
    reader = StoreReader(ByteCountingStore(LocalStore(tmp_path / "big", read_only=True)))
    reader.index(0)  # the small arrays, read once per shard
    ByteCountingStore.bytes_read = 0
    got = reader.frames(0, 20, 30, 70)  # (40, D)
    np.testing.assert_array_equal(got, utts[20]["window"][30:70])
    one_chunk = 128 * spec.teacher.d_model * 2
    assert 0 < ByteCountingStore.bytes_read <= 2 * one_chunk + 16 * 1024  # <= 2 chunks + the shard index
    assert ByteCountingStore.bytes_read < shard_bytes / 40
    with pytest.raises(IndexError, match="outside utterance"):
        reader.frames(0, 20, 0, utts[20]["speech_frames"] + 1)


def test_incomplete_shard_is_invisible_and_replaced_on_rerun(tmp_path):
    spec = store_spec(shard_size=3)
    utts = synthetic_utterances(spec, 6)
    writer = write_synthetic_store(tmp_path / "s", spec, utts, shards=[0])
    crashed = writer.shard(1)  # a run that died before close(): arrays never written, no `complete`
    add_utterance(crashed, spec, utts[3])
    reader = StoreReader(tmp_path / "s")
    assert reader.shards() == [0] and reader.incomplete_shards() == [1] and len(reader) == 3
    assert [u.id for u in reader.iter_shard(0)] == ["utt0000", "utt0001", "utt0002"]
    with pytest.raises(StoreError, match="not a complete shard"):
        reader.utterance(1, 0)

    writer.release(1)  # what the OS does with the crashed process's shard lock
    rerun = StoreWriter.open(tmp_path / "s", spec)
    assert rerun.complete_shards() == {0}
    with pytest.raises(StoreError, match="already complete"):
        rerun.shard(0)
    with rerun.shard(1) as shard:
        for utt in utts[3:]:
            add_utterance(shard, spec, utt)
    reader = StoreReader(tmp_path / "s")
    assert reader.shards() == [0, 1] and reader.incomplete_shards() == []
    assert [u.id for u in reader.iter_shard(1)] == ["utt0003", "utt0004", "utt0005"]


def test_a_failing_shard_block_leaves_nothing_behind(tmp_path):
    spec = store_spec(shard_size=3)
    writer = StoreWriter.open(tmp_path / "s", spec)
    with pytest.raises(RuntimeError, match="decode failed"):
        with writer.shard(0) as shard:
            add_utterance(shard, spec, synthetic_utterances(spec, 1)[0])
            raise RuntimeError("decode failed")
    assert not (tmp_path / "s" / "shards" / "00000").exists()
    assert writer.complete_shards() == set()


def test_shards_close_on_a_thread_pool(tmp_path):
    spec = store_spec(shard_size=4)
    utts = synthetic_utterances(spec, 16)
    writer = StoreWriter.open(tmp_path / "s", spec)
    shards = []
    for k in range(4):
        shard = writer.shard(k)
        for utt in utts[4 * k : 4 * k + 4]:
            add_utterance(shard, spec, utt)
        shards.append(shard)
    with ThreadPoolExecutor(2) as pool:
        records = list(pool.map(lambda s: s.close(), shards))
    assert [(r.index, r.n, r.n_rejects) for r in records] == [(k, 4, 0) for k in range(4)]
    assert records[2].n_frames == sum(u["speech_frames"] for u in utts[8:12])
    assert records[2].nbytes == sum(p.stat().st_size for p in (tmp_path / "s/shards/00002").rglob("*") if p.is_file())
    assert shards[0].close() is records[0]  # idempotent
    reader = StoreReader(tmp_path / "s")
    for utt in reader.iter_shard(3):
        np.testing.assert_array_equal(utt.states, expected_states(spec, utts[12 + utt.index]))


def test_memory_url_store(tmp_path):
    spec = store_spec("full", shard_size=5)
    utts = synthetic_utterances(spec, 8)
    url = "memory://whistle-tests/store-roundtrip"
    write_synthetic_store(url, spec, utts)
    reader = StoreReader(url)
    assert reader.shards() == [0, 1]
    for utt in reader.iter_shard(1):
        np.testing.assert_array_equal(utt.states, utts[5 + utt.index]["window"])
    assert reader.frames(0, 1, 100, 110).shape == (10, spec.teacher.d_model)
    assert reader.tail_template().shape == (1500, spec.teacher.d_model)


def test_rejects_and_invalid_input(tmp_path):
    spec = store_spec(shard_size=4)
    utt = synthetic_utterances(spec, 1)[0]
    writer = StoreWriter.open(tmp_path / "s", spec)
    shard = writer.shard(0)
    assert add_utterance(shard, spec, utt)
    bad = dict(utt, id="nan-one", window=utt["window"].copy())
    bad["window"][3, 5] = np.nan
    assert not add_utterance(shard, spec, bad)
    shard.reject("row-7", "undecodable audio: clips/7.mp3: Error opening")
    with pytest.raises(ValueError, match="added twice"):
        add_utterance(shard, spec, utt)
    with pytest.raises(ValueError, match="'x'.*float16"):
        shard.add("x", "t", "en", 2.0, utt["window"][:100].astype(np.float32), tail=utt["window"][100:])
    with pytest.raises(ValueError, match="'y'.*tail"):
        shard.add("y", "t", "en", 2.0, utt["window"][:100])
    with pytest.raises(ValueError, match="duration"):
        shard.add("z", "t", "en", 0.0, utt["window"][:100], tail=utt["window"][100:])
    record = shard.close()
    assert (record.n, record.n_rejects) == (1, 2)
    rejects = StoreReader(tmp_path / "s").shard_attrs(0)["rejects"]
    assert [r["id"] for r in rejects] == ["nan-one", "row-7"] and rejects[0]["reason"].startswith("non-finite")


def test_a_shard_of_only_rejects_is_complete_and_empty(tmp_path):
    spec = store_spec(shard_size=2)
    utts = synthetic_utterances(spec, 4)
    writer = write_synthetic_store(tmp_path / "s", spec, utts, shards=[1])
    with writer.shard(0) as shard:
        shard.reject("a", "empty text: row 0")
        shard.reject("b", "too long: 31.2 s > 30 s")
    reader = StoreReader(tmp_path / "s")
    assert reader.shards() == [0, 1] and len(reader) == 2
    assert list(reader.iter_shard(0)) == []


def test_reopen_with_a_different_spec_is_refused(tmp_path):
    spec = store_spec()
    write_synthetic_store(tmp_path / "s", spec, synthetic_utterances(spec, 6))
    other = store_spec("full", fingerprint="synthetic-v2", d_model=48)
    with pytest.raises(StoreError) as err:
        StoreWriter.open(tmp_path / "s", other)
    message = str(err.value)
    for difference in (
        "teacher.d_model: 32 (store) vs 48 (given)",
        "frames: 'speech' (store) vs 'full' (given)",
        "dataset_fingerprint: 'synthetic-v1' (store) vs 'synthetic-v2' (given)",
        "--overwrite",
    ):
        assert difference in message
    # Codec and chunking do not change what is read back: the store keeps its own.
    reopened = StoreWriter.open(tmp_path / "s", store_spec(codec="blosc-lz4", chunk_frames=64))
    assert reopened.spec.codec == "blosc-zstd" and reopened.complete_shards() == {0}
    replaced = StoreWriter.open(tmp_path / "s", other, overwrite=True)
    assert replaced.complete_shards() == set() and StoreReader(tmp_path / "s").spec == other


def test_overwrite_never_deletes_what_is_not_a_store(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(StoreError, match="nothing was deleted"):
        StoreWriter.open(tmp_path / "precious", store_spec(), overwrite=True)
    with pytest.raises(StoreError, match="not empty and is not a whistle store"):
        StoreWriter.open(tmp_path / "precious", store_spec())
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_invalid_spec_lists_every_problem(tmp_path):
    spec = store_spec(codec="brotli", chunk_frames=0, bitround_keepbits=12)
    with pytest.raises(StoreError) as err:
        StoreWriter.open(tmp_path / "s", spec)
    assert "codec must be one of" in str(err.value) and "chunk_frames" in str(err.value)
    assert "bitround_keepbits" in str(err.value)


def test_bad_stores_give_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="no whistle store at .*nowhere.*nothing is there"):
        StoreReader(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a whistle store"):
        StoreReader(tmp_path / "notes")
    zarr.create_group(str(tmp_path / "plain"), attributes={"something": 1})
    with pytest.raises(StoreError, match="Zarr group but not a whistle store"):
        StoreReader(tmp_path / "plain")

    spec = store_spec(shard_size=3)
    write_synthetic_store(tmp_path / "s", spec, synthetic_utterances(spec, 6))
    wrong_teacher = TeacherInfo("openai/whisper-large-v3", "main", 1280, 128, 16000, 320, 50, 1500)
    with pytest.raises(StoreError) as err:
        StoreReader(tmp_path / "s", expect_teacher=wrong_teacher)
    assert "another teacher" in str(err.value) and "teacher.d_model: 32 (store) vs 1280 (given)" in str(err.value)
    assert "teacher.n_mels: 80 (store) vs 128 (given)" in str(err.value)

    root_json = tmp_path / "s" / "zarr.json"
    meta = json.loads(root_json.read_text())
    meta["attributes"]["whistle"]["format"] = 2
    root_json.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="has format 2, but this whistle .* reads format 1 only"):
        StoreReader(tmp_path / "s")
    meta["attributes"]["whistle"]["format"] = 1
    del meta["attributes"]["whistle"]["shard_size"]
    root_json.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="damaged root metadata.*shard_size"):
        StoreReader(tmp_path / "s")


def test_damaged_shards_are_named(tmp_path):
    spec = store_spec(shard_size=3, codec="blosc-lz4")
    write_synthetic_store(tmp_path / "s", spec, synthetic_utterances(spec, 9))
    (tmp_path / "s/shards/00001/offsets/c/0").unlink()
    states_object = tmp_path / "s/shards/00002/states/c/0/0"
    raw = bytearray(states_object.read_bytes())
    raw[100:110] = b"\x00" * 10  # inside the first chunk's compressed bytes
    states_object.write_bytes(bytes(raw))
    reader = StoreReader(tmp_path / "s")
    assert len(list(reader.iter_shard(0))) == 3
    with pytest.raises(StoreError, match="shard 00001 .* damaged: objects missing from the store: offsets"):
        reader.utterance(1, 0)
    with pytest.raises(StoreError, match=r"shard 00002 .* damaged.*Delete .*shards/00002"):
        reader.utterance(2, 0)


@pytest.mark.parametrize(
    "codec,bitround,direct",
    [("blosc-lz4", 0, True), ("blosc-zstd", 0, True), ("none", 0, True), ("blosc-lz4", 7, False)],
)
def test_direct_reads_equal_zarr_reads(tmp_path, codec, bitround, direct):
    spec = store_spec(shard_size=8, chunk_frames=100, codec=codec, bitround_keepbits=bitround)
    utts = synthetic_utterances(spec, 12, seed=4)
    write_synthetic_store(tmp_path / "s", spec, utts)
    fast, reference = StoreReader(tmp_path / "s"), StoreReader(tmp_path / "s", direct=False)
    assert (fast.layout(0) is not None) == direct  # BitRound is a filter the direct path leaves to zarr
    assert reference.layout(0) is None
    for shard in fast.shards():
        for ours, theirs in zip(fast.iter_shard(shard), reference.iter_shard(shard), strict=True):
            assert ours.states.flags.c_contiguous and ours.states.dtype == np.float16
            np.testing.assert_array_equal(ours.states, theirs.states)
    odd = lambda utt_id: int(utt_id[-1]) % 2 == 1  # noqa: E731
    assert (
        [(u.id, u.states.tobytes()) for u in fast.iter_shard(0, 2, 7, keep=odd)]
        == [(u.id, u.states.tobytes()) for u in reference.iter_shard(0, 2, 7, keep=odd)]
        != []
    )
    n_rows = fast.index(0).states.shape[0]
    for start, stop in ((0, 1), (99, 101), (150, 550), (n_rows - 3, n_rows), (0, n_rows), (7, 7)):
        np.testing.assert_array_equal(fast.read_rows(0, start, stop), reference.read_rows(0, start, stop))
    with pytest.raises(IndexError, match="outside"):
        fast.read_rows(0, 0, n_rows + 1)


def test_direct_reads_check_every_chunk_and_the_index(tmp_path):
    spec = store_spec(shard_size=6, chunk_frames=100, codec="blosc-lz4")
    utts = synthetic_utterances(spec, 6, seed=5)
    write_synthetic_store(tmp_path / "s", spec, utts)
    states_object = tmp_path / "s/shards/00000/states/c/0/0"
    intact = states_object.read_bytes()
    reader = StoreReader(tmp_path / "s")
    offset, length = (int(v) for v in reader.layout(0).chunks[3])
    raw = bytearray(intact)
    raw[offset + length // 2] ^= 0x10  # one bit inside inner chunk 3 (rows 300-399)
    states_object.write_bytes(bytes(raw))
    reader = StoreReader(tmp_path / "s")
    np.testing.assert_array_equal(
        reader.read_rows(0, 0, 300), StoreReader(tmp_path / "s", direct=False).read_rows(0, 0, 300)
    )
    with pytest.raises(
        store.reader.DamagedShardError,
        match=r"shard 00000 .* damaged: inner chunk 3 of states "
        r"\(rows 300-399\) fails its checksum - the shard object is corrupt",
    ):
        reader.read_rows(0, 250, 320)
    raw = bytearray(intact)
    raw[-10] ^= 0x01  # inside the sharding index
    states_object.write_bytes(bytes(raw))
    with pytest.raises(store.reader.DamagedShardError, match="sharding index of states fails its checksum"):
        StoreReader(tmp_path / "s").read_rows(0, 0, 10)
    states_object.write_bytes(intact[: len(intact) // 2])  # truncated: the index read is the tail of a chunk
    with pytest.raises(store.reader.DamagedShardError, match="corrupt or truncated"):
        list(StoreReader(tmp_path / "s").iter_shard(0))


def test_direct_reads_on_a_remote_fsspec_store():
    spec = store_spec(shard_size=5, chunk_frames=64)
    utts = synthetic_utterances(spec, 5, seed=6)
    url = "memory://whistle-tests/direct-reads"
    write_synthetic_store(url, spec, utts)
    reader = StoreReader(url)
    assert reader.layout(0) is not None
    for utt in reader.iter_shard(0):
        np.testing.assert_array_equal(utt.states, expected_states(spec, utts[utt.index]))
    np.testing.assert_array_equal(reader.frames(0, 2, 10, 90), utts[2]["window"][10:90])


def test_sums_made_by_the_caller_must_add_up(tmp_path):
    spec = store_spec(shard_size=4)
    d_model = spec.teacher.d_model
    utts = synthetic_utterances(spec, 2, seed=8)
    writer = StoreWriter.open(tmp_path / "s", spec)
    shard = writer.shard(0)
    for utt in utts:
        speech = utt["speech_frames"]
        shard.add(utt["id"], utt["text"], utt["language"], utt["duration"], utt["window"][:speech], summed=True)
    speech = utts[0]["speech_frames"]
    count = np.zeros(1500, np.int64)
    count[speech:] = 1
    zeros = np.zeros(d_model, np.float32)
    shard.add_sums(np.zeros((1500, d_model), np.float32), count, zeros, zeros, speech)  # the second one's is missing
    with pytest.raises(StoreError, match="writing shard 00000 .* the utterances added with summed=True"):
        shard.close()
    assert writer.complete_shards() == set()
    with pytest.raises(ValueError, match="tail_sum must be"):
        writer.shard(1).add_sums(np.zeros((1500, d_model), np.float16), count, zeros, zeros, speech)
    full = StoreWriter.open(tmp_path / "f", store_spec("full", shard_size=4))
    with pytest.raises(ValueError, match="summed is for speech-frames stores"):
        full.shard(0).add("u", "t", "en", 1.0, utts[0]["window"], summed=True)


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
def test_bitround_is_lossy_within_its_bits(tmp_path):
    spec = store_spec(shard_size=3, bitround_keepbits=7)
    utts = synthetic_utterances(spec, 3)
    write_synthetic_store(tmp_path / "s", spec, utts)
    got = StoreReader(tmp_path / "s").utterance(0, 1).states.astype(np.float64)
    truth = expected_states(spec, utts[1]).astype(np.float64)
    assert not np.array_equal(got, truth)
    np.testing.assert_allclose(got, truth, rtol=2.0**-7)


def test_run_records(tmp_path):
    spec = store_spec()
    writer = StoreWriter.open(tmp_path / "s", spec)
    writer.write_record("precompute.json", {"clips_per_s": 12.5, "model": "東京"})
    assert StoreReader(tmp_path / "s").record("precompute.json") == {"clips_per_s": 12.5, "model": "東京"}
    assert StoreReader(tmp_path / "s").record("train.json") is None
    with pytest.raises(ValueError, match="record name"):
        writer.write_record("../escape.json", {})


@pytest.mark.filterwarnings("ignore:Object at .*partial is not recognized")  # a rank mid-write
def test_writers_opening_a_new_store_at_once_all_succeed(tmp_path):
    spec = store_spec()
    for attempt in range(8):
        barrier = threading.Barrier(3)

        def open_store(_, path=tmp_path / f"s{attempt}", barrier=barrier):
            barrier.wait()  # like the ranks of one launch
            return StoreWriter.open(path, spec).spec

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(open_store, range(3))) == [spec] * 3
        assert StoreReader(tmp_path / f"s{attempt}").spec == spec
