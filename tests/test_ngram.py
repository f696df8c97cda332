"""whistle_pipeline.ngram: Kneser-Ney estimates against hand-computed values, ARPA round trips, both scorers."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.ngram import (
    BOS,
    EOS,
    NEVER,
    UNK,
    ArpaScorer,
    adjusted_counts,
    build_kneser_ney,
    count_ngrams,
    discounts,
    load_scorer,
    read_arpa,
    write_arpa,
)


def test_adjusted_counts_by_hand():
    # <s> a b c </s> and <s> b c </s>
    adjusted = adjusted_counts(count_ngrams([["a", "b", "c"], ["b", "c"]], 3))
    assert adjusted[2][("b", "c", EOS)] == 2  # highest order: raw counts
    # bigrams: starting with <s> raw; else distinct left neighbours among the trigrams
    assert dict(adjusted[1]) == {(BOS, "a"): 1, (BOS, "b"): 1, ("a", "b"): 1, ("b", "c"): 2, ("c", EOS): 1}
    # unigrams: distinct left neighbours among the bigrams (<s> is never predicted)
    assert dict(adjusted[0]) == {("a",): 1, ("b",): 2, ("c",): 1, (EOS,): 1}


def test_modified_discounts_by_hand():
    # t1 = 4, t2 = 2, t3 = 1, t4 = 1: Y = 4 / (4 + 2*2) = 0.5
    # D1 = 1 - 2*0.5*2/4 = 0.5, D2 = 2 - 3*0.5*1/2 = 1.25, D3+ = 3 - 4*0.5*1/1 = 1.0
    counts = Counter({("w", str(i)): c for i, c in enumerate([1, 1, 1, 1, 2, 2, 3, 4, 7])})
    assert discounts(counts, 2) == pytest.approx((0.5, 1.25, 1.0))
    # no count of 3 or 4: one discount Y = 3 / (3 + 2) = 0.6; no count of 2: 0.5
    assert discounts(Counter({("a",): 1, ("b",): 1, ("c",): 1, ("d",): 2}), 1) == pytest.approx((0.6,) * 3)
    assert discounts(Counter({("a",): 1}), 1) == (0.5, 0.5, 0.5)


def bigram_toy():
    """<s> a b </s> and <s> b </s>, order 2, D = 0.5 for every count."""
    return build_kneser_ney([["a", "b"], ["b"]], order=2, discount=0.5)


def test_bigram_probabilities_by_hand():
    model = bigram_toy()
    # unigram adjusted counts a 1 ({<s>}), b 2 ({a, <s>}), </s> 1 ({b}); S = 4; V = {a, b, </s>, <unk>}
    # freed mass g = 0.5 * 3 / 4 = 0.375, spread as 0.375 / 4 = 0.09375 per word
    unigram = {"a": 0.5 / 4 + 0.09375, "b": 1.5 / 4 + 0.09375, EOS: 0.5 / 4 + 0.09375, UNK: 0.09375}
    assert unigram == {"a": 0.21875, "b": 0.46875, EOS: 0.21875, UNK: 0.09375}
    for word, p in unigram.items():
        assert model.log10_probs[0][(word,)] == pytest.approx(math.log10(p))
    assert model.log10_probs[0][(BOS,)] == NEVER
    # context <s>: a 1, b 1, S = 2, g = (0.5 + 0.5) / 2 = 0.5
    # p(a|<s>) = 0.5/2 + 0.5*0.21875 = 0.359375, p(b|<s>) = 0.25 + 0.5*0.46875 = 0.484375
    # context a: b 1, g = 0.5: p(b|a) = 0.5 + 0.5*0.46875 = 0.734375
    # context b: </s> 2, g = 0.5/2 = 0.25: p(</s>|b) = 1.5/2 + 0.25*0.21875 = 0.8046875
    bigrams = {(BOS, "a"): 0.359375, (BOS, "b"): 0.484375, ("a", "b"): 0.734375, ("b", EOS): 0.8046875}
    assert model.log10_probs[1] == pytest.approx({g: math.log10(p) for g, p in bigrams.items()})
    backoffs = {(BOS,): 0.5, ("a",): 0.5, ("b",): 0.25}
    assert model.log10_backoffs[0] == pytest.approx({g: math.log10(p) for g, p in backoffs.items()})
    scorer = ArpaScorer(model)
    assert 10 ** scorer.log10_prob(["b"], "a") == pytest.approx(0.25 * 0.21875)  # backed off: g(b) p(a)
    assert 10 ** scorer.log10_prob([BOS, "a"], "zebra") == pytest.approx(0.5 * 0.09375)  # unknown: <unk>


def random_corpus(seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    words = ["the", "dose", "of", "warfarin", "was", "raised", "inr", "checked", "daily"]
    return [[rng.choice(words[: rng.randint(3, 9)]) for _ in range(rng.randint(1, 8))] for _ in range(60)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_context_sums_to_one(order):
    model = build_kneser_ney(random_corpus(), order=order)
    scorer = ArpaScorer(model)
    predicted = sorted(model.vocabulary - {BOS})
    contexts = [()] + [gram for grams in model.log10_probs[: order - 1] for gram in grams]
    contexts += [("never", "seen", "words"), (BOS, "warfarin", "warfarin")]
    for context in contexts:
        total = sum(10 ** scorer.log10_prob(context, word) for word in predicted)
        assert total == pytest.approx(1.0, abs=1e-9), context


def test_arpa_round_trip(tmp_path):
    model = build_kneser_ney(random_corpus(), order=3)
    path = write_arpa(model, tmp_path / "lm.arpa")
    again = read_arpa(path)
    assert again.order == 3
    for n in range(3):
        assert set(again.log10_probs[n]) == set(model.log10_probs[n])
        assert again.log10_probs[n] == pytest.approx(model.log10_probs[n], abs=1e-7)
        assert again.log10_backoffs[n] == pytest.approx(model.log10_backoffs[n], abs=1e-7)
    text = path.read_text()
    assert text.startswith("\n\\data\\\nngram 1=") and text.rstrip().endswith("\\end\\")
    assert write_arpa(again, tmp_path / "again.arpa").read_text() == text


def test_kenlm_scores_like_the_python_reader(tmp_path):
    pytest.importorskip("kenlm")
    path = write_arpa(build_kneser_ney(random_corpus(), order=3), tmp_path / "lm.arpa")
    python, kenlm = load_scorer(path, "python"), load_scorer(path, "kenlm")
    assert type(kenlm).__name__ == "KenlmScorer"
    queries = [
        ((BOS,), "the"),
        ((BOS, "the"), "dose"),
        (("of", "warfarin"), "was"),
        (("inr",), EOS),
        (("zebra", "the"), "dose"),
        ((), "unseen"),
        (("the", "dose", "of"), "warfarin"),
    ]
    for context, word in queries:
        assert kenlm.log10_prob(context, word) == pytest.approx(python.log10_prob(context, word), abs=1e-5)


def test_bad_files_and_backends(tmp_path):
    (tmp_path / "empty.arpa").write_text("\\data\\\n\\end\\\n")
    with pytest.raises(WhistleError, match="no n-grams"):
        read_arpa(tmp_path / "empty.arpa")
    (tmp_path / "bad.arpa").write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0 a b c\n\\end\\\n")
    with pytest.raises(WhistleError, match="bad.arpa:5"):
        read_arpa(tmp_path / "bad.arpa")
    with pytest.raises(WhistleError, match="unknown LM backend"):
        load_scorer(tmp_path / "bad.arpa", "srilm")
