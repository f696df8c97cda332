"""whistle: text-only domain adaptation of Whisper (WhisTLE).

The library behind the `whistle` command. The names below load their modules on first use
(PEP 562), so `import whistle_pipeline` stays cheap and `whistle --help` never imports torch::

    from whistle_pipeline import TLEModel, load_encoder, teacher_states, StoreReader
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # the text-to-latent encoder and its loss
    "TLEConfig": "whistle_pipeline.tle",
    "TLEModel": "whistle_pipeline.tle",
    "TLEOutput": "whistle_pipeline.tle",
    "tle_loss": "whistle_pipeline.tle",
    "LossWeights": "whistle_pipeline.tle",
    # the frozen Whisper teacher
    "load_teacher": "whistle_pipeline.teacher",
    "load_encoder": "whistle_pipeline.teacher",
    "teacher_states": "whistle_pipeline.teacher",
    "TeacherGeometry": "whistle_pipeline.teacher",
    "LogMel": "whistle_pipeline.teacher",
    # the token convention shared by train-tle and finetune
    "encode_texts": "whistle_pipeline.text",
    # audio and scoring
    "load_audio": "whistle_pipeline.audio",
    "error_rates": "whistle_pipeline.metrics",
    # configuration
    "load_config": "whistle_pipeline.config",
    "PipelineConfig": "whistle_pipeline.config",
    "WhistleError": "whistle_pipeline.errors",
    # the feature store
    "StoreReader": "store",
    "StoreWriter": "store",
    "StoreError": "store",
    "FeatureDataset": "store.dataset",
    "pad_batch": "store.dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'whistle_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
