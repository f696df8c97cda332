"""WER/CER after Whisper's normalisation (the English spelling map ships with whistle)."""

from __future__ import annotations

import json

import pytest

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import english_spelling_path, error_rates, normalize


def test_english_normaliser_works_offline_with_the_shipped_spelling_map():
    mapping = json.loads(english_spelling_path().read_text(encoding="utf-8"))
    assert len(mapping) == 1739 and mapping["colour"] == "color" and mapping["haemoglobin"] == "hemoglobin"
    assert normalize("The Colour of the Centre, Mr. Smith!", "en") == "the color of the center mister smith"
    assert normalize("It's twenty-two percent, isn't it?", "en") == "it is 22% is not it"
    assert normalize("Take 2.5 mg   [inaudible] twice.", "en") == "take 2.5 mg twice"


def test_formatting_differences_cost_nothing():
    rates = error_rates(
        ["The colour is 20%.", "Dr. Jones prescribed 500 mg."],
        ["the color is twenty percent", "doctor jones prescribed five hundred mg"],
        "en",
    )
    assert rates.wer == 0.0 and rates.cer == 0.0 and rates.n_words == 9 and rates.n_utterances == 2


def test_counts_are_summed_over_utterances():
    rates = error_rates(["one two three four", "five six"], ["one too three", "five six seven"], "fr")
    # utterance 1: "two" -> "too" (S), "four" deleted (D); utterance 2: "seven" inserted (I)
    assert (rates.substitutions, rates.deletions, rates.insertions, rates.n_words) == (1, 1, 1, 6)
    assert rates.wer == pytest.approx(3 / 6)
    # characters: "two" -> "too" is 1 S; " four" 5 D; " seven" 6 I over 18 + 8 reference characters
    assert rates.n_chars == len("one two three four") + len("five six")
    assert rates.cer == pytest.approx((1 + 5 + 6) / 26)
    assert rates.to_dict()["wer"] == rates.wer


def test_empty_references_count_their_hypothesis_as_insertions():
    rates = error_rates(["hello there", "[noise]"], ["hello there", "uh well"], "en")
    # "uh" is a filler the English normaliser drops; "well" is an insertion against an empty reference
    assert (rates.insertions, rates.n_words, rates.wer) == (1, 2, 0.5)
    with pytest.raises(WhistleError, match="nothing to score"):
        error_rates(["[noise]", "(inaudible)"], ["a", "b"], "en")
    with pytest.raises(WhistleError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"], "en")


def test_other_languages_use_the_basic_normaliser():
    assert normalize("Größe: 5 Äpfel (ungefähr)!", "de") == "größe 5 äpfel"
    assert normalize("我爱你。", "zh") == "我 爱 你"  # no spaces in the script: scored per character
    assert error_rates(["我爱你"], ["我恨你"], "zh").wer == pytest.approx(1 / 3)
