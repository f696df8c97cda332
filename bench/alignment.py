"""train-tle's duration alignment: utterances per second of the alignment as it was first written (float32 full
windows built on the host, every decoder layer and the logits run eagerly with output_attentions, filter and DTW
one utterance at a time on the main thread) vs stages/tle_data.align_shard now (float16 frames to the device,
full windows built there, the decoder run only up to its last alignment layer and only the alignment heads'
attention over the speech frames computed, one batched DTW per batch on a worker thread), same teacher, same
store shard, timed round-robin in one run. The durations are checked equal (tests/test_tle.py holds the
reference and the same check on the tiny test teacher). `dtw_*`: the host side alone (DTW + durations) on
random costs of the store's shapes (3.3 tokens per second of speech), per utterance as first written vs one
batched pass per batch of similar lengths (as align_shard batches them): what bounds a GPU's alignment rate
once the decoder is fast.

The teacher is a random-weight Whisper of a released size (tiny by default) with the tests' small tokenizer,
so the vocabulary (logits) and the 1500-frame window are real; the store holds random float16 states of
Common-Voice-like clip lengths.

    python bench/alignment.py                      # tiny on CPU
    python bench/alignment.py --size base --device cuda
    python bench/alignment.py --quick              # a smoke run
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import (
    clip_seconds,
    describe_machine,
    emit,
    load_average,
    median,
    synchronizer,
    whisper_config,
    write_store,
)

from stages.tle_data import align_shard
from store import StoreReader
from whistle_pipeline.alignment import alignment_heads
from whistle_pipeline.decoder import load_frozen_teacher
from whistle_pipeline.text import encode_texts, transcript_problem

TESTS = Path(__file__).resolve().parent.parent / "tests"
# openai's alignment heads of the multilingual checkpoints (whisper/__init__.py _ALIGNMENT_HEADS, decoded)
ALIGNMENT_HEADS = {
    "tiny": [[2, 2], [3, 0], [3, 2], [3, 3], [3, 4], [3, 5]],
    "base": [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]],
    "large-v3": [[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11], [21, 4], [24, 1], [25, 6]],
}


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def save_teacher(size: str, folder: Path, dtype: torch.dtype = torch.float32, **shape: int) -> Path:
    """A random-weight Whisper of `size` (real vocabulary size and window; `shape` overrides its config) with the
    tests' small tokenizer and openai's alignment heads of that size, saved like a checkpoint in `dtype`."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    _tests_on_path()
    from conftest import make_whisper_tokenizer

    tokenizer = make_whisper_tokenizer()
    vocab = tokenizer.get_vocab()
    end, start = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    config = whisper_config(
        size,
        max_target_positions=448,
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
        decoder_start_token_id=start,
        begin_suppress_tokens=None,
        **shape,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).to(dtype)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        eos_token_id=end,
        pad_token_id=end,
        is_multilingual=False,
        alignment_heads=ALIGNMENT_HEADS[size],
        no_timestamps_token_id=vocab["<|notimestamps|>"],
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder)
    return folder


def align_shard_as_first_written(reader: StoreReader, shard: int, teacher, batch_size: int) -> dict[str, list[int]]:
    """The alignment of one shard as stages/tle_data.align_shard first did it (tests/test_tle.py's reference)."""
    _tests_on_path()
    from test_tle import reference_align_batch

    heads = alignment_heads(teacher.model)
    durations: dict[str, list[int]] = {}
    pending = []
    speech_mode = reader.spec.frames == "speech"
    if speech_mode:
        teacher.set_tail_template(torch.tensor(reader.tail_template()))

    def flush() -> None:
        windows = torch.from_numpy(np.stack([reader.full_window(u.states) for u in pending]))  # (B, F, D) float32
        windows = windows.to(teacher.model.device)
        texts, languages = [u.text for u in pending], [u.language for u in pending]
        batch = encode_texts(teacher.tokenizer, teacher.specials, texts, languages, teacher.max_positions)
        lengths = torch.tensor([u.speech_frames for u in pending])
        speech_frames = max(len(u.states) for u in pending) if speech_mode else None
        aligned = reference_align_batch(teacher, heads, windows, batch.to(windows.device), lengths, speech_frames)
        for utt, row in zip(pending, aligned):
            if row is not None:
                durations[utt.id] = row.tolist()
        pending.clear()

    for utt in reader.iter_shard(shard):
        if transcript_problem(teacher.tokenizer, teacher.specials, utt.text, utt.language, teacher.max_positions):
            continue
        pending.append(utt)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return durations


def dtw_rates(costs: list[np.ndarray], batch_size: int, repeats: int) -> tuple[float, float]:
    """Utterances per second of the host side alone (DTW + durations) on the same costs: one utterance at a
    time as first written (tests/test_tle.py's reference path) vs one batched pass per batch now."""
    _tests_on_path()
    from test_tle import first_columns, reference_dtw_path

    from whistle_pipeline.alignment import AlignmentCosts, durations_from_costs, durations_from_first_columns

    def first() -> None:
        for cost in costs:
            rows, cols = reference_dtw_path(cost)
            durations_from_first_columns(first_columns(rows, cols, cost.shape[0]), cost.shape[0], cost.shape[1])

    by_length = sorted(costs, key=lambda cost: cost.shape[1])  # align_shard batches by length

    def now() -> None:
        for start in range(0, len(by_length), batch_size):
            chunk = by_length[start : start + batch_size]
            padded = np.zeros((len(chunk), max(c.shape[0] for c in chunk), max(c.shape[1] for c in chunk)))
            for b, cost in enumerate(chunk):
                padded[b, : cost.shape[0], : cost.shape[1]] = cost
            shapes = np.array([c.shape for c in chunk])
            durations_from_costs(AlignmentCosts(padded, shapes[:, 0], shapes[:, 1]))

    seconds: dict[str, list[float]] = {"first": [], "now": []}
    for _ in range(repeats):  # round-robin: both share the load of the moment
        for name, path in (("first", first), ("now", now)):
            began = time.perf_counter()
            path()
            seconds[name].append(time.perf_counter() - began)
    return len(costs) / median(seconds["first"]), len(costs) / median(seconds["now"])


@click.command()
@click.option("--size", default="tiny", show_default=True, type=click.Choice(sorted(ALIGNMENT_HEADS)))
@click.option("--utterances", default=96, show_default=True, help="Utterances in the aligned shard.")
@click.option("--batch-size", default=32, show_default=True, help="train_tle.batch_size's default.")
@click.option("--repeats", default=3, show_default=True, help="Timed passes of each path (after a warm-up).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--quick", is_flag=True, help="8 utterances, batch 4, one pass: a smoke run.")
def main(size: str, utterances: int, batch_size: int, repeats: int, device: str, quick: bool) -> None:
    if quick:
        utterances, batch_size, repeats = 8, 4, 1
    click.echo(describe_machine(device))
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = whisper_config(size)
        seconds = clip_seconds(utterances, np.random.default_rng(0))
        write_store(folder / "store", seconds, config.d_model, shard_size=utterances)
        with torch.device(device):  # random initialisation on the device
            save_teacher(size, folder / "teacher")
        teacher = load_frozen_teacher(str(folder / "teacher"), "main", device, dtype)
        reader = StoreReader(folder / "store")
        sync = synchronizer(device)
        paths = {
            "first": lambda: align_shard_as_first_written(reader, 0, teacher, batch_size),
            "now": lambda: align_shard(reader, 0, teacher, batch_size)["durations"],
        }
        results = {name: path() for name, path in paths.items()}  # warm-up
        seconds_taken: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, path in paths.items():
                sync()
                began = time.perf_counter()
                path()
                sync()
                seconds_taken[name].append(time.perf_counter() - began)
    rng = np.random.default_rng(1)
    frames = (seconds * 50).astype(int) + 2  # speech frames of the store's clips
    costs = [rng.normal(size=(max(2, int(f / 50 * 3.3)) + 1, f)) for f in frames]  # 3.3 tokens/s + the end token
    dtw_first, dtw_now = dtw_rates(costs, batch_size, repeats)
    aligned = len(results["now"])
    same = sum(results["first"].get(utt_id) == row for utt_id, row in results["now"].items())
    tokens = np.mean([len(row) for row in results["now"].values()])
    first, now = aligned / median(seconds_taken["first"]), aligned / median(seconds_taken["now"])
    click.echo(
        f"{size}, {aligned} utterances of {seconds.mean():.1f} s mean ({tokens:.1f} TLE tokens each), batch "
        f"{batch_size}, {len(ALIGNMENT_HEADS[size])} alignment heads; {repeats} passes each, medians; "
        f"load after: {load_average()}"
    )
    emit(
        {
            "size": size,
            "device": device,
            "utterances": aligned,
            "same_durations": same,
            "first_utt_per_s": first,
            "now_utt_per_s": now,
            "speedup": now / first,
            "dtw_first_utt_per_s": dtw_first,
            "dtw_now_utt_per_s": dtw_now,
            "dtw_speedup": dtw_now / dtw_first,
        }
    )


if __name__ == "__main__":
    main()
