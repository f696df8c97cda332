"""whistle_pipeline/progress.py: progress lines for logs that are not a terminal, and a log file per run."""

from __future__ import annotations

import logging

from whistle_pipeline.progress import ProgressLog, duration_text, progress_bar, run_log


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_give_the_count_the_rate_and_the_eta(caplog):
    clock = FakeClock()
    progress = ProgressLog(1000, "train-tle", "step", initial=100, every_s=60, clock=clock)
    with caplog.at_level(logging.INFO, logger="whistle.progress"):
        for _ in range(50):  # 50 steps in 50 s: no line before a minute has passed
            clock.now += 1
            progress.update()
        assert caplog.messages == []
        for _ in range(10):
            clock.now += 1
            progress.update()
        progress.set_postfix(loss="0.412")
        clock.now += 30
        progress.update(2)
        progress.close()
        progress.close()
    # 60 steps of this run in 60 s (the 100 resumed ones do not count): 1.0 step/s, 840 left; 62 in 90 s at the end
    assert caplog.messages == [
        "train-tle: 160/1000 steps (16%), 1.0 steps/s, ETA 14m00s",
        "train-tle: 162/1000 steps in 1m30s (1.5 s/step), loss=0.412",
    ]


def test_slow_work_is_given_in_seconds_per_unit(caplog):
    clock = FakeClock()
    progress = ProgressLog(40, "precompute", "clip", every_s=60, clock=clock)
    progress.set_postfix_str("12 audio-h/h")
    with caplog.at_level(logging.INFO, logger="whistle.progress"):
        clock.now += 80
        progress.update(4)
    assert caplog.messages == ["precompute: 4/40 clips (10%), 20.0 s/clip, ETA 12m00s, 12 audio-h/h"]


def test_durations_read_as_hours_minutes_seconds():
    assert [duration_text(s) for s in (42.4, 307, 3725)] == ["42s", "5m07s", "1h02m"]


def test_a_bar_off_a_terminal_is_a_progress_log():
    assert isinstance(progress_bar(10, "finetune", "step", enabled=True), ProgressLog)  # pytest's stderr is a pipe
    assert not isinstance(progress_bar(10, "finetune", "step", enabled=False), ProgressLog)


def test_a_run_log_is_written_once_its_folder_exists(tmp_path):
    out = tmp_path / "run"
    logger = logging.getLogger("whistle.test")
    logger.setLevel(logging.INFO)
    with run_log(out) as path:
        logger.info("checked the inputs")
        assert not out.exists()  # a run stopped by its checks leaves nothing behind
        out.mkdir()
        logger.info("step 1")
    logger.info("after the run")
    assert path == out / "whistle.log"
    lines = path.read_text().splitlines()  # in the console's format
    assert len(lines) == 2 and lines[0].endswith("checked the inputs") and lines[1].endswith("step 1")


def test_a_store_log_goes_beside_the_store_and_urls_get_none(tmp_path):
    with run_log(tmp_path / "store", beside=True) as path:
        assert path == tmp_path / "store.log"
    with run_log("memory://store", beside=True) as path:
        assert path is None
