"""Action heads on the normalised action chunk [B, H, A], conditioned on the ACT states [B, H, d].

MSEHead: one MLP shared across the H positions, ACT state i -> action i; loss = MSE over valid steps.

FlowHead: rectified flow (flow matching) over the whole chunk.
  Convention (Liu et al. 2022 "rectified flow"; openpi uses the mirrored one with t=1 at the noise):
      x_0 ~ N(0, I) [B, H, A] (noise, one draw for the whole chunk), x_1 = the action chunk (data),
      x_t = (1 - t) x_0 + t x_1,  target velocity u = x_1 - x_0,
      sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (actions).
  Euler on the grid t_i = i / N, i = 0..N-1: x_{i+1} = x_i + v(x_i, t_i) / N. Querying the velocity at the
  left end of each step is what makes the last step land on t = 1; the earlier attempt queried t_{i+1} and
  so never evaluated the field where it integrates from (a test integrates a known field exactly).
  The velocity network is a small transformer over the H chunk positions (self-attention across the chunk,
  so the actions of a chunk are predicted jointly, not per token): token i = W_a x_t[i] + W_c ACT_i + pos_i;
  the flow time (sinusoidal embedding + MLP) is added to every token and modulates every block through adaLN
  (shift/scale, initialised to zero, i.e. plain LayerNorm at the start).
  Padded chunk steps (past the episode end) are excluded from the loss but stay in the chunk's attention, as
  at inference, where all H positions are sampled together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the valid chunk steps (mask [B, H] True = real action, False = padding)."""
    se = (pred.float() - target.float()).pow(2)
    if mask is None:
        return se.mean()
    m = mask.to(se.dtype).unsqueeze(-1)
    return (se * m).sum() / (m.sum() * se.shape[-1]).clamp_min(1.0)


class MSEHead(nn.Module):
    def __init__(self, width: int, hidden: int, action_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, action_dim),
        )

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond)

    def loss(self, cond: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return masked_mse(self(cond), actions, mask)

    def predict(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                steps: int | None = None) -> torch.Tensor:
        return self(cond).float()


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """t [B] in [0, 1] -> [B, dim]: sin/cos at periods spaced geometrically in [min_period, max_period]."""
    half = dim // 2
    frac = torch.linspace(0.0, 1.0, half, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** frac
    angle = 2 * math.pi * t.float()[:, None] / period[None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def euler_integrate(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                    steps: int) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t=0 to t=1 in `steps` Euler steps, querying t_i = i/steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = x0
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, device=x.device, dtype=torch.float32)
        x = x + dt * velocity(x, t).to(x.dtype)
    return x


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block; LayerNorm shift/scale come from the conditioning vector (adaLN)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 4 * width)
        nn.init.zeros_(self.ada.weight)  # start as plain LayerNorm; still gets a gradient at step 1
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        shift1, scale1, shift2, scale2 = self.ada(F.silu(c))[:, None].chunk(4, dim=-1)
        y = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(y).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # bidirectional across the chunk
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        y = self.norm2(x) * (1 + scale2) + shift2
        return x + self.mlp(y)


class FlowHead(nn.Module):
    def __init__(self, width: int, flow_width: int, depth: int, heads: int, action_dim: int, chunk_size: int,
                 steps: int, time_sampling: str = "uniform"):
        super().__init__()
        self.flow_width, self.action_dim, self.chunk_size = flow_width, action_dim, chunk_size
        self.steps, self.time_sampling = steps, time_sampling
        self.action_in = nn.Linear(action_dim, flow_width)
        self.cond_in = nn.Linear(width, flow_width)
        self.pos = nn.Parameter(torch.randn(chunk_size, flow_width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(flow_width, flow_width), nn.SiLU(), nn.Linear(flow_width, flow_width))
        self.blocks = nn.ModuleList(AdaLNBlock(flow_width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(flow_width)
        self.out = nn.Linear(flow_width, action_dim)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t [B, H, A], t [B], cond [B, H, d] -> velocity [B, H, A]."""
        c = self.time_mlp(sinusoidal_time_embedding(t, self.flow_width))  # [B, w]
        # time enters additively (effective from initialisation) and through every block's adaLN
        tok = self.action_in(x_t) + self.cond_in(cond) + self.pos + c[:, None]
        for block in self.blocks:
            tok = block(tok, c)
        return self.out(self.final_norm(tok))

    def sample_time(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, device=device, generator=generator)
        if self.time_sampling == "beta":
            u = 1 - u.pow(1 / 1.5)  # 1 - Beta(1.5, 1) (inverse CDF): more samples near the noise end t=0
        return u.clamp(0.0, 0.999)

    def loss(self, cond: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        x1 = actions.float()
        x0 = torch.randn(x1.shape, device=x1.device, generator=generator)
        t = self.sample_time(x1.shape[0], x1.device, generator)
        x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * x1
        v = self.velocity(x_t, t, cond)
        return masked_mse(v, x1 - x0, mask)

    @torch.no_grad()
    def predict(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                steps: int | None = None) -> torch.Tensor:
        """Sample a chunk [B, H, A]: noise for the whole chunk from `generator`, Euler from t=0 to t=1."""
        b = cond.shape[0]
        x0 = torch.randn((b, self.chunk_size, self.action_dim), device=cond.device, generator=generator)
        return euler_integrate(lambda x, t: self.velocity(x, t, cond).float(), x0, steps or self.steps)
