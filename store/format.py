"""The whistle feature store, format 1 (minor 1): what is on disk, and how to open it.

A store is a Zarr v3 group, a local folder or any fsspec URL (``s3://bucket/store``,
``gs://...``, ``memory://...``). Every record in it is JSON or a typed array; nothing is pickled.
Teacher states are the frozen Whisper encoder's outputs, ``max_frames`` (1500) frames of
``d_model`` channels per 30 s window, 50 frames per second.

Layout::

    STORE/zarr.json             attrs.whistle = {
                                  "format": 1,
                                  "teacher": {name_or_path, revision, d_model, n_mels, sample_rate,
                                              samples_per_frame, frames_per_second, max_frames,
                                              encoder_fingerprint (absent in stores written before it)},
                                  "frames": "speech" | "full",  "speech_margin_frames": int,
                                  "dtype": "float16",  "codec": "blosc-lz4" | "blosc-zstd" | "none",
                                  "compression_level": int,  "bitround_keepbits": int (0 = lossless),
                                  "chunk_frames": int,  "shard_size": int,
                                  "dataset_fingerprint": str,  "augment": str,
                                  "created_by", "created_at", "updated_by", "updated_at"}
    STORE/<name>.json           run records (e.g. precompute.json), plain JSON
    STORE/shards/00000/zarr.json   attrs: {"complete": false, started_by, started_at} when begun; then
                                   n, n_frames, audio_seconds, rejects [{id, reason}], format_minor (1),
                                   write_id (a random hex id of this write of the shard), written_by,
                                   written_at and "complete": true, in the shard's last write. Readers
                                   type-check a complete shard's attrs (n, n_frames, format_minor counts;
                                   audio_seconds a number; rejects a list of {id, reason} strings;
                                   write_id a string): malformed, it counts as incomplete (named, and
                                   rewritten by the next precompute run), like an unparsable zarr.json
      states        (n_frames, d_model) float16. One Zarr shard object (sharding codec) of
                    ceil(n_frames / chunk_frames) inner chunks of `chunk_frames` rows (the last
                    one padded with zeros): BitRound (optional, lossy) -> bytes -> Blosc (lz4/zstd,
                    byte shuffle; or nothing) -> crc32c. The checksum makes any damaged byte a read
                    error instead of silently wrong states. Its bytes (STORE/shards/00000/states/
                    c/0/0): the encoded inner chunks back to back in row order, each ending in its
                    crc32c; then the index at the end, one (offset, nbytes) little-endian uint64
                    pair per inner chunk (both 2**64 - 1 for a chunk never written), then the
                    index's crc32c (little-endian uint32). store/shard_object.py writes and reads
                    these bytes itself where it knows the codecs, byte for byte what zarr does.
      offsets       (n + 1,) int64: utterance i is states[offsets[i]:offsets[i + 1]]
      speech_frames (n,) int32: frames that cover the audio (+ margin); in speech mode the number
                    of rows stored, in full mode where the speech ends inside the stored window
      ids, text, language   (n,) variable-length UTF-8 strings (Zarr "string", vlen-utf8 codec)
      duration      (n,) float32 seconds of audio
      tail_sum      (max_frames, d_model) float64: sum over utterances of the states at each
                    absolute window position p >= speech_frames (the encoder's answer to padding)
      tail_count    (max_frames,) int64: how many utterances contributed to each position
      stat_sum, stat_sqsum   (d_model,) float64: per-channel sums of speech frames and of squares
      stat_count    (1,) int64: speech frames summed
                    (every array but states is a single chunk: bytes (or vlen-utf8) -> Zstd (level 0,
                    zarr's default) -> crc32c, so any damaged byte of it is a read error; shards of
                    format 1.0 (no format_minor) have no crc32c there and are read unchecked)
    STORE/cache/<key>.<tag>/    the reduction of the complete shards (tail_template, tail_count, mean,
                                std, each a single chunk ending in crc32c; attrs complete, shards),
                                <key> = hash of the complete shards' (index, write_id; for format 1.0
                                shards n, n_frames, written_at); only ever a cache, recomputed when stale,
                                and never used when damaged (a WARNING names the entry; it is replaced)
    STORE/locks/<shard name>    an empty file per shard being written, locked with fcntl.flock by the
                                process writing it (local stores only; not part of the data: readers
                                never look at it, a completed shard's file is deleted, a crashed
                                writer's lock is released by the OS and its file is harmless)

Frame policies: ``speech`` (default) keeps only the speech frames of each utterance; the frames
after them are nearly the same for every clip and are replaced by the per-position mean over all
utterances (the *tail template*) whenever a full window is needed. ``full`` keeps all
``max_frames`` frames of every window.

Protocol (what lets any number of processes write one store with no locks):

- Shard k holds source rows [k * shard_size, (k + 1) * shard_size); process r of W writes the
  shards with k % W == r. One process writes a shard group, and every array in it is written whole
  in one call (zarr-python rewrites a whole shard object on any partial write).
- A shard is invisible to readers until its attrs say ``complete: true``; that attribute is
  written in the shard's last write. A rerun deletes incomplete shards and skips complete ones.
  No rename is needed, so the protocol works on object stores.
- Two runs at once (e.g. a job restarted while the first still runs): before encoding shard k a
  writer takes an exclusive, non-blocking ``flock`` on ``locks/<k>`` and holds it until the shard
  is closed; a shard whose lock another live process holds is skipped (that process finishes it),
  and an incomplete shard whose lock is free was left by a crash and is redone. Locks exist only
  where the store is a ``LocalStore`` (a plain path or a ``file://`` URL) on a POSIX system: a
  local disk, or a network file system whose locking works (NFSv4; NFSv3 with lockd; Lustre or
  GPFS mounted with flock support). Where a mount has no locking, ``flock`` fails (ENOLCK) and the
  run stops with that error. On any other fsspec URL (``s3://``, ``gs://``, ``memory://``, ...:
  object stores have no locks) claims always succeed and nothing stops two runs from writing the
  same shard, so run **one precompute per store at a time** there (the W processes of one run
  never collide: they write disjoint shards).
- Readers check ``format`` and refuse any other number; they refuse a store whose teacher differs
  from the one they are given.
- Rejected inputs are listed per shard as {id, reason}. A reason reads "kind: detail"; reports
  group rejects by the kind (the text before the first colon).

Format history: 1 — first release. 1.1 (this one; a shard's attrs say "format_minor": 1) — every
array of a shard, not only states, and every array of the cache ends in a crc32c; shard attrs carry
format_minor and write_id, and the cache is keyed by write_id. Readers read every minor of format 1
(zarr checks the codecs each array declares), so 1.0 shards read as before, unverified:
`inspect-store` names them "not verifiable". A shard that says format_minor 1 but has an array
without its crc32c is damaged. Whistle versions before 1.1 read 1.1 stores too.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import warnings
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore

FORMAT_VERSION = 1
FORMAT_MINOR = 1  # 1.1: every array of a shard checksummed; a shard's attrs say its minor (none: 1.0)
STATES_DTYPE = "float16"
FRAME_POLICIES = ("speech", "full")
CODECS = ("blosc-lz4", "blosc-zstd", "none")
MAX_BITROUND_KEEPBITS = 9  # float16 has 10 mantissa bits; keeping all 10 is no rounding at all
SHARDS_GROUP = "shards"
CACHE_GROUP = "cache"
ATTRS_KEY = "whistle"

# BitRound is a numcodecs codec that zarr-python (not the Zarr v3 spec) knows; zarr warns on every
# construction, including each time such an array is opened. We chose it knowingly (opt-in only).
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=ZarrUserWarning)


class StoreError(Exception):
    """A user-facing store problem: what is wrong, where, and what to do. The CLI prints it."""


class RecordError(StoreError, ValueError):
    """A JSON object of the store (metadata or run record) that does not parse; a ValueError too, so the
    callers that take such damage as "incomplete" (read_shard_attrs) keep doing so."""


class DamagedShardError(StoreError):
    """A complete shard that cannot be read back; says how to repair it."""

    def __init__(self, url: str, shard: int | None = None, detail: str | None = None) -> None:
        self.shard, self.detail = shard, detail
        if shard is None:  # rebuilt from its message alone (torch re-raises a DataLoader worker's error so)
            super().__init__(url)
            return
        name = shard_name(shard)
        super().__init__(
            f"shard {name} of store {url} is damaged: {detail}. Delete {url}/{SHARDS_GROUP}/{name} and run "
            "`whistle precompute` on this store again to recompute it (`whistle inspect-store --check` lists "
            "every damaged shard)."
        )


def array_damage(name: str, err: Exception) -> str:
    """How a DamagedShardError names an array of a shard that could not be read back."""
    if "checksum" in str(err):
        return (
            f"{name} is unreadable (its stored bytes fail their crc32c checksum) - its object is corrupt or truncated"
        )
    return f"{name} is unreadable ({type(err).__name__}: {err}) - its object is corrupt or truncated"


def whistle_version() -> str:
    """The installed whistle version (store/ is a leaf and cannot import whistle_pipeline)."""
    try:
        return importlib.metadata.version("whistle")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def url_text(url: str | os.PathLike | Store) -> str:
    """How to name a store in messages."""
    return repr(url) if isinstance(url, Store) else os.fspath(url)


def open_zarr_store(url: str | os.PathLike | Store, *, read_only: bool) -> Store:
    """A zarr Store for a local path, a file:// URL or any fsspec URL (s3://, gs://, memory://, ...)."""
    if isinstance(url, Store):
        return url.with_read_only(read_only) if url.read_only != read_only else url
    text = os.fspath(url)
    if "://" in text and not text.startswith("file://"):
        try:
            return FsspecStore.from_url(text, read_only=read_only)
        except (ImportError, ValueError) as err:
            raise StoreError(f"cannot open store URL {text}: {err} (is the fsspec backend for it installed?)") from err
    return LocalStore(text.removeprefix("file://"), read_only=read_only)


def run_sync(coroutine: Any) -> Any:
    """Run a zarr Store coroutine on zarr's own event loop (the one its fsspec filesystems live on)."""
    return sync(coroutine)


def is_empty(store: Store) -> bool:
    """True when nothing at all is stored at the store's location."""
    try:
        return run_sync(store.is_empty(""))
    except FileNotFoundError:
        return True


def open_root(store: Store, url: str) -> tuple[zarr.Group, dict[str, Any]]:
    """The root group and its raw `whistle` attributes; StoreError when missing or not a whistle store."""
    if is_empty(store):
        raise StoreError(
            f"no whistle store at {url} (nothing is there). Check the path, or create the store with "
            "`whistle precompute`."
        )
    try:
        root = zarr.open_group(store, mode="r" if store.read_only else "r+")
    except Exception as err:  # GroupNotFoundError, ContainsArrayError, malformed JSON, ...
        raise StoreError(
            f"{url} is not a whistle store: it holds no readable Zarr v3 group ({type(err).__name__}: {err})"
        ) from err
    attrs = root.attrs.asdict()
    if not isinstance(attrs.get(ATTRS_KEY), dict):
        raise StoreError(
            f"{url} is a Zarr group but not a whistle store (its zarr.json has no '{ATTRS_KEY}' attributes)"
        )
    return root, attrs[ATTRS_KEY]


def shard_attrs(root: zarr.Group) -> dict[int, dict[str, Any]]:
    """Attributes of every shard group, complete or not, by shard index.

    A shard whose zarr.json cannot be parsed (a write cut short by a full disk on a store without
    atomic writes, or damage) counts as incomplete, {"complete": False, "unreadable": why}: it is
    redone by the next precompute run instead of making the whole store unreadable."""
    try:
        shards = root[SHARDS_GROUP]
        return {int(name): _well_formed(group.attrs.asdict()) for name, group in shards.groups() if name.isdigit()}
    except KeyError:
        return {}
    except (ValueError, TypeError):  # a damaged zarr.json: read the shards' one by one
        names = sync(_list_dir(root.store, SHARDS_GROUP))
        found = {int(name): read_shard_attrs(root.store, int(name)) for name in names if name.isdigit()}
        return {index: attrs for index, attrs in found.items() if attrs is not None}


def read_shard_attrs(store: Store, index: int) -> dict[str, Any] | None:
    """One shard's attributes (see shard_attrs); None when there is no such shard."""
    try:
        metadata = read_json(store, f"{SHARDS_GROUP}/{shard_name(index)}/zarr.json")
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        return {"complete": False, "unreadable": f"its zarr.json is damaged ({err})"}
    if metadata is None:
        return None
    attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
    if not isinstance(attributes, dict):
        return {"complete": False, "unreadable": "its zarr.json has no attributes"}
    return _well_formed(attributes)


def _well_formed(attrs: dict[str, Any]) -> dict[str, Any]:
    """A shard's attributes, or for a complete shard whose attributes are malformed the "unreadable" record
    that makes it count as incomplete (so the next precompute run rewrites it)."""
    problems = shard_attr_problems(attrs) if attrs.get("complete") is True else []
    if problems:
        return {"complete": False, "unreadable": "its attributes are malformed: " + "; ".join(problems)}
    return attrs


def shard_attr_problems(attrs: dict[str, Any]) -> list[str]:
    """What is malformed in a complete shard's attributes, one message per attribute (empty when well-formed)."""
    out = [
        f"{name} is {attrs.get(name)!r}, not a count"
        for name in ("n", "n_frames", "format_minor")
        if not _is_count(attrs.get(name, 0))
    ]
    seconds = attrs.get("audio_seconds")
    if not (
        isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds) and seconds >= 0
    ):
        out.append(f"audio_seconds is {seconds!r}, not a number of seconds")
    rejects = attrs.get("rejects")
    if not isinstance(rejects, list):
        out.append(f"rejects is {_short(rejects)}, not a list of {{id, reason}}")
    else:
        bad = [
            r
            for r in rejects
            if not (
                isinstance(r, dict)
                and isinstance(r.get("id"), str)
                and isinstance(r.get("reason"), str)
                and r["reason"]
            )
        ]
        if bad:
            out.append(f"rejects has {len(bad)} entries that are not {{id, reason}} strings, e.g. {_short(bad[0])}")
    if not isinstance(attrs.get("write_id", ""), str):
        out.append(f"write_id is {_short(attrs['write_id'])}, not a string")
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_compressors() -> tuple[Any, ...]:
    """The compressors of every array but states, and of the cache's arrays (format 1.1): zarr's default Zstd,
    then crc32c, so any damaged byte of the stored chunk is a read error instead of a wrong value."""
    return (ZstdCodec(level=0, checksum=False), Crc32cCodec())


def is_checked(array: zarr.Array) -> bool:
    """Whether a (non-sharded) array's stored chunks end in a crc32c checksum that zarr verifies on read."""
    codecs = array.metadata.codecs
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


def missing_objects(store: Store, group: zarr.Group, group_path: str, names: tuple[str, ...]) -> list[str]:
    """Arrays among `names` whose one stored object is absent (zarr would silently read zeros)."""
    missing = []
    for name in names:
        array = group[name]
        if array.size and not run_sync(
            store.exists(f"{group_path}/{name}/{array.metadata.encode_chunk_key((0,) * array.ndim)}")
        ):
            missing.append(name)
    return missing


async def _list_dir(store: Store, prefix: str) -> list[str]:
    return [name async for name in store.list_dir(prefix)]


def shard_name(index: int) -> str:
    """Zero-padded folder name of shard `index` (00042); wider once past 99999."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{index:05d}"


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    """A JSON object stored under `key`, or None when there is none."""
    buffer = run_sync(store.get(key, prototype=default_buffer_prototype()))
    if buffer is None:
        return None
    try:
        return json.loads(buffer.to_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: never tried as anything but JSON
        raise RecordError(f"{key} in the store is not JSON ({err}): it was not read") from err


def write_json(store: Store, key: str, data: dict[str, Any]) -> None:
    """Store a JSON object under `key` in one write."""
    payload = json.dumps(data, indent=2, ensure_ascii=False).encode()
    run_sync(store.set(key, default_buffer_prototype().buffer.from_bytes(payload)))


def version_stamp(prefix: str) -> dict[str, str]:
    """{"<prefix>_by": "whistle 0.1.0", "<prefix>_at": ISO time} for root and shard attrs."""
    return {f"{prefix}_by": f"whistle {whistle_version()}", f"{prefix}_at": _now()}
