"""Each bench/ script runs end to end in its --quick mode (figures are not checked: never a timed test)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> dict[str, str]:
    """Run `bench/<script> --quick ...`; returns its name=value lines."""
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and " " not in line)


def test_store_io_quick():
    values = run_bench("store_io.py")
    for codec in ("none", "blosc_lz4", "blosc_zstd"):
        assert float(values[f"write_mb_s_{codec}"]) > 0 and float(values[f"read_mb_s_{codec}"]) > 0
    assert float(values["compression_blosc_zstd"]) > float(values["compression_none"])


def test_precompute_quick():
    values = run_bench("precompute.py")
    assert values["size"] == "tiny" and int(values["clips"]) == 4
    stage, encoder = float(values["stage_clips_per_s"]), float(values["encoder_clips_per_s"])
    assert stage > 0 and encoder > 0 and abs(float(values["ratio"]) - stage / encoder) < 0.01
