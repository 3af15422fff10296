"""Checkpoints: what was trained, everything needed to rebuild the policy, and exact-resume state.

A checkpoint folder `<run>/checkpoints/step_000500/` holds

    model.safetensors   trained weights only: every parameter with requires_grad, plus the persistent buffers
                        (e.g. the Prophet's latent mean/std). Frozen base-model weights are NOT saved (the
                        earlier attempt wrote 7 GB per epoch); they are rebuilt from `policy.backbone`
                        (hub id / local folder / seeded tiny) and checked against `meta.json`'s fingerprint.
    ema.safetensors     EMA of the trained weights (only when optim.ema_decay > 0)
    buffers.safetensors the persistent buffers alone (with EMA only; a few KB): ema + buffers are the weights an
                        evaluation loads, so an evaluation pod fetches neither model.safetensors nor
                        train_state.pt (at 2B: 8.7 of the 35 GB instead of all of it)
    config.json         the full, resolved TrainConfig
    norm_stats.json     state/action normalisation statistics (vla_core.data.normalize format)
    tokenizer/          the backbone tokenizer including the <ACT_i> tokens
    world_spec.json     {"spec": resolved WorldEncoderSpec or null (E0), "latents": cache path, ...}
    meta.json           step, names/shapes of the saved tensors, frozen-weights fingerprint, versions
    train_state.pt      optimizer state, step, data position, RNG states (exact resume)

Atomicity: everything is written into `checkpoints/.tmp-step_000500-<pid>/`, fsynced, then renamed to its
final name in one `os.rename`; only then is the `checkpoints/latest` pointer replaced (atomic write). A
crash at any point leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_core.train.rundir import CKPT_DIR, LATEST, latest_checkpoint
from vla_core.utils import WmvlaError, atomic_write_json, atomic_write_text, config_diff, to_jsonable

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
BUFFERS_FILE = "buffers.safetensors"
CONFIG_FILE = "config.json"
STATS_FILE = "norm_stats.json"
TOKENIZER_DIR = "tokenizer"
WORLD_FILE = "world_spec.json"
META_FILE = "meta.json"
STATE_FILE = "train_state.pt"
FORMAT = "wmvla-checkpoint-v1"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


# ------------------------------------------------------------------------------------ what is saved


def saved_tensor_names(model: torch.nn.Module) -> list[str]:
    """Names of the state-dict entries a checkpoint stores: trainable parameters + persistent buffers."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    persistent_buffers = [n for n in model.state_dict() if n not in dict(model.named_parameters())]
    return sorted(set(trainable) | set(persistent_buffers))


def trained_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {n: state[n].detach().contiguous().cpu() for n in saved_tensor_names(model)}


@torch.no_grad()
def frozen_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Count, total size and a float64 sum of squares of the frozen parameters (detects a different base model)."""
    n, numel, sq = 0, 0, 0.0
    for _, p in model.named_parameters():
        if not p.requires_grad:
            n += 1
            numel += p.numel()
            sq += float(p.detach().double().pow(2).sum())
    return {"tensors": n, "numel": numel, "sum_sq": sq}


def _fingerprints_match(a: dict, b: dict) -> bool:
    if a["tensors"] != b["tensors"] or a["numel"] != b["numel"]:
        return False
    # bf16 vs fp32 storage of the same frozen weights (CPU vs GPU evaluation) changes the sum slightly
    return abs(a["sum_sq"] - b["sum_sq"]) <= 1e-2 * max(1.0, abs(a["sum_sq"]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# -------------------------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    config: Any,
    stats: dict,
    tokenizer: Any,
    world: dict,
    train_state: dict | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
    extra_meta: dict | None = None,
    keep_last: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
    frozen: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, move `latest` to it, prune older ones; return its folder.

    `tensors` / `frozen`: the trained state dict and the frozen-weights fingerprint when the caller has them
    already (a sharded model, `--distributed fsdp`: gathered to this process / taken before sharding);
    otherwise they are read from `model`, whose tensors must then be whole."""
    from safetensors.torch import save_file

    from vla_core.data.normalize import save_stats

    ckpt_root = Path(run_dir) / CKPT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_name(step)
    tmp = ckpt_root / f".tmp-{step_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if tensors is None:
            tensors = trained_state_dict(model)
        else:
            expected = set(saved_tensor_names(model))
            if set(tensors) != expected:
                raise WmvlaError(f"checkpoint tensors differ from the trained set: missing "
                                 f"{sorted(expected - set(tensors))[:10]}, extra {sorted(set(tensors) - expected)[:10]}")
            tensors = {n: tensors[n].detach().contiguous().cpu() for n in sorted(tensors)}
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT, "step": str(step)})
        if ema_state is not None:
            save_file({n: t.contiguous() for n, t in ema_state.items()}, str(tmp / EMA_FILE),
                      metadata={"format": FORMAT, "step": str(step)})
            save_file({n: t for n, t in tensors.items() if n not in ema_state}, str(tmp / BUFFERS_FILE),
                      metadata={"format": FORMAT, "step": str(step)})
        atomic_write_json(tmp / CONFIG_FILE, config)
        save_stats(stats, tmp / STATS_FILE)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        atomic_write_json(tmp / WORLD_FILE, world)
        meta = {
            "format": FORMAT,
            "step": step,
            "tensors": {n: list(t.shape) for n, t in tensors.items()},
            "num_trained_values": int(sum(t.numel() for t in tensors.values())),
            "frozen": frozen if frozen is not None else frozen_fingerprint(model),
            "ema": ema_state is not None,
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "python": platform.python_version()},
            **(extra_meta or {}),
        }
        atomic_write_json(tmp / META_FILE, meta)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # the same step written again (a resumed run re-reaching it): replace atomically
            old = ckpt_root / f".old-{step_name(step)}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    _prune(ckpt_root, keep_last, protect=final.name)
    return final


def _prune(ckpt_root: Path, keep_last: int, protect: str) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in steps[: max(0, len(steps) - max(1, keep_last))]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".tmp-*"):  # leftovers of a crash during an earlier save
        shutil.rmtree(p, ignore_errors=True)


def _version(pkg: str) -> str | None:
    try:
        return __import__(pkg).__version__
    except Exception:  # noqa: BLE001
        return None


# -------------------------------------------------------------------------------------------- load


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, its checkpoints/ folder, or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if (path / MODEL_FILE).exists() or (path / META_FILE).exists():  # (an evaluation's copy has no MODEL_FILE)
        return path
    for run_dir in (path, path.parent):
        if (run_dir / CKPT_DIR / LATEST).exists():
            ckpt = latest_checkpoint(run_dir)
            if ckpt is not None:
                return ckpt
    raise WmvlaError(
        f"{path} is not a checkpoint: expected a folder with {MODEL_FILE} (e.g. runs/E2/<tag>/seed0/checkpoints/"
        f"step_0002000) or a run folder whose checkpoints/{LATEST} names one."
    )


def read_checkpoint_config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise WmvlaError(f"{ckpt}: {CONFIG_FILE} is missing; not a complete wmvla checkpoint") from None


def evaluated_files(ckpt_files: set[str] | list[str], use_ema: bool = True) -> list[str]:
    """The weight files `load_trained_weights` reads from a checkpoint holding `ckpt_files` (names relative to
    the checkpoint folder): ema + buffers when both exist and `use_ema` (checkpoints before buffers.safetensors
    existed: model + ema), else model alone. What an evaluation has to fetch besides the small files."""
    files = set(ckpt_files)
    if use_ema and {EMA_FILE, BUFFERS_FILE} <= files:
        return [EMA_FILE, BUFFERS_FILE]
    return [MODEL_FILE, EMA_FILE] if use_ema and EMA_FILE in files else [MODEL_FILE]


def load_trained_weights(model: torch.nn.Module, ckpt: Path, use_ema: bool = True) -> str:
    """Load the checkpoint's trained weights into `model`: with `use_ema` and an EMA, ema.safetensors +
    buffers.safetensors (older checkpoints: model.safetensors with the EMA over it), else model.safetensors.

    Refuses a checkpoint whose tensor names or shapes differ from what this model trains. Returns "ema"
    or "raw" (which weights are now in the model).
    """
    from safetensors.torch import load_file

    files = evaluated_files({p.name for p in Path(ckpt).iterdir()} if Path(ckpt).is_dir() else set(), use_ema)
    missing = [f for f in files if not (ckpt / f).is_file()]
    if missing:
        raise WmvlaError(
            f"{ckpt}: {', '.join(missing)} missing. "
            + ("This folder holds only what an evaluation reads (the EMA weights); training resumes and raw-weight "
               "evaluations need the whole checkpoint: fetch it again without the evaluation filter "
               "(`wmvla results pull` of the checkpoint's prefix)." if (ckpt / EMA_FILE).is_file()
               else "Not a complete wmvla checkpoint."))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(ckpt / f)))  # EMA after model: it covers the trainable parameters
    which = "ema" if EMA_FILE in files else "raw"
    expected = set(saved_tensor_names(model))
    found = set(tensors)
    problems = []
    if expected - found:
        problems.append(f"missing from the checkpoint: {sorted(expected - found)[:10]}")
    if found - expected:
        problems.append(f"not trained by this model (different finetune mode or architecture?): {sorted(found - expected)[:10]}")
    state = model.state_dict()
    shapes = [f"{n}: checkpoint {list(t.shape)} vs model {list(state[n].shape)}"
              for n, t in tensors.items() if n in state and tuple(t.shape) != tuple(state[n].shape)]
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:10]))
    if problems:
        raise WmvlaError(f"{ckpt}: the saved weights ({', '.join(files)}) do not fit the policy rebuilt from its "
                         "config:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for n, t in tensors.items():
            state[n].copy_(t.to(state[n].dtype))
    return which


def check_frozen_fingerprint(model: torch.nn.Module, ckpt: Path) -> None:
    meta = json.loads((ckpt / META_FILE).read_text())
    now = frozen_fingerprint(model)
    if not _fingerprints_match(meta["frozen"], now):
        raise WmvlaError(
            f"{ckpt}: the frozen base-model weights rebuilt now differ from the ones the policy was trained on "
            f"(trained: {meta['frozen']}, now: {now}). The backbone (hub revision / local folder / tiny seed) "
            "changed; rebuild with the exact backbone recorded in config.json (policy.backbone, policy.revision)."
        )


def check_tokenizer(tokenizer: Any, ckpt: Path) -> None:
    """The rebuilt tokenizer (with ACT tokens) must be the saved one: same vocabulary and ids."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(ckpt / TOKENIZER_DIR))
    a, b = saved.get_vocab(), tokenizer.get_vocab()
    if a != b:
        only_saved = sorted(set(a) - set(b))[:10]
        only_now = sorted(set(b) - set(a))[:10]
        moved = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:10]
        raise WmvlaError(
            f"{ckpt}: the tokenizer rebuilt from the backbone differs from the saved one "
            f"(only in saved: {only_saved}; only now: {only_now}; different ids: {moved}). "
            "The backbone's tokenizer changed; use the backbone recorded in config.json."
        )


def compare_configs(expected: dict, found: dict, what: str) -> None:
    diff = config_diff(to_jsonable(expected), to_jsonable(found))
    if diff:
        raise WmvlaError(f"{what}:\n  - " + "\n  - ".join(diff[:20]))


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(checkpoint_dir: str | Path, device: str | torch.device | None = "auto", use_ema: bool = True,
                expect: dict | None = None):
    """Rebuild the trained policy from a checkpoint -> (VLAPolicy in eval mode on `device`, TrainConfig).

    The policy is rebuilt from the checkpoint's own config (backbone, keys, shapes, memory), its
    normalisation stats and trained weights (EMA ones when present and `use_ema`). Refused with a message
    saying what differs: a tokenizer other than the saved one, frozen base weights other than the ones
    trained on, saved tensors that do not fit, and any field of `expect` (a nested dict of TrainConfig
    fields the caller requires, e.g. {"policy": {"backbone": ...}, "keys": {...}}) that differs.
    """
    from vla_core.data.normalize import load_stats
    from vla_core.policy.modeling import VLAPolicy
    from vla_core.train.config import TrainConfig
    from vla_core.utils import from_dict

    ckpt = resolve_checkpoint(checkpoint_dir)
    raw = read_checkpoint_config(ckpt)
    if expect:
        diff = _expect_diff(expect, raw)
        if diff:
            raise WmvlaError(f"{ckpt} does not match what was asked for:\n  - " + "\n  - ".join(diff)
                             + "\n(expected = requested now, found = the checkpoint's config.json)")
    cfg = from_dict(TrainConfig, raw)
    stats = load_stats(ckpt / STATS_FILE)
    policy = VLAPolicy(cfg.policy, stats)
    check_tokenizer(policy.tokenizer, ckpt)
    which = load_trained_weights(policy, ckpt, use_ema=use_ema)
    print(f"checkpoint: {ckpt.name}: loaded the {'EMA' if which == 'ema' else 'raw (non-EMA)'} weights", flush=True)
    check_frozen_fingerprint(policy, ckpt)
    policy.to(_resolve_device(device)).eval()
    return policy, cfg


def _expect_diff(expect: dict, found: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in expect.items():
        key = f"{prefix}{k}"
        if k not in found:
            out.append(f"{key}: expected {v!r}, the checkpoint has no such field")
        elif isinstance(v, dict) and isinstance(found[k], dict):
            out.extend(_expect_diff(v, found[k], key + "."))
        elif to_jsonable(v) != found[k]:
            out.append(f"{key}: expected {to_jsonable(v)!r}, found {found[k]!r}")
    return out


def read_world_record(checkpoint_dir: str | Path) -> dict:
    """world_spec.json of a checkpoint: {"spec": WorldEncoderSpec dict or None, "latents", "uses_memory"}."""
    ckpt = resolve_checkpoint(checkpoint_dir)
    try:
        return json.loads((ckpt / WORLD_FILE).read_text())
    except FileNotFoundError:
        raise WmvlaError(f"{ckpt}: {WORLD_FILE} is missing; not a complete wmvla checkpoint") from None
