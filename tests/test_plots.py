"""whistle_pipeline.plots: a run's CSV logs read back as numbers, and its curves drawn from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from whistle_pipeline.plots import plot_training_curves, read_log


def write(path, text):
    path.write_text(text)
    return path


def test_read_log_gives_numbers_and_nan_for_empty_cells(tmp_path):
    log = write(tmp_path / "train_log.csv", "step,loss,epoch_text\n10,2.5,\n20,1.25,1\n")
    table = read_log(log)
    assert set(table) == {"step", "loss", "epoch_text"}
    np.testing.assert_array_equal(table["step"], [10.0, 20.0])
    np.testing.assert_array_equal(table["loss"], [2.5, 1.25])
    assert math.isnan(table["epoch_text"][0]) and table["epoch_text"][1] == 1.0
    assert read_log(tmp_path / "missing.csv") == {} and read_log(write(tmp_path / "empty.csv", "step,loss\n")) == {}


def test_training_curves_draw_each_panel_from_both_logs(tmp_path):
    pytest.importorskip("matplotlib")
    train = write(tmp_path / "train_log.csv", "step,loss\n1,3.0\n2,2.0\n3,1.5\n")
    held_out = write(tmp_path / "validation.csv", "step,loss,wer\n2,2.2,0.5\n")
    panels = [("loss", [("loss", "train"), ("loss", "held-out")]), ("WER", [("wer", "held-out"), ("cer", "held-out")])]
    path = plot_training_curves(train, held_out, panels, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(path).size == (1400, 700)  # 14 x 7 inches at 100 dpi


def test_wer_bars_draw_every_model_with_its_range_and_widen_with_the_models(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from whistle_pipeline.plots import plot_wer_bars

    two = {"unadapted": {"source": 0.4, "target": 0.7}, "whistle": {"source": 0.3, "target": 0.45}}
    small = plot_wer_bars(two, "two models", tmp_path / "two.png")
    ten = {f"method {m}": {"source": 0.3 + m / 100, "target": 0.5 + m / 100} for m in range(10)}
    ranges = {name: {s: (wer - 0.02, wer + 0.01) for s, wer in sets.items()} for name, sets in ten.items()}
    wide = plot_wer_bars(ten, "ten methods", tmp_path / "ten.png", spread=ranges)
    assert small == str(tmp_path / "two.png") and wide == str(tmp_path / "ten.png")
    assert Image.open(small).size == (770, 495)  # 7 x 4.5 inches at 110 dpi
    assert Image.open(wide).size[0] > Image.open(small).size[0]  # 20 bars need room
