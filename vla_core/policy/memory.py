"""Model-F world memory: gated cross-attention from the <ACT_i> states (queries) to K world latents (keys/values).

    kv  = LN_kv(W_m m_k + e_k)                 m_k: memory latent k (standardised), e_k: learned k-step embedding
    out = h + tanh(g) * Attn(LN_q(h), kv, kv)  g: learned gate (scalar or per channel), initialised to 0

The gate starts closed, so a policy with the memory behaves exactly like the one without it (E1 == E0 at
initialisation), and d tanh(g)/dg = 1 at g = 0 gives the gate a gradient from the first step. There is
deliberately no shortcut that skips the attention when the gate is (nearly) closed: the earlier attempt's
`if |tanh(g)| < 1e-6: return h` blocked exactly that gradient and its gate never opened.

Memory modes (chosen independently for training and rollout by the policy, see modeling.py) decide what
`m` is; this module only consumes it and refuses non-finite values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vla_core.utils import WmvlaError


class GatedMemoryAttention(nn.Module):
    def __init__(self, width: int, world_dim: int, horizon: int, heads: int, gate: str = "scalar"):
        super().__init__()
        if width % heads:
            raise WmvlaError(f"memory: width {width} is not divisible by memory_heads {heads}")
        self.width, self.heads, self.horizon = width, heads, horizon
        self.mem_proj = nn.Linear(world_dim, width)
        self.step_embed = nn.Parameter(torch.randn(horizon, width) * 0.02)
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)  # a key bias cannot change a softmax over keys
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.zeros(1 if gate == "scalar" else width))

    def forward(self, h: torch.Tensor, memory: torch.Tensor, check_finite: bool = True) -> tuple[torch.Tensor, dict]:
        """h [B, H, d] (ACT states), memory [B, K, D] -> (h + tanh(g) * attn [B, H, d], diagnostics).

        check_finite=False: instead of checking here (a host sync in the middle of the step), return the check
        as `memory_finite` (a bool tensor) in the diagnostics; the caller must call `raise_if_not_finite` with
        it before it uses anything computed from this step (the trainer: after backward, before the update)."""
        if memory.ndim != 3 or memory.shape[1] != self.horizon or memory.shape[0] != h.shape[0]:
            raise WmvlaError(f"memory must be [B={h.shape[0]}, K={self.horizon}, D], got {tuple(memory.shape)}")
        finite = torch.isfinite(memory).all()
        if check_finite:
            raise_if_not_finite(finite)
        b, n_q, d = h.shape
        nh, hd = self.heads, d // self.heads
        kv = self.norm_kv(self.mem_proj(memory.to(self.mem_proj.weight.dtype)) + self.step_embed)
        q = self.q_proj(self.norm_q(h)).view(b, n_q, nh, hd).transpose(1, 2)
        k = self.k_proj(kv).view(b, -1, nh, hd).transpose(1, 2)
        v = self.v_proj(kv).view(b, -1, nh, hd).transpose(1, 2)
        # explicit softmax attention (K is a handful of slots): we also want the weights for the entropy log
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(hd), dim=-1)  # [B, nh, H, K]
        attn = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, n_q, d)
        out = h + torch.tanh(self.gate).to(h.dtype) * self.out_proj(attn).to(h.dtype)
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
        info = {
            "memory_finite": finite,
            "gate": torch.tanh(self.gate.detach()).abs().mean(),
            "attn_entropy": entropy.detach(),
            "attn_entropy_max": torch.tensor(math.log(self.horizon), device=h.device),
        }
        return out, info


def raise_if_not_finite(memory_finite: torch.Tensor | bool) -> None:
    if not bool(memory_finite):
        raise WmvlaError("world memory contains NaN/Inf values. Check the latent cache (wmvla latents refuses NaN "
                         "rows) and the Prophet's outputs; a non-finite memory would silently poison the policy.")


def random_like_memory(memory: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian memory whose per-slot norms equal the given memory's ([B, K, D] -> [B, K, D])."""
    noise = torch.randn(memory.shape, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else memory.device).to(memory.device)
    scale = memory.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (noise * scale).to(memory.dtype)


class ShuffleBank:
    """Memories from earlier calls, for shuffle mode at batch size 1 (there is no other sample to borrow from)."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[torch.Tensor] = []

    def push(self, memory: torch.Tensor) -> None:
        for m in memory.detach():
            self.items.append(m.clone())
        del self.items[: max(0, len(self.items) - self.size)]

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if not self.items:
            return None
        device = generator.device if generator is not None else "cpu"
        idx = torch.randint(len(self.items), (n,), generator=generator, device=device)
        return torch.stack([self.items[i] for i in idx.tolist()])
