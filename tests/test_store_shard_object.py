"""store/shard_object.py against zarr itself: the shard object we encode is, byte for byte, the file
zarr-python writes for the same array, codecs and chunking; zarr reads ours, and our decoder reads
zarr's (and refuses the same damage)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import store_spec, synthetic_utterances, write_synthetic_store
from zarr.storage import LocalStore

from store.shard_object import (
    ShardObjectError,
    create_states_array,
    read_chunks,
    read_layout,
    states_codecs,
    write_states,
)

D_MODEL = 32
# (rows, chunk rows): whole chunks; a last chunk padded with zeros; one short chunk; one row
GEOMETRIES = [(1000, 100), (1037, 256), (5, 64), (1, 1)]
CODECS = ["blosc-lz4", "blosc-zstd", "none"]


def utterance_pieces(n_rows: int, seed: int) -> list[np.ndarray]:
    """`n_rows` float16 rows (D_MODEL channels) cut into utterances of 1-300 rows, as a shard holds them."""
    rng = np.random.default_rng(seed)
    states = (rng.standard_normal((n_rows, D_MODEL)) * 3).astype(np.float16)  # (n_rows, D)
    states[::7, ::5] = 0  # runs of zeros, as compressors meet them
    cuts = np.cumsum(rng.integers(1, 300, n_rows))
    return np.split(states, cuts[cuts < n_rows])


def zarr_reference(path, spec, states: np.ndarray) -> zarr.Array:
    """The states written by zarr's own sharding codec, the array declared with zarr's API as the format says:
    inner chunks of chunk_frames rows, every chunk in one shard object, states_codecs inside it."""
    chunk = spec.chunk_frames
    rows = -(-len(states) // chunk) * chunk
    array = zarr.create_array(
        str(path),
        shape=states.shape,
        dtype=np.float16,
        chunks=(chunk, D_MODEL),
        shards=(rows, D_MODEL),
        fill_value=0,
        config={"write_empty_chunks": True},
        **states_codecs(spec),
    )
    array[...] = states
    return array


def ours(path, spec, pieces: list[np.ndarray]) -> tuple[LocalStore, zarr.Array]:
    """The states written by store/shard_object.py, the way a ShardWriter writes them."""
    store = LocalStore(str(path))
    array = create_states_array(zarr.create_group(store), sum(len(piece) for piece in pieces), spec)
    write_states(store, array, pieces, spec)
    return store, array


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n_rows,chunk", GEOMETRIES)
def test_the_shard_object_we_write_is_the_file_zarr_writes(tmp_path, codec, n_rows, chunk):
    spec = store_spec(d_model=D_MODEL, chunk_frames=chunk, codec=codec)
    pieces = utterance_pieces(n_rows, seed=n_rows)
    states = np.concatenate(pieces)  # (n_rows, D)
    reference = zarr_reference(tmp_path / "zarr", spec, states)
    _, array = ours(tmp_path / "ours", spec, pieces)
    ours_bytes = (tmp_path / "ours/states/c/0/0").read_bytes()
    assert ours_bytes == (tmp_path / "zarr/c/0/0").read_bytes()
    assert array.metadata.to_dict() == reference.metadata.to_dict()
    assert sorted(p.relative_to(tmp_path / "ours/states") for p in (tmp_path / "ours/states").rglob("*")) == sorted(
        p.relative_to(tmp_path / "zarr") for p in (tmp_path / "zarr").rglob("*")
    )  # no other object
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours/states"), mode="r")[...], states)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n_rows,chunk", GEOMETRIES)
def test_we_read_the_shard_object_zarr_writes(tmp_path, codec, n_rows, chunk):
    spec = store_spec(d_model=D_MODEL, chunk_frames=chunk, codec=codec)
    states = np.concatenate(utterance_pieces(n_rows, seed=n_rows + 1))  # (n_rows, D)
    reference = zarr_reference(tmp_path / "zarr", spec, states)
    layout = read_layout(LocalStore(str(tmp_path)), zarr.open_array(LocalStore(str(tmp_path)), path="zarr"))
    assert layout is not None and layout.blosc == (codec != "none") and layout.covers(0, n_rows)
    store = LocalStore(str(tmp_path))
    for start, stop in ((0, n_rows), (0, 1), (n_rows - 1, n_rows), (n_rows // 3, n_rows // 3 + chunk + 1)):
        stop = min(stop, n_rows)
        first = start // chunk
        out = np.empty(((-(-stop // chunk) - first) * chunk, D_MODEL), np.float16)  # every row of the chunks touched
        pieces = [(row, rows.copy()) for row, rows in read_chunks(store, layout, start, stop, None)]
        assert [(row, rows.tobytes()) for row, rows in read_chunks(store, layout, start, stop, out)] == [
            (row, rows.tobytes()) for row, rows in pieces
        ]
        np.testing.assert_array_equal(np.concatenate([rows for _, rows in pieces]), reference[start:stop])
        np.testing.assert_array_equal(out[start - first * chunk : stop - first * chunk], states[start:stop])


def test_a_chunk_zarr_never_wrote_is_left_to_zarr(tmp_path):
    spec = store_spec(d_model=D_MODEL, chunk_frames=100, codec="blosc-zstd")
    array = zarr.create_array(
        str(tmp_path / "zarr"),
        shape=(300, D_MODEL),
        dtype=np.float16,
        chunks=(100, D_MODEL),
        shards=(300, D_MODEL),
        fill_value=0,
        config={"write_empty_chunks": True},
        **states_codecs(spec),
    )
    written = np.ones((100, D_MODEL), np.float16)
    array[200:300] = written  # chunks 0 and 1 are never written: their index entries say so
    store = LocalStore(str(tmp_path))
    layout = read_layout(store, zarr.open_array(store, path="zarr"))
    assert layout.covers(200, 300) and not layout.covers(150, 250) and not layout.covers(0, 100)
    assert not layout.covers(250, 250)  # nothing to read
    [(row, rows)] = list(read_chunks(store, layout, 200, 300, None))
    assert row == 200
    np.testing.assert_array_equal(rows, written)


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
def test_codecs_we_do_not_know_are_written_and_read_by_zarr(tmp_path):
    spec = store_spec(d_model=D_MODEL, chunk_frames=100, codec="blosc-lz4", bitround_keepbits=7)
    pieces = utterance_pieces(250, seed=3)
    zarr_reference(tmp_path / "zarr", spec, np.concatenate(pieces))
    store, array = ours(tmp_path / "ours", spec, pieces)
    assert read_layout(store, array) is None  # BitRound: a filter this module leaves to zarr
    assert (tmp_path / "ours/states/c/0/0").read_bytes() == (tmp_path / "zarr/c/0/0").read_bytes()


@pytest.mark.parametrize("codec", ["blosc-lz4", "none"])
def test_a_damaged_chunk_is_refused_by_zarr_and_by_us(tmp_path, codec):
    spec = store_spec(d_model=D_MODEL, chunk_frames=100, codec=codec)
    store, array = ours(tmp_path / "ours", spec, utterance_pieces(400, seed=4))
    layout = read_layout(store, array)
    offset, length = (int(v) for v in layout.chunks[2])
    path = tmp_path / "ours/states/c/0/0"
    raw = bytearray(path.read_bytes())
    raw[offset + length // 2] ^= 0x04  # one bit inside inner chunk 2 (rows 200-299)
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum"):
        zarr.open_array(store, path="states", mode="r")[250]
    with pytest.raises(ShardObjectError, match=r"inner chunk 2 of states \(rows 200-299\) fails its checksum"):
        list(read_chunks(store, layout, 150, 260, None))
    np.testing.assert_array_equal(
        next(read_chunks(store, layout, 0, 100, None))[1], zarr.open_array(store, path="states", mode="r")[0:100]
    )


@pytest.mark.parametrize("codec", CODECS)
def test_a_shard_writer_writes_the_file_zarr_writes(tmp_path, codec):
    spec = store_spec(shard_size=5, chunk_frames=100, codec=codec)
    utts = synthetic_utterances(spec, 5, seed=9)
    write_synthetic_store(tmp_path / "s", spec, utts)
    states = np.concatenate([u["window"][: u["speech_frames"]] for u in utts])  # (n_frames, D)
    zarr_reference(tmp_path / "z", spec, states)
    assert (tmp_path / "s/shards/00000/states/c/0/0").read_bytes() == (tmp_path / "z/c/0/0").read_bytes()
