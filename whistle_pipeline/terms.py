"""Rare-word (domain term) error rates, as the contextual-biasing literature reports them.

Inputs: reference/hypothesis transcript pairs, a language, and a term list (single- or multi-word
terms, e.g. `prompting.domain_terms`'s output or a user's list). Every text and every term is
normalised the way the project's WER is (`whistle_pipeline.metrics.normalize`), and each pair's words
are aligned by the same alignment the WER counts (jiwer's minimum-edit alignment, `process_words`).

Term occurrences. In a word sequence the occurrences are found left to right, longest term first at
each position, never overlapping ("new york city" wins over "new york" where both start).

- **term error rate** = missed / reference occurrences. A reference occurrence is *recognised* when
  every one of its words is aligned as a match (`equal`) and the matched hypothesis words are
  consecutive (a word inserted inside a multi-word term breaks it); otherwise it is *missed*.
- **term insertions** = hypothesis occurrences that are not the recognised copy of a reference
  occurrence: terms written where the reference has no occurrence of them at that place (a false
  alarm, the cost of biasing too hard). Reported as a count and divided by the reference occurrences.
- **B-WER / U-WER** (biased and unbiased WER; Le et al. 2021, "Contextualized streaming end-to-end
  speech recognition with trie-based deep biasing and shallow fusion"): the word errors split by
  whether they touch a term. A substituted or deleted reference word is a B error when it lies inside
  a reference term occurrence, else a U error; an inserted hypothesis word is a B error when it lies
  inside a hypothesis term occurrence, else a U error. B-WER = B errors / reference words inside term
  occurrences; U-WER = U errors / the other reference words. B + U errors are exactly the WER's
  errors, so WER = (B errors + U errors) / all reference words.

Cost: one jiwer alignment per pair (O(reference words x hypothesis words)) and a linear scan for
occurrences (O(words x the longest term's length)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import normalize

Term = tuple[str, ...]
Span = tuple[int, int]  # [start, end) word positions


@dataclass(frozen=True)
class TermRates:
    """Corpus-level term counts (summed over utterances) and the rates derived from them."""

    reference_terms: int  # term occurrences in the references
    missed: int  # reference occurrences not recognised exactly
    inserted: int  # hypothesis occurrences that are not a recognised reference occurrence
    term_words: int  # reference words inside term occurrences
    term_word_errors: int  # B errors
    other_words: int  # the remaining reference words
    other_word_errors: int  # U errors
    n_utterances: int

    @property
    def term_error_rate(self) -> float | None:
        """missed / reference occurrences; None when no reference says a term."""
        return self.missed / self.reference_terms if self.reference_terms else None

    @property
    def insertion_rate(self) -> float | None:
        return self.inserted / self.reference_terms if self.reference_terms else None

    @property
    def biased_wer(self) -> float | None:
        return self.term_word_errors / self.term_words if self.term_words else None

    @property
    def unbiased_wer(self) -> float | None:
        return self.other_word_errors / self.other_words if self.other_words else None

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            **asdict(self),
            "term_error_rate": self.term_error_rate,
            "insertion_rate": self.insertion_rate,
            "biased_wer": self.biased_wer,
            "unbiased_wer": self.unbiased_wer,
        }


def normalized_terms(terms: Sequence[str], language: str) -> list[Term]:
    """Each term as its normalised words; terms that normalise to nothing are dropped, duplicates merged."""
    kept: dict[Term, None] = {}
    for term in terms:
        words = tuple(normalize(term, language).split())
        if words:
            kept[words] = None
    return list(kept)


def occurrences(words: Sequence[str], terms: Sequence[Term]) -> list[Span]:
    """Non-overlapping term occurrences in `words`, left to right, the longest term first at each start."""
    by_first: dict[str, list[Term]] = {}
    for term in sorted(terms, key=len, reverse=True):
        by_first.setdefault(term[0], []).append(term)
    spans, position = [], 0
    while position < len(words):
        match = next(
            (
                term
                for term in by_first.get(words[position], ())
                if tuple(words[position : position + len(term)]) == term
            ),
            None,
        )
        if match is None:
            position += 1
        else:
            spans.append((position, position + len(match)))
            position += len(match)
    return spans


@dataclass(frozen=True)
class Alignment:
    """A word alignment: the matched partner of each position (None if unmatched) and the error flags."""

    ref_match: list[int | None]  # per reference word: its equal hypothesis position
    hyp_match: list[int | None]  # per hypothesis word: its equal reference position
    ref_error: list[bool]  # substituted or deleted
    hyp_inserted: list[bool]


def align(ref: list[str], hyp: list[str]) -> Alignment:
    """jiwer's alignment (the one `metrics.error_rates` counts) as per-word matches and errors."""
    import jiwer

    aligned = Alignment([None] * len(ref), [None] * len(hyp), [False] * len(ref), [False] * len(hyp))
    if not ref:  # jiwer < 4 refuses empty references: every hypothesis word is an insertion
        aligned.hyp_inserted[:] = [True] * len(hyp)
        return aligned
    for chunk in jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]:
        if chunk.type == "equal":
            for offset in range(chunk.ref_end_idx - chunk.ref_start_idx):
                aligned.ref_match[chunk.ref_start_idx + offset] = chunk.hyp_start_idx + offset
                aligned.hyp_match[chunk.hyp_start_idx + offset] = chunk.ref_start_idx + offset
        elif chunk.type == "insert":
            aligned.hyp_inserted[chunk.hyp_start_idx : chunk.hyp_end_idx] = [True] * (
                chunk.hyp_end_idx - chunk.hyp_start_idx
            )
        else:  # substitute or delete
            aligned.ref_error[chunk.ref_start_idx : chunk.ref_end_idx] = [True] * (
                chunk.ref_end_idx - chunk.ref_start_idx
            )
    return aligned


def _matched_span(match: list[int | None], span: Span) -> Span | None:
    """Where `span`'s words went on the other side, if all are matched to consecutive positions."""
    start = match[span[0]]
    if start is None or any(match[i] != start + (i - span[0]) for i in range(*span)):
        return None
    return start, start + span[1] - span[0]


def _inside(spans: list[Span], length: int) -> list[bool]:
    flags = [False] * length
    for start, end in spans:
        flags[start:end] = [True] * (end - start)
    return flags


def _pair_counts(ref: list[str], hyp: list[str], terms: list[Term]) -> tuple[int, ...]:
    aligned = align(ref, hyp)
    ref_spans, hyp_spans = occurrences(ref, terms), occurrences(hyp, terms)
    recognised = {span for span in ref_spans if _matched_span(aligned.ref_match, span) is not None}
    inserted = sum(_matched_span(aligned.hyp_match, span) not in recognised for span in hyp_spans)
    in_ref_term, in_hyp_term = _inside(ref_spans, len(ref)), _inside(hyp_spans, len(hyp))
    term_words = sum(in_ref_term)
    term_errors = sum(e and t for e, t in zip(aligned.ref_error, in_ref_term)) + sum(
        i and t for i, t in zip(aligned.hyp_inserted, in_hyp_term)
    )
    other_errors = sum(e and not t for e, t in zip(aligned.ref_error, in_ref_term)) + sum(
        i and not t for i, t in zip(aligned.hyp_inserted, in_hyp_term)
    )
    return (
        len(ref_spans),
        len(ref_spans) - len(recognised),
        inserted,
        term_words,
        term_errors,
        len(ref) - term_words,
        other_errors,
    )


def term_rates(
    references: Sequence[str], hypotheses: Sequence[str], terms: Sequence[str], language: str = "en"
) -> TermRates:
    """Term error rate, term insertions and B-/U-WER of `hypotheses` (see the module docstring).

    Raises WhistleError if the lists do not pair up or no term is left after normalisation.
    """
    if len(references) != len(hypotheses):
        raise WhistleError(f"{len(references)} references but {len(hypotheses)} hypotheses: they must pair up")
    normalised = normalized_terms(terms, language)
    if not normalised:
        raise WhistleError(f"none of the {len(terms)} term(s) has a word left after normalisation")
    totals = [0] * 7
    for reference, hypothesis in zip(references, hypotheses):
        counts = _pair_counts(
            normalize(reference, language).split(), normalize(hypothesis, language).split(), normalised
        )
        totals = [total + count for total, count in zip(totals, counts)]
    return TermRates(*totals, n_utterances=len(references))
