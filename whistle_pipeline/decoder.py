"""The frozen Whisper decoder as train-tle uses it: deep supervision, round-trip transcription, WER.

Every function takes encoder states as a full window (B, max_frames, D) — speech frames + tail
template, exactly what the decoder gets at inference — and the token convention of whistle_pipeline.text.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.text import IGNORE_INDEX, SpecialTokens, TextBatch, is_multilingual

log = logging.getLogger(__name__)


@dataclass
class FrozenTeacher:
    """A Whisper model with every weight frozen (its encoder dropped), its tokenizer and special tokens."""

    model: Any  # transformers.WhisperForConditionalGeneration
    tokenizer: Any
    specials: SpecialTokens
    suppress_ids: torch.Tensor  # (N,) tokens greedy decoding never emits: specials but <|endoftext|>, timestamps

    @property
    def max_positions(self) -> int:
        return self.model.config.max_target_positions


def load_frozen_teacher(name_or_path: str, revision: str, device: torch.device | str, dtype: torch.dtype) -> FrozenTeacher:
    """Load a Whisper model and tokenizer for decoder use only; the encoder is dropped (never run here:
    encoder states come from the store or the TLE), which frees its memory."""
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    try:
        model = WhisperForConditionalGeneration.from_pretrained(name_or_path, revision=revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except OSError as err:
        raise WhistleError(
            f"cannot load the Whisper teacher {name_or_path!r} (revision {revision!r}): {err}. Give a hub name or "
            "a folder written by save_pretrained or `whistle import-ct2` (teacher.name_or_path)."
        ) from err
    model.model.encoder = None
    model.requires_grad_(False).eval().to(device)
    specials = SpecialTokens.from_tokenizer(tokenizer, is_multilingual(model.config, model.generation_config))
    suppress = set(tokenizer.all_special_ids) | set(getattr(model.generation_config, "suppress_tokens", None) or [])
    suppress |= set(range(specials.no_timestamps + 1, model.config.vocab_size))  # timestamp tokens
    suppress.discard(specials.end_of_text)
    suppress_ids = torch.tensor(sorted(i for i in suppress if i < model.config.vocab_size), device=device)
    return FrozenTeacher(model, tokenizer, specials, suppress_ids)


def decoder_logits(teacher: FrozenTeacher, window: torch.Tensor, batch: TextBatch, **kwargs: Any) -> Any:
    """Teacher-forced decoder pass: window (B, F, D), batch.decoder_input_ids (B, S) -> output with logits (B, S, V)."""
    window = window.to(teacher.model.dtype)
    return teacher.model(encoder_outputs=(window,), decoder_input_ids=batch.decoder_input_ids, **kwargs)


def decoder_cross_entropy(teacher: FrozenTeacher, window: torch.Tensor, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy per label token () and per sample (B,), of the decoder reading `window`.

    Gradients flow into `window` (deep supervision) while the decoder's weights stay frozen.
    """
    logits = decoder_logits(teacher, window, batch).logits.float()  # (B, S, V)
    labels = batch.labels  # (B, S)
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")  # (B, S)
    counts = (labels != IGNORE_INDEX).sum(1)  # (B,)
    return per_token.sum() / counts.sum(), per_token.sum(1) / counts


@torch.no_grad()
def greedy_transcribe(teacher: FrozenTeacher, window: torch.Tensor, languages: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy transcripts of full windows (B, F, D): the prompt of each language, then argmax tokens
    (never a special or timestamp token) until <|endoftext|> or max_new_tokens."""
    specials = teacher.specials
    prompt = torch.tensor([specials.prefix(language) for language in languages], device=window.device)  # (B, P)
    max_new_tokens = min(max_new_tokens, teacher.max_positions - prompt.shape[1])
    window = window.to(teacher.model.dtype)
    cache = None
    finished = torch.zeros(len(languages), dtype=torch.bool, device=window.device)
    generated = []
    step_input = prompt
    for _ in range(max_new_tokens):
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


def word_error_rate(hypotheses: Sequence[str], references: Sequence[str], languages: Sequence[str], tokenizer: Any) -> float:
    """Corpus WER after Whisper's text normaliser (English spelling rules for "en", basic otherwise)."""
    import jiwer
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    english = EnglishTextNormalizer(getattr(tokenizer, "english_spelling_normalizer", None) or {})
    basic = BasicTextNormalizer()
    pairs = []
    for hypothesis, reference, language in zip(hypotheses, references, languages):
        normalise = english if language == "en" else basic
        if normalise(reference).strip():
            pairs.append((normalise(reference), normalise(hypothesis)))
    if not pairs:
        raise WhistleError("no reference transcript is left after normalisation: cannot compute a WER")
    return jiwer.wer([ref for ref, _ in pairs], [hyp for _, hyp in pairs])
