"""train-tle's result: the training summary and its report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from stages.training_data import DamagedShard, damage_summary


@dataclass
class TrainTLEResult:
    output_dir: str
    steps: int
    resumed_from: int  # 0 = a fresh run
    train_utterances: int
    held_out_utterances: int
    alignment_rejects: dict[str, str]  # id -> reason (not trained on)
    wall_seconds: float
    validation: dict[str, float] = field(default_factory=dict)  # the last validation
    damaged_shards: list[dict[str, Any]] = field(default_factory=list)  # left out under train_tle.skip_damaged
    precision_hint: str = ""  # how much faster bf16 would be, for float32 on a CPU with bf16 in hardware

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"trained the TLE for {self.steps} steps"
            + (f" (resumed at step {self.resumed_from})" if self.resumed_from else "")
            + f" in {self.wall_seconds / 60:.1f} min on {self.train_utterances} utterances "
            f"({self.held_out_utterances} held out)",
        ]
        if self.alignment_rejects:
            first_id, reason = next(iter(self.alignment_rejects.items()))
            lines.append(f"  {len(self.alignment_rejects)} utterance(s) not used (first: {first_id}: {reason})")
        if self.damaged_shards:
            lines.append(damage_summary([DamagedShard(**d) for d in self.damaged_shards]))
        if self.validation:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in self.validation.items() if k != "step" and not math.isnan(v))
            lines.append(f"  held-out: {shown}")
        if self.precision_hint:
            lines.append(f"  note: {self.precision_hint}")
        lines.append(f"  model: {self.output_dir} (TLEModel.from_pretrained); logs, curves and checkpoints beside it")
        return "\n".join(lines)
