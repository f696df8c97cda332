"""Resuming mid-epoch: the time from a restart to the first training batch, replaying the epoch vs seeking.

A train-tle run restarted from a checkpoint must go on with exactly the batches it would have had. The old
way read the epoch again from its start and dropped the batches already taken; `FeatureDataset.set_epoch(
epoch, taken, ...)` seeks instead (the shards' small arrays only, then the items still in the shuffle
buffer). Both are timed on a store and on a store 10x larger, at 90 % of an epoch (the replay's worst
case grows with the position), with train-tle's loader settings (pipeline.toml), interleaved old / new in
the same run; both must give the same first batch. Seeking reads what the shuffle buffer and the length
pool hold at the position (~2 buffers of utterances, whatever the store's size), replaying everything
before it: on a store far larger than the buffer (10^6 utterances against train-tle's 2048) the gap is
far wider than on stores small enough to write here, so --shuffle-buffer scales the buffer down with them.

    python bench/resume.py            # CPU, ~3 min
    python bench/resume.py --quick    # a smoke run
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import clip_seconds, describe_machine, emit, median, table, write_store
from torch.utils.data import DataLoader

from stages.training_data import endless_epochs
from store.dataset import FeatureDataset, pad_batch


def replayed(dataset: FeatureDataset, epoch: int, taken: int, batch_size: int, workers: int) -> dict:
    """The first batch after `taken`, the old way: the epoch read from its start, `taken` batches dropped."""
    dataset.set_epoch(epoch)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=pad_batch,
        generator=torch.Generator().manual_seed(epoch),
    )
    for seen, batch in enumerate(loader, start=1):
        if seen > taken:
            return batch
    raise ValueError(f"the epoch has {taken} batches or fewer")


def sought(dataset: FeatureDataset, epoch: int, taken: int, batch_size: int, workers: int) -> dict:
    """The first batch after `taken`, as the training stages resume now."""
    batches = endless_epochs(dataset, 0, epoch, taken, batch_size=batch_size, num_workers=workers, collate_fn=pad_batch)
    return next(batches)[2]


def epoch_batches(dataset: FeatureDataset, batch_size: int, workers: int) -> int:
    dataset.set_epoch(0)
    return sum(1 for _ in DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=pad_batch))


@click.command()
@click.option("--utterances", default=256, show_default=True, help="Utterances in the small store (the large has 10x).")
@click.option("--d-model", default=384, show_default=True, help="Width of the stored states (384: tiny).")
@click.option("--shard-size", default=128, show_default=True)
@click.option("--position", default=0.9, show_default=True, help="Where in the epoch the run resumes.")
@click.option("--shuffle-buffer", default=None, type=int, help="Default: train_tle.shuffle_buffer.")
@click.option("--length-bucket", default=None, type=int, help="Default: train_tle.length_bucket.")
@click.option("--repeats", default=3, show_default=True, help="Old / new pairs per store; the median is reported.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
@click.option("--quick", is_flag=True, help="Tiny stores, one pair: a smoke run.")
def main(utterances, d_model, shard_size, position, shuffle_buffer, length_bucket, repeats, workdir, quick) -> None:
    from whistle_pipeline.config import load_config

    settings = load_config().train_tle
    batch_size, workers = settings.batch_size, settings.num_workers
    shuffle_buffer = shuffle_buffer or settings.shuffle_buffer
    length_bucket = settings.length_bucket if length_bucket is None else length_bucket
    if quick:
        utterances, d_model, shard_size, repeats, batch_size = 16, 32, 8, 1, 4
    click.echo(describe_machine())
    rng = np.random.default_rng(0)
    root = Path(tempfile.mkdtemp(prefix="whistle-bench-", dir=workdir))
    rows, figures = [], {}
    try:
        for name, n in (("1x", utterances), ("10x", 10 * utterances)):
            url = root / name
            write_store(url, clip_seconds(n, rng, 2.0, 8.0), d_model, shard_size)
            dataset = FeatureDataset(
                url,
                seed=0,
                shuffle_buffer=shuffle_buffer,
                length_bucket=length_bucket,
                rank=0,
                world_size=1,
            )
            taken = int(position * epoch_batches(dataset, batch_size, workers))
            times: dict[str, list[float]] = {"replay": [], "seek": []}
            for _ in range(repeats):
                for way, first_batch in (("replay", replayed), ("seek", sought)):
                    began = time.perf_counter()
                    batch = first_batch(dataset, 0, taken, batch_size, workers)
                    times[way].append(time.perf_counter() - began)
                    if way == "replay":
                        expected = batch["ids"]
                    elif batch["ids"] != expected:
                        raise RuntimeError(f"seeking gave another batch than replaying on the {name} store")
            old, new = median(times["replay"]), median(times["seek"])
            rows.append([f"{name}: {n} utterances, resume at batch {taken}", old, new, old / new])
            figures |= {f"replay_s_{name}": old, f"seek_s_{name}": new, f"speedup_{name}": old / new}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    click.echo(
        f"\nstores of random float16 states, d_model {d_model}, 2-8 s clips, shards of {shard_size}; batches of "
        f"{batch_size}, shuffle buffer {shuffle_buffer}, length groups of {length_bucket}, "
        f"{workers} workers; seconds to the first batch after the restart (median of {repeats}, page cache warm)"
    )
    click.echo(table(["store", "replay s", "seek s", "speedup"], rows))
    emit(figures)


if __name__ == "__main__":
    main()
