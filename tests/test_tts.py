"""`whistle synthesize`: eSpeak NG speech through ctypes, an audio folder + manifest precompute reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from whistle_pipeline.cli import cli
from whistle_pipeline.tts import CHUNK_SIZE, EspeakEngine, TTSError, plan, read_sentences, synthesize

pytestmark = pytest.mark.espeak

SENTENCES = [
    "Take one tablet.",
    "",
    "The pharmacist checked the dose twice.",
    "Metformin is usually started at five hundred milligrams with the evening meal.",
    "After the third week the swelling in her ankles had gone down, so the diuretic was stopped altogether.",
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "doses.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def synthesized(texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tts") / "out"
    synthesize(texts, out, seed=3, workers=2, progress=False)
    return out


def manifest_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def test_engine_speaks_int16_at_its_own_rate_and_longer_text_is_longer():
    engine = EspeakEngine.get()
    assert engine.sample_rate == 22050 and engine.version.startswith("1.")
    short = engine.speak("Take one tablet.", "en-us")
    long = engine.speak("Take one tablet every morning with a full glass of water.", "en-us")
    assert short.dtype == np.int16 and 0.5 < short.size / engine.sample_rate < 3
    assert long.size > 2 * short.size
    assert np.abs(short.astype(np.float32)).max() > 1000  # speech, not silence


def test_different_voices_and_variants_give_different_audio():
    engine = EspeakEngine.get()
    text = "The pharmacist checked the dose twice."
    american, received = engine.speak(text, "en-us"), engine.speak(text, "en-gb-x-rp")
    female, male = engine.speak(text, "en-us", "f3"), engine.speak(text, "en-us", "m3")
    for a, b in ((american, received), (female, male)):
        n = min(a.size, b.size)
        difference = np.abs(a[:n].astype(np.float32) - b[:n]).mean() / np.abs(a[:n].astype(np.float32)).mean()
        assert difference > 0.3
    assert "en-gb-x-rp" in engine.voices() and {"m1", "f5"} <= set(engine.variants())


def test_synthesize_writes_flac_at_the_teacher_rate_and_a_manifest(synthesized):
    rows = manifest_rows(synthesized)
    spoken = [s for s in SENTENCES if s]
    assert [r["text"] for r in rows] == spoken
    assert [r["id"] for r in rows] == ["doses-00001", "doses-00003", "doses-00004", "doses-00005"]  # line numbers
    for row in rows:
        assert set(row) >= {"audio", "text", "language", "id"} and row["language"] == "en"
        info = soundfile.info(synthesized / row["audio"])
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert info.frames == pytest.approx(row["duration"] * 16000, abs=1)
        audio, _ = soundfile.read(synthesized / row["audio"], dtype="float32")
        assert np.abs(audio).max() > 0.05
    durations = [r["duration"] for r in rows]
    assert durations == sorted(durations)  # the sentences grow, whatever voice and rate each got
    record = json.loads((synthesized / "synthesize.json").read_text())
    assert record["result"]["n_clips"] == 4 and record["settings"]["seed"] == 3
    assert not (synthesized / ".chunks").exists()


def test_same_seed_gives_bit_identical_audio_and_another_seed_does_not(texts, synthesized, tmp_path):
    again = tmp_path / "again"
    synthesize(texts, again, seed=3, workers=1, progress=False)  # one worker instead of two
    for row in manifest_rows(synthesized):
        assert (again / row["audio"]).read_bytes() == (synthesized / row["audio"]).read_bytes()
    other = tmp_path / "other"
    synthesize(texts, other, seed=4, workers=1, progress=False)
    differing = [
        r["id"]
        for r, o in zip(manifest_rows(synthesized), manifest_rows(other))
        if (synthesized / r["audio"]).read_bytes() != (other / o["audio"]).read_bytes()
    ]
    assert len(differing) == 4


def test_plan_is_a_function_of_the_seed():
    sentences = [(i + 1, f"sentence {i}") for i in range(200)]
    first = plan(sentences, "s", ["en-us", "en"], ["m1", "f1"], (140, 190), (35, 65), seed=0)
    assert first == plan(sentences, "s", ["en-us", "en"], ["m1", "f1"], (140, 190), (35, 65), seed=0)
    assert first != plan(sentences, "s", ["en-us", "en"], ["m1", "f1"], (140, 190), (35, 65), seed=1)
    assert {u.voice for u in first} == {"en-us", "en"} and {u.variant for u in first} == {"m1", "f1"}
    assert min(u.rate for u in first) >= 140 and max(u.rate for u in first) <= 190


def test_manifest_loads_as_a_precompute_source(synthesized):
    from whistle_pipeline.config import load_config
    from whistle_pipeline.sources import Clip, open_source

    config = load_config(updates={"data": {"path": str(synthesized / "manifest.jsonl")}})  # its "id" is the id
    source = open_source(config.data)
    items = [source[i] for i in range(len(source))]
    assert all(isinstance(item, Clip) for item in items), items
    assert [item.id for item in items] == [r["id"] for r in manifest_rows(synthesized)]
    assert all(Path(item.audio).is_file() and item.language == "en" for item in items)
    assert items[0].text == "Take one tablet."


def test_missing_voice_or_variant_names_what_exists(texts, tmp_path):
    with pytest.raises(TTSError) as caught:
        synthesize(texts, tmp_path / "x", voices=("en-klingon",), progress=False)
    assert "no voice 'en-klingon'" in str(caught.value) and "en-gb-x-rp" in str(caught.value)
    with pytest.raises(TTSError, match="no voice variant 'm99'.*f5"):
        synthesize(texts, tmp_path / "x", variants=("m1", "m99"), progress=False)
    with pytest.raises(TTSError, match="rate range 300-200"):
        synthesize(texts, tmp_path / "x", rate=(300, 200), progress=False)


def test_blank_file_and_existing_output_are_refused(texts, synthesized, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n", encoding="utf-8")
    with pytest.raises(TTSError, match="no sentences"):
        read_sentences(blank)
    with pytest.raises(TTSError, match="--overwrite"):
        synthesize(texts, synthesized, seed=3, progress=False)


def test_an_interrupted_run_resumes_its_finished_chunks(tmp_path):
    texts = tmp_path / "many.txt"
    texts.write_text("".join(f"Dose number {i}.\n" for i in range(CHUNK_SIZE + 3)), encoding="utf-8")
    out = tmp_path / "out"
    full = synthesize(texts, out, voices=("en-us",), variants=(), workers=2, progress=False)
    assert full.n_clips == CHUNK_SIZE + 3 and full.n_resumed == 0
    # Interrupt after the first chunk: its record is back in .chunks, the rest never happened.
    first = json.loads((out / "synthesize.json").read_text())["settings"]
    (out / ".chunks").mkdir()
    (out / ".chunks" / "settings.json").write_text(json.dumps(first), encoding="utf-8")
    rows = manifest_rows(out)
    (out / ".chunks" / "00000.json").write_text(
        json.dumps({"chunk": 0, "rows": rows[:CHUNK_SIZE], "rejects": [], "espeak": first["espeak"]}), encoding="utf-8"
    )
    for name in ("manifest.jsonl", "synthesize.json"):
        (out / name).unlink()
    resumed = synthesize(texts, out, voices=("en-us",), variants=(), workers=1, progress=False)
    assert resumed.n_resumed == CHUNK_SIZE and resumed.n_clips == CHUNK_SIZE + 3
    assert manifest_rows(out) == rows
    with pytest.raises(TTSError, match="--overwrite"):
        synthesize(texts, out, voices=("en-us",), variants=(), progress=False)


def test_cli_synthesize(texts, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "synthesize",
            str(texts),
            str(tmp_path / "wav"),
            "--format",
            "wav",
            "--voices",
            "en-us,en-gb-x-rp",
            "--variants",
            "f1",
            "--rate",
            "150-160",
            "--pitch",
            "50",
            "--sample-rate",
            "22050",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 4 clips" in result.output
    rows = manifest_rows(tmp_path / "wav")
    assert {r["voice"] for r in rows} <= {"en-us+f1", "en-gb-x-rp+f1"} and {r["pitch"] for r in rows} == {50}
    assert soundfile.info(tmp_path / "wav" / rows[0]["audio"]).samplerate == 22050
    result = runner.invoke(cli, ["synthesize", str(texts), str(tmp_path / "bad"), "--voices", "zz-nope"])
    assert result.exit_code == 1 and "no voice 'zz-nope'" in result.output
    result = runner.invoke(cli, ["synthesize", "--list-voices"])
    assert result.exit_code == 0 and "en-us" in result.output and "m7" in result.output
