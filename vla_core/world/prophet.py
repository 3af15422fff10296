"""The Prophet: predict the next K world latents from an ordered history of T latents.

Input z_{t-T+1..t} (raw latents as cached, [B, T, D]); output z_{t+1..t+K} ([B, K, D], raw, absolute).

- Order matters: every history slot and every future slot has its own learned time embedding (the first
  attempt's Prophet had none, so its history was an unordered set).
- Delta prediction (default): the network predicts z_{t+k} - z_t and the forward adds z_t back, so the
  untrained model (zero-initialised output layer) is exactly the copy-the-present baseline and training
  only has to learn the change.
- Latent normalisation: the Prophet holds per-dimension mean/std buffers (`set_normalization`, saved in its
  state dict). Inputs are standardised before the network, and the loss and metrics are computed on
  standardised latents, so no dimension with a large offset or variance dominates the MSE and the cosine
  is not dominated by the latents' common mean (mean-pooled ViT features share a large mean direction;
  raw cosines are all close to 1). forward() still returns raw latents.
- Loss: "mse" (standardised squared error), "cosine" (1 - cosine of standardised vectors) or "both"
  (their sum), averaged over the (sample, k) pairs whose future is inside the episode (`mask`).
- Metrics per k (standardised space): cosine of the absolute prediction, cosine of the predicted delta
  (z_hat_{t+k} - z_t vs z_{t+k} - z_t), MSE; the same for the copy-the-present baseline (z_hat = z_t: its
  delta is 0, so its delta cosine is 0 by definition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from vla_core.data.windows import clamp_indices, future_offsets, history_offsets
from vla_core.utils import WmvlaError


@dataclass(frozen=True)
class ProphetConfig:
    """Sizes of the Prophet. `dim` must equal the latent cache's D."""

    dim: int = 1408  # latent size D (V-JEPA 2 ViT-g: 1408, ViT-L: 1024, tiny: 64)
    history: int = 4  # T: latents z_{t-T+1..t} given as input
    horizon: int = 4  # K: latents z_{t+1..t+K} predicted
    width: int = 256  # transformer width
    depth: int = 2  # transformer layers
    heads: int = 4
    delta: bool = True  # predict z_{t+k} - z_t (memory = z_t + delta)
    loss: Literal["cosine", "mse", "both"] = "both"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in ("cosine", "mse", "both"):
            raise WmvlaError(f"ProphetConfig.loss must be cosine|mse|both, got {self.loss!r}.")
        if self.width % self.heads:
            raise WmvlaError(f"ProphetConfig.width ({self.width}) must be divisible by heads ({self.heads}).")
        if self.history < 1 or self.horizon < 1:
            raise WmvlaError(f"ProphetConfig history/horizon must be >= 1, got {self.history}/{self.horizon}.")


class Prophet(nn.Module):
    def __init__(self, cfg: ProphetConfig):
        super().__init__()
        self.cfg = cfg
        d, w = cfg.dim, cfg.width
        self.register_buffer("latent_mean", torch.zeros(d))
        self.register_buffer("latent_std", torch.ones(d))
        self.in_proj = nn.Linear(d, w)
        # positions t-T+1 .. t (history) then t+1 .. t+K (future queries): one learned embedding each
        self.time_embed = nn.Parameter(torch.randn(cfg.history + cfg.horizon, w) * 0.02)
        self.future_query = nn.Parameter(torch.randn(1, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 4 * w, cfg.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.out_proj = nn.Linear(w, d)
        if cfg.delta:  # start at copy-the-present: delta = 0
            nn.init.zeros_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)

    # ---------------------------------------------------------------------------- normalisation
    @torch.no_grad()
    def set_normalization(self, mean, std) -> None:
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32)
        if mean.shape != (self.cfg.dim,) or std.shape != (self.cfg.dim,):
            raise WmvlaError(f"normalisation stats must have shape [{self.cfg.dim}], got {tuple(mean.shape)}/{tuple(std.shape)}.")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std.clamp_min(1e-6))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.latent_mean) / self.latent_std

    def denormalize(self, zn: torch.Tensor) -> torch.Tensor:
        return zn * self.latent_std + self.latent_mean

    # ---------------------------------------------------------------------------------- forward
    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """history [B, T, D] (raw latents, oldest first) -> future [B, K, D] (raw, absolute)."""
        cfg = self.cfg
        if history.ndim != 3 or history.shape[1] != cfg.history or history.shape[2] != cfg.dim:
            raise WmvlaError(f"Prophet expects history [B, {cfg.history}, {cfg.dim}], got {tuple(history.shape)}.")
        hn = self.normalize(history)
        b = hn.shape[0]
        tokens = torch.cat(
            [self.in_proj(hn), self.future_query.expand(b, cfg.horizon, -1)], dim=1
        ) + self.time_embed
        out = self.out_proj(self.norm(self.blocks(tokens))[:, cfg.history :])
        pred_n = hn[:, -1:] + out if cfg.delta else out
        return self.denormalize(pred_n)

    # ------------------------------------------------------------------------------------- loss
    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred, target [B, K, D] raw; mask [B, K] bool (False where t+k is past the episode end) -> scalar."""
        pn, tn = self.normalize(pred), self.normalize(target)
        m = mask.to(pn.dtype)
        per = torch.zeros_like(m)
        if self.cfg.loss in ("mse", "both"):
            per = per + (pn - tn).pow(2).mean(-1)
        if self.cfg.loss in ("cosine", "both"):
            per = per + 1 - nn.functional.cosine_similarity(pn, tn, dim=-1, eps=1e-6)
        return (per * m).sum() / m.sum().clamp_min(1.0)

    # ---------------------------------------------------------------------------------- metrics
    @torch.no_grad()
    def metric_sums(self, pred: torch.Tensor, target: torch.Tensor, current: torch.Tensor, mask: torch.Tensor) -> dict:
        """Per-k sums over valid pairs (to accumulate over batches); `current` = z_t [B, D]."""
        pn, tn = self.normalize(pred), self.normalize(target)
        cn = self.normalize(current)[:, None].expand_as(tn)
        m = mask.float()
        cos = nn.functional.cosine_similarity
        terms = {
            "cos_abs": cos(pn, tn, dim=-1, eps=1e-6),
            "cos_delta": cos(pn - cn, tn - cn, dim=-1, eps=1e-6),
            "mse": (pn - tn).pow(2).mean(-1),
            "baseline_cos_abs": cos(cn, tn, dim=-1, eps=1e-6),
            "baseline_cos_delta": torch.zeros_like(m),  # copy-the-present predicts no change
            "baseline_mse": (cn - tn).pow(2).mean(-1),
        }
        out = {k: (v * m).sum(0).double().cpu() for k, v in terms.items()}
        out["count"] = m.sum(0).double().cpu()
        return out

    @staticmethod
    def finalize_metrics(sums: dict) -> dict:
        """Accumulated `metric_sums` -> {name: [K] list of means}, plus `count` per k."""
        n = sums["count"].clamp_min(1.0)
        out = {k: (v / n).tolist() for k, v in sums.items() if k != "count"}
        out["count"] = sums["count"].long().tolist()
        return out

    def metrics(self, pred: torch.Tensor, target: torch.Tensor, current: torch.Tensor, mask: torch.Tensor) -> dict:
        """Per-k metrics of one batch (see module docstring): {name: list of K floats}."""
        return self.finalize_metrics(self.metric_sums(pred, target, current, mask))


def add_metric_sums(total: dict | None, new: dict) -> dict:
    if total is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: total[k] + new[k] for k in total}


def episode_windows(starts, lengths, history: int, horizon: int):
    """History/future global indices for every frame of the given episodes (the data module's clamping).

    Returns (frame_index [N], history_index [N, T], future_index [N, K], future_mask [N, K]): history
    t-T+1..t clamped at the episode start (repeating its first frame, as ClipBuffer does), future t+1..t+K
    clamped at the episode end with mask False there. Never crosses an episode boundary.
    """
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if np.any(lengths < 1):
        raise WmvlaError("episode_windows: every episode needs at least one frame.")
    ep = np.repeat(np.arange(len(starts)), lengths)
    pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # step within episode
    t = starts[ep] + pos
    hist, _ = clamp_indices(t, starts[ep], lengths[ep], history_offsets(history))
    fut, mask = clamp_indices(t, starts[ep], lengths[ep], future_offsets(horizon))
    return t, hist, fut, mask
