"""GPU check of the FSDP path (`wmvla train --distributed fsdp`): the building blocks of train/fsdp.py on CUDA
with NCCL, on as many GPUs as there are (also one: a 1-process mesh still runs every FSDP2 code path).

    torchrun --nproc_per_node 2 benchmarks/check_fsdp_gpu.py            # full fine-tuning, fp32 frozen
    torchrun --nproc_per_node 2 benchmarks/check_fsdp_gpu.py --lora     # LoRA, bf16 frozen weights, autocast

The tiny policy on random batches: rank 0 trains an unsharded copy on the whole batch (fused AdamW, as the
loop on CUDA), every rank trains the FSDP2-sharded one on its slice (fused AdamW over DTensors, DTensor
gradient clipping, EMA on shards, first-steps checks over shards); then the gathered weights / optimizer
state / EMA are compared with the unsharded ones, and the optimizer state is set back into the shards.
Prints one JSON line per check on rank 0; exits non-zero on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> int:
    from vla_core.policy.modeling import VLAPolicy
    from vla_core.policy.tiny import random_batch, tiny_norm_stats, tiny_policy_config
    from vla_core.train.checks import ParamSnapshot, check_first_step, grad_status
    from vla_core.train.config import get_preset
    from vla_core.train.ema import EMA
    from vla_core.train.fsdp import (all_reduce_max, full, full_model_state, full_optimizer_state, load_optimizer_state,
                                  shard_policy)
    from vla_core.train.loop import build_optimizer

    lora = "--lora" in sys.argv
    cuda = "--cpu" not in sys.argv  # --cpu: the same on gloo (a check of this script)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    pcfg = tiny_policy_config(memory="pred", rollout_memory="pred", finetune="lora" if lora else "full",
                              autocast_bf16=lora, frozen_dtype="bfloat16" if lora else "float32")
    tcfg = get_preset("tiny")
    stats = tiny_norm_stats(pcfg)
    batch_size, steps = 4 * world, 3
    batches = [random_batch(pcfg, batch_size=batch_size, seed=s, image_hw=32) for s in range(steps)]

    def part(b, r):  # rank r's slice of a global batch
        n = batch_size // world
        return {k: v[r * n:(r + 1) * n] for k, v in b.items()}

    ref = None
    if rank == 0:
        ref = VLAPolicy(pcfg, stats).to(device)
        ref_opt = build_optimizer(ref, tcfg, fused=cuda)
        ref_ema = EMA(dict(ref.trainable_parameters()), 0.9)
    pol = VLAPolicy(pcfg, stats)
    counts = shard_policy(pol, device)
    opt = build_optimizer(pol, tcfg, fused=cuda)
    ema = EMA(dict(pol.trainable_parameters()), 0.9)
    snap = ParamSnapshot(pol)
    out = {"world": world, "lora": lora, **counts, "curve": [], "ref_curve": []}
    for s, b in enumerate(batches):
        mine = part(b, rank)  # masked means weighted by the global counts of valid terms, as the loop does
        counts = torch.tensor(pol.loss_counts(mine), dtype=torch.float64, device=device)
        total = counts.clone()
        dist.all_reduce(total)
        loss = pol(mine, loss_weights=tuple((counts * world / total.clamp_min(1e-12)).tolist()))["loss"]
        loss.backward()
        if s == 0:
            seen = grad_status(pol, all_reduce_max)
        norm = float(full(torch.nn.utils.clip_grad_norm_(pol.parameters(), 1.0)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        out["curve"].append((float(lt) / world, norm))
        if rank == 0:
            rl = ref(b)["loss"]
            rl.backward()
            rn = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            ref_ema.update()
            out["ref_curve"].append((float(rl.detach()), rn))
        if s == 0:
            check_first_step(pol, snap, seen, pol.first_step_zero_grad_patterns(), all_reduce_max)
    weights = full_model_state(pol)
    optim_state = full_optimizer_state(pol, opt)
    ema_state = ema.state_dict()
    ok = True
    if rank == 0:
        from vla_core.train.checkpoint import trained_state_dict

        want = trained_state_dict(ref)
        out["weights_max_diff"] = max(float((weights[k] - want[k]).abs().max()) for k in want)
        out["same_names"] = sorted(weights) == sorted(want)
        ro = ref_opt.state_dict()
        out["optim_groups_equal"] = ro["param_groups"] == optim_state["param_groups"]
        out["optim_max_diff"] = max(float((optim_state["state"][i][k].float() - v.float().cpu()).abs().max())
                                    for i, st in ro["state"].items() for k, v in st.items())
        re = ref_ema.state_dict()
        out["ema_max_diff"] = max(float((ema_state[k] - re[k]).abs().max()) for k in re)
        curve_diff = max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-6) for a, b in zip(out["curve"], out["ref_curve"]))
        out["loss_rel_diff"] = curve_diff
        tol = 2e-2 if lora else 1e-4  # bf16 autocast: batch-size-dependent kernels round differently
        ok = (out["same_names"] and out["optim_groups_equal"] and out["weights_max_diff"] < tol
              and out["optim_max_diff"] < tol and out["ema_max_diff"] < tol and curve_diff < tol)
    # the optimizer state back into the shards: gathering again gives the same state
    saved = [optim_state]
    dist.broadcast_object_list(saved, src=0)
    load_optimizer_state(pol, opt, saved[0])
    again = full_optimizer_state(pol, opt)
    if rank == 0:
        out["optim_round_trip_equal"] = all(torch.equal(again["state"][i][k], v) for i, st in optim_state["state"].items()
                                            for k, v in st.items())
        ok = ok and out["optim_round_trip_equal"]
        out["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
        out["ok"] = ok
        print(json.dumps(out), flush=True)
    flag = torch.tensor([int(ok)], device=device)
    dist.broadcast(flag, 0)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if int(flag) else 1


if __name__ == "__main__":
    raise SystemExit(main())
