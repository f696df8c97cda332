"""What a folder that holds a Whisper carries besides its weights, so users lose nothing their tools rely on:

    copy_processor(teacher, revision, out)   the teacher's tokenizer, feature extractor, English spelling
                                             normaliser and generation config, byte for byte
    ordinary_modes(out)                      files readable by all, as any downloaded model

`save_pretrained` alone is not enough: it re-serialises the tokenizer (transformers 5 drops
normalizer.json, so `tokenizer.normalize` — Whisper's English spelling normaliser, colour -> color —
is gone and the adapted model scores differently from its teacher), and safetensors writes the weights
through a private temporary file, so model.safetensors ends up 0600.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub

# Every file of a Whisper's processor and generation settings that a checkpoint may hold (the weights and
# config.json are the model's own)
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def teacher_file(name_or_path: str, revision: str, name: str) -> Path | None:
    """The teacher's file `name`: from its folder, or for a hub name from the local cache at `revision`
    (the teacher was loaded, so what it has is there); None when it has none."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    cached = huggingface_hub.try_to_load_from_cache(name_or_path, name, revision=revision or None)
    return Path(cached) if isinstance(cached, str) else None


def copy_processor(name_or_path: str, revision: str, out: Path) -> list[str]:
    """Copy every PROCESSOR_FILES file the teacher has into `out` (over what save_pretrained wrote there);
    returns the names copied."""
    copied = []
    for name in PROCESSOR_FILES:
        source = teacher_file(name_or_path, revision, name)
        if source is not None:
            shutil.copyfile(source, out / name)
            copied.append(name)
    return copied


def ordinary_modes(folder: Path, reference: str = "config.json") -> None:
    """Give every file directly in `folder` the mode of `reference`, a file written with open() (0644 under
    the usual umask 022): the weights get the mode any other file of this process gets."""
    mode = (folder / reference).stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
