"""Exponential moving average of the *trainable* weights only.

Written by hand instead of `torch.optim.swa_utils.AveragedModel` because that deep-copies the whole
module, frozen base model included (GBs for a 2B backbone), while only the trained weights change.
The shadow copy is fp32 and lives on the parameters' device.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = named_params
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        # Warm up the decay (as timm/Karras do) so early averages are not dominated by the random init.
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [self.params[n].detach().float() for n in names], 1.0 - decay
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the trainable parameters: {sorted(missing)[:10]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)
        self.num_updates = num_updates

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (for validation), then restore."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])
