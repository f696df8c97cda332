"""finetune's validation: the decoder loss on held-out examples of each kind, and val_audio's WER with the
real encoder (its states computed once: the encoder is frozen), scored with evaluate's toolkit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from whistle_pipeline.config import FinetuneConfig, PipelineConfig
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.sources import Clip
from whistle_pipeline.teacher import TeacherGeometry
from whistle_pipeline.text import IGNORE_INDEX, SpecialTokens, encode_texts
from whistle_pipeline.transcribe import LoadedModel, Named, decoded_batches, encode, generate, open_set, score_clip
from whistle_pipeline.windows import Example, Windows, token_losses

log = logging.getLogger(__name__)


@dataclass
class ValidationData:
    """Held-out examples (in memory) and val_audio's cached encoder states."""

    examples: dict[str, list[Example]]  # kind -> held-out examples
    audio_clips: list[Clip]  # val_audio's clips
    audio_states: list[torch.Tensor]  # per batch: (b, max_frames, D) encoder states, float16 on CPU
    audio_rejects: list[dict[str, str]]


def prepare_val_audio(
    config: PipelineConfig, model: Any, tokenizer: Any, geometry: TeacherGeometry
) -> tuple[list[Any], list[torch.Tensor], list[dict[str, str]]]:
    """Read val_audio (any precompute source) and run the frozen encoder over it once."""
    settings = config.finetune
    clips, rejects = open_set(Named(label="val_audio", path=settings.val_audio), config)
    clips = clips[: settings.val_size]
    loaded = LoadedModel(
        named=Named(label="teacher", path=""),
        model=model,
        tokenizer=tokenizer,
        geometry=geometry,
        multilingual=False,
        encoder_key="",
    )
    kept, states = [], []
    for batch, audio, bad in decoded_batches(
        clips, geometry.sample_rate, geometry.window_seconds, config.evaluate.batch_size
    ):
        rejects += bad
        if batch:
            kept += batch
            states.append(encode(loaded, audio).to("cpu", torch.float16))  # (b, F, D)
    if not kept:
        raise WhistleError(
            f"finetune.val_audio {settings.val_audio} has no usable clip"
            + (f" (first reject: {rejects[0]['id']}: {rejects[0]['reason']})" if rejects else "")
        )
    log.info("val_audio: %d clips encoded once (%d skipped)", len(kept), len(rejects))
    return kept, states, rejects


@torch.no_grad()
def validate(
    model: Any,
    windows: Windows,
    ratios: dict[str, float],
    tokenizer: Any,
    specials: SpecialTokens,
    data: ValidationData,
    config: PipelineConfig,
) -> tuple[dict[str, Any], list[Any]]:
    """Held-out decoder loss per kind (plain cross-entropy), their ratio-weighted mean, and val_audio's
    WER/CER/loops with the real encoder's states -> (metrics, val_audio clip scores)."""
    settings = config.finetune
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics: dict[str, Any] = {}
    for kind, examples in data.examples.items():
        total, tokens = 0.0, 0
        for start in range(0, len(examples), settings.batch_size):
            chunk = examples[start : start + settings.batch_size]
            text = encode_texts(
                tokenizer,
                specials,
                [e.text for e in chunk],
                [e.language for e in chunk],
                model.config.max_target_positions,
                windows.front_end,
            ).to(device)
            window = windows.build(chunk, text, training=False)
            logits = model(encoder_outputs=(window.to(model.dtype),), decoder_input_ids=text.decoder_input_ids).logits
            total += float(token_losses(logits, text.labels, 0.0).sum())
            tokens += int((text.labels != IGNORE_INDEX).sum())
        metrics[f"loss_{kind}"] = total / max(tokens, 1)
    weights = {kind: ratios[kind] for kind in data.examples if data.examples[kind]}
    metrics["loss"] = (
        sum(metrics[f"loss_{k}"] * w for k, w in weights.items()) / sum(weights.values()) if weights else math.nan
    )
    clip_scores = []
    if data.audio_clips:
        evaluated = LoadedModel(
            named=Named(label="adapted", path=""),
            model=model,
            tokenizer=tokenizer,
            geometry=None,
            multilingual=specials.multilingual,
            encoder_key="",
        )
        clips = iter(data.audio_clips)
        for states in data.audio_states:
            batch = [next(clips) for _ in range(len(states))]
            transcripts = generate(
                evaluated,
                states,
                [c.language for c in batch],
                config.evaluate.num_beams,
                config.evaluate.max_new_tokens,
            )
            clip_scores += [score_clip(c.id, c.text, t, c.language) for c, t in zip(batch, transcripts)]
        words = sum(c.ref_words for c in clip_scores)
        metrics["wer"] = sum(c.word_errors for c in clip_scores) / max(words, 1)
        metrics["cer"] = sum(c.char_errors for c in clip_scores) / max(sum(c.ref_chars for c in clip_scores), 1)
        metrics["loops"] = [c.id for c in clip_scores if c.loop]
    metrics["metric"] = metrics["wer"] if select_by(settings) == "wer" else metrics["loss"]
    model.train(was_training)
    return metrics, clip_scores


def select_by(settings: FinetuneConfig) -> str:
    """The metric that picks the best step: finetune.select_by, \"auto\" resolved."""
    if settings.select_by == "auto":
        return "wer" if settings.val_audio else "loss"
    return settings.select_by


def outliers(clip_scores: Sequence[Any], count: int) -> list[dict[str, Any]]:
    """val_audio's repetition loops, then its clips with the most word errors."""
    ranked = sorted(clip_scores, key=lambda c: (c.loop, c.word_errors), reverse=True)
    return [
        {
            "id": c.id,
            "word_errors": c.word_errors,
            "ref_words": c.ref_words,
            "loop": c.loop,
            "reference": c.reference,
            "hypothesis": c.hypothesis,
        }
        for c in ranked[:count]
        if c.word_errors or c.loop
    ]
