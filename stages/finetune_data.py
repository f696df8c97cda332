"""finetune's inputs: the stores, the frozen TLE, the corpus, and the streams of examples they give.

Each micro-batch holds the configured fractions of the kinds exactly over the run (mix_counts). Every
stream saves its `position` (epoch, items taken) in checkpoints, so a resumed run reads on from it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.training_data import endless_epochs, held_out_items
from store import StoreReader, TeacherInfo
from store.dataset import FeatureDataset
from whistle_pipeline.config import FinetuneConfig
from whistle_pipeline.corpus import TextReject, TextRow, is_held_out, read_corpus
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.teacher import check_teacher
from whistle_pipeline.text import SpecialTokens, text_tokens, transcript_problem
from whistle_pipeline.tle import TLEModel
from whistle_pipeline.windows import Example

log = logging.getLogger(__name__)

KINDS = ("audio", "tts", "text")  # the order of the kinds inside a batch


def mix_counts(batch_size: int, audio_ratio: float, tts_ratio: float, index: int) -> dict[str, int]:
    """Examples of each kind in micro-batch `index`: floor(ratio * examples so far) differences, so the
    fractions hold exactly over the run and every batch is within one example of them."""
    before, after = index * batch_size, (index + 1) * batch_size
    audio = math.floor(after * audio_ratio + 1e-9) - math.floor(before * audio_ratio + 1e-9)
    upto_tts = math.floor(after * (audio_ratio + tts_ratio) + 1e-9) - math.floor(
        before * (audio_ratio + tts_ratio) + 1e-9
    )
    return {"audio": audio, "tts": upto_tts - audio, "text": batch_size - upto_tts}


class HeldOut:
    """FeatureDataset `keep`: utterances on one side of the held-out split (picklable for workers)."""

    def __init__(self, fraction: float, seed: int, held_out: bool):
        self.fraction, self.seed, self.held_out = fraction, seed, held_out

    def __call__(self, utt_id: str) -> bool:
        return is_held_out(utt_id, self.fraction, self.seed) == self.held_out


class StoreStream:
    """Stored utterances for one kind, forever: a new epoch starts when this rank's share runs out.

    `position` (epoch, items taken this epoch) is saved in checkpoints; resuming seeks there without reading
    the items already taken (FeatureDataset.set_epoch).
    """

    def __init__(
        self,
        url: str,
        keep: Callable[[str], bool],
        seed: int,
        shuffle_buffer: int,
        num_workers: int,
        position: tuple[int, int] = (0, 0),
        skip_damaged: bool = False,
    ):
        self.dataset = FeatureDataset(
            url, shuffle=True, seed=seed, shuffle_buffer=shuffle_buffer, keep=keep, skip_damaged=skip_damaged
        )
        self.epoch, self.taken = position
        self._items = endless_epochs(
            self.dataset, seed, self.epoch, self.taken, batch_size=None, num_workers=num_workers
        )

    def take(self, count: int) -> list[dict[str, Any]]:
        items = []
        for _ in range(count):
            self.epoch, self.taken, item = next(self._items)
            items.append(item)
        return items

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.taken


class TextStream:
    """Training sentences, reshuffled each epoch (seed + epoch); rank r of W takes every W-th one."""

    def __init__(
        self, rows: Sequence[TextRow], seed: int, rank: int, world_size: int, position: tuple[int, int] = (0, 0)
    ):
        self.rows, self.seed, self.rank, self.world_size = list(rows), seed, rank, world_size
        self.epoch, self.taken = position
        if len(self.rows) < world_size:
            raise WhistleError(f"{len(self.rows)} training sentences cannot be shared by {world_size} processes")
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
        return order[self.rank :: self.world_size][: len(self.rows) // self.world_size]  # equal shares

    def take(self, count: int) -> list[TextRow]:
        out = []
        for _ in range(count):
            if self.taken == len(self._order):
                self.epoch, self.taken = self.epoch + 1, 0
                self._order = self._epoch_order()
            out.append(self.rows[self._order[self.taken]])
            self.taken += 1
        return out

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.taken


def stored_examples(kind: str, items: Sequence[dict[str, Any]]) -> list[Example]:
    return [Example(kind, item["text"], item["language"], item["states"]) for item in items]


def text_examples(rows: Sequence[TextRow]) -> list[Example]:
    return [Example("text", row.text, row.language) for row in rows]


def held_out_store_examples(
    url: str, kind: str, keep: Callable[[str], bool], size: int, skip_damaged: bool
) -> list[Example]:
    """The first `size` held-out utterances of a store, in store order."""
    return stored_examples(kind, held_out_items(url, keep, size, skip_damaged))


@dataclass
class TextSplit:
    """The target-domain sentences: for training, held out for validation, and not usable (with the reason)."""

    train: list[TextRow]
    held_out: list[TextRow]
    rejects: list[TextReject]


def read_text(
    settings: FinetuneConfig,
    tokenizer: Any,
    specials: SpecialTokens,
    max_positions: int,
    tle_languages: Sequence[str] | None,
) -> TextSplit:
    """finetune.text, split by the stable hash of each id; refuses a corpus with no training sentence.
    `tle_languages`: the languages the TLE knows (None: no TLE, any language the teacher has)."""
    corpus = read_corpus(
        settings.text,
        text_column=settings.text_column,
        language=settings.language,
        language_column=settings.language_column,
        split=settings.text_split,
    )
    rows, rejects = usable_rows(corpus.rows, tokenizer, specials, max_positions, tle_languages)
    split = TextSplit(
        [r for r in rows if not is_held_out(r.id, settings.val_fraction, settings.seed)],
        [r for r in rows if is_held_out(r.id, settings.val_fraction, settings.seed)],
        corpus.rejects + rejects,
    )
    if not split.train:
        raise WhistleError(
            f"no usable training sentence in {settings.text} ({len(split.rejects)} rejected, "
            f"{len(split.held_out)} held out)"
        )
    log.info(
        "text: %s; %d for training, %d held out, %d not usable",
        corpus.summary(),
        len(split.train),
        len(split.held_out),
        len(split.rejects),
    )
    return split


def usable_rows(
    rows: Sequence[TextRow],
    tokenizer: Any,
    specials: SpecialTokens,
    max_positions: int,
    tle_languages: Sequence[str] | None,
) -> tuple[list[TextRow], list[TextReject]]:
    """Rows the tokenizer, the decoder and the TLE (if any) can take; the others with the reason (never mid-run)."""
    kept, rejects = [], []
    for row in rows:
        if tle_languages is not None and row.language not in tle_languages:
            rejects.append(TextReject(row.id, f"language {row.language!r}: the TLE knows {', '.join(tle_languages)}"))
        elif specials.multilingual and row.language not in specials.languages:
            rejects.append(TextReject(row.id, f"language {row.language!r} has no token in this Whisper"))
        elif len(specials.prefix(row.language)) + len(text_tokens(tokenizer, row.text)) > max_positions:
            rejects.append(TextReject(row.id, f"longer than the decoder's {max_positions} positions"))
        else:
            kept.append(row)
    return kept, rejects


def unusable_utterances(
    reader: StoreReader, kind: str, tokenizer: Any, specials: SpecialTokens, max_positions: int, damaged: frozenset[int]
) -> list[dict[str, str]]:
    """The stored utterances of `kind` the decoder cannot take (transcript_problem), with the reason: left out
    of training and validation and counted, as train-tle leaves them out, never stopping the run mid-way.
    Reads the shards' small arrays only (the `damaged` shards, left out whole, are not read)."""
    rejects = []
    for shard in reader.shards():
        if shard in damaged:
            continue
        index = reader.index(shard)
        for utt_id, text, language in zip(index.ids, index.texts, index.languages):
            problem = transcript_problem(tokenizer, specials, text, language, max_positions)
            if problem:
                rejects.append({"store": kind, "id": utt_id, "reason": problem})
    return rejects


def load_tle(path: str, teacher: TeacherInfo, device: Any) -> TLEModel:
    """The frozen TLE; refuses one trained against another teacher geometry."""
    try:
        tle = TLEModel.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise WhistleError(
            f"cannot load the TLE from {path!r}: {err}. Give a `whistle train-tle` output folder."
        ) from err
    if tle.config.teacher:
        check_teacher(
            TeacherInfo.from_dict(tle.config.teacher),
            teacher,
            f"the TLE in {path}",
            "Fine-tune the teacher the TLE learned from, or train a TLE on this teacher's store.",
            "TLE",
        )
    tle.spelled_languages()  # warns here for each language its front end reads by spelling
    return tle.requires_grad_(False).eval().to(device)
