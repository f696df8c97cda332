"""What a store holds, how big it is, and (with check=True) whether every complete shard is whole.

`inspect_store(url)` reads only metadata (root and shard attributes, object sizes), so it is fast
on any store; `inspect_store(url, check=True)` also reads every array of every complete shard in
full (each checked against its crc32c) and every cache entry, and lists what is wrong with each, as
`Fault(shard, problem)` records (`shard` "cache" for the cache). Shards written before format 1.1
have no checksums on their small arrays: they are listed as not verifiable, a warning, not a fault.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.common import concurrent_map

from store.format import (
    CACHE_GROUP,
    FORMAT_MINOR,
    SHARDS_GROUP,
    DamagedShardError,
    StoreError,
    missing_objects,
    run_sync,
    shard_name,
)
from store.reader import READ_BLOCK_BYTES, StoreReader
from store.reduction import (
    CACHE_ARRAYS,
    cache_key,
    compute_reduction,
    read_cache_arrays,
    shard_sums,
)

SUM_RTOL = 1e-7  # stored float64 sums vs a recomputation in another order


@dataclass(frozen=True)
class Fault:
    """One problem found in one shard (`shard` is its folder name, e.g. "00003"), or in the cache ("cache")."""

    shard: str
    problem: str


@dataclass
class StoreReport:
    """The numbers `whistle inspect-store` prints; `to_dict()` is its --json form."""

    url: str
    format: int
    teacher: dict[str, Any]
    frame_policy: str
    speech_margin_frames: int
    codec: str
    compression_level: int
    bitround_keepbits: int
    chunk_frames: int
    shard_size: int
    dataset_fingerprint: str
    augment: str
    created_by: str
    updated_by: str
    utterances: int
    audio_seconds: float
    frames: int  # stored frames (rows of states) in complete shards
    bytes_on_disk: int  # everything under the store root
    states_bytes: int  # the states arrays of complete shards, as stored
    raw_fp16_bytes: int  # frames x d_model x 2
    full_window_fp16_bytes: int  # utterances x max_frames x d_model x 2
    complete_shards: int
    incomplete_shards: list[str]
    rejects: dict[str, int]  # by kind (the reason's text before its first ':')
    checked: bool
    faults: list[Fault] = field(default_factory=list)
    unverifiable: dict[str, list[str]] = field(default_factory=dict)  # written_by -> complete format 1.0 shards

    @property
    def ok(self) -> bool:
        return not self.faults

    @property
    def compression_ratio(self) -> float | None:
        """raw fp16 bytes / stored bytes of the states."""
        return self.raw_fp16_bytes / self.states_bytes if self.states_bytes else None

    @property
    def trimming_ratio(self) -> float | None:
        """full-window fp16 bytes / raw fp16 bytes (what keeping speech frames only saves)."""
        return self.full_window_fp16_bytes / self.raw_fp16_bytes if self.raw_fp16_bytes else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["incomplete_shard_names"] = out.pop("incomplete_shards")
        out["incomplete_shards"] = len(self.incomplete_shards)
        out["audio_hours"] = self.audio_seconds / 3600
        out["n_rejects"] = sum(self.rejects.values())
        out["compression_ratio"] = self.compression_ratio
        out["trimming_ratio"] = self.trimming_ratio
        out["ok"] = self.ok
        return out

    def to_text(self) -> str:
        t = self.teacher
        policy = "speech frames + tail template" if self.frame_policy == "speech" else "full windows"
        lossy = f", lossy BitRound {self.bitround_keepbits} mantissa bits" if self.bitround_keepbits else ", lossless"
        level = f" level {self.compression_level}" if self.codec != "none" else ""
        per_utt = self.frames / self.utterances if self.utterances else 0.0
        rejects = sum(self.rejects.values())
        lines = [
            f"whistle store {self.url}",
            f"  format       {self.format} ({policy}, margin {self.speech_margin_frames} frames)",
            (
                f"  teacher      {t['name_or_path']} @ {t['revision']}: d_model {t['d_model']}, {t['n_mels']} mels, "
                f"{t['max_frames']} frames per window ({t['frames_per_second']}/s)"
            ),
            f"  shards       {self.complete_shards} complete, {len(self.incomplete_shards)} incomplete"
            + (
                f" ({', '.join(self.incomplete_shards[:8])}{', ...' if len(self.incomplete_shards) > 8 else ''})"
                if self.incomplete_shards
                else ""
            )
            + f"; {self.shard_size} source rows per shard",
            f"  utterances   {self.utterances:,} ({self.audio_seconds / 3600:.2f} h of audio)",
            f"  frames       {self.frames:,} ({per_utt:.1f} per utterance)",
            f"  rejects      {rejects:,}"
            + (
                ": "
                + ", ".join(f"{kind} {count:,}" for kind, count in sorted(self.rejects.items(), key=lambda kv: -kv[1]))
                if rejects
                else ""
            ),
            f"  on disk      {_size(self.bytes_on_disk)} ({_size(self.states_bytes)} of states)",
            f"  raw fp16     {_size(self.raw_fp16_bytes)} (compression {_ratio(self.compression_ratio)})",
            (
                f"  full window  {_size(self.full_window_fp16_bytes)} as fp16 (trimming {_ratio(self.trimming_ratio)}; "
                f"overall {_ratio(self.full_window_fp16_bytes / self.bytes_on_disk if self.bytes_on_disk else None)})"
            ),
            f"  codec        {self.codec}{level}{lossy}; chunks of {self.chunk_frames} frames",
            f"  dataset      fingerprint {self.dataset_fingerprint}, augment {self.augment}",
            f"  written by   {self.created_by} (last opened by {self.updated_by})",
        ]
        for written_by, names in self.unverifiable.items():
            lines.append(
                f"  warning      not verifiable: {len(names)} shard(s) written by {written_by} < format 1.1 "
                f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}): only their states carry "
                "checksums, the other arrays are read unchecked. Delete them and rerun `whistle precompute` "
                "on this store to make them verifiable"
            )
        if self.checked:
            if self.ok:
                lines.append(f"  check        ok: {self.complete_shards} complete shards read in full, no faults")
            else:
                lines.append(f"  check        {len(self.faults)} FAULT(S):")
                lines += [
                    f"    {'shard ' if fault.shard.isdigit() else ''}{fault.shard}: {fault.problem}"
                    for fault in self.faults
                ]
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:,} B" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def reject_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "unspecified"


def inspect_store(url: str | os.PathLike | Store, check: bool = False) -> StoreReport:
    """Summarise a store; with `check`, read every complete shard and list its faults."""
    reader = StoreReader(url)
    spec, teacher = reader.spec, reader.spec.teacher
    store = reader.store
    complete = reader.shards()
    attrs = {k: reader.shard_attrs(k) for k in complete}
    utterances = sum(a["n"] for a in attrs.values())
    frames = sum(a["n_frames"] for a in attrs.values())
    rejects: dict[str, int] = {}
    for a in attrs.values():
        for reject in a.get("rejects", []):
            kind = reject_kind(reject.get("reason", ""))
            rejects[kind] = rejects.get(kind, 0) + 1
    sizes = run_sync(_object_sizes(store))  # one listing of the whole store
    states_prefixes = tuple(f"{SHARDS_GROUP}/{shard_name(k)}/states/" for k in complete)
    report = StoreReport(
        url=reader.url,
        format=reader.attrs["format"],
        teacher=teacher.to_dict(),
        frame_policy=spec.frames,
        speech_margin_frames=spec.speech_margin_frames,
        codec=spec.codec,
        compression_level=spec.compression_level,
        bitround_keepbits=spec.bitround_keepbits,
        chunk_frames=spec.chunk_frames,
        shard_size=spec.shard_size,
        dataset_fingerprint=spec.dataset_fingerprint,
        augment=spec.augment,
        created_by=reader.attrs.get("created_by", "unknown"),
        updated_by=reader.attrs.get("updated_by", "unknown"),
        utterances=utterances,
        audio_seconds=sum(a["audio_seconds"] for a in attrs.values()),
        frames=frames,
        bytes_on_disk=sum(sizes.values()),
        states_bytes=sum(size for key, size in sizes.items() if key.startswith(states_prefixes)),
        raw_fp16_bytes=frames * teacher.d_model * 2,
        full_window_fp16_bytes=utterances * teacher.max_frames * teacher.d_model * 2,
        complete_shards=len(complete),
        incomplete_shards=[shard_name(k) for k in reader.incomplete_shards()],
        rejects=rejects,
        checked=check,
    )
    for shard in complete:
        if attrs[shard].get("format_minor", 0) < FORMAT_MINOR:
            report.unverifiable.setdefault(attrs[shard].get("written_by", "unknown"), []).append(shard_name(shard))
    if check:
        first_seen: dict[str, int] = {}
        for shard in complete:
            report.faults += [Fault(shard_name(shard), problem) for problem in check_shard(reader, shard, first_seen)]
        report.faults += [Fault("cache", problem) for problem in check_cache(reader)]
        for shard in reader.incomplete_shards():
            unreadable = reader.shard_attrs(shard).get("unreadable")
            if unreadable:
                report.faults.append(
                    Fault(
                        shard_name(shard),
                        f"{unreadable}: it counts as incomplete, and the next precompute run on this store rewrites it",
                    )
                )
    return report


async def _object_sizes(store: Store) -> dict[str, int]:
    """Size of every object in the store, by key (sizes fetched concurrently, as zarr does)."""
    keys = [key async for key in store.list_prefix("")]
    sizes = await concurrent_map([(key,) for key in keys], store.getsize, limit=zarr.config.get("async.concurrency"))
    return dict(zip(keys, sizes))


def check_shard(reader: StoreReader, shard: int, first_seen: dict[str, int]) -> list[str]:
    """Every problem of one complete shard, reading all of it; `first_seen` tracks ids across shards."""
    try:
        index = reader.index(shard)  # objects present, offsets, shapes, dtype, counts vs attrs
    except DamagedShardError as err:
        return [err.detail]
    spec, teacher = reader.spec, reader.spec.teacher
    attrs = reader.shard_attrs(shard)
    problems = []
    duplicates = [utt_id for utt_id in index.ids if first_seen.setdefault(utt_id, shard) != shard]
    if len(set(index.ids)) != len(index.ids) or duplicates:
        problems.append(
            f"{len(index.ids) - len(set(index.ids)) + len(duplicates)} duplicate utterance id(s), "
            f"e.g. {(duplicates or index.ids)[0]!r}"
        )
    audio_seconds = float(np.sum(index.durations, dtype=np.float64))
    if not np.isclose(audio_seconds, attrs.get("audio_seconds", -1.0), rtol=1e-6):
        problems.append(f"durations sum to {audio_seconds:.3f} s, attrs say {attrs.get('audio_seconds')}")
    try:
        _, tail_count, stat_sum, stat_sqsum, stat_count = shard_sums(reader.root, reader.url, teacher, shard)
    except DamagedShardError as err:
        return problems + [err.detail]
    speech_frames = index.speech_frames.astype(np.int64)  # (n,)
    ends = np.bincount(speech_frames, minlength=teacher.max_frames + 1)[: teacher.max_frames]
    if not np.array_equal(tail_count, np.cumsum(ends)):
        problems.append("tail_sum/tail_count do not match the utterances' speech_frames")
    if int(stat_count[0]) != int(speech_frames.sum()):
        problems.append(f"stat_count {int(stat_count[0])} != {int(speech_frames.sum())} speech frames")
    try:
        recomputed_sum, recomputed_sqsum, nonfinite = _speech_sums(reader, shard, index, spec.frames == "speech")
    except DamagedShardError as err:
        return problems + [err.detail]
    if nonfinite:
        problems.append(f"{nonfinite} non-finite values in states")
    elif not (_close(stat_sum, recomputed_sum) and _close(stat_sqsum, recomputed_sqsum)):
        problems.append("stat_sum/stat_sqsum differ from the stored speech frames")
    return problems


def check_cache(reader: StoreReader) -> list[str]:
    """Every problem of the cache's complete entries, reading all of them (each array against its crc32c); the
    entry for the current shards must also equal the reduction of their sums. A damaged entry is never used:
    the next reader recomputes and replaces it."""
    repair = f"readers do not use it (they recompute it); delete {reader.url}/{CACHE_GROUP} to remove it"
    try:
        entries = list(reader.root[CACHE_GROUP].groups())
    except KeyError:
        return []
    except (ValueError, TypeError) as err:
        return [f"an entry's zarr.json is damaged ({err}); {repair}"]
    complete = {k: reader.shard_attrs(k) for k in reader.shards()}
    key = cache_key(complete) if complete else None
    problems = []
    for name, group in entries:
        if group.attrs.get("complete") is not True:
            continue  # being written, or left by a reader that was stopped: never read
        path = f"{CACHE_GROUP}/{name}"
        missing = missing_objects(reader.store, group, path, CACHE_ARRAYS)
        if missing:
            problems.append(f"entry {name}: objects missing from the store: {', '.join(missing)}; {repair}")
            continue
        values, damage = read_cache_arrays({array: group[array] for array in CACHE_ARRAYS}, reader.spec.teacher)
        if not damage and name.split(".")[0] == key:
            damage = _cache_differences(reader, complete, values)
        problems += [f"entry {name}: {problem}; {repair}" for problem in damage]
    return problems


def _cache_differences(reader: StoreReader, complete: dict[int, Any], cached: dict[str, np.ndarray]) -> list[str]:
    """The cached arrays that differ from the reduction of the complete shards' sums (shard faults say why)."""
    try:
        expected = compute_reduction(reader.root, reader.url, reader.spec.teacher, sorted(complete)).arrays()
    except (DamagedShardError, StoreError):  # a shard's sums are damaged: check_shard names it
        return []
    return [
        f"{name} differs from the reduction of the shards' sums"
        for name, values in expected.items()
        if not np.allclose(cached[name], values, rtol=SUM_RTOL, atol=0)
    ]


def _speech_sums(
    reader: StoreReader, shard: int, index: Any, all_rows_speech: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel float64 sums and sums of squares over the speech rows, and the non-finite count."""
    d_model = reader.spec.teacher.d_model
    n_rows = int(index.offsets[-1])
    chunk = index.states.chunks[0]
    block_rows = max(chunk, READ_BLOCK_BYTES // (2 * d_model) // chunk * chunk)
    total, total_sq, nonfinite = np.zeros(d_model), np.zeros(d_model), 0
    for start in range(0, n_rows, block_rows):
        block = reader.read_rows(shard, start, min(n_rows, start + block_rows)).astype(np.float64)  # (B, D)
        nonfinite += int((~np.isfinite(block)).sum())
        if not all_rows_speech:
            rows = np.arange(start, start + len(block))
            owner = np.searchsorted(index.offsets, rows, side="right") - 1  # utterance of each row
            block = block[rows - index.offsets[owner] < index.speech_frames[owner]]
        total += block.sum(axis=0)
        total_sq += np.einsum("td,td->d", block, block)
    return total, total_sq, nonfinite


def _close(stored: np.ndarray, recomputed: np.ndarray) -> bool:
    scale = max(1.0, float(np.abs(recomputed).max(initial=0.0)))
    return stored.shape == recomputed.shape and bool(
        np.allclose(stored, recomputed, rtol=SUM_RTOL, atol=SUM_RTOL * scale)
    )
