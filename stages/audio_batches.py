"""precompute's worker side: source rows -> decoded, padded clips, batched in DataLoader workers.

Each worker reads its rows from the source, decodes them (soundfile), resamples them (soxr), applies
the augmentation and pads them to the batch's longest clip; the main process gets a pinned `Batch`
and only runs the encoder (teacher_states pads to the window on the device: a 5 s clip crosses to
the device as 5 s of samples, not Whisper's 30 s). A row that cannot be read becomes a SourceReject with its reason, never an
exception that ends the run.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from whistle_pipeline.audio import AudioError, augment, load_audio
from whistle_pipeline.sources import Clip, Source, SourceReject
from whistle_pipeline.teacher import TeacherGeometry

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Batch:
    """What a DataLoader worker hands over: padded audio of the usable rows and the rejected rows."""

    audio: torch.Tensor  # (B, N) float32, zero-padded to the longest clip (N <= the window's samples)
    clips: list[Clip]  # the usable rows, without their encoded audio (its samples are in `audio`)
    n_samples: list[int]  # per clip, at the teacher's rate, before padding to the window
    rejects: list[SourceReject]

    def pin_memory(self) -> Batch:
        # called by the DataLoader's pinning thread, so the host->device copy can be asynchronous
        return dataclasses.replace(self, audio=self.audio.pin_memory())


class ClipDataset(Dataset):
    """Row -> (Clip, samples) or SourceReject; runs in the DataLoader workers."""

    def __init__(self, source: Source, geometry: TeacherGeometry, augmentation: str):
        self.source = source
        self.geometry = geometry
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, row: int) -> tuple[Clip, np.ndarray] | SourceReject:
        geometry = self.geometry
        try:
            item = self.source[row]
            if isinstance(item, SourceReject):
                return item
            audio = load_audio(
                item.audio,
                geometry.sample_rate,
                max_seconds=geometry.window_seconds,
                name=item.audio_name,
                segment=item.segment,
            )
            audio = augment(
                audio[: geometry.n_samples], geometry.sample_rate, self.augmentation
            )  # resampling may add 1
        except AudioError as err:
            return SourceReject(row, item.id, err.reason)
        except Exception as err:  # one unreadable row must never end a long run: it is recorded instead
            log.warning("row %d: unexpected error reading it", row, exc_info=True)
            return SourceReject(row, self.source.row_id(row), f"read error: {type(err).__name__}: {err}")
        # the encoded audio (bytes, for a `datasets` source) stays here: only its samples cross to the main process
        return dataclasses.replace(item, audio=""), audio


def collate(items: list[tuple[Clip, np.ndarray] | SourceReject]) -> Batch:
    clips = [item for item in items if not isinstance(item, SourceReject)]
    longest = max((samples.shape[0] for _, samples in clips), default=0)
    audio = torch.zeros(len(clips), longest)  # (B, N): Whisper pads with silence (to the window, on the device)
    for i, (_, samples) in enumerate(clips):
        audio[i, : samples.shape[0]] = torch.from_numpy(samples)
    return Batch(
        audio=audio,
        clips=[clip for clip, _ in clips],
        n_samples=[samples.shape[0] for _, samples in clips],
        rejects=[item for item in items if isinstance(item, SourceReject)],
    )


def quiet_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode with numpy/soxr; torch threads would only fight the encoder
