"""Two real writer processes (torchrun) fill one store with disjoint shards, with no coordination."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
from conftest import TORCHRUN_TWO, store_spec, synthetic_utterances

from store import StoreReader

N_UTTERANCES, SHARD_SIZE = 22, 4  # 6 shards, the last one short

WRITER_SCRIPT = f"""
import os, sys
from conftest import add_utterance, store_spec, synthetic_utterances
from store import StoreWriter

rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
spec = store_spec(shard_size={SHARD_SIZE}, chunk_frames=128)
utts = synthetic_utterances(spec, {N_UTTERANCES}, seed=7)   # every rank sees the same source rows
writer = StoreWriter.open(sys.argv[1], spec)                 # both ranks open (or create) it at once
done = writer.complete_shards()
written = []
for k in range(-(-len(utts) // spec.shard_size)):
    if k % world_size != rank or k in done:
        continue
    with writer.shard(k) as shard:
        for utt in utts[k * spec.shard_size:(k + 1) * spec.shard_size]:
            add_utterance(shard, spec, utt)
    written.append(k)
writer.write_record(f"rank{{rank}}.json", {{"rank": rank, "pid": os.getpid(), "shards": written}})
"""


def torchrun_writers(script: Path, store: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.getcwd()]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [*TORCHRUN_TWO, str(script), str(store)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_torchrun_processes_write_disjoint_shards_of_one_store(tmp_path):
    script = tmp_path / "write_shards.py"
    script.write_text(WRITER_SCRIPT)
    store = tmp_path / "store"
    torchrun_writers(script, store)

    reader = StoreReader(store)
    records = [reader.record("rank0.json"), reader.record("rank1.json")]
    assert records[0]["shards"] == [0, 2, 4] and records[1]["shards"] == [1, 3, 5]
    assert records[0]["pid"] != records[1]["pid"]
    assert reader.shards() == list(range(6)) and reader.incomplete_shards() == []
    spec = store_spec(shard_size=SHARD_SIZE, chunk_frames=128)
    utts = synthetic_utterances(spec, N_UTTERANCES, seed=7)
    got = {utt.id: utt.states for shard in reader.shards() for utt in reader.iter_shard(shard)}
    assert sorted(got) == [u["id"] for u in utts]
    for utt in utts:
        np.testing.assert_array_equal(got[utt["id"]], utt["window"][: utt["speech_frames"]])

    torchrun_writers(script, store)  # a rerun resumes: every shard is complete, nothing is rewritten
    reader = StoreReader(store)
    assert reader.record("rank0.json")["shards"] == [] and reader.record("rank1.json")["shards"] == []
    assert len(reader) == N_UTTERANCES
