"""Per-token durations taken from the teacher itself: Whisper's alignment heads + DTW.

This is Whisper's word-timestamp method (openai/whisper `timing.py`) applied to the TLE's tokens. The
frozen decoder reads a real full window with the transcript teacher-forced; at the positions that
predict t_1 ... t_n, <|endoftext|> (whistle_pipeline.text), the cross-attention of its alignment heads
over the speech frames — standardised over tokens, median-filtered over time, averaged over heads — is
a token x frame similarity. The cheapest monotonic path through its negative (dynamic time warping)
gives each token's first frame; a token's duration is the gap to the next one's, and the end token
takes the frames after the last word (trailing silence and margin). Durations sum to the utterance's
stored speech frames, and every text token gets at least one frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from whistle_pipeline.decoder import FrozenTeacher, decoder_logits
from whistle_pipeline.text import TextBatch

MEDIAN_FILTER_WIDTH = 7  # frames; Whisper's default for word timestamps


def alignment_heads(model) -> list[tuple[int, int]]:
    """(layer, head) pairs whose cross-attention follows the speech: the checkpoint's `alignment_heads`
    (openai ships them per model), else every head of the decoder's second half (Whisper's fallback)."""
    heads = getattr(model.generation_config, "alignment_heads", None)
    if heads:
        return [(int(layer), int(head)) for layer, head in heads]
    layers, n_heads = model.config.decoder_layers, model.config.decoder_attention_heads
    return [(layer, head) for layer in range(layers // 2, layers) for head in range(n_heads)]


def dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path from (0, 0) to (N-1, M-1) through cost (N, M) with steps
    (1, 1), (1, 0), (0, 1) -> (rows, cols) of its cells in order.

    Row i of the accumulated cost obeys acc[i, j] = cost[i, j] + min(a_j, acc[i, j-1]) with
    a_j = min(acc[i-1, j-1], acc[i-1, j]); unrolled, acc[i, j] = C_j + min_{k<=j}(a_k - C_{k-1}) with C the
    running sum of cost[i], so each row is one cumulative minimum (N numpy steps, not N*M Python ones).
    """
    N, M = cost.shape
    acc = np.empty((N, M))
    acc[0] = np.cumsum(cost[0])
    for i in range(1, N):
        from_above = np.minimum(acc[i - 1], np.concatenate([[np.inf], acc[i - 1, :-1]]))  # a_j
        running = np.cumsum(cost[i])  # C_j
        before = np.concatenate([[0.0], running[:-1]])  # C_{j-1}
        acc[i] = running + np.minimum.accumulate(from_above - before)
    rows, cols = [N - 1], [M - 1]
    i, j = N - 1, M - 1
    while i > 0 or j > 0:
        options = [
            (acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf, i - 1, j - 1),
            (acc[i - 1, j] if i > 0 else np.inf, i - 1, j),
            (acc[i, j - 1] if j > 0 else np.inf, i, j - 1),
        ]
        _, i, j = min(options, key=lambda option: option[0])
        rows.append(i)
        cols.append(j)
    return np.array(rows[::-1]), np.array(cols[::-1])


def durations_from_path(rows: np.ndarray, cols: np.ndarray, n_tokens: int, n_frames: int) -> np.ndarray | None:
    """A DTW path over n_tokens (text tokens + the end token) x n_frames -> frames per token (n_tokens,)
    summing to n_frames, each text token >= 1 frame; None if there are fewer frames than text tokens."""
    if n_frames < n_tokens - 1:
        return None
    starts = np.zeros(n_tokens, dtype=np.int64)
    first = np.unique(rows, return_index=True)[1]  # first path cell of each token
    starts[:] = cols[first]
    for i in range(1, n_tokens):  # each text token keeps at least one frame
        starts[i] = max(starts[i], starts[i - 1] + 1)
    starts[-1] = min(starts[-1], n_frames)
    for i in range(n_tokens - 2, 0, -1):
        starts[i] = min(starts[i], starts[i + 1] - 1)
    return np.diff(np.append(starts, n_frames))


def _median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window along the last dim (reflect padding) (..., T) -> (..., T)."""
    if x.shape[-1] <= width // 2:
        return x
    padded = F.pad(x.reshape(-1, 1, x.shape[-1]), (width // 2, width // 2), mode="reflect")  # (N, 1, T + w - 1)
    return padded.unfold(-1, width, 1).median(-1).values.reshape(x.shape)


@torch.no_grad()
def align_batch(
    teacher: FrozenTeacher,
    heads: list[tuple[int, int]],
    window: torch.Tensor,
    batch: TextBatch,
    lengths: torch.Tensor,
    speech_frames: int | None = None,
) -> list[np.ndarray | None]:
    """Durations per TLE token for each sample: window (B, F, D) real full windows, lengths (B,) speech
    frames -> list of (L_b,) int arrays summing to lengths[b] (None where the audio is too short).
    speech_frames: as in decoder_logits (the windows' tail is the teacher's template from there on)."""
    model = teacher.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # only eager attention returns its weights
    try:
        cross = decoder_logits(teacher, window, batch, speech_frames, output_attentions=True).cross_attentions
    finally:
        model.set_attn_implementation(previous)
    weights = torch.stack([cross[layer][:, head] for layer, head in heads], 1).float()  # (B, A, S, F)
    first_row = batch.prefix_length - 1  # the position that predicts t_1
    out = []
    for b in range(window.shape[0]):
        n_tokens = int(batch.tle_mask[b].sum())  # text tokens + end token
        n_frames = int(lengths[b])
        w = weights[b, :, : first_row + n_tokens, :n_frames]  # (A, rows, T): real rows, speech frames
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-9)
        std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
        w = _median_filter((w - mean) / std.clamp(min=1e-9), MEDIAN_FILTER_WIDTH)
        similarity = w.mean(0)[first_row:]  # (L_b, T)
        rows, cols = dtw_path(-similarity.double().cpu().numpy())
        out.append(durations_from_path(rows, cols, n_tokens, n_frames))
    return out
