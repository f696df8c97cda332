"""What train-tle and finetune share around their (separate, written-out) loops (not a stage: no `run`).

    accelerator    make_accelerator: CPU ranks under torchrun, mixed precision resolved, the trackers of log_with
    optimiser      build_optimizer: AdamW (no decay on biases, norms, embeddings), warmup then cosine decay
    checkpoints    save_checkpoint / latest_checkpoint / load_checkpoint: COMPLETE written last; weights,
                   optimiser state, RNG states as safetensors; optimiser settings, scheduler and per-rank
                   data positions as JSON. Nothing in a checkpoint is a pickle, so resuming runs no code.
    logs           CsvLog: rows appended; on resume, the rows after the resumed step are dropped
    resume         check_resumable: a run continues only with the settings it was started with
    data, stores   stages/training_data.py: endless_epochs, open_store (complete shards of this teacher's
                   geometry), held_out_items, and damaged_shards for skip_damaged (the data shrank: the stages
                   say by how much)

A checkpoint folder:

    checkpoints/step-NNNNNNN/  state-rankR.json       {step, <the stage's data position>, rng (python, numpy)}
                               rng-rankR.safetensors  torch (+ cuda) generator states of rank R
                               <the stage's weights>  written by the stage's callback (safetensors)
                               optimizer.safetensors  AdamW state tensors, named "<parameter index>.<key>"
                               optimizer.json         its param_groups (and any non-tensor state)
                               scheduler.json
                               COMPLETE               {step, processes}: written last; a folder without it is
                                                      ignored (a crash while saving)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.tracking import get_available_trackers
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file, save_file

from whistle_pipeline.config import ConfigError, PipelineConfig, load_config
from whistle_pipeline.errors import WhistleError
from whistle_pipeline.teacher import bf16_hint

log = logging.getLogger(__name__)

FINAL_LR_FRACTION = 0.1  # the cosine schedule decays to this fraction of the peak
CHECKPOINT_PREFIX = "step-"
COMPLETE = "COMPLETE"
SAVED_CONFIG = "config.toml"  # the resolved configuration a run saves beside its outputs
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG = "train_log.csv"
TRACKER_DIR = "tensorboard"  # the trackers that write files (tensorboard) write them here
TRACKER_PROJECT = "whistle"  # the project the trackers file a run under (W&B, trackio, ...)
VALIDATION_LOG = "validation.csv"
# Loop settings that may change between a run and its resumption (how often it logs, validates and saves, how
# it reads): any other change makes another run, which the checkpoints cannot continue.
RESUMABLE_KEYS = frozenset(
    {
        "progress",
        "log_every",
        "log_with",
        "val_every",
        "checkpoint_every",
        "keep_checkpoints",
        "num_workers",
        "resume",
        "skip_damaged",
    }
)
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_SETTINGS = "optimizer.json"


# --- accelerator ---------------------------------------------------------------------------------------


def resolve_mixed_precision(setting: str, on_cpu: bool) -> str:
    """mixed_precision -> accelerate's: "auto" is bf16 on GPUs that have it, fp16 on older ones, no on CPU."""
    if setting != "auto":
        return setting
    if on_cpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_trackers(log_with: Sequence[str] | str) -> list[str]:
    """The `log_with` setting -> accelerate tracker names: "all" is every installed tracker."""
    if log_with == "all":
        return [tracker.value for tracker in get_available_trackers()]
    return list(log_with)


def make_accelerator(
    teacher_device: str, mixed_precision: str, grad_accum: int, output_dir: Path, log_with: Sequence[str] | str = ()
) -> tuple[Any, list[str]]:
    """(Accelerator, trackers): one per run, logging to the trackers `log_with` names (the loop's setting,
    checked by the config loader); tensorboard writes under output_dir/tensorboard/."""
    trackers = resolve_trackers(log_with)
    # without cpu=True, accelerate treats a torchrun / accelerate launch without GPUs as one process
    on_cpu = teacher_device == "cpu" or not torch.cuda.is_available()
    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision
    # (train-tle in bf16, then finetune in fp32, in one process: the demo, a notebook). Each run is a fresh
    # start, so drop that state; the distributed part (process group, device) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / TRACKER_DIR))
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=resolve_mixed_precision(mixed_precision, on_cpu),
        gradient_accumulation_steps=grad_accum,
        log_with=trackers or None,
        project_config=project,
    )
    log.info("metrics go to the CSV logs%s", f" and {', '.join(trackers)}" if trackers else " only (log_with = [])")
    return accelerator, trackers


# --- optimiser -----------------------------------------------------------------------------------------


def build_optimizer(
    model: torch.nn.Module, settings: Any
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable weights (no weight decay on biases, norms and embeddings) with linear warmup
    over settings.warmup_steps, then cosine decay to FINAL_LR_FRACTION of the peak at settings.steps.

    The fused AdamW (one kernel over all weights) where torch has it for the weights' device and dtypes (CUDA
    and CPU): torch's default steps weight by weight, which at finetune's sizes costs as much as the decoder
    (bench/RESULTS.md, finetune_step)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 and "embed" not in name else no_decay).append(parameter)

    def groups() -> list[dict[str, Any]]:  # new dicts each time: an optimiser writes its defaults into them
        return [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    try:
        optimizer = torch.optim.AdamW(groups(), lr=settings.learning_rate, fused=True)
    except RuntimeError as err:  # a device or dtype without the fused kernel
        log.info("fused AdamW is not available here (%s): using torch's default AdamW", err)
        optimizer = torch.optim.AdamW(groups(), lr=settings.learning_rate)
    warmup, total = settings.warmup_steps, settings.steps

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


class NonFiniteStep(WhistleError):
    """A training step whose loss or gradient norm is inf/nan: the run stops at its next check (FiniteGuard)
    and saves nothing after it."""


def non_finite_step(step: int, losses: dict[str, float], grad_norm: float | None, stopped: str) -> NonFiniteStep | None:
    """The NonFiniteStep error of optimiser step `step` when a loss term (or its gradient norm) is inf/nan, else
    None; `stopped` says what the run did about it."""
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append("gradient norm")
    if not bad:
        return None
    terms = ", ".join(f"{name} {value:.4g}" for name, value in losses.items())
    norm = "" if grad_norm is None else f", gradient norm {grad_norm:.4g}"
    return NonFiniteStep(
        f"step {step}: non-finite {', '.join(bad)} ({terms}{norm}); {stopped} (the last checkpoint holds the last "
        "good weights). Likely causes: a learning rate too high "
        '(lower learning_rate, or raise warmup_steps), a mixed-precision overflow (set mixed_precision = "no"), or '
        "a damaged input (`whistle inspect-store --check` on the stores). Fix it and run again (changed settings "
        "start over: --no-resume)."
    )


class FiniteGuard:
    """The non-finite test of every step (train-tle and finetune), without a read-back per step: each
    micro-batch's loss terms (and, at an optimiser step, the gradient norm) are tested on their device, and the
    first non-finite step's number and values are kept there. `check()` reads them back once and raises
    NonFiniteStep naming that step. The loop calls it before it logs, validates or saves anything, so nothing
    non-finite is logged or saved; the steps after the bad one run until then (their weights are never saved).
    A read per step would make the host wait for the device every step."""

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)  # -1: every step finite so far
        self.names: list[str] = []  # the loss terms `values` holds, in order
        self.values: torch.Tensor | None = None  # (terms + 2,) the first bad step's terms, gradient norm, has-norm

    def add(self, step: int, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor | None = None) -> None:
        """Test optimiser step `step`'s loss terms (() tensors) and gradient norm (None: not at hand)."""
        if list(losses) != self.names:  # train-tle's change once, when phase 2 starts: settle the old ones
            self.check()
            self.names, self.values = list(losses), None
        norm = torch.zeros((), device=self.first_step.device) if grad_norm is None else grad_norm.detach().float()
        has_norm = torch.ones_like(norm) if grad_norm is not None else torch.zeros_like(norm)
        values = torch.stack([value.detach().float() for value in losses.values()] + [norm, has_norm])  # (terms + 2,)
        first = (self.first_step < 0) & ~torch.isfinite(values).all()  # () this is the first bad step
        self.values = values if self.values is None else torch.where(first, values, self.values)
        self.first_step = torch.where(first, step, self.first_step)

    def check(self) -> None:
        """Raise NonFiniteStep if a step since the run started was non-finite (one read-back)."""
        if self.values is None or int(self.first_step) < 0:
            return
        *terms, norm, has_norm = self.values.tolist()
        error = non_finite_step(
            int(self.first_step),
            dict(zip(self.names, terms)),
            norm if has_norm else None,
            "the run stopped at its next check and saved nothing after it",
        )
        if error is not None:
            raise error


# --- checkpoints ---------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy RNG states, torch RNG states as tensors)."""
    version, state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    json_state = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return json_state, tensors


def set_rng_state(json_state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state() captured."""
    version, state, gauss = json_state["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, position, has_gauss, cached = json_state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    accelerator: Any,
    directory: Path,
    step: int,
    rank_state: dict[str, Any],
    write_weights: Callable[[Path], None],
    optimizer: Any,
    scheduler: Any,
    keep: int,
) -> None:
    """Write directory/step-N/ (COMPLETE last, after every rank's state) and keep only the newest `keep`.

    Every rank writes its `rank_state` (its data position; JSON-able) and RNG states; the main process then
    calls write_weights(folder) and writes the optimiser and scheduler.
    """
    path = directory / f"{CHECKPOINT_PREFIX}{step:07d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    json_state, tensors = rng_state()
    (path / f"state-rank{rank}.json").write_text(json.dumps({"step": step, **rank_state, "rng": json_state}))
    save_file(tensors, str(path / f"rng-rank{rank}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_weights(path)
        save_optimizer(optimizer, path)
        (path / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (path / COMPLETE).write_text(json.dumps({"step": step, "processes": accelerator.num_processes}))
        for old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def complete_checkpoints(directory: Path) -> list[Path]:
    """The checkpoint folders whose COMPLETE marker exists, oldest first."""
    return sorted(p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE).exists())


def latest_checkpoint(directory: Path) -> Path | None:
    complete = complete_checkpoints(directory)
    return complete[-1] if complete else None


def load_checkpoint(accelerator: Any, path: Path, optimizer: Any, scheduler: Any, section: str) -> dict[str, Any]:
    """Restore the optimiser, the scheduler and this rank's RNG from `path`; return this rank's state
    ({step, <data position>}). The stage restores its weights itself. `section` names the config table
    whose `resume` key the error suggests."""
    processes = json.loads((path / COMPLETE).read_text())["processes"]
    if processes != accelerator.num_processes:
        raise WhistleError(
            f"checkpoint {path} was written by {processes} processes, this run has "
            f"{accelerator.num_processes}: resume with the same number, or set {section}.resume=false"
        )
    load_optimizer(optimizer, path)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = accelerator.process_index
    state = json.loads((path / f"state-rank{rank}.json").read_text())
    set_rng_state(state.pop("rng"), load_file(str(path / f"rng-rank{rank}.safetensors")))
    return state


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """optimizer.safetensors (state tensors) + optimizer.json (param_groups, non-tensor state)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_SETTINGS).write_text(json.dumps({"param_groups": state["param_groups"], "state": plain}))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what save_optimizer wrote (load_state_dict moves each tensor to its parameter's device)."""
    settings = json.loads((folder / OPTIMIZER_SETTINGS).read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in settings["state"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": settings["param_groups"]})


# --- resume ------------------------------------------------------------------------------------------


def check_resumable(output_dir: Path, config: PipelineConfig, section: str, compared: Sequence[str]) -> None:
    """Refuse to continue the run in output_dir when a setting it depends on changed.

    `compared` names whole sections ("teacher") or single keys ("store.path"); in `section` (the
    stage's own table) the RESUMABLE_KEYS may change. Each change is named with its old and new value.
    """
    saved_path = output_dir / SAVED_CONFIG
    if not saved_path.exists():
        return
    fix = f"Use a new {section}.output_dir, or set {section}.resume=false (--no-resume) to start over in this one."
    try:
        saved = load_config(saved_path)
    except ConfigError as err:
        raise WhistleError(
            f"{output_dir} holds checkpoints of a run whose settings ({saved_path}) this version "
            f"cannot read:\n{err}\n{fix}"
        ) from err
    changes = []
    for name in compared:
        table, _, only = name.partition(".")
        for key, value in asdict(getattr(config, table)).items():
            old = getattr(getattr(saved, table), key)
            if (not only or key == only) and not (table == section and key in RESUMABLE_KEYS) and old != value:
                changes.append(f"{table}.{key}: {old!r} (checkpoint) vs {value!r} (now)")
    if changes:
        raise WhistleError(
            f"{output_dir} holds checkpoints of a run with other settings:\n  - " + "\n  - ".join(changes) + f"\n{fix}"
        )


# --- a run's start ------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Where a training run writes and who runs it; `section` is the stage's table ("train_tle", "finetune")."""

    config: PipelineConfig
    section: str
    output_dir: Path
    accelerator: Any  # accelerate.Accelerator
    trackers: list[str]

    @property
    def settings(self) -> Any:
        return getattr(self.config, self.section)

    def precision_hint(self) -> str:
        """teacher.bf16_hint for this run: float32 steps on a CPU that computes bfloat16 in hardware."""
        precision = self.accelerator.mixed_precision
        return bf16_hint(
            self.accelerator.device.type,
            "float32" if precision == "no" else precision,
            f"--set {self.section}.mixed_precision=bf16",
        )


def start_run(config: PipelineConfig, section: str, compared: Sequence[str]) -> Setup:
    """Refuse a resume whose `compared` settings changed (check_resumable), make the one Accelerator, and
    save the resolved configuration beside the outputs."""
    settings = getattr(config, section)
    output_dir = Path(settings.output_dir)
    if settings.resume and latest_checkpoint(output_dir / CHECKPOINTS_DIR) is not None:
        check_resumable(output_dir, config, section, compared)
    accelerator, trackers = make_accelerator(
        config.teacher.device, settings.mixed_precision, settings.grad_accum, output_dir, settings.log_with
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir, SAVED_CONFIG)
        log.info("resolved configuration saved to %s", output_dir / SAVED_CONFIG)
    return Setup(config, section, output_dir, accelerator, trackers)


# --- logs ----------------------------------------------------------------------------------------------


@dataclass
class Logs:
    """The main process's CSV logs (None on the other ranks)."""

    train: CsvLog | None = None
    validation: CsvLog | None = None


def open_logs(
    setup: Setup, columns: tuple[list[str], list[str]], resume_step: int | None, tracked: dict[str, Any]
) -> Logs:
    """train_log.csv and validation.csv with these `columns` (on resume, cut back to `resume_step`), and the
    trackers with the `tracked` settings (their plain values), on the main process. A run is named after its
    output folder."""
    if not setup.accelerator.is_main_process:
        return Logs()
    logs = Logs(
        CsvLog(setup.output_dir / TRAIN_LOG, columns[0], resume_step),
        CsvLog(setup.output_dir / VALIDATION_LOG, columns[1], resume_step),
    )
    if setup.trackers:
        run_name = {"name": setup.output_dir.resolve().name}
        setup.accelerator.init_trackers(
            TRACKER_PROJECT,
            config={k: v for k, v in tracked.items() if isinstance(v, (int, float, str, bool))},
            init_kwargs={"wandb": run_name, "trackio": run_name},
        )
    return logs


class CsvLog:
    """Rows appended to a CSV file; on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None):
        self.path, self.columns = path, columns
        rows = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow({k: row.get(k, "") for k in self.columns})
