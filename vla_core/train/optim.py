"""AdamW with low-precision moments on fp32 master weights, and the bf16-offset EMA it can carry.

Why: full fine-tuning of Qwen3-VL-2B (2.17 B trainable parameters) holds fp32 weights (8.7 GB), fp32 gradients
(8.7 GB), fp32 Adam moments (17.4 GB) and an fp32 EMA (8.7 GB): 43.5 GB before a single activation, more than
an L40S (48 GB) can give. The two large states that tolerate lower precision are kept in bfloat16 here; the
weights the optimizer updates stay fp32 (LESSONS.md: bf16 weights updated by AdamW stop moving).

`AdamWLowMem` is `torch.optim.AdamW` (decoupled weight decay, bias correction, the same order of operations)
with `exp_avg` / `exp_avg_sq` stored in `state_dtype`. Each step upcasts a chunk of a moment to fp32, updates it
in fp32, uses the fp32 value for the weight update and stores it rounded back. A bf16 moment keeps 8 bits of
mantissa: an EMA whose per-step weight (1 - beta) is far below 2^-8 would round its updates away, so
bf16 moments are refused for 1 - beta2 < 1/64 (the presets use betas (0.9, 0.95)). With `state_dtype=float32`
the step equals torch's AdamW (tested), so one optimizer class serves both settings.

`OffsetEMA` keeps the EMA of the weights as a bf16 *offset* from the live fp32 weights, e = w + o. A plain
bf16 EMA would be useless for fine-tuning: its resolution (2^-9 of the weight) is coarser than the whole
fine-tuning change of most weights, so it would stay at the rounded initial weights. The offset o is the
distance between the EMA and the weights (the last few hundred updates), so its rounding error is 2^-9 of
that distance. The update needs the step's weight change d = w_new - w_old, which only the optimizer sees
chunk by chunk (keeping w_old would cost the 8.7 GB saved), so the optimizer folds it in:
o <- decay * (o - d)  (= e_new - w_new for e_new = decay * e_old + (1 - decay) * w_new).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from vla_core.utils import WmvlaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# below this (1 - beta) a bf16 moment loses most of each update to rounding (8 mantissa bits)
MIN_BF16_ONE_MINUS_BETA = 1 / 64
CHUNK = 1 << 24  # elements per fp32 temporary (64 MB): the 151k x 2048 embedding is not upcast whole


def _chunks(t: torch.Tensor, n: int = CHUNK):
    return t.view(-1).split(n)


def _update_chunk(w, g, m_s, v_s, o, hp):
    """One chunk's AdamW update in fp32, written back in place (moments in their storage dtype). `hp`: a
    float32 tensor [lr, weight_decay, beta1, beta2, bias_correction1, sqrt(bias_correction2), eps, ema_decay]
    on the device, so a compiled version never recompiles for new scalar values. `o`: the EMA offset or None.
    Eager, this is ~14 kernels per chunk (~130 bytes moved per parameter); compiled (`AdamWLowMem(compiled=)`)
    it is one fused kernel (~20 bytes per parameter, ~26 with the offset)."""
    lr, wd, beta1, beta2, bc1, bc2_sqrt, eps, decay = hp.unbind()
    g = g.float()
    m = m_s.float().lerp(g, 1 - beta1)
    v = v_s.float() * beta2 + g * g * (1 - beta2)
    w_new = w * (1 - lr * wd) - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
    if o is not None:  # o <- decay * (o - (w_new - w_old))
        o.copy_(((o.float() + (w - w_new)) * decay).to(o.dtype))
    m_s.copy_(m.to(m_s.dtype))
    v_s.copy_(v.to(v_s.dtype))
    w.copy_(w_new)


_compiled_update = None


def _compiled_update_chunk():
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(_update_chunk, dynamic=True, fullgraph=True)
    return _compiled_update


class AdamWLowMem(torch.optim.Optimizer):
    """AdamW over fp32 parameters with moments stored in `state_dtype` (bfloat16 or float32)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 state_dtype: str | torch.dtype = "bfloat16", compiled: bool | None = None):
        dtype = DTYPES[state_dtype] if isinstance(state_dtype, str) else state_dtype
        if dtype == torch.bfloat16 and min(1 - betas[0], 1 - betas[1]) < MIN_BF16_ONE_MINUS_BETA:
            raise WmvlaError(f"bfloat16 Adam moments with betas {tuple(betas)}: 1 - beta below "
                             f"{MIN_BF16_ONE_MINUS_BETA:.4f} rounds most updates of the moment away. Use "
                             "--optim.adam-state-dtype float32, or betas with beta2 <= 0.984 (the presets: 0.95)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = dtype
        # one fused kernel per chunk (torch.compile) instead of ~14 eager ones; default: on CUDA
        self.compiled = compiled
        self.ema: OffsetEMA | None = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise WmvlaError(f"AdamWLowMem needs float32 (master) parameters, found {p.dtype}")

    def _init_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decay = self.ema.next_decay() if self.ema is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            hps: dict = {}  # (step, device) -> the scalars as one device tensor: one copy per group, not per tensor
            for p in group["params"]:
                offset = self.ema.offset_of(p) if self.ema is not None else None
                if p.grad is None:
                    if offset is not None:  # the weight did not move: e_new - w = decay * (e_old - w)
                        offset.mul_(decay)
                    continue
                if p.grad.is_sparse:
                    raise WmvlaError("AdamWLowMem does not support sparse gradients")
                st = self._init_state(p)
                st["step"] += 1
                t = float(st["step"])
                bc1, bc2_sqrt = 1 - beta1 ** t, (1 - beta2 ** t) ** 0.5
                compiled = self.compiled if self.compiled is not None else p.is_cuda
                update = _compiled_update_chunk() if compiled else _update_chunk
                hp = hps.get((t, p.device))
                if hp is None:
                    hp = hps[(t, p.device)] = torch.tensor([lr, wd, beta1, beta2, bc1, bc2_sqrt, eps, decay or 0.0],
                                                           dtype=torch.float32, device=p.device)
                parts = zip(_chunks(p), _chunks(p.grad), _chunks(st["exp_avg"]), _chunks(st["exp_avg_sq"]),
                            _chunks(offset) if offset is not None else iter(lambda: None, 0))
                for w, g, m_s, v_s, o in parts:
                    update(w, g, m_s, v_s, o, hp)
        if self.ema is not None:
            self.ema.folded = True
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts every state tensor to its parameter's dtype (fp32): the bf16 moments would come
        back twice their size, all at once. Load the groups through torch, the moments one by one in our dtype."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            s = saved.get(i)
            if s is None:
                continue
            self.state[p] = {"step": torch.as_tensor(s["step"], dtype=torch.float32).detach().clone().cpu(),
                             "exp_avg": s["exp_avg"].to(p.device, self.state_dtype),
                             "exp_avg_sq": s["exp_avg_sq"].to(p.device, self.state_dtype)}


class OffsetEMA:
    """EMA of the trainable weights stored as a bf16 offset from the fp32 weights, updated by `AdamWLowMem`.

    The same interface as `train.ema.EMA` (update / state_dict / load_state_dict / swapped_in / num_updates):
    `update()` after `optimizer.step()` only counts (the optimizer already folded the step in) and checks that
    it did; state_dict() returns fp32 weights + offsets, the same checkpoint file as the fp32 EMA writes.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, optimizer: AdamWLowMem):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if not isinstance(optimizer, AdamWLowMem):
            raise WmvlaError("the bf16-offset EMA (--optim.ema-dtype bfloat16) is updated inside AdamWLowMem; "
                             f"got {type(optimizer).__name__}")
        self.decay = decay
        self.params = named_params
        self.offsets = {n: torch.zeros_like(p, dtype=torch.bfloat16) for n, p in named_params.items()}
        self._by_param = {id(p): self.offsets[n] for n, p in named_params.items()}
        self.num_updates = 0
        self.folded = False
        optimizer.ema = self

    def next_decay(self) -> float:
        """The decay of the coming update, warmed up as `train.ema.EMA` does."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    def offset_of(self, p: torch.Tensor) -> torch.Tensor | None:
        return self._by_param.get(id(p))

    def update(self) -> None:
        if not self.folded:
            raise WmvlaError("OffsetEMA.update() without an AdamWLowMem step before it: the EMA would miss a step")
        self.folded = False
        self.num_updates += 1

    @torch.no_grad()
    def _ema(self, name: str) -> torch.Tensor:
        return self.params[name].detach().float() + self.offsets[name].float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: self._ema(n).cpu() for n in self.offsets}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """`state`: fp32 EMA weights (what `state_dict` returns); load the model's weights first."""
        missing = set(self.offsets) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the trainable parameters: {sorted(missing)[:10]}")
        for n, t in state.items():
            self.offsets[n].copy_(t.to(self.offsets[n].device, torch.float32) - self.params[n].detach().float())
        self.num_updates = num_updates

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (w += o), then restore exactly (w_old kept on the
        CPU: a GPU copy of all weights is what this class exists to avoid)."""
        backup = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.add_(self.offsets[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n].to(p.device))
