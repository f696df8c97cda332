"""Per-token durations taken from the teacher itself: Whisper's alignment heads + DTW.

This is Whisper's word-timestamp method (openai/whisper `timing.py`) applied to the TLE's tokens. The
frozen decoder reads a real full window with the transcript teacher-forced; at the positions that
predict t_1 ... t_n, <|endoftext|> (whistle_pipeline.text), the cross-attention of its alignment heads
over the speech frames — standardised over tokens, median-filtered over time, averaged over heads — is
a token x frame similarity. The cheapest monotonic path through its negative (dynamic time warping)
gives each token's first frame; a token's duration is the gap to the next one's, and the end token
takes the frames after the last word (trailing silence and margin). Durations sum to the utterance's
stored speech frames, and every text token gets at least one frame.

Only what the alignment reads is computed (`alignment_costs`): the decoder layers up to the last one that
holds an alignment head, and in the layers that hold them, those heads' attention over the speech frames
alone (softmax over the speech frames = the full window's softmax renormalised over them, as Whisper does).
The logits and the layers after it are never run. A batch comes back to the host in one copy; its DTW
(`durations_from_costs`) is one numpy pass over the whole batch, so a caller can run it on a thread while
the device reads the next batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from whistle_pipeline.decoder import FrozenTeacher
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


@dataclass
class AlignmentCosts:
    """One batch's DTW inputs on the host: cost (B, L, T) float64 = -similarity (padded), n_tokens (B,) rows
    per sample (text tokens + end token), n_frames (B,) speech frames per sample."""

    cost: np.ndarray
    n_tokens: np.ndarray
    n_frames: np.ndarray


def dtw_first_columns(cost: np.ndarray, n_rows: np.ndarray, n_cols: np.ndarray) -> np.ndarray:
    """For each sample b, the cheapest monotonic path from (0, 0) to (n_rows[b]-1, n_cols[b]-1) through
    cost[b] (B, N, M) with steps (1, 1), (1, 0), (0, 1), on ties preferring (1, 1) then (1, 0) (Whisper's
    order) -> (B, N) int64: the first column of each row on it (0 in rows past n_rows[b]).

    Row i of the accumulated cost obeys acc[i, j] = cost[i, j] + min(a_j, acc[i, j-1]) with
    a_j = min(acc[i-1, j-1], acc[i-1, j]); unrolled, acc[i, j] = C_j + min_{k<=j}(a_k - C_{k-1}) with C the
    running sum of cost[i], so each row is one cumulative minimum over the batch. A cell's values depend
    only on the cells above and to its left, so the padding (rows >= n_rows[b], columns >= n_cols[b])
    changes nothing. Walking back, the path leaves row i at the nearest column <= j whose left neighbour
    is not strictly cheaper than a_j (kept per row as it is computed): one lookup per row, N numpy steps.
    """
    B, N, M = cost.shape
    columns = np.arange(M)
    run_end = np.zeros((B, N, M), np.int64)  # where a leftward run through (i, j) ends (row 0: at column 0)
    takes_diagonal = np.zeros((B, N, M), bool)  # leaving (i, j) upward: diagonally (else straight up)
    previous = np.cumsum(cost[:, 0], -1)  # acc[0] (B, M)
    for i in range(1, N):
        diagonal = np.concatenate([np.full((B, 1), np.inf), previous[:, :-1]], 1)  # acc[i-1, j-1]
        from_above = np.minimum(previous, diagonal)  # a_j
        running = np.cumsum(cost[:, i], -1)  # C_j
        before = np.concatenate([np.zeros((B, 1)), running[:, :-1]], 1)  # C_{j-1}
        row = running + np.minimum.accumulate(from_above - before, -1)  # acc[i]
        goes_left = np.zeros((B, M), bool)
        goes_left[:, 1:] = row[:, :-1] < from_above[:, 1:]
        run_end[:, i] = np.maximum.accumulate(np.where(goes_left, -1, columns), -1)
        takes_diagonal[:, i] = diagonal <= previous
        previous = row
    first = np.zeros((B, N), np.int64)
    column = np.asarray(n_cols, np.int64) - 1  # (B,)
    n_rows = np.asarray(n_rows, np.int64)
    for step in range(int(n_rows.max(initial=0))):
        row_index = n_rows - 1 - step  # (B,) every sample's path leaves one row per step
        on = np.flatnonzero(row_index >= 0)
        start = run_end[on, row_index[on], column[on]]
        first[on, row_index[on]] = start
        column[on] = start - takes_diagonal[on, row_index[on], start]
    return first


def durations_from_first_columns(first: np.ndarray, n_tokens: int, n_frames: int) -> np.ndarray | None:
    """First path column of each of n_tokens rows (text tokens + the end token) over n_frames -> frames
    per token (n_tokens,) summing to n_frames, each text token >= 1 frame; None if there are fewer frames
    than text tokens."""
    if n_frames < n_tokens - 1:
        return None
    starts = np.array(first[:n_tokens], dtype=np.int64)
    for i in range(1, n_tokens):  # each text token keeps at least one frame
        starts[i] = max(starts[i], starts[i - 1] + 1)
    starts[-1] = min(starts[-1], n_frames)
    for i in range(n_tokens - 2, 0, -1):
        starts[i] = min(starts[i], starts[i + 1] - 1)
    return np.diff(np.append(starts, n_frames))


def durations_from_costs(costs: AlignmentCosts) -> list[np.ndarray | None]:
    """Durations per TLE token of each sample of a batch (None where the audio is too short): one DTW pass."""
    first = dtw_first_columns(costs.cost, costs.n_tokens, costs.n_frames)  # (B, L)
    return [
        durations_from_first_columns(first[b], int(costs.n_tokens[b]), int(costs.n_frames[b]))
        for b in range(len(first))
    ]


def _median_filter(x: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window along the last dim of x (B, R, T), sample b's first lengths[b] values
    reflect-padded at both ends (its later values are ignored) -> (B, R, T). Samples of <= width // 2
    values are left as they are."""
    half = width // 2
    T = x.shape[-1]
    position = torch.arange(-half, T + half, device=x.device)  # (T + w - 1,)
    last = (lengths[:, None] - 1).clamp(min=0)  # (B, 1)
    index = torch.where(position < 0, -position, torch.where(position > last, 2 * last - position, position))
    index = index.clamp(0, T - 1)[:, None].expand(-1, x.shape[1], -1)  # (B, R, T + w - 1)
    padded = x.gather(-1, index)  # (B, R, T + w - 1)
    filtered = padded.unfold(-1, width, 1).median(-1).values  # (B, R, T)
    return torch.where((lengths > half)[:, None, None], filtered, x)


def _head_weights(
    layer, query_input: torch.Tensor, speech: torch.Tensor, frame_mask: torch.Tensor, heads: list[int]
) -> torch.Tensor:
    """Cross-attention weights of `heads` of one decoder layer over the speech frames only: query_input
    (B, S, D) what its cross-attention reads, speech (B, T, D), frame_mask (B, T) -> (B, A, S, T) float32."""
    attention = layer.encoder_attn
    head_dim = attention.head_dim
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]).to(speech.device)
    key_proj = attention.k_proj.linear  # the TailTemplateProjection's own linear: speech frames only
    q_bias = attention.q_proj.bias
    query = F.linear(query_input, attention.q_proj.weight[rows], None if q_bias is None else q_bias[rows])
    key = F.linear(speech, key_proj.weight[rows], None if key_proj.bias is None else key_proj.bias[rows])
    B, S, T, A = query.shape[0], query.shape[1], speech.shape[1], len(heads)
    query = (query * attention.scaling).view(B, S, A, head_dim).transpose(1, 2)  # (B, A, S, hd), scaled as Whisper
    key = key.view(B, T, A, head_dim).transpose(1, 2)  # (B, A, T, hd)
    scores = (query @ key.transpose(-1, -2)).float()  # (B, A, S, T)
    scores = scores.masked_fill(~frame_mask[:, None, None, :], -torch.inf)
    return scores.softmax(-1)


@torch.no_grad()
def alignment_costs(
    teacher: FrozenTeacher,
    heads: list[tuple[int, int]],
    window: torch.Tensor,
    batch: TextBatch,
    lengths: torch.Tensor,
    speech_frames: int | None = None,
) -> AlignmentCosts:
    """The DTW inputs of a batch: window (B, F, D) real full windows on the teacher's device, lengths (B,)
    speech frames. speech_frames: as in decoder_logits (the windows' tail is the teacher's template from
    there on). One copy to the host at the end."""
    decoder = teacher.model.model.decoder
    window = window.to(teacher.model.dtype)
    lengths = lengths.to(window.device)
    ids = batch.decoder_input_ids  # (B, S)
    B, S = ids.shape
    n_tokens = batch.tle_mask.sum(1)  # (B,) text tokens + end token
    first_row = batch.prefix_length - 1  # the position that predicts t_1
    T = int(lengths.max())
    speech = window[:, :T]  # (B, T, D)
    frame_mask = torch.arange(T, device=window.device) < lengths[:, None]  # (B, T)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    # as WhisperDecoder.forward: token + position embeddings, the causal mask of its attention implementation
    hidden = decoder.embed_tokens(ids) + decoder.embed_positions.weight[:S]  # (B, S, D)
    positions = torch.arange(S, device=ids.device).expand(B, -1)  # (B, S)
    causal = create_causal_mask(
        config=decoder.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
    )
    weights = []
    with teacher.speech_prefix(speech_frames):
        for index, layer in enumerate(decoder.layers[: max(by_layer) + 1]):
            if index not in by_layer:
                hidden = layer(hidden, causal, window, cache=None, use_cache=False)
                continue
            hidden = hidden + layer.self_attn(layer.self_attn_layer_norm(hidden), attention_mask=causal)[0]
            query_input = layer.encoder_attn_layer_norm(hidden)  # (B, S, D)
            weights.append(_head_weights(layer, query_input, speech, frame_mask, by_layer[index]))
            if index < max(by_layer):
                hidden = hidden + layer.encoder_attn(query_input, key_value_states=window)[0]
                hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
    # the heads in `heads` order (averaged below, so the order only fixes the float rounding)
    order = [(layer, head) for layer in sorted(by_layer) for head in by_layer[layer]]
    weights = torch.cat(weights, 1)[:, [order.index(pair) for pair in heads]]  # (B, A, S, T)
    similarity = _similarity(weights, first_row, n_tokens, lengths)  # (B, L, T)
    return AlignmentCosts(-similarity.cpu().double().numpy(), n_tokens.cpu().numpy(), lengths.cpu().numpy())


def _similarity(weights: torch.Tensor, first_row: int, n_tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Alignment heads' weights (B, A, S, T) -> token x frame similarity (B, L, T): each sample's real rows (the
    prompt and its n_tokens) standardised per frame, median-filtered over its lengths[b] frames, averaged over
    the heads, from the row that predicts t_1 on."""
    B, _, S, T = weights.shape
    rows = first_row + n_tokens  # (B,) real rows: the prompt and the TLE tokens
    row_mask = (torch.arange(S, device=weights.device) < rows[:, None])[:, None, :, None]  # (B, 1, S, 1)
    count = rows[:, None, None, None].to(weights.dtype)
    mean = (weights * row_mask).sum(-2, keepdim=True) / count  # (B, A, 1, T)
    std = (((weights - mean) ** 2 * row_mask).sum(-2, keepdim=True) / count).sqrt()  # (B, A, 1, T)
    standard = (weights - mean) / std.clamp(min=1e-9)  # (B, A, S, T)
    L = int(n_tokens.max())
    similarity = torch.zeros(B, L, T, device=weights.device)  # (B, L, T)
    for head in range(weights.shape[1]):  # one head at a time: the filter's window copy is 7x the head's weights
        filtered = _median_filter(standard[:, head, : first_row + L], lengths, MEDIAN_FILTER_WIDTH)
        similarity += filtered[:, first_row:]
    return similarity / weights.shape[1]


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
    return durations_from_costs(alignment_costs(teacher, heads, window, batch, lengths, speech_frames))
