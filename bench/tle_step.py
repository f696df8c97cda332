"""train-tle's step: steps per second of phase 1 (regression) and phase 2 (+ the frozen decoder's terms), and
the host syncs per step, of this checkout and of a baseline commit (--baseline), in one run.

Each measurement is stages/train_tle.py's own loop (`train`, after `start_run`, `open_inputs`, `restore`,
`open_batches`) on the same store and teacher, in a fresh subprocess that imports the code of one checkout (the
baseline is checked out once into a temporary git worktree); the runs alternate (baseline, this, baseline, ...)
so both share the machine's load of the moment. A step is timed between the loop's reads of its batches, after
--warmup steps. Host syncs: calls, in the loop's process, of what reads a tensor back to the host — Tensor.item,
.tolist, .numpy, bool(), int(), float() — counted by wrapping them (in the measuring subprocess only); each
waits for the GPU there (on a CPU they only count), but AdamW's reads of its host-side step counters. The
batches are made by a DataLoader worker (not counted).

The teacher is a random-weight Whisper of a released size (tiny by default: real window and vocabulary) with
the tests' small tokenizer; the store holds random float16 states of Common-Voice-like lengths; the durations
are aligned once (this checkout) and given to every run.

    python bench/tle_step.py --baseline 911a211      # before/after on CPU
    python bench/tle_step.py --quick                 # a smoke run (this checkout only)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import clip_seconds, describe_machine, emit, load_average, median, whisper_config, write_store

ROOT = Path(__file__).resolve().parent.parent
READ_BACKS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")


def count_read_backs() -> dict[str, int]:
    """Wrap the Tensor methods that read a value back to the host; returns the live call counts. Calls from
    torch.optim are left out: AdamW reads its step counters, which it keeps on the host (no GPU sync)."""
    counts = dict.fromkeys(READ_BACKS, 0)
    optim = str(Path(torch.optim.__file__).parent)
    for name in READ_BACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if not sys._getframe(1).f_code.co_filename.startswith(optim):
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    return counts


def measure(world: Path, phase: int, steps: int, warmup: int, batch_size: int, output_dir: Path) -> dict:
    """In this process (the code on sys.path): time `steps` steps of the train-tle loop in `phase` after `warmup`."""
    from stages.train_tle import open_batches, open_inputs, restore, start_run, train, validation_data
    from whistle_pipeline.config import load_config

    total = warmup + steps + 1  # the last step's batch read closes the timing: its own step is not timed
    config = load_config(
        overrides=[
            f"teacher.name_or_path={json.dumps(str(world / 'teacher'))}",
            "teacher.device=cpu",
            f"store.path={json.dumps(str(world / 'store'))}",
            f"train_tle.output_dir={json.dumps(str(output_dir))}",
            f"train_tle.steps={total}",
            "train_tle.warmup_steps=1",
            f"train_tle.decoder_ce_start={0 if phase == 2 else 10 * total}",
            f"train_tle.batch_size={batch_size}",
            f"train_tle.log_every={total}",
            f"train_tle.val_every={total}",
            f"train_tle.checkpoint_every={total}",
            "train_tle.val_size=1",
            "train_tle.val_wer_size=0",
            "train_tle.num_workers=1",
            "train_tle.progress=false",
            "train_tle.log_with=[]",
            "train_tle.resume=false",
        ]
    )
    setup = start_run(config, "train_tle", ("teacher", "store.path", "tle", "train_tle"))
    inputs = open_inputs(setup)
    training = restore(setup, inputs)
    batches = open_batches(setup, inputs, training)
    marks: list[float] = []
    read_backs: list[int] = []
    counts = count_read_backs()

    def timed_batches():
        for item in batches:
            marks.append(time.perf_counter())
            read_backs.append(sum(counts.values()))
            yield item

    train(setup, inputs, training, timed_batches(), validation_data(setup, inputs))
    seconds = np.diff(marks[warmup:])  # (steps,) batch read to batch read
    return {
        "steps_per_s": 1 / float(np.median(seconds)),
        "syncs_per_step": (read_backs[-1] - read_backs[warmup]) / steps,
    }


def checkout(ref: str, folder: Path) -> Path:
    """`ref` of this repository checked out (detached) into `folder`."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), ref], check=True, capture_output=True
    )
    return folder


def run_measure(code: Path, world: Path, phase: int, steps: int, warmup: int, batch_size: int, run: int) -> dict:
    """measure() in a subprocess importing the code of `code` (a checkout root)."""
    output_dir = world / f"run-{run}"
    shutil.copytree(world / "durations", output_dir / "durations")  # the alignment, made once
    environment = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{ROOT / 'bench'}"}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        json.dumps([str(world), phase, steps, warmup, batch_size, str(output_dir)]),
    ]
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"the measurement in {code} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_world(folder: Path, size: str, clips: int) -> None:
    """The teacher, the store, and its durations aligned once by this checkout."""
    from alignment import save_teacher

    from stages.tle_data import align_store
    from stages.training import make_accelerator
    from store import StoreReader
    from whistle_pipeline.decoder import load_frozen_teacher

    save_teacher(size, folder / "teacher")
    write_store(folder / "store", clip_seconds(clips, np.random.default_rng(0)), whisper_config(size).d_model, clips)
    teacher = load_frozen_teacher(str(folder / "teacher"), "main", "cpu", torch.float32)
    accelerator, _ = make_accelerator("cpu", "no", 1, folder / "align")
    align_store(
        accelerator, StoreReader(folder / "store"), teacher, str(folder / "teacher"), folder / "durations", 32, False
    )


@click.command()
@click.option("--baseline", default=None, help="A git ref to measure beside this checkout (e.g. the merge base).")
@click.option("--size", default="tiny", show_default=True, help="The teacher's Whisper size (random weights).")
@click.option("--clips", default=256, show_default=True, help="Utterances in the store.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--steps", default=6, show_default=True, help="Timed steps per run (after --warmup).")
@click.option("--warmup", default=2, show_default=True)
@click.option("--repeats", default=2, show_default=True, help="Runs of each code and phase, alternated.")
@click.option("--quick", is_flag=True, help="48 clips, batch 4, 2 steps, one run, no baseline: a smoke run.")
@click.option("--measure", "measure_arguments", default=None, hidden=True)
def main(
    baseline: str | None,
    size: str,
    clips: int,
    batch_size: int,
    steps: int,
    warmup: int,
    repeats: int,
    quick: bool,
    measure_arguments: str | None,
) -> None:
    if measure_arguments:  # the subprocess: one measurement, one JSON line
        world, phase, steps, warmup, batch_size, output_dir = json.loads(measure_arguments)
        click.echo(json.dumps(measure(Path(world), phase, steps, warmup, batch_size, Path(output_dir))))
        return
    if quick:
        clips, batch_size, steps, warmup, repeats, baseline = 48, 4, 2, 1, 1, None
    click.echo(describe_machine())
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        make_world(world, size, clips)
        codes = {"now": ROOT}
        if baseline:
            codes = {"baseline": checkout(baseline, world / "baseline"), **codes}
        figures: dict[str, list[dict]] = {}
        run = 0
        try:
            for _ in range(repeats):
                for phase in (1, 2):
                    for name, code in codes.items():
                        run += 1
                        result = run_measure(code, world, phase, steps, warmup, batch_size, run)
                        figures.setdefault(f"phase{phase}_{name}", []).append(result)
        finally:
            if baseline:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(world / "baseline")], check=False
                )
    click.echo(
        f"{size} teacher, TLE of pipeline.toml's [tle] size, batch {batch_size}, {steps} timed steps after {warmup}, "
        f"{repeats} runs of each, medians; load after: {load_average()}"
    )
    out: dict[str, object] = {"size": size, "batch_size": batch_size}
    for key, results in figures.items():
        out[f"{key}_steps_per_s"] = median(r["steps_per_s"] for r in results)
        out[f"{key}_syncs_per_step"] = median(r["syncs_per_step"] for r in results)
    if baseline:
        for phase in (1, 2):
            out[f"phase{phase}_speedup"] = (
                out[f"phase{phase}_now_steps_per_s"] / out[f"phase{phase}_baseline_steps_per_s"]
            )
    emit(out)


if __name__ == "__main__":
    main()
