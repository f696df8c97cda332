"""precompute: audio -> frozen Whisper encoder -> feature store.

The GPU is the cost, so nothing else may hold it up:

    DataLoader workers         main process (one per GPU)              writer threads
    (audio_batches)            (this module)                           (background_writer)
    decode (soundfile)   ──►   log-mel + encoder on the device   ──►   ShardWriter.add / close
    resample (soxr)            float16, non-blocking copy to           (stats, compression, writes;
    augment, pad to the        pinned host memory, one batch of        bounded queues hold the
    longest clip (pinned)      lag before the host touches it          encoder back if they fall behind)

In speech mode only the speech frames cross to the host: the frames after the speech (what the
store's tail template is summed from) and the speech frames' per-channel statistics are summed over
the batch where the encoder ran (per shard, float32, each window checked for inf/nan there too) and
handed to the shard writer as one set of sums (ShardWriter.add_sums). That takes the sums and the
whole-window copies off the writer threads (most of their work per clip) and shrinks the host copy
to the speech frames. In full mode the whole float16 windows cross (3.8 MB per clip for large-v3).

Shard k holds source rows [k*S, (k+1)*S) and belongs to process k % W, so `accelerate launch` /
`torchrun` on any number of GPUs (or gloo CPU processes) write one store with no coordination but
one barrier at the start (rank 0 creates or overwrites the store) and one at the end (the run
record). Complete shards are skipped on a rerun and incomplete ones redone: resume is free.
With precompute.claim = "dynamic" on a store with shard locks (StoreWriter.locks: a local or
lock-capable file system), a process that has written its own shards goes on to the other processes'
shards from the end (their owners go from the start), taking each that no one has claimed: the
run ends when the work does, not when its slowest process does. Object stores keep the static split.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from torch.utils.data import DataLoader

from stages.audio_batches import ClipDataset, collate, quiet_worker
from stages.background_writer import BackgroundWriter
from stages.precompute_device import InFlight, compile_layers, launch
from stages.precompute_result import PrecomputeResult, RankStats, combined_result
from store import ShardRecord, StoreReader, StoreSpec, StoreWriter, TeacherInfo
from whistle_pipeline import preflight
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.progress import progress_bar
from whistle_pipeline.sources import Source, SourceReject, open_source
from whistle_pipeline.teacher import (
    TeacherGeometry,
    load_teacher,
    non_finite_reason,
    speech_frames,
)

log = logging.getLogger(__name__)

RECORD_NAME = "precompute.json"
END_OF_RUN_TIMEOUT = datetime.timedelta(days=7)  # how long finished processes wait for the last one


# --- the shards' batches ------------------------------------------------------------------------


def shard_order(rank: int, world: int, n_shards: int, complete: set[int], dynamic: bool) -> list[int]:
    """The shards process `rank` of `world` tries to claim, in order: its own (k % world == rank) that are not
    complete, then with `dynamic` claiming the other processes' from the end (their owners go from the start)."""
    order = [k for k in range(rank, n_shards, world) if k not in complete]
    if dynamic and world > 1:
        order += [k for k in reversed(range(n_shards)) if k % world != rank and k not in complete]
    return order


@dataclass
class _Claims:
    """What the loader met as it claimed the shards (see _batches)."""

    own: set[int]  # this process's static share: shards k with k % W == its rank
    rows: int = 0  # source rows of the shards it claimed
    busy: list[int] = field(default_factory=list)  # of its own shards, those another process had claimed
    taken_over: list[int] = field(default_factory=list)  # of the other processes' shares, those it claimed


def _batches(
    store: StoreWriter, shards: list[range], shard_size: int, batch_size: int, claims: _Claims
) -> Iterator[list[int]]:
    """Batches within each shard, so a shard's clips are batched alike whichever process runs it and
    whether or not the run is resumed (identical inputs -> identical states). Each shard is claimed
    when the loader reaches it; one another live process is writing (or has completed since) is skipped,
    so two runs started on one store share the work instead of corrupting it, and a process that has run
    out of its own shards takes the ones of slower processes that nobody has started (dynamic claiming)."""
    for rows in shards:
        shard = rows.start // shard_size
        if not store.claim(shard):
            if shard in claims.own:
                claims.busy.append(shard)
            continue
        claims.rows += len(rows)
        if shard not in claims.own:
            claims.taken_over.append(shard)
        yield from (list(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))


# --- the run -------------------------------------------------------------------------------------------


def _state(config: PipelineConfig) -> PartialState:
    # without cpu=True, accelerate treats a torchrun/accelerate launch without GPUs as one process
    return PartialState(cpu=config.teacher.device == "cpu" or not torch.cuda.is_available())


def _device(config: PipelineConfig, state) -> torch.device:
    if config.teacher.device == "auto":
        return state.device
    device = torch.device(config.teacher.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WhistleError(f"teacher.device = {config.teacher.device!r} but CUDA is not available: use auto or cpu")
    return device


def _spec(config: PipelineConfig, teacher: TeacherInfo, source: Source) -> StoreSpec:
    store = config.store
    return StoreSpec(
        teacher=teacher,
        frames=store.frames,
        speech_margin_frames=store.speech_margin_frames,
        shard_size=store.shard_size,
        chunk_frames=store.chunk_frames,
        codec=store.codec,
        compression_level=store.compression_level,
        bitround_keepbits=store.bitround_keepbits,
        dataset_fingerprint=source.fingerprint,
        augment=config.precompute.augment,
    )


def _open_store(config: PipelineConfig, spec: StoreSpec, state) -> StoreWriter:
    """Rank 0 creates (or with overwrite, replaces) the store before anyone else opens it. StoreWriter.open
    refuses a store of other teacher encoder weights (another fingerprint: a replaced teacher folder)."""
    writer = None
    if state.is_main_process:
        writer = StoreWriter.open(config.store.path, spec, overwrite=config.precompute.overwrite)
        if not writer.spec.teacher.encoder_fingerprint:
            log.warning(
                "store %s records no fingerprint of its teacher's encoder weights (written before whistle "
                "kept one): whether %r has the weights that made its shards cannot be checked",
                writer.url,
                config.teacher.name_or_path,
            )
    state.wait_for_everyone()
    return writer or StoreWriter.open(config.store.path, spec)


def _end_group(state):
    """A gloo group for the end-of-run gather: processes may finish hours apart (a slow disk, one shard
    more), far beyond NCCL's collective timeout, and waiting there must never fail a finished run."""
    if state.num_processes == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=END_OF_RUN_TIMEOUT)


def _gather(stats: RankStats, group) -> list[RankStats]:
    """Every process's stats, on every process (the one wait of the run: for the last process to finish)."""
    if group is None:
        return [stats]
    gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, dataclasses.asdict(stats), group=group)
    return [RankStats(**values) for values in gathered]


def run(config: PipelineConfig) -> PrecomputeResult:
    """Encode every row of config.data into the store at config.store.path; see the module docstring.

    Raises WhistleError for unusable input or configuration, and — after everything is written and
    recorded — when precompute.strict is set and the store holds rejected clips.
    """
    preflight.precompute(config)
    started = time.perf_counter()
    state = _state(config)
    end_group = _end_group(state)
    device = _device(config, state)
    with state.main_process_first():  # one process downloads from the hub; the others read its cache
        source = open_source(config.data)
        if not len(source):
            raise WhistleError(
                f"{source.describe()}: nothing to precompute. Check data.path, data.split/subset and data.max_clips."
            )
        teacher = load_teacher(
            config.teacher.name_or_path,
            config.teacher.revision,
            "encoder",
            device,
            config.teacher.dtype,
            config.teacher.attn_implementation,
        )
        encoder, geometry = teacher.model, teacher.geometry
    if config.precompute.compile:
        compile_layers(encoder)
    if state.is_main_process:
        used = {name: dataclasses.asdict(getattr(config, name)) for name in ("teacher", "data", "store", "precompute")}
        log.info("resolved configuration: %s", json.dumps(used))
        log.info("source: %s, fingerprint %s", source.describe(), source.fingerprint)
    spec = _spec(config, teacher.info, source)
    store = _open_store(config, spec, state)

    shard_size = config.store.shard_size
    n_shards = math.ceil(len(source) / shard_size)
    complete = store.complete_shards()
    rank, world = state.process_index, state.num_processes
    mine = range(rank, n_shards, world)
    dynamic = config.precompute.claim == "dynamic" and store.locks
    todo = shard_order(rank, world, n_shards, complete, dynamic)
    claims = _Claims(own={k for k in todo if k % world == rank})
    stats = RankStats(rank=rank, shards_skipped=len(mine) - len(claims.own))
    if stats.shards_skipped:
        log.info("rank %d: %d of its %d shards are complete and kept", rank, stats.shards_skipped, len(mine))
    shards = [range(k * shard_size, min((k + 1) * shard_size, len(source))) for k in todo]

    records = _encode_rows(
        config, source, encoder, geometry, store, device, shards, stats, claims, state.is_main_process
    )
    stats.shards_written = len(records)
    stats.nbytes = sum(record.nbytes for record in records)
    stats.seconds = time.perf_counter() - started

    everyone = _gather(stats, end_group)
    reader = StoreReader(store.url)
    store_rejects = sum(len(reader.shard_attrs(k).get("rejects", [])) for k in reader.shards())
    result = combined_result(
        config, source, spec, device, encoder.dtype, everyone, n_shards, len(reader), store_rejects, state.process_index
    )
    if state.is_main_process:
        store.write_record(
            RECORD_NAME,
            {
                **result.to_dict(),
                "source": {**source.identity, "fingerprint": source.fingerprint},
                "teacher": spec.teacher.to_dict(),
                "config": config.to_dict(),
                "config_toml": config.to_toml(),
            },
        )
    if config.precompute.strict and store_rejects:
        raise WhistleError(
            f"precompute.strict: {store_rejects} clip(s) were rejected (by kind this run: {result.rejects}); "
            f"everything else is stored in {store.url}. The reasons are listed per shard: "
            f"`whistle inspect-store {store.url}`. Fix or drop those rows, or run without --strict."
        )
    return result


def _encode_rows(
    config: PipelineConfig,
    source: Source,
    encoder,
    geometry: TeacherGeometry,
    store: StoreWriter,
    device: torch.device,
    shards: list[range],
    stats: RankStats,
    claims: _Claims,
    main: bool,
) -> list[ShardRecord]:
    """Encode the rows of the `shards` this process claims and hand them to the writer threads; the records of
    the shards written."""
    if not shards:
        return []
    options = config.precompute
    shard_size = config.store.shard_size
    loader = _loader(config, source, geometry, store, shards, device, claims)
    writer = BackgroundWriter(store, options.write_threads, options.write_queue)
    own_rows = sum(len(rows) for rows in shards if rows.start // shard_size in claims.own)
    progress = _progress(own_rows, enabled=main and options.progress)
    deliver = _Delivery(writer, stats, geometry, config, shards, progress, encoder.dtype)
    speech = None if deliver.full else (deliver.margin, shard_size)
    copies = torch.cuda.Stream(device) if device.type == "cuda" else None
    in_flight: InFlight | None = None
    began = time.perf_counter()
    try:
        waited = began
        for batch in loader:
            stats.input_wait_seconds += time.perf_counter() - waited
            current = launch(batch, encoder, geometry, device, speech, copies)
            if in_flight is not None:
                deliver(in_flight)  # overlaps the copy (and on GPU the encoder) of `current`
            in_flight = current
            waited = time.perf_counter()
        if in_flight is not None:
            deliver(in_flight)
        records = writer.finish()
        stats.pipeline_seconds = time.perf_counter() - began
        stats.write_wait_seconds = writer.wait_seconds
        if claims.busy:
            sharing = any(rows.start // shard_size not in claims.own for rows in shards)  # dynamic claiming
            log.log(
                logging.INFO if sharing else logging.WARNING,
                "%d of this process's shard(s) were claimed by another process (%s) and were left to it: %s",
                len(claims.busy),
                "a faster one of this run, or another run on this store" if sharing else "another run on this store",
                ", ".join(map(str, claims.busy[:10])) + (", ..." if len(claims.busy) > 10 else ""),
            )
        stats.shards_busy, stats.shards_taken_over = len(claims.busy), len(claims.taken_over)
        stats.rows = claims.rows
    except BaseException:
        writer.abandon()
        raise
    finally:
        progress.close()
    return records


def _loader(
    config: PipelineConfig,
    source: Source,
    geometry: TeacherGeometry,
    store: StoreWriter,
    shards: list[range],
    device: torch.device,
    claims: _Claims,
) -> DataLoader:
    """Batches of decoded, padded clips from DataLoader workers (shards claimed as the loader reaches them)."""
    options = config.precompute
    workers = options.num_workers
    return DataLoader(
        ClipDataset(source, geometry, options.augment),
        batch_sampler=_batches(store, shards, config.store.shard_size, options.batch_size, claims),
        num_workers=workers,
        prefetch_factor=options.prefetch_factor if workers else None,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=quiet_worker if workers else None,
    )


class _Delivery:
    """Hands each finished batch to the writer threads (rows in order), closing each shard at its last row."""

    def __init__(
        self,
        writer: BackgroundWriter,
        stats: RankStats,
        geometry: TeacherGeometry,
        config: PipelineConfig,
        shards: list[range],
        progress: Any,
        dtype: torch.dtype,
    ):
        self.writer, self.stats, self.geometry, self.progress = writer, stats, geometry, progress
        self.dtype = dtype
        self.began = time.perf_counter()
        self.shard_size = config.store.shard_size
        self.margin, self.full = config.store.speech_margin_frames, config.store.frames == "full"
        self.left = {rows.start // self.shard_size: len(rows) for rows in shards}  # rows each shard still waits for

    def __call__(self, flight: InFlight) -> None:
        writer, stats, geometry = self.writer, self.stats, self.geometry
        if flight.copied is not None:
            flight.copied.synchronize()
        states = flight.states.numpy() if flight.states is not None else None  # (B, F, D) float16
        finite = flight.finite.numpy() if flight.finite is not None else None  # (B,); None: no clip in the batch
        for shard, sums in flight.sums.items():  # before the shard's close, which checks them
            writer.add_sums(shard, **{name: values.numpy() for name, values in sums.items()})
        done = [(reject.row, reject) for reject in flight.batch.rejects]
        done += [(clip.row, (i, clip)) for i, clip in enumerate(flight.batch.clips)]
        for row, item in sorted(done, key=lambda pair: pair[0]):
            shard = row // self.shard_size
            if isinstance(item, SourceReject):
                writer.reject(shard, item.id, item.reason)
                stats.count_reject(item.reason)
            else:
                i, clip = item
                n_samples = flight.batch.n_samples[i]
                frames = speech_frames(n_samples, geometry, self.margin)
                duration = n_samples / geometry.sample_rate
                if not finite[i]:  # left out of the sums on the device
                    reason = non_finite_reason(self.dtype, flight.batch.audio[i].abs().max().item())
                    writer.reject(shard, clip.id, reason)
                    stats.count_reject(reason)
                else:
                    window = states[i]  # (F, D)
                    writer.add(
                        shard,
                        id=clip.id,
                        text=clip.text,
                        language=clip.language,
                        duration_s=duration,
                        states=window if self.full else window[:frames],
                        speech_frames=frames,
                        summed=not self.full,
                    )
                    stats.clips += 1
                    stats.audio_seconds += duration
            self.left[shard] -= 1
            if self.left[shard] == 0:
                writer.close(shard)
        self.progress.update(len(done))
        elapsed = time.perf_counter() - self.began
        self.progress.set_postfix_str(f"{stats.audio_seconds / elapsed:.0f} audio-h/h", refresh=False)


def _progress(total: int, enabled: bool) -> Any:
    return progress_bar(total, "precompute", "clip", enabled, dynamic_ncols=True, smoothing=0.05)
