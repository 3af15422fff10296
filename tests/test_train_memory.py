"""Issue 21: the memory levers and the faster step compute what the reference step computes (CPU, tiny model).

- micro-batches (a loaded batch split inside the step) give the full batch's loss and gradients;
- `AdamWLowMem` with fp32 moments is torch's AdamW; with bf16 moments it tracks it and refuses betas whose
  updates bf16 would round away; the bf16-offset EMA tracks the fp32 EMA where a plain bf16 EMA cannot;
- the trainer with bf16 moments + bf16-offset EMA + micro-batches + activation checkpointing still trains:
  the first-steps check passes (every trainable parameter moves, frozen ones do not, the closed gate gets a
  gradient), validation beats predicting the mean, and a stopped run resumes to the same losses and weights;
- the memory plan picks the settings by GPU size and refuses a GPU that cannot hold the cell, naming the fix;
  an out-of-memory error in the first step becomes that message;
- the batched vision attention and the compiled blocks give the same loss and gradients as transformers' path.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch

from vla_core.policy.modeling import VLAPolicy
from vla_core.policy.tiny import random_batch, tiny_norm_stats, tiny_policy_config
from vla_core.train.config import OptimConfig, get_preset
from vla_core.train.ema import EMA
from vla_core.train.loop import global_loss_weights, train
from vla_core.train.memory import (
    BUDGET_FRACTION,
    ModelShape,
    estimate,
    oom_message,
    plan_memory,
    shape_of,
    split_batch,
)
from vla_core.train.optim import AdamWLowMem, OffsetEMA
from vla_core.utils import WmvlaError, read_jsonl

ONE_PROCESS = types.SimpleNamespace(num_processes=1)


def build(**kw) -> VLAPolicy:
    cfg = tiny_policy_config(**kw)
    return VLAPolicy(cfg, tiny_norm_stats(cfg))


def grads(policy) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in policy.trainable_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        err = float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12))
        assert err <= rtol or float(b[n].norm()) < 1e-9, (n, err)


# ------------------------------------------------------------------------------------ micro-batches


def test_split_batch_splits_batch_tensors_and_lists_only():
    batch = {"input_ids": torch.arange(10).view(5, 2), "task": list("abcde"), "scale": torch.tensor(2.0),
             "grid": torch.ones(3, 2)}
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert [p["task"] for p in parts] == [["a", "b"], ["c", "d"], ["e"]]
    assert all(p["scale"] is batch["scale"] and p["grid"] is batch["grid"] for p in parts)
    assert split_batch(batch, 0) == [batch] and split_batch(batch, 5) == [batch]


def test_micro_batches_give_the_full_batch_loss_and_gradients():
    policy = build(finetune="full", memory="pred")
    # sample 0 has a padded chunk step and a masked future latent: the weights must count valid terms
    inputs = policy.prepare(random_batch(policy.cfg, batch_size=6, seed=3))
    out = policy(inputs, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    full_loss, full_grads = float(out["loss"].detach()), grads(policy)

    policy.zero_grad(set_to_none=True)
    parts = split_batch(inputs, 4)  # 4 + 2: unequal micro-batches with unequal valid counts
    weights, shares = global_loss_weights(policy, parts, ONE_PROCESS)
    total = 0.0
    for i, part in enumerate(parts):
        o = policy(part, loss_weights=weights[i], generator=torch.Generator().manual_seed(0))
        (o["loss"] / len(parts)).backward()
        total += float(o["loss"].detach()) / len(parts)
    assert total == pytest.approx(full_loss, rel=1e-5)
    assert_same_grads(grads(policy), full_grads, rtol=1e-4)


# ------------------------------------------------------------------------------------ the optimizer


def _quadratic(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n, generator=g) + 1.0)
    b = torch.nn.Parameter(torch.randn(7, 5, generator=g))
    target = torch.randn(n, generator=g)
    return [w, b], target


def _loss(params, target):
    w, b = params
    return ((w - target) ** 2).mean() + (b ** 2).sum() * 0.1 + (w[:35].view(7, 5) * b).sum() * 0.01


def test_adamw_lowmem_with_fp32_moments_is_torch_adamw():
    pa, target = _quadratic()
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa: E731
    ref = torch.optim.AdamW(groups(pa), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    mine = AdamWLowMem(groups(pb), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, state_dtype="float32")
    for _ in range(50):
        for opt, ps in ((ref, pa), (mine, pb)):
            opt.zero_grad()
            _loss(ps, target).backward()
            opt.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_bf16_moments_with_fp32_masters_track_fp32_adamw():
    pa, target = _quadratic()
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    ref = torch.optim.AdamW(pa, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    mine = AdamWLowMem(pb, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, state_dtype="bfloat16")
    start = float(_loss(pa, target).detach())
    for _ in range(300):
        for opt, ps in ((ref, pa), (mine, pb)):
            opt.zero_grad()
            _loss(ps, target).backward()
            opt.step()
    assert all(p.dtype == torch.float32 for p in pb)
    assert all(mine.state[p]["exp_avg"].dtype == torch.bfloat16 for p in pb)
    final, final_ref = float(_loss(pb, target).detach()), float(_loss(pa, target).detach())
    assert final_ref < 0.02 * start  # it learned (fp32) ...
    assert abs(final - final_ref) < 0.002 * start  # ... and the bf16 moments went the same way
    drift = max(float((a - b).detach().abs().max()) for a, b in zip(pa, pb))
    assert drift < 0.05


def test_bf16_moments_refuse_a_beta_bf16_cannot_resolve():
    with pytest.raises(WmvlaError, match="adam-state-dtype float32"):
        AdamWLowMem([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 0.999), state_dtype="bfloat16")


def test_adamw_lowmem_state_dict_roundtrip_keeps_bf16_moments():
    ps, target = _quadratic()
    opt = AdamWLowMem(ps, lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        opt.zero_grad()
        _loss(ps, target).backward()
        opt.step()
    sd = opt.state_dict()
    other = AdamWLowMem([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2, betas=(0.9, 0.95))
    other.load_state_dict(sd)
    for p, q in zip(ps, [p for g in other.param_groups for p in g["params"]]):
        for k in ("exp_avg", "exp_avg_sq"):
            assert other.state[q][k].dtype == torch.bfloat16 and torch.equal(other.state[q][k], opt.state[p][k])
        assert float(other.state[q]["step"]) == 3.0


def test_bf16_offset_ema_tracks_the_fp32_ema_where_a_plain_bf16_ema_cannot():
    # fine-tuning-like: weights ~1, updates ~1e-4 per step (far below bf16's resolution of the weight)
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2000, generator=g) * 0.1 + 1.0)
    target = w.detach() + torch.randn(2000, generator=g) * 0.05
    opt = AdamWLowMem([w], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    offset_ema = OffsetEMA({"w": w}, 0.99, opt)
    ref = EMA({"w": w}, 0.99)
    plain = w.detach().to(torch.bfloat16)  # what a bf16 copy of the EMA would do
    for _ in range(300):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        offset_ema.update()
        ref.update()
        decay = min(0.99, (1 + ref.num_updates) / (10 + ref.num_updates))
        plain = plain.float().lerp(w.detach(), 1 - decay).to(torch.bfloat16)
    exact = ref.shadow["w"]
    lag = (exact - w.detach()).abs().mean()  # how far the EMA trails the weights: what it is for
    err_offset = (offset_ema.state_dict()["w"] - exact).abs().mean()
    err_plain = (plain.float() - exact).abs().mean()
    print(f"lag {float(lag):.3g} offset error {float(err_offset):.3g} plain bf16 error {float(err_plain):.3g}")
    # the offset's rounding (2^-9 of the lag per update, averaged over ~1/(1 - decay) updates) stays a few % of
    # the lag; a plain bf16 EMA loses most of what it averages
    assert err_offset < 0.05 * lag, (err_offset, lag)
    assert err_plain > 0.3 * lag and err_plain > 10 * err_offset, (err_plain, err_offset)
    # swapped in and out: the weights come back bit for bit
    before, ema_weights = w.detach().clone(), offset_ema.state_dict()["w"]
    with offset_ema.swapped_in():
        assert torch.allclose(w.detach(), ema_weights, atol=1e-6)
    assert torch.equal(w.detach(), before)
    # a checkpoint's fp32 EMA loads back into the offsets
    other = OffsetEMA({"w": w}, 0.99, AdamWLowMem([w], lr=1e-4, betas=(0.9, 0.95)))
    other.load_state_dict(offset_ema.state_dict(), offset_ema.num_updates)
    torch.testing.assert_close(other.state_dict()["w"], offset_ema.state_dict()["w"], rtol=0, atol=1e-6)


def test_offset_ema_refuses_a_step_it_did_not_see():
    w = torch.nn.Parameter(torch.ones(4))
    ema = OffsetEMA({"w": w}, 0.9, AdamWLowMem([w], lr=1e-3, betas=(0.9, 0.95)))
    with pytest.raises(WmvlaError, match="without an AdamWLowMem step"):
        ema.update()


# ------------------------------------------------------------------------------------ the trainer


def tiny_cfg(data, out_root, **changes):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, dataset=data["dataset"], latents=data["latents"], out_root=str(out_root))
    return dataclasses.replace(cfg, **changes)


LEAN = dict(
    policy=dataclasses.replace(get_preset("tiny").policy, gradient_checkpointing=True),
    optim=OptimConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=2, weight_decay=0.01, grad_clip=1.0,
                      ema_decay=0.9, micro_batch=3, adam_state_dtype="bfloat16", ema_dtype="bfloat16"),
    memory_plan="off", log_every=1, ckpt_every=6, val_every=6,
)


def test_trainer_with_bf16_states_micro_batches_and_checkpointing_learns(data, tmp_path):
    # train() raises if the first-steps check fails (a trainable tensor without gradient or not moving, a
    # frozen one moving, moments not in the optimizer's declared dtype on fp32 weights)
    # 30 steps: where the fp32 run beats the mean baseline too (12 steps do not, for either)
    lean = {**LEAN, "optim": dataclasses.replace(LEAN["optim"], steps=30), "val_every": 30, "ckpt_every": 30}
    summary = train(tiny_cfg(data, tmp_path, mean_baseline_check="fail", **lean))
    assert summary["finished"] and summary["val"]["beats_mean_baseline"]
    log = read_jsonl(Path(summary["run_dir"]) / "train_log.jsonl")
    first, last = [sum(r["action_loss"] for r in part) / len(part) for part in (log[:10], log[-10:])]
    assert last < first
    assert not (Path(summary["run_dir"]) / "memory_plan.json").exists()  # CPU: no plan, the config as given


def test_trainer_with_bf16_states_resumes_to_the_same_run(data, tmp_path):
    full = train(tiny_cfg(data, tmp_path / "a", **LEAN))
    first = train(tiny_cfg(data, tmp_path / "b", stop_after=6, **LEAN))
    assert first["finished"] is False
    second = train(tiny_cfg(data, tmp_path / "b", **LEAN))
    assert second["finished"]

    def losses(run):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(Path(run["run_dir"]) / "train_log.jsonl")]

    assert losses(full) == losses(second)
    from safetensors.torch import load_file

    def final(run, name):
        return load_file(str(Path(run["run_dir"]) / "checkpoints" / "step_0000012" / name))

    wa, wb = final(full, "model.safetensors"), final(second, "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = final(full, "ema.safetensors"), final(second, "ema.safetensors")
    assert all(torch.allclose(ea[k], eb[k], rtol=0, atol=1e-6) for k in ea)  # fp32 EMA = w + bf16 offset


# ------------------------------------------------------------------------------------ the plan

# Qwen3-VL-2B, full fine-tuning, two 224 px cameras (the libero-2b cell)
SHAPE_2B = ModelShape(trainable=2_170_000_000, frozen_bytes=0, text_width_layers=2048 * 28,
                      vision_width_layers=1024 * 24, tokens_per_sample=64 + 2 * (49 + 2) + 8, patches_per_sample=392)


def test_plan_picks_the_fastest_settings_that_fit_each_gpu():
    h200 = plan_memory(SHAPE_2B, 32, True, 141_000_000_000)
    assert (h200.gradient_checkpointing, h200.micro_batch, h200.adam_state_dtype, h200.ema_dtype) == \
        (False, 32, "float32", "float32")
    l40s = plan_memory(SHAPE_2B, 32, True, 48_000_000_000)
    assert l40s.adam_state_dtype == "bfloat16" and l40s.gradient_checkpointing
    assert l40s.estimate_bytes <= BUDGET_FRACTION * 48e9
    # fp32 states alone (43.4 GB with the EMA) cannot fit an L40S: the plan must not pretend they do
    assert estimate(SHAPE_2B, 1, True, "float32", "float32", True)[0] > BUDGET_FRACTION * 48e9
    a100 = plan_memory(SHAPE_2B, 32, True, 80_000_000_000)
    assert a100.adam_state_dtype == "float32" and a100.estimate_bytes <= BUDGET_FRACTION * 80e9
    # sharded over 4 processes (FSDP): fp32 states, no bf16
    sharded = plan_memory(SHAPE_2B, 32, True, 24_000_000_000, shards=4)
    assert sharded.adam_state_dtype == "float32" and sharded.ema_dtype == "float32"


def test_plan_refuses_a_gpu_that_cannot_hold_the_cell_and_names_the_fix():
    with pytest.raises(WmvlaError, match="gpus_per_cell.*--distributed fsdp"):
        plan_memory(SHAPE_2B, 32, True, 24_000_000_000)


def test_shape_of_counts_the_policy():
    policy = build(finetune="frozen_vision")
    shape = shape_of(policy, len(policy.cfg.camera_keys))
    assert shape.trainable == sum(p.numel() for _, p in policy.trainable_parameters())
    assert shape.vision_width_layers == 0  # a frozen tower keeps no activations for backward
    assert shape_of(build(finetune="full"), 2).vision_width_layers > 0


def test_out_of_memory_in_the_first_step_names_the_fix():
    from vla_core.train.loop import _first_step_oom

    plan = plan_memory(SHAPE_2B, 32, True, 48_000_000_000)
    with pytest.raises(WmvlaError, match="first training step.*--memory-plan auto"):
        with _first_step_oom(True, plan, oom_message):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # later steps: the original error
        with _first_step_oom(False, plan, oom_message):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")


# ------------------------------------------------------------------------------------ the faster step


def test_batched_vision_attention_gives_the_same_loss_and_gradients(monkeypatch):
    from vla_core.policy.backbone import set_batched_vision_attention

    policy = build(finetune="full", memory="pred")
    inputs = policy.prepare(random_batch(policy.cfg, batch_size=3, seed=1))
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **kw):
        shapes.append(tuple(q.shape))
        return sdpa(q, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    results = []
    for on in (True, False):
        set_batched_vision_attention(policy.backbone.model, on)
        policy.zero_grad(set_to_none=True)
        shapes.clear()
        out = policy(inputs)
        out["loss"].backward()
        results.append((float(out["loss"].detach()), grads(policy), list(shapes)))
    n_images = 3 * len(policy.cfg.camera_keys)
    vision_depth = policy.cfg.tiny.vision_depth
    assert sum(s[0] == n_images for s in results[0][2]) == vision_depth  # one batched call per layer
    assert sum(s[0] == 1 for s in results[1][2]) == vision_depth * n_images  # transformers: one per image
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert_same_grads(results[0][1], results[1][1], rtol=1e-5)


def test_grid_inputs_are_computed_once_and_give_the_same_loss_and_gradients(monkeypatch):
    """The vision tower's grid-derived inputs (interpolation taps, rotary positions, sequence boundaries) come
    precomputed, once per grid, from transformers' own functions: the same loss and gradients, and no call
    computes them again (the per-image loops with a host sync each are what this removes on the GPU)."""
    import transformers.models.qwen3_vl.modeling_qwen3_vl as hf_qwen3_vl

    policy = build(finetune="full", memory="pred")
    inputs = policy.prepare(random_batch(policy.cfg, batch_size=3, seed=4))
    computed = []
    original = hf_qwen3_vl.get_vision_position_ids

    def spy(grid_thw, *args, kwargs=None, **kw):
        computed.append(not (kwargs and "position_ids" in kwargs))
        return original(grid_thw, *args, kwargs=kwargs, **kw)

    monkeypatch.setattr(hf_qwen3_vl, "get_vision_position_ids", spy)
    results = []
    for on in (True, True, False):
        policy.backbone.precompute_vision_inputs = on
        policy.zero_grad(set_to_none=True)
        computed.clear()
        out = policy(inputs)
        out["loss"].backward()
        results.append((float(out["loss"].detach()), grads(policy), list(computed)))
    assert results[0][2] == [False] and results[1][2] == [False]  # precomputed, in both steps
    assert results[2][2] == [True]  # transformers computes them itself
    assert len(policy.backbone.vision_grid_inputs._cache) == 1  # one grid: one entry, reused
    assert results[0][0] == results[2][0]
    assert_same_grads(results[0][1], results[2][1], rtol=1e-6)


def test_sync_free_backbone_forward_is_bit_identical_to_transformers_and_one_graph():
    """The backbone's sync-free forward (gathers in place of boolean-mask scatters, the token-count check on
    the host) gives transformers' Qwen3VLModel.forward's loss and gradients exactly, with prompts of different
    lengths (right padding); the language model's whole forward then traces as one graph, where transformers'
    DeepStack step breaks it (boolean indexing needs the count of image tokens on the host)."""
    import torch._dynamo

    policy = build(finetune="full", memory="pred")
    batch = random_batch(policy.cfg, batch_size=3, seed=5)
    batch["task"] = ["open the top drawer of the cabinet and put the bowl inside", "push", "stack the cups"]
    inputs = policy.prepare(batch)
    assert not bool(inputs["attention_mask"].all())  # padded prompts
    bb = policy.backbone
    results = []
    for on in (True, False):
        bb.sync_free_forward = on
        assert ("_deepstack_process" in vars(bb.language_model)) == on  # the patch comes and goes
        policy.zero_grad(set_to_none=True)
        out = policy(inputs)
        out["loss"].backward()
        results.append((out["loss"].detach(), grads(policy)))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1]), \
        [n for n in results[0][1] if not torch.equal(results[0][1][n], results[1][1][n])][:5]

    captured = {}
    lm_forward = bb.language_model.forward

    def spy(**kw):
        captured.update(kw)
        return lm_forward(**kw)

    def breaks() -> int:
        lm = bb.language_model
        with torch.no_grad():
            return torch._dynamo.explain(lambda kw: lm(**kw))(captured).graph_break_count

    bb.sync_free_forward = True
    bb.language_model.forward = spy
    with torch.no_grad():
        policy(inputs)
    del bb.language_model.forward
    assert breaks() == 0
    bb.sync_free_forward = False  # transformers' own DeepStack step
    assert breaks() > 0
    bb.sync_free_forward = True


def test_prompts_whose_image_tokens_do_not_match_the_images_are_refused_before_the_forward():
    policy = build(finetune="full", memory="none")
    inputs = policy.processor(random_batch(policy.cfg, batch_size=2, seed=1))
    policy.prepare(inputs)  # the processor's own output passes
    ids = inputs["input_ids"].clone()
    ids[ids == policy.backbone.image_token_id] = policy.processor.pad_token_id  # no image tokens left
    with pytest.raises(WmvlaError, match=r"hold 0 image tokens, the images give 4 x"):
        policy.prepare({**inputs, "input_ids": ids})


def test_patch_embedding_matmul_equals_the_convolution():
    from vla_core.policy.backbone import set_batched_vision_attention

    policy = build(finetune="full", memory="none")
    embed = policy.backbone.model.visual.patch_embed
    assert hasattr(embed, "_wmvla_hf_forward")  # routed through the matmul
    x = torch.randn(12, embed.proj.weight[0].numel(), requires_grad=True)
    outs = []
    for on in (True, False):
        set_batched_vision_attention(policy.backbone.model, on)
        embed.zero_grad(set_to_none=True)
        y = embed(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), embed.proj.weight.grad.clone(), embed.proj.bias.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deferred_checks_find_a_non_finite_memory_after_backward_before_any_update():
    from vla_core.train.checks import check_step_finite

    policy = build(memory="oracle", rollout_memory="pred")
    batch = random_batch(policy.cfg, batch_size=2, seed=5)
    out = policy(batch, defer_checks=True)  # no host sync inside the step: nothing raised yet
    assert bool(out["memory_finite"])
    out["loss"].backward()
    check_step_finite(out, step=0)  # finite: passes
    batch["world_future"][0, 0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in policy.trainable_parameters()}
    out = policy(batch, defer_checks=True)
    assert not bool(out["memory_finite"])
    out["loss"].backward()
    with pytest.raises(WmvlaError, match="world memory contains NaN/Inf"):
        check_step_finite(out, step=3)
    assert all(torch.equal(p, before[n]) for n, p in policy.trainable_parameters())
    bad = {"action_loss": torch.tensor(float("nan")), "world_loss": torch.tensor(0.0)}
    with pytest.raises(WmvlaError, match="step 7: non-finite loss"):
        check_step_finite(bad, step=7)


def test_compiled_blocks_give_the_same_loss_and_gradients():
    a, b = build(finetune="full", memory="pred"), build(finetune="full", memory="pred")
    # decoder layers + vision blocks (on a GPU also the policy's state projection, Prophet, memory and head)
    assert a.compile_blocks() == a.cfg.tiny.num_layers + a.cfg.tiny.vision_depth
    inputs = a.prepare(random_batch(a.cfg, batch_size=2, seed=2))
    la, lb = a(inputs)["loss"], b(inputs)["loss"]
    la.backward()
    lb.backward()
    assert float(la) == pytest.approx(float(lb), rel=1e-5)
    assert_same_grads(grads(a), grads(b), rtol=1e-4)
    assert set(a.state_dict()) == set(b.state_dict())  # checkpoints keep their keys


def test_vision_tower_and_decoder_stack_as_one_compiled_region_each_give_the_same_loss_and_gradients():
    """compile_blocks(vision_region="tower", decoder_region="stack"): the whole tower and the language model's
    whole forward are one compiled graph each (no graph break: grid inputs precomputed, sync-free backbone
    forward), their blocks and layers are not compiled one by one, and the numbers are the eager ones."""
    import torch._dynamo

    a, b = build(finetune="full", memory="pred"), build(finetune="full", memory="pred")
    n = a.compile_blocks(vision_region="tower", decoder_region="stack")
    assert n == 2
    compiled = [blk for blk in [*a.backbone.vision_tower.blocks, *a.backbone.language_model.layers]
                if getattr(blk, "_compiled_call_impl", None) is not None]
    assert compiled == []
    inputs = a.prepare(random_batch(a.cfg, batch_size=2, seed=2))
    torch._dynamo.utils.counters.clear()
    la, lb = a(inputs)["loss"], b(inputs)["loss"]
    assert torch._dynamo.utils.counters["graph_break"] == {}  # the tower and the layers: whole graphs
    la.backward()
    lb.backward()
    assert float(la) == pytest.approx(float(lb), rel=1e-5)
    assert_same_grads(grads(a), grads(b), rtol=1e-4)
    c = build(finetune="full", memory="pred")
    c.enable_gradient_checkpointing()
    with pytest.raises(WmvlaError, match="no gradient checkpointing"):
        c.compile_blocks(vision_region="tower")
    with pytest.raises(WmvlaError, match="decoder_region='stack' needs .* no gradient checkpointing"):
        c.compile_blocks(decoder_region="stack")
    with pytest.raises(WmvlaError, match="expected 'blocks' or 'tower'"):
        c.compile_blocks(vision_region="model")
    with pytest.raises(WmvlaError, match="expected 'layers' or 'stack'"):
        c.compile_blocks(decoder_region="model")


def test_compiled_optimizer_update_equals_the_eager_one():
    # the fused (torch.compile) chunk update that AdamWLowMem uses on CUDA, checked here with inductor on the CPU
    pa, target = _quadratic()
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    opts, emas = [], []
    for ps, compiled in ((pa, False), (pb, True)):
        opt = AdamWLowMem(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, compiled=compiled)
        emas.append(OffsetEMA({"w": ps[0], "b": ps[1]}, 0.95, opt))
        opts.append(opt)
    for _ in range(5):
        for opt, ema, ps in zip(opts, emas, (pa, pb)):
            opt.zero_grad()
            _loss(ps, target).backward()
            opt.step()
            ema.update()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for n in ("w", "b"):
        torch.testing.assert_close(emas[1].state_dict()[n], emas[0].state_dict()[n], rtol=1e-5, atol=1e-5)
    assert opts[1].state[pb[0]]["exp_avg"].dtype == torch.bfloat16
