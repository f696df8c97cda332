"""stages/training.py: the trackers a run logs to, chosen by the loop's `log_with` setting; the lazy non-finite guard."""

from __future__ import annotations

import json

import pytest
import torch

from whistle_pipeline.config import ConfigError, load_config


def tracked_run(output_dir, *overrides: str) -> list:
    """Start a train-tle run in output_dir, log one metric, end it; the event files tensorboard wrote."""
    from stages.training import open_logs, start_run

    config = load_config(
        overrides=[f"train_tle.output_dir={json.dumps(str(output_dir))}", "teacher.device=cpu", *overrides]
    )
    setup = start_run(config, "train_tle", ["teacher"])
    open_logs(setup, (["step", "loss"], ["step"]), None, {"learning_rate": 3e-4, "steps": 10})
    setup.accelerator.log({"train/loss": 1.5}, step=1)
    setup.accelerator.end_training()
    return sorted((output_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_tensorboard_is_the_default_tracker(tmp_path):
    pytest.importorskip("tensorboard")
    assert load_config().train_tle.log_with == load_config().finetune.log_with == ["tensorboard"]
    events = tracked_run(tmp_path / "run")
    assert any(b"train/loss" in path.read_bytes() for path in events)  # the metric, beside the run's settings


def test_log_with_nothing_writes_no_event_files(tmp_path):
    assert tracked_run(tmp_path / "run", "train_tle.log_with=[]") == []
    assert (tmp_path / "run" / "train_log.csv").exists()  # the CSV logs are always written


def test_log_with_all_is_every_installed_tracker():
    from accelerate.tracking import get_available_trackers

    from stages.training import resolve_trackers

    assert resolve_trackers("all") == [tracker.value for tracker in get_available_trackers()]
    assert resolve_trackers(["tensorboard"]) == ["tensorboard"] and resolve_trackers([]) == []
    assert load_config(overrides=['finetune.log_with="all"']).finetune.log_with == "all"


def test_an_unknown_tracker_is_a_config_problem():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=['train_tle.log_with=["tensorbord"]', "finetune.log_with=3"])
    assert len(info.value.problems) == 2
    assert "train_tle.log_with: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)" in str(info.value)
    assert "finetune.log_with = 3 should be a list of a string or one of 'all'" in str(info.value)


def test_a_tracker_that_is_not_installed_names_its_extra():
    from accelerate.tracking import get_available_trackers

    if "wandb" in {tracker.value for tracker in get_available_trackers()}:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError) as info:
        load_config(overrides=['finetune.log_with=["tensorboard", "wandb"]'])
    assert info.value.problems == [
        (
            "finetune.log_with names 'wandb', which is not installed: pip install "
            "'whistle[wandb]', or leave it out of finetune.log_with"
        )
    ]


def test_float32_training_on_a_cpu_with_bf16_in_hardware_is_told_how_much_faster_bf16_is(tmp_path):
    from stages.training import start_run
    from whistle_pipeline.teacher import bf16_hint, cpu_has_native_bf16

    base = [f"train_tle.output_dir={json.dumps(str(tmp_path / 'run'))}", "teacher.device=cpu", "train_tle.log_with=[]"]
    hint = start_run(load_config(overrides=base), "train_tle", ["teacher"]).precision_hint()
    if cpu_has_native_bf16():
        assert hint == (
            "this CPU computes bfloat16 in hardware: --set train_tle.mixed_precision=bf16 would run about "
            "1.5-1.7x faster (bench/RESULTS.md; the demo does)"
        )
    else:
        assert hint == ""
    bf16 = load_config(overrides=[*base, "train_tle.mixed_precision=bf16", "train_tle.resume=false"])
    assert start_run(bf16, "train_tle", ["teacher"]).precision_hint() == ""
    assert bf16_hint("cuda", "float32", "--dtype bfloat16") == bf16_hint("cpu", "bfloat16", "--dtype bfloat16") == ""


def test_finite_guard_names_the_first_non_finite_step_when_checked():
    """Steps are tested on the device and read back at check(): the first bad step is named with its terms and
    gradient norm, whatever the steps after it held; a change of terms (phase 2) settles the old ones first."""
    from stages.training import FiniteGuard, NonFiniteStep

    guard = FiniteGuard(torch.device("cpu"))
    guard.check()  # nothing added yet
    for step in (1, 2):
        guard.add(step, {"loss": torch.tensor(1.0), "mse": torch.tensor(0.5)})
    guard.add(2, {"loss": torch.tensor(1.0), "mse": torch.tensor(0.5)}, grad_norm=torch.tensor(3.0))
    guard.check()
    guard.add(3, {"loss": torch.tensor(2.0), "mse": torch.tensor(0.25)}, grad_norm=torch.tensor(float("inf")))
    guard.add(4, {"loss": torch.tensor(float("nan")), "mse": torch.tensor(float("nan"))})
    with pytest.raises(
        NonFiniteStep, match=r"^step 3: non-finite gradient norm \(loss 2, mse 0.25, gradient norm inf\)"
    ):
        guard.check()
    phased = FiniteGuard(torch.device("cpu"))
    phased.add(1, {"loss": torch.tensor(float("nan"))})
    with pytest.raises(NonFiniteStep, match=r"^step 1: non-finite loss \(loss nan\); the run stopped"):
        phased.add(2, {"loss": torch.tensor(1.0), "decoder_ce": torch.tensor(2.0)})
