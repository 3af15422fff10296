"""FSDP for `wmvla train --distributed fsdp`: PyTorch's own FSDP2 (`fully_shard`), applied by the loop.

Why the loop shards the model itself instead of through accelerate's FSDP plugin: accelerate enables FSDP
only for GPU launches (under a CPU launch it silently runs DDP), so its path could not be tested here,
while `torch.distributed.fsdp.fully_shard` runs the same code on CPU with gloo (the tests) and on GPUs
with NCCL. The launch stays `accelerate launch` / `torchrun` unchanged; accelerate still provides the
process group, the device of each process and the small reductions of the loop.

What is sharded (one FSDP unit each, parameters all-gathered just for the unit's forward / backward):
every vision block, the vision tower's remainder (patch embedding, position embedding, mergers), the
token embedding (the 151k x d matrix with the <ACT_i> rows), every decoder layer of the language model,
the Prophet (validation calls it on its own), and the root: the small new modules (readout norm, state
projection, memory attention, head) and the final norm. Parameters are sharded along dim 0 (FSDP2's
`Shard(0)`); a rank's shard of a tensor with fewer rows than processes may be empty.

Precision: no `MixedPrecisionPolicy`: the shards keep the parameters' own dtypes (trainable fp32, frozen
bf16 on GPU), the all-gathered weights are those same tensors, the policy's bf16 autocast does the casts
exactly as in one process, and gradients are reduced in fp32. Adam states live on the fp32 shards.
Trainable and frozen parameters (LoRA, frozen vision tower) and several dtypes may share a unit: FSDP2
all-gathers mixed dtypes and reduce-scatters only the gradients that exist.

Everything that reads whole tensors goes through this module:
  - `local` (a parameter's or gradient's local shard) for the first-steps checks and EMA, with
    `all_reduce_max` combining per-shard results into the whole tensor's;
  - `full_model_state` / `full_optimizer_state`: the trainable weights + persistent buffers and the AdamW
    state gathered to rank 0 (on the CPU) with `torch.distributed.checkpoint.state_dict`, the optimizer
    state renumbered into the format `optimizer.state_dict()` of one process has, so the checkpoint is
    the same ordinary checkpoint a single process writes;
  - `load_optimizer_state`: the other way (resume); the weights are loaded before sharding.
"""

from __future__ import annotations

import torch
from torch import nn

from vla_core.utils import WmvlaError


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a parameter or gradient under FSDP); any other tensor unchanged."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it, in the same order)."""
    return t.full_tensor() if is_dtensor(t) else t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max over all processes (in place; returns `t`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def fsdp_units(policy: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every FSDP unit below the root, innermost first (the order `fully_shard` needs)."""
    model = policy.backbone.model
    names = {id(m): n for n, m in policy.named_modules()}
    units: list[nn.Module] = []
    visual = getattr(model, "visual", None)
    if visual is not None:
        units += list(getattr(visual, "blocks", []))
        units.append(visual)
    lm = getattr(model, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise WmvlaError(f"--distributed fsdp: {type(model).__name__} has no language_model.layers to shard")
    units.append(lm.embed_tokens)
    units += list(lm.layers)
    if getattr(policy, "prophet", None) is not None:
        units.append(policy.prophet)
    return [(names[id(m)], m) for m in units]


def shard_policy(policy: nn.Module, device: torch.device) -> dict[str, int]:
    """Apply FSDP2 to the policy in place (units of `fsdp_units`, then the root) on a 1-D mesh over all
    processes of the default process group; move the shards to `device`. Returns counts for the log."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not (dist.is_available() and dist.is_initialized()):
        raise WmvlaError("--distributed fsdp needs a process group: launch with accelerate launch / torchrun")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = fsdp_units(policy)
    for _, module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    # methods that run the model outside `forward` must gather the root's parameters too
    register_fsdp_forward_method(policy, "predict_normalized")
    n_local = sum(local(p).numel() for p in policy.parameters())
    n_total = sum(p.numel() for p in policy.parameters())
    return {"units": len(units) + 1, "processes": dist.get_world_size(), "local_parameters": n_local,
            "total_parameters": n_total}


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + persistent buffers as whole CPU tensors on rank 0 ({} on the other ranks);
    the checkpoint's model.safetensors content. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(policy, options=_state_options(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))
    return {n: t.detach().contiguous() for n, t in state.items()}


def _param_names(policy: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in policy.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of the whole model on rank 0 ({} on the others), in the format of one process's
    `optimizer.state_dict()` (state keyed by parameter index, whole CPU tensors). A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    gathered = get_optimizer_state_dict(policy, optimizer,
                                        options=_state_options(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    names = _param_names(policy, optimizer)
    local_sd = optimizer.state_dict()  # param_groups: the same hyperparameters and index lists as one process
    state = {i: gathered["state"][n] for i, n in enumerate(names) if n in gathered["state"]}
    return {"state": state, "param_groups": local_sd["param_groups"]}


def load_optimizer_state(policy: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Set a saved (one-process format, whole tensors) optimizer state into the sharded optimizer; every rank
    passes the same `saved` and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(policy, optimizer)
    n_saved = sum(len(g["params"]) for g in saved["param_groups"])
    if n_saved != len(names) or len(saved["param_groups"]) != len(optimizer.param_groups):
        raise WmvlaError(f"the saved optimizer state has {n_saved} parameters in {len(saved['param_groups'])} groups, "
                         f"this optimizer {len(names)} in {len(optimizer.param_groups)}")
    by_name = {"state": {names[int(i)]: v for i, v in saved["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(policy, optimizer, by_name, options=_state_options(full_state_dict=True))
    # the hyperparameters exactly as saved (the round trip above turns the betas tuple into a list)
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
