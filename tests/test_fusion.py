"""whistle_pipeline.fusion: the shallow-fusion processor's scores by hand, alpha/beta fitting, and generate."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_teacher

from whistle_pipeline.errors import WhistleError
from whistle_pipeline.fusion import (
    ShallowFusion,
    build_domain_lm,
    fit_alpha_beta,
    lm_words,
)
from whistle_pipeline.ngram import load_scorer, read_arpa

# ids of the hand-built vocabulary below
DOSE, WAR, FAR, IN, THE, ZZ, Q, DOT, EOT, SOT, NO_TIMESTAMPS = range(11)
ALPHA, BETA = 0.5, 1.0

# The toy LM: "the dose" and "the warfarin", order 2, D = 0.5 (tests/test_ngram.py works the same formulas).
# Unigram adjusted counts: the 1, dose 1, warfarin 1, </s> 2; S = 5; V = 5 words with <unk>;
# freed mass 0.5 * 4 / 5 = 0.4, i.e. 0.08 per word: p(the) = p(dose) = p(warfarin) = 0.5/5 + 0.08 = 0.18,
# p(</s>) = 1.5/5 + 0.08 = 0.38, p(<unk>) = 0.08.
# After <s>: the 2, g = 0.25: p(</s>|<s>) = 0.25 * 0.38 = 0.095, p(<unk>|<s>) = 0.25 * 0.08 = 0.02.
# After the: dose 1, warfarin 1, g = 0.5: p(warfarin|the) = 0.25 + 0.5 * 0.18 = 0.34, p(<unk>|the) = 0.04.
# After warfarin: </s> 1, g = 0.5: p(</s>|warfarin) = 0.5 + 0.5 * 0.38 = 0.69, p(<unk>|warfarin) = 0.04.
# After an unknown word: no such context, so unigrams: p(</s>|<unk>) = 0.38.


@pytest.fixture(scope="module")
def toy_tokenizer():
    from transformers import WhisperTokenizer

    vocab = {"Ġdose": DOSE, "Ġwar": WAR, "far": FAR, "in": IN, "Ġthe": THE, "Ġzz": ZZ, "q": Q, ".": DOT}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])  # adds <|endoftext|> = 8
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|startoftranscript|>", "<|notimestamps|>"]})
    assert tokenizer.get_vocab()["<|notimestamps|>"] == NO_TIMESTAMPS
    return tokenizer


@pytest.fixture(scope="module", params=["python", "kenlm"])
def toy_scorer(request, tmp_path_factory):
    if request.param == "kenlm":
        pytest.importorskip("kenlm")
    path = build_domain_lm(
        ["The dose.", "the Warfarin"], tmp_path_factory.mktemp("lm") / "toy.arpa", order=2, discount=0.5
    )
    return load_scorer(path, request.param)


def fused(scorer, tokenizer, rows: list[list[int]], top_k: int = 11) -> torch.Tensor:
    """The processor's additions for `rows` (all at one length) over zero acoustic scores."""
    processor = ShallowFusion(scorer, tokenizer, ALPHA, BETA, top_k=top_k)
    return processor(torch.tensor(rows), torch.zeros(len(rows), 11))


def test_additions_by_hand(toy_scorer, toy_tokenizer):
    ln = math.log
    rows = [
        [SOT, NO_TIMESTAMPS, THE, WAR, Q],  # ..." the war" then q: the partial word is "warq"
        [SOT, NO_TIMESTAMPS, THE, WAR, FAR],  # " the warfar"
        [DOSE, SOT, NO_TIMESTAMPS, ZZ, Q],
    ]  # a prompt token before <|startoftranscript|>, then " zzq"
    added = fused(toy_scorer, toy_tokenizer, rows)
    # row 0: history <s> the, partial "warq": no LM word starts so, already charged alpha ln p(<unk>|the)
    charged = ALPHA * ln(0.04)
    assert added[0, Q].item() == pytest.approx(0.0)  # "warqq": still no word, nothing new
    # a new word completes "warq" as <unk> (alpha ln 0.04 + beta) and refunds the charge: beta alone
    assert added[0, THE].item() == pytest.approx(ALPHA * ln(0.04) + BETA - charged)
    # the end: beta, then </s> after an unknown word
    assert added[0, EOT].item() == pytest.approx(BETA + ALPHA * ln(0.38))
    assert added[0, NO_TIMESTAMPS].item() == 0.0 and added[0, SOT].item() == 0.0
    # row 1: partial "warfar" is a prefix of warfarin: nothing charged yet
    assert added[1, IN].item() == pytest.approx(0.0)  # "warfarin" is a word
    assert added[1, Q].item() == pytest.approx(ALPHA * ln(0.04))  # "warfarq" can no longer be one
    assert added[1, DOT].item() == pytest.approx(0.0)  # "warfar." normalises to "warfar"
    assert added[1, EOT].item() == pytest.approx(ALPHA * ln(0.04) + BETA + ALPHA * ln(0.38))  # "warfar" is <unk>
    # row 2: the prompt token is not read; history <s>, partial "zzq" charged alpha ln p(<unk>|<s>) = alpha ln 0.02
    assert added[2, EOT].item() == pytest.approx(BETA + ALPHA * ln(0.38))
    assert added[2, DOSE].item() == pytest.approx(BETA)  # "dose" starts an LM word: no new charge


def test_whole_sentence_adds_up_to_the_lm_score(toy_scorer, toy_tokenizer):
    """Summed over a finished transcript the additions are alpha ln P_LM(sentence) + beta x words."""
    tokens = [THE, WAR, FAR, IN, EOT]
    total = 0.0
    for step, token in enumerate(tokens):
        total += fused(toy_scorer, toy_tokenizer, [[SOT, NO_TIMESTAMPS] + tokens[:step]])[0, token].item()
    # p(the|<s>) = 1.5/2 + 0.25 * 0.18 = 0.795, p(warfarin|the) = 0.34, p(</s>|warfarin) = 0.69
    assert total == pytest.approx(ALPHA * math.log(0.795 * 0.34 * 0.69) + 2 * BETA)
    # a sentence with an unknown word: the early charge is refunded at the word's end
    tokens = [ZZ, Q, THE, EOT]
    total = sum(
        fused(toy_scorer, toy_tokenizer, [[SOT, NO_TIMESTAMPS] + tokens[:step]])[0, token].item()
        for step, token in enumerate(tokens)
    )
    # p(<unk>|<s>) = 0.02, p(the|<unk>) = p(the) = 0.18, p(</s>|the) = 0.5 * 0.38 = 0.19
    assert total == pytest.approx(ALPHA * math.log(0.02 * 0.18 * 0.19) + 2 * BETA)


def test_only_the_acoustic_top_k_survive(toy_scorer, toy_tokenizer):
    scores = torch.log_softmax(torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]]), -1)
    processor = ShallowFusion(toy_scorer, toy_tokenizer, 0.0, 0.0, top_k=3)
    out = processor(torch.tensor([[SOT, NO_TIMESTAMPS]]), scores.clone())
    kept = [WAR, FAR, IN]
    assert torch.equal(out[0, kept], scores[0, kept])
    assert torch.isinf(out[0, [i for i in range(11) if i not in kept]]).all()
    with pytest.raises(WhistleError, match="top_k"):
        ShallowFusion(toy_scorer, toy_tokenizer, 1.0, top_k=0)


def test_lm_words_and_domain_lm(tmp_path):
    assert lm_words("The Colour, 20%!  Dr. Who") == ["the", "color", "20%", "doctor", "who"]
    model = read_arpa(build_domain_lm(["The dose.", "", "the Warfarin"], tmp_path / "lm.arpa", order=2))
    assert model.vocabulary == {"<s>", "</s>", "<unk>", "the", "dose", "warfarin"}


def test_fit_alpha_beta_picks_the_lowest_wer_first_in_grid_order():
    calls = []

    def wer_of(alpha, beta):
        calls.append((alpha, beta))
        return abs(alpha - 0.5) + abs(beta - 1.0) * 0.1 if (alpha, beta) != (1.0, 2.0) else 0.05

    fit = fit_alpha_beta(wer_of, alphas=(0.0, 0.5, 1.0), betas=(1.0, 2.0))
    assert (fit.alpha, fit.beta, fit.wer) == (0.5, 1.0, 0.0)
    assert calls == [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.5, 2.0), (1.0, 1.0), (1.0, 2.0)]
    assert fit_alpha_beta(lambda a, b: 0.3, alphas=(0.2, 0.1), betas=(0.0,)).alpha == 0.2  # ties: first
    assert len(fit.grid) == 6
    with pytest.raises(WhistleError):
        fit_alpha_beta(wer_of, alphas=())


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    path = make_tiny_teacher(tmp_path_factory.mktemp("fusion-teacher"))
    return WhisperForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def beam_search(model, tokenizer, processor=None, num_beams=3, **options):
    from transformers.modeling_outputs import BaseModelOutput

    end = tokenizer.get_vocab()["<|endoftext|>"]
    torch.manual_seed(0)
    states = torch.randn(2, model.config.max_source_positions, model.config.d_model)  # (B, frames, D)
    with torch.inference_mode():
        return model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            num_beams=num_beams,
            max_new_tokens=12,
            return_timestamps=False,
            suppress_tokens=list(range(end + 1, len(tokenizer))),
            logits_processor=[processor] if processor else None,
            **options,
        )


def test_generate_alpha_zero_is_plain_beam_search_and_a_large_alpha_follows_the_lm(tiny_teacher, tmp_path):
    model, tokenizer = tiny_teacher
    plain = beam_search(model, tokenizer)  # (B, S) transcript tokens, the decoder prefix stripped
    first_step = beam_search(model, tokenizer, return_dict_in_generate=True, output_scores=True).scores[0][0]
    candidates = first_step.topk(6).indices.tolist()  # beam 0's best processed log-probabilities at step 1
    chosen = plain[0, 0].item()
    assert chosen in candidates
    # the LM knows one word: the first of the acoustic runners-up that decodes to a word of letters
    word_of = {token: lm_words(tokenizer.decode([token])) for token in candidates}
    runner_up = next(t for t in candidates if t != chosen and len(word_of[t]) == 1 and word_of[t][0].isalpha())
    word = word_of[runner_up][0]
    assert word_of[chosen] and not word.startswith(word_of[chosen][0])  # the plain choice leads elsewhere
    scorer = load_scorer(build_domain_lm([word] * 5, tmp_path / "lm.arpa", order=2))

    same = beam_search(model, tokenizer, ShallowFusion(scorer, tokenizer, alpha=0.0, beta=0.0, top_k=6))
    assert torch.equal(same, plain)
    # the random model's scores are nearly flat and seldom put a word-starting piece among a few candidates,
    # so the fused search may look at every token here; beta rewards finishing the LM's word
    fusion = ShallowFusion(scorer, tokenizer, alpha=10.0, beta=5.0, top_k=len(tokenizer))
    steered = beam_search(model, tokenizer, fusion)
    assert steered[0, 0].item() == runner_up != chosen
    assert lm_words(tokenizer.decode(steered[0], skip_special_tokens=True)) == [word]
