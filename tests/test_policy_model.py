"""VLAPolicy end to end on tiny backbones: forward/backward for every (family, head, memory mode), one
optimizer step moves exactly the trainable set (ACT rows, LoRA included), fp32 master weights and optimizer
state under bf16 autocast, proprio matters, checkpoint round trip, predict_action, and overfitting 32 samples
far below the predict-the-mean baseline."""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest
import torch

from vla_core.data.normalize import feature_stats
from vla_core.policy.config import MEMORY_MODES, PolicyConfig
from vla_core.policy.modeling import VLAPolicy
from vla_core.policy.tiny import random_batch, random_observation, tiny_norm_stats, tiny_policy_config
from vla_core.utils import WmvlaError, from_dict, to_jsonable



def build(**kw) -> VLAPolicy:
    cfg = tiny_policy_config(**kw)
    return VLAPolicy(cfg, tiny_norm_stats(cfg))


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("head", ["mse", "flow"])
@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_forward_backward(family, head, memory):
    policy = build(family=family, head=head, memory=memory, rollout_memory="pred" if memory == "oracle" else None)
    batch = random_batch(policy.cfg, batch_size=3)  # 3 != chunk_size 4: no accidental broadcasting
    out = policy(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    act = policy.backbone.act_embedding.act_weight
    assert act.grad is not None and act.grad.abs().sum() > 0
    assert all(p.grad is not None for p in policy.head.parameters())
    if memory == "none":
        assert policy.memory is None and policy.prophet is None
    else:
        assert policy.memory.gate.grad.abs().item() > 0
        assert out["world_loss"].item() > 0 and {"gate", "memory_norm", "attn_entropy"} <= set(out)
        assert (out["memory_norm"].item() == 0) == (memory == "zero")
    actions = policy.predict_action([random_observation(policy.cfg, seed=i) for i in range(2)],
                                    world_history=batch["world_history"][:2], generator=0)
    assert actions.shape == (2, policy.cfg.chunk_size, policy.cfg.action_dim) and np.isfinite(actions).all()


def snapshot(policy):
    return {n: p.detach().clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("finetune", ["full", "lora", "frozen_vision", "heads_only"])
def test_optimizer_steps_move_exactly_the_trainable_set(finetune):
    policy = build(finetune=finetune, memory="pred")
    trainable = dict(policy.trainable_parameters())
    opt = torch.optim.AdamW([p for p in trainable.values()], lr=1e-3, weight_decay=0.0)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable.values()}
    before = snapshot(policy)
    batch = random_batch(policy.cfg, batch_size=3)
    zero_ok = policy.first_step_zero_grad_patterns()
    shielded = {n for n in trainable if any(fnmatch.fnmatch(n, pat) for pat in zero_ok)}
    for step in range(2):  # the closed gate / LoRA B=0 shield some weights at step 1; by step 2 all move
        opt.zero_grad()
        policy(batch)["loss"].backward()
        if step == 0:
            zero = {n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0}
            assert zero <= shielded, sorted(zero - shielded)  # every other trainable tensor has a gradient
        opt.step()
        after = snapshot(policy)
        moved = {n for n in before if not torch.equal(before[n], after[n])}
        assert moved <= set(trainable), sorted(moved - set(trainable))[:5]  # nothing frozen ever moves
        if step == 0:
            assert set(trainable) - shielded <= moved, sorted(set(trainable) - shielded - moved)[:5]
    assert moved == set(trainable), sorted(set(trainable) - moved)[:5]

    groups = policy.trainable_summary()
    assert groups["act_embedding"] == policy.cfg.chunk_size * policy.backbone.hidden_size
    assert {"head", "memory", "prophet", "state_proj", "readout_norm"} <= set(groups)
    assert ("lora" in groups) == (finetune == "lora")
    assert ("backbone.vision" in groups) == (finetune == "full")
    assert ("backbone.language" in groups) == (finetune in ("full", "frozen_vision"))
    # the ACT rows moved; the original embedding matrix only when the whole language model trains
    base_name = next(n for n in before if n.endswith("embed_tokens.base.weight"))
    assert (base_name in moved) == (finetune in ("full", "frozen_vision"))
    if finetune == "lora":
        assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
        assert not any(".visual." in n and "lora" in n for n in before)  # LoRA only on the language model


def test_fp32_master_weights_and_optimizer_state_under_bf16_autocast():
    policy = build(finetune="lora", memory="pred", autocast_bf16=True, frozen_dtype="bfloat16", head="flow")
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for _, p in policy.trainable_parameters())
    seen = []
    hook = policy.backbone.language_model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.AdamW([p for _, p in policy.trainable_parameters()], lr=1e-3)
    out = policy(random_batch(policy.cfg, batch_size=2))
    out["loss"].backward()
    opt.step()
    assert seen == [torch.bfloat16]  # compute ran in bf16
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                assert v.dtype == torch.float32
    assert all(p.dtype == torch.float32 for _, p in policy.trainable_parameters())
    # evaluation uses the same autocast setting
    policy.predict_action(random_observation(policy.cfg), world_history=np.zeros((3, 16), np.float32), generator=0)
    assert seen == [torch.bfloat16, torch.bfloat16]
    hook.remove()
    # bf16 trainable weights are refused
    policy.head.out.weight.data = policy.head.out.weight.data.bfloat16()
    with pytest.raises(WmvlaError, match="float32"):
        policy.check_precision()
    with pytest.raises(WmvlaError, match="autocast"):
        build(frozen_dtype="bfloat16", autocast_bf16=False)


def test_state_changes_the_output():
    policy = build()
    batch = random_batch(policy.cfg, batch_size=2)
    a = policy.predict_normalized(batch)
    batch["state"] = batch["state"] + 3.0
    b = policy.predict_normalized(batch)
    assert not torch.allclose(a, b)
    assert build(use_state=False).state_proj is None


def test_trainable_state_dict_round_trip():
    cfg = tiny_policy_config(finetune="lora", memory="pred", head="flow")
    cfg2 = from_dict(PolicyConfig, to_jsonable(cfg))  # the config survives JSON
    assert cfg2 == cfg
    stats = tiny_norm_stats(cfg)
    policy = VLAPolicy(cfg, stats)
    opt = torch.optim.AdamW([p for _, p in policy.trainable_parameters()], lr=1e-2)
    batch = random_batch(cfg, batch_size=2)
    for _ in range(2):
        opt.zero_grad()
        policy(batch)["loss"].backward()
        opt.step()
    policy.set_world_normalization(np.full(cfg.world_dim, 0.5), np.full(cfg.world_dim, 2.0))
    sd = policy.trainable_state_dict()
    assert "prophet.latent_mean" in sd and not any(k.endswith("base.weight") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    rebuilt = VLAPolicy.from_config(cfg2, stats)
    rebuilt.load_trainable_state_dict(sd)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(policy.predict_normalized(batch, generator=g()), rebuilt.predict_normalized(batch, generator=g()))
    incomplete = dict(sd)
    incomplete.pop(next(k for k in sd if "lora_B" in k))
    with pytest.raises(WmvlaError, match="missing"):
        VLAPolicy.from_config(cfg2, stats).load_trainable_state_dict(incomplete)
    # the tokenizer to save has the ACT tokens
    assert policy.tokenizer.convert_tokens_to_ids("<ACT_0>") == policy.backbone.act_token_ids[0]


def test_predict_action_single_observation_is_denormalised():
    policy = build(head="flow")
    obs = random_observation(policy.cfg)
    a = policy.predict_action(obs, generator=3)
    assert a.shape == (policy.cfg.chunk_size, policy.cfg.action_dim) and a.dtype == np.float32
    assert np.array_equal(a, policy.predict_action(obs, generator=3))
    norm = policy.predict_normalized(policy.processor.observations([obs], [obs["task"]]),
                                     generator=torch.Generator().manual_seed(3))
    assert np.allclose(a, policy.processor.unnormalize_actions(norm)[0])
    stats = policy.stats[policy.cfg.action_key]
    # quantile scaling: every non-gripper dim lies inside the data's [q01, q99] range after unnormalising
    assert np.all(a[:, :-1] >= stats.q01[:-1] - 1e-5) and np.all(a[:, :-1] <= stats.q99[:-1] + 1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    a = build(gradient_checkpointing=True)
    b = build(gradient_checkpointing=False)
    batch = random_batch(a.cfg, batch_size=2)
    la, lb = a(batch)["loss"], b(batch)["loss"]
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-6)
    ga = a.backbone.act_embedding.act_weight.grad
    assert torch.allclose(ga, b.backbone.act_embedding.act_weight.grad, atol=1e-5)


def overfit_data(cfg, n=32, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.array([0.05, 2.0, 10.0, 1.0], np.float32)  # very different ranges: normalisation must handle them
    actions = (rng.normal(size=(n, cfg.chunk_size, cfg.action_dim)) * scale).astype(np.float32)
    actions[..., -1] = np.sign(rng.normal(size=(n, 1)))  # gripper: -1 / +1, held over the chunk
    state = rng.normal(size=(n, cfg.state_dim)).astype(np.float32)
    stats = {cfg.state_key: feature_stats(state, cfg.state_key),
             cfg.action_key: feature_stats(actions.reshape(-1, cfg.action_dim), cfg.action_key, mode="quantile",
                                           passthrough_dims=(cfg.action_dim - 1,))}
    batch = dict(images=rng.integers(0, 256, (n, 2, 32, 32, 3), dtype=np.uint8), state=state, actions=actions,
                 action_mask=np.ones((n, cfg.chunk_size), bool), task=["pick up the bowl", "open the drawer"] * (n // 2))
    return batch, stats


@pytest.mark.parametrize("head,steps,ratio,sign_acc", [("mse", 60, 0.05, 1.0), ("flow", 300, 0.3, 0.95)])
def test_overfit_32_samples_beats_the_mean_baseline(head, steps, ratio, sign_acc):
    torch.manual_seed(0)
    cfg = tiny_policy_config(head=head)
    batch, stats = overfit_data(cfg)
    policy = VLAPolicy(cfg, stats)
    inputs = policy.processor(batch)
    opt = torch.optim.AdamW([p for _, p in policy.trainable_parameters()], lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        policy(inputs)["loss"].backward()
        opt.step()
    target = inputs["actions"]
    baseline = (target - target.mean(0, keepdim=True)).pow(2).mean((0, 1))  # per dim, normalised space
    pred = policy.predict_normalized(inputs, generator=torch.Generator().manual_seed(0))
    mse = (pred - target).pow(2).mean((0, 1))
    assert torch.all(mse < ratio * baseline), (mse, baseline)  # every dim, the gripper included
    raw = policy.processor.unnormalize_actions(pred)
    assert np.mean(np.sign(raw[..., -1]) == batch["actions"][..., -1]) >= sign_acc  # gripper open/close right
