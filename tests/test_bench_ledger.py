"""bench/tle_pronunciation.py's ledger: a rerun skips finished steps, and --reuse takes another run's
recipe-independent steps only from a finished run of the same demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pytest
from conftest import load_bench

BENCH = Path(__file__).resolve().parent.parent / "bench"
SHARED = ["flite", "precompute-espeak", "validate-today-espeak", "evaluate-reused"]


@pytest.fixture(scope="module")
def bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the script imports bench/_common.py
    return load_bench("tle_pronunciation")


def identity(arm_sets: list[str], demo: str = "/demo") -> dict:
    return {"demo": demo, "arm_sets": arm_sets, "quick": False, "flite": True}


def finished_run(bench, out: Path) -> None:
    ledger = bench.Ledger(out, identity(["tle.pronunciation=espeak"]))
    for name in [*SHARED, "train-tle", "evaluate-new"]:
        ledger.run(name, name, lambda name=name: {"made_by": name})


def test_a_rerun_skips_what_finished_and_refuses_other_settings(bench, tmp_path):
    finished_run(bench, tmp_path)
    again = bench.Ledger(tmp_path, identity(["tle.pronunciation=espeak"]))
    assert again.run("train-tle", "train", lambda: pytest.fail("a finished step ran again")) == {"made_by": "train-tle"}
    with pytest.raises(click.ClickException, match="other settings"):
        bench.Ledger(tmp_path, identity(["store.path=elsewhere"]))


def test_reuse_takes_only_the_shared_steps_and_says_where_from(bench, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    finished_run(bench, first)
    ledger = bench.Ledger(second, identity(["store.path=paired"]))
    ledger.adopt(first, SHARED)
    for name in SHARED:
        assert ledger.run(name, name, lambda name=name: pytest.fail(f"{name} ran again")) == {"made_by": name}
    # the recipe's own steps are not taken: they run here
    assert ledger.run("train-tle", "train", lambda: {"made_by": "second"}) == {"made_by": "second"}
    written = json.loads((second / "steps.json").read_text())
    assert written["arm_sets"] == ["store.path=paired"]
    assert {name: step.get("reused_from") for name, step in written["steps"].items()} == {
        **dict.fromkeys(SHARED, str(first)),
        "train-tle": None,
    }


def test_reuse_refuses_another_demo_and_an_unfinished_run(bench, tmp_path):
    first, other_demo, unfinished = tmp_path / "first", tmp_path / "other", tmp_path / "unfinished"
    for folder in (first, other_demo, unfinished):
        folder.mkdir()
    finished_run(bench, first)
    with pytest.raises(click.ClickException, match="demo = '/demo'"):
        bench.Ledger(other_demo, identity([], demo="/another-demo")).adopt(first, SHARED)
    partial = bench.Ledger(unfinished, identity([]))
    partial.run("flite", "flite", lambda: {})
    with pytest.raises(
        click.ClickException, match="has not finished precompute-espeak, validate-today-espeak, evaluate"
    ):
        bench.Ledger(tmp_path / "third", identity([])).adopt(unfinished, SHARED)
    with pytest.raises(click.ClickException, match="not an OUT of this script"):
        bench.Ledger(tmp_path / "fourth", identity([])).adopt(tmp_path / "nothing", SHARED)
