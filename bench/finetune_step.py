"""Finetune step cost: a text step (through the frozen TLE) vs an audio step that runs the encoder vs an
audio step from stored states, same Whisper, same batch size, same decoder update.

Every kind ends in the same decoder update — stages/finetune.py's loop body: full windows as
encoder_outputs, teacher-forced decoder, token cross-entropy, backward, gradient clipping, AdamW over the
decoder's layers (select_trainable) — and differs in where the full windows come from:

  stored   finetune's StoreStream (FeatureDataset, 1 worker) -> Windows.build: speech frames + the
           store's tail template (what whistle's audio steps do: the baseline)
  text     target sentences -> the frozen TLE (pipeline.toml's [tle] size, a latent drawn from p(z|text))
           -> speech frames at predicted lengths + tail template (Windows.build, as whistle's text steps)
  encoder  MP3 clips decoded by precompute's ClipDataset (1 worker) -> log-mel + the encoder on 30 s
           windows -> full windows (what fine-tuning on audio costs without a store)
  stored, tail shared   as stored, with the decoder's cross-attention key/value projections of the
           tail template made once per batch instead of once per example (whistle_pipeline.windows.SharedTail,
           which finetune's training steps use since it was measured here; exact — the largest logit
           difference is printed). The other kinds project every frame of every example.

Fixed costs (--fixed-costs, the default on): finetune's stored step as stages/finetune.py runs it now (fused
AdamW from build_optimizer, a batch's states padded on the host and sent in one copy by Windows.build_with_tail,
the loss, the per-kind sums and the gradient norm kept on the device by kind_sums and FiniteGuard, read once
per log row) against the same step as it ran before
(torch's default AdamW, one host-to-device copy per example, the loss and every example's loss and token count
read one by one), interleaved on the same model and batches: steps/s, and the reads from the device per step
(aten::_local_scalar_dense in torch's profiler: each waits for the device on a GPU).

Each step is split into "windows" (making the full windows: reading the store / running the TLE /
decoding + encoder) and "decoder" (forward, backward, optimiser). Kinds are timed round-robin (each
timing shares the machine's load of the moment), --steps times each after a warm-up; medians.
Transcripts are random token ids of realistic length (3.3 tokens per second of audio); weights random,
Whisper sizes real (tiny, base; large-v3 with --sizes large-v3 on a GPU).

    python bench/finetune_step.py                      # tiny and base on CPU
    python bench/finetune_step.py --quick              # a smoke run
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common  # noqa: F401,I001 — first: it sets OpenMP's wait policy before torch loads
import click
import numpy as np
import torch
from _common import (
    SIZES,
    clip_seconds,
    default_tle,
    describe_machine,
    emit,
    load_average,
    median,
    synchronizer,
    table,
    token_batch,
    whisper_config,
    write_clips,
    write_store,
)
from torch.utils.data import DataLoader

from stages.audio_batches import ClipDataset, collate
from stages.finetune_data import HeldOut, StoreStream, stored_examples
from stages.training import build_optimizer
from store import StoreReader
from whistle_pipeline.config import load_config
from whistle_pipeline.sources import open_source
from whistle_pipeline.teacher import TeacherGeometry, teacher_states
from whistle_pipeline.text import IGNORE_INDEX, TextBatch
from whistle_pipeline.tle import assemble_window
from whistle_pipeline.windows import (
    CommonTail,
    Example,
    SharedTail,
    Windows,
    kind_sums,
    select_trainable,
    token_losses,
)

KINDS = ("stored", "text", "encoder", "stored, tail shared")
START_OF_TRANSCRIPT, NO_TIMESTAMPS, END_OF_TEXT = 50257, 50362, 50256  # English-only Whisper ids


def text_batch(lengths: np.ndarray, rng: np.random.Generator, vocab_size: int) -> TextBatch:
    """Random transcripts for clips of `lengths` speech frames, laid out as whistle_pipeline.text does for an
    English-only Whisper: <|startoftranscript|> <|notimestamps|> tokens..., labels shifted, -100 on the prefix."""
    tokens, mask, _ = token_batch(lengths, rng, vocab_size)  # (B, L) text tokens + end
    n_text = mask.sum(1) - 1  # (B,)
    tokens[torch.arange(len(tokens)), n_text] = END_OF_TEXT
    tokens[~mask] = END_OF_TEXT
    prefix = torch.tensor([START_OF_TRANSCRIPT, NO_TIMESTAMPS])
    decoder_input_ids = torch.cat([prefix.expand(len(tokens), -1), tokens[:, :-1]], dim=1)  # (B, S)
    labels = torch.full_like(decoder_input_ids, IGNORE_INDEX)  # (B, S)
    for b, n in enumerate(n_text.tolist()):
        labels[b, 1 : n + 2] = tokens[b, : n + 1]
    return TextBatch(
        tokens, mask, decoder_input_ids, labels, len(prefix), ["synthetic"] * len(tokens), ["en"] * len(tokens)
    )


class Finetuner:
    """The Whisper being adapted, its optimiser, and the three ways of making its full windows."""

    def __init__(self, size: str, store: Path, manifest: Path, batch_size: int, device: torch.device):
        from transformers import WhisperForConditionalGeneration

        settings = load_config().finetune
        config = whisper_config(size)
        torch.manual_seed(0)
        self.model = WhisperForConditionalGeneration(config).to(device).train()
        select_trainable(self.model, settings.train_embeddings)
        self.optimizer, _ = build_optimizer(self.model, settings)
        self.shared = SharedTail(self.model)
        self.geometry = TeacherGeometry.from_config(config)
        template = torch.from_numpy(np.array(StoreReader(store).tail_template())).to(device)  # (F, D)
        tle = default_tle(config.d_model, config.vocab_size).to(device).eval().requires_grad_(False)
        self.windows = Windows(tle, {"audio": template}, sample_latent=True)
        self.stream = StoreStream(str(store), HeldOut(0.0, 0, False), 0, 64, 1)
        data = load_config(updates={"data": {"path": str(manifest)}}).data
        self.audio = DataLoader(
            ClipDataset(open_source(data), self.geometry, "none"),
            batch_size=batch_size,
            shuffle=True,
            num_workers=1,
            collate_fn=collate,
        )
        self._audio_batches = iter(())
        self.batch_size, self.device = batch_size, device
        self.vocab_size = config.vocab_size
        self.rng = np.random.default_rng(0)
        self.sync = synchronizer(device)
        self.grad_clip = settings.grad_clip

    def _next_audio(self):
        for batch in self._audio_batches:
            return batch
        self._audio_batches = iter(self.audio)  # a new epoch over the clips
        return next(self._audio_batches)

    def make_windows(self, kind: str) -> tuple[torch.Tensor, TextBatch, CommonTail | None]:
        """Full windows (B, max_frames, D), their transcripts, and where every window is the tail template
        (None: project every frame)."""
        if kind.startswith("stored"):
            examples = stored_examples("audio", self.stream.take(self.batch_size))
            lengths = np.array([len(e.states) for e in examples])
        elif kind == "text":
            lengths = np.random.default_rng(self.rng.integers(1 << 30)).choice(
                np.arange(100, 400), self.batch_size
            )  # only the transcripts' lengths matter here
            examples = [Example("text", "synthetic", "en") for _ in range(self.batch_size)]
        else:
            batch = self._next_audio()
            with torch.inference_mode():
                windows = teacher_states(self.model.model.encoder, batch.audio.to(self.device), self.geometry)
            lengths = np.array([n_samples // self.geometry.samples_per_frame for n_samples in batch.n_samples])
            return windows.clone(), text_batch(lengths, self.rng, self.vocab_size).to(self.device), None
        text = text_batch(lengths, self.rng, self.vocab_size).to(self.device)
        window, tail = self.windows.build_with_tail(examples, text, training=True)
        return window, text, tail if kind == "stored, tail shared" else None

    def logits(self, window: torch.Tensor, text: TextBatch, shared_tail: CommonTail | None) -> torch.Tensor:
        with self.shared(shared_tail):
            return self.model(encoder_outputs=(window,), decoder_input_ids=text.decoder_input_ids).logits  # (B, S, V)

    def check_shared_tail(self) -> float:
        """Largest |difference| of the logits with and without the shared tail, on one stored batch."""
        window, text, shared = self.make_windows("stored, tail shared")
        with torch.no_grad():
            return float((self.logits(window, text, shared) - self.logits(window, text, None)).abs().max())

    def decoder_step(self, window: torch.Tensor, text: TextBatch, shared_tail: CommonTail | None) -> None:
        logits = self.logits(window, text, shared_tail)  # (B, S, V)
        per_token = token_losses(logits, text.labels, 0.0)  # (B, S)
        loss = per_token.sum() / (text.labels != IGNORE_INDEX).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def timed_step(self, kind: str) -> tuple[float, float]:
        """(seconds making the windows, seconds in the decoder update); bf16 autocast on a GPU, as finetune's
        mixed_precision = "auto" gives."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.sync()
        began = time.perf_counter()
        with autocast:
            window, text, shared_tail = self.make_windows(kind)
        self.sync()
        made = time.perf_counter()
        with autocast:
            self.decoder_step(window, text, shared_tail)
        self.sync()
        return made - began, time.perf_counter() - made


def windows_before(windows: Windows, examples: list[Example]) -> torch.Tensor:
    """A batch of stored examples' full windows as Windows.build_with_tail made them before: one copy per example."""
    template = windows.templates["audio"]  # (F, D)
    lengths = torch.tensor([len(e.states) for e in examples], device=template.device)  # (B,)
    states = torch.zeros(len(examples), int(lengths.max()), template.shape[1], device=template.device)
    for b, example in enumerate(examples):
        states[b, : lengths[b]] = example.states.to(template.device)  # (T, D)
    return assemble_window(states, lengths, template)  # (B, F, D)


def losses_before(loss: torch.Tensor, per_token: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[float, int]]:
    """The loss and the per-kind sums as finetune read them before: a read per example."""
    per_example, counts = per_token.detach().sum(1), (labels != IGNORE_INDEX).sum(1)  # (B,), (B,)
    out = {"loss": (loss.item(), 0)}
    for b in range(len(per_example)):
        total, n = out.get("audio", (0.0, 0))
        out["audio"] = (total + float(per_example[b]), n + int(counts[b]))
    return out


def fixed_cost_steps(tuner: Finetuner, steps: int) -> dict[str, tuple[list[float], float]]:
    """{"before" / "after": (seconds per stored step, device reads per step)}, interleaved on one model."""
    from torch.profiler import ProfilerActivity, profile

    model = tuner.model
    unfused = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in tuner.optimizer.param_groups],
        lr=tuner.optimizer.param_groups[0]["lr"],
    )
    batches = []
    for _ in range(2):
        examples = stored_examples("audio", tuner.stream.take(tuner.batch_size))
        lengths = np.array([len(e.states) for e in examples])
        batches.append((examples, text_batch(lengths, tuner.rng, tuner.vocab_size).to(tuner.device)))

    def loss_and_gradients(way: str, i: int) -> None:
        examples, text = batches[i % len(batches)]
        if way == "before":
            window, tail = windows_before(tuner.windows, examples), None
        else:
            window, tail = tuner.windows.build_with_tail(examples, text, training=True)
        with tuner.shared(tail):
            logits = model(encoder_outputs=(window,), decoder_input_ids=text.decoder_input_ids).logits  # (B, S, V)
        per_token = token_losses(logits, text.labels, 0.0)  # (B, S)
        loss = per_token.sum() / (text.labels != IGNORE_INDEX).sum()
        if way == "before":
            losses_before(loss, per_token, text.labels)
        else:
            kind_sums(per_token, text.labels, [e.kind for e in examples])  # read once per log row
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tuner.grad_clip)
        if way == "before":
            float(norm)  # the non-finite test read it every step; FiniteGuard tests it on the device

    def step(way: str, i: int) -> None:
        loss_and_gradients(way, i)
        optimizer = unfused if way == "before" else tuner.optimizer
        optimizer.step()
        optimizer.zero_grad()

    out = {}
    for way in ("before", "after"):
        step(way, 0)  # warm-up (and the optimiser's state)
        # the optimisers are left out: on a CPU they read their step counters, host values (none on a GPU)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            loss_and_gradients(way, 1)
        model.zero_grad()
        reads = sum(e.count for e in profiler.key_averages() if e.key == "aten::_local_scalar_dense")
        out[way] = ([], float(reads))
    for i in range(steps):
        for way in ("before", "after"):
            tuner.sync()
            began = time.perf_counter()
            step(way, i)
            tuner.sync()
            out[way][0].append(time.perf_counter() - began)
    return out


@click.command()
@click.option("--sizes", default="tiny,base", show_default=True)
@click.option("--batch-size", default=None, type=int, help="Examples per step (default: finetune.batch_size).")
@click.option("--steps", default=2, show_default=True, help="Timed steps of each kind (after one warm-up).")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--fixed-costs/--no-fixed-costs", default=True, show_default=True, help="Before/after of the stored step."
)
@click.option("--quick", is_flag=True, help="tiny, batch 2, one step: a smoke run.")
def main(sizes: str, batch_size: int | None, steps: int, device: str, fixed_costs: bool, quick: bool) -> None:
    batch_size = batch_size or load_config().finetune.batch_size
    if quick:
        sizes, batch_size, steps = "tiny", 2, 1
    torch_device = torch.device(device)
    click.echo(describe_machine(device))
    results, fixed = {}, {}
    with tempfile.TemporaryDirectory(prefix="whistle-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "clips").mkdir()
        manifest = write_clips(tmp / "clips", max(2 * batch_size, 4))
        for size in sizes.split(","):
            store = tmp / f"store-{size}"
            rng = np.random.default_rng(0)
            write_store(store, clip_seconds(max(4 * batch_size, 8), rng, 2.0, 8.0), SIZES[size]["d_model"], 64)
            tuner = Finetuner(size, store, manifest, batch_size, torch_device)
            difference = tuner.check_shared_tail()
            for kind in KINDS:
                tuner.timed_step(kind)  # warm-up
            times = {kind: [] for kind in KINDS}
            loads = []
            for _ in range(steps):
                for kind in KINDS:
                    times[kind].append(tuner.timed_step(kind))
                loads.append(load_average())
            results[size] = (
                times,
                loads,
                tuner.model.num_parameters() / 1e6,
                tuner.windows.tle.num_parameters() / 1e6,
                difference,
            )
            if fixed_costs:
                fixed[size] = fixed_cost_steps(tuner, max(steps, 3))

    figures = {"batch_size": batch_size, "device": device}
    for size, (times, loads, parameters, tle_parameters, difference) in results.items():
        total = {kind: median(w + d for w, d in times[kind]) for kind in KINDS}
        click.echo(
            f"\n{size}-sized random Whisper ({parameters:.1f} M parameters; TLE {tle_parameters:.1f} M), batches of "
            f"{batch_size} on {device}; {steps} step(s) of each kind, medians; load average {', '.join(loads)}"
        )
        click.echo(
            table(
                ["step", "windows s", "decoder s", "step s", "examples/s", "x stored step"],
                [
                    [
                        kind,
                        median(w for w, _ in times[kind]),
                        median(d for _, d in times[kind]),
                        total[kind],
                        batch_size / total[kind],
                        total[kind] / total["stored"],
                    ]
                    for kind in KINDS
                ],
            )
        )
        click.echo(f"tail shared: the logits differ by at most {difference:.2e} from the per-example projection")
        key = size.replace("-", "_")
        for kind in KINDS:
            name = kind.replace(", ", "_").replace(" ", "_")
            figures[f"{key}_{name}_step_s"] = total[kind]
            figures[f"{key}_{name}_vs_stored"] = total[kind] / total["stored"]
        figures[f"{key}_shared_tail_max_logit_difference"] = difference
    for size, ways in fixed.items():
        step_s = {way: median(seconds) for way, (seconds, _) in ways.items()}
        click.echo(f"\n{size}: the stored step before / after the fixed-cost changes (interleaved, medians)")
        click.echo(
            table(
                ["step", "step s", "examples/s", "device reads"],
                [[way, step_s[way], batch_size / step_s[way], ways[way][1]] for way in ways],
            )
        )
        key = size.replace("-", "_")
        figures[f"{key}_fixed_costs_speedup"] = step_s["before"] / step_s["after"]
        figures[f"{key}_device_reads_before"] = ways["before"][1]
        figures[f"{key}_device_reads_after"] = ways["after"][1]
    emit(figures)


if __name__ == "__main__":
    main()
