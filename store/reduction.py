"""The tail template and the statistics: one reduction over the complete shards' sums, cached in the store.

    reduction = reduce_shards(root, url, teacher, shards)   # shards: {index: attrs} of the complete shards
    reduction.tail_template                                 # (max_frames, D) float32
    reduction.mean, reduction.std                           # (D,) float32

Each shard stores its own sums (tail_sum, tail_count, stat_sum, stat_sqsum, stat_count; see
store/format.py), so the reduction reads a few small arrays per shard, never the states. Its result
is kept under STORE/cache/<key>.<tag>/ for the next reader, <key> a hash of the shard set (each
complete shard's index and identity: the random `write_id` of the write that completed it); a
read-only store just goes without. Every cache array ends in a crc32c: an entry that fails it (or is
otherwise not whole) is never used: it is named in a WARNING, recomputed and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from store.format import (
    CACHE_GROUP,
    SHARDS_GROUP,
    DamagedShardError,
    StoreError,
    array_damage,
    checked_compressors,
    is_checked,
    missing_objects,
    run_sync,
    shard_name,
    version_stamp,
)
from store.spec import TeacherInfo

log = logging.getLogger(__name__)

STD_FLOOR = 1e-6  # the std is floored so that a dead channel never divides by zero
REDUCE_THREADS = 8  # shards read at once (I/O bound)
SUM_ARRAYS = ("tail_sum", "tail_count", "stat_sum", "stat_sqsum", "stat_count")  # each shard's sums


@dataclass(frozen=True)
class Reduction:
    """What the complete shards' sums reduce to; its arrays are read-only (shared by every caller)."""

    tail_template: np.ndarray  # (max_frames, D) float32: the mean state at each window position after the speech
    tail_count: np.ndarray  # (max_frames,) int64: utterances that contributed to each position
    mean: np.ndarray  # (D,) float32 over every speech frame
    std: np.ndarray  # (D,) float32, floored at STD_FLOOR

    def __post_init__(self) -> None:
        for array in self.arrays().values():
            array.flags.writeable = False

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name, as the cache stores them."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


CACHE_ARRAYS = tuple(field.name for field in dataclasses.fields(Reduction))


def reduce_shards(root: zarr.Group, url: str, teacher: TeacherInfo, shards: dict[int, dict[str, Any]]) -> Reduction:
    """The reduction of `shards` (the complete shards' attrs by index): the cached one for exactly this
    shard set, else computed from the shards' sums and cached."""
    if not shards:
        raise StoreError(f"store {url} has no complete shards yet: there is no tail template or statistics")
    key = cache_key(shards)
    reduction, damaged = read_cache(root, url, teacher, key)
    if reduction is None:
        reduction = compute_reduction(root, url, teacher, sorted(shards))
        write_cache(root, url, key, reduction, sorted(shards), damaged)
    return reduction


def cache_key(shards: dict[int, dict[str, Any]]) -> str:
    """A hash of the shard set: each complete shard's index and identity (its `write_id`; shards written before
    format 1.1 have none: their counts and write time instead)."""
    listed = [
        [k, shards[k].get("write_id") or [shards[k]["n"], shards[k]["n_frames"], shards[k].get("written_at")]]
        for k in sorted(shards)
    ]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16]


def sum_shapes(teacher: TeacherInfo) -> dict[str, tuple[int, ...]]:
    """The shape of each of a shard's sums (SUM_ARRAYS)."""
    return {
        "tail_sum": (teacher.max_frames, teacher.d_model),
        "tail_count": (teacher.max_frames,),
        "stat_sum": (teacher.d_model,),
        "stat_sqsum": (teacher.d_model,),
        "stat_count": (1,),
    }


def shard_sums(root: zarr.Group, url: str, teacher: TeacherInfo, shard: int) -> tuple[np.ndarray, ...]:
    """A shard's tail_sum, tail_count, stat_sum, stat_sqsum and stat_count, each checked (crc32c where the shard
    has them, shape always); DamagedShardError names the array that is not whole."""
    group_path = f"{SHARDS_GROUP}/{shard_name(shard)}"
    try:
        group = root[group_path]
        missing = missing_objects(root.store, group, group_path, SUM_ARRAYS)
    except Exception as err:
        raise DamagedShardError(url, shard, f"its sums are unreadable ({type(err).__name__}: {err})") from err
    if missing:
        raise DamagedShardError(url, shard, f"objects missing from the store: {', '.join(missing)}")
    out = []
    for name, shape in sum_shapes(teacher).items():
        try:
            values = group[name][...]
        except Exception as err:
            raise DamagedShardError(url, shard, array_damage(name, err)) from err
        if values.shape != shape:
            raise DamagedShardError(url, shard, f"{name} has shape {values.shape}, expected {shape}")
        out.append(values)
    return tuple(out)


def compute_reduction(root: zarr.Group, url: str, teacher: TeacherInfo, shards: list[int]) -> Reduction:
    """The tail template and statistics (see StoreReader.tail_template) from the sums of `shards`, added in
    shard order (reproducible)."""
    tail_sum = np.zeros((teacher.max_frames, teacher.d_model), np.float64)  # (M, D)
    tail_count = np.zeros(teacher.max_frames, np.int64)  # (M,)
    stat_sum = np.zeros(teacher.d_model, np.float64)  # (D,)
    stat_sqsum = np.zeros(teacher.d_model, np.float64)  # (D,)
    stat_count = 0
    with ThreadPoolExecutor(REDUCE_THREADS) as pool:
        for sums in pool.map(lambda shard: shard_sums(root, url, teacher, shard), shards):  # in shard order
            tail_sum += sums[0]
            tail_count += sums[1]
            stat_sum += sums[2]
            stat_sqsum += sums[3]
            stat_count += int(sums[4][0])
    if stat_count == 0:
        raise StoreError(f"store {url} has complete shards but no utterances: nothing to reduce")
    mean = stat_sum / stat_count  # (D,)
    std = np.sqrt(np.maximum(stat_sqsum / stat_count - mean**2, 0.0))  # (D,)
    seen = tail_count > 0
    template = np.empty_like(tail_sum)  # (M, D)
    template[seen] = tail_sum[seen] / tail_count[seen, None]
    if seen.any():
        # Counts only grow with p (an utterance contributes to every p >= its end), so unseen
        # positions form a prefix; each takes the first seen position after it.
        first_seen = int(np.argmax(seen))
        template[~seen] = template[first_seen]
    else:
        template[:] = mean
    return Reduction(
        tail_template=template.astype(np.float32),
        tail_count=tail_count,
        mean=mean.astype(np.float32),
        std=np.maximum(std, STD_FLOOR).astype(np.float32),
    )


def read_cache(root: zarr.Group, url: str, teacher: TeacherInfo, key: str) -> tuple[Reduction | None, list[str]]:
    """A complete, whole cache entry for `key`, or None (then the caller computes the reduction); and the names
    of the entries for `key` found damaged (each named in a WARNING: the caller replaces them)."""
    try:
        entries = list(root[CACHE_GROUP].groups())
    except (KeyError, ValueError, TypeError):  # no cache yet, or an entry whose write was cut short
        return None, []
    damaged = []
    for name, group in entries:
        try:
            if name.split(".")[0] != key or group.attrs.get("complete") is not True:
                continue
            if missing_objects(root.store, group, f"{CACHE_GROUP}/{name}", CACHE_ARRAYS):
                continue  # being deleted by another reader: zarr would read zeros
            arrays = {array: group[array] for array in CACHE_ARRAYS}
        except Exception as err:  # replaced while we read it
            log.debug("cache entry %s of %s unusable: %s", name, url, err)
            continue
        values, problems = read_cache_arrays(arrays, teacher)
        if not problems:
            return Reduction(**values), damaged
        log.warning(
            "the cached tail template and statistics %s/%s/%s are damaged (%s): not used; recomputing them "
            "from the shards' sums",
            url,
            CACHE_GROUP,
            name,
            "; ".join(problems),
        )
        damaged.append(name)
    return None, damaged


def read_cache_arrays(arrays: dict[str, zarr.Array], teacher: TeacherInfo) -> tuple[dict[str, np.ndarray], list[str]]:
    """A cache entry's arrays read (each checked against its crc32c) and what makes them untrustworthy (empty
    when whole: checksummed, of the teacher's shapes, finite)."""
    shapes = {
        "tail_template": (teacher.max_frames, teacher.d_model),
        "tail_count": (teacher.max_frames,),
        "mean": (teacher.d_model,),
        "std": (teacher.d_model,),
    }
    values, problems = {}, []
    for name, array in arrays.items():
        if not is_checked(array):
            problems.append(f"{name} has no crc32c checksum (written before format 1.1)")
            continue
        try:
            values[name] = array[...]
        except Exception as err:
            problems.append(array_damage(name, err))
            continue
        if values[name].shape != shapes[name]:
            problems.append(f"{name} has shape {values[name].shape}, expected {shapes[name]}")
        elif not np.isfinite(values[name]).all():
            problems.append(f"{name} has non-finite values")
    return values, problems


def write_cache(
    root: zarr.Group, url: str, key: str, reduction: Reduction, shards: list[int], damaged: list[str]
) -> None:
    """Keep the reduction in the store for the next reader; a read-only store just goes without.

    Every writer makes its own entry `<key>.<random>` and marks it complete last, so ranks that
    open the store at the same moment never write into each other's entry. Entries for other
    shard sets are stale and deleted, and so are the `damaged` entries for this one.
    """
    try:
        writable = root.store.with_read_only(False)
        cache = zarr.open_group(writable, path=CACHE_GROUP, mode="a")
        for stale in list(cache.group_keys()):
            if stale.split(".")[0] != key or stale in damaged:
                run_sync(writable.delete_dir(f"{CACHE_GROUP}/{stale}"))
        group = cache.create_group(f"{key}.{uuid.uuid4().hex[:8]}", attributes={"complete": False})
        for name, array in reduction.arrays().items():
            group.create_array(
                name,
                data=array,
                chunks=array.shape,
                compressors=checked_compressors(),
                config={"write_empty_chunks": True},
            )
        group.update_attributes({"complete": True, "shards": shards, **version_stamp("written")})
    except Exception as err:
        log.info("could not cache the tail template in %s (%s); it is recomputed next time", url, err)
