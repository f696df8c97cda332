"""finetune's inputs: the checks of the ratios' inputs, and the Whisper to adapt with what it learns from
(the stores, checked against it, with damaged shards found under skip_damaged; the TLE; the corpus)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.finetune_data import TextSplit, load_tle, read_text, unusable_utterances
from stages.training import Setup
from stages.training_data import DamagedShard, damaged_shards, open_store
from store import StoreReader
from whistle_pipeline.config import FinetuneConfig
from whistle_pipeline.teacher import LoadedTeacher, load_teacher
from whistle_pipeline.text import SpecialTokens, is_multilingual
from whistle_pipeline.windows import Windows

log = logging.getLogger(__name__)

DAMAGE_DIR = "damaged-shards"  # each rank's scan of the stores under skip_damaged


@dataclass
class Inputs:
    """The Whisper to adapt and what it learns from."""

    teacher: LoadedTeacher  # the full Whisper in float32 (the master weights)
    specials: SpecialTokens
    ratios: dict[str, float]  # kind -> fraction of every batch
    stores: dict[str, StoreReader]  # "audio" / "tts" -> its store, for the kinds drawn
    damaged: list[DamagedShard]  # left out under skip_damaged
    dropped: frozenset[str]  # ids of the damaged shards' utterances, left out whole
    windows: Windows
    text: TextSplit  # empty when no text is drawn
    store_rejects: list[dict[str, str]]  # stored utterances left out (in `dropped` too): store kind, id, reason

    @property
    def max_positions(self) -> int:
        return self.teacher.model.config.max_target_positions


def open_inputs(setup: Setup) -> Inputs:
    """The teacher, the stores (checked against it; damaged shards found under skip_damaged), the TLE, the corpus."""
    config, settings, accelerator = setup.config, setup.settings, setup.accelerator
    device = accelerator.device
    teacher = load_teacher(
        config.teacher.name_or_path,
        config.teacher.revision,
        "full",
        device,
        torch.float32,
        config.teacher.attn_implementation,
    )
    model = teacher.model
    specials = SpecialTokens.from_tokenizer(teacher.tokenizer, is_multilingual(model.config, model.generation_config))
    ratios = {"audio": settings.audio_ratio, "tts": settings.tts_ratio, "text": settings.text_ratio}
    stores = {
        k: open_store(store_url(settings, k), f"finetune.{k}_store", teacher.info)
        for k in ("audio", "tts")
        if ratios[k] > 1e-9
    }
    damaged: list[DamagedShard] = []
    dropped: frozenset[str] = frozenset()
    if settings.skip_damaged:
        for kind in stores:
            found, ids = damaged_shards(accelerator, store_url(settings, kind), setup.output_dir / DAMAGE_DIR / kind)
            damaged, dropped = damaged + found, dropped | ids
    store_rejects = [
        reject
        for kind, reader in stores.items()
        for reject in unusable_utterances(
            reader,
            kind,
            teacher.tokenizer,
            specials,
            model.config.max_target_positions,
            frozenset(d.shard for d in damaged if d.store == reader.url),
        )
    ]
    dropped |= {reject["id"] for reject in store_rejects}
    templates = {k: torch.from_numpy(np.array(r.tail_template())).to(device) for k, r in stores.items()}
    tle, text = None, TextSplit([], [], [])
    if ratios["text"] > 1e-9 and settings.text_states == "null":
        templates["text"] = templates["audio" if "audio" in templates else "tts"]
        if settings.tle_path and Path(settings.tle_path).is_dir():
            log.warning(
                'finetune.text_states = "null": the TLE in %s is not loaded (text windows hold no content)',
                settings.tle_path,
            )
        text = read_text(settings, teacher.tokenizer, specials, model.config.max_target_positions, None)
    elif ratios["text"] > 1e-9:
        tle = load_tle(settings.tle_path, teacher.info, device)
        text = read_text(
            settings, teacher.tokenizer, specials, model.config.max_target_positions, list(tle.config.languages)
        )
    return Inputs(
        teacher,
        specials,
        ratios,
        stores,
        damaged,
        dropped,
        Windows(tle, templates, settings.sample_latent),
        text,
        store_rejects,
    )


def store_url(settings: FinetuneConfig, kind: str) -> str:
    """The store setting of a stored kind ("audio", "tts")."""
    return {"audio": settings.audio_store, "tts": settings.tts_store}[kind]
