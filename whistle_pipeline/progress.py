"""How long work shows progress: a bar on a terminal, log lines elsewhere, and a log file per run.

    progress_bar   tqdm when stderr is a terminal; in a batch job or `> log 2>&1` (stderr not a terminal) a
                   ProgressLog instead, which logs "done/total, rate, ETA" every PROGRESS_EVERY_S seconds
    run_log        while a command runs, its log lines also go to whistle.log in its output folder

precompute, train-tle and finetune draw their bars with progress_bar; the CLI opens run_log around each stage.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("whistle.progress")

PROGRESS_EVERY_S = 60.0  # a batch job's log shows a progress line at least this often while work advances
LOG_STEM = "whistle"  # a run's log file: whistle.log in its output folder (process r > 0: whistle.rank<r>.log)
HELD_LINES = 1000  # lines kept for a log file whose folder does not exist yet (the run's checks)


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0, **tqdm_options: Any) -> Any:
    """A progress display with tqdm's update / set_postfix / set_postfix_str / close: tqdm on a terminal, a
    ProgressLog when stderr is not one (a bar there is one endless line, or nothing), none when not `enabled`."""
    if enabled and not sys.stderr.isatty():
        return ProgressLog(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, **tqdm_options)


def duration_text(seconds: float) -> str:
    """3725 -> "1h02m", 307 -> "5m07s", 42.4 -> "42s"."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressLog:
    """tqdm's interface as log lines: "train-tle: 1200/20000 steps (6%), 2.1 steps/s, ETA 2h29m, loss=0.41",
    at most every `every_s` seconds of `clock` as work is done, and a last line at close."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.every_s, self.clock = total, desc, unit, every_s, clock
        self.n = self.initial = initial  # `initial`: done before this run (a resume); the rate counts this run's
        self.started = self.shown = clock()
        self.postfix = ""
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.shown >= self.every_s:
            self.shown = now
            log.info("%s", self.line(now))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in {**(ordered_dict or {}), **values}.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        """Log where the work ended (once), with the time it took."""
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.started
        log.info(
            "%s: %d/%d %ss in %s (%s)%s",
            self.desc,
            self.n,
            self.total,
            self.unit,
            duration_text(elapsed),
            self.rate_text(self.rate(elapsed)),
            f", {self.postfix}" if self.postfix else "",
        )

    def rate(self, elapsed: float) -> float:
        """Units per second in this run."""
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def rate_text(self, rate: float) -> str:
        if rate >= 1 or rate == 0:
            return f"{rate:.1f} {self.unit}s/s"
        return f"{1 / rate:.1f} s/{self.unit}"

    def line(self, now: float) -> str:
        rate = self.rate(now - self.started)
        parts = [
            f"{self.desc}: {self.n}/{self.total} {self.unit}s"
            + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
            self.rate_text(rate),
        ]
        if rate > 0 and self.total:
            parts.append(f"ETA {duration_text(max(0, self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)


class RunLogFile(logging.FileHandler):
    """Log records appended to `path` once `folder` exists; the records before that (a run's checks) are held
    and written first, so that a run stopped by its checks leaves no file behind."""

    def __init__(self, path: Path, folder: Path):
        super().__init__(path, encoding="utf-8", delay=True)  # delay: the file opens at the first record written
        self.folder = folder
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not self.folder.is_dir():
            self.held = [*self.held[1 - HELD_LINES :], record]
            return
        for held in self.held:
            super().emit(held)
        self.held = []
        super().emit(record)


def log_file_name(stem: str) -> str:
    """STEM.log for the main process (or a single one); process r of a launch writes STEM.rank<r>.log."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return f"{stem}.log" if rank == 0 else f"{stem}.rank{rank}.log"


@contextmanager
def run_log(folder: str | Path, beside: bool = False) -> Iterator[Path | None]:
    """While the block runs, every log line also goes to folder/whistle.log (`beside`: to FOLDER.log next to
    the folder, for a store that the run may delete and recreate), written once the folder exists. A URL
    (s3://..., memory://...) gets no log file."""
    if "://" in str(folder):
        yield None
        return
    folder = Path(folder)
    path = folder.with_name(log_file_name(folder.name)) if beside else folder / log_file_name(LOG_STEM)
    root = logging.getLogger()
    handler = RunLogFile(path, folder)
    # lines as the console shows them (the CLI's format), where a handler there has one
    handler.setFormatter(next((h.formatter for h in root.handlers if h.formatter), logging.Formatter()))
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
