"""The one token convention shared by train-tle and finetune.

For a transcript in language `lang`, Whisper's decoder reads and predicts::

    decoder_input_ids  <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>  t_1 ... t_n
    labels             -100                  [-100     -100         ]  t_1             t_2 ... <|endoftext|>

labels[j] is the token that follows decoder input j: the prefix is given, never predicted, and −100
appears only in `labels`. Language and task tokens are written only for multilingual models
(English-only models such as tiny.en never saw them). The text tokens t_1 ... t_n are
`tokenizer(" " + text)`: Whisper's transcripts start with a space-prefixed token, and without it the
first token's cross-entropy on real audio was 10.1 instead of 2.5 (docs/tle.md).

The TLE reads t_1 ... t_n <|endoftext|> — the same text tokens plus the end token, whose duration is
the silence after speech. The language enters the TLE as an embedding, not as a token. Every id comes
from the tokenizer; none is hard-coded (they differ between Whisper versions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.pronunciation import PronunciationBatch, PronunciationFrontEnd

IGNORE_INDEX = -100  # labels only: positions the cross-entropy skips


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a special token, or None when the tokenizer does not have it.

    Whisper tokenizers map unknown tokens to <|endoftext|>, so `convert_tokens_to_ids` alone cannot
    tell a missing token from the end token: look in the vocabulary.
    """
    return tokenizer.get_vocab().get(token)


@dataclass(frozen=True)
class SpecialTokens:
    """The special-token ids of one Whisper tokenizer, read from it (never hard-coded)."""

    start_of_transcript: int
    end_of_text: int
    no_timestamps: int
    transcribe: int | None  # None for English-only models: they get no language/task tokens
    languages: dict[str, int]  # language code -> <|code|> id; empty for English-only models

    @property
    def multilingual(self) -> bool:
        return self.transcribe is not None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, multilingual: bool) -> SpecialTokens:
        """Read the ids; `multilingual` says whether the model was trained with language/task tokens."""
        names = ["<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"]
        if multilingual:
            names.append("<|transcribe|>")
        ids = {name: _token_id(tokenizer, name) for name in names}
        missing = [name for name, token_id in ids.items() if token_id is None]
        if missing:
            raise WhistleError(
                f"the tokenizer {type(tokenizer).__name__} has no {', '.join(missing)}: it is not a Whisper "
                "tokenizer. Use the tokenizer saved with the teacher model (save_pretrained / import-ct2)."
            )
        languages: dict[str, int] = {}
        if multilingual:
            from transformers.models.whisper.tokenization_whisper import LANGUAGES

            vocab = tokenizer.get_vocab()
            languages = {code: vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        return cls(
            start_of_transcript=ids["<|startoftranscript|>"],
            end_of_text=ids["<|endoftext|>"],
            no_timestamps=ids["<|notimestamps|>"],
            transcribe=ids.get("<|transcribe|>"),
            languages=languages,
        )

    def prefix(self, language: str) -> list[int]:
        """The decoder prompt for transcribing `language` without timestamps."""
        if not self.multilingual:
            return [self.start_of_transcript, self.no_timestamps]
        if language not in self.languages:
            raise WhistleError(
                f"language {language!r} has no <|{language}|> token in this Whisper tokenizer; "
                f"use one of its codes: {', '.join(sorted(self.languages))}"
            )
        return [self.start_of_transcript, self.languages[language], self.transcribe, self.no_timestamps]


def is_multilingual(whisper_config: Any, generation_config: Any = None) -> bool:
    """Whether a Whisper model reads language/task tokens: its generation config says so, else its vocabulary.

    English-only checkpoints have 51864 tokens, multilingual ones 51865 or more (transformers' own rule).
    """
    flag = getattr(generation_config, "is_multilingual", None)
    if flag is not None:
        return bool(flag)
    return whisper_config.vocab_size >= 51865


def text_tokens(tokenizer: Any, text: str) -> list[int]:
    """The transcript's tokens as Whisper writes them: `tokenizer(" " + text)`, no special tokens."""
    return tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]


def transcript_problem(
    tokenizer: Any, specials: SpecialTokens, text: str, language: str, max_positions: int
) -> str | None:
    """Why encode_texts would refuse this stored transcript (the reason a stage records when it leaves the
    utterance out instead of stopping), or None when it is usable."""
    if not text.strip():
        return "empty transcript"
    if specials.multilingual and language not in specials.languages:
        return f"language {language!r} has no token in the teacher's tokenizer"
    prompt = len(specials.prefix(language))
    # byte-level BPE: every token covers at least one byte, so only long texts need tokenising here
    if len((" " + text.strip()).encode()) + prompt <= max_positions:
        return None
    n_tokens = len(text_tokens(tokenizer, text))
    if n_tokens + prompt > max_positions:
        return f"{n_tokens} text tokens exceed the decoder's {max_positions} positions"
    return None


@dataclass
class TextBatch:
    """Padded token tensors for a batch of transcripts (right padding).

    tle_tokens        (B, L) long  text tokens + <|endoftext|>, padded with <|endoftext|>
    tle_mask          (B, L) bool  True on real TLE tokens
    decoder_input_ids (B, S) long  prefix + text tokens, padded with <|endoftext|> (the causal mask
                                   keeps padding from reaching earlier positions, so no decoder mask)
    labels            (B, S) long  next tokens; -100 on prefix positions and padding
    prefix_length     int          P: labels[:, P - 1 + i] is TLE token i (text tokens, then the end)
    pronunciation     PronunciationBatch of the TLE tokens (encode_texts with a front end), else None
    """

    tle_tokens: torch.Tensor
    tle_mask: torch.Tensor
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor
    prefix_length: int
    texts: list[str]
    languages: list[str]
    pronunciation: PronunciationBatch | None = None

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(
            self.tle_tokens.to(device),
            self.tle_mask.to(device),
            self.decoder_input_ids.to(device),
            self.labels.to(device),
            self.prefix_length,
            self.texts,
            self.languages,
            None if self.pronunciation is None else self.pronunciation.to(device),
        )


def encode_texts(
    tokenizer: Any,
    specials: SpecialTokens,
    texts: Sequence[str],
    languages: Sequence[str],
    max_positions: int,
    front_end: PronunciationFrontEnd | None = None,
) -> TextBatch:
    """Tokenise transcripts into the TLE's input and the decoder's input/labels (see the module docstring).

    `max_positions` is the decoder's `max_target_positions` (448 for every Whisper): longer transcripts
    raise, naming the text. With a `front_end` (a TLE's `front_end`) the batch also holds each TLE
    token's pronunciation (cheap enough for a collate function or DataLoader worker).
    """
    if len(texts) != len(languages):
        raise ValueError(f"{len(texts)} texts but {len(languages)} languages")
    prefixes = [specials.prefix(language) for language in languages]
    prefix_length = len(prefixes[0])  # the same for every language of one model
    for text in texts:
        if not text.strip():
            raise WhistleError(f"empty transcript {text!r}: every example needs text (drop it from the data)")
    tokens = [text_tokens(tokenizer, text) for text in texts]
    for text, ids in zip(texts, tokens):
        if prefix_length + len(ids) > max_positions:
            raise WhistleError(
                f"transcript of {len(ids)} tokens is longer than the decoder's {max_positions} positions "
                f"allow with its {prefix_length}-token prompt: {text[:80]!r}…; split it or drop it"
            )
    end = specials.end_of_text
    longest = max(len(ids) for ids in tokens)
    batch = len(texts)
    tle_tokens = torch.full((batch, longest + 1), end, dtype=torch.long)  # (B, L)
    tle_mask = torch.zeros((batch, longest + 1), dtype=torch.bool)  # (B, L)
    decoder_input_ids = torch.full((batch, prefix_length + longest), end, dtype=torch.long)  # (B, S)
    labels = torch.full((batch, prefix_length + longest), IGNORE_INDEX, dtype=torch.long)  # (B, S)
    for b, (prefix, ids) in enumerate(zip(prefixes, tokens)):
        n = len(ids)
        tle_tokens[b, :n] = torch.tensor(ids)
        tle_mask[b, : n + 1] = True
        decoder_input_ids[b, : prefix_length + n] = torch.tensor(prefix + ids)
        labels[b, prefix_length - 1 : prefix_length + n] = torch.tensor(ids + [end])
    pronunciation = None if front_end is None else front_end.encode_batch(tokenizer, tle_tokens, tle_mask, languages)
    return TextBatch(
        tle_tokens, tle_mask, decoder_input_ids, labels, prefix_length, list(texts), list(languages), pronunciation
    )
