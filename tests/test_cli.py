"""The `whistle` command line as a user meets it: help, exit codes, error messages."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from whistle_pipeline.cli import cli

COMMANDS = {
    "precompute",
    "train-tle",
    "finetune",
    "evaluate",
    "inspect-store",
    "validate-tle",
    "import-ct2",
    "export-ct2",
    "synthesize",
    "config",
    "demo",
}


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


def test_config_writes_a_stage_defaults_that_load_back_unchanged(tmp_path):
    from whistle_pipeline.config import load_config

    out = tmp_path / "my.toml"
    result = CliRunner().invoke(cli, ["config", "train-tle", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    text = out.read_text()
    assert [line for line in text.splitlines() if line.startswith("[")] == [
        "[teacher]",
        "[store]",
        "[tle]",
        "[train_tle]",
    ]
    assert "# Optimiser steps in total.\nsteps = 20000" in text  # the comments come along
    assert load_config(out) == load_config()


def test_config_prints_every_stage_and_everything(tmp_path):
    from whistle_pipeline.cli_tools import CONFIG_STAGES
    from whistle_pipeline.config import SECTIONS, load_config
    from whistle_pipeline.defaults import STAGE_SECTIONS

    assert CONFIG_STAGES == tuple(STAGE_SECTIONS)
    runner = CliRunner()
    for stage in (*CONFIG_STAGES, None):
        result = runner.invoke(cli, ["config", *([stage] if stage else [])])
        assert result.exit_code == 0, (stage, result.output)
        headers = [line[1:-1] for line in result.output.splitlines() if line.startswith("[")]
        assert headers == list(STAGE_SECTIONS[stage] if stage else SECTIONS), stage
        path = tmp_path / f"{stage}.toml"
        path.write_text(result.output)
        assert load_config(path) == load_config(), stage


def test_config_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "my.toml"
    out.write_text("# mine\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "finetune", "--output", str(out)])
    assert result.exit_code == 1
    assert "exists" in result.output and "--force" in result.output
    assert out.read_text() == "# mine\n"
    result = runner.invoke(cli, ["config", "finetune", "--output", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert "[finetune]" in out.read_text()
    assert runner.invoke(cli, ["config", "train_tle"]).exit_code == 2  # the command's name, not the section's


def test_the_cli_sets_a_passive_omp_wait_policy_unless_one_is_set():
    code = (
        "import os, sys\n"
        "from whistle_pipeline.cli import main\n"
        "sys.argv = ['whistle', '--debug', 'config', 'validate-tle']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('POLICY', os.environ['OMP_WAIT_POLICY'])\n"
    )
    unset = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=unset)
    assert "POLICY PASSIVE" in out.stdout and "OMP_WAIT_POLICY was not set" in out.stderr
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**unset, "OMP_WAIT_POLICY": "ACTIVE"},
    )
    assert "POLICY ACTIVE" in out.stdout and "OMP_WAIT_POLICY" not in out.stderr


def test_the_demo_time_is_the_same_in_its_help_the_readme_and_the_results():
    """The demo's wall time is written once, in RESULTS; its help and the README's set-up point there."""
    root = Path(__file__).resolve().parents[1]
    help_text = " ".join(CliRunner().invoke(cli, ["demo", "--help"]).output.split())
    assert 'about 45 minutes on 2 CPU cores; the measured wall time and every figure: bench/RESULTS.md, "demo"' in (
        help_text
    )
    readme = (root / "README.md").read_text()
    set_up = readme[readme.index("## Set-up") : readme.index("## Status")]
    assert "sized for about 45 minutes on 2 CPU cores" in set_up and "(bench/RESULTS.md#demo)" in set_up
    results = (root / "bench" / "RESULTS.md").read_text()
    demo = results[results.index("## demo") : results.index("## TLE validation")]
    assert demo.count("**Wall time") == 1 and "five arms × 2 seeds" in demo


def test_the_readme_set_up_is_two_commands_that_install_and_run():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    set_up = readme[readme.index("## Set-up") : readme.index("## Status")]
    commands = [block.split("```", 1)[0].strip() for block in set_up.split("```bash\n")[1:]]
    assert len(commands) == 2 and all("\n" not in command for command in commands), commands
    assert "pip install -e '.[demo]' && whistle demo --workdir demo-run" in commands[0]
    assert commands[1] == "pip install -e '.[test]' && python -m pytest -q"
    assert "git clone" in set_up  # where the code comes from
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(root / "setup.cfg")
    extras = setup_cfg["options.extras_require"]
    assert "tensorboard" in extras["demo"]  # the demo writes event files (train_tle.log_with's default)
    assert "wandb" in extras["wandb"] and "trackio" in extras["trackio"]
