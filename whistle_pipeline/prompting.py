"""Decoder prompts for Whisper: a domain's words given as previous-segment text, no training.

Whisper reads a prompt as the text that came before the clip::

    <|startofprev|> t_1 ... t_m   <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|> ...

with t_1 ... t_m = `tokenizer(" " + text)` (a leading space, no special tokens). `prompt_ids` builds
exactly what transformers' `WhisperTokenizer.get_prompt_ids` builds, for any Whisper tokenizer (also a
bare `PreTrainedTokenizerFast` loaded from a tokenizer.json), as a list; pass
`torch.tensor(ids)` to `WhisperForConditionalGeneration.generate(prompt_ids=...)`.

Budget. Whisper was trained with at most `max_target_positions // 2 - 1` previous tokens (223 of 448:
openai-whisper cuts the prompt to its last 223 tokens, transformers cuts previous segments to the same
length), so longer prompts are cut to that many text tokens after <|startofprev|>. The cut drops whole
words from the START: Whisper conditions most on the most recent tokens, just before the transcript,
so `prompt_from_terms` writes the most important term LAST and lets the least important ones fall off
the front. transformers does not cut a short-form prompt itself; it refuses one whose length plus
`max_new_tokens` passes `max_target_positions`, so leave room for the transcript.

`domain_terms` derives a word list from text: the words of the target-domain text that the source
text and a general vocabulary lack, most frequent first. Words are compared after the normalisation
the project's WER uses (`whistle_pipeline.metrics.normalize`: lower case, punctuation removed,
numbers as digits for English), so a term is written the way it is scored.

Cost: one tokenizer call per prompt (`prompt_ids`) or per candidate prefix of the term list
(`prompt_from_terms`, at most a few hundred short calls); `domain_terms` is linear in the text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import normalize
from whistle_pipeline.text import text_tokens

MAX_TARGET_POSITIONS = 448  # every Whisper's decoder length
START_OF_PREVIOUS = "<|startofprev|>"
END_OF_TEXT = "<|endoftext|>"
TERM_SEPARATOR = ", "  # a comma-separated list reads like text Whisper saw, and keeps multi-word terms apart


def prompt_budget(max_target_positions: int = MAX_TARGET_POSITIONS) -> int:
    """Text tokens a prompt may carry after <|startofprev|>: half the decoder's positions minus one."""
    return max_target_positions // 2 - 1  # 223 for 448


def _start_of_previous(tokenizer: Any) -> int:
    token_id = tokenizer.get_vocab().get(START_OF_PREVIOUS)
    if token_id is None:
        raise WhistleError(
            f"the tokenizer {type(tokenizer).__name__} has no {START_OF_PREVIOUS} token: it is not "
            "a Whisper tokenizer, so it cannot build a Whisper prompt"
        )
    return token_id


def _check_plain_text(tokenizer: Any, ids: Sequence[int], text: str) -> None:
    """Refuse prompts whose text spells a special token, as get_prompt_ids does (Whisper's special tokens
    all come after the byte-level BPE pieces, from <|endoftext|> on)."""
    first_special = tokenizer.get_vocab()[END_OF_TEXT]
    found = [token_id for token_id in ids if token_id >= first_special]
    if found:
        raise WhistleError(
            f"the prompt {text[:60]!r} contains the special token "
            f"{tokenizer.convert_ids_to_tokens(found[0])}: write it as plain text"
        )


def prompt_ids(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """<|startofprev|> + tokenizer(" " + text), cut to `max_tokens` text tokens (default `prompt_budget()`).

    Words are dropped from the start of `text` until the rest fits; a single word longer than the
    budget keeps its last `max_tokens` tokens. Raises WhistleError for an empty text or one that
    contains a special token.
    """
    budget = prompt_budget() if max_tokens is None else max_tokens
    words = text.split()
    if not words:
        raise WhistleError("the prompt is empty: give some text or terms")
    ids = text_tokens(tokenizer, text)
    _check_plain_text(tokenizer, ids, text)
    if len(ids) > budget:
        ids = _last_words(tokenizer, words, budget)
    return [_start_of_previous(tokenizer)] + ids


def _last_words(tokenizer: Any, words: list[str], budget: int) -> list[int]:
    """The tokens of the longest run of final words that fits `budget` (byte-level BPE splits text at
    spaces, so " w_1 ... w_n" is the concatenation of each " w_i"'s tokens)."""
    kept: list[int] = []
    for word in reversed(words):
        word_ids = text_tokens(tokenizer, word)
        if len(kept) + len(word_ids) > budget:
            return kept if kept else word_ids[-budget:]
        kept = word_ids + kept
    return kept


def prompt_from_terms(tokenizer: Any, terms: Sequence[str], max_tokens: int | None = None) -> list[int]:
    """Prompt ids for a term list given most important first: as many leading terms as fit the budget,
    written in reverse order ("t_k, ..., t_2, t_1"), so the most important term sits next to the
    transcript and truncation never splits a term. Raises WhistleError if not even one term fits."""
    budget = prompt_budget() if max_tokens is None else max_tokens
    terms = [term.strip() for term in terms if term.strip()]
    if not terms:
        raise WhistleError("no terms to prompt with: the term list is empty")
    fitting = 0
    while fitting < len(terms) and len(text_tokens(tokenizer, _joined(terms[: fitting + 1]))) <= budget:
        fitting += 1
    if not fitting:
        raise WhistleError(f"the first term {terms[0][:60]!r} alone is longer than the prompt's {budget} tokens")
    return prompt_ids(tokenizer, _joined(terms[:fitting]), budget)


def _joined(terms: Sequence[str]) -> str:
    return TERM_SEPARATOR.join(reversed(terms))


def normalized_words(text: str, language: str = "en") -> list[str]:
    """`text`'s words as the WER counts them (`metrics.normalize`), keeping only words with a letter:
    numbers and symbols are no domain terms."""
    return [word for word in normalize(text, language).split() if any(char.isalpha() for char in word)]


def domain_terms(
    target_text_rows: Iterable[str],
    general_vocabulary: Iterable[str] = (),
    source_text_rows: Iterable[str] = (),
    max_terms: int | None = None,
    language: str = "en",
) -> list[str]:
    """The words of the target text that neither the source text nor `general_vocabulary` contains.

    Every text (and every vocabulary entry) is normalised with `normalized_words` for `language`.
    Ordered by count in the target text, most frequent first; equal counts in alphabetical order, so
    the list depends on the texts, not on their row order. At most `max_terms` (None: all).
    """
    known: set[str] = set()
    for row in list(general_vocabulary) + list(source_text_rows):
        known.update(normalized_words(row, language))
    counts = Counter(word for row in target_text_rows for word in normalized_words(row, language))
    ranked = sorted((word for word in counts if word not in known), key=lambda word: (-counts[word], word))
    return ranked if max_terms is None else ranked[:max_terms]
