"""Multi-process precompute's tail: how long processes sit idle at the end, static split vs dynamic claiming.

W real processes write one local store through StoreWriter's shard claims, in the order precompute uses
(stages.precompute.shard_order): the static split (shard k to process k % W) or dynamic claiming (then the
others' unclaimed shards, from the end). The encoder is simulated by a sleep per shard: `--shard-seconds`
times the process's speed factor (one process `--slow` times slower: a slow node; the others within
+-`--jitter`), so the figure is the scheduling alone, on any machine. Tail idle = the process-seconds
between each process's end and the run's end, over W x the run's wall time: the share of GPU time a
real run would leave unused. Static and dynamic runs alternate, `--repeats` times each.

    python bench/claiming.py                  # 8 processes, 32 shards, ~2.5 min
    python bench/claiming.py --quick          # a smoke run
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
from _common import describe_machine, emit, median, table

from stages.precompute import shard_order
from store import StoreSpec, StoreWriter, TeacherInfo

D_MODEL, FRAMES = 32, 50  # a token utterance per shard: the sleep is the work


def spec(shard_size: int) -> StoreSpec:
    teacher = TeacherInfo("random-d32", "main", D_MODEL, 80, 16000, 320, 50, 1500)
    return StoreSpec(teacher, "speech", 2, shard_size, 256, "none", 3, 0, "bench-claiming", "none")


def process(url: str, rank: int, world: int, n_shards: int, dynamic: bool, seconds: float, shared) -> None:
    """One simulated precompute process: claim shards in precompute's order, 'encode' and write each."""
    start, ends, written = shared
    writer = StoreWriter.open(url, spec(1))  # all processes at once, as precompute's ranks do
    states, tail = np.zeros((FRAMES, D_MODEL), np.float16), np.zeros((1500 - FRAMES, D_MODEL), np.float16)
    start.wait()
    for k in shard_order(rank, world, n_shards, set(), dynamic):
        if not writer.claim(k):
            continue
        time.sleep(seconds)  # the encoder
        with writer.shard(k) as shard:
            shard.add(f"utt{k:05d}", "text", "en", 1.0, states, tail=tail)
        written[rank] += 1
    ends[rank] = time.perf_counter()


def one_run(root: Path, world: int, n_shards: int, dynamic: bool, seconds: np.ndarray) -> tuple[float, float]:
    """(wall seconds, tail idle share) of one run of `world` processes over a new store."""
    url = str(root / ("dynamic" if dynamic else "static"))
    shutil.rmtree(url, ignore_errors=True)
    # forked: this process never opens a store (zarr's event loop does not survive a fork)
    context = multiprocessing.get_context("fork")
    start, ends, written = context.Barrier(world + 1), context.Array("d", world), context.Array("i", world)
    processes = [
        context.Process(
            target=process, args=(url, r, world, n_shards, dynamic, float(seconds[r]), (start, ends, written))
        )
        for r in range(world)
    ]
    for p in processes:
        p.start()
    start.wait()
    began = time.perf_counter()
    for p in processes:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a simulated process failed (exit code {p.exitcode})")
    finished = np.array(ends[:]) - began  # (world,)
    wall = float(finished.max())
    if sum(written) != n_shards:
        raise RuntimeError(f"{sum(written)} shards written, not {n_shards}")
    return wall, float((wall - finished).sum() / (world * wall))


@click.command()
@click.option("--processes", default=8, show_default=True)
@click.option("--shards", default=32, show_default=True, help="Shards in the store.")
@click.option(
    "--shard-seconds", default=2.0, show_default=True, help="Simulated encoder time of one shard (well above a write)."
)
@click.option("--slow", default=2.0, show_default=True, help="How many times slower the last process is.")
@click.option("--jitter", default=0.1, show_default=True, help="Speed spread of the other processes (+-).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
@click.option("--quick", is_flag=True, help="4 processes, 6 shards, one run each: a smoke run.")
def main(processes, shards, shard_seconds, slow, jitter, repeats, workdir, quick) -> None:
    if quick:
        processes, shards, shard_seconds, repeats = 4, 6, 0.05, 1
    click.echo(describe_machine())
    rng = np.random.default_rng(0)
    factors = rng.uniform(1 - jitter, 1 + jitter, processes)
    factors[-1] = slow
    seconds = shard_seconds * factors  # (processes,)
    root = Path(tempfile.mkdtemp(prefix="whistle-bench-", dir=workdir))
    runs: dict[str, list[tuple[float, float]]] = {"static": [], "dynamic": []}
    try:
        for _ in range(repeats):
            for name in ("static", "dynamic"):
                runs[name].append(one_run(root, processes, shards, name == "dynamic", seconds))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ideal = shards / (1 / seconds).sum()  # the work spread perfectly over the processes' speeds
    rows, figures = [], {}
    for name, results in runs.items():
        wall, idle = median(w for w, _ in results), median(i for _, i in results)
        rows.append([name, wall, wall / ideal, 100 * idle])
        figures |= {f"wall_s_{name}": wall, f"tail_idle_pct_{name}": 100 * idle}
    click.echo(
        f"\n{processes} processes, {shards} shards, {shard_seconds} s per shard (the last process {slow}x slower, "
        f"the others +-{jitter:.0%}); median of {repeats}"
    )
    click.echo(table(["claiming", "wall s", "vs ideal", "tail idle %"], rows))
    emit(figures | {"speedup": figures["wall_s_static"] / figures["wall_s_dynamic"]})


if __name__ == "__main__":
    main()
