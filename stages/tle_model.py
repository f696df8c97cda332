"""train-tle's model and loss schedule: a fresh TLE sized by [tle], the loss weights of each step (the two
phases), and what one micro-batch adds to the train log."""

from __future__ import annotations

from typing import Any

import torch

from store import StoreReader
from whistle_pipeline.config import PipelineConfig
from whistle_pipeline.decoder import DecoderTerms, FrozenTeacher
from whistle_pipeline.pronunciation import BACKENDS, PronunciationFrontEnd
from whistle_pipeline.tle import LossTerms, LossWeights, TLEConfig, TLEModel


def pronunciation_front_end(kind: str, languages: list[str]) -> PronunciationFrontEnd | None:
    """[tle] pronunciation's front end (None for "none"); warns once here, where the run starts, for each of
    the store's languages it cannot speak (DataLoader workers inherit what it has warned about)."""
    if kind == "none":
        return None
    front_end = PronunciationFrontEnd(BACKENDS[kind]())
    front_end.to_dict()  # a missing backend (pip install 'whistle[g2p]') fails here, before any work
    for language in languages:
        front_end.spelled(language)
    return front_end


def network_sizes(arch: Any) -> dict[str, Any]:
    """The TLEConfig fields that [tle] (`arch`, config.tle) sizes the network with, as keywords."""
    names = ("hidden_size", "text_layers", "frame_layers", "num_heads", "ffn_multiplier", "latent_size")
    names += ("conv_kernel", "conv_layers", "dropout", "posterior")
    return {name: getattr(arch, name) for name in names}


def build_model(
    config: PipelineConfig,
    reader: StoreReader,
    teacher: FrozenTeacher,
    languages: list[str],
    front_end: PronunciationFrontEnd | None = None,
) -> TLEModel:
    """A fresh TLE sized by [tle], the store's geometry and statistics, and the teacher's vocabulary; with a
    pronunciation `front_end`, recorded in its config (finetune and validate-tle rebuild it from there)."""
    arch = config.tle
    decoder_embeddings = teacher.model.model.decoder.embed_tokens.weight  # (V, d_model)
    tle_config = TLEConfig(
        vocab_size=decoder_embeddings.shape[0],
        embedding_size=decoder_embeddings.shape[1],
        **network_sizes(arch),
        languages=languages,
        d_model=reader.teacher.d_model,
        max_frames=reader.teacher.max_frames,
        max_tokens=teacher.max_positions,
        end_token_id=teacher.specials.end_of_text,
        teacher=reader.teacher.to_dict(),
        spelling_channels=arch.spelling_channels,
        pronunciation=None if front_end is None else front_end.to_dict(),
        phoneme_channels=arch.phoneme_channels,
    )
    torch.manual_seed(config.train_tle.seed)
    model = TLEModel(tle_config)
    mean, std = reader.statistics()
    model.set_store_statistics(mean, std, reader.tail_template())
    model.set_token_spellings(teacher.tokenizer)
    if arch.token_embeddings != "random":
        with torch.no_grad():
            model.token_embedding.weight.copy_(decoder_embeddings.float())
        model.token_embedding.weight.requires_grad_(arch.token_embeddings == "teacher")
    return model


def loss_weights(settings: Any, step: int) -> LossWeights:
    """The weights of optimiser step `step`: beta rises linearly from 0, the decoder terms join in phase 2."""
    beta = settings.kl_beta * (min(1.0, step / settings.kl_anneal_steps) if settings.kl_anneal_steps else 1.0)
    phase_2 = step >= settings.decoder_ce_start
    return LossWeights(
        mse=settings.mse_weight,
        cosine=settings.cosine_weight,
        length=settings.length_weight,
        beta=beta,
        free_bits=settings.free_bits,
        decoder_ce=settings.decoder_ce_weight if phase_2 else 0.0,
        decoder_kl=settings.decoder_kl_weight if phase_2 else 0.0,
    )


def step_values(terms: LossTerms, decoder: DecoderTerms | None, length_error: torch.Tensor) -> dict[str, torch.Tensor]:
    """What one micro-batch adds to the train log, as () tensors on the device (read back when logged): the loss,
    its terms, and the decoder's CE in phase 2."""
    values = {
        "loss": terms.total.detach(),
        "mse": terms.mse,
        "cosine": terms.cosine,
        "kl": terms.kl,
        "length": terms.length,
        "length_error": length_error,
    }
    if decoder is not None:
        values["decoder_ce"] = decoder.ce.detach()
        if decoder.kl is not None:
            values["decoder_kl"] = decoder.kl.detach()
        if decoder.real_ce is not None:
            values["real_decoder_ce"] = decoder.real_ce.detach()
    return values
