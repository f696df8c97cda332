"""Each bench/ script runs end to end in its --quick mode (figures are not checked: never a timed test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> dict[str, str]:
    """Run `bench/<script> --quick ...`; returns its name=value lines."""
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and " " not in line)


def test_store_io_quick():
    values = run_bench("store_io.py")
    for codec in ("none", "blosc_lz4", "blosc_zstd"):
        assert float(values[f"write_mb_s_{codec}"]) > 0 and float(values[f"read_mb_s_{codec}"]) > 0
    assert float(values["compression_blosc_zstd"]) > float(values["compression_none"])


def test_precompute_quick():
    values = run_bench("precompute.py")
    assert values["size"] == "tiny" and int(values["clips"]) == 2
    stage, encoder = float(values["stage_clips_per_s"]), float(values["encoder_clips_per_s"])
    assert stage > 0 and encoder > 0 and abs(float(values["ratio"]) - stage / encoder) < 0.01
    # tiny's encoder FLOPs per window, from its config: convs 2*80*384*3*3000 + 2*384^2*3*1500, 4 layers
    assert abs(float(values["encoder_gflop_per_window"]) - 36.9377) < 1e-3
    assert 0 < float(values["profile_cpu_ratio"]) < 1 and float(values["matmul_peak_tflops"]) > 0


def test_store_compare_quick():
    values = run_bench("store_compare.py")
    # every format stored the same 16 utterances; full windows are 1500 x 1280 float16 = 3.84 MB each
    assert 3.84e6 <= float(values["npy_full_bytes_per_utt"]) < 3.9e6
    assert float(values["whistle_speech_bytes_per_utt"]) < float(values["whistle_full_bytes_per_utt"])
    assert float(values["size_ratio_5s"]) > 1 and float(values["write_vs_gpu_precompute"]) > 0
    assert values["fastest_alternative_warm"] in {
        "npy-speech",
        "npy-full",
        "arrow-speech",
        "arrow-full",
        "tar-speech",
        "tar-full",
    }


def test_train_input_quick():
    values = run_bench("train_input.py")
    assert float(values["loader_frames_per_s_0_workers"]) > 0 and float(values["step_frames_per_s"]) > 0
    assert float(values["tle_step_tflop"]) > 0 and float(values["peak_rss_ratio_10x_vs_1x"]) > 0


def test_seed_vs_store_quick():
    values = run_bench("seed_vs_store.py")
    seed, store, precompute = (float(values[f"tiny_{k}"]) for k in ("seed_epoch_s", "store_epoch_s", "precompute_s"))
    assert abs(float(values["tiny_speedup_3_epochs"]) - 3 * seed / (precompute + 3 * store)) < 0.01


def test_finetune_step_quick():
    values = run_bench("finetune_step.py")
    assert float(values["tiny_stored_vs_stored"]) == 1.0
    assert float(values["tiny_text_step_s"]) > 0 and float(values["tiny_encoder_step_s"]) > 0
    assert float(values["tiny_shared_tail_max_logit_difference"]) < 1e-4  # the proposal changes no output


def test_memory_quick():
    values = run_bench("memory.py")
    assert float(values["writer_peak_mb_shard8_queue1"]) > 0 and float(values["stage_peak_mb_shard2"]) > 0


@pytest.mark.espeak
@pytest.mark.real_weights
def test_pronunciation_quick():
    values = run_bench("pronunciation.py")
    # the first 200 lexicon sentences: their words, each counted once at its first token
    assert (int(values["sentences"]), int(values["words"]), int(values["distinct_words"])) == (200, 1790, 1675)
    assert float(values["cold_seconds"]) > 0 and float(values["cached_phonemes_per_s"]) > 0


def test_resume_quick():
    values = run_bench("resume.py")  # the script itself checks that seeking gives the replayed batch
    assert float(values["replay_s_10x"]) > 0 and float(values["seek_s_10x"]) > 0


def test_claiming_quick():
    values = run_bench("claiming.py")  # the script itself checks that every shard was written once
    for name in ("static", "dynamic"):
        assert float(values[f"wall_s_{name}"]) > 0 and 0 <= float(values[f"tail_idle_pct_{name}"]) < 100


def test_alignment_quick():
    values = run_bench("alignment.py")
    # the alignment as first written and now give the same durations
    assert values["same_durations"] == values["utterances"] and int(values["utterances"]) > 0
    assert float(values["first_utt_per_s"]) > 0 and float(values["now_utt_per_s"]) > 0


def test_tle_step_quick():
    values = run_bench("tle_step.py")
    for phase in (1, 2):
        assert float(values[f"phase{phase}_now_steps_per_s"]) > 0
        assert float(values[f"phase{phase}_now_syncs_per_step"]) == 0  # train-tle's step reads nothing back


def test_gpu_quick_runs_every_stage_on_the_cpu():
    values = run_bench("gpu.py")
    assert values["device"] == "cpu" and values["size"] == "tiny"
    for stage in ("encoder", "precompute", "alignment", "tle_phase1", "tle_phase2", "finetune"):
        assert float(values[f"{stage}_per_s"]) > 0 and float(values[f"{stage}_tflop"]) > 0, stage
        assert values[f"{stage}_mfu"] == "nan" and float(values[f"{stage}_mfu_measured"]) > 0, stage
    assert float(values["tle_phase2_syncs"]) == 0 and float(values["loader_vs_step"]) > 0
