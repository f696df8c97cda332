"""finetune's result: the training summary (finetune.json) and its report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from stages.finetune_data import KINDS
from stages.training_data import DamagedShard, damage_summary

SUMMARY = "finetune.json"


@dataclass
class FinetuneResult:
    output_dir: str
    steps: int
    resumed_from: int  # 0 = a fresh run
    train_examples: dict[str, int]  # kind -> sentences / utterances available for training
    held_out: dict[str, int]  # kind -> examples scored at each validation
    examples_seen: dict[str, int]  # kind -> examples trained on (this run, all ranks)
    corpus_rejects: list[dict[str, str]]
    best_step: int
    select_by: str
    saved_step: int  # the step whose decoder was written to output_dir
    validation: list[dict[str, Any]] = field(default_factory=list)  # every validation of the run
    outliers: list[dict[str, Any]] = field(default_factory=list)  # val_audio's worst clips at the saved step
    wall_seconds: float = 0.0
    damaged_shards: list[dict[str, Any]] = field(default_factory=list)  # left out under finetune.skip_damaged
    store_rejects: list[dict[str, str]] = field(default_factory=list)  # stored utterances the decoder cannot take
    precision_hint: str = ""  # how much faster bf16 would be, for float32 on a CPU with bf16 in hardware

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mix = ", ".join(f"{self.examples_seen[k]} {k}" for k in KINDS if self.examples_seen.get(k))
        lines = [
            f"fine-tuned the decoder for {self.steps} steps"
            + (f" (resumed at step {self.resumed_from})" if self.resumed_from else "")
            + f" in {self.wall_seconds / 60:.1f} min on {mix or 'no new'} examples"
        ]
        if self.corpus_rejects:
            first = self.corpus_rejects[0]
            lines.append(f"  {len(self.corpus_rejects)} sentence(s) not used (first: {first['id']}: {first['reason']})")
        if self.store_rejects:
            first = self.store_rejects[0]
            lines.append(
                f"  {len(self.store_rejects)} stored utterance(s) not used (first: {first['store']} "
                f"{first['id']}: {first['reason']})"
            )
        if self.damaged_shards:
            lines.append(damage_summary([DamagedShard(**d) for d in self.damaged_shards]))
        saved = next((v for v in self.validation if v["step"] == self.saved_step), None)
        if saved:
            shown = ", ".join(
                f"{k} {v:.4g}"
                for k, v in saved.items()
                if k not in ("step", "loops") and isinstance(v, float) and not math.isnan(v)
            )
            lines.append(
                f"  step {self.saved_step} ({'best by ' + self.select_by if self.saved_step == self.best_step else 'last'}): {shown}"
            )
            if saved.get("loops"):
                lines.append(f"  repetition loops on val_audio: {', '.join(saved['loops'])}")
        if self.precision_hint:
            lines.append(f"  note: {self.precision_hint}")
        lines.append(f"  model: {self.output_dir} (Whisper with the adapted decoder; transformers.pipeline loads it)")
        return "\n".join(lines)
