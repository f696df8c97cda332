"""The TLE model, its losses, the teacher alignment and the frozen-decoder helpers."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from whistle_pipeline.alignment import (
    MEDIAN_FILTER_WIDTH,
    align_batch,
    alignment_heads,
    dtw_first_columns,
    durations_from_first_columns,
)
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.metrics import corpus_wer
from whistle_pipeline.tle import (
    LossWeights,
    TLEConfig,
    TLEModel,
    duration_loss,
    free_bits_kl,
    kl_divergence,
    length_regulate,
    masked_cosine,
    masked_mse,
    retimed,
    round_durations,
    stretched_cosine,
    tle_loss,
)

D, MAX_FRAMES, END = 24, 80, 99


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_tle(seed: int = 0, **overrides) -> TLEModel:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        text_layers=2,
        frame_layers=2,
        num_heads=4,
        ffn_multiplier=2,
        latent_size=4,
        conv_kernel=5,
        conv_layers=2,
        dropout=0.1,
        posterior=True,
        spelling_channels=8,
        languages=["en", "de"],
        d_model=D,
        max_frames=MAX_FRAMES,
        end_token_id=END,
    )
    model = TLEModel(TLEConfig(**{**settings, **overrides}))
    generator = torch.Generator().manual_seed(1)
    model.set_store_statistics(
        torch.randn(D, generator=generator),
        torch.rand(D, generator=generator) + 0.5,
        torch.randn(MAX_FRAMES, D, generator=generator),
    )
    return model


def batch_of(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists (each ending with END) -> right-padded tokens (B, L) and mask (B, L)."""
    L = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), L), END)
    mask = torch.zeros((len(sequences), L), dtype=torch.bool)
    for b, s in enumerate(sequences):
        tokens[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = True
    return tokens, mask


def test_length_regulator_places_each_token_over_its_own_frames():
    states = torch.arange(2 * 3, dtype=torch.float).view(2, 3, 1)  # token value = b*3 + i
    durations = torch.tensor([[2, 0, 3], [1, 2, 0]])  # second sample: its last token is padding
    frames, token_index, offset, token_duration, mask, lengths = length_regulate(states, durations)
    assert lengths.tolist() == [5, 3]
    assert frames.shape == (2, 5, 1)
    assert frames[0, :, 0].tolist() == [0, 0, 2, 2, 2]
    assert frames[1, :3, 0].tolist() == [3, 4, 4]
    assert mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert offset[0].tolist() == [0, 1, 0, 1, 2]
    assert token_duration[0].tolist() == [2, 2, 3, 3, 3]


def test_round_durations_keeps_the_total_and_a_frame_per_text_token():
    frames = torch.tensor([[0.4, 0.4, 0.4, 0.4, 2.2]])
    mask = torch.ones_like(frames, dtype=torch.bool)
    floor = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    rounded = round_durations(frames, mask, max_frames=100, min_frames=floor)
    assert rounded.tolist() == [[1, 1, 1, 1, 2]]  # 4 x 1.0 floor + 2.2 -> 6 in total
    long = round_durations(torch.tensor([[60.0, 60.0]]), torch.ones(1, 2, dtype=torch.bool), 80, torch.zeros(1, 2))
    assert long.sum().item() == 80  # shrunk into the window


def test_forward_shapes_and_masks():
    model = tiny_tle().eval()
    tokens, mask = batch_of([[5, 6, 7, END], [8, 9, END]])
    durations = torch.tensor([[3, 4, 5, 2], [6, 1, 0, 0]])
    target = torch.randn(2, 14, D)
    out = model(tokens, mask, model.language_ids(["en", "de"]), durations=durations, target=target)
    assert out.states.shape == (2, 14, D)
    assert out.lengths.tolist() == [14, 7]
    assert out.frame_mask.sum(1).tolist() == [14, 7]
    assert (out.states[1, 7:] == 0).all()  # nothing past a sample's length
    assert out.log_durations.shape == (2, 4)
    assert out.latent.shape == out.prior_mean.shape == out.posterior_mean.shape == (2, 4)
    # without target frames there is no posterior: z is the prior mean in eval
    text_only = model(tokens, mask, model.language_ids(["en", "de"]), durations=durations)
    assert text_only.posterior_mean is None
    torch.testing.assert_close(text_only.latent, text_only.prior_mean)


def test_predicted_lengths_and_full_window():
    model = tiny_tle().eval()
    tokens, mask = batch_of([[5, 6, 7, END], [8, 9, END]])
    with torch.no_grad():
        speech, lengths = model.speech_frames(tokens, mask, model.language_ids(["en", "en"]))
        window = model.full_window(speech, lengths)
    assert speech.shape[0] == 2 and speech.shape[1] == lengths.max()
    assert (lengths >= 2).all()  # every text token has at least one frame
    assert window.shape == (2, MAX_FRAMES, D)
    for b in range(2):
        n = int(lengths[b])
        torch.testing.assert_close(window[b, :n], speech[b, :n])
        torch.testing.assert_close(window[b, n:], model.tail_template[n:])
    # speech frames are in teacher scale: the normalised prediction times std plus mean
    out = model(tokens, mask, model.language_ids(["en", "en"]))
    torch.testing.assert_close(model.denormalise(out.states[0, :3]), speech[0, :3])


def test_token_spellings_come_from_the_tokenizer():
    from conftest import make_whisper_tokenizer

    tokenizer = make_whisper_tokenizer()
    model = tiny_tle(vocab_size=len(tokenizer), max_token_bytes=8)
    assert model.config.spelling_channels == 8
    model.set_token_spellings(tokenizer)
    token = tokenizer(" hello", add_special_tokens=False)["input_ids"][-1]
    text = tokenizer.decode([token]).encode("utf-8")
    assert model.token_bytes[token, : len(text)].tolist() == [b + 1 for b in text]
    assert (model.token_bytes[token, len(text) :] == 0).all()
    tokens, mask = batch_of([[token, END]])
    assert torch.isfinite(model.eval()(tokens, mask, torch.zeros(1, dtype=torch.long)).states).all()


def test_unknown_language_names_the_known_ones():
    model = tiny_tle()
    with pytest.raises(WhistleError, match="language\\(s\\) fr; it knows en, de"):
        model.language_ids(["en", "fr"])


@pytest.mark.parametrize("durations_given", [True, False])
def test_batch_invariance(durations_given):
    """The same sentence gives the same frames alone or batched with longer/shorter ones (eval mode)."""
    model = tiny_tle().eval()
    sentences = [[11, 12, END], [5, 6, 7, 8, 9, 10, END], [20, END]]
    durations = [[4, 9, 2], [3, 3, 5, 2, 6, 7, 1], [12, 0]]
    languages = ["en", "de", "en"]
    tokens, mask = batch_of(sentences)
    dur = torch.zeros_like(tokens)
    for b, d in enumerate(durations):
        dur[b, : len(d)] = torch.tensor(d)
    with torch.no_grad():
        together = model(tokens, mask, model.language_ids(languages), durations=dur if durations_given else None)
        for b in range(3):
            alone_tokens, alone_mask = batch_of([sentences[b]])
            alone = model(
                alone_tokens,
                alone_mask,
                model.language_ids([languages[b]]),
                durations=torch.tensor([durations[b]]) if durations_given else None,
            )
            n = int(alone.lengths[0])
            assert n == int(together.lengths[b])
            torch.testing.assert_close(together.states[b, :n], alone.states[0, :n], atol=1e-5, rtol=1e-5)


def test_length_model_learns_a_synthetic_rule():
    """Durations that follow the token (2 + token % 5 frames) are learned to within half a frame."""
    torch.manual_seed(0)
    model = tiny_tle(dropout=0.0, spelling_channels=0)  # these token ids have no text to spell
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    no_latent = torch.zeros(32, 4)  # the rule depends on the text alone

    def sample(batch: int):
        lengths = torch.randint(3, 9, (batch,), generator=generator)
        tokens = [torch.randint(0, 20, (int(n),), generator=generator).tolist() + [END] for n in lengths]
        tokens, mask = batch_of(tokens)
        durations = torch.where(tokens == END, torch.zeros_like(tokens), 2 + tokens % 5) * mask
        return tokens, mask, durations

    for _ in range(250):  # the text encoder and duration predictor alone: the frame stack plays no part
        tokens, mask, durations = sample(16)
        token_states = model.encode_text(tokens, mask, torch.zeros(16, dtype=torch.long))
        loss = duration_loss(model.predict_log_durations(token_states, mask, no_latent[:16]), durations, mask)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    tokens, mask, durations = sample(32)
    with torch.no_grad():
        out = model(tokens, mask, torch.zeros(32, dtype=torch.long), latent=no_latent)
    predicted = torch.expm1(out.log_durations)
    error = ((predicted - durations.float()).abs() * mask).sum() / mask.sum()
    assert error < 0.5, f"mean duration error {error:.2f} frames"
    assert (out.durations == durations).float().mean() > 0.9  # rounded durations as used for upsampling
    assert (out.lengths - durations.sum(1)).abs().float().mean() < 1.0


def test_save_and_load_round_trip(tmp_path):
    model = tiny_tle(teacher={"name_or_path": "tiny", "revision": "", "d_model": D}).eval()
    tokens, mask = batch_of([[5, 6, 7, END]])
    with torch.no_grad():
        before = model.speech_frames(tokens, mask, model.language_ids(["de"]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = TLEModel.from_pretrained(tmp_path).eval()
    assert loaded.config.languages == ["en", "de"]
    assert loaded.config.teacher["name_or_path"] == "tiny"
    torch.testing.assert_close(loaded.tail_template, model.tail_template)
    torch.testing.assert_close(loaded.state_std, model.state_std)
    with torch.no_grad():
        after = loaded.speech_frames(tokens, mask, loaded.language_ids(["de"]))
    torch.testing.assert_close(after[0], before[0])
    assert torch.equal(after[1], before[1])


def test_masked_losses_ignore_padding():
    prediction = torch.zeros(1, 4, 2)
    target = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [50.0, 50.0], [50.0, 50.0]]])
    mask = torch.tensor([[True, True, False, False]])
    assert masked_mse(prediction, target, mask).item() == pytest.approx(1.0)
    assert masked_cosine(target, target * 3, mask).item() == pytest.approx(1.0)
    assert masked_cosine(-target, target, mask).item() == pytest.approx(-1.0)


def test_stretched_cosine_compares_frames_made_at_another_length_over_the_true_frames():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # sample 0: 2 predicted frames [e1, e2] stretched to 3 are [e1, (e1 + e2) / 2, e2]; sample 1: the same
    # length, so nothing moves; sample 2: no predicted frame, its 2 true frames count as 0
    prediction = torch.stack([torch.stack([e1, e2, e2]), torch.stack([e1, -e2, e1]), torch.stack([e1, e1, e1])])
    lengths = torch.tensor([2, 3, 0])
    target = torch.stack(
        [torch.stack([e1, e1 + e2, e2, e2]), torch.stack([e1, e2, e1, e2]), torch.stack([e1, e1, e1, e1])]
    )
    target_lengths = torch.tensor([3, 3, 2])
    # per frame: 1, 1, 1 | 1, -1, 1 | (none) -> 4 over 8 true frames
    assert stretched_cosine(prediction, lengths, target, target_lengths).item() == pytest.approx(4 / 8)
    # at equal lengths it is masked_cosine
    same = torch.tensor([3, 3, 3])
    mask = torch.arange(3)[None] < same[:, None]
    assert stretched_cosine(prediction, same, target[:, :3], same).item() == pytest.approx(
        masked_cosine(prediction, target[:, :3], mask).item()
    )
    # one predicted frame is held over the whole utterance
    one = stretched_cosine(prediction[:1], torch.tensor([1]), target[:1], torch.tensor([3]))
    assert one.item() == pytest.approx((1 + 2**-0.5 + 0) / 3)


def test_retimed_moves_each_tokens_frames_to_its_new_length():
    states = torch.tensor([[0.0], [2.0], [10.0], [20.0], [30.0]])  # tokens of 2, 0 and 3 frames
    # token 0: 2 frames -> 3 (0, 1, 2); token 1: no frame -> 1, holds the frame where it falls (10);
    # token 2: 3 frames -> 2 (its ends)
    moved = retimed(states, torch.tensor([2, 0, 3]), torch.tensor([3, 1, 2]))
    assert moved[:, 0].tolist() == pytest.approx([0.0, 1.0, 2.0, 10.0, 10.0, 30.0])
    # the same durations give the same frames; a token given no frame drops out
    assert torch.equal(retimed(states, torch.tensor([2, 0, 3]), torch.tensor([2, 0, 3])), states)
    assert retimed(states, torch.tensor([2, 0, 3]), torch.tensor([0, 0, 1]))[:, 0].tolist() == [10.0]


def test_kl_and_free_bits():
    model = tiny_tle()
    tokens, mask = batch_of([[5, 6, END], [7, END]])
    durations = torch.tensor([[2, 2, 1], [3, 0, 0]])
    out = model(tokens, mask, torch.zeros(2, dtype=torch.long), durations=durations, target=torch.randn(2, 5, D))
    kl = kl_divergence(out)
    assert kl.shape == (2, 4) and (kl >= -1e-6).all()
    # identical posterior and prior: KL 0, free bits charge their floor per dimension
    out.posterior_mean, out.posterior_logvar = out.prior_mean, out.prior_logvar
    assert kl_divergence(out).abs().max().item() < 1e-6
    assert free_bits_kl(kl_divergence(out), 0.25).item() == pytest.approx(1.0)


def test_tle_loss_combines_weighted_terms():
    model = tiny_tle()
    tokens, mask = batch_of([[5, 6, END]])
    durations = torch.tensor([[2, 3, 1]])
    target = torch.randn(1, 6, D)
    out = model(tokens, mask, torch.zeros(1, dtype=torch.long), durations=durations, target=target)
    ce = torch.tensor(2.0)
    weights = LossWeights(mse=1.0, cosine=0.5, length=0.1, beta=0.0, free_bits=0.0, decoder_ce=0.3, decoder_kl=0.7)
    terms = tle_loss(out, target, durations, mask, weights, decoder_ce=ce, decoder_kl=torch.tensor(0.5))
    expected = float(terms.mse) + 0.5 * (1 - float(terms.cosine)) + 0.1 * float(terms.length) + 0.3 * 2.0 + 0.7 * 0.5
    assert float(terms.decoder_kl) == pytest.approx(0.5)
    assert terms.total.item() == pytest.approx(expected, rel=1e-5)
    terms.total.backward()
    assert model.output.weight.grad.abs().sum() > 0


def test_decoder_kl_matches_the_definition_over_label_positions_only():
    from whistle_pipeline.decoder import decoder_kl

    torch.manual_seed(0)
    reference, logits = torch.randn(2, 3, 7), torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.tensor([[1, 2, -100], [-100, 4, 5]])
    p, q = reference.softmax(-1), logits.softmax(-1)
    by_hand = (p * (p.log() - q.log())).sum(-1)[labels != -100].mean()  # mean over the 4 label positions
    kl = decoder_kl(reference, logits, labels)
    assert kl.item() == pytest.approx(by_hand.item(), rel=1e-5) and kl.item() > 0
    assert decoder_kl(reference, reference.clone(), labels).abs().item() < 1e-6
    moved = logits.detach().clone()
    moved[0, 2] += 5.0  # positions without a label do not count
    moved[1, 0] -= 3.0
    assert decoder_kl(reference, moved, labels).item() == pytest.approx(kl.item(), rel=1e-6)
    kl.backward()
    assert logits.grad[0, 2].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0


def reference_dtw_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through cost (N, M) -> (rows, cols) in order, walked back cell by cell
    preferring (1, 1), (1, 0), (0, 1) on ties: the per-utterance DTW the batched one replaced, as it was."""
    N, M = cost.shape
    acc = np.empty((N, M))
    acc[0] = np.cumsum(cost[0])
    for i in range(1, N):
        from_above = np.minimum(acc[i - 1], np.concatenate([[np.inf], acc[i - 1, :-1]]))
        running = np.cumsum(cost[i])
        before = np.concatenate([[0.0], running[:-1]])
        acc[i] = running + np.minimum.accumulate(from_above - before)
    rows, cols = [N - 1], [M - 1]
    i, j = N - 1, M - 1
    while i > 0 or j > 0:
        options = [
            (acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf, i - 1, j - 1),
            (acc[i - 1, j] if i > 0 else np.inf, i - 1, j),
            (acc[i, j - 1] if j > 0 else np.inf, i, j - 1),
        ]
        _, i, j = min(options, key=lambda option: option[0])
        rows.append(i)
        cols.append(j)
    return np.array(rows[::-1]), np.array(cols[::-1])


def first_columns(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> np.ndarray:
    """The first column of each row on a path."""
    return np.array([cols[rows == i].min() for i in range(n_rows)])


def test_dtw_path_is_monotonic_and_cheapest():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cost = rng.normal(size=(int(rng.integers(1, 6)), int(rng.integers(1, 25))))
        rows, cols = reference_dtw_path(cost)
        N, M = cost.shape
        best = np.full((N + 1, M + 1), np.inf)  # the textbook recurrence
        best[0, 0] = 0
        for i in range(1, N + 1):
            for j in range(1, M + 1):
                best[i, j] = cost[i - 1, j - 1] + min(best[i - 1, j - 1], best[i - 1, j], best[i, j - 1])
        assert cost[rows, cols].sum() == pytest.approx(best[N, M])
        assert (rows[0], cols[0], rows[-1], cols[-1]) == (0, 0, N - 1, M - 1)
        steps = np.stack([np.diff(rows), np.diff(cols)], 1)
        assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(1) >= 1).all()
        batched = dtw_first_columns(cost[None], np.array([N]), np.array([M]))[0]
        assert batched.tolist() == first_columns(rows, cols, N).tolist()


def test_batched_dtw_equals_one_utterance_at_a_time():
    """Samples of other sizes padded into one batch (padding of any value), and ties (integer costs): each
    sample's first columns are those of its own path, ties broken as Whisper breaks them."""
    rng = np.random.default_rng(1)
    for trial in range(10):
        sizes = [(int(rng.integers(1, 8)), int(rng.integers(1, 30))) for _ in range(6)]
        costs = [rng.integers(-2, 3, size) if trial % 2 else rng.normal(size=size) for size in sizes]
        N, M = max(n for n, _ in sizes), max(m for _, m in sizes)
        batch = rng.normal(size=(len(sizes), N, M)) * 100
        for b, cost in enumerate(costs):
            batch[b, : cost.shape[0], : cost.shape[1]] = cost
        first = dtw_first_columns(batch, np.array([n for n, _ in sizes]), np.array([m for _, m in sizes]))
        for b, cost in enumerate(costs):
            rows, cols = reference_dtw_path(cost.astype(float))
            assert first[b, : cost.shape[0]].tolist() == first_columns(rows, cols, cost.shape[0]).tolist()


def test_durations_follow_a_clear_alignment():
    similarity = np.zeros((4, 20))  # 3 text tokens + the end token
    for i, (start, stop) in enumerate([(0, 5), (5, 12), (12, 18), (18, 20)]):
        similarity[i, start:stop] = 1.0
    first = dtw_first_columns(-similarity[None], np.array([4]), np.array([20]))[0]
    assert durations_from_first_columns(first, 4, 20).tolist() == [5, 7, 6, 2]
    # a path that gives a text token no frame is repaired: every text token keeps one frame
    assert durations_from_first_columns(np.array([0, 0, 0, 0]), 4, 3).tolist() == [1, 1, 1, 0]
    assert durations_from_first_columns(np.array([0, 0, 1, 1]), 4, 2) is None


def reference_align_batch(teacher, heads, window, batch, lengths, speech_frames=None):
    """The alignment as it was first written: every decoder layer and the logits run eagerly with
    output_attentions, the weights over the whole window renormalised over the speech frames, one utterance
    at a time (filter and DTW) -> durations per sample."""
    from whistle_pipeline.decoder import decoder_logits

    def median_filter(x, width):
        if x.shape[-1] <= width // 2:
            return x
        padded = torch.nn.functional.pad(x.reshape(-1, 1, x.shape[-1]), (width // 2, width // 2), mode="reflect")
        return padded.unfold(-1, width, 1).median(-1).values.reshape(x.shape)

    model = teacher.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            cross = decoder_logits(teacher, window, batch, speech_frames, output_attentions=True).cross_attentions
    finally:
        model.set_attn_implementation(previous)
    weights = torch.stack([cross[layer][:, head] for layer, head in heads], 1).float()  # (B, A, S, F)
    first_row = batch.prefix_length - 1
    out = []
    for b in range(window.shape[0]):
        n_tokens, n_frames = int(batch.tle_mask[b].sum()), int(lengths[b])
        w = weights[b, :, : first_row + n_tokens, :n_frames]
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-9)
        std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
        w = median_filter((w - mean) / std.clamp(min=1e-9), MEDIAN_FILTER_WIDTH)
        rows, cols = reference_dtw_path(-w.mean(0)[first_row:].double().numpy())
        out.append(durations_from_first_columns(first_columns(rows, cols, n_tokens), n_tokens, n_frames))
    return out


def test_alignment_reads_only_its_heads_and_gives_the_reference_durations(tiny_teacher_dir):
    """The alignment that runs the decoder only up to its last alignment layer, reads only the alignment heads
    over the speech frames and runs one batched DTW gives the durations of the reference (every layer with
    output_attentions, one utterance at a time) on the tiny teacher: its own heads (the last layer), heads in
    both layers out of order (a layer that holds heads runs whole), with and without the tail-template promise,
    utterances too short for their text."""
    from whistle_pipeline.decoder import load_frozen_teacher
    from whistle_pipeline.text import encode_texts

    teacher = load_frozen_teacher(str(tiny_teacher_dir), "main", "cpu", torch.float32)
    texts = ["hello world", "the quick brown fox", "one two three four five six", "one", "der fuchs"]
    batch = encode_texts(teacher.tokenizer, teacher.specials, texts, ["en"] * 5, teacher.max_positions)
    torch.manual_seed(3)
    template = torch.randn(100, 32)
    teacher.set_tail_template(template)
    lengths = torch.tensor(
        [30, 61, 2, 3, 17]
    )  # the third is too short for its text; the fourth: 3 frames, not filtered
    speech = torch.randn(5, 61, 32) * 2
    window = torch.where(
        (torch.arange(100) < lengths[:, None])[..., None], torch.nn.functional.pad(speech, (0, 0, 0, 39)), template
    )
    compared = 0
    for heads in (alignment_heads(teacher.model), [(1, 1), (0, 0), (0, 1)]):
        for speech_frames in (None, 61):
            new = align_batch(teacher, heads, window, batch, lengths, speech_frames)
            reference = reference_align_batch(teacher, heads, window, batch, lengths, speech_frames)
            for got, expected in zip(new, reference):
                assert (got is None) == (expected is None)
                if got is not None:
                    assert got.tolist() == expected.tolist()
                    compared += 1
    assert compared == 16  # 4 utterances long enough x 4 settings
    assert teacher.model.config._attn_implementation != "eager"


def test_teacher_helpers_on_a_tiny_whisper(tiny_teacher_dir):
    """Alignment durations sum to the speech frames; the decoder CE passes gradients to the window."""
    from whistle_pipeline.decoder import decoder_cross_entropy, greedy_transcribe, load_frozen_teacher
    from whistle_pipeline.text import encode_texts

    teacher = load_frozen_teacher(str(tiny_teacher_dir), "main", "cpu", torch.float32)
    assert teacher.model.model.encoder is None
    assert alignment_heads(teacher.model) == [(1, 0), (1, 1)]
    texts = ["hello world", "the quick brown fox"]
    batch = encode_texts(teacher.tokenizer, teacher.specials, texts, ["en", "en"], teacher.max_positions)
    window = torch.randn(2, 100, 32, requires_grad=True)
    lengths = torch.tensor([30, 45])
    durations = align_batch(teacher, alignment_heads(teacher.model), window, batch, lengths)
    for b, d in enumerate(durations):
        assert len(d) == int(batch.tle_mask[b].sum()) and d.sum() == lengths[b]
        assert (d[:-1] >= 1).all()
    assert teacher.model.config._attn_implementation != "eager"  # restored after the alignment
    ce, per_sample = decoder_cross_entropy(teacher, window, batch)
    assert per_sample.shape == (2,) and ce.item() > 0
    ce.backward()
    assert window.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())
    # a full window's tail is the template: projecting only the speech frames changes nothing
    template = torch.randn(100, 32)
    teacher.set_tail_template(template)
    speech = torch.randn(2, 45, 32, requires_grad=True)

    def full_window():
        return torch.where(
            (torch.arange(100) < 45)[None, :, None], torch.nn.functional.pad(speech, (0, 0, 0, 55)), template
        )

    plain, plain_per_sample = decoder_cross_entropy(teacher, full_window(), batch)
    (grad_plain,) = torch.autograd.grad(plain, speech)
    short, short_per_sample = decoder_cross_entropy(teacher, full_window(), batch, speech_frames=45)
    (grad_short,) = torch.autograd.grad(short, speech)
    torch.testing.assert_close(short_per_sample, plain_per_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_short, grad_plain, atol=1e-6, rtol=1e-4)
    full = full_window().detach()
    assert greedy_transcribe(teacher, full, ["en", "en"], 8, speech_frames=45) == greedy_transcribe(
        teacher, full, ["en", "en"], 8
    )
    hypotheses = greedy_transcribe(teacher, window.detach(), ["en", "en"], max_new_tokens=8)
    assert len(hypotheses) == 2 and all(isinstance(h, str) for h in hypotheses)
    assert corpus_wer(["Hello, world!"], ["hello world"], ["en"]) == 0.0
    assert corpus_wer(["hello world"], ["hello"], ["en"]) == 0.5
    # two languages: errors summed over both, divided by all reference words (1 of 2 + 1 of 3)
    assert corpus_wer(["hello world", "eins zwei drei"], ["hello", "eins zwei vier"], ["en", "de"]) == 2 / 5


# ---- the pronunciation front end ----


@pytest.fixture(scope="module")
def spoken_world():
    """A byte-level Whisper tokenizer, its special tokens and the eSpeak NG front end's settings."""
    from conftest import make_whisper_tokenizer

    from whistle_pipeline.pronunciation import PronunciationFrontEnd
    from whistle_pipeline.text import SpecialTokens

    tokenizer = make_whisper_tokenizer()
    return tokenizer, SpecialTokens.from_tokenizer(tokenizer, False), PronunciationFrontEnd().to_dict()


def tle_with_front_end(spoken_world, **overrides) -> TLEModel:
    tokenizer, specials, front_end = spoken_world
    settings = dict(vocab_size=len(tokenizer), end_token_id=specials.end_of_text, pronunciation=front_end)
    return tiny_tle(phoneme_channels=8, spelling_channels=0, **{**settings, **overrides}).eval()


def spoken_batch(spoken_world, model: TLEModel, texts: list[str], language: str = "en"):
    from whistle_pipeline.text import encode_texts

    tokenizer, specials, _ = spoken_world
    return encode_texts(tokenizer, specials, texts, [language] * len(texts), 64, model.front_end)


def frames_of(model: TLEModel, batch, pronunciation) -> torch.Tensor:
    with torch.no_grad():
        return model.speech_frames(
            batch.tle_tokens, batch.tle_mask, model.language_ids(batch.languages), pronunciation=pronunciation
        )[0]


@pytest.mark.espeak
def test_a_tle_saved_with_its_front_end_reloads_with_it(spoken_world, tmp_path):
    model = tle_with_front_end(spoken_world)
    batch = spoken_batch(spoken_world, model, ["the quick fox, 12 times", "acetaminophen"])
    assert batch.pronunciation.phonemes.shape[:2] == batch.tle_tokens.shape
    before = frames_of(model, batch, batch.pronunciation)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pronunciation"] == spoken_world[2] and saved["phoneme_channels"] == 8
    loaded = TLEModel.from_pretrained(tmp_path).eval()
    assert loaded.front_end is not None and loaded.front_end.to_dict() == model.front_end.to_dict()
    torch.testing.assert_close(frames_of(loaded, batch, batch.pronunciation), before, rtol=0, atol=0)
    assert TLEModel(TLEConfig(**{**loaded.config.to_dict(), "pronunciation": None})).front_end is None


@pytest.mark.espeak
def test_the_phonemes_change_the_states(spoken_world):
    model = tle_with_front_end(spoken_world)
    batch = spoken_batch(spoken_world, model, ["hello world", "the lazy dog"])
    spoken = batch.pronunciation
    states = frames_of(model, batch, spoken)
    other_word = dataclasses.replace(spoken, phonemes=spoken.phonemes.flip(0), phoneme_mask=spoken.phoneme_mask.flip(0))
    other_piece = dataclasses.replace(spoken, piece_index=spoken.piece_index + 1)
    spelled = dataclasses.replace(spoken, spelled=spoken.piece_count > 0)
    for changed in (other_word, other_piece, spelled):
        assert (frames_of(model, batch, changed) - states).abs().max() > 1e-3


@pytest.mark.espeak
def test_a_tle_refuses_a_missing_foreign_or_misshapen_pronunciation(spoken_world):
    model = tle_with_front_end(spoken_world)
    batch = spoken_batch(spoken_world, model, ["hello world", "the dog"])
    with pytest.raises(WhistleError, match="reads each token's pronunciation"):
        frames_of(model, batch, None)
    with pytest.raises(WhistleError, match="laid out for tokens"):
        frames_of(model, batch, batch.pronunciation[:1])
    plain = tle_with_front_end(spoken_world, pronunciation=None)
    assert plain.front_end is None and not hasattr(plain, "phoneme_encoder")
    with pytest.raises(WhistleError, match="without a pronunciation front end"):
        frames_of(plain, batch, batch.pronunciation)


@pytest.mark.espeak
def test_a_language_without_g2p_is_spelled_warned_once_and_gives_finite_states(spoken_world, caplog):
    model = tle_with_front_end(spoken_world, languages=["en", "yo"])
    with caplog.at_level(logging.WARNING, logger="whistle_pipeline.pronunciation"):
        assert model.spelled_languages() == ["yo"]
        batch = spoken_batch(spoken_world, model, ["Ẹ kú àárọ̀", "ọjà"], language="yo")
        english = spoken_batch(spoken_world, model, ["hello world"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'yo'" in warnings[0] and "spelling" in warnings[0]
    spoken = batch.pronunciation
    assert torch.equal(spoken.spelled, spoken.piece_count > 0) and spoken.spelled.any()
    assert not english.pronunciation.spelled.any()
    assert torch.isfinite(frames_of(model, batch, spoken)).all()


@pytest.mark.espeak
def test_encode_texts_rows_of_the_pronunciation_match_a_batch_of_those_rows(spoken_world):
    model = tle_with_front_end(spoken_world)
    texts = ["the quick brown fox jumps", "hello", "one two three"]
    whole, alone = spoken_batch(spoken_world, model, texts), spoken_batch(spoken_world, model, texts[1:2])
    L, P = alone.tle_tokens.shape[1], alone.pronunciation.phonemes.shape[2]
    row = whole.pronunciation[[1], :L]
    assert torch.equal(row.phonemes[..., :P], alone.pronunciation.phonemes)
    assert not row.phoneme_mask[..., P:].any()
    assert torch.equal(row.piece_count, alone.pronunciation.piece_count)
    moved = whole.to("cpu")
    assert moved.pronunciation is not None and torch.equal(moved.pronunciation.phonemes, whole.pronunciation.phonemes)
    assert spoken_batch(spoken_world, tle_with_front_end(spoken_world, pronunciation=None), texts).pronunciation is None
