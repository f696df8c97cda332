"""One item never stops precompute: clips that decode to nothing, that are not files, or whose states
overflow are counted rejects with a reason that names what happened, and the run (and a rerun) finishes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import soundfile
from conftest import write_clip

from stages.precompute import run
from store import StoreReader
from whistle_pipeline.config import load_config


def _manifest(folder):
    write_clip(folder / "ok.wav", 1.0, 16000)
    soundfile.write(folder / "one.wav", np.array([0.25], np.float32), 44100)  # resamples to 0 samples
    soundfile.write(folder / "absurd.wav", np.full(100, 0.1, np.float32), 16000, subtype="PCM_16")
    data = bytearray((folder / "absurd.wav").read_bytes())
    data[24:28] = struct.pack("<I", 2_000_000_000)  # the header's sample rate
    (folder / "absurd.wav").write_bytes(bytes(data))
    soundfile.write(folder / "loud.wav", np.full(16000, 1e30, np.float32), 16000, subtype="FLOAT")
    soundfile.write(folder / "zeros.wav", np.zeros(16000, np.float32), 16000)  # silence is a clip like any other
    (folder / "folder.wav").mkdir()
    names = ["ok", "one", "absurd", "loud", "zeros", "folder"]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": n, "audio": f"{n}.wav", "text": n}) for n in names) + "\n")
    return manifest


def _precompute(teacher, manifest, store, frames):
    return run(
        load_config(
            updates={
                "teacher": {"name_or_path": str(teacher), "device": "cpu", "dtype": "float32"},
                "data": {"path": str(manifest), "id_column": "id"},
                "store": {"path": str(store), "shard_size": 4, "frames": frames},
                "precompute": {"batch_size": 3, "num_workers": 0, "progress": False},
            }
        )
    )


@pytest.mark.parametrize("frames", ["speech", "full"])
def test_clips_that_cannot_be_encoded_are_rejects_with_their_reason(tiny_whisper_dir, tmp_path, frames):
    manifest = _manifest(tmp_path)
    result = _precompute(tiny_whisper_dir, manifest, tmp_path / "store", frames)
    assert (result.clips, result.store_utterances, result.store_rejects) == (2, 2, 4)
    assert result.rejects == {"empty audio": 2, "not a file": 1, "non-finite states": 1}
    reader = StoreReader(str(tmp_path / "store"))
    reasons = {r["id"]: r["reason"] for k in reader.shards() for r in reader.shard_attrs(k)["rejects"]}
    assert reasons == {
        "one": "empty audio: 1 sample(s) at 44100 Hz resample to none at 16000 Hz",
        "absurd": "empty audio: 100 sample(s) at 2000000000 Hz resample to none at 16000 Hz",
        "folder": f"not a file: {tmp_path / 'folder.wav'} is a directory",
        "loud": "non-finite states: the input audio is out of range (peak amplitude 1e+30, decoded audio lies "
        "within [-1, 1]); the float32 encoder produced inf/nan",
    }
    assert sorted(u.id for k in reader.shards() for u in reader.iter_shard(k)) == ["ok", "zeros"]
    again = _precompute(tiny_whisper_dir, manifest, tmp_path / "store", frames)  # nothing left to redo
    assert (again.shards_written, again.store_utterances, again.store_rejects) == (0, 2, 4)
