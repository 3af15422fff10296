"""Run directories: `<root>/<experiment>/<tag>/seed<k>`, never overwritten.

tag = `{world_source}_m{m}{_delta}_{head}` (e.g. `vjepa_m4_delta_flow`, `tiny_m4_delta_mse`): the
earlier attempt wrote every variant to the same folder and runs overwrote each other.

Layout of a run directory:
    config.json            the full TrainConfig (written when the run starts; a resume must match it)
    train_log.jsonl        one line per logged step (step, action_loss, world_loss, gate, lr, ...)
    val_log.jsonl          one line per validation (step, action errors, baseline, per-k Prophet metrics)
    tb/                    TensorBoard events
    checkpoints/step_000500/   checkpoint folders (see vla_core.train.checkpoint)
    checkpoints/latest     text file naming the newest complete checkpoint folder
    done.json              written last: the run finished (final step, final metrics, checkpoint name)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vla_core.utils import WmvlaError, config_diff, read_jsonl

DONE_FILE = "done.json"
CONFIG_FILE = "config.json"
TRAIN_LOG = "train_log.jsonl"
VAL_LOG = "val_log.jsonl"
CKPT_DIR = "checkpoints"
LATEST = "latest"

# Fields that may differ between the original start and a resume of the same run (they do not change
# what is computed; `distributed`: DDP and FSDP compute the same step and write the same checkpoint).
RESUME_MAY_DIFFER = ("log_every", "val_every", "ckpt_every", "keep_checkpoints", "mean_baseline_check", "num_workers",
                     "device", "progress", "out_root", "run_dir", "stop_after", "distributed", "remote")


def world_source_name(encoder: str) -> str:
    """Short name of a world encoder for run tags: "tiny", "vjepa2-vitl", "vjepa2-vitg", or the folder name."""
    if encoder == "tiny":
        return "tiny"
    name = Path(encoder.rstrip("/")).name.lower()
    m = re.match(r"(vjepa2?-vit[a-z])", name)
    if m:
        return m.group(1)
    return re.sub(r"[^a-z0-9.-]+", "-", name).strip("-") or "world"


def run_tag(world_encoder: str, window: int, delta: bool, head: str) -> str:
    return f"{world_source_name(world_encoder)}_m{window}{'_delta' if delta else ''}_{head}"


def run_dir_for(root: str | Path, experiment: str, tag: str, seed: int) -> Path:
    return Path(root) / experiment / tag / f"seed{seed}"


@dataclass
class RunStatus:
    path: Path
    state: str  # "new" | "unfinished" | "finished"
    latest_checkpoint: Path | None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder named by `checkpoints/latest`, or None if there is none yet."""
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = pointer.parent / name
    # meta.json: every complete checkpoint has it (written before the folder's atomic rename), also an
    # evaluation's copy that holds only the EMA weights and the small files
    if not ((path / "model.safetensors").exists() or (path / "meta.json").exists()):
        raise WmvlaError(f"{pointer} names {name!r} but {path} is not a complete checkpoint; the run folder is damaged.")
    return path


def run_status(run_dir: str | Path) -> RunStatus:
    run_dir = Path(run_dir)
    if (run_dir / DONE_FILE).exists():
        return RunStatus(run_dir, "finished", latest_checkpoint(run_dir))
    if (run_dir / CONFIG_FILE).exists():
        return RunStatus(run_dir, "unfinished", latest_checkpoint(run_dir))
    if run_dir.exists() and any(p.name != "tb" for p in run_dir.iterdir()):
        raise WmvlaError(
            f"{run_dir} exists and is not a wmvla run folder (no {CONFIG_FILE}); refusing to write into it. "
            "Move it away or choose another --out-root."
        )
    return RunStatus(run_dir, "new", None)


def check_same_config(run_dir: Path, expected: dict, found: dict) -> None:
    """Refuse to resume/continue a run folder whose stored config differs from the requested one."""
    diffs = [d for d in config_diff(found, expected) if d.split(":")[0].split(".")[0] not in RESUME_MAY_DIFFER]
    if diffs:
        raise WmvlaError(
            f"{run_dir} already holds a run with a different configuration; refusing to overwrite it.\n  - "
            + "\n  - ".join(diffs[:20])
            + "\n(expected = stored in config.json, found = requested now). Use another --out-root or --seed, "
            "or move the old run away."
        )


def truncate_log(path: Path, max_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log continues seamlessly."""
    from vla_core.utils import atomic_write_text
    import json

    if not path.exists():
        return
    records = [r for r in read_jsonl(path) if r.get("step", -1) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
