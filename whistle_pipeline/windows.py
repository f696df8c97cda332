"""What fine-tuning trains on: full windows of encoder states for Whisper's decoder, and the decoder's losses.

    examples ──► Windows.build_with_tail ──► (B, max_frames, D) windows + where their tail repeats (CommonTail)
             ──► WhisperForConditionalGeneration(encoder_outputs=window) inside `with SharedTail(model)(tail):`
             ──► token_losses (B, S) ──► kind_sums for the log and the non-finite guard

A text example's window comes from the frozen TLE (speech frames at the predicted length + the
TLE's tail template), a stored example's from its store's states + that store's tail template.
Without a TLE (finetune.text_states = "null") a text example's window is content-free: a store's tail
template over the whole window (`Windows.templates["text"]`; see `Windows.null_windows`).
Only the decoder trains (select_trainable); stages/finetune.py runs the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from typing import Any

import torch
import torch.nn.functional as F

from whistle_pipeline.pronunciation import PronunciationFrontEnd
from whistle_pipeline.text import IGNORE_INDEX, TextBatch
from whistle_pipeline.tle import TLEModel, assemble_window


@dataclass
class Example:
    """One training or held-out example before batching: stored states or a sentence for the TLE."""

    kind: str
    text: str
    language: str
    states: torch.Tensor | None = None  # (T, D) stored frames; None for text examples


def select_trainable(model: Any, train_embeddings: bool) -> list[str]:
    """Freeze everything but the decoder's layers and final norm (+ embeddings); return the trainable names.

    proj_out is tied to decoder.embed_tokens (one Parameter), so it trains exactly when the embeddings do.
    """
    model.requires_grad_(False)
    decoder = model.model.decoder
    decoder.layers.requires_grad_(True)
    decoder.layer_norm.requires_grad_(True)
    if train_embeddings:
        decoder.embed_tokens.requires_grad_(True)
        decoder.embed_positions.requires_grad_(True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable weights, by name (what checkpoints and best/ hold; the rest is the teacher's)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class Windows:
    """What produces full windows: the frozen TLE and each store's tail template, on the device."""

    tle: TLEModel | None  # eval mode, frozen; None: text examples get content-free windows
    templates: dict[str, torch.Tensor]  # kind -> (max_frames, D) tail template of its store ("text": without a TLE)
    sample_latent: bool

    @property
    def front_end(self) -> PronunciationFrontEnd | None:
        """What encode_texts needs for the text examples' TLE: the TLE's pronunciation front end, if any."""
        return None if self.tle is None else self.tle.front_end

    def build(self, examples: Sequence[Example], text: TextBatch, training: bool) -> torch.Tensor:
        """Full windows (B, max_frames, D) for `examples`, in order; `text` is their encode_texts batch."""
        return self.build_with_tail(examples, text, training)[0]

    def build_with_tail(
        self, examples: Sequence[Example], text: TextBatch, training: bool
    ) -> tuple[torch.Tensor, CommonTail]:
        """build(), and where its windows share their tail template (for SharedTail)."""
        parts, groups, longest = [], [], 0
        kinds = [e.kind for e in examples]
        for kind in dict.fromkeys(kinds):  # in the order the examples come
            rows = [i for i, k in enumerate(kinds) if k == kind]
            assert rows == list(range(rows[0], rows[-1] + 1)), "examples are grouped by kind"
            if kind == "text" and self.tle is not None:
                window, lengths = self._tle_windows(text, rows, training)
            elif kind == "text":
                window, lengths = self.null_windows(len(rows))
            else:
                template = self.templates[kind]  # (F, D)
                states, lengths = stacked_states([examples[i].states for i in rows], template.device)
                window = assemble_window(states, lengths, template)  # (b, F, D)
                longest = max(longest, states.shape[1])
            parts.append(window)
            groups.append((rows[0], rows[-1] + 1))
            if kind == "text":
                longest = max(longest, int(lengths.max()))  # the TLE's lengths: one read from the device
        return torch.cat(parts), CommonTail(longest, tuple(groups))  # (B, F, D)

    def null_windows(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` content-free windows (count, F, D), all the "text" tail template, and their speech lengths (0).

        The control for what the TLE's states teach: the same text, mix and steps, but a window that says
        nothing about the sentence, so the decoder can learn only the text's language model. The tail
        template over the whole window, rather than a store's mean speech frame over a speech length
        followed by the template: (1) the window is the same for every sentence, where a speech length
        would have to come from the text (no TLE predicts it) and would tell the decoder how long the
        sentence is; (2) the template is what the encoder gives after every clip's speech, so the decoder
        has cross-attended to it in every window it was trained on, where a mean of speech frames is a state
        no audio gives.
        """
        template = self.templates["text"]  # (F, D)
        return template.expand(count, -1, -1), torch.zeros(count, dtype=torch.long, device=template.device)

    @torch.no_grad()
    def _tle_windows(self, text: TextBatch, rows: list[int], training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tle = self.tle
        tokens, mask = text.tle_tokens[rows], text.tle_mask[rows]  # (b, L)
        longest = int(mask.sum(1).max())
        language_ids = tle.language_ids([text.languages[i] for i in rows])
        pronunciation = None if text.pronunciation is None else text.pronunciation[rows, :longest]
        speech, lengths = tle.speech_frames(
            tokens[:, :longest],
            mask[:, :longest],
            language_ids,
            sample_latent=training and self.sample_latent,
            pronunciation=pronunciation,
        )  # (b, T, D), (b,)
        return tle.full_window(speech, lengths), lengths  # (b, F, D), (b,)


def stacked_states(states: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored speech frames (T_b, D) float16 of one batch, zero-padded on the host into one tensor (pinned when it
    goes to a GPU) and sent to `device` in one copy: (b, T, D) float32 there, and their lengths (b,) there.
    One transfer per batch, not one per example, and no read back from the device."""
    lengths = [len(frames) for frames in states]
    host = torch.zeros(
        len(states), max(lengths), states[0].shape[1], dtype=states[0].dtype, pin_memory=device.type == "cuda"
    )
    for b, frames in enumerate(states):
        host[b, : lengths[b]] = frames
    lengths_host = torch.tensor(lengths, pin_memory=device.type == "cuda")  # (b,)
    return host.to(device, non_blocking=True).float(), lengths_host.to(device, non_blocking=True)


@dataclass(frozen=True)
class CommonTail:
    """Where a batch of full windows repeats itself: from frame `start` on, every row of a group (rows
    [first, end) — one kind, so one tail template) holds the same frames."""

    start: int
    groups: tuple[tuple[int, int], ...]


class SharedTail:
    """The decoder's cross-attention key/value projections, made once per group for the common tail.

    Most of a 30 s window is the tail template, the same in every example of a kind; a projection is per
    frame, so its output there is the same too. Inside `with shared(tail):` each k_proj/v_proj projects
    frames [0, tail.start) of every row and frames [tail.start, F) of one row per group, expanded to the
    group (gradients reach the weights through both parts, as before). Exact: the same logits and
    gradients as projecting every frame (tested). On a 2-core CPU the whole finetune step was 1.2x faster
    with it in float32 and the same in bfloat16 (bench/RESULTS.md, finetune_step); the projections it saves
    grow with the batch and the model. The modules are not replaced (their forward is, on the instance), so state-dict keys and
    save_pretrained are untouched, and outside the context they are plain nn.Linear calls. (train-tle's
    frozen decoder goes further: whistle_pipeline.decoder.TailTemplateProjection projects its one
    template once for the whole run; here the weights train, so the tail is projected every step.)
    """

    def __init__(self, whisper: Any):
        self.tail: CommonTail | None = None
        self.projections = []
        for layer in whisper.model.decoder.layers:
            for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
                projection.forward = partial(self._project, projection)
                self.projections.append(projection)

    def _project(self, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x (B, F, D) -> (B, F, D_out)."""
        tail = self.tail
        if tail is None or x.dim() != 3 or tail.groups[-1][1] != x.shape[0] or tail.start >= x.shape[1]:
            return F.linear(x, linear.weight, linear.bias)
        head = F.linear(x[:, : tail.start], linear.weight, linear.bias)  # (B, T, D_out)
        tails = [
            F.linear(x[first : first + 1, tail.start :], linear.weight, linear.bias).expand(end - first, -1, -1)
            for first, end in tail.groups
        ]  # (b, F - T, D_out) each
        return torch.cat([head, torch.cat(tails)], dim=1)

    def __call__(self, tail: CommonTail | None) -> SharedTail:
        """`with shared(tail):` shares `tail` for the calls in the block (None: project every frame)."""
        self.tail = tail
        return self

    def __enter__(self) -> SharedTail:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tail = None


def token_losses(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-token cross-entropy (B, S), 0 where labels are -100: logits (B, S, V), labels (B, S)."""
    return F.cross_entropy(
        logits.float().transpose(1, 2),
        labels,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )


def kind_sums(per_token: torch.Tensor, labels: torch.Tensor, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """kind -> its (summed token loss, label tokens) over the batch, one (2,) tensor on the device: for the log
    and the non-finite guard, with nothing read back (a read waits on the device; the loop reads a log row's
    sums once, at log_every). The kinds' rows are taken as slices (examples come grouped by kind), so nothing
    is sent to the device either."""
    per_example = per_token.detach().sum(1).double()  # (B,)
    counts = (labels != IGNORE_INDEX).sum(1).double()  # (B,)
    sums: dict[str, torch.Tensor] = {}
    start = 0
    for kind, run in groupby(kinds):
        end = start + len(list(run))
        pair = torch.stack([per_example[start:end].sum(), counts[start:end].sum()])  # (2,)
        sums[kind] = sums[kind] + pair if kind in sums else pair
        start = end
    return sums
