"""The `whistle` command line: one click group, one command per stage or tool.

Commands hold no logic: they load `pipeline.toml` (+ `--config`, flags, `--set`), call the stage's
`run(config)` and print its result. Heavy imports (torch, transformers) happen inside the commands
so that `whistle --help` is instant. A failed command raises; `main` turns user errors into a
one-paragraph message and a non-zero exit (`--debug` shows the traceback).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import click

from whistle_pipeline.errors import WhistleError

log = logging.getLogger("whistle")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from store.format import StoreError

    return (WhistleError, StoreError)


def config_options(command: Callable) -> Callable:
    """Add --config and --set to a command; the command receives `config_path` and `overrides`."""

    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="A TOML file overriding pipeline.toml (any subset of its keys).")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override one key, e.g. --set store.frames=full (repeatable).")
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return command(*args, **kwargs)

    return wrapper


def _load(config_path: str | None, overrides: tuple[str, ...], updates: dict[str, dict[str, Any]]):
    from whistle_pipeline.config import load_config

    return load_config(config_path, overrides=overrides, updates=updates)


class WhistleGroup(click.Group):
    """Turns exceptions from commands into a one-paragraph message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:
            if ctx.params.get("debug"):
                raise
            if isinstance(err, _user_error_types()):
                raise click.ClickException(str(err)) from err
            raise click.ClickException(
                f"{type(err).__name__}: {err}\n(an unexpected error: run again with --debug for the "
                "traceback, and please report it)"
            ) from err


@click.group(cls=WhistleGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="whistle", prog_name="whistle")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """whistle — text-only domain adaptation of Whisper (WhisTLE).

    \b
    Pipeline:
      whistle precompute     audio -> frozen Whisper encoder -> Zarr feature store
      whistle train-tle      store -> text-to-latent encoder (TLE)
      whistle finetune       TLE + target-domain text (+ stored audio) -> adapted Whisper
      whistle evaluate       WER/CER of models side by side
    Tools:
      whistle inspect-store  what a store holds, how big, whether it is whole
      whistle import-ct2     CTranslate2 (faster-whisper) model -> transformers checkpoint
      whistle synthesize     text -> speech with eSpeak NG (an audio folder + manifest)
      whistle demo           the whole method on the bundled example, offline

    Every command reads pipeline.toml defaults; see `whistle COMMAND --help`.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


@cli.command("inspect-store")
@click.argument("store_path", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--check", is_flag=True, help="Read every complete shard and verify it; exit 1 on any fault.")
@click.option("--plot", "plot_id", metavar="UTT_ID", default=None, help="Draw this utterance's states as a heatmap.")
@click.option("--out", "plot_out", type=click.Path(dir_okay=False), default=None, help="PNG file for --plot.")
def inspect_store_command(store_path: str, as_json: bool, check: bool, plot_id: str | None, plot_out: str | None) -> None:
    """What a feature store holds, how big it is, and whether it is whole.

    \b
    Examples:
      whistle inspect-store whistle-store
      whistle inspect-store s3://bucket/cv-de-large-v3 --json
      whistle inspect-store whistle-store --check
      whistle inspect-store whistle-store --plot common_voice_de_123 --out utt.png
    """
    import json

    from store.inspect import inspect_store

    if plot_id is not None and plot_out is None:
        raise click.UsageError("--plot needs --out FILE.png")
    report = inspect_store(store_path, check=check)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())
    if plot_id is not None:
        from whistle_pipeline.plots import plot_utterance

        click.echo(f"wrote {plot_utterance(store_path, plot_id, plot_out)}")
    if check and not report.ok:
        raise WhistleError(
            f"store {store_path} failed the check: {len(report.faults)} fault(s) in shard(s) "
            f"{', '.join(sorted({f.shard for f in report.faults}))}. Re-run `whistle precompute` on the same "
            "store after deleting those shard folders (they will be recomputed), or skip them when training."
        )


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="whistle")


if __name__ == "__main__":
    main()
