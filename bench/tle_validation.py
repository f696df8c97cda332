"""TLE validation on held-out sentences: how close to the teacher, and can the frozen decoder read it?

For every utterance of an evaluation store (sentences the TLE never saw), with the real teacher:

  cosine, mse        TLE frames vs the teacher's, in the store's normalised space, at the true durations
                     (per-token durations from the teacher's alignment heads + DTW, as train-tle uses)
  length_error       |predicted - true| / true speech frames;  duration_mae: frames per token
  decoder_ce         the frozen decoder's cross-entropy per label token reading the TLE full window
                     (true / predicted lengths) — the baseline is the same on the real states
  wer                greedy round trip text -> TLE full window -> frozen decoder -> text, Whisper's
                     English normaliser, at true and predicted lengths; baseline: the real states
                     (speech frames + tail template, which is what the decoder gets from the store)

The baseline (real audio) is measured in the same run on the same utterances.

    python bench/tle_validation.py TLE_DIR --teacher tiny.en --store store-test --figure tle.png
    python bench/tle_validation.py TLE_DIR --teacher tiny.en --store store-test --text examples/target/test.txt

--text adds the text-only round trip of other sentences (no audio needed), e.g. the target domain's.
--voices MANIFEST (the `whistle synthesize` manifest of the store's clips) adds the real audio's decoder CE and
WER per voice: how hard each voice is for the decoder, the scale to read the TLE's own pair of figures on.

Prints a table and `name=value` lines; --json writes them to a file.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np
import torch


@click.command()
@click.argument("tle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--teacher", "teacher_path", required=True, help="The Whisper the store was made with.")
@click.option("--store", "store_url", required=True, help="Evaluation store (held-out sentences).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the figures here as JSON.")
@click.option("--figure", type=click.Path(dir_okay=False), help="PNG: real vs TLE states of one utterance.")
@click.option("--examples", default=5, show_default=True, help="Round-trip transcripts to print.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Evaluate these weights (a "
              "checkpoint's model.safetensors, e.g. the end of phase 1) with TLE_DIR's configuration.")
@click.option("--text", "text_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Also the text-only round trip (predicted lengths) of every line of this file, e.g. the "
              "target domain's sentences (repeatable; figure text_wer_<file stem>).")
@click.option("--text-lines", default=40, show_default=True, help="Lines of each --text file to use.")
@click.option("--voices", "voices_path", type=click.Path(exists=True, dir_okay=False),
              help="The synthesize manifest of the store's clips (id, voice): real CE and WER per voice.")
def main(tle_dir: str, teacher_path: str, store_url: str, batch_size: int, json_path: str | None,
         figure: str | None, examples: int, weights: str | None, text_files: tuple[str, ...], text_lines: int,
         voices_path: str | None) -> None:
    from stages.train_tle import Collate, DurationTable, align_shard, open_store, validate
    from whistle_pipeline.decoder import decoder_cross_entropy, greedy_transcribe, load_frozen_teacher
    from whistle_pipeline.metrics import corpus_wer
    from whistle_pipeline.text import IGNORE_INDEX
    from whistle_pipeline.tle import TLEModel

    started = time.time()
    device = torch.device("cpu")
    teacher = load_frozen_teacher(teacher_path, "main", device, torch.float32)
    reader = open_store(store_url, teacher, teacher_path, "main")
    tle = TLEModel.from_pretrained(tle_dir).eval()
    if weights is not None:
        from safetensors.torch import load_file

        tle.load_state_dict(load_file(weights))
    durations, rejects = {}, {}
    for shard in reader.shards():
        record = align_shard(reader, shard, teacher, batch_size)
        durations.update(record["durations"])
        rejects.update(record["rejects"])
    collate = Collate(teacher.tokenizer, teacher.specials, DurationTable(durations), list(tle.config.languages),
                      teacher.max_positions)
    utterances = [u for shard in reader.shards() for u in reader.iter_shard(shard) if u.id in durations]
    items = [{"id": u.id, "text": u.text, "language": u.language, "duration": u.duration,
              "states": torch.from_numpy(u.states), "n_frames": len(u.states), "speech_frames": u.speech_frames}
             for u in utterances]
    batches = [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    teacher.set_tail_template(tle.tail_template)  # align_shard set the evaluation store's
    metrics = validate(tle, teacher, batches, len(items), device)

    # the round trip at the TRUE lengths too, and transcripts to look at
    hypotheses, predicted_hypotheses, real_hypotheses, references = [], [], [], []
    real_ce, label_tokens = [], []  # per utterance: the decoder's CE per token on the real states, token count
    with torch.no_grad():
        for batch in batches:
            text, mask = batch.text, batch.text.tle_mask
            longest = 2 * int(mask.sum(1).max()) + 10
            speech, lengths = tle.speech_frames(text.tle_tokens, mask, batch.language_ids, durations=batch.durations)
            hypotheses += greedy_transcribe(teacher, tle.full_window(speech, lengths), text.languages, longest,
                                            speech.shape[1])
            speech, lengths = tle.speech_frames(text.tle_tokens, mask, batch.language_ids)
            predicted_hypotheses += greedy_transcribe(teacher, tle.full_window(speech, lengths), text.languages,
                                                      longest, speech.shape[1])
            real = tle.full_window(batch.states, batch.durations.sum(1))
            real_hypotheses += greedy_transcribe(teacher, real, text.languages, longest, batch.states.shape[1])
            real_ce += decoder_cross_entropy(teacher, real, text, batch.states.shape[1])[1].tolist()
            label_tokens += (text.labels != IGNORE_INDEX).sum(1).tolist()
            references += text.texts
    languages = [item["language"] for item in items]
    metrics["wer_true"] = corpus_wer(references, hypotheses, languages)
    metrics["utterances"] = len(items)
    metrics["alignment_rejects"] = len(rejects)
    metrics["seconds"] = time.time() - started
    text_examples = []
    for path in text_files:
        texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = texts[:text_lines]
        predicted = text_round_trip(tle, teacher, texts, batch_size)
        metrics[f"text_wer_{Path(path).stem}"] = corpus_wer(texts, predicted, ["en"] * len(texts))
        text_examples += list(zip(texts, predicted))[:examples]
    if voices_path:
        metrics["voices"] = per_voice(voices_path, [item["id"] for item in items], references, real_hypotheses,
                                      real_ce, label_tokens)
    if weights is not None:
        metrics["weights"] = weights
    summary_path = Path(tle_dir) / "summary.json"
    if summary_path.exists() and weights is None:
        summary = json.loads(summary_path.read_text())
        metrics.update(train_steps=summary["steps"], train_minutes=summary["wall_seconds"] / 60,
                       train_utterances=summary["train_utterances"])

    rows = [("cosine to teacher (normalised)", "cosine", None), ("masked MSE (normalised)", "mse", None),
            ("length error (predicted vs true)", "length_error", None), ("duration MAE (frames/token)", "duration_mae", None),
            ("decoder CE/token, true length", "decoder_ce", "real_decoder_ce"),
            ("decoder CE/token, predicted length", "decoder_ce_predicted", "real_decoder_ce"),
            ("round-trip WER, true length", "wer_true", "real_wer"),
            ("round-trip WER, predicted length", "wer_predicted", "real_wer")]
    click.echo(f"{len(items)} held-out utterances of {store_url}; TLE {tle_dir}")
    click.echo(f"{'':38s} {'TLE':>8s} {'real audio':>10s}")
    for label, name, baseline in rows:
        reference = f"{metrics[baseline]:10.4f}" if baseline else ""
        click.echo(f"{label:38s} {metrics[name]:8.4f} {reference}")
    for reference, hypothesis, predicted, real in list(zip(references, hypotheses, predicted_hypotheses,
                                                           real_hypotheses))[:examples]:
        click.echo(f"  ref:  {reference}\n  tle:  {hypothesis}\n  pred: {predicted}\n  real: {real}")
    for reference, predicted in text_examples:
        click.echo(f"  text: {reference}\n  pred: {predicted}")
    if "voices" in metrics:
        click.echo(f"real audio per voice (TLE: WER {metrics['wer_predicted']:.1%} at CE "
                   f"{metrics['decoder_ce_predicted']:.3f}, predicted lengths):")
        for voice, row in sorted(metrics["voices"].items(), key=lambda kv: kv[1]["wer"]):
            click.echo(f"  {voice:20s} {row['clips']:4d} clips  WER {row['wer']:6.1%}  CE/token {row['decoder_ce']:.3f}")
    for name, value in metrics.items():
        click.echo(f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}")
    if json_path:
        Path(json_path).write_text(json.dumps(metrics, indent=2))
    if figure:
        plot_example(tle, batches[0], figure)


def per_voice(manifest: str, ids: list[str], references: list[str], hypotheses: list[str], ce: list[float],
              tokens: list[int]) -> dict[str, dict[str, float]]:
    """{voice: {clips, wer, decoder_ce}} of the real audio, the voice (without its variant) from the manifest."""
    from whistle_pipeline.metrics import corpus_wer

    rows = [json.loads(line) for line in Path(manifest).read_text(encoding="utf-8").splitlines() if line.strip()]
    voice_of = {row["id"]: row["voice"].split("+")[0] for row in rows if "voice" in row}
    missing = [utt_id for utt_id in ids if utt_id not in voice_of]
    if missing:
        raise click.ClickException(f"--voices {manifest}: {len(missing)} of the store's {len(ids)} clips have no row "
                                   f"with a voice (first: {missing[0]!r}); pass the synthesize manifest the store "
                                   "was precomputed from")
    groups: dict[str, list[int]] = {}
    for i, utt_id in enumerate(ids):
        groups.setdefault(voice_of[utt_id], []).append(i)
    return {voice: {"clips": len(members),
                    "wer": corpus_wer([references[i] for i in members], [hypotheses[i] for i in members],
                                      ["en"] * len(members)),
                    "decoder_ce": sum(ce[i] * tokens[i] for i in members) / sum(tokens[i] for i in members)}
            for voice, members in groups.items()}


def text_round_trip(tle, teacher, texts: list[str], batch_size: int) -> list[str]:
    """Text only -> TLE full window at the predicted length -> frozen decoder, greedy (English)."""
    from whistle_pipeline.decoder import greedy_transcribe
    from whistle_pipeline.text import encode_texts

    hypotheses = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = encode_texts(teacher.tokenizer, teacher.specials, chunk, ["en"] * len(chunk), teacher.max_positions)
            speech, lengths = tle.speech_frames(batch.tle_tokens, batch.tle_mask, tle.language_ids(batch.languages))
            longest = 2 * int(batch.tle_mask.sum(1).max()) + 10
            hypotheses += greedy_transcribe(teacher, tle.full_window(speech, lengths), batch.languages, longest,
                                            speech.shape[1])
    return hypotheses


def plot_example(tle, batch, path: str) -> None:
    """Real states and TLE states (true and predicted lengths) of the first utterance, 64 channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text, mask = batch.text, batch.text.tle_mask
    n = int(batch.durations[0].sum())
    with torch.no_grad():
        true_len, _ = tle.speech_frames(text.tle_tokens[:1], mask[:1], batch.language_ids[:1],
                                        durations=batch.durations[:1])
        predicted, lengths = tle.speech_frames(text.tle_tokens[:1], mask[:1], batch.language_ids[:1])
    panels = [("teacher (real audio)", tle.normalise(batch.states[0, :n])),
              ("TLE, true durations", tle.normalise(true_len[0, :n])),
              (f"TLE, predicted length ({int(lengths[0])} frames)", tle.normalise(predicted[0, : int(lengths[0])]))]
    figure, axes = plt.subplots(3, 1, figsize=(10, 8))
    for axis, (title, states) in zip(axes, panels):
        axis.imshow(states[:, :64].T.numpy(), aspect="auto", origin="lower", vmin=-3, vmax=3, cmap="RdBu_r")
        axis.set_title(f"{title}: {text.texts[0]}", fontsize=9)
        axis.set_ylabel("channel")
        bounds = np.cumsum(batch.durations[0, : int(mask[0].sum())].numpy())
        for bound in bounds[:-1]:
            axis.axvline(bound - 0.5, color="k", lw=0.4)
    axes[-1].set_xlabel("encoder frame (20 ms); lines: token boundaries from the teacher alignment")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
