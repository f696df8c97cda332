"""stages.demo_report on hand-built scores: every method's figures, the spread, the goals and report.md's table."""

from __future__ import annotations

import pytest

from stages.demo_report import goals, markdown, method_columns, method_figures, run_label

ARMS = ["text-null", "source-only", "whistle", "tts-only", "whistle-tts"]
TARGET = {  # column -> target WER; source WER is 0.30 everywhere but where set below
    "tiny.en": 0.70,
    "tiny.en+prompt": 0.66,
    "tiny.en+fusion": 0.60,
    "text-null": 0.55,
    "text-null.s1": 0.57,
    "source-only": 0.50,
    "source-only.s1": 0.48,
    "whistle": 0.44,
    "whistle.s1": 0.46,
    "tts-only": 0.40,
    "tts-only.s1": 0.40,
    "whistle-tts": 0.34,
    "whistle-tts.s1": 0.36,
    "whistle+prompt": 0.43,
    "whistle.s1+prompt": 0.45,
    "whistle+fusion": 0.40,
    "whistle.s1+fusion": 0.42,
}
TERMS = {"tiny.en": 0.8, "whistle": 0.3, "whistle.s1": 0.5}


def cell(wer: float, term_error_rate: float | None = 0.6) -> dict:
    return {
        "wer": wer,
        "cer": wer / 2,
        "term_error_rate": term_error_rate,
        "decode_seconds_per_clip": 0.1,
        "loops": [],
        "clips": 10,
        "worst": [],
    }


def scores(source_rise: float = 0.0) -> dict:
    return {
        column: {
            "source": cell(0.30 * (1 + source_rise) if column == "tts-only.s1" else 0.30),
            "target": cell(wer, TERMS.get(column, 0.6)),
        }
        for column, wer in TARGET.items()
    }


def test_methods_average_their_seeds_and_keep_the_range():
    columns = method_columns(ARMS, seeds=2, aided_seeds=2)
    assert list(columns) == ["unadapted", "prompt", "fusion", *ARMS, "whistle+prompt", "whistle+fusion"]
    assert columns["whistle+fusion"] == ("fusion", ["whistle+fusion", "whistle.s1+fusion"])
    assert columns["prompt"] == ("prompt", ["tiny.en+prompt"]) and run_label("whistle", 1) == "whistle.s1"
    assert method_columns(ARMS, seeds=2, aided_seeds=1)["whistle+prompt"] == ("prompt", ["whistle+prompt"])
    methods = method_figures(scores(), columns, {"whistle": 3.0, "whistle.s1": 5.0})
    whistle = methods["whistle"]["target"]
    assert whistle["wer"] == pytest.approx(0.45) and (whistle["wer_min"], whistle["wer_max"]) == (0.44, 0.46)
    assert whistle["wer_seeds"] == [0.44, 0.46] and whistle["term_error_rate"] == pytest.approx(0.4)
    assert whistle["relative_wer"] == pytest.approx((0.45 - 0.70) / 0.70)
    assert whistle["beyond_control"] == pytest.approx(0.49 - 0.45)
    assert methods["whistle"]["training_minutes"] == methods["whistle+prompt"]["training_minutes"] == 4.0
    assert methods["fusion"]["training_minutes"] == 0.0 and methods["fusion"]["seeds"] == 1


def test_goals_are_decided_on_the_means_and_the_spread():
    methods = method_figures(scores(), method_columns(ARMS, seeds=2, aided_seeds=2), {})
    met, numbers = goals(methods, ARMS)
    # whistle 0.45: prompt 0.66 and fusion 0.60 lie beyond the spread (0.02); text-null 0.56 too (its spread 0.02)
    assert met["whistle below prompt on target by more than the seed spread"]
    assert numbers["whistle below fusion on target by more than the seed spread"]["margin"] == pytest.approx(0.15)
    assert numbers["whistle below text-null on target by more than the seed spread"]["spread"] == pytest.approx(0.02)
    # fusion is the better aid; whistle+fusion 0.41 is below whistle 0.45 and fusion 0.60
    name = "whistle + the best decoding-time method below either alone"
    assert met[name] and numbers[name]["best"] == "fusion"
    # whistle-tts 0.35 against tts-only 0.40: 12.5 % relative
    assert met["whistle-tts >= 12.3% relative below tts-only"]
    assert numbers["whistle-tts >= 12.3% relative below tts-only"]["relative_cut"] == pytest.approx(0.125)
    assert met["no arm raises source WER by more than 5%"]
    # term error rate 0.4 against 0.8: exactly half
    assert met["whistle term error rate <= half the unadapted model's"]

    # whistle+fusion on seed 0 alone (0.40) is compared with whistle's seed 0 (0.44), not its mean
    one = goals(method_figures(scores(), method_columns(ARMS, seeds=2, aided_seeds=1), {}), ARMS)[1]
    assert one[name] == {"best": "fusion", "whistle+fusion": 0.40, "whistle": 0.44, "fusion": 0.60}
    risen = goals(method_figures(scores(source_rise=0.2), method_columns(ARMS, seeds=2, aided_seeds=2), {}), ARMS)[0]
    assert not risen["no arm raises source WER by more than 5%"] and not risen["tts-only raises source WER <= 5%"]
    close = scores()
    close["text-null"]["target"]["wer"] = 0.47  # text-null's seeds 0.47 and 0.57: mean 0.52, spread 0.10
    met = goals(method_figures(close, method_columns(ARMS, seeds=2, aided_seeds=2), {}), ARMS)[0]
    assert not met["whistle below text-null on target by more than the seed spread"]  # margin 0.07 < spread 0.10


def test_report_md_lists_every_method_and_goal():
    methods = method_figures(scores(), method_columns(ARMS, seeds=2, aided_seeds=2), {"whistle": 3.0})
    met, numbers = goals(methods, ARMS)
    report = {
        "quick": False,
        "seeds": 2,
        "steps": {"finetune": 200, "finetune_batch_size": 12},
        "methods": methods,
        "goals": met,
        "goal_numbers": numbers,
        "seconds": {"train-tle": 600.0},
    }
    table = markdown(report)
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows == list(methods)
    assert "| whistle | 45.0 (44.0–46.0) |" in table and "| fusion | 60.0 |" in table
    assert sum(line.startswith("- met: ") or line.startswith("- NOT met: ") for line in table.splitlines()) == len(met)
