"""The tail template and the statistics (store/reduction.py): exact against numpy, cached, stale caches replaced."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import store_spec, synthetic_utterances, write_synthetic_store

from store import StoreReader


def test_tail_template_and_statistics_reduce_exactly(tmp_path):
    spec = store_spec(shard_size=4)
    utts = synthetic_utterances(spec, 10, seed=3)
    write_synthetic_store(tmp_path / "s", spec, utts, shards=[0, 1])
    reader = StoreReader(tmp_path / "s")
    written = utts[:8]
    max_frames, d_model = spec.teacher.max_frames, spec.teacher.d_model
    sums, counts = np.zeros((max_frames, d_model)), np.zeros(max_frames)
    for utt in written:
        sums[utt["speech_frames"] :] += utt["window"][utt["speech_frames"] :]
        counts[utt["speech_frames"] :] += 1
    first = min(u["speech_frames"] for u in written)
    expected = sums / np.maximum(counts, 1)[:, None]
    expected[:first] = expected[first]  # positions no utterance reached repeat the first one reached
    template = reader.tail_template()
    assert template.dtype == np.float32 and template.shape == (max_frames, d_model)
    np.testing.assert_allclose(template, expected, rtol=1e-6)
    np.testing.assert_array_equal(reader.tail_counts(), counts)
    speech = np.concatenate([u["window"][: u["speech_frames"]] for u in written]).astype(np.float64)
    mean, std = reader.statistics()
    np.testing.assert_allclose(mean, speech.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, speech.std(axis=0), rtol=1e-5)
    window = reader.full_window(utts[0]["window"][:700])
    np.testing.assert_array_equal(window[:700], utts[0]["window"][:700].astype(np.float32))
    np.testing.assert_array_equal(window[700:], template[700:])

    # Cached in the store, keyed by the complete shards; a new shard makes the cache stale.
    assert len(list((tmp_path / "s" / "cache").iterdir())) == 2  # zarr.json + one key
    np.testing.assert_array_equal(StoreReader(tmp_path / "s").tail_template(), template)
    write_synthetic_store(tmp_path / "s", spec, utts, shards=[2])
    grown = StoreReader(tmp_path / "s")
    all_speech = np.concatenate([u["window"][: u["speech_frames"]] for u in utts]).astype(np.float64)
    np.testing.assert_allclose(grown.statistics()[0], all_speech.mean(axis=0), rtol=1e-6)
    assert len(list((tmp_path / "s" / "cache").iterdir())) == 2  # the stale entry was replaced


def test_full_mode_statistics_use_speech_frames_only(tmp_path):
    spec = store_spec("full", shard_size=5)
    utts = synthetic_utterances(spec, 5, seed=4)
    write_synthetic_store(tmp_path / "s", spec, utts)
    reader = StoreReader(tmp_path / "s")
    assert [u.speech_frames for u in reader.iter_shard(0)] == [u["speech_frames"] for u in utts]
    speech = np.concatenate([u["window"][: u["speech_frames"]] for u in utts]).astype(np.float64)
    np.testing.assert_allclose(reader.statistics()[0], speech.mean(axis=0), rtol=1e-6)
    last = utts[int(np.argmin([u["speech_frames"] for u in utts]))]
    np.testing.assert_allclose(
        reader.tail_template()[1499], np.mean([u["window"][1499] for u in utts], axis=0, dtype=np.float64), rtol=1e-6
    )
    assert reader.tail_counts()[last["speech_frames"] - 1] == 0


def test_readers_reducing_at_once_agree_and_leave_whole_cache_entries(tmp_path):
    spec = store_spec(shard_size=3)
    write_synthetic_store(tmp_path / "s", spec, synthetic_utterances(spec, 9, seed=8))

    def template(_):
        return StoreReader(tmp_path / "s").tail_template()

    with ThreadPoolExecutor(4) as pool:  # like the ranks of a training run starting together
        templates = list(pool.map(template, range(4)))
    for other in templates[1:]:
        np.testing.assert_array_equal(other, templates[0])
    entries = [p for p in (tmp_path / "s" / "cache").iterdir() if p.is_dir()]
    assert 1 <= len(entries) <= 4
    for entry in entries:
        assert json.loads((entry / "zarr.json").read_text())["attributes"]["complete"] is True
    np.testing.assert_array_equal(StoreReader(tmp_path / "s").tail_template(), templates[0])


def test_a_shard_rewritten_with_the_same_counts_makes_the_cache_stale(tmp_path):
    spec = store_spec(shard_size=4)
    utts = synthetic_utterances(spec, 8, seed=5)
    write_synthetic_store(tmp_path / "s", spec, utts)
    before = StoreReader(tmp_path / "s").statistics()[0]
    shutil.rmtree(tmp_path / "s" / "shards" / "00001")
    louder = [{**utt, "window": utt["window"] * 2} for utt in utts]  # same ids, lengths and counts; other values
    write_synthetic_store(tmp_path / "s", spec, louder, shards=[1])
    speech = np.concatenate([u["window"][: u["speech_frames"]] for u in utts[:4] + louder[4:]]).astype(np.float64)
    after = StoreReader(tmp_path / "s").statistics()[0]
    np.testing.assert_allclose(after, speech.mean(axis=0), rtol=1e-6)
    assert not np.allclose(after, before)
