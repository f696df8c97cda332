"""Checks before work: every stage refuses bad inputs, and outputs that would overwrite an input, before it
writes anything (the output folder must not exist after the refusal); every problem is reported at once.
Also what an output Whisper folder keeps: the teacher's processor files, a model card, ordinary file modes."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_teacher, write_clip
from huggingface_hub import constants as hub_constants
from test_finetune import finetune_config, world  # noqa: F401  world: the fixture finetune_config reads
from test_train_tle import tle_config, write_tle_store

from whistle_pipeline import preflight
from whistle_pipeline.config import ConfigError, load_config

NO_SUCH_HUB_MODEL = "whistle-tests/no-such-whisper"


def refusal(action) -> str:
    with pytest.raises(ConfigError) as caught:
        action()
    return str(caught.value)


def quoted(**settings) -> list[str]:
    """--set overrides for `section__key=value` keyword arguments, values as TOML strings."""
    return [f"{key.replace('__', '.')}={json.dumps(str(value))}" for key, value in settings.items()]


@pytest.fixture(scope="module")
def teacher_and_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    teacher = make_tiny_teacher(root / "teacher")
    return teacher, write_tle_store(root / "store", teacher, n=8)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- inputs ------------------------------------------------------------------------------------------


def test_train_tle_reports_a_missing_store_and_an_offline_hub_teacher_together_and_writes_nothing(
    tmp_path, monkeypatch
):
    from stages.train_tle import run

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "tle"
    message = refusal(
        lambda: run(
            load_config(
                overrides=quoted(
                    store__path=tmp_path / "no-store",
                    teacher__name_or_path=NO_SUCH_HUB_MODEL,
                    train_tle__output_dir=out,
                )
            )
        )
    )
    assert "2 problem(s)" in message
    assert f"{NO_SUCH_HUB_MODEL!r}: the hub is offline (HF_HUB_OFFLINE is set)" in message
    assert "no-store' does not exist" in message and "whistle precompute" in message
    assert not out.exists()


def test_a_hub_teacher_the_hub_cannot_reach_is_named_after_one_request(tmp_path, monkeypatch):
    from stages.train_tle import run

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    out = tmp_path / "tle"
    message = refusal(
        lambda: run(load_config(overrides=quoted(teacher__name_or_path=NO_SUCH_HUB_MODEL, train_tle__output_dir=out)))
    )
    assert "the hub cannot be reached" in message and "not in the local cache" in message
    assert not out.exists()


def test_a_teacher_folder_must_hold_a_whisper_with_weights_and_a_tokenizer(teacher_and_store, tmp_path):
    teacher, store = teacher_and_store
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    bare = tmp_path / "bare"
    shutil.copytree(teacher, bare, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    for folder, expected in (
        (bert, "holds a 'bert' model"),
        (bare, "no *.safetensors weights"),
        (bare, "has no tokenizer"),
        (tmp_path / "typo", "typo' does not exist"),
        (store / "zarr.json", "is a file, not a folder"),
    ):
        problems = preflight.whisper_problems(str(folder), "main", "teacher.name_or_path")[0]
        assert any(expected in p for p in problems), (folder, problems)
    assert preflight.whisper_problems(str(teacher), "main", "teacher.name_or_path")[0] == []


def test_train_tle_refuses_a_store_of_another_geometry_before_writing(teacher_and_store, tmp_path):
    from stages.train_tle import run

    teacher, _ = teacher_and_store
    store = write_tle_store(tmp_path / "store", teacher, n=8, max_frames=1500)
    message = refusal(lambda: run(tle_config(store, teacher, tmp_path / "out")))
    assert "teacher.max_frames: 1500 (store) vs 100 (given)" in message
    assert not (tmp_path / "out").exists()


def test_evaluate_with_a_missing_model_and_set_writes_no_output_folder(teacher_and_store, tmp_path):
    from stages.evaluate import run

    teacher, _ = teacher_and_store
    out = tmp_path / "eval"
    message = refusal(
        lambda: run(
            load_config(
                overrides=quoted(evaluate__output_dir=out)
                + [
                    f"evaluate.models={json.dumps([str(teacher), 'after=' + str(tmp_path / 'adapted')])}",
                    f"evaluate.sets={json.dumps([str(tmp_path / 'test.jsonl')])}",
                ]
            )
        )
    )
    assert "MODEL after = " in message and "adapted' does not exist" in message
    assert "audio set = " in message and "test.jsonl' does not exist" in message
    assert "Repo id" not in message
    assert not out.exists()


def test_finetune_reports_ratio_rules_and_missing_inputs_at_once(world, tmp_path):  # noqa: F811
    from stages.finetune import run

    out = tmp_path / "adapted"
    message = refusal(
        lambda: run(
            finetune_config(
                world,
                out,
                *quoted(
                    finetune__tts_store="",
                    finetune__audio_store=tmp_path / "no-store",
                    finetune__val_audio=tmp_path / "val.jsonl",
                ),
                "finetune.tts_ratio=0.25",
            )
        )
    )
    assert "tts_store is empty" in message  # the ratios' rule (preflight.finetune_ratio_problems)
    assert "no-store' does not exist" in message and "val.jsonl' does not exist" in message
    assert not out.exists()


def test_precompute_checks_the_teacher_and_the_source_before_creating_the_store(tmp_path):
    from stages.precompute import run

    store = tmp_path / "store"
    message = refusal(
        lambda: run(
            load_config(
                overrides=quoted(
                    data__path=tmp_path / "clips" / "manifest.csv",
                    store__path=store,
                    teacher__name_or_path=tmp_path / "tiny",
                )
            )
        )
    )
    assert "teacher.name_or_path" in message and "tiny' does not exist" in message
    assert "data.path" in message and "manifest.csv' does not exist" in message
    assert not store.exists()


def test_precompute_refuses_to_resume_a_store_of_another_teacher_geometry_unless_overwriting(
    teacher_and_store, tiny_whisper_dir, tmp_path
):
    _, store = teacher_and_store  # the 2 s-window tiny teacher's; tiny_whisper_dir has the 30 s window
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("audio,text\na.wav,hello\n")
    settings = quoted(data__path=manifest, store__path=store, teacher__name_or_path=tiny_whisper_dir)
    message = refusal(lambda: preflight.precompute(load_config(overrides=settings)))
    assert "already holds states of another teacher geometry" in message and "teacher.max_frames: 100" in message
    preflight.precompute(load_config(overrides=settings + ["precompute.overwrite=true"]))


def test_validate_tle_checks_its_inputs_and_outputs(teacher_and_store, tmp_path):
    from stages.validate_tle import ValidateTLEOptions, run

    teacher, store = teacher_and_store
    config = load_config(overrides=quoted(teacher__name_or_path=teacher))
    message = refusal(
        lambda: run(
            config,
            ValidateTLEOptions(
                str(tmp_path / "tle"),
                str(store),
                text_files=(str(tmp_path / "target.txt"),),
                json_path=str(store / "zarr.json"),
            ),
        )
    )
    assert "TLE_DIR" in message and "--text" in message
    assert "--json" in message and "lies inside --store" in message


def test_demo_refuses_a_workdir_that_is_a_file_and_a_mistyped_setting_before_any_step(tmp_path):
    from stages.demo import run

    workdir = tmp_path / "demo"
    workdir.write_text("not a folder")
    message = refusal(lambda: run(str(workdir), quick=True, overrides=["finetune.stepz=3"]))
    assert "--workdir" in message and "is a file" in message
    assert "unknown key finetune.stepz" in message


# ---- outputs never overwrite inputs ----------------------------------------------------------------------


def test_train_tle_output_at_inside_or_around_an_input_is_refused_and_the_input_kept(teacher_and_store, tmp_path):
    from stages.train_tle import run

    source, store = teacher_and_store
    teacher = Path(shutil.copytree(source, tmp_path / "models" / "teacher"))
    before = files(teacher)
    (tmp_path / "link").symlink_to(teacher)
    for output, expected in (
        (teacher, "is teacher.name_or_path itself"),
        (tmp_path / "link", "is teacher.name_or_path itself"),  # resolved through the link
        (tmp_path / "models", "holds teacher.name_or_path"),
        (teacher / "tle", "lies inside teacher.name_or_path"),
        (store / "tle", "lies inside store.path"),
    ):
        message = refusal(lambda output=output: run(tle_config(store, teacher, output)))
        assert expected in message, (output, message)
    assert files(teacher) == before and not (teacher / "tle").exists() and not (store / "tle").exists()


def test_finetune_output_at_the_tle_or_the_teacher_is_refused(world, tmp_path):  # noqa: F811
    from stages.finetune import run

    tle_before, teacher_before = files(world["tle"]), files(world["teacher"])
    for key in ("tle", "teacher"):
        message = refusal(lambda key=key: run(finetune_config(world, world[key])))
        assert f"finetune.output_dir = {str(world[key])!r} is" in message and "itself" in message
    message = refusal(lambda: run(finetune_config(world, world["root"])))
    assert "holds teacher.name_or_path" in message and "holds finetune.tle_path" in message
    assert files(world["tle"]) == tle_before and files(world["teacher"]) == teacher_before


def test_evaluate_output_holding_a_set_is_refused(teacher_and_store, tmp_path):
    teacher, _ = teacher_and_store
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "test.jsonl").write_text("")
    config = load_config(
        overrides=quoted(evaluate__output_dir=tmp_path)
        + [f"evaluate.models={json.dumps([str(teacher)])}", f"evaluate.sets={json.dumps([str(sets / 'test.jsonl')])}"]
    )
    assert "holds audio set" in refusal(lambda: preflight.evaluate(config))


def test_precompute_store_may_lie_in_the_audio_folder_but_not_be_or_hold_it(tmp_path, tiny_whisper_dir):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.wav", 1.0, 16000)
    (clips / "manifest.csv").write_text("audio,text\na.wav,hello\n")

    def check(store: Path) -> None:
        preflight.precompute(
            load_config(
                overrides=quoted(
                    data__path=clips / "manifest.csv", store__path=store, teacher__name_or_path=tiny_whisper_dir
                )
            )
        )

    check(clips / "store")  # writing beside the audio overwrites nothing
    assert "holds data.path" in refusal(lambda: check(clips))  # --overwrite would delete the audio
    assert "is data.path itself" in refusal(lambda: check(clips / "manifest.csv"))
    assert "lies inside teacher.name_or_path" in refusal(lambda: check(tiny_whisper_dir / "store"))


def test_synthesize_and_import_ct2_refuse_an_out_that_holds_their_input(tmp_path):
    from whistle_pipeline.ct2 import import_ct2
    from whistle_pipeline.tts import synthesize

    texts = tmp_path / "sentences" / "target.txt"
    texts.parent.mkdir()
    texts.write_text("hello world\n")
    message = refusal(lambda: synthesize(texts, texts.parent, overwrite=True))
    assert "OUT" in message and "holds TEXTS" in message
    source = tmp_path / "models" / "ct2"
    source.mkdir(parents=True)
    (source / "model.bin").write_bytes(b"")
    assert "holds SRC" in refusal(lambda: import_ct2(source, tmp_path / "models", overwrite=True))
    assert "is SRC itself" in refusal(lambda: import_ct2(source, source, overwrite=True))
    assert texts.is_file() and (source / "model.bin").is_file()


# ---- outputs that keep what users rely on ------------------------------------------------------------------


def test_finetune_output_carries_the_teachers_processor_a_card_and_ordinary_modes(world, tmp_path):  # noqa: F811
    from stages.finetune import run
    from whistle_pipeline.metrics import english_spelling_path
    from whistle_pipeline.model_files import PROCESSOR_FILES

    teacher = Path(shutil.copytree(world["teacher"], tmp_path / "teacher"))
    shutil.copyfile(english_spelling_path(), teacher / "normalizer.json")  # the tiny teacher has none
    out = tmp_path / "adapted"
    umask = os.umask(0o022)
    try:
        run(
            finetune_config(
                world,
                out,
                *quoted(teacher__name_or_path=teacher),
                "finetune.steps=3",
                "finetune.val_every=3",
                "finetune.audio_ratio=0.5",
                "finetune.tts_ratio=0.0",
                'finetune.tts_store=""',
            )
        )
    finally:
        os.umask(umask)
    kept = [name for name in PROCESSOR_FILES if (teacher / name).is_file()]
    assert {"normalizer.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= set(kept)
    for name in kept:
        assert filecmp.cmp(teacher / name, out / name, shallow=False), name
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir() if p.is_file())
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"Base model: {teacher}" in card and "## Training" in card and "Steps: 3" in card


def test_import_ct2_keeps_the_sources_feature_extractor_and_writes_ordinary_modes(tmp_path):
    from ct2_writer import whisper_tokenizer, write_ct2_whisper
    from test_ct2 import random_whisper
    from transformers import WhisperFeatureExtractor

    from whistle_pipeline.ct2 import import_ct2

    tokenizer = whisper_tokenizer(multilingual=False)
    source = write_ct2_whisper(random_whisper(tokenizer), tokenizer, tmp_path / "ct2")
    WhisperFeatureExtractor(feature_size=80, padding_value=0.5).save_pretrained(source)  # not the default value
    umask = os.umask(0o022)
    try:
        import_ct2(source, tmp_path / "hf")
    finally:
        os.umask(umask)
    assert WhisperFeatureExtractor.from_pretrained(tmp_path / "hf").padding_value == 0.5
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "hf").iterdir())


@pytest.mark.espeak
def test_train_tle_names_a_missing_g2p_before_any_work(monkeypatch):
    assert preflight.pronunciation_problems("espeak") == []
    monkeypatch.setitem(sys.modules, "phonemizer", None)  # as if it were not installed
    assert preflight.pronunciation_problems("none") == []
    assert preflight.pronunciation_problems("espeak") == [
        "tle.pronunciation = \"espeak\" needs phonemizer: pip install 'whistle[g2p]'"
    ]
