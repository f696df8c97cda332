"""The frozen Whisper decoder as train-tle uses it: deep supervision, round-trip transcription, WER.

Every function takes encoder states as a full window (B, max_frames, D) — speech frames + tail
template, exactly what the decoder gets at inference — and the token convention of whistle_pipeline.text.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from store.spec import TeacherInfo
from whistle_pipeline.teacher import load_teacher
from whistle_pipeline.text import IGNORE_INDEX, SpecialTokens, TextBatch, is_multilingual

log = logging.getLogger(__name__)


class TailTemplateProjection(nn.Module):
    """A frozen cross-attention key/value projection that knows the tail of its input.

    In a full window every frame from the longest speech on is the tail template, the same in every
    batch, so its projection is computed once (`set_template`) and only the speech frames are projected
    per call. Exact, and ~7x fewer FLOPs in the decoder for 3-5 s utterances in a 30 s window, where the
    1500-frame key/value projections are nearly all of the decoder's work.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.template_output: torch.Tensor | None = None  # (F, D) projection of the tail template
        self.speech_frames: int | None = None  # set for one call: window[:, speech_frames:] is the template

    def set_template(self, template: torch.Tensor) -> None:
        with torch.no_grad():
            self.template_output = self.linear(template.to(self.linear.weight))  # (F, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, F, D) -> (B, F, D_out)."""
        if self.speech_frames is None or self.template_output is None:
            return self.linear(x)
        head = self.linear(x[:, : self.speech_frames])  # (B, T, D_out)
        tail = self.template_output[self.speech_frames :].to(head.dtype).expand(x.shape[0], -1, -1)  # (B, F - T, D_out)
        return torch.cat([head, tail], dim=1)


@dataclass
class FrozenTeacher:
    """A Whisper model with every weight frozen (its encoder dropped), its tokenizer and special tokens."""

    model: Any  # transformers.WhisperForConditionalGeneration
    tokenizer: Any
    specials: SpecialTokens
    suppress_ids: torch.Tensor  # (N,) tokens greedy decoding never emits: specials but <|endoftext|>, timestamps
    info: TeacherInfo  # what a store records of this teacher
    projections: list[TailTemplateProjection] = field(default_factory=list)  # every cross-attention k/v

    @property
    def max_positions(self) -> int:
        return self.model.config.max_target_positions

    def set_tail_template(self, template: torch.Tensor) -> None:
        """The tail template (F, D) of the windows that calls with `speech_frames` will pass."""
        for projection in self.projections:
            projection.set_template(template.to(self.model.device))

    @contextlib.contextmanager
    def speech_prefix(self, speech_frames: int | None) -> Iterator[None]:
        """Within the block, windows equal the tail template from `speech_frames` on (None: no promise)."""
        if speech_frames is not None and not any(p.template_output is not None for p in self.projections):
            speech_frames = None
        for projection in self.projections:
            projection.speech_frames = speech_frames
        try:
            yield
        finally:
            for projection in self.projections:
                projection.speech_frames = None


def load_frozen_teacher(
    name_or_path: str, revision: str, device: torch.device | str, dtype: torch.dtype, attn: str = "sdpa"
) -> FrozenTeacher:
    """The teacher for decoder use only (`load_teacher` part "decoder": the encoder is dropped, never run
    here: encoder states come from the store or the TLE), its cross-attention projections tail-aware."""
    loaded = load_teacher(name_or_path, revision, "decoder", device, dtype, attn)
    model, tokenizer = loaded.model, loaded.tokenizer
    projections = []
    for layer in model.model.decoder.layers:
        attention = layer.encoder_attn
        attention.k_proj, attention.v_proj = (
            TailTemplateProjection(attention.k_proj),
            TailTemplateProjection(attention.v_proj),
        )
        projections += [attention.k_proj, attention.v_proj]
    specials = SpecialTokens.from_tokenizer(tokenizer, is_multilingual(model.config, model.generation_config))
    suppress = set(tokenizer.all_special_ids) | set(getattr(model.generation_config, "suppress_tokens", None) or [])
    suppress |= set(range(specials.no_timestamps + 1, model.config.vocab_size))  # timestamp tokens
    suppress.discard(specials.end_of_text)
    suppress_ids = torch.tensor(sorted(i for i in suppress if i < model.config.vocab_size), device=device)
    return FrozenTeacher(model, tokenizer, specials, suppress_ids, loaded.info, projections)


def decoder_logits(
    teacher: FrozenTeacher, window: torch.Tensor, batch: TextBatch, speech_frames: int | None = None, **kwargs: Any
) -> Any:
    """Teacher-forced decoder pass: window (B, F, D), batch.decoder_input_ids (B, S) -> output with logits (B, S, V).

    speech_frames: the caller's promise that window[:, speech_frames:] is the teacher's tail template
    (`set_tail_template`); only the frames before it are then projected.
    """
    window = window.to(teacher.model.dtype)
    with teacher.speech_prefix(speech_frames):
        return teacher.model(encoder_outputs=(window,), decoder_input_ids=batch.decoder_input_ids, **kwargs)


def decoder_cross_entropy(
    teacher: FrozenTeacher, window: torch.Tensor, batch: TextBatch, speech_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy per label token () and per sample (B,), of the decoder reading `window`.

    Gradients flow into `window` (deep supervision) while the decoder's weights stay frozen.
    """
    logits = decoder_logits(teacher, window, batch, speech_frames).logits.float()  # (B, S, V)
    return label_cross_entropy(logits, batch.labels)


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, S, V), labels (B, S) with IGNORE_INDEX -> mean CE per label token () and per sample (B,)."""
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, S)
    counts = (labels != IGNORE_INDEX).sum(1)  # (B,)
    return per_token.sum() / counts.sum(), per_token.sum(1) / counts


@dataclass
class DecoderTerms:
    """Phase 2's decoder terms of one train-tle batch: what the loss charges and what is logged."""

    charged_ce: torch.Tensor  # () the CE the loss charges: `ce`, or max(0, ce - floor * real_ce) with a floor
    ce: torch.Tensor  # () the decoder's CE per label token reading the TLE's window
    real_ce: torch.Tensor | None = None  # () its CE reading the same batch's real states (floor or distillation)
    kl: torch.Tensor | None = None  # () KL(p_real || p_tle) per label token (distillation)


def phase_2_terms(
    teacher: FrozenTeacher,
    tle: Any,
    output: Any,
    real_states: torch.Tensor,
    batch: TextBatch,
    ce_floor: float,
    kl_weight: float,
) -> DecoderTerms:
    """The frozen decoder's terms for a TLE forward `output` (TLEOutput at the true durations) of `batch`.

    The decoder reads the TLE's full window; with ce_floor > 0 or kl_weight > 0 it also reads the real
    states (B, T, D) of the same batch, without gradients: the floor charges the CE only down to
    ce_floor * the real states' CE (states more readable than speech teach fine-tuning nothing about
    speech), the KL pulls the TLE's next-token distributions toward the real states' ones.
    `tle` is the TLEModel (full_window, denormalise); the teacher knows its tail template.
    """
    window = tle.full_window(tle.denormalise(output.states), output.lengths)  # (B, F, D)
    logits = decoder_logits(teacher, window, batch, output.states.shape[1]).logits.float()  # (B, S, V)
    ce = label_cross_entropy(logits, batch.labels)[0]
    terms = DecoderTerms(charged_ce=ce, ce=ce)
    if ce_floor > 0 or kl_weight > 0:
        with torch.no_grad():
            real_window = tle.full_window(real_states, output.lengths)  # (B, F, D)
            real_logits = decoder_logits(teacher, real_window, batch, real_states.shape[1]).logits.float()  # (B, S, V)
            terms.real_ce = label_cross_entropy(real_logits, batch.labels)[0]
        if ce_floor > 0:
            terms.charged_ce = torch.relu(ce - ce_floor * terms.real_ce)
        if kl_weight > 0:
            terms.kl = decoder_kl(real_logits, logits, batch.labels)
    return terms


def decoder_kl(reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(p_reference || p) of the next-token distributions, mean per label token -> ().

    reference_logits, logits (B, S, V); positions where labels (B, S) is IGNORE_INDEX are left out.
    The decoder reading the real states is the reference: a TLE whose windows it reads with the same
    distributions is as hard to read as speech exactly where speech is hard, and no easier.
    """
    keep = labels != IGNORE_INDEX  # (B, S)
    reference = F.log_softmax(reference_logits[keep].float(), dim=-1)  # (N, V)
    predicted = F.log_softmax(logits[keep].float(), dim=-1)  # (N, V)
    return F.kl_div(predicted, reference, log_target=True, reduction="batchmean")


@torch.no_grad()
def greedy_transcribe(
    teacher: FrozenTeacher,
    window: torch.Tensor,
    languages: Sequence[str],
    max_new_tokens: int,
    speech_frames: int | None = None,
) -> list[str]:
    """Greedy transcripts of full windows (B, F, D): the prompt of each language, then argmax tokens
    (never a special or timestamp token) until <|endoftext|> or max_new_tokens. speech_frames: as in
    `decoder_logits`."""
    specials = teacher.specials
    prompt = torch.tensor([specials.prefix(language) for language in languages], device=window.device)  # (B, P)
    max_new_tokens = min(max_new_tokens, teacher.max_positions - prompt.shape[1])
    window = window.to(teacher.model.dtype)
    cache = None
    finished = torch.zeros(len(languages), dtype=torch.bool, device=window.device)
    generated = []
    step_input = prompt
    for _ in range(max_new_tokens):
        with teacher.speech_prefix(speech_frames):
            out = teacher.model(encoder_outputs=(window,), decoder_input_ids=step_input, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float()  # (B, V)
        logits[:, teacher.suppress_ids] = -torch.inf
        next_token = logits.argmax(-1)  # (B,)
        next_token = torch.where(finished, torch.full_like(next_token, specials.end_of_text), next_token)
        generated.append(next_token)
        finished |= next_token == specials.end_of_text
        if finished.all():
            break
        step_input = next_token[:, None]
    tokens = torch.stack(generated, 1).tolist() if generated else [[] for _ in languages]  # (B, N)
    texts = []
    for row in tokens:
        row = row[: row.index(specials.end_of_text)] if specials.end_of_text in row else row
        texts.append(teacher.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts
