"""Loud start-up and first-step checks that turn the earlier attempt's silent failures into errors.

- `check_fp32_trainable`: trainable weights must be fp32 (bf16 weights updated by AdamW without fp32
  master copies stall: a gate starting at 0 stuck at -2^-6 in every E2 run of the earlier attempt).
- `check_optimizer_covers`: every parameter that requires grad is in the optimizer (LoRA adapters
  received gradients but were never given to the optimizer).
- `ParamSnapshot` + `check_first_step`: after the first optimizer step every trainable parameter that
  received a gradient has changed, none received an all-zero/absent gradient unless explicitly allowed,
  and no frozen parameter changed.
- `check_optimizer_state_fp32`: Adam moments are fp32 after the first step (or the dtype an optimizer with
  fp32 master weights declares as its `state_dtype`: `train.optim.AdamWLowMem`'s bf16 moments).

Under FSDP (`--distributed fsdp`) parameters and gradients are DTensors: the fingerprints and gradient
statistics are taken of each process's local shard and combined with `reduce_max` (an all-reduce MAX over
processes): a tensor changed iff some shard changed; its largest gradient entry is the max over shards.
An empty shard (a tensor with fewer rows than processes) contributes nothing. With one process (or DDP,
whose parameters are whole on every rank) `reduce_max` is None and the shard is the tensor.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch

from vla_core.policy.memory import raise_if_not_finite
from vla_core.train.fsdp import local
from vla_core.utils import WmvlaError

ReduceMax = Callable[[torch.Tensor], torch.Tensor] | None


def _short(names: list[str], n: int = 12) -> str:
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_fp32_trainable(model: torch.nn.Module) -> None:
    bad = [f"{n} ({p.dtype})" for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if bad:
        raise WmvlaError(
            f"trainable parameters must be float32 (bf16 is for autocast compute only), found: {_short(bad)}. "
            "Low-precision trainable weights without fp32 master copies silently stop updating. "
            "fix: build the trainable modules in float32 (the frozen base may be bf16)."
        )


def check_optimizer_covers(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_opt]
    frozen_in_opt = [n for n, p in model.named_parameters() if not p.requires_grad and id(p) in in_opt]
    if missing:
        raise WmvlaError(f"trainable parameters not given to the optimizer (they would never update): {_short(missing)}")
    if frozen_in_opt:
        raise WmvlaError(f"frozen parameters were given to the optimizer: {_short(frozen_in_opt)}")


def check_optimizer_state_fp32(optimizer: torch.optim.Optimizer) -> None:
    """Moments in the optimizer's declared `state_dtype` (float32 unless it declares one), weights fp32."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    want = getattr(inner, "state_dtype", torch.float32)
    bad = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.dtype != torch.float32:
                bad.append(f"parameter:{p.dtype}")
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.numel() > 1 and v.dtype != want:
                    bad.append(f"{k}:{v.dtype}")
    if bad:
        raise WmvlaError(f"optimizer state must be {want} on float32 weights, found {_short(sorted(set(bad)))}")


class ParamSnapshot:
    """Cheap fingerprint of every parameter: (sum, sum of squares, one strided probe) in float64.

    Comparing fingerprints instead of full copies keeps this affordable for a 2B model; an Adam step that
    changes a tensor changes its fingerprint except by astronomically unlikely cancellation.
    """

    def __init__(self, model: torch.nn.Module):
        self.values = {n: self._fingerprint(local(p)) for n, p in model.named_parameters()}

    @staticmethod
    @torch.no_grad()
    def _fingerprint(p: torch.Tensor) -> tuple[float, float, float]:
        x = p.detach().reshape(-1).double()
        probe = x[:: max(1, x.numel() // 97)]
        w = torch.arange(1, probe.numel() + 1, dtype=torch.float64, device=probe.device)
        return (x.sum().item(), (x * x).sum().item(), (probe * w).sum().item())

    def changed(self, model: torch.nn.Module, reduce_max: ReduceMax = None) -> dict[str, bool]:
        """name -> changed since the snapshot; `reduce_max` combines the shards' answers (FSDP)."""
        names = [n for n, _ in model.named_parameters()]
        flags = [self._fingerprint(local(p)) != self.values[n] for n, p in model.named_parameters()]
        if reduce_max is not None:
            device = next(model.parameters()).device
            flags = reduce_max(torch.tensor(flags, dtype=torch.float32, device=device)).cpu().tolist()
        return {n: bool(f) for n, f in zip(names, flags)}


def check_first_step(
    model: torch.nn.Module,
    before: ParamSnapshot,
    grads_seen: dict[str, str],
    allow_no_grad: tuple[str, ...] = (),
    reduce_max: ReduceMax = None,
) -> dict[str, int]:
    """Verify the first optimizer step. `grads_seen`: name -> "none" | "zero" | "ok" recorded before the step.

    `allow_no_grad`: glob patterns of trainable parameters that may legitimately get no/zero gradient
    (e.g. the memory key/value projections in E1, whose memory input is all zeros).
    `reduce_max`: combines per-shard results over processes under FSDP (see the module docstring).
    Returns counts for the log. Raises WmvlaError listing every offending parameter.
    """
    changed = before.changed(model, reduce_max)
    allowed = lambda n: any(fnmatch.fnmatch(n, pat) for pat in allow_no_grad)  # noqa: E731
    no_grad, not_moved, frozen_moved = [], [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = grads_seen.get(n, "none")
            if g in ("none", "zero", "nonfinite"):
                if not allowed(n):
                    no_grad.append(f"{n} ({g} gradient)")
            elif g == "ok" and not changed[n]:
                not_moved.append(n)
        elif changed[n]:
            frozen_moved.append(n)
    problems = []
    if no_grad:
        problems.append(
            "trainable parameters that received no or an all-zero gradient in the first step (unused in the "
            "forward pass, or cut off from the loss, e.g. a gate skipped while it is 0): " + _short(no_grad)
        )
    if not_moved:
        problems.append("trainable parameters with a gradient that did not change (not stepped by the optimizer?): "
                        + _short(not_moved))
    if frozen_moved:
        problems.append("frozen parameters that changed: " + _short(frozen_moved))
    if problems:
        raise WmvlaError("first-step parameter check failed:\n  - " + "\n  - ".join(problems))
    n_train = sum(1 for _, p in model.named_parameters() if p.requires_grad)
    n_small = sum(1 for n, p in model.named_parameters() if p.requires_grad and grads_seen.get(n) == "small")
    return {"trainable_tensors": n_train, "frozen_tensors": len(changed) - n_train, "small_gradient_tensors": n_small}


# Gradient status of a parameter, best first. "ok": large enough that one Adam step (update ~ lr *
# g / (|g| + eps), eps 1e-8) certainly changes the weight; "small": non-zero but below that (e.g. the
# memory's query/key weights while every memory slot is nearly the same, or a softmax-invariant key bias at
# ~1e-12): connected to the loss, but not required to move yet; "zero": exactly zero; "none": no gradient.
ADAM_SIGNIFICANT_GRAD = 1e-8
GRAD_RANK = {"ok": 3, "small": 2, "zero": 1, "nonfinite": 0, "none": 0}


def merge_grad_status(seen: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """Best status per parameter over several steps."""
    out = dict(seen)
    for n, s in new.items():
        if GRAD_RANK[s] > GRAD_RANK.get(out.get(n, "none"), 0) or n not in out:
            out[n] = s
    return out


@torch.no_grad()
def grad_status(model: torch.nn.Module, reduce_max: ReduceMax = None) -> dict[str, str]:
    """name -> "none" | "zero" | "small" | "ok" | "nonfinite" per trainable parameter (after backward).

    Per parameter (has a gradient, has a non-finite entry, largest |entry|) of the local gradient (shard),
    combined over processes by `reduce_max` under FSDP; one host sync for all parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        return {}
    device = next(model.parameters()).device
    rows = []
    for _, p in named:
        if p.grad is None:
            rows.append(torch.zeros(3, dtype=torch.float32, device=device))
            continue
        g = local(p.grad)
        if g.numel() == 0:  # an empty shard: has a gradient, nothing else to say
            rows.append(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float32, device=device))
            continue
        finite = torch.isfinite(g).all()
        m = torch.where(finite, g.abs().max().float(), torch.zeros((), device=g.device))
        rows.append(torch.stack([torch.ones((), device=g.device), (~finite).float(), m]).to(device))
    stats = torch.stack(rows)
    if reduce_max is not None:
        stats = reduce_max(stats)
    out = {}
    for (n, _), (has, nonfinite, m) in zip(named, stats.cpu().tolist()):
        if not has:
            out[n] = "none"
        elif nonfinite:
            out[n] = "nonfinite"
        else:
            out[n] = "zero" if m == 0 else "small" if m < ADAM_SIGNIFICANT_GRAD else "ok"
    return out


def check_step_finite(out: dict, step: int, rank: int = 0) -> None:
    """The step's finiteness checks, read with one host sync after backward and before the update (the policy
    ran with `defer_checks=True`, so nothing inside the step waited on the GPU): a non-finite world memory is
    named as such, any other non-finite loss with its parts. Raising here leaves the weights untouched."""
    flags = [torch.isfinite(out["action_loss"] + out["world_loss"])]
    if "memory_finite" in out:
        flags.append(out["memory_finite"])
    ok = torch.stack(flags).tolist()
    if len(ok) > 1:
        raise_if_not_finite(ok[1])
    if not ok[0]:
        raise WmvlaError(f"step {step}: non-finite loss (action_loss {float(out['action_loss'])}, "
                         f"world_loss {float(out['world_loss'])}) on process {rank}. "
                         "Lower --optim.lr, check the data/latents for extreme values.")
