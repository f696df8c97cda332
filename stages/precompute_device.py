"""precompute's device side: the encoder on a batch, the sums made where its states are, and the copies of its
results to host memory (on their own CUDA stream, so the next batch's encoder overlaps them).

    launch(batch) ──► teacher_states (log-mel + encoder; audio padded to the window here) ──► float16 states
                  ──► batch_sums (speech mode: tail + statistics sums, inf/nan check) ──► InFlight: pinned host
                      copies and the event that says they are done (stages/precompute.py delivers them)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stages.audio_batches import Batch
from whistle_pipeline.teacher import TeacherGeometry, speech_frames, teacher_states


@dataclass
class InFlight:
    """A batch whose states are on their way to host memory."""

    batch: Batch
    states: torch.Tensor | None  # (B, F, D) float16 on the host (pinned when copied from a GPU); F = max_frames in
    #                              full mode, the batch's most speech frames in speech mode
    copied: torch.cuda.Event | None
    finite: torch.Tensor | None = None  # (B,) bool: no inf/nan in the window
    sums: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # shard -> ShardWriter.add_sums
    #                              arguments (speech mode; see batch_sums)


def launch(
    batch: Batch,
    encoder,
    geometry: TeacherGeometry,
    device: torch.device,
    speech: tuple[int, int] | None,
    copies: torch.cuda.Stream | None,
) -> InFlight:
    """Start the encoder on a batch and the non-blocking copies of its results to host memory (on the CUDA stream
    `copies`; None: not a GPU, plain copies).

    `speech` = (margin frames, shard size) in speech mode: then each window is checked for inf/nan and summed
    into its shard's sums on the device (batch_sums), and only the speech frames are copied.
    """
    if not batch.clips:
        return InFlight(batch, None, None)
    audio = batch.audio.to(device, non_blocking=True)  # (B, N): teacher_states pads it to the window there
    states = teacher_states(encoder, audio, geometry).to(torch.float16)  # (B, M, D), the store's dtype
    if speech is None:
        finite, sums = torch.isfinite(states.sum(dim=(1, 2), dtype=torch.float32)), {}  # (B,), as in batch_sums
    else:
        margin, shard_size = speech
        frames = [speech_frames(n_samples, geometry, margin) for n_samples in batch.n_samples]
        finite, sums = batch_sums(states, frames, [clip.row // shard_size for clip in batch.clips])
        states = states[:, : max(frames)]  # (B, Tmax, D): only speech frames cross to the host
    if copies is None:
        return InFlight(batch, states.cpu(), None, finite.cpu(), sums)
    # The copies run on their own stream, so the next batch's encoder (on the default stream) overlaps them.
    copies.wait_stream(torch.cuda.current_stream(device))  # they start when these results are ready
    on_device = [states, finite, *(values for shard_sums in sums.values() for values in shard_sums.values())]
    with torch.cuda.stream(copies):
        host_states, host_finite = _pinned_copy(states), _pinned_copy(finite)
        host_sums = {
            shard: {name: _pinned_copy(values) for name, values in shard_sums.items()}
            for shard, shard_sums in sums.items()
        }
        copied = torch.cuda.Event()
        copied.record()
    for tensor in on_device:
        tensor.record_stream(copies)  # its memory is not reused before the copy is done
    return InFlight(batch, host_states, copied, host_finite, host_sums)


def batch_sums(
    states: torch.Tensor, frames: list[int], shards: list[int]
) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """Where the states are (the GPU): which windows are finite, and per shard the sums ShardWriter would make
    from the finite ones (ShardWriter.add_sums arguments), so that only speech frames need reach the host.

    states (B, M, D) float16, frames[b] speech frames of window b, shards[b] its shard -> finite (B,) bool,
    {shard: {tail_sum (M, D), tail_count (M,) int64, stat_sum (D,), stat_sqsum (D,), stat_count () int64}}
    (sums float32).
    """
    _, max_frames, d_model = states.shape
    device = states.device
    # float32 sums of float16 cannot overflow, so a window's sum is finite exactly when all its values are
    finite = torch.isfinite(states.sum(dim=(1, 2), dtype=torch.float32))  # (B,)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for b, (n_frames, shard) in enumerate(zip(frames, shards)):
        if shard not in out:
            out[shard] = {
                "tail_sum": torch.zeros(max_frames, d_model, device=device),
                "tail_count": torch.zeros(max_frames, dtype=torch.int64, device=device),
                "stat_sum": torch.zeros(d_model, device=device),
                "stat_sqsum": torch.zeros(d_model, device=device),
                "stat_count": torch.zeros((), dtype=torch.int64, device=device),
            }
        sums = out[shard]
        # torch.where, not a multiply: a non-finite window must add nothing (0 x inf is nan)
        sums["tail_sum"][n_frames:] += torch.where(finite[b], states[b, n_frames:], 0.0)  # (M - T, D)
        sums["tail_count"][n_frames:] += finite[b]
        speech = torch.where(finite[b], states[b, :n_frames], 0.0).float()  # (T, D)
        sums["stat_sum"] += speech.sum(dim=0)
        sums["stat_sqsum"] += (speech * speech).sum(dim=0)
        sums["stat_count"] += finite[b] * n_frames
    return finite, out


def compile_layers(encoder) -> None:
    """torch.compile each encoder layer (precompute.compile) in place. Every batch has the window's fixed shapes
    (B, max_frames, D), so a layer compiles once, plus once per other batch size (a shard's last, shorter
    batch): minutes on the first batches, then faster layers on a GPU. Compiled kernels round differently
    from eager ones, so a compiled run's states are close to, not bit-identical with, an eager run's."""
    for layer in encoder.layers:
        layer.compile(dynamic=False)


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy of a device tensor into pinned host memory (read it after the copy's event)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
