"""Fault-injection trials: what a crash, a full disk or a second run does to a store or a training run.

    python bench/faults.py                    # every trial: 12 precompute kills, 3 train-tle and 3 finetune
                                              # kills, 3 concurrent runs, 24 disk-full limits, 16 bit flips
                                              # (~17 min, 2 cores)
    python bench/faults.py --kills 20 --seed 7
    python bench/faults.py --quick            # one trial of each kind (a smoke run)
    python bench/faults.py --only bit-flip --bit-flips 3   # only these trials

Every trial runs the real thing — `python -m whistle_pipeline ...` processes killed with SIGKILL,
a real Zarr store on disk — with a tiny random Whisper and synthetic clips made here (the same
builders the tests use). Prints one table row per trial (fault, trial, where it struck, outcome)
and `name=value` totals; exits 1 if any trial lost or corrupted anything.

  precompute-kill  SIGKILL at a seeded random moment (1 in 4 trials in start-up, the others while shard k + 1
                   is encoded or written, k uniform over the shards); the rerun must finish, leave no incomplete
                   shard, pass `inspect-store --check`, and equal a clean run bit for bit (utterances,
                   rejects, states, tail template, statistics).
  concurrent       a second identical run started at a random moment of the first: both exit 0, each shard
                   is written by exactly one of them, and the store equals a clean run.
  disk-full        the store behind an fsspec filesystem (protocol diskfull://) whose writes fail with
                   ENOSPC once N bytes are written; N is swept over the run's bytes, with failed writes
                   leaving nothing (object stores) or a partial object (plain files). The run must stop
                   with a StoreError, no complete shard may be damaged, and a rerun with space must
                   complete to the clean store.
  bad-input        the corpus of tests/data/make_bad_inputs.py (truncated, empty, random-bytes, NaN/Inf, 8/24-bit,
                   6-channel, 8/48 kHz, 45 s, silent, DC-offset clips; empty, non-UTF-8, 2,000-character text;
                   unknown language, duplicate ids, missing files, broken manifest rows) precomputed once: each
                   item must be stored as its table says or rejected with its reason's kind, and a manifest
                   without the text column refused whole.
  bit-flip         one bit flipped, at a seeded random place, in the stored object of each array kind of a
                   shard (offsets ... states: ARRAY_KINDS, the shard seeded too) and of the cache (CACHE_ARRAYS)
                   of a copy of the clean store: `inspect-store --check` must exit 1 naming the shard (or the
                   cache entry) and the array; the reader must refuse the shard with a DamagedShardError naming
                   both, or for the cache not use it (the template and statistics equal the clean run's). Then
                   the repair the error names: delete the shard, rerun precompute: identical to the clean run.
  train-tle-kill / finetune-kill
                   SIGKILL after a random number of logged steps (plus a random part of a step); the rerun
                   resumes from the last complete checkpoint: every step logged once, losses within 1e-4 of
                   an uninterrupted run (train-tle), identical final weights (finetune).
  overwrite        each stage (precompute, train-tle, finetune, evaluate, validate-tle, synthesize, import-ct2)
                   given an output that is an input, lies inside a model folder or store it reads, or holds an
                   input: refused, naming the relation, with every input and the output path hashing the same
                   before and after.
  manifest-rows    manifests with an unbalanced quote (TSV, CSV), a byte-order mark, a key or column named
                   twice, list/boolean/object cells and invisible-only text, precomputed: every physical row
                   stored with its own text or rejected naming its line, and stored + rejected = the rows.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from store.reader import INDEX_ARRAYS
from store.reduction import SUM_ARRAYS

TESTS = Path(__file__).resolve().parent.parent / "tests"
CLIPS = 16  # shards of 2 clips: 8 shards, each closed and marked complete separately
SHARD_SIZE = 2
MISSING_ROW = 5  # a row whose audio does not exist: rejects are compared too
POLL_SECONDS = 0.005


# --- the world: a tiny teacher and clips --------------------------------------------------------------


@dataclass(frozen=True)
class World:
    teacher: Path  # a tiny random Whisper with a 2 s window (100 encoder frames): many shards in seconds
    manifest: Path


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def make_world(folder: Path, clips: int = CLIPS) -> World:
    """A tiny 2 s-window teacher and `clips` short clips (one missing) with a JSONL manifest."""
    _tests_on_path()
    from conftest import make_tiny_whisper, write_clip

    folder.mkdir(parents=True, exist_ok=True)
    teacher = make_tiny_whisper(folder / "teacher", window_seconds=2)
    rows = []
    for i in range(clips):
        write_clip(folder / f"c{i:03d}.wav", 0.3 + 0.05 * i, [16000, 22050][i % 2], seed=i)
        rows.append({"audio": "missing.wav" if i == MISSING_ROW else f"c{i:03d}.wav", "text": f"clip {i}"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    return World(teacher, manifest)


def precompute_arguments(world: World, store: str, num_workers: int = 0) -> list[str]:
    return [
        "precompute",
        "--data",
        str(world.manifest),
        "--teacher",
        str(world.teacher),
        "--device",
        "cpu",
        "--store",
        store,
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        "2",
        "--num-workers",
        str(num_workers),
        "--set",
        "precompute.progress=false",
        "--set",
        "precompute.write_threads=1",
    ]


def precompute(world: World, store: str, num_workers: int = 0):
    """One precompute run in this process (the reference and the reruns)."""
    from click.testing import CliRunner

    from whistle_pipeline.cli import cli

    result = CliRunner().invoke(cli, ["-q", *precompute_arguments(world, store, num_workers)])
    return result


def spawn(arguments: list[str], log: Path) -> subprocess.Popen:
    """`python -m whistle_pipeline ARGUMENTS` in its own process group, output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "whistle_pipeline", "-q", *arguments],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )


def kill(process: subprocess.Popen) -> bool:
    """SIGKILL the process; True when it was still running (the kill struck)."""
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return running


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


# --- comparing stores ---------------------------------------------------------------------------------


def store_contents(url: str) -> dict[Any, Any]:
    """Everything a run decides, per complete shard (timestamps excluded), plus template and statistics."""
    from store import StoreReader

    reader = StoreReader(url)
    out: dict[Any, Any] = {}
    for shard in reader.shards():
        attrs = reader.shard_attrs(shard)
        utterances = list(reader.iter_shard(shard))
        out[shard] = {
            "attrs": {key: attrs[key] for key in ("n", "n_frames", "audio_seconds", "rejects", "complete")},
            "ids": [u.id for u in utterances],
            "texts": [u.text for u in utterances],
            "durations": [u.duration for u in utterances],
            "states": [u.states for u in utterances],
        }
    out["template"] = reader.tail_template()
    out["statistics"] = reader.statistics()
    return out


def store_differences(url: str, reference: dict[Any, Any]) -> list[str]:
    """What differs between the store at `url` and a clean run's contents (empty: identical, whole)."""
    from store import StoreReader, inspect_store

    report = inspect_store(url, check=True)
    problems = [f"shard {f.shard}: {f.problem}" for f in report.faults]
    if report.incomplete_shards:
        problems.append(f"incomplete shards {report.incomplete_shards}")
    if problems:
        return problems
    got = store_contents(url)
    shards = sorted(k for k in reference if isinstance(k, int))
    if sorted(k for k in got if isinstance(k, int)) != shards:
        return [f"complete shards {sorted(k for k in got if isinstance(k, int))} != {shards}"]
    for shard in shards:
        for key in ("attrs", "ids", "texts", "durations"):
            if got[shard][key] != reference[shard][key]:
                problems.append(f"shard {shard}: {key} differ")
        if any(not np.array_equal(a, b) for a, b in zip(got[shard]["states"], reference[shard]["states"])):
            problems.append(f"shard {shard}: states differ")
    if not np.array_equal(got["template"], reference["template"]):
        problems.append("tail template differs")
    if any(not np.array_equal(a, b) for a, b in zip(got["statistics"], reference["statistics"])):
        problems.append("statistics differ")
    if StoreReader(url).record("precompute.json") is None:
        problems.append("no precompute.json")
    return problems


def complete_shards(path: Path) -> int:
    """Shards whose zarr.json says complete (0 while the store does not exist)."""
    count = 0
    for meta in (path / "shards").glob("*/zarr.json"):
        try:
            count += json.loads(meta.read_text()).get("attributes", {}).get("complete") is True
        except (ValueError, OSError):  # being written
            pass
    return count


def store_state(path: Path) -> str:
    """Where a kill struck, read from what it left on disk."""
    if not (path / "zarr.json").exists():
        return "before the store existed" if not path.exists() or not any(path.iterdir()) else "store being created"
    complete = incomplete = with_arrays = 0
    for meta in sorted((path / "shards").glob("*/zarr.json")):
        try:
            done = json.loads(meta.read_text()).get("attributes", {}).get("complete") is True
        except (ValueError, OSError):
            done = False
        complete += done
        incomplete += not done
        with_arrays += not done and any(p.is_dir() for p in meta.parent.iterdir())
    partial = sum(1 for _ in path.rglob("*.partial"))
    where = f"{complete} shards complete, {incomplete} incomplete"
    if with_arrays:
        where += f" ({with_arrays} mid-write)"
    if partial:
        where += f", {partial} .partial file(s)"
    if (path / "precompute.json").exists():
        where += ", run record written"
    return where


# --- trials -------------------------------------------------------------------------------------------


@dataclass
class Trial:
    fault: str
    trial: str
    where: str
    outcome: str
    ok: bool
    seconds: float = 0.0


def timed_clean_run(world: World, folder: Path) -> tuple[dict[Any, Any], float, float]:
    """A clean CLI run as a process: its contents, seconds to the store's creation and seconds after it."""
    store = folder / "clean"
    started = time.monotonic()
    process = spawn(precompute_arguments(world, str(store)), folder / "clean.log")
    wait_for(lambda: (store / "zarr.json").exists(), process)
    created = time.monotonic()
    if process.wait() != 0:
        raise RuntimeError(f"the clean run failed:\n{(folder / 'clean.log').read_text()[-3000:]}")
    return store_contents(str(store)), created - started, time.monotonic() - created


def precompute_kill_trial(
    world: World,
    folder: Path,
    seed: int,
    reference: dict[Any, Any],
    startup: float,
    work: float,
    copy: Path | None = None,
) -> Trial:
    """SIGKILL a precompute run at a seeded random moment, rerun it, compare with the clean run.
    With `copy`, the killed store is first copied there (a store copied while incomplete)."""
    rng = np.random.default_rng(seed)
    store = folder / f"kill-{seed}"
    num_workers = int(rng.integers(0, 2))  # also kill a main process whose DataLoader worker outlives it
    began = time.monotonic()
    process = spawn(precompute_arguments(world, str(store), num_workers), folder / f"kill-{seed}.log")
    if seed % 4 == 3:  # somewhere in start-up: imports, model loading, the store's creation
        time.sleep(rng.uniform(0.0, startup))
    else:
        # while shard k + 1 is being encoded or written, k uniform: a kill timed from the start would
        # often land after the end, since runs vary in speed on a shared machine
        n_shards = -(-CLIPS // SHARD_SIZE)
        complete_before = int(rng.integers(0, n_shards))
        wait_for(lambda: complete_shards(store) >= complete_before, process)
        time.sleep(rng.uniform(0.0, work / n_shards))
    struck = kill(process)
    where = store_state(store) if struck else "(the run had finished)"
    if copy is not None and store.exists():
        shutil.copytree(store, copy)
    result = precompute(world, str(store), num_workers)
    if result.exit_code != 0:
        return Trial(
            "precompute-kill",
            f"seed {seed}",
            where,
            f"RERUN FAILED: {result.output[-300:]}",
            False,
            time.monotonic() - began,
        )
    written = re.search(r"(\d+) written, (\d+) skipped", result.output)
    problems = store_differences(str(store), reference)
    outcome = (
        f"rerun wrote {written[1]}, kept {written[2]}; identical to the clean run"
        if not problems
        else "DIFFERS: " + "; ".join(problems[:3])
    )
    return Trial(
        "precompute-kill",
        f"seed {seed}, {num_workers} worker(s)",
        where,
        outcome,
        not problems,
        time.monotonic() - began,
    )


def concurrent_trial(world: World, folder: Path, seed: int, reference: dict[Any, Any], work: float) -> Trial:
    """Two identical runs at once: both succeed, every shard is written once, the store is the clean one."""
    rng = np.random.default_rng(1000 + seed)
    store = folder / f"twice-{seed}"
    began = time.monotonic()
    first = spawn(precompute_arguments(world, str(store)), folder / f"twice-{seed}-a.log")
    delay = rng.uniform(0.0, 0.9 * work)  # both take as long to start: the second writes `delay` s later
    time.sleep(delay)
    second = spawn(precompute_arguments(world, str(store)), folder / f"twice-{seed}-b.log")
    codes = first.wait(), second.wait()
    logs = [(folder / f"twice-{seed}-{x}.log").read_text() for x in "ab"]
    where = f"second run started {delay:.1f} s after the first"
    if codes != (0, 0):
        return Trial("concurrent", f"seed {seed}", where, f"EXIT CODES {codes}: {logs[1][-300:]}", False)
    written = [int(re.search(r"(\d+) written", log)[1]) for log in logs]
    problems = store_differences(str(store), reference)
    n_shards = -(-CLIPS // SHARD_SIZE)
    if sum(written) != n_shards:
        problems.append(f"shards written {written[0]} + {written[1]} != {n_shards}")
    outcome = (
        f"both exit 0; shards written {written[0]} + {written[1]} = {n_shards}; identical to the clean run"
        if not problems
        else "PROBLEM: " + "; ".join(problems[:3])
    )
    return Trial("concurrent", f"seed {seed}", where, outcome, not problems, time.monotonic() - began)


class DiskFullFileSystem(LocalFileSystem):
    """Local files behind `diskfull://`; once `limit` bytes are written, writes fail with ENOSPC.

    `partial=True`: the failing write leaves the bytes that fitted (a plain file on a full disk);
    `partial=False`: it leaves nothing (an object store's put, or zarr's LocalStore temp-file-and-rename).
    """

    protocol = ("diskfull",)
    limit = 2**62
    written = 0
    partial = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return LocalFileSystem._strip_protocol(str(path).removeprefix("diskfull://"))

    @classmethod
    def reset(cls, limit: int, partial: bool) -> None:
        cls.limit, cls.written, cls.partial = limit, 0, partial

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        cls = DiskFullFileSystem
        room = cls.limit - cls.written
        if len(value) > room:
            if cls.partial:
                super().pipe_file(path, value[: max(room, 0)], mode=mode, **kwargs)
            cls.written = cls.limit
            raise OSError(errno.ENOSPC, "No space left on device", path)
        cls.written += len(value)
        super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("diskfull", DiskFullFileSystem, clobber=True)


def disk_full_trial(world: World, folder: Path, limit: int, partial: bool, reference: dict[Any, Any]) -> Trial:
    """Precompute into a store whose disk fills after `limit` bytes; then rerun with space."""
    store = folder / f"full-{limit}-{'partial' if partial else 'atomic'}"
    shutil.rmtree(store, ignore_errors=True)
    url = f"diskfull://{store}"
    mode = "partial writes" if partial else "atomic writes"
    DiskFullFileSystem.reset(limit, partial)
    began = time.monotonic()
    result = precompute(world, url)
    DiskFullFileSystem.reset(2**62, partial)
    where = f"full after {limit:,} B ({mode}); " + store_state(store)
    if result.exit_code == 0:
        return Trial("disk-full", f"{limit:,} B, {mode}", where, "the run fitted", True)
    message = result.output.strip().splitlines()[-1] if result.output.strip() else repr(result.exception)
    clear = "No space left on device" in result.output and "Traceback" not in result.output
    visible = []
    if (store / "zarr.json").exists():
        from store import StoreError, inspect_store

        try:
            report = inspect_store(url, check=True)
            visible = [f"shard {f.shard}: {f.problem}" for f in report.faults]
        except StoreError as err:  # the root's one write was cut short: there is nothing to read yet
            if (store / "shards").exists():
                visible = [f"store unreadable: {err}"]
    rerun = precompute(world, url)
    problems = [] if rerun.exit_code == 0 else [f"rerun failed: {rerun.output.strip()[-300:]}"]
    problems += visible + ([] if problems else store_differences(url, reference))
    if not clear:
        problems.append(f"unclear error: {message[:200]}")
    outcome = (
        f"stopped: {message[:90]}...; rerun completed, identical"
        if not problems
        else "PROBLEM: " + "; ".join(problems[:3])
    )
    return Trial("disk-full", f"{limit:,} B, {mode}", where, outcome, not problems, time.monotonic() - began)


ARRAY_KINDS = INDEX_ARRAYS + SUM_ARRAYS + ("states",)  # every array of a shard
CACHE_KINDS = ("tail_template", "tail_count", "mean", "std")


def flip_random_bit(path: Path, rng: np.random.Generator) -> str:
    """Flip one bit anywhere in the file; says where."""
    raw = np.frombuffer(path.read_bytes(), np.uint8).copy()
    bit = int(rng.integers(8 * raw.size))
    raw[bit // 8] ^= np.uint8(1 << (bit % 8))
    path.write_bytes(raw.tobytes())
    return f"bit {bit} of {raw.size:,} B"


def bit_flip_trial(
    world: World, folder: Path, clean: Path, kind: str, cache: bool, seed: int, reference: dict[Any, Any]
) -> Trial:
    """One bit flipped in one array of a copy of the clean store (see the module docstring)."""
    from click.testing import CliRunner

    from store import StoreReader
    from store.format import DamagedShardError
    from store.reduction import shard_sums
    from whistle_pipeline.cli import cli

    rng = np.random.default_rng([seed, (ARRAY_KINDS + CACHE_KINDS).index(kind) + 100 * cache])
    store = folder / f"flip-{'cache-' if cache else ''}{kind}-{seed}"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(clean, store)
    began = time.monotonic()
    if cache:
        [entry] = [path for path in (store / "cache").iterdir() if path.is_dir()]
        owner, named = f"cache entry {entry.name}", f"cache: entry {entry.name}: {kind} is unreadable"
        array = entry / kind
    else:
        shard = int(rng.integers(len(StoreReader(str(clean)).shards())))
        owner, named = f"shard {shard:05d}", f"shard {shard:05d}: "
        array = store / "shards" / f"{shard:05d}" / kind
    [target] = [path for path in (array / "c").rglob("*") if path.is_file()]
    where = f"{owner}, {kind}: {flip_random_bit(target, rng)}"
    problems = []
    check = CliRunner().invoke(cli, ["inspect-store", str(store), "--check"])
    if check.exit_code != 1 or named not in check.output or kind not in check.output.split(named, 1)[1].split("\n")[0]:
        problems.append(f"--check exit {check.exit_code} did not name {owner} and {kind}: {check.output[-300:]}")
    reader = StoreReader(str(store))
    if cache:
        if not (
            np.array_equal(reader.tail_template(), reference["template"])
            and all(np.array_equal(a, b) for a, b in zip(reader.statistics(), reference["statistics"]))
        ):
            problems.append("the reduction differs from the clean run's")
        if entry.exists():
            problems.append("the damaged cache entry was kept")
        repair = "the cache was not used: recomputed, equal to the clean run's, the entry replaced"
    else:
        try:
            for _ in reader.iter_shard(shard):
                pass
            shard_sums(reader.root, reader.url, reader.teacher, shard)
            problems.append("the reader read the shard")
        except DamagedShardError as err:
            if f"shard {shard:05d} of store" not in str(err) or kind not in str(err):
                problems.append(f"the reader's error names another shard or array: {err}")
        shutil.rmtree(store / "shards" / f"{shard:05d}")
        if precompute(world, str(store)).exit_code != 0:
            problems.append("the repair's precompute failed")
        repair = "refused by the reader naming both; shard deleted, precompute rerun"
    problems += store_differences(str(store), reference)
    outcome = (
        f"--check named {owner} and {kind}; {repair}; identical to the clean run"
        if not problems
        else "PROBLEM: " + "; ".join(problems[:3])
    )
    return Trial(
        "bit-flip",
        f"{'cache ' if cache else ''}{kind}, seed {seed}",
        where,
        outcome,
        not problems,
        time.monotonic() - began,
    )


# --- training runs ------------------------------------------------------------------------------------

TRAINING_STEPS = {"train-tle": 16, "finetune": 12}
CHECKPOINT_EVERY = {"train-tle": 4, "finetune": 3}


def tle_config(folder: Path, output_dir: Path, steps: int, checkpoint_every: int):
    """The train-tle settings of tests/test_train_tle.py's resume test, on its synthetic store."""
    _tests_on_path()
    from conftest import make_tiny_teacher
    from test_train_tle import tle_config as config_of
    from test_train_tle import write_tle_store

    teacher = folder / "tle-teacher"
    if not teacher.exists():
        make_tiny_teacher(teacher)
        write_tle_store(folder / "tle-store", teacher)
    return config_of(
        folder / "tle-store",
        teacher,
        output_dir,
        f"train_tle.steps={steps}",
        f"train_tle.checkpoint_every={checkpoint_every}",
        "train_tle.val_every=100",
        "train_tle.val_wer_size=0",
        f"train_tle.decoder_ce_start={steps // 2}",
        "tle.dropout=0.1",
        "train_tle.keep_checkpoints=2",
    )


def finetune_config(folder: Path, output_dir: Path, steps: int, checkpoint_every: int):
    """The finetune settings of tests/test_finetune.py's resume test, on its tiny world."""
    _tests_on_path()
    from test_finetune import (
        SOURCE_WORDS,
        TARGET_SENTENCES,
        make_teacher,
        write_store,
        write_tle,
    )
    from test_finetune import (
        finetune_config as config_of,
    )

    root = folder / "finetune-world"
    world = {
        "teacher": root / "teacher",
        "audio_store": root / "source-store",
        "tts_store": root / "tts-store",
        "tle": root / "tle",
        "text": root / "target.txt",
    }
    if not root.exists():
        make_teacher(world["teacher"])
        rng = np.random.default_rng(0)
        source = [" ".join(rng.choice(SOURCE_WORDS, size=int(rng.integers(2, 6)))) for _ in range(40)]
        write_store(world["audio_store"], world["teacher"], source, seed=1)
        write_store(world["tts_store"], world["teacher"], TARGET_SENTENCES, seed=2)
        write_tle(world["tle"], world["teacher"], world["audio_store"], ["en"])
        world["text"].write_text("\n".join(TARGET_SENTENCES) + "\n", encoding="utf-8")
    return config_of(
        world,
        output_dir,
        f"finetune.steps={steps}",
        f"finetune.val_every={steps}",
        f"finetune.checkpoint_every={checkpoint_every}",
        "finetune.keep_checkpoints=2",
        "finetune.audio_ratio=0.25",
        "finetune.tts_ratio=0.25",
        "finetune.select_best=false",
    )


def training_config(
    stage: str, folder: Path, output_dir: Path, steps: int | None = None, checkpoint_every: int | None = None
):
    make = tle_config if stage == "train-tle" else finetune_config
    return make(folder, output_dir, steps or TRAINING_STEPS[stage], checkpoint_every or CHECKPOINT_EVERY[stage])


def run_training(stage: str, config):
    from stages import finetune, train_tle

    return (train_tle if stage == "train-tle" else finetune).run(config)


def logged_steps(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("step")]


def _losses_differ(got: list[dict[str, str]], want: list[dict[str, str]]) -> str | None:
    for name in ("loss", "lr"):
        a = np.array([float(r[name] or 0) for r in got])
        b = np.array([float(r[name] or 0) for r in want])
        if not np.allclose(a, b, rtol=1e-4, atol=1e-6):
            return f"{name} differs by up to {np.abs(a - b).max():.2e}"
    return None


def training_kill_trial(
    stage: str,
    folder: Path,
    seed: int,
    reference_dir: Path | None = None,
    steps: int | None = None,
    checkpoint_every: int | None = None,
    after: int | None = None,
) -> Trial:
    """SIGKILL `whistle STAGE` once `after` steps are logged (seeded random by default) and a random part
    of a step later; rerun it. The steps the killed run logged after its last checkpoint are run again
    and must match; with `reference_dir` (an uninterrupted run) every step and the final weights must."""
    from safetensors.torch import load_file

    rng = np.random.default_rng(2000 + seed)
    steps = steps or TRAINING_STEPS[stage]
    out = folder / f"{stage}-kill-{seed}"
    config = training_config(stage, folder, out, steps, checkpoint_every)
    config_file = config.save(folder, f"{stage}-kill-{seed}.toml")
    after = after or int(rng.integers(1, steps))
    began = time.monotonic()
    process = spawn([stage, "--config", str(config_file)], folder / f"{stage}-kill-{seed}.log")
    wait_for(lambda: len(logged_steps(out / "train_log.csv")) >= after, process)
    time.sleep(rng.uniform(0.0, 0.2))
    struck = kill(process)
    before = logged_steps(out / "train_log.csv")
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    where = (
        f"after {len(before)} logged steps; complete checkpoints "
        f"{', '.join(c.removeprefix('step-').lstrip('0') for c in checkpoints) or 'none'}"
        if struck
        else "(the run had finished)"
    )
    result = run_training(stage, training_config(stage, folder, out, steps, checkpoint_every))
    got = logged_steps(out / "train_log.csv")
    problems = []
    if result.steps != steps or [int(r["step"]) for r in got] != list(range(1, steps + 1)):
        problems.append(f"steps {result.steps}, logged {[r['step'] for r in got]}")
    else:
        redone = [int(r["step"]) for r in before if int(r["step"]) > result.resumed_from]
        difference = _losses_differ([got[k - 1] for k in redone], [before[k - 1] for k in redone])
        if difference:
            problems.append(f"steps {redone} rerun: {difference}")
        if reference_dir is not None:
            difference = _losses_differ(got, logged_steps(reference_dir / "train_log.csv"))
            if difference:
                problems.append(f"vs the uninterrupted run: {difference}")
            a, b = load_file(str(out / "model.safetensors")), load_file(str(reference_dir / "model.safetensors"))
            worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else np.inf
            if worst > 1e-4:
                problems.append(f"final weights differ from the uninterrupted run's by up to {worst:.2e}")
    checked = f"{len(redone)} redone steps match the killed run's" if not problems else ""
    if reference_dir is not None and not problems:
        checked += "; every loss and the final weights match an uninterrupted run (1e-4)"
    outcome = (
        f"resumed from step {result.resumed_from}; steps 1-{steps} logged once each; {checked}"
        if not problems
        else "PROBLEM: " + "; ".join(problems)
    )
    return Trial(f"{stage}-kill", f"seed {seed}", where, outcome, not problems, time.monotonic() - began)


def training_reference(stage: str, folder: Path) -> Path:
    out = folder / f"{stage}-reference"
    run_training(stage, training_config(stage, folder, out))
    return out


# --- the script ---------------------------------------------------------------------------------------


def bad_input_trials(folder: Path) -> list[Trial]:
    """One row per item of the bad-input corpus: what precompute recorded for it, and whether that is the
    outcome the corpus table expects (stored, or rejected with a reason of the expected kind)."""
    _tests_on_path()
    from conftest import make_tiny_whisper
    from data.make_bad_inputs import make_corpus

    from stages.precompute import run
    from store import StoreReader
    from whistle_pipeline.config import load_config
    from whistle_pipeline.errors import WhistleError

    corpus = folder / "bad-inputs"
    expected = make_corpus(corpus)
    teacher = make_tiny_whisper(corpus / "teacher")

    def precompute(name: str) -> None:
        run(
            load_config(
                updates={
                    "teacher": {"name_or_path": str(teacher), "device": "cpu"},
                    "data": {"path": str(corpus / name), "id_column": "id", "language_column": "language"},
                    "store": {"path": str(corpus / f"store-{name}"), "shard_size": 8, "speech_margin_frames": 2},
                    "precompute": {"batch_size": 4, "num_workers": 1, "progress": False},
                }
            )
        )

    trials = []
    for name, items in expected["manifests"].items():
        precompute(name)
        reader = StoreReader(str(corpus / f"store-{name}"))
        rejects: dict[str, list[str]] = {}
        for shard in reader.shards():
            for reject in reader.shard_attrs(shard)["rejects"]:
                rejects.setdefault(reject["id"], []).append(reject["reason"])
        seen: set[str] = set()
        for item in items:
            first = item["id"] not in seen
            seen.add(item["id"])
            if item["id"] in rejects and not (first and item["outcome"] == "processed"):
                reason = rejects[item["id"]].pop(0)
                produced = "rejected: " + reason.replace(str(corpus) + "/", "")
                ok = item["outcome"] == "rejected" and reason.split(":", 1)[0] == item["kind"]
            else:
                utt = reader.utterance(*reader.find(item["id"]))
                produced = (
                    f"stored: {utt.duration:.3f} s, {len(utt.states)} frames, {len(utt.text)} characters, "
                    f"language {utt.language}"
                )
                ok = item["outcome"] == "processed" and (utt.text, utt.language) == (item["text"], item["language"])
            trials.append(Trial("bad-input", f"{name}: {item['id']}", item["what"], produced, ok))
    for name, fragment in expected["refused"].items():
        try:
            precompute(name)
            produced, ok = "not refused", False
        except WhistleError as err:
            produced = "refused: " + str(err).splitlines()[0].replace(str(corpus) + "/", "")
            ok = fragment in str(err)
        trials.append(Trial("bad-input", f"{name}: (whole source)", "a manifest without the text column", produced, ok))
    return trials


FAULTS = (
    "precompute-kill",
    "concurrent",
    "disk-full",
    "bit-flip",
    "train-tle-kill",
    "finetune-kill",
    "bad-input",
    "one-item",
    "non-finite",
    "teacher-swap",
    "overwrite",
    "manifest-rows",
)
# --- reliability round 2: one item never stops a run, no NaN trains or loads, the store knows its teacher ---


def _outcome(action) -> tuple[str, Exception | None]:
    """Run `action`: ("done", None) or ("refused: <first line>", the error)."""
    try:
        action()
        return "done", None
    except Exception as err:  # noqa: BLE001 — the trial records whatever stopped it
        return f"refused: {type(err).__name__}: {str(err).splitlines()[0][:160]}", err


def one_item_trials(world: World, folder: Path) -> list[Trial]:
    """Clips that resample to nothing, are not files, or overflow the encoder: each a counted reject with its
    reason, and the run (and a rerun) finishes; a clip of zeros is stored."""
    import os
    import struct

    import soundfile

    from stages.precompute import run
    from store import StoreReader
    from whistle_pipeline.config import load_config

    clips = folder / "one-item"
    clips.mkdir(parents=True, exist_ok=True)
    soundfile.write(clips / "one.wav", np.array([0.25], np.float32), 44100)
    soundfile.write(clips / "absurd.wav", np.full(100, 0.1, np.float32), 16000, subtype="PCM_16")
    data = bytearray((clips / "absurd.wav").read_bytes())
    data[24:28] = struct.pack("<I", 2_000_000_000)
    (clips / "absurd.wav").write_bytes(bytes(data))
    soundfile.write(clips / "loud.wav", np.full(16000, 1e30, np.float32), 16000, subtype="FLOAT")
    soundfile.write(clips / "zeros.wav", np.zeros(16000, np.float32), 16000)
    (clips / "folder.wav").mkdir(exist_ok=True)
    if not (clips / "fifo.wav").exists():
        os.mkfifo(clips / "fifo.wav")
    expected = {
        "one": "empty audio",
        "absurd": "empty audio",
        "loud": "non-finite states",
        "zeros": "stored",
        "folder": "not a file",
        "fifo": "not a file",
    }
    (clips / "manifest.jsonl").write_text(
        "".join(json.dumps({"id": n, "audio": f"{n}.wav", "text": n}) + "\n" for n in expected)
    )
    config = load_config(
        updates={
            "teacher": {"name_or_path": str(world.teacher), "device": "cpu", "dtype": "float32"},
            "data": {"path": str(clips / "manifest.jsonl"), "id_column": "id"},
            "store": {"path": str(clips / "store"), "shard_size": 4},
            "precompute": {"num_workers": 0, "progress": False},
        }
    )
    outcome, _ = _outcome(lambda: run(config))
    rerun, _ = _outcome(lambda: run(config))
    reader = StoreReader(str(clips / "store")) if outcome == "done" else None
    reasons = (
        {r["id"]: r["reason"] for k in reader.shards() for r in reader.shard_attrs(k)["rejects"]} if reader else {}
    )
    trials = []
    for name, kind in expected.items():
        got = reasons.get(name, "stored" if reader and name not in reasons else outcome)
        trials.append(
            Trial(
                "one-item",
                f"precompute: {name}.wav",
                "decoding / the encoder",
                got.replace(str(clips) + "/", "") + f"; rerun {rerun}",
                got.split(":", 1)[0] == kind and rerun == "done",
            )
        )
    return trials


def non_finite_trials(folder: Path) -> list[Trial]:
    """inf/nan settings refused; a step whose loss turns NaN stops the run and saves no model; a stored
    over-long transcript is skipped and counted; a Whisper or a TLE with NaN weights is refused at load."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    from stages.training import NonFiniteStep
    from whistle_pipeline.config import ConfigError, load_config
    from whistle_pipeline.teacher import load_teacher

    trials = []
    for setting in ("finetune.learning_rate=inf", "train_tle.learning_rate=nan", "tle.dropout=-inf"):
        outcome, err = _outcome(lambda setting=setting: load_config(overrides=[setting]))
        trials.append(
            Trial("non-finite", f"--set {setting}", "the configuration", outcome, isinstance(err, ConfigError))
        )
    for stage in ("train-tle", "finetune"):
        out = folder / f"nan-{stage}"
        config = training_config(stage, folder, out, steps=6, checkpoint_every=100)
        section = "train_tle" if stage == "train-tle" else "finetune"
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(getattr(config, section), learning_rate=1e30, warmup_steps=0)}
        )
        outcome, err = _outcome(lambda stage=stage, config=config: run_training(stage, config))
        trials.append(
            Trial(
                "non-finite",
                f"{stage}: learning_rate=1e30",
                "training step 2",
                outcome,
                isinstance(err, NonFiniteStep) and not (out / "model.safetensors").exists(),
            )
        )
    _tests_on_path()
    from test_finetune import SOURCE_WORDS, write_store

    config = training_config("finetune", folder, folder / "long-finetune", steps=3, checkpoint_every=100)
    texts = [" ".join(SOURCE_WORDS[i % 5 : i % 5 + 3]) for i in range(16)]
    texts[3] = " ".join(["hello world"] * 60)
    long_store = write_store(folder / "long-store", Path(config.teacher.name_or_path), texts, seed=5)
    config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, audio_store=str(long_store)))
    result = None

    def finetune_long() -> None:
        nonlocal result
        result = run_training("finetune", config)

    outcome, _ = _outcome(finetune_long)
    skipped = result.store_rejects if result else []
    trials.append(
        Trial(
            "one-item",
            "finetune: a 480-token transcript in the audio store",
            "the training batches",
            f"{outcome}; skipped {[r['id'] + ': ' + r['reason'] for r in skipped]}",
            [r["id"] for r in skipped] == ["utt5-003"],
        )
    )
    poisoned = folder / "nan-teacher"
    if not poisoned.exists():
        _tests_on_path()
        from conftest import make_tiny_teacher

        make_tiny_teacher(poisoned)
        tensors = load_file(str(poisoned / "model.safetensors"))
        tensors["model.decoder.layers.0.fc1.weight"].view(-1)[0] = float("nan")
        save_file(tensors, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    outcome, err = _outcome(lambda: load_teacher(str(poisoned), "main", "full", "cpu", "float32"))
    trials.append(
        Trial(
            "non-finite",
            "a Whisper with a NaN weight",
            "load_teacher",
            outcome.replace(str(folder) + "/", ""),
            "non-finite weights: 1 of" in str(err),
        )
    )
    return trials


def teacher_swap_trials(world: World, folder: Path) -> list[Trial]:
    """A teacher folder's weights replaced between a run and its resume: refused; the same weights in
    another folder: accepted."""
    import shutil

    _tests_on_path()
    from conftest import make_tiny_whisper

    teacher = folder / "swap-teacher"
    shutil.rmtree(teacher, ignore_errors=True)
    shutil.copytree(world.teacher, teacher)
    elsewhere = folder / "swap-teacher-copy"
    shutil.rmtree(elsewhere, ignore_errors=True)
    shutil.copytree(world.teacher, elsewhere)
    store = str(folder / "swap-store")
    first = precompute(World(teacher, world.manifest), store)
    make_tiny_whisper(teacher, window_seconds=2, seed=1)  # same size, other weights
    swapped = precompute(World(teacher, world.manifest), store)
    moved = precompute(World(elsewhere, world.manifest), store)
    refusal = [line.strip() for line in swapped.output.splitlines() if "encoder_fingerprint" in line]
    return [
        Trial(
            "teacher-swap",
            "resume after the teacher folder's weights were replaced",
            "opening the store",
            f"exit {swapped.exit_code}: {refusal[0][:120] if refusal else swapped.output[-200:]}",
            first.exit_code == 0 and swapped.exit_code != 0 and bool(refusal),
        ),
        Trial(
            "teacher-swap",
            "resume with the same weights in another folder",
            "opening the store",
            f"exit {moved.exit_code}",
            moved.exit_code == 0,
        ),
    ]


# --- reliability round 3: outputs never overwrite inputs, manifests lose no row -----------------------


def tree_digest(path: Path) -> str:
    """sha256 over a file, or over every entry of a folder (relative names, kinds, modes, contents); "absent"."""
    import hashlib

    if not path.exists():
        return "absent"
    digest = hashlib.sha256()
    for entry in [path] if path.is_file() else sorted(path.rglob("*")):
        digest.update(
            f"{entry.relative_to(path) if entry != path else ''}|{entry.is_dir()}|{entry.stat().st_mode}\n".encode()
        )
        if entry.is_file():
            digest.update(entry.read_bytes())
    return digest.hexdigest()


OVERWRITE_PHRASES = {"is": "itself: the run would write over its input", "inside": "lies inside", "holds": "holds"}


def overwrite_trials(world: World, folder: Path) -> list[Trial]:
    """Each stage given an output that is an input, lies inside a model folder or store it reads, or holds
    an input: refused before anything is written, naming the relation; every input and the output path
    hash the same before and after."""
    import dataclasses

    from click.testing import CliRunner

    from whistle_pipeline.cli import cli

    fine = training_config("finetune", folder, folder / "unused", steps=4, checkpoint_every=4)
    teacher, tle = Path(fine.teacher.name_or_path), Path(fine.finetune.tle_path)
    audio_store, tts_store = Path(fine.finetune.audio_store), Path(fine.finetune.tts_store)
    text, root = Path(fine.finetune.text), Path(fine.finetune.text).parent
    ct2 = folder / "overwrite-ct2"  # import-ct2's preflight reads only that SRC is a folder
    ct2.mkdir(exist_ok=True)
    (ct2 / "model.bin").write_bytes(b"not converted: refused before it is read")

    def cli_run(*arguments: str):
        def action(out: Path) -> tuple[bool, str]:
            result = CliRunner().invoke(cli, ["-q", *[str(out) if a == "OUT" else a for a in arguments]])
            return result.exit_code != 0, result.output

        return action

    def finetune_run(out: Path) -> tuple[bool, str]:
        config = dataclasses.replace(fine, finetune=dataclasses.replace(fine.finetune, output_dir=str(out)))
        outcome, err = _outcome(lambda: run_training("finetune", config))
        return err is not None, str(err or outcome)

    precompute_run = cli_run(
        "precompute",
        "--data",
        str(world.manifest),
        "--teacher",
        str(world.teacher),
        "--device",
        "cpu",
        "--store",
        "OUT",
    )
    tle_run = cli_run(
        "train-tle",
        "--teacher",
        str(teacher),
        "--store",
        str(audio_store),
        "--output-dir",
        "OUT",
        "--steps",
        "2",
        "--set",
        "train_tle.warmup_steps=0",
    )
    evaluate_run = cli_run(
        "evaluate", str(teacher), "--audio", str(world.manifest), "--output-dir", "OUT", "--device", "cpu"
    )

    def validate_run(flag: str):
        return cli_run(
            "validate-tle",
            str(tle),
            "--teacher",
            str(teacher),
            "--store",
            str(audio_store),
            "--text",
            str(text),
            flag,
            "OUT",
        )

    cases = [  # stage, the input, how OUT relates to it, OUT, the run (and what the refusal says, if not preflight)
        ("precompute", "teacher", "is", world.teacher, precompute_run),
        ("precompute", "teacher", "inside", world.teacher / "store", precompute_run),
        ("precompute", "teacher and manifest", "holds", world.teacher.parent, precompute_run),
        ("precompute", "manifest", "is", world.manifest, precompute_run),
        ("train-tle", "teacher", "is", teacher, tle_run),
        ("train-tle", "teacher", "inside", teacher / "tle", tle_run),
        ("train-tle", "store", "is", audio_store, tle_run),
        ("train-tle", "store", "inside", audio_store / "tle", tle_run),
        ("train-tle", "teacher and store", "holds", root, tle_run),
        ("finetune", "teacher", "is", teacher, finetune_run),
        ("finetune", "TLE", "is", tle, finetune_run),
        ("finetune", "TLE", "inside", tle / "adapted", finetune_run),
        ("finetune", "audio store", "is", audio_store, finetune_run),
        ("finetune", "TTS store", "inside", tts_store / "adapted", finetune_run),
        ("finetune", "text", "is", text, finetune_run),
        ("finetune", "inputs", "holds", root, finetune_run),
        ("evaluate", "model", "is", teacher, evaluate_run),
        ("evaluate", "model", "inside", teacher / "eval", evaluate_run),
        ("evaluate", "model", "holds", root, evaluate_run),
        ("evaluate", "audio set", "is", world.manifest, evaluate_run),
        ("evaluate", "audio set", "holds", world.manifest.parent, evaluate_run),
        ("validate-tle --json", "TLE", "inside", tle / "figures.json", validate_run("--json")),
        ("validate-tle --json", "--text", "is", text, validate_run("--json")),
        ("validate-tle --figure", "--text", "is", text, validate_run("--figure")),
        ("validate-tle --json", "inputs", "holds", root, validate_run("--json"), "is a directory"),  # click's check
        ("synthesize", "TEXTS", "is", text, cli_run("synthesize", str(text), "OUT"), "is a file"),  # click's check
        ("synthesize", "TEXTS", "holds", root, cli_run("synthesize", str(text), "OUT")),
        ("import-ct2", "SRC", "is", ct2, cli_run("import-ct2", str(ct2), "OUT")),
        ("import-ct2", "SRC", "inside", ct2 / "hf", cli_run("import-ct2", str(ct2), "OUT")),
        ("import-ct2", "SRC", "holds", folder, cli_run("import-ct2", str(ct2), "OUT")),
    ]
    watched = [world.teacher, world.manifest, teacher, tle, audio_store, tts_store, text, ct2]
    trials = []
    for stage, what, relation, out, action, *phrase in cases:
        before = {path: tree_digest(path) for path in [*watched, out]}
        refused, output = action(out)
        changed = [str(path.relative_to(folder)) for path in before if tree_digest(path) != before[path]]
        named = (phrase[0] if phrase else OVERWRITE_PHRASES[relation]) in " ".join(output.split())
        outcome = (
            f"{'refused' if refused else 'NOT refused'}{', naming it' if named else ', not naming it'}; "
            f"{'changed: ' + ', '.join(changed) if changed else 'nothing changed'}"
        )
        trials.append(
            Trial(
                "overwrite",
                f"{stage}: OUT {relation} the {what}",
                "the command line" if phrase else "preflight",
                outcome,
                refused and named and not changed,
            )
        )
    return trials


def _manifest_cases(audio: list[str]) -> dict[str, tuple[str, list[tuple[int, str]]]]:
    """name -> (the manifest's text, [(line, expected)] for every physical row): expected is the stored
    text, or "rejected: FRAGMENT" (the reject must name the line too), or "refused: FRAGMENT" for a manifest
    refused whole."""
    a, b, c, d, e = audio[:5]
    bom = "\ufeff"

    def jsonl(*rows: dict) -> str:
        return "".join(json.dumps(row) + "\n" for row in rows)

    return {
        "quote.tsv": (
            f'audio\ttext\n{a}\t"she said hi\n{b}\ttwo\n{c}\tthree "quoted"\n{d}\tfour\n',
            [(2, '"she said hi'), (3, "two"), (4, 'three "quoted"'), (5, "four")],
        ),
        "never-closed.csv": (
            f'audio,text\n{a},"she said hi\n{b},two\n{c},three\n{d},four\n',
            [(2, "rejected: has a quote that does not close"), (3, "two"), (4, "three"), (5, "four")],
        ),
        "closed-later.csv": (
            f'audio,text\n{a},"she said hi\n{b},two\n{c},"three" and more\n{d},four\n',
            [
                (2, "rejected: has a quote that does not close"),
                (3, "two"),
                (4, "rejected: has a quote that does not close"),
                (5, "four"),
            ],
        ),
        "bom.jsonl": (
            bom + jsonl({"audio": a, "text": "first"}, {"audio": b, "text": "second"}),
            [(1, "first"), (2, "second")],
        ),
        "bom.csv": (f"{bom}audio,text\n{a},first\n{b},second\n", [(2, "first"), (3, "second")]),
        "bom.tsv": (f"{bom}audio\ttext\n{a}\tfirst\n", [(2, "first")]),
        "twice.jsonl": (
            f'{{"audio": "{a}", "text": "one", "text": "two"}}\n{{"audio": "{b}", "text": "fine"}}\n',
            [(1, "rejected: has the key 'text' twice"), (2, "fine")],
        ),
        "twice.csv": (
            f"audio,text,text\n{a},one,two\n{b},three,four\n",
            [(1, "refused: line 1 names the column 'text' twice")],
        ),
        "types.jsonl": (
            jsonl(
                {"audio": a, "text": ["a", "b"]},
                {"audio": b, "text": "ok", "language": True},
                {"audio": c, "text": {"x": 1}},
                {"audio": d, "text": 42},
                {"audio": e, "text": "fine"},
            ),
            [
                (1, "rejected: 'text' holds a JSON list"),
                (2, "rejected: 'language' holds a JSON boolean"),
                (3, "rejected: 'text' holds a JSON object"),
                (4, "rejected: 'text' holds a JSON number"),
                (5, "fine"),
            ],
        ),
        "invisible.jsonl": (
            jsonl(
                {"audio": a, "text": "\u200b\u200c"},
                {"audio": b, "text": "\x07\x00"},
                {"audio": c, "text": "\u00a0\u2028 \u3000"},
                {"audio": d, "text": "\ufeff\u2060"},
                {"audio": e, "text": "visible"},
            ),
            [
                (1, "rejected: empty text"),
                (2, "rejected: empty text"),
                (3, "rejected: empty text"),
                (4, "rejected: empty text"),
                (5, "visible"),
            ],
        ),
        "mixed.csv": (
            f'audio,text\n\n{a},one\n{b}\n{c},"open\n\n{d},x,y\n{e},\u200b\n{e},again\n',
            [
                (3, "one"),
                (4, "rejected: line 4"),
                (5, "rejected: line 5"),
                (7, "rejected: line 7"),
                (8, "rejected: empty text"),
                (9, "rejected: line 9"),
            ],
        ),
    }


def manifest_row_trials(world: World, folder: Path) -> list[Trial]:
    """Manifests with an unbalanced quote (TSV, CSV), a byte-order mark, a key or column named twice, list /
    boolean / object cells and invisible-only text, each precomputed into a store: every physical row is
    stored with its own text or rejected with its line; stored + rejected = the rows (one trial per row and
    one per manifest)."""
    from stages.precompute import run
    from store import StoreReader
    from whistle_pipeline.config import load_config

    manifests = folder / "manifest-rows"
    manifests.mkdir(parents=True, exist_ok=True)
    audio = [str(world.manifest.parent / f"c{i:03d}.wav") for i in range(CLIPS) if i != MISSING_ROW]
    trials = []
    for name, (content, rows) in _manifest_cases(audio).items():
        manifest = manifests / name
        manifest.write_text(content, encoding="utf-8")
        store = manifests / f"store-{name}"
        shutil.rmtree(store, ignore_errors=True)
        config = load_config(
            updates={
                "teacher": {"name_or_path": str(world.teacher), "device": "cpu", "dtype": "float32"},
                "data": {"path": str(manifest), "language_column": "language" if "language" in content else ""},
                "store": {"path": str(store), "shard_size": 4},
                "precompute": {"num_workers": 0, "progress": False},
            }
        )
        outcome, err = _outcome(lambda config=config: run(config))
        if rows[0][1].startswith("refused: "):
            named = rows[0][1].removeprefix("refused: ") in str(err)
            trials.append(
                Trial(
                    "manifest-rows",
                    f"{name}: the whole manifest",
                    "opening the source",
                    f"{outcome}; store {'absent' if not store.exists() else 'created'}",
                    err is not None and named and not store.exists(),
                )
            )
            continue
        reader = StoreReader(str(store)) if err is None else None
        rejects = [r["reason"] for k in reader.shards() for r in reader.shard_attrs(k)["rejects"]] if reader else []
        stored = (
            {reader.utterance(k, i).text for k in reader.shards() for i in range(reader.shard_attrs(k)["n"])}
            if reader
            else set()
        )
        for line, expected in rows:
            if expected.startswith("rejected: "):
                fragment = expected.removeprefix("rejected: ")
                hits = [r for r in rejects if f"line {line} of {name}" in r and fragment in r]
                produced = f"rejected: {hits[0]}" if hits else "no reject naming the line"
                ok = bool(hits)
            else:
                ok = expected in stored
                produced = f"stored: {expected!r}" if ok else f"not stored ({outcome})"
            trials.append(
                Trial(
                    "manifest-rows",
                    f"{name}: line {line}",
                    "reading the manifest",
                    produced.replace(str(world.manifest.parent) + "/", ""),
                    ok,
                )
            )
        counted = len(reader) + len(rejects) if reader else 0
        trials.append(
            Trial(
                "manifest-rows",
                f"{name}: the counts",
                "the store",
                f"{len(reader) if reader else 0} stored + {len(rejects)} rejected = {counted} of {len(rows)} rows",
                counted == len(rows),
            )
        )
    return trials


def print_table(trials: list[Trial]) -> None:
    click.echo("| fault | trial | where it struck | outcome |")
    click.echo("|---|---|---|---|")
    for t in trials:
        click.echo(f"| {t.fault} | {t.trial} | {t.where} | {t.outcome} |")


@click.command()
@click.option("--kills", default=12, show_default=True, help="Seeded SIGKILL trials of precompute.")
@click.option("--training-kills", default=3, show_default=True, help="SIGKILL trials of train-tle and of finetune.")
@click.option("--concurrent", "concurrent_runs", default=3, show_default=True, help="Trials of two runs at once.")
@click.option(
    "--disk-limits",
    default=12,
    show_default=True,
    help="Byte limits swept over a run's writes, each with atomic and with partial failed writes.",
)
@click.option(
    "--bit-flips",
    default=1,
    show_default=True,
    help="Rounds of bit-flip trials: one per array kind of a shard and of the cache each round.",
)
@click.option("--seed", default=0, show_default=True, help="First seed.")
@click.option("--quick", is_flag=True, help="One trial of each kind.")
@click.option("--only", multiple=True, type=click.Choice(FAULTS), help="Run only these faults (repeatable).")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="Keep the trial folders here.")
def main(
    kills: int,
    training_kills: int,
    concurrent_runs: int,
    disk_limits: int,
    bit_flips: int,
    seed: int,
    quick: bool,
    only: tuple[str, ...],
    workdir: str | None,
) -> None:
    """Run the fault-injection trials and print the table of faults and outcomes."""
    import logging

    logging.disable(logging.WARNING)
    if quick:
        kills, training_kills, concurrent_runs, disk_limits, bit_flips = 1, 1, 1, 1, 1
    chosen = set(only or FAULTS)
    folder = Path(workdir or tempfile.mkdtemp(prefix="whistle-faults-"))
    world = make_world(folder / "world")
    reference, startup, work = timed_clean_run(world, folder)
    click.echo(f"clean run: store created {startup:.1f} s after start, written in {work:.1f} s more")
    trials: list[Trial] = []
    for k in range(seed, seed + kills if "precompute-kill" in chosen else seed):
        trials.append(precompute_kill_trial(world, folder, k, reference, startup, work))
    for k in range(seed, seed + concurrent_runs if "concurrent" in chosen else seed):
        trials.append(concurrent_trial(world, folder, k, reference, work))
    total = sum(p.stat().st_size for p in (folder / "clean").rglob("*") if p.is_file())
    for limit in np.linspace(0, total, disk_limits + 2)[1:-1].astype(int) if "disk-full" in chosen else []:
        for partial in (False, True):
            trials.append(disk_full_trial(world, folder, int(limit), partial, reference))
    for k in range(seed, seed + bit_flips if "bit-flip" in chosen else seed):
        trials += [bit_flip_trial(world, folder, folder / "clean", kind, False, k, reference) for kind in ARRAY_KINDS]
        trials += [bit_flip_trial(world, folder, folder / "clean", kind, True, k, reference) for kind in CACHE_KINDS]
    for stage in ("train-tle", "finetune"):
        if training_kills and f"{stage}-kill" in chosen:
            reference_dir = training_reference(stage, folder)
            for k in range(seed, seed + training_kills):
                trials.append(training_kill_trial(stage, folder, k, reference_dir))
    if "bad-input" in chosen:
        trials += bad_input_trials(folder)
    if "one-item" in chosen:
        trials += one_item_trials(world, folder)
    if "non-finite" in chosen:
        trials += non_finite_trials(folder)
    if "teacher-swap" in chosen:
        trials += teacher_swap_trials(world, folder)
    if "overwrite" in chosen:
        trials += overwrite_trials(world, folder)
    if "manifest-rows" in chosen:
        trials += manifest_row_trials(world, folder)
    print_table(trials)
    failed = [t for t in trials if not t.ok]
    for fault in dict.fromkeys(t.fault for t in trials):
        ok = sum(t.ok for t in trials if t.fault == fault)
        click.echo(f"{fault.replace('-', '_')}_ok={ok}/{sum(t.fault == fault for t in trials)}")
    click.echo(f"trials={len(trials)}")
    click.echo(f"failed={len(failed)}")
    click.echo(f"workdir={folder}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
