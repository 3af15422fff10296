"""Exponential moving average of the *trainable* weights only.

Written by hand instead of `torch.optim.swa_utils.AveragedModel` because that deep-copies the whole
module, frozen base model included (GBs for a 2B backbone), while only the trained weights change.
The shadow copy is fp32 and lives on the parameters' device. Under FSDP (`--distributed fsdp`) each
process averages its own shards (the update is element-wise); `state_dict` gathers whole tensors (a
collective there) and `load_state_dict` keeps each process's part of them.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from vla_core.train.fsdp import full, is_dtensor, local


class EMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = named_params
        self.shadow = {n: local(p).detach().float().clone() for n, p in named_params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        # Warm up the decay (as timm/Karras do) so early averages are not dominated by the random init.
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        names = list(self.shadow)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [local(self.params[n]).detach().float() for n in names], 1.0 - decay
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole CPU tensors. With sharded parameters a collective: every process must call it."""
        from torch.distributed.tensor import DTensor

        out = {}
        for n, t in self.shadow.items():
            p = self.params[n]
            if is_dtensor(p):
                t = full(DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                            run_check=False))
            out[n] = t.detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """`state`: whole tensors (what `state_dict` returns); with sharded parameters each process keeps its part."""
        from torch.distributed.tensor import distribute_tensor

        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the trainable parameters: {sorted(missing)[:10]}")
        for n, t in state.items():
            p = self.params[n]
            if is_dtensor(p):  # each rank slices its own shard out of the whole tensor (no communication)
                t = distribute_tensor(t.to(self.shadow[n].device), p.device_mesh, p.placements,
                                      src_data_rank=None).to_local()
            self.shadow[n].copy_(t)
        self.num_updates = num_updates

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (for validation), then restore."""
        backup = {n: local(p).detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                local(p).copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    local(p).copy_(backup[n])
