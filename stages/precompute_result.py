"""precompute's result: what each process did (RankStats) and the run's summary (PrecomputeResult)."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from whistle_pipeline.teacher import bf16_hint


@dataclass
class RankStats:
    """What one process did."""

    rank: int
    rows: int = 0
    clips: int = 0
    audio_seconds: float = 0.0
    rejects: dict[str, int] = field(default_factory=dict)  # by kind (the reason up to its first colon)
    shards_written: int = 0
    shards_skipped: int = 0
    shards_busy: int = 0  # of its own share, left to another process that had claimed them (StoreWriter.claim)
    shards_taken_over: int = 0  # of the other processes' shares, written by this one (dynamic claiming)
    nbytes: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    pipeline_seconds: float = 0.0  # first batch requested -> last shard written (the steady-state work)
    input_wait_seconds: float = 0.0  # main process waiting for the DataLoader: > 0 means input-bound
    write_wait_seconds: float = 0.0  # main process waiting for the shard writers: > 0 means write-bound

    def count_reject(self, reason: str) -> None:
        kind = reason.split(":", 1)[0]
        self.rejects[kind] = self.rejects.get(kind, 0) + 1


@dataclass
class PrecomputeResult:
    store: str
    source: str
    teacher: str
    frames: str
    device: str
    dtype: str
    world_size: int
    shards_total: int
    shards_written: int
    shards_skipped: int
    shards_busy: int  # left to another run on the store that was writing them
    shards_taken_over: int  # written by another process of this run than their owner (dynamic claiming)
    rows: int
    clips: int
    audio_seconds: float
    rejects: dict[str, int]
    seconds: float
    nbytes: int
    store_utterances: int
    store_rejects: int
    pipeline_seconds: float
    input_wait_seconds: float
    write_wait_seconds: float
    per_rank: list[dict[str, Any]]
    rank: int  # the process that returns this result (the numbers are the whole run's)

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds else 0.0

    @property
    def audio_hours_per_hour(self) -> float:
        return self.audio_seconds / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if self.rank:  # every process returns; rank 0 speaks for the run
            return f"precompute rank {self.rank}/{self.world_size}: done, see rank 0 for the summary"
        rejected = sum(self.rejects.values())
        by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(self.rejects.items(), key=lambda kv: -kv[1]))
        lines = [
            f"precompute: {self.source} -> {self.store}",
            f"  teacher     {self.teacher} on {self.device} ({self.dtype}), {self.frames} frames, "
            f"{self.world_size} process(es)",
            f"  shards      {self.shards_written} written"
            + (f" ({self.shards_taken_over} taken over from slower processes)" if self.shards_taken_over else "")
            + f", {self.shards_skipped} skipped (complete from an earlier run), "
            + (f"{self.shards_busy} left to another run writing them, " if self.shards_busy else "")
            + f"{self.shards_total} in all",
            f"  this run    {self.rows} rows: {self.clips} clips stored, {rejected} rejected"
            + (f" ({by_kind})" if by_kind else ""),
            f"  speed       {self.audio_seconds / 3600:.2f} h of audio in {self.seconds:.1f} s: "
            f"{self.clips_per_second:.1f} clips/s, {self.audio_hours_per_hour:.0f} audio-hours/hour, "
            f"{self.nbytes / 2**20:.1f} MiB written",
            f"  store       {self.store_utterances} utterances, {self.store_rejects} rejects in its complete shards",
        ]
        if self.seconds and self.input_wait_seconds > 0.1 * self.seconds:
            lines.append(
                f"  note        the encoder waited {self.input_wait_seconds:.0f} s for audio: raise "
                "precompute.num_workers"
            )
        if self.seconds and self.write_wait_seconds > 0.1 * self.seconds:
            lines.append(
                f"  note        the encoder waited {self.write_wait_seconds:.0f} s for the shard writers: "
                "raise precompute.write_threads"
            )
        if hint := bf16_hint(self.device, self.dtype, "--dtype bfloat16"):
            lines.append(f"  note        {hint}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "clips_per_second": self.clips_per_second,
            "audio_hours_per_hour": self.audio_hours_per_hour,
        }


def combined_result(
    config,
    source,
    spec,
    device,
    dtype,
    everyone: list[RankStats],
    n_shards: int,
    store_utterances: int,
    store_rejects: int,
    rank: int,
) -> PrecomputeResult:
    """The run's result from every process's stats (sums, and the slowest process's times)."""
    rejects: collections.Counter = collections.Counter()
    for stats in everyone:
        rejects.update(stats.rejects)
    return PrecomputeResult(
        store=str(config.store.path),
        source=source.describe(),
        teacher=spec.teacher.name_or_path,
        frames=spec.frames,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        world_size=len(everyone),
        shards_total=n_shards,
        shards_written=sum(s.shards_written for s in everyone),
        shards_skipped=sum(s.shards_skipped for s in everyone),
        # an owner counts a shard another process of the run took over as busy too
        shards_busy=max(0, sum(s.shards_busy for s in everyone) - sum(s.shards_taken_over for s in everyone)),
        shards_taken_over=sum(s.shards_taken_over for s in everyone),
        rows=sum(s.rows for s in everyone),
        clips=sum(s.clips for s in everyone),
        audio_seconds=sum(s.audio_seconds for s in everyone),
        rejects=dict(rejects),
        seconds=max(s.seconds for s in everyone),
        nbytes=sum(s.nbytes for s in everyone),
        store_utterances=store_utterances,
        store_rejects=store_rejects,
        pipeline_seconds=max(s.pipeline_seconds for s in everyone),
        input_wait_seconds=max(s.input_wait_seconds for s in everyone),
        write_wait_seconds=max(s.write_wait_seconds for s in everyone),
        per_rank=[dataclasses.asdict(s) for s in everyone],
        rank=rank,
    )
