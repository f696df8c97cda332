"""finetune's checkpoints and outputs: the trainable weights (the rest is the teacher's), the best step so
far, the history, and the adapted Whisper saved whole (stages.training writes the optimiser, scheduler,
data positions and RNG states beside them; safetensors + JSON: resuming unpickles nothing).
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stages import training as loop
from whistle_pipeline.ct2_export import CARD_FILE, model_card
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.model_files import copy_processor, ordinary_modes
from whistle_pipeline.teacher import LoadedTeacher
from whistle_pipeline.windows import trainable_state


def save_checkpoint(
    accelerator: Any,
    directory: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    step: int,
    positions: dict[str, tuple[int, int]],
    history: dict[str, Any],
    best_dir: Path,
    keep: int,
) -> None:
    """checkpoints/step-N/ (stages.training): trainable weights, the best weights so far, validation
    history, optimiser, scheduler, every rank's data positions and RNG. Older checkpoints beyond `keep` go."""
    loop.save_checkpoint(
        accelerator,
        directory,
        step,
        {"positions": positions},
        partial(write_weights, model, history, best_dir),
        optimizer,
        scheduler,
        keep,
    )


def write_weights(model: Any, history: dict[str, Any], best_dir: Path, folder: Path) -> None:
    """The main process's part of a checkpoint: trainable.safetensors, best.safetensors, history.json."""
    save_file(trainable_state(model), str(folder / "trainable.safetensors"))
    best = best_dir / "trainable.safetensors"
    if best.exists():  # the best step so far: a resumed run must not see a later (crashed) run's best
        try:
            os.link(best, folder / "best.safetensors")
        except OSError:  # no hard links on this file system
            shutil.copyfile(best, folder / "best.safetensors")
    (folder / "history.json").write_text(json.dumps(history))


def load_trainable(model: Any, path: Path, device: Any) -> None:
    """Copy saved trainable weights into `model`; every saved name must be a trainable weight of it."""
    state = load_file(str(path), device=str(device))
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - {n for n, p in parameters.items() if p.requires_grad})
    if unknown:
        raise WhistleError(
            f"{path} holds weights this run does not train ({', '.join(unknown[:3])}…): it was "
            "written with another finetune.train_embeddings; use a new output_dir"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def load_checkpoint(
    accelerator: Any, path: Path, model: Any, optimizer: Any, scheduler: Any, best_dir: Path
) -> dict[str, Any]:
    """Restore weights, the best weights so far, optimiser, scheduler and this rank's RNG;
    return {step, positions, history}."""
    state = loop.load_checkpoint(accelerator, path, optimizer, scheduler, "finetune")
    load_trainable(model, path / "trainable.safetensors", accelerator.device)
    state["history"] = json.loads((path / "history.json").read_text())
    if accelerator.is_main_process:
        shutil.rmtree(best_dir, ignore_errors=True)
        if (path / "best.safetensors").exists():
            best_dir.mkdir(parents=True)
            shutil.copyfile(path / "best.safetensors", best_dir / "trainable.safetensors")
    return state


def save_best(model: Any, directory: Path) -> None:
    """best/trainable.safetensors: the trainable weights of the best step so far.

    Written to a new file and renamed over the old one, so hard links to the previous best (kept in
    checkpoints) keep their content.
    """
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "trainable.safetensors.partial"
    save_file(trainable_state(model), str(partial))
    os.replace(partial, directory / "trainable.safetensors")


def save_adapted(model: Any, teacher: LoadedTeacher, output_dir: Path) -> None:
    """The complete Whisper (teacher encoder, adapted decoder) + the teacher's whole processor (feature
    extractor, tokenizer, normalizer.json) and generation config, loadable by
    transformers.pipeline("automatic-speech-recognition", model=output_dir); files readable by all."""
    model.save_pretrained(output_dir)  # config.json, model.safetensors, generation_config.json
    # the feature extractor and tokenizer on their own (not processor_config.json), which every transformers
    # version reads; then the teacher's own files over them, byte for byte (save_pretrained drops normalizer.json)
    teacher.features.save_pretrained(output_dir)  # preprocessor_config.json
    teacher.tokenizer.save_pretrained(output_dir)
    copy_processor(teacher.info.name_or_path, teacher.info.revision, output_dir)
    ordinary_modes(output_dir)


def write_card(output_dir: Path) -> None:
    """README.md, the model card: base model, method, data sizes, validation at the saved step (from
    finetune.json and config.toml, so it is written after them)."""
    (output_dir / CARD_FILE).write_text(model_card(output_dir), encoding="utf-8")
