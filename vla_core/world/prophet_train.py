"""Train the Prophet alone on a latent cache and report per-k metrics on held-out episodes.

    wmvla prophet train cache/libero/train_world_latents_vjepa_m4.fp16.npy --dataset /data/libero \
        --history 4 --horizon 4 --steps 5000

Held-out episodes (a seeded random `--holdout-fraction` of them) are never trained on; normalisation
statistics come from the training episodes only. Output folder (default: beside the cache,
prophet_<cache stem>_T<T>_K<K>_seed<seed>/): prophet.safetensors (weights + normalisation buffers),
prophet.json (ProphetConfig, the cache's world spec, this config, the episode split), metrics.json
(per-k held-out metrics of the Prophet and of copy-the-present), log.jsonl (training loss).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vla_core.utils import WmvlaError, append_jsonl, atomic_path, atomic_write_json, seed_everything, to_jsonable
from vla_core.world.cache import LatentCache, positional
from vla_core.world.prophet import Prophet, ProphetConfig, add_metric_sums, episode_windows


@dataclass
class ProphetTrainConfig:
    """Train the Prophet on cached latents; report per-k held-out metrics vs copy-the-present."""

    cache: positional(Path, "CACHE")
    """latent cache (.fp16.npy written by `wmvla latents`)"""
    dataset: str = ""
    """the dataset the cache was computed from (episode boundaries; the cache is checked against it)"""
    dataset_revision: str | None = None
    history: int = 4
    """T: latents z_{t-T+1..t} given to the Prophet"""
    horizon: int = 4
    """K: future latents predicted"""
    width: int = 256
    depth: int = 2
    heads: int = 4
    delta: bool = True
    """predict z_{t+k} - z_t"""
    loss: Literal["cosine", "mse", "both"] = "both"
    dropout: float = 0.0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    holdout_fraction: float = 0.1
    """fraction of episodes held out for the metrics"""
    eval_every: int = 500
    """steps between held-out evaluations (the last step is always evaluated)"""
    seed: int = 0
    device: str = "auto"
    out: Path | None = None
    """output folder (default: beside the cache)"""
    overwrite: bool = False


def split_episodes(num_episodes: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of episode positions -> (train, held_out), both sorted."""
    if num_episodes < 2:
        raise WmvlaError(f"need at least 2 episodes to hold one out, the dataset has {num_episodes}.")
    if not 0 < holdout_fraction < 1:
        raise WmvlaError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    n_hold = min(num_episodes - 1, max(1, round(holdout_fraction * num_episodes)))
    perm = np.random.default_rng(seed).permutation(num_episodes)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def _windows_of(episodes, positions: np.ndarray, history: int, horizon: int):
    starts = np.array([episodes[i].start for i in positions])
    lengths = np.array([episodes[i].length for i in positions])
    return episode_windows(starts, lengths, history, horizon)


@torch.no_grad()
def evaluate(prophet: Prophet, latents: torch.Tensor, windows, batch_size: int = 2048) -> dict:
    """Per-k metrics (Prophet.finalize_metrics) over all frames of the given windows."""
    prophet.eval()
    t_idx, hist, fut, mask = windows
    total = None
    dev = latents.device
    for a in range(0, len(t_idx), batch_size):
        sl = slice(a, a + batch_size)
        h = latents[torch.as_tensor(hist[sl], device=dev)].float()
        pred = prophet(h)
        sums = prophet.metric_sums(pred, latents[torch.as_tensor(fut[sl], device=dev)].float(),
                                   latents[torch.as_tensor(t_idx[sl], device=dev)].float(),
                                   torch.as_tensor(mask[sl], device=dev))
        total = add_metric_sums(total, sums)
    prophet.train()
    return Prophet.finalize_metrics(total)


def train_prophet(cfg: ProphetTrainConfig, latents_np: np.ndarray, episodes, log=print) -> tuple[Prophet, dict, list]:
    """Train on the non-held-out episodes; returns (prophet, final held-out metrics, eval history)."""
    if cfg.steps < 1:
        raise WmvlaError(f"--steps must be >= 1, got {cfg.steps}.")
    seed_everything(cfg.seed)
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if cfg.device == "auto" else cfg.device))
    train_eps, held_eps = split_episodes(len(episodes), cfg.holdout_fraction, cfg.seed)
    train_w = _windows_of(episodes, train_eps, cfg.history, cfg.horizon)
    held_w = _windows_of(episodes, held_eps, cfg.history, cfg.horizon)

    pcfg = ProphetConfig(dim=int(latents_np.shape[1]), history=cfg.history, horizon=cfg.horizon, width=cfg.width,
                         depth=cfg.depth, heads=cfg.heads, delta=cfg.delta, loss=cfg.loss, dropout=cfg.dropout)
    prophet = Prophet(pcfg)
    # normalisation from training frames only (held-out episodes stay unseen)
    train_rows = train_w[0]
    s = np.zeros(pcfg.dim)
    ss = np.zeros(pcfg.dim)
    for a in range(0, len(train_rows), 65536):
        block = np.asarray(latents_np[train_rows[a : a + 65536]], dtype=np.float64)
        s += block.sum(0)
        ss += (block * block).sum(0)
    mean = s / len(train_rows)
    prophet.set_normalization(mean, np.sqrt(np.maximum(ss / len(train_rows) - mean**2, 0.0)))
    prophet.to(dev).train()

    latents = torch.from_numpy(np.array(latents_np)).to(dev)  # read into memory, float16; cast per batch
    hist = torch.as_tensor(train_w[1], device=dev)
    fut = torch.as_tensor(train_w[2], device=dev)
    mask = torch.as_tensor(train_w[3], device=dev)
    opt = torch.optim.AdamW(prophet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    history = []
    t0 = time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        b = torch.randint(0, len(train_rows), (cfg.batch_size,), generator=gen).to(dev)
        pred = prophet(latents[hist[b]].float())
        loss = prophet.loss(pred, latents[fut[b]].float(), mask[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(prophet.parameters(), cfg.grad_clip)
        opt.step()
        last = step == cfg.steps - 1
        if step % 50 == 0 or last:
            history.append({"step": step, "loss": float(loss.detach()), "grad_norm": float(gnorm), "lr": lr_at(step),
                            "seconds": time.time() - t0})
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            m = evaluate(prophet, latents, held_w)
            history.append({"step": step, "heldout": m})
            log(f"prophet: step {step + 1}/{cfg.steps} loss {float(loss.detach()):.4f} held-out cos_abs "
                f"{np.round(m['cos_abs'], 4).tolist()} (copy {np.round(m['baseline_cos_abs'], 4).tolist()})")
    split = {"train_episodes": [int(episodes[i].episode_index) for i in train_eps],
             "heldout_episodes": [int(episodes[i].episode_index) for i in held_eps]}
    return prophet, {"heldout": m, **split}, history


def _print_table(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("k", "cos abs", "copy cos abs", "cos delta", "mse", "copy mse", "mse / copy", "pairs"):
        table.add_column(col, justify="right")
    for k in range(len(metrics["cos_abs"])):
        ratio = metrics["mse"][k] / max(metrics["baseline_mse"][k], 1e-12)
        table.add_row(str(k + 1), f"{metrics['cos_abs'][k]:.4f}", f"{metrics['baseline_cos_abs'][k]:.4f}",
                      f"{metrics['cos_delta'][k]:.4f}", f"{metrics['mse'][k]:.4f}", f"{metrics['baseline_mse'][k]:.4f}",
                      f"{ratio:.3f}", str(metrics["count"][k]))
    Console().print(table)


def load_prophet(folder: str | Path, device: str = "cpu") -> tuple[Prophet, dict]:
    """Load a Prophet written by `wmvla prophet train` -> (prophet in eval mode, prophet.json contents)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "prophet.json").read_text())
    prophet = Prophet(ProphetConfig(**meta["prophet"]))
    prophet.load_state_dict(load_file(str(folder / "prophet.safetensors")))
    return prophet.to(device).eval(), meta


def run_prophet_train(cfg: ProphetTrainConfig) -> int:
    from safetensors.torch import save_file

    from vla_core.data.lerobot import LeRobotDataset

    if not cfg.dataset:
        raise WmvlaError("--dataset is required: the dataset the cache was computed from (for episode boundaries).")
    ds = LeRobotDataset.open(cfg.dataset, None, revision=cfg.dataset_revision)
    cache = LatentCache.open(cfg.cache, dataset=ds)
    stem = cache.path.name.removesuffix(".npy").removesuffix(".fp16")
    out = Path(cfg.out) if cfg.out else cache.path.parent / f"prophet_{stem}_T{cfg.history}_K{cfg.horizon}_seed{cfg.seed}"
    if (out / "metrics.json").exists() and not cfg.overwrite:
        raise WmvlaError(f"{out} already holds a trained Prophet (metrics.json). Fix: --out DIR or --overwrite.")
    out.mkdir(parents=True, exist_ok=True)
    print(f"prophet: cache {cache.path} [{cache.num_rows}, {cache.dim}] ({cache.spec.encoder}, m={cache.spec.window}), "
          f"{ds.num_episodes} episodes -> {out}")
    (out / "log.jsonl").unlink(missing_ok=True)
    prophet, result, history = train_prophet(cfg, cache.latents, ds.episodes)
    for rec in history:
        append_jsonl(out / "log.jsonl", rec)
    with atomic_path(out / "prophet.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in prophet.state_dict().items()}, str(tmp))
    atomic_write_json(out / "prophet.json", {
        "prophet": dataclasses.asdict(prophet.cfg), "world_spec": cache.spec.to_dict(),
        "cache": str(cache.path), "dataset": to_jsonable(ds.fingerprint()), "config": to_jsonable(cfg),
        "train_episodes": result["train_episodes"], "heldout_episodes": result["heldout_episodes"],
    })
    m = result["heldout"]
    beats = [m["mse"][k] < m["baseline_mse"][k] for k in range(cfg.horizon)]
    atomic_write_json(out / "metrics.json", {"heldout": m, "beats_copy_the_present_mse": beats,
                                             "num_heldout_episodes": len(result["heldout_episodes"])})
    _print_table(m, f"Prophet vs copy-the-present, {len(result['heldout_episodes'])} held-out episodes "
                    "(standardised latents)")
    print(f"prophet: wrote {out / 'metrics.json'}")
    return 0
