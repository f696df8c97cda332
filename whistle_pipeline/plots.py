"""The pictures whistle draws: a stored utterance's teacher states (`whistle inspect-store --plot`),
a training run's curves (train-tle's loss_curves.png) and the demo's WER chart (report.png).

matplotlib is optional (`pip install 'whistle[plot]'`) and slow to import, so it is imported only when
a picture is drawn (`_figure`). Figures are drawn on matplotlib's Agg canvas directly, not through
pyplot: no global backend to switch, no figure left open.
"""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from whistle_pipeline.errors import WhistleError

log = logging.getLogger(__name__)


def _figure(figsize: tuple[float, float], dpi: int) -> Any:
    """A new matplotlib Figure on an Agg canvas; raises ImportError when matplotlib is not installed."""
    # imported here: matplotlib is optional and slow to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def plot_utterance(store_path: str, utt_id: str, out_png: str | Path) -> Path:
    """Draw one utterance's full window of teacher states as a heatmap; returns the PNG's path.

    Frames run left to right, channels bottom to top. In a speech-frames store the frames after
    the speech are the store's tail template (what the decoder is given); a dashed line marks
    where the stored speech frames end.
    """
    try:
        figure = _figure(figsize=(12, 4.5), dpi=100)
    except ImportError as err:
        raise WhistleError("--plot needs matplotlib, which is not installed: pip install 'whistle[plot]'") from err
    # imported on use: the library depends on the store only where it reads one
    from store.reader import StoreReader

    reader = StoreReader(store_path)
    utt = reader.utterance(*reader.find(utt_id))
    window = reader.full_window(utt.states)  # (max_frames, D) float32
    teacher = reader.teacher
    boundary = utt.speech_frames

    axes = figure.add_subplot()
    limit = float(np.percentile(np.abs(window), 99)) or 1.0  # robust colour range: a few huge channels
    image = axes.imshow(
        window.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
    )
    tail_label = "tail template" if reader.spec.frames == "speech" else "stored tail"
    axes.axvline(
        boundary - 0.5, color="black", linestyle="--", linewidth=1.2, label=f"speech | {tail_label} (frame {boundary})"
    )
    axes.legend(loc="upper right", fontsize=8)
    seconds = axes.secondary_xaxis(
        "top", functions=(lambda f: f / teacher.frames_per_second, lambda s: s * teacher.frames_per_second)
    )
    seconds.set_xlabel("seconds")
    axes.set_xlabel("encoder frame")
    axes.set_ylabel("channel")
    text = utt.text if len(utt.text) <= 90 else utt.text[:87] + "..."
    axes.set_title(f"{utt.id} ({utt.language}, {utt.duration:.2f} s): {text}", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01)
    out = Path(out_png)
    with warnings.catch_warnings():
        # Text in scripts the default font lacks (CJK, ...) is drawn as boxes; one warning per glyph is noise.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.tight_layout()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(out, format="png")
        except OSError as err:
            raise WhistleError(f"could not write the plot to {out}: {err}") from err
    return out


def plot_wer_bars(
    wer: dict[str, dict[str, float]],
    title: str,
    path: Path,
    spread: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> str | None:
    """A grouped bar chart of WER % per test set, one bar per model: `wer` is {model: {set: WER}}, models in
    the order drawn; `spread` {model: {set: (lowest, highest)}} draws each bar's range as an error bar (a
    model's seeds). Returns the PNG's path, or None (with a warning) when matplotlib is not installed."""
    models = list(wer)
    try:
        figure = _figure(figsize=(max(7.0, 0.45 * len(models) * len(wer[models[0]]) + 2.0), 4.5), dpi=110)
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'whistle[plot]')", path.name)
        return None
    sets = list(wer[models[0]])
    axis = figure.add_subplot()
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        xs = [s + (m - (len(models) - 1) / 2) * width for s in range(len(sets))]
        heights = [100 * wer[model][name] for name in sets]
        errors = None
        if spread is not None:  # matplotlib's yerr: distances below and above each bar
            errors = [
                [h - 100 * spread[model][name][0] for h, name in zip(heights, sets)],
                [100 * spread[model][name][1] - h for h, name in zip(heights, sets)],
            ]
        bars = axis.bar(xs, heights, width, yerr=errors, capsize=2 if errors else 0, label=model)
        axis.bar_label(bars, fmt="%.1f", fontsize=6 if len(models) > 6 else 7)
    axis.set_xticks(range(len(sets)), [f"{name} test" for name in sets])
    axis.set_ylabel("WER %" + (" (error bars: range over seeds)" if spread is not None else ""))
    axis.set_title(title)
    axis.legend(fontsize=7, ncol=2 if len(models) > 6 else 1)
    figure.tight_layout()
    figure.savefig(path)
    return str(path)


def read_log(path: Path) -> dict[str, np.ndarray]:
    """A training CSV log as {column: values}, empty cells as NaN ({} for a missing or empty log)."""
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (
        {k: np.array([float(r[k]) if r[k] not in ("", "None") else np.nan for r in rows]) for k in rows[0]}
        if rows
        else {}
    )


def plot_training_curves(
    train_log: Path, validation_log: Path, panels: list[tuple[str, list[tuple[str, str]]]], path: Path
) -> Path | None:
    """One panel per (title, [(column, "train" | "held-out"), ...]) against the step, from a run's two CSV
    logs. Returns the PNG's path, or None (with a warning) when matplotlib is not installed."""
    try:
        figure = _figure(figsize=(14, 7), dpi=100)
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'whistle[plot]')", path.name)
        return None
    tables = {"train": read_log(train_log), "held-out": read_log(validation_log)}
    columns = 3
    for n, (title, series) in enumerate(panels):
        axis = figure.add_subplot(-(-len(panels) // columns), columns, n + 1)
        for name, which in series:
            table = tables[which]
            if table and name in table and np.isfinite(table[name]).any():
                axis.plot(
                    table["step"],
                    table[name],
                    marker="o" if which == "held-out" else None,
                    ms=3,
                    label=f"{name} ({which})",
                )
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:  # a panel whose columns hold no value yet (e.g. no validation so far) stays empty
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    return path
