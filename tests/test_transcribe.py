"""The transcription toolkit's scoring and labels, by hand, and its beam search against transformers' own
(the models and generation are otherwise tested through `whistle evaluate` in test_evaluate.py and
finetune's validation in test_finetune.py)."""

from __future__ import annotations

import torch
from conftest import make_tiny_teacher
from transformers.modeling_outputs import BaseModelOutput

from whistle_pipeline.transcribe import Named, Transcript, generate, load_model, repetition_loop, score_clip


def test_scoring_normalises_and_counts_by_hand():
    clip = score_clip("x", "The colour is 20%.", Transcript(text="the color is twenty percent", ended=True), "en")
    assert (clip.word_errors, clip.ref_words, clip.loop) == (0, 4, False)
    clip = score_clip("y", "red green blue", Transcript(text="red blue black", ended=True), "en")
    assert (clip.word_errors, clip.ref_words) == (2, 3)  # "green" deleted, "black" inserted
    empty = score_clip("z", "(laughs)", Transcript(text="hello there", ended=True), "en")
    assert (empty.word_errors, empty.ref_words) == (2, 0)
    assert score_clip("w", "a b", Transcript(text="a b", ended=False), "en").loop  # cut off: a loop even if it matches


def test_repetition_loops():
    assert repetition_loop("we go to the the the the park")
    assert repetition_loop("thank you thank you thank you thank you")
    assert not repetition_loop("thank you thank you thank you")
    assert not repetition_loop("no no no no", reference="no no no no")  # the reference says it too


def test_labels():
    assert Named.parse("base=/models/tiny") == Named(label="base", path="/models/tiny")
    assert Named.parse("/models/tiny/") == Named(label="tiny", path="/models/tiny/")


def test_beam_search_without_cross_attention_reorders_matches_transformers(tmp_path):
    """`generate` skips the reorder of the cross-attention cache (BeamSearchCache): the beams' transcripts
    must be transformers' default beam search's, token for token, on states where the beams do reorder."""
    model = load_model(Named(label="m", path=str(make_tiny_teacher(tmp_path / "m"))), "main", "cpu", "float32", "sdpa")
    torch.manual_seed(3)
    states = 100 * torch.randn(3, 100, 32)  # (B, frames, d_model): three clips the random model tells apart
    for beams in (2, 4):
        ours = generate(model, states, ["en"] * 3, beams, max_new_tokens=12)
        with torch.inference_mode():
            theirs = model.model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                num_beams=beams,
                max_new_tokens=12,
                return_dict_in_generate=True,
            )
        texts = model.tokenizer.batch_decode(theirs.sequences, skip_special_tokens=True)
        assert [t.text for t in ours] == [text.strip() for text in texts]
        assert len({t.text for t in ours}) == 3  # the clips decode differently
        first_beams = torch.arange(3).unsqueeze(1) * beams  # (3, 1): each clip's first beam row
        assert (theirs.beam_indices[:, :12] != first_beams).any()  # the best beams did change rows
