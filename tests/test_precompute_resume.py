"""Resume after a crash, and several processes: the store comes out identical to one clean run.

Both use real processes: `python -m whistle_pipeline precompute` killed with SIGKILL once two shards
are complete, and `torchrun --nproc_per_node 2` (gloo on CPU). The teacher has a 2 s window (100
encoder frames) so that many small shards take seconds, not minutes; geometry is read, not assumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TORCHRUN_TWO, load_bench, make_tiny_whisper, write_clip

from stages.precompute import run
from store import StoreReader
from whistle_pipeline.config import load_config

faults = load_bench("faults")

N_CLIPS = 40
SHARD_SIZE = 2


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("teacher-2s"), window_seconds=2)


@pytest.fixture(scope="module")
def clips_manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    rows = []
    for i in range(N_CLIPS):
        write_clip(folder / f"c{i:03d}.wav", 0.3 + 0.02 * i, [16000, 22050][i % 2], seed=i)
        rows.append({"audio": f"c{i:03d}.wav", "text": f"clip {i}"})
    rows[5]["audio"] = "missing.wav"  # a reject, so rejects are compared too
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    return path


def arguments(teacher: Path, manifest: Path, store: Path) -> list[str]:
    return [
        "precompute",
        "--data",
        str(manifest),
        "--teacher",
        str(teacher),
        "--device",
        "cpu",
        "--store",
        str(store),
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--set",
        "precompute.progress=false",
        "--set",
        "precompute.write_threads=1",
    ]


def clean_run(teacher: Path, manifest: Path, store: Path):
    return run(
        load_config(
            updates={
                "teacher": {"name_or_path": str(teacher), "device": "cpu"},
                "data": {"path": str(manifest)},
                "store": {"path": str(store), "shard_size": SHARD_SIZE},
                "precompute": {"batch_size": 2, "num_workers": 0, "progress": False, "write_threads": 1},
            }
        )
    )


def contents(store: Path) -> dict:
    """Everything a store holds that a run decides, per complete shard (timestamps excluded)."""
    return faults.store_contents(str(store))


def assert_same_store(got: dict, expected: dict) -> None:
    assert sorted(k for k in got if isinstance(k, int)) == sorted(k for k in expected if isinstance(k, int))
    for shard, want in expected.items():
        if not isinstance(shard, int):
            continue
        have = got[shard]
        for key in ("attrs", "ids", "texts", "durations"):
            assert have[key] == want[key], (shard, key)
        for a, b in zip(have["states"], want["states"]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got["template"], expected["template"])
    for a, b in zip(got["statistics"], expected["statistics"]):
        np.testing.assert_array_equal(a, b)


def complete_shards(store: Path) -> int:
    shards = store / "shards"
    if not shards.is_dir():
        return 0
    done = 0
    for meta in shards.glob("*/zarr.json"):
        try:
            done += json.loads(meta.read_text()).get("attributes", {}).get("complete") is True
        except (ValueError, OSError):  # being written right now
            pass
    return done


def test_killed_run_resumes_to_the_same_store(teacher, clips_manifest, tmp_path):
    store = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "whistle_pipeline", *arguments(teacher, clips_manifest, store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while complete_shards(store) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr.decode()[-2000:]}"
    n_shards = N_CLIPS // SHARD_SIZE
    done = complete_shards(store)
    assert 2 <= done < n_shards

    resumed = clean_run(teacher, clips_manifest, store)
    assert resumed.shards_skipped == done and resumed.shards_written == n_shards - done
    assert resumed.store_utterances == N_CLIPS - 1 and resumed.store_rejects == 1
    assert StoreReader(str(store)).incomplete_shards() == []

    clean_run(teacher, clips_manifest, tmp_path / "clean")
    assert_same_store(contents(store), contents(tmp_path / "clean"))


def first_16(clips_manifest: Path) -> Path:
    """A manifest of the first 16 rows (8 shards of 2)."""
    manifest = clips_manifest.with_name("first-16.jsonl")
    manifest.write_text("\n".join(clips_manifest.read_text().splitlines()[:16]), encoding="utf-8")
    return manifest


def two_then_one(program: list[str], teacher: Path, manifest: Path, tmp_path: Path, *options: str) -> str:
    """`program` (what follows torchrun) in 2 processes with `options`, writing tmp_path/two, then one plain
    process writing tmp_path/one: both succeed and write the same store. Returns the 2 processes' stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets; the reference runs alike
    two = subprocess.run(
        [*TORCHRUN_TWO, *program, *arguments(teacher, manifest, tmp_path / "two"), *options],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "whistle_pipeline", *arguments(teacher, manifest, tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_store(contents(tmp_path / "two"), contents(tmp_path / "one"))
    return two.stdout


def test_two_processes_write_the_same_store_as_one(teacher, clips_manifest, tmp_path):
    stdout = two_then_one(
        ["-m", "whistle_pipeline"],
        teacher,
        first_16(clips_manifest),
        tmp_path,
        "--set",
        "precompute.claim=static",  # shard k to process k % 2, and no other
    )
    assert "2 process(es)" in stdout and "8 written, 0 skipped" in stdout
    assert "precompute rank 1/2: done" in stdout
    record = StoreReader(str(tmp_path / "two")).record("precompute.json")
    assert record["world_size"] == 2 and [r["shards_written"] for r in record["per_rank"]] == [4, 4]
    assert record["clips"] == 15 and record["rejects"] == {"audio not found": 1}


SLOW_SECOND_PROCESS = """
import os, sys, time
import torch
from whistle_pipeline.cli import main
if os.environ["RANK"] == "1":  # this process's encoder takes 3 s a batch
    torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: time.sleep(3) if type(module).__name__ == "TeacherEncoder" else None
    )
main()
"""


def test_a_process_that_ran_out_takes_over_the_shards_of_a_slow_one(teacher, clips_manifest, tmp_path):
    """Dynamic claiming (the default): with one process made slow, the other writes its own shards, then those
    of the slow one that it has not started, from the end; the store is the one a single process writes."""
    script = tmp_path / "slow_second_process.py"
    script.write_text(SLOW_SECOND_PROCESS)
    stdout = two_then_one([str(script)], teacher, first_16(clips_manifest), tmp_path)
    record = StoreReader(str(tmp_path / "two")).record("precompute.json")
    fast, slow = record["per_rank"]
    assert fast["shards_written"] + slow["shards_written"] == 8 and fast["shards_taken_over"] >= 1
    assert fast["shards_written"] == 4 + fast["shards_taken_over"] and slow["shards_taken_over"] == 0
    assert slow["shards_busy"] == fast["shards_taken_over"] and record["shards_busy"] == 0
    assert record["rows"] == 16 and record["clips"] == 15
    assert f"8 written ({record['shards_taken_over']} taken over from slower processes)" in stdout


def test_a_resume_with_other_teacher_weights_is_refused_and_the_same_weights_elsewhere_are_not(
    clips_manifest, tmp_path, caplog
):
    """The store records a fingerprint of the encoder's weights: replacing the teacher folder's weights (same
    size, other values) between a run and its resume is refused naming both fingerprints; a copy of the same
    weights in another folder continues the store (the fingerprint is content-based, not path-based)."""
    import shutil

    from store import StoreError
    from whistle_pipeline.teacher import encoder_fingerprint

    teacher = make_tiny_whisper(tmp_path / "teacher", window_seconds=2)
    copy = shutil.copytree(teacher, tmp_path / "same-weights-elsewhere")
    first = encoder_fingerprint([str(teacher / "model.safetensors")])
    store = tmp_path / "store"
    clean_run(teacher, clips_manifest, store)
    recorded = StoreReader(str(store)).teacher
    assert (recorded.encoder_fingerprint, recorded.revision) == (first, "")

    make_tiny_whisper(teacher, window_seconds=2, seed=1)  # the folder's contents replaced: other weights
    second = encoder_fingerprint([str(teacher / "model.safetensors")])
    assert second != first
    with pytest.raises(StoreError, match=f"teacher.encoder_fingerprint: '{first}' \\(store\\) vs '{second}'"):
        clean_run(teacher, clips_manifest, store)

    again = clean_run(copy, clips_manifest, store)  # the same weights, another path: nothing left to do
    assert (again.shards_written, again.store_utterances) == (0, N_CLIPS - 1)

    attrs = json.loads((store / "zarr.json").read_text())  # a store written before fingerprints were kept
    del attrs["attributes"]["whistle"]["teacher"]["encoder_fingerprint"]
    (store / "zarr.json").write_text(json.dumps(attrs))
    assert StoreReader(str(store)).teacher.encoder_fingerprint == ""
    with caplog.at_level("WARNING"):
        clean_run(teacher, clips_manifest, store)  # readable, and not refused: it cannot be checked
    assert "records no fingerprint of its teacher's encoder weights" in caplog.text
