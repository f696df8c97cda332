"""Word and character error rates the way Whisper is scored: normalise both sides, then align with jiwer.

English text goes through Whisper's English normaliser (transformers' `EnglishTextNormalizer`:
lower case, numbers and currency to digits, contractions, British -> American spelling). That
normaliser needs OpenAI's spelling map, which the hub ships as `normalizer.json`; whistle ships the
same MIT-licensed file as ``whistle_pipeline/data/english_spelling.json`` so scoring works offline.
Other languages use Whisper's basic normaliser (lower case, symbols and brackets removed); for
languages written without spaces it splits the text into characters, so "WER" counts characters::

    rates = error_rates(["The colour is 20%."], ["the color is twenty percent"], "en")
    rates.wer  # 0.0
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer

from whistle_pipeline.errors import WhistleError

UNSPACED_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "my", "km", "bo"})  # no spaces between words


def english_spelling_path() -> Path:
    """OpenAI Whisper's British -> American spelling map (MIT), shipped with whistle: see data/NOTICE."""
    return Path(__file__).with_name("data") / "english_spelling.json"


@dataclass(frozen=True)
class ErrorRates:
    """Corpus-level rates: errors summed over utterances, divided by the reference's words (characters)."""

    wer: float
    cer: float
    n_words: int
    n_chars: int
    substitutions: int
    deletions: int
    insertions: int
    n_utterances: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@functools.cache
def normalizer(language: str) -> Callable[[str], str]:
    """The text normaliser Whisper's evaluations use for `language` (a Whisper code: "en", "de", "yue", ...)."""
    # imported on use: transformers is slow to import, and import-ct2 reads this module (english_spelling_path)
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if language == "en":
        with open(english_spelling_path(), encoding="utf-8") as handle:
            return EnglishTextNormalizer(json.load(handle))
    return BasicTextNormalizer(remove_diacritics=False, split_letters=language in UNSPACED_LANGUAGES)


def normalize(text: str, language: str) -> str:
    """`text` normalised for scoring, whitespace collapsed to single spaces."""
    return " ".join(normalizer(language)(text).split())


def error_rates(references: Sequence[str], hypotheses: Sequence[str], language: str) -> ErrorRates:
    """WER and CER of `hypotheses` against `references` after normalising both for `language`.

    Utterances whose reference normalises to nothing add their hypothesis words as insertions.
    Raises WhistleError if the lists differ in length or no reference has a word left.
    """
    if len(references) != len(hypotheses):
        raise WhistleError(f"{len(references)} references but {len(hypotheses)} hypotheses: they must pair up")
    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    # jiwer < 4 refuses empty references, so those pairs are counted here.
    empty = [i for i, r in enumerate(refs) if not r]
    kept = [i for i, r in enumerate(refs) if r]
    if not kept:
        raise WhistleError(
            f"none of the {len(refs)} reference(s) has a word left after normalisation; nothing to score"
        )
    words = jiwer.process_words([refs[i] for i in kept], [hyps[i] for i in kept])
    chars = jiwer.process_characters([refs[i] for i in kept], [hyps[i] for i in kept])
    extra_words = sum(len(hyps[i].split()) for i in empty)
    extra_chars = sum(len(hyps[i]) for i in empty)
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    word_errors = words.substitutions + words.deletions + words.insertions + extra_words
    char_errors = chars.substitutions + chars.deletions + chars.insertions + extra_chars
    return ErrorRates(
        wer=word_errors / n_words,
        cer=char_errors / n_chars,
        n_words=n_words,
        n_chars=n_chars,
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions + extra_words,
        n_utterances=len(refs),
    )


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str], languages: Sequence[str]) -> float:
    """Corpus WER over utterances of several languages: each pair normalised for its own language, word
    errors summed over all of them and divided by all reference words (`error_rates` per language)."""
    if not len(references) == len(hypotheses) == len(languages):
        raise WhistleError(
            f"{len(references)} references, {len(hypotheses)} hypotheses and {len(languages)} "
            "languages: they must pair up"
        )
    errors = words = 0.0
    for language in sorted(set(languages)):
        picked = [i for i, code in enumerate(languages) if code == language]
        try:
            rates = error_rates([references[i] for i in picked], [hypotheses[i] for i in picked], language)
        except WhistleError:
            if len(set(languages)) == 1:
                raise
            continue  # this language's references are all empty after normalisation; others still score
        errors += rates.wer * rates.n_words
        words += rates.n_words
    if not words:
        raise WhistleError("no reference transcript has a word left after normalisation: cannot compute a WER")
    return errors / words
