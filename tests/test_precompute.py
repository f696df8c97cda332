"""stages.precompute end to end: real audio files -> tiny Whisper encoder -> Zarr store, checked against
a direct `model.encoder(WhisperFeatureExtractor(audio))` on the same audio."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from conftest import write_clip

from stages.precompute import run
from store import StoreError, StoreReader
from whistle_pipeline.audio import load_audio, telephone
from whistle_pipeline.cli import cli
from whistle_pipeline.config import load_config
from whistle_pipeline.errors import WhistleError

MARGIN = 2

# (file name, seconds, rate, channels, soundfile options): every layout the stage must read
GOOD_CLIPS = [
    ("int16-48k-stereo.wav", 2.3, 48000, 2, {"subtype": "PCM_16"}),
    ("flac-22k.flac", 1.1, 22050, 1, {}),
    ("vorbis-32k.ogg", 3.0, 32000, 1, {}),
    ("stereo-44k.mp3", 1.7, 44100, 2, {}),
    ("float-16k.wav", 0.6, 16000, 1, {"subtype": "FLOAT"}),
]


@pytest.fixture(scope="module")
def reference(tiny_whisper_dir):
    """The teacher run the plain transformers way: (audio path -> (n_samples, full-window states (M, D)))."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(tiny_whisper_dir)

    def states_of(audio: np.ndarray) -> np.ndarray:
        features = extractor(audio, sampling_rate=16000, return_tensors="pt").input_features  # (1, 80, 3000)
        with torch.no_grad():
            return model.model.encoder(features).last_hidden_state[0].numpy()  # (1500, 64)

    return states_of


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> Path:
    """Good clips in every format, and bad ones: garbage bytes, NaN samples, longer than the window."""
    folder = tmp_path_factory.mktemp("audio")
    for seed, (name, seconds, rate, channels, options) in enumerate(GOOD_CLIPS):
        write_clip(folder / name, seconds, rate, channels, seed=seed, **options)
    (folder / "garbage.wav").write_bytes(b"RIFF but not really a wave file" * 20)
    soundfile.write(folder / "nan.wav", np.array([0.1, np.nan] * 800, np.float32), 16000, subtype="FLOAT")
    write_clip(folder / "long.flac", 31.0, 8000)
    return folder


def manifest(folder: Path, name: str = "manifest.jsonl") -> Path:
    rows = [
        {"audio": clip[0], "text": f"clip number {i}", "language": ["en", "de"][i % 2]}
        for i, clip in enumerate(GOOD_CLIPS)
    ]
    rows.insert(2, {"audio": "garbage.wav", "text": "garbage"})
    rows.insert(4, {"audio": "missing.wav", "text": "missing"})
    rows.append({"audio": "nan.wav", "text": "nan"})
    rows.append({"audio": "long.flac", "text": "long"})
    rows.append({"audio": "float-16k.wav", "text": "   ", "id": "empty-text"})
    path = folder / name
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def make_config(tiny_whisper_dir, data_path, store_path, **sections):
    updates = {
        "teacher": {"name_or_path": str(tiny_whisper_dir), "device": "cpu"},
        "data": {"path": str(data_path)},
        "store": {"path": str(store_path), "shard_size": 3, "speech_margin_frames": MARGIN, "chunk_frames": 256},
        "precompute": {"batch_size": 2, "num_workers": 0, "progress": False},
    }
    for section, values in sections.items():
        updates[section] = {**updates.get(section, {}), **values}
    return load_config(updates=updates)


def stored(store) -> dict[str, object]:
    reader = StoreReader(str(store))
    return {utt.id: utt for shard in reader.shards() for utt in reader.iter_shard(shard)}


def test_manifest_of_every_format_matches_the_encoder(tiny_whisper_dir, audio_folder, reference, tmp_path):
    config = make_config(
        tiny_whisper_dir,
        manifest(audio_folder),
        tmp_path / "store",
        data={"id_column": "id", "language_column": "language"},
        precompute={"num_workers": 2},
    )
    result = run(config)

    assert (result.rows, result.clips, result.shards_total, result.shards_written) == (10, 5, 4, 4)
    assert result.rejects == {
        "undecodable audio": 1,
        "audio not found": 1,
        "non-finite audio": 1,
        "too long": 1,
        "empty text": 1,
    }
    utterances = stored(tmp_path / "store")
    assert sorted(utterances) == sorted(Path(name).stem for name, *_ in GOOD_CLIPS)
    references = {}
    for i, (name, *_rest) in enumerate(GOOD_CLIPS):
        utt = utterances[Path(name).stem]
        audio = load_audio(audio_folder / name, 16000)
        window = reference(audio)  # (1500, 64)
        frames = math.ceil(len(audio) / 320) + MARGIN
        assert (utt.text, utt.language) == (f"clip number {i}", ["en", "de"][i % 2])
        assert utt.duration == pytest.approx(len(audio) / 16000, abs=1e-6)
        assert utt.states.dtype == np.float16 and utt.states.shape == (frames, 64)  # speech frames at [0, T)
        np.testing.assert_allclose(utt.states.astype(np.float32), window[:frames], rtol=2e-3, atol=2e-3)
        references[utt.id] = (frames, window)

    reader = StoreReader(str(tmp_path / "store"))
    # tail template: at each position, the mean over the clips whose speech ended before it
    counts = reader.tail_counts()
    expected_counts = np.zeros(1500, np.int64)
    expected_sum = np.zeros((1500, 64))
    for frames, window in references.values():
        expected_counts[frames:] += 1
        expected_sum[frames:] += window[frames:].astype(np.float16)
    np.testing.assert_array_equal(counts, expected_counts)
    seen = expected_counts > 0
    np.testing.assert_allclose(
        reader.tail_template()[seen], expected_sum[seen] / expected_counts[seen, None], rtol=2e-3, atol=2e-3
    )
    speech = np.concatenate([window[:frames] for frames, window in references.values()])
    np.testing.assert_allclose(reader.statistics()[0], speech.mean(axis=0), rtol=2e-3, atol=2e-3)

    rejects = {r["id"]: r["reason"] for k in reader.shards() for r in reader.shard_attrs(k)["rejects"]}
    assert rejects["missing"] == f"audio not found: {audio_folder / 'missing.wav'}"
    assert rejects["long"] == "too long: 31.0 s, the window is 30 s"
    assert rejects["garbage"].startswith("undecodable audio: ")
    assert rejects["nan"] == "non-finite audio: NaN or infinite samples"
    assert rejects["empty-text"] == "empty text: line 10 of manifest.jsonl"

    record = reader.record("precompute.json")
    assert record["clips"] == 5 and record["rejects"]["too long"] == 1 and record["shards_written"] == 4
    assert record["source"]["kind"] == "manifest" and record["source"]["rows"] == 10
    assert record["config"]["store"]["shard_size"] == 3
    assert "[precompute]" in record["config_toml"]
    assert reader.spec.teacher.name_or_path == str(Path(tiny_whisper_dir).resolve())

    again = run(config)  # resume: every shard is complete, nothing is recomputed
    assert (again.shards_written, again.shards_skipped, again.rows, again.store_utterances) == (0, 4, 0, 5)
    assert "4 skipped" in again.summary()


def test_full_frames_and_telephone_augmentation(tiny_whisper_dir, audio_folder, reference, tmp_path):
    config = make_config(
        tiny_whisper_dir,
        manifest(audio_folder),
        tmp_path / "store",
        store={"frames": "full"},
        precompute={"augment": "telephone"},
        data={"max_clips": 2},
    )
    result = run(config)
    assert result.clips == 2
    reader = StoreReader(str(tmp_path / "store"))
    assert (reader.spec.frames, reader.spec.augment) == ("full", "telephone")
    name = GOOD_CLIPS[0][0]
    utt = stored(tmp_path / "store")[Path(name).stem]
    window = reference(telephone(load_audio(audio_folder / name, 16000), 16000))
    assert utt.states.shape == (1500, 64)
    np.testing.assert_allclose(utt.states.astype(np.float32), window, rtol=2e-3, atol=2e-3)


def common_voice(folder: Path) -> Path:
    root = folder / "cv-corpus" / "de"
    (root / "clips").mkdir(parents=True)
    header = (
        "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\t"
        "accents\tvariant\tlocale\tsegment\n"
    )
    lines = []
    for i in range(4):
        name = f"common_voice_de_{100 + i}.mp3"
        write_clip(root / "clips" / name, 1.0 + 0.4 * i, 48000, seed=i)
        lines.append(f'c{i}\t{name}\ts{i}\tSatz Nummer "{i}".\t\t2\t0\t\t\t\t\tde-DE\t\n')
    (root / "train.tsv").write_text(header + "".join(lines), encoding="utf-8")
    (root / "dev.tsv").write_text(header + lines[0], encoding="utf-8")
    return root


def save_to_disk_dataset(folder: Path) -> Path:
    import datasets

    audio = []
    for i in range(3):
        path = folder / f"ds-{i}.flac"
        write_clip(path, 0.8 + 0.5 * i, 24000, seed=10 + i)
        audio.append({"bytes": path.read_bytes(), "path": path.name})
    dataset = datasets.Dataset.from_dict(
        {"audio": audio, "transcript": ["eins", "zwei", "drei"], "key": ["k0", "k1", "k2"]}
    )
    dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    dataset.save_to_disk(folder / "dataset")
    return folder / "dataset"


def test_common_voice_and_dataset_sources(tiny_whisper_dir, reference, tmp_path):
    cv = common_voice(tmp_path)
    run(make_config(tiny_whisper_dir, cv, tmp_path / "cv-store"))
    utterances = stored(tmp_path / "cv-store")
    assert sorted(utterances) == [f"common_voice_de_{100 + i}" for i in range(4)]
    utt = utterances["common_voice_de_102"]
    assert (utt.text, utt.language) == ('Satz Nummer "2".', "de")
    audio = load_audio(cv / "clips" / "common_voice_de_102.mp3", 16000)
    frames = math.ceil(len(audio) / 320) + MARGIN
    np.testing.assert_allclose(utt.states.astype(np.float32), reference(audio)[:frames], rtol=2e-3, atol=2e-3)

    dataset = save_to_disk_dataset(tmp_path)
    result = run(
        make_config(
            tiny_whisper_dir,
            dataset,
            tmp_path / "ds-store",
            data={"text_column": "transcript", "id_column": "key", "language": "de"},
        )
    )
    assert (result.clips, result.rejects) == (3, {})
    utt = stored(tmp_path / "ds-store")["k2"]
    audio = load_audio(tmp_path / "ds-2.flac", 16000)
    frames = math.ceil(len(audio) / 320) + MARGIN
    assert (utt.text, utt.language) == ("drei", "de")
    np.testing.assert_allclose(utt.states.astype(np.float32), reference(audio)[:frames], rtol=2e-3, atol=2e-3)


def test_other_data_into_the_same_store_is_refused_and_overwrite_replaces(tiny_whisper_dir, tmp_path):
    cv = common_voice(tmp_path)
    run(make_config(tiny_whisper_dir, cv, tmp_path / "store"))
    dev = make_config(tiny_whisper_dir, cv, tmp_path / "store", data={"subset": "dev"})
    with pytest.raises(StoreError, match="dataset_fingerprint"):
        run(dev)
    assert len(StoreReader(str(tmp_path / "store"))) == 4  # the refused run touched nothing
    result = run(
        make_config(tiny_whisper_dir, cv, tmp_path / "store", data={"subset": "dev"}, precompute={"overwrite": True})
    )
    assert (result.clips, result.store_utterances) == (1, 1)


def test_strict_fails_after_everything_is_written(tiny_whisper_dir, audio_folder, tmp_path):
    config = make_config(tiny_whisper_dir, manifest(audio_folder), tmp_path / "store", precompute={"strict": True})
    with pytest.raises(WhistleError, match=r"precompute.strict: 5 clip\(s\) were rejected"):
        run(config)
    reader = StoreReader(str(tmp_path / "store"))
    assert len(reader.shards()) == 4 and len(reader) == 5 and reader.record("precompute.json")["clips"] == 5
    with pytest.raises(WhistleError, match="precompute.strict"):  # a rerun (all skipped) still fails
        run(config)


def test_cli_runs_the_stage_and_fails_on_strict(tiny_whisper_dir, audio_folder, tmp_path):
    args = [
        "precompute",
        "--data",
        str(manifest(audio_folder)),
        "--teacher",
        str(tiny_whisper_dir),
        "--device",
        "cpu",
        "--store",
        str(tmp_path / "store"),
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
        "--max-clips",
        "4",
        "--set",
        "precompute.progress=false",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "3 clips stored, 1 rejected (undecodable audio 1)" in result.output
    assert "1 written, 0 skipped" in result.output
    failed = CliRunner().invoke(cli, args + ["--strict"])
    assert failed.exit_code == 1
    assert "precompute.strict: 1 clip(s) were rejected" in failed.output
    refused = CliRunner().invoke(cli, args[:-2] + ["--max-clips", "5"])
    assert refused.exit_code == 1 and "--overwrite" in refused.output and "Traceback" not in refused.output


def test_an_empty_source_is_an_error(tiny_whisper_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("audio,text\n", encoding="utf-8")
    with pytest.raises(WhistleError, match=r"manifest .*empty.csv \(0 rows\): nothing to precompute"):
        run(make_config(tiny_whisper_dir, empty, tmp_path / "store"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bfloat16_run_matches_the_float32_cpu_run(tiny_whisper_dir, audio_folder, tmp_path):
    """The GPU path (pinned batches, non-blocking copies, bf16 + SDPA) stores what the CPU stores, to bf16."""
    data = manifest(audio_folder)
    run(make_config(tiny_whisper_dir, data, tmp_path / "cpu"))
    gpu = run(
        make_config(
            tiny_whisper_dir,
            data,
            tmp_path / "gpu",
            teacher={"device": "cuda", "dtype": "bfloat16"},
            precompute={"num_workers": 2},
        )
    )
    assert gpu.dtype == "bfloat16" and gpu.device.startswith("cuda")
    on_cpu, on_gpu = stored(tmp_path / "cpu"), stored(tmp_path / "gpu")
    assert sorted(on_cpu) == sorted(on_gpu)
    for utt_id, utt in on_cpu.items():
        a, b = utt.states.astype(np.float32), on_gpu[utt_id].states.astype(np.float32)
        assert a.shape == b.shape
        cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() > 0.99, utt_id


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiling on a CPU takes minutes)")
def test_compiled_encoder_layers_store_what_eager_ones_store(tiny_whisper_dir, audio_folder, tmp_path):
    """precompute.compile (torch.compile per encoder layer) and the copies on their own stream: the same clips and
    states as an eager run, to compiled kernels' rounding."""
    data = manifest(audio_folder)
    cuda = {"device": "cuda", "dtype": "float32"}
    run(make_config(tiny_whisper_dir, data, tmp_path / "eager", teacher=cuda))
    run(make_config(tiny_whisper_dir, data, tmp_path / "compiled", teacher=cuda, precompute={"compile": True}))
    eager, compiled = stored(tmp_path / "eager"), stored(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled)
    for utt_id, utt in eager.items():
        np.testing.assert_allclose(
            compiled[utt_id].states.astype(np.float32), utt.states.astype(np.float32), atol=1e-2, err_msg=utt_id
        )


def test_sums_made_on_the_device_equal_the_writers_own(tmp_path):
    """precompute sums each batch where the encoder ran (batch_sums -> ShardWriter.add_sums) and sends only speech
    frames; the store equals one written the old way, every tail handed to ShardWriter.add, within float32
    rounding."""
    from conftest import store_spec, synthetic_utterances, write_synthetic_store

    from stages.precompute_device import batch_sums
    from store import StoreWriter
    from store.writer import NON_FINITE_REASON

    spec = store_spec(shard_size=4)
    utts = synthetic_utterances(spec, 8, seed=7)
    utts[2]["speech_frames"] = 1500  # a window with no tail
    utts[5]["window"][1400, 3] = np.inf  # inf in the tail only: rejected either way
    write_synthetic_store(tmp_path / "old", spec, utts)  # the old way: add(..., tail=window[T:])
    writer = StoreWriter.open(tmp_path / "new", spec)
    for shard_index in range(2):
        with writer.shard(shard_index) as shard:
            for batch in ([0, 1, 2], [3]):  # batches of 3 within a shard, as precompute makes them
                rows = [shard_index * 4 + b for b in batch]
                windows = torch.from_numpy(np.stack([utts[r]["window"] for r in rows]))  # (B, M, D) float16
                frames = [utts[r]["speech_frames"] for r in rows]
                finite, sums = batch_sums(windows, frames, [shard_index] * len(rows))
                assert list(sums) == [shard_index]
                shard.add_sums(**{name: values.numpy() for name, values in sums[shard_index].items()})
                for b, row in enumerate(rows):
                    utt = utts[row]
                    if not finite[b]:
                        shard.reject(utt["id"], NON_FINITE_REASON)
                        continue
                    assert shard.add(
                        utt["id"],
                        utt["text"],
                        utt["language"],
                        utt["duration"],
                        utt["window"][: frames[b]],
                        summed=True,
                    )
    old, new = StoreReader(tmp_path / "old"), StoreReader(tmp_path / "new")
    assert (
        new.shard_attrs(1)["rejects"]
        == old.shard_attrs(1)["rejects"]
        == [{"id": "utt0005", "reason": NON_FINITE_REASON}]
    )
    for shard_index in range(2):
        group = f"shards/0000{shard_index}"
        for name in ("tail_count", "stat_count", "offsets"):
            np.testing.assert_array_equal(new.root[f"{group}/{name}"][...], old.root[f"{group}/{name}"][...])
        for name in ("tail_sum", "stat_sum", "stat_sqsum"):
            np.testing.assert_allclose(
                new.root[f"{group}/{name}"][...], old.root[f"{group}/{name}"][...], rtol=1e-6, atol=1e-4
            )
        assert [u.states.tobytes() for u in new.iter_shard(shard_index)] == [
            u.states.tobytes() for u in old.iter_shard(shard_index)
        ]
    np.testing.assert_array_equal(new.tail_counts(), old.tail_counts())
    np.testing.assert_allclose(new.tail_template(), old.tail_template(), rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(new.statistics(), old.statistics()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_batch_sums_of_a_batch_over_two_shards_are_each_shards_own():
    from stages.precompute_device import batch_sums

    windows = torch.from_numpy(np.random.default_rng(3).normal(size=(3, 20, 4)).astype(np.float16))  # (B, M, D)
    windows[1, 15, 2] = float("inf")  # in the tail: the window adds nothing
    frames = [5, 7, 20]
    finite, sums = batch_sums(windows, frames, [0, 0, 1])
    assert finite.tolist() == [True, False, True] and list(sums) == [0, 1]
    for shard, rows in ((0, [0, 1]), (1, [2])):
        _, own = batch_sums(windows[rows], [frames[r] for r in rows], [shard] * len(rows))
        for name, values in own[shard].items():
            assert torch.equal(sums[shard][name], values), (shard, name)
    assert sums[0]["stat_count"] == 5 and sums[0]["tail_count"].tolist() == [0] * 5 + [1] * 15
    assert torch.equal(sums[0]["tail_sum"][5:], windows[0, 5:].float())
