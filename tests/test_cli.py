"""The `whistle` command line as a user meets it: help, exit codes, error messages."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from whistle_pipeline.cli import cli

COMMANDS = {"precompute", "train-tle", "finetune", "evaluate", "inspect-store", "validate-tle", "import-ct2", "export-ct2", "synthesize",
            "demo"}


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    assert set(cli.commands) == COMMANDS
    for name in COMMANDS:
        assert f"whistle {name}" in result.output


def test_every_command_has_help_with_examples():
    runner = CliRunner()
    for name in sorted(COMMANDS):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Examples:" in result.output, name
        assert f"whistle {name}" in result.output or "accelerate launch" in result.output, name


def test_help_does_not_import_torch():
    """`whistle --help` must be instant: no torch, transformers or zarr on the import path."""
    code = (
        "import sys\n"
        "from whistle_pipeline.cli import main\n"
        "sys.argv = ['whistle', '--help']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'zarr', 'datasets', 'accelerate') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_python_dash_m_runs_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "whistle_pipeline", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "whistle inspect-store" in out.stdout


def test_user_error_is_one_paragraph_and_exit_1(tmp_path):
    missing = tmp_path / "no-such-store"
    result = CliRunner().invoke(cli, ["inspect-store", str(missing)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert str(missing) in result.output
    assert result.output.startswith("Error: ")


def test_debug_shows_the_exception(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "inspect-store", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert result.exception is not None and type(result.exception).__name__ == "StoreError"


def test_config_errors_are_listed_by_the_cli(tmp_path):
    result = CliRunner().invoke(cli, ["precompute", "--set", "store.frame=full", "--set", "precompute.batch_size=0"])
    assert result.exit_code == 1
    assert "unknown key store.frame (did you mean 'frames'?)" in result.output
    assert "precompute.batch_size = 0 is below its minimum 1" in result.output
