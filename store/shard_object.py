"""A shard's states array and the bytes of its one Zarr shard object, written and read without zarr.

The only module that knows the byte layout of zarr's sharding codec (written down with the rest
of the format in store/format.py, under `states`).

    array = create_states_array(group, n_frames, spec)
    write_states(store, array, pieces, spec)        # the whole shard object in one store write
    layout = read_layout(store, array)              # the index, read once (None: zarr reads the array)
    for row, rows in read_chunks(store, layout, start, stop, out=None): ...

Writing: the shard object is encoded here and stored in one write, the same bytes zarr's sharding
codec writes, without zarr first joining the states and assembling each chunk through its buffers.

Reading: the byte range holding the wanted inner chunks is fetched in one store request, and each
chunk's crc32c is checked before Blosc decodes it straight into the output array. That is what
zarr's sharding codec does too, minus its per-chunk buffer assembly (most of its read time for
float16 states). Arrays this path does not know (BitRound filters, other codecs, several shard
objects) have no layout, and a range with an unwritten chunk is not `covered`: zarr reads those.

Damage found in the bytes raises ShardObjectError, whose message says which part is bad; the
caller names the shard. Store I/O errors (OSError) pass through.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numcodecs.blosc
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.numcodecs import BitRound
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype

from store.format import run_sync
from store.spec import StoreSpec

CHECKSUM_BYTES = 4  # a crc32c, little-endian uint32
INDEX_ENTRY_BYTES = 16  # (offset, nbytes) of one inner chunk, little-endian uint64 each
MISSING_CHUNK = 2**64 - 1  # both values of the index entry of a chunk never written (zarr reads the fill value)
BLOSC_HEADER_BYTES = 16  # its bytes 4-7: the decoded size, little-endian uint32
ENCODE_THREADS = min(4, os.cpu_count() or 1)  # threads compressing one shard object's chunks


class ShardObjectError(ValueError):
    """Bytes of a states shard object that are missing, cut short or fail their checksum; says which."""


@dataclass(frozen=True)
class ShardLayout:
    """Where the inner chunks of a shard's states object lie, for reading them without zarr's sharding codec."""

    key: str  # the shard object's key in the store
    chunk_rows: int  # rows per inner chunk (the last one is padded with zeros)
    d_model: int  # columns of the states
    blosc: bool  # Blosc-compressed chunks (else raw little-endian float16)
    chunks: np.ndarray  # (n_chunks, 2) uint64: byte offset and length of each chunk in the object

    def covers(self, start: int, stop: int) -> bool:
        """Whether every inner chunk holding rows [start, stop) was written (else zarr reads the fill value)."""
        rows = self.chunk_rows
        return start < stop and not (self.chunks[start // rows : -(-stop // rows)] == MISSING_CHUNK).any()


# --- the states array ------------------------------------------------------------------------------


def states_codecs(spec: StoreSpec) -> dict[str, Any]:
    """Zarr `filters` and `compressors` for the states array of a shard (inner-chunk codecs)."""
    filters = []
    if spec.bitround_keepbits:
        filters.append(BitRound(keepbits=spec.bitround_keepbits))
    compressors: list[Any] = []
    if spec.codec.startswith("blosc-"):
        compressors.append(
            BloscCodec(
                cname=spec.codec.removeprefix("blosc-"), clevel=spec.compression_level, shuffle="shuffle", typesize=2
            )
        )
    compressors.append(Crc32cCodec())
    return {"filters": filters, "compressors": compressors}


def states_compressor(spec: StoreSpec) -> numcodecs.Blosc | None:
    """The Blosc compressor of the states' inner chunks as numcodecs builds it (zarr's BloscCodec does the same)."""
    if not spec.codec.startswith("blosc-"):
        return None
    return numcodecs.Blosc(
        cname=spec.codec.removeprefix("blosc-"),
        clevel=spec.compression_level,
        shuffle=numcodecs.Blosc.SHUFFLE,
        blocksize=0,
        typesize=2,
    )


def create_states_array(group: zarr.Group, n_frames: int, spec: StoreSpec) -> zarr.Array:
    """A shard's (n_frames, D) float16 states array: inner chunks of `chunk_frames` rows, all in one shard object."""
    d_model, chunk = spec.teacher.d_model, spec.chunk_frames
    shard_rows = max(1, -(-n_frames // chunk)) * chunk
    return group.create_array(
        "states",
        shape=(n_frames, d_model),
        dtype=np.float16,
        chunks=(chunk, d_model),
        shards=(shard_rows, d_model),
        fill_value=0,
        config={"write_empty_chunks": True},
        **states_codecs(spec),
    )


def direct_compression(array: zarr.Array) -> bool | None:
    """Whether a states array's inner chunks are Blosc-compressed, when whistle reads and writes its shard object
    itself (one shard object; bytes -> [Blosc] -> crc32c inside; the index as bytes -> crc32c at the end); None
    when zarr must (BitRound filters, other codecs or layouts)."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or array.shards is None:
        return None
    sharding = codecs[0]
    inner = list(sharding.codecs)
    if (
        array.ndim != 2
        or array.shards[0] < array.shape[0]
        or array.shards[1] != array.shape[1]
        or array.chunks[1] != array.shape[1]
        or array.dtype != np.float16
    ):
        return None
    index_codecs = list(sharding.index_codecs)
    if (
        sharding.index_location != ShardingCodecIndexLocation.end
        or len(index_codecs) != 2
        or not _little_endian_bytes(index_codecs[0])
        or not isinstance(index_codecs[1], Crc32cCodec)
    ):
        return None
    if len(inner) < 2 or not _little_endian_bytes(inner[0]) or not isinstance(inner[-1], Crc32cCodec):
        return None
    middle = inner[1:-1]
    if not middle:
        return False
    return True if len(middle) == 1 and isinstance(middle[0], BloscCodec) else None


def _little_endian_bytes(codec: Any) -> bool:
    return isinstance(codec, BytesCodec) and codec.endian is not None and codec.endian.value == "little"


def shard_object_key(array: zarr.Array) -> str:
    """The store key of the one shard object of a states array."""
    return f"{array.path}/{array.metadata.encode_chunk_key((0, 0))}"


def checksum_ok(payload: np.ndarray) -> bool:
    """payload (n,) uint8: data followed by its crc32c (little-endian uint32)."""
    body, stored = payload[:-CHECKSUM_BYTES], payload[-CHECKSUM_BYTES:]
    return google_crc32c.value(body) == int.from_bytes(stored.tobytes(), "little")


# --- writing ---------------------------------------------------------------------------------------


def write_states(store: Store, array: zarr.Array, pieces: list[np.ndarray], spec: StoreSpec) -> None:
    """Write a states array made by `create_states_array` whole, from its rows in `pieces` (each (T, D) float16,
    in order): directly as one shard object where this module knows the codecs, else through zarr (one write)."""
    if not array.shape[0]:
        return
    if direct_compression(array) is None:
        array[...] = np.concatenate(pieces)  # (n_frames, D), one write: the whole shard object
        return
    shard_object = encode_shard_object(pieces, spec.teacher.d_model, spec.chunk_frames, states_compressor(spec))
    run_sync(store.set(shard_object_key(array), default_buffer_prototype().buffer.from_bytes(shard_object)))


def encode_shard_object(
    pieces: list[np.ndarray], d_model: int, chunk_rows: int, compressor: numcodecs.Blosc | None
) -> bytes:
    """The shard object of a states array held in one shard: the rows of `pieces` (each (T, D) float16, in
    order) in inner chunks of `chunk_rows` rows (the last one padded with zeros), each compressed and
    checksummed, then the index. Chunks are gathered one by one (the rows are never joined whole) and
    compressed on ENCODE_THREADS threads, at most twice as many chunks in flight (Blosc frees the GIL)."""
    n_frames = sum(len(piece) for piece in pieces)
    n_chunks = max(1, -(-n_frames // chunk_rows))

    def encode(chunk: np.ndarray) -> bytes:
        body = compressor.encode(chunk) if compressor is not None else chunk.tobytes()
        return body + google_crc32c.value(body).to_bytes(CHECKSUM_BYTES, "little")

    encoded: list[bytes] = []
    with ThreadPoolExecutor(ENCODE_THREADS) as pool:
        in_flight: deque[Future] = deque()
        piece_index, start = 0, 0  # the next row to gather: pieces[piece_index][start]
        for _ in range(n_chunks):
            chunk = np.zeros((chunk_rows, d_model), "<f2")  # (chunk_rows, D); the last one's rest is padding
            filled = 0
            while filled < chunk_rows and piece_index < len(pieces):
                piece = pieces[piece_index]
                take = min(chunk_rows - filled, len(piece) - start)
                chunk[filled : filled + take] = piece[start : start + take]
                filled, start = filled + take, start + take
                if start == len(piece):
                    piece_index, start = piece_index + 1, 0
            in_flight.append(pool.submit(encode, chunk))
            if len(in_flight) >= 2 * ENCODE_THREADS:
                encoded.append(in_flight.popleft().result())
        encoded += [future.result() for future in in_flight]
    sizes = np.array([len(part) for part in encoded], np.uint64)  # (n_chunks,)
    index = np.stack([np.cumsum(sizes) - sizes, sizes], axis=1).astype("<u8")  # (n_chunks, 2): offset, nbytes
    table = index.tobytes()
    return b"".join([*encoded, table, google_crc32c.value(table).to_bytes(CHECKSUM_BYTES, "little")])


# --- reading ---------------------------------------------------------------------------------------


def read_layout(store: Store, array: zarr.Array) -> ShardLayout | None:
    """The sharding index of a states array's shard object (one small read), or None when zarr must read the
    array (codecs or a layout this module does not know, or no rows)."""
    blosc = direct_compression(array)
    if blosc is None or not array.size:
        return None
    key = shard_object_key(array)
    chunk_rows = array.chunks[0]
    n_chunks = array.shards[0] // chunk_rows
    size = n_chunks * INDEX_ENTRY_BYTES + CHECKSUM_BYTES
    raw = fetch(store, key, SuffixByteRequest(size), size, "its sharding index")
    if not checksum_ok(raw):
        raise ShardObjectError(
            "the sharding index of states fails its checksum - the shard object is corrupt or truncated"
        )
    chunks = raw[:-CHECKSUM_BYTES].view("<u8").reshape(n_chunks, 2)  # (n_chunks, 2): offset, nbytes
    return ShardLayout(key, chunk_rows, array.shape[1], blosc, chunks)


def fetch(store: Store, key: str, request: ByteRequest, size: int, what: str) -> np.ndarray:
    """`size` bytes of an object as (size,) uint8; a missing object or a shorter answer is damage."""
    buffer = run_sync(store.get(key, prototype=default_buffer_prototype(), byte_range=request))
    if buffer is None:
        raise ShardObjectError(f"the states object {key} is missing")
    data = buffer.as_numpy_array().view(np.uint8).reshape(-1)
    if data.size != size:
        raise ShardObjectError(
            f"{what} is {data.size} bytes where the index says {size} - the shard object is corrupt or truncated"
        )
    return data


def read_chunks(
    store: Store, layout: ShardLayout, start: int, stop: int, out: np.ndarray | None
) -> Iterator[tuple[int, np.ndarray]]:
    """Rows [start, stop) through the sharding index, one inner chunk at a time: (first row, rows) pairs in
    order. Decoded into `out` ((chunks x chunk_rows, D): every row of the chunks touched) when given, else
    into one reused chunk buffer, so a pair is valid only until the next one is asked for."""
    rows = layout.chunk_rows
    first, last = start // rows, -(-stop // rows)  # inner chunks [first, last)
    entries = layout.chunks[first:last]  # (k, 2)
    offsets, lengths = entries[:, 0].astype(np.int64), entries[:, 1].astype(np.int64)  # (k,)
    begin, end = int(offsets.min()), int((offsets + lengths).max())
    contiguous = end - begin == int(lengths.sum())  # zarr writes a shard's chunks back to back
    data = None
    if contiguous:
        data = fetch(store, layout.key, RangeByteRequest(begin, end), end - begin, "states")
    buffer = np.empty((rows, layout.d_model), np.float16) if out is None else None  # (rows, D)
    for c, (offset, length) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        if data is None:
            payload = fetch(store, layout.key, RangeByteRequest(offset, offset + length), length, "states")
        else:
            payload = data[offset - begin : offset - begin + length]
        row = (first + c) * rows
        where = f"inner chunk {first + c} of states (rows {row}-{row + rows - 1})"
        if out is None:  # uncompressed chunks are the fetched bytes as they are: no copy
            target = decode_chunk(payload, layout, buffer, where, view_ok=True)  # (rows, D)
        else:
            target = decode_chunk(payload, layout, out[c * rows : (c + 1) * rows], where, view_ok=False)
        low, high = max(start, row), min(stop, row + rows)
        yield low, target[low - row : high - row]


def decode_chunk(
    payload: np.ndarray, layout: ShardLayout, target: np.ndarray, where: str, *, view_ok: bool
) -> np.ndarray:
    """One inner chunk's stored bytes (n,) uint8, checked and decoded: (chunk_rows, D) float16, written into
    `target`, or with `view_ok` an uncompressed chunk's bytes viewed as they are. `where` names it in errors."""
    if len(payload) <= CHECKSUM_BYTES or not checksum_ok(payload):
        raise ShardObjectError(f"{where} fails its checksum - the shard object is corrupt or truncated")
    body = payload[:-CHECKSUM_BYTES]
    chunk_bytes = layout.chunk_rows * layout.d_model * 2
    try:
        if layout.blosc:
            # Blosc's 16-byte header holds the decoded size at bytes 4-7 (little-endian uint32)
            decoded = int.from_bytes(body[4:8].tobytes(), "little") if body.size >= BLOSC_HEADER_BYTES else -1
            if decoded != chunk_bytes:
                raise ValueError(f"it decodes to {decoded} bytes, not {chunk_bytes}")
            numcodecs.blosc.decompress(body, target)
        elif body.size != chunk_bytes:
            raise ValueError(f"it holds {body.size} bytes, not {chunk_bytes}")
        elif view_ok:
            return body.view(np.float16).reshape(layout.chunk_rows, layout.d_model)
        else:
            target.view(np.uint8).reshape(-1)[:] = body
    except (ValueError, RuntimeError) as err:
        raise ShardObjectError(f"{where} cannot be decoded ({err}) - the shard object is corrupt or truncated") from err
    return target
