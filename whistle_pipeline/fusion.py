"""Shallow fusion: a word n-gram LM of the domain text added to Whisper's beam search scores.

    lm = build_domain_lm(domain_texts, "domain.arpa", order=3)
    fusion = ShallowFusion(load_scorer(lm), tokenizer, alpha=0.3, beta=1.0, top_k=2 * num_beams)
    model.generate(input_features, num_beams=num_beams, logits_processor=[fusion])

What is added. transformers' beam search (`_beam_search`) takes the decoder's logits, applies
log-softmax, then the logits processors, and adds the result to each beam's running score, so a
processor's additions are summed over the decoded tokens. `ShallowFusion` adds, for a candidate token c
on a beam whose transcript so far holds the completed words h (after <s>) and the partial word P (the
tokens since the last word start):

- c starts a word (a space-prefixed byte-level BPE piece, or the first transcript token) or c is
  <|endoftext|>: P is complete, and its words w (P decoded and normalised as `lm_words` does, so one
  piece may give 0, 1 or more words) get  alpha * sum ln P_LM(w_i | h, w_1..w_{i-1}) + beta * |w|,
  plus, for <|endoftext|>, alpha * ln P_LM(</s> | h, w);
- every candidate also gets the change of a *partial-word potential* phi: phi(h, P) = alpha * ln
  P_LM(<unk> | h) when P can no longer become a word of the LM (its normalised last word is no prefix of
  an LM word), else 0; the potential is removed again when the word completes.

Summed over a finished transcript the potentials cancel, so the total is exactly
alpha * ln P_LM(sentence) + beta * (its words): Whisper-LM's (arXiv 2503.23542) score, added word by
word as the words complete (Whisper-LM rescores the whole text at every step) plus pyctcdecode's
early penalty for partial words that cannot become in-vocabulary words; without it a beam could avoid
the LM's verdict by never ending a word. alpha weighs ln probabilities (KenLM's log10 scores are
converted), beta is a bonus per LM word that offsets the LM's preference for short transcripts.

Which tokens. Only each row's `top_k` tokens by the acoustic log-probability are kept (the rest get
-inf), as Whisper-LM re-ranks only the acoustic top candidates: it bounds the cost, and an LM that can
only lower scores (beta aside) must not promote tokens the acoustic model never proposed. Beam search
keeps 2 x num_beams candidates per step, so with `top_k >= 2 * num_beams` and alpha = beta = 0 the
result is plain beam search, token for token. Transcript tokens are those after the last
<|startoftranscript|> (prompt ids and the forced language/task/notimestamps prefix are never scored);
tokens from <|endoftext|> on (specials, timestamps) get no LM score except <|endoftext|> itself.

Cost per decoding step: for each of batch x num_beams rows, one pass over its transcript tokens and,
for each of top_k candidates, one tokenizer decode of the partial word, one normalisation and one
bisection in the LM vocabulary; LM queries are cached per (context, word). On CPU that is roughly
0.1-1 ms per row and step, small beside a Whisper decoder step of a real model, but not free.

Known weak spots: the normaliser runs per whitespace word (`lm_words`), so multi-word number phrases
("twenty five") are not merged as the WER's normaliser merges them; the LM's context is the current
window's transcript only (not the prompt); decoding with timestamps is not scored between segments.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import normalize
from whistle_pipeline.ngram import BOS, EOS, UNK, build_kneser_ney, write_arpa
from whistle_pipeline.text import SpecialTokens

LN10 = math.log(10.0)  # ARPA and KenLM give log10 probabilities
SPACE_PIECE = "Ġ"  # byte-level BPE's picture of the space byte: a piece that starts with it starts a word
UNFINISHED_CHARACTER = "\ufffd"  # what decoding gives for a character whose UTF-8 bytes are split across tokens
DEFAULT_ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0)
DEFAULT_BETAS = (0.0, 1.0, 2.0)


@functools.lru_cache(maxsize=1 << 16)
def _normalized_piece(piece: str, language: str) -> tuple[str, ...]:
    return tuple(normalize(piece, language).split())


def lm_words(text: str, language: str = "en") -> list[str]:
    """`text`'s words for the LM: each whitespace-separated piece normalised on its own with the WER's
    normaliser (`metrics.normalize`), so the decoder's words, which complete one at a time, and the LM's
    training text are normalised the same way."""
    return [word for piece in text.split() for word in _normalized_piece(piece, language)]


def build_domain_lm(
    texts: Iterable[str], path: str | Path, order: int = 3, language: str = "en", discount: float | None = None
) -> Path:
    """Build an interpolated modified Kneser-Ney LM of `texts` (one sentence per text, `lm_words`) and
    write it as an ARPA file at `path`; returns the path."""
    sentences = [words for words in (lm_words(text, language) for text in texts) if words]
    return write_arpa(build_kneser_ney(sentences, order, discount), path)


class ShallowFusion(LogitsProcessor):
    """A transformers LogitsProcessor adding alpha * ln P_LM + beta per completed word (module docstring).

    scorer: an `ngram.ArpaScorer` or `ngram.KenlmScorer`; tokenizer: the Whisper model's tokenizer;
    language: the normaliser's language (as `metrics.normalize`).
    """

    def __init__(
        self, scorer: Any, tokenizer: Any, alpha: float, beta: float = 0.0, language: str = "en", top_k: int = 10
    ):
        if top_k < 1:
            raise WhistleError(f"top_k must be at least 1, not {top_k}")
        specials = SpecialTokens.from_tokenizer(tokenizer, multilingual=False)
        self.start, self.end = specials.start_of_transcript, specials.end_of_text
        self.starts_word = [
            piece.startswith(SPACE_PIECE) for piece in tokenizer.convert_ids_to_tokens(list(range(self.end)))
        ]
        self.scorer, self.tokenizer = scorer, tokenizer
        self.alpha, self.beta, self.language, self.top_k = alpha, beta, language, top_k
        self.lm_vocabulary = sorted(scorer.vocabulary - {BOS, EOS, UNK})
        self._known = frozenset(self.lm_vocabulary)
        self._ln_prob: dict[tuple[tuple[str, ...], str], float] = {}
        self._words: dict[tuple[int, ...], tuple[str, ...]] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids (R, T) the beams' tokens so far, scores (R, V) log-probabilities -> (R, V) fused scores."""
        top_scores, top_ids = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)  # (R, k)
        added = [self._row_additions(row, candidates) for row, candidates in zip(input_ids.tolist(), top_ids.tolist())]
        fused = torch.full_like(scores, -math.inf)  # (R, V)
        return fused.scatter_(1, top_ids, top_scores + torch.tensor(added, dtype=scores.dtype, device=scores.device))

    def _row_additions(self, row: list[int], candidates: list[int]) -> list[float]:
        history, partial = self._split(row)
        before = self._potential(history, partial)
        additions = []
        for token in candidates:
            if token == self.end:
                completed, after = self._complete(history, partial)
                additions.append(completed - before + self.alpha * self._ln(after, EOS))
            elif token > self.end:  # language, task, timestamp tokens: no words
                additions.append(0.0)
            elif self.starts_word[token] or not partial:
                completed, after = self._complete(history, partial)
                additions.append(completed - before + self._potential(after, (token,)))
            else:
                additions.append(self._potential(history, partial + (token,)) - before)
        return additions

    def _split(self, row: list[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(<s> + the completed words, the tokens of the unfinished last word) of a beam's transcript."""
        start = len(row) - row[::-1].index(self.start) if self.start in row else 0
        tokens = [token for token in row[start:] if token < self.end]
        words: list[str] = [BOS]
        word_start = 0
        for i in range(1, len(tokens)):
            if self.starts_word[tokens[i]]:
                words += self._decoded_words(tuple(tokens[word_start:i]))
                word_start = i
        return tuple(words), tuple(tokens[word_start:])

    def _decoded_words(self, tokens: tuple[int, ...]) -> tuple[str, ...]:
        if tokens not in self._words:
            text = self.tokenizer.decode(list(tokens)).rstrip(UNFINISHED_CHARACTER)
            self._words[tokens] = tuple(lm_words(text, self.language))
        return self._words[tokens]

    def _complete(self, history: tuple[str, ...], partial: tuple[int, ...]) -> tuple[float, tuple[str, ...]]:
        """The score of finishing `partial` as a word after `history`, and the history after it."""
        score = 0.0
        for word in self._decoded_words(partial):
            score += self.alpha * self._ln(history, word) + self.beta
            history += (word,)
        return score, history

    def _potential(self, history: tuple[str, ...], partial: tuple[int, ...]) -> float:
        """alpha * ln P(<unk> | history) when `partial` can no longer become LM words, else 0."""
        if not self.alpha or self._viable(self._decoded_words(partial)):
            return 0.0
        return self.alpha * self._ln(history, UNK)

    def _viable(self, words: tuple[str, ...]) -> bool:
        """Whether the words are LM words but the last, which starts some LM word."""
        if not words:
            return True
        if any(word not in self._known for word in words[:-1]):
            return False
        at = bisect.bisect_left(self.lm_vocabulary, words[-1])
        return at < len(self.lm_vocabulary) and self.lm_vocabulary[at].startswith(words[-1])

    def _ln(self, history: tuple[str, ...], word: str) -> float:
        key = (history[-(self.scorer.order - 1) :] if self.scorer.order > 1 else (), word)
        if key not in self._ln_prob:
            self._ln_prob[key] = LN10 * self.scorer.log10_prob(key[0], word)
        return self._ln_prob[key]


@dataclass(frozen=True)
class FusionFit:
    """The chosen weights, their WER, and every (alpha, beta, WER) tried, in grid order."""

    alpha: float
    beta: float
    wer: float
    grid: tuple[tuple[float, float, float], ...]


def fit_alpha_beta(
    wer_of: Callable[[float, float], float],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
) -> FusionFit:
    """The (alpha, beta) of the grid with the lowest WER, `wer_of(alpha, beta)` being e.g. a dev split's
    WER decoded with `ShallowFusion(..., alpha, beta)`. Ties go to the first in grid order (alphas outer,
    betas inner, as given), so list the weights you prefer first. Costs len(alphas) x len(betas) calls."""
    if not alphas or not betas:
        raise WhistleError("fit_alpha_beta needs at least one alpha and one beta")
    grid = tuple((alpha, beta, float(wer_of(alpha, beta))) for alpha in alphas for beta in betas)
    alpha, beta, wer = min(grid, key=lambda point: point[2])  # min keeps the first of equal WERs
    return FusionFit(alpha, beta, wer, grid)
