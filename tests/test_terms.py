"""whistle_pipeline.terms: term error rate, term insertions and B-/U-WER on hand-counted examples."""

from __future__ import annotations

import pytest

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import error_rates
from whistle_pipeline.terms import occurrences, term_rates

TERMS = ["Warfarin", "New York", "INR", "new york city"]


def test_occurrences_longest_first_without_overlap():
    terms = [("new", "york"), ("new", "york", "city"), ("york",)]
    words = ["new", "york", "city", "and", "new", "york", "york"]
    assert occurrences(words, terms) == [(0, 3), (4, 6), (6, 7)]


def test_substitution_inside_a_multi_word_term():
    rates = term_rates(["She flew to New York today."], ["she flew to new work today"], TERMS)
    # "new york" said once, "york" -> "work": missed; "new work" is no term, so nothing inserted
    assert (rates.reference_terms, rates.missed, rates.inserted) == (1, 1, 0)
    # B: 2 term words, 1 error (the substitution); U: 4 other words, no error
    assert (rates.term_words, rates.term_word_errors, rates.other_words, rates.other_word_errors) == (2, 1, 4, 0)
    assert rates.term_error_rate == 1.0 and rates.biased_wer == 0.5 and rates.unbiased_wer == 0.0


def test_word_inserted_inside_a_term_breaks_it():
    rates = term_rates(["to new york"], ["to new big york"], TERMS)
    # both words of "new york" match, but not side by side: missed; "big" is a U insertion
    assert (rates.missed, rates.inserted, rates.term_word_errors, rates.other_word_errors) == (1, 0, 0, 1)


def test_term_said_twice_recognised_once():
    rates = term_rates(["warfarin then more warfarin"], ["Warfarin, then more war farin."], TERMS)
    # the second warfarin became "war farin": one substitution + one insertion
    assert (rates.reference_terms, rates.missed, rates.inserted) == (2, 1, 0)
    # the substituted reference word is a term word (B); the inserted "war"/"farin" is no term (U)
    assert (rates.term_words, rates.term_word_errors, rates.other_words, rates.other_word_errors) == (2, 1, 2, 1)
    assert rates.term_error_rate == 0.5


def test_insertions_of_terms_where_none_was_said():
    rates = term_rates(["check the level", "the drug", ""], ["check the INR level", "the warfarin", "warfarin"], TERMS)
    # "inr" inserted (a B insertion), "warfarin" substituted for "drug" (a U substitution, the reference word
    # is no term) and "warfarin" said over silence (a B insertion): three inserted terms, none in the references
    assert (rates.reference_terms, rates.missed, rates.inserted) == (0, 0, 3)
    assert (rates.term_words, rates.term_word_errors, rates.other_words, rates.other_word_errors) == (0, 2, 5, 1)
    assert rates.term_error_rate is None and rates.biased_wer is None


def test_case_and_punctuation_are_normalised():
    rates = term_rates(["WARFARIN, again; new-york?"], ["Warfarin again new york"], ["warfarin", "new york"])
    # normalised: "warfarin again new york" on both sides (the hyphen becomes a space): 2 terms, both recognised
    assert (rates.reference_terms, rates.missed, rates.inserted, rates.term_word_errors) == (2, 0, 0, 0)


def test_corpus_totals_and_the_wer_split():
    references = [
        "She flew to New York today.",
        "warfarin then more warfarin",
        "check the level",
        "new york city at night",
    ]
    hypotheses = [
        "she flew to new work today",
        "warfarin then more war farin",
        "check the INR level",
        "new york at night",
    ]
    rates = term_rates(references, hypotheses, TERMS)
    # per pair (reference terms, missed, inserted): (1,1,0) (2,1,0) (0,0,1) and "new york city" -> "new york":
    # the longer term is missed (city deleted) and the hypothesis' "new york" is no recognised reference
    # occurrence, so it counts as inserted: (1,1,1)
    assert (rates.reference_terms, rates.missed, rates.inserted) == (4, 3, 2)
    assert rates.term_error_rate == 0.75 and rates.insertion_rate == 0.5
    wer = error_rates(references, hypotheses, "en")
    errors = wer.substitutions + wer.deletions + wer.insertions
    assert rates.term_word_errors + rates.other_word_errors == errors
    assert rates.term_words + rates.other_words == wer.n_words
    assert rates.to_dict()["term_error_rate"] == 0.75


def test_bad_inputs_raise():
    with pytest.raises(WhistleError, match="pair up"):
        term_rates(["a"], [], TERMS)
    with pytest.raises(WhistleError, match="no term|none of the"):
        term_rates(["a"], ["a"], ["?!", ""])
