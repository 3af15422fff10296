"""Training logs: one JSONL line per logged step (the file the report reads), TensorBoard, console.

`train_log.jsonl` records: step, loss, action_loss, world_loss, gate, memory_norm, attn_entropy, grad_norm,
lr, samples_per_s, epoch, elapsed_s. `val_log.jsonl`: step, action errors (normalised and real units, per
dim), the predict-the-mean baseline, per-k Prophet metrics. On resume, lines past the resumed step are
dropped first (`rundir.truncate_log`) and TensorBoard purges its events past that step, so both continue
exactly where the checkpoint was taken.
"""

from __future__ import annotations

from pathlib import Path

from vla_core.utils import append_jsonl


class TrainLogger:
    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:  # tensorboard is a declared dependency; keep training if it is broken anyway
                self.tb = None

    def log(self, file: str, record: dict, prefix: str) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / file, record)
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k == "step":
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):  # per-k / per-dim series
                        self.tb.add_scalar(f"{prefix}/{k}/{i + 1}", x, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
