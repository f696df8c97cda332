"""The transcription toolkit's scoring and labels, by hand (the models and generation are tested through
`whistle evaluate` in test_evaluate.py and finetune's validation in test_finetune.py)."""

from __future__ import annotations

from whistle_pipeline.transcribe import Named, Transcript, repetition_loop, score_clip


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
