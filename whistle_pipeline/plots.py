"""Pictures of stored teacher states (matplotlib is optional: `pip install 'whistle[plot]'`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from whistle_pipeline.errors import WhistleError


def plot_utterance(store_path: str, utt_id: str, out_png: str | Path) -> Path:
    """Draw one utterance's full window of teacher states as a heatmap; returns the PNG's path.

    Frames run left to right, channels bottom to top. In a speech-frames store the frames after
    the speech are the store's tail template (what the decoder is given); a dashed line marks
    where the stored speech frames end.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise WhistleError("--plot needs matplotlib, which is not installed: pip install 'whistle[plot]'") from err
    from store.reader import StoreReader

    reader = StoreReader(store_path)
    utt = reader.utterance(*reader.find(utt_id))
    window = reader.full_window(utt.states)  # (max_frames, D) float32
    teacher = reader.teacher
    boundary = utt.speech_frames

    figure = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    limit = float(np.percentile(np.abs(window), 99)) or 1.0  # robust colour range: a few huge channels
    image = axes.imshow(window.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit,
                        interpolation="nearest")
    tail_label = "tail template" if reader.spec.frames == "speech" else "stored tail"
    axes.axvline(boundary - 0.5, color="black", linestyle="--", linewidth=1.2,
                 label=f"speech | {tail_label} (frame {boundary})")
    axes.legend(loc="upper right", fontsize=8)
    seconds = axes.secondary_xaxis("top", functions=(lambda f: f / teacher.frames_per_second,
                                                     lambda s: s * teacher.frames_per_second))
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
