"""Model-F memory: the closed gate still gets a gradient, E1 with the gate at 0 equals E0, non-finite memory
raises, and the memory modes (zero / pred / random / shuffle / oracle / none) do what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_core.policy.memory import GatedMemoryAttention, ShuffleBank, random_like_memory
from vla_core.policy.modeling import VLAPolicy
from vla_core.policy.tiny import random_batch, random_observation, tiny_norm_stats, tiny_policy_config
from vla_core.utils import WmvlaError



def build(**kw) -> VLAPolicy:
    cfg = tiny_policy_config(**kw)
    return VLAPolicy(cfg, tiny_norm_stats(cfg))


def test_closed_gate_gets_a_gradient_and_does_nothing():
    torch.manual_seed(0)
    block = GatedMemoryAttention(width=16, world_dim=8, horizon=3, heads=4)
    h = torch.randn(2, 5, 16)
    mem = torch.randn(2, 3, 8)
    out, info = block(h, mem)
    assert torch.equal(out, h)  # gate 0: identity ...
    out.pow(2).sum().backward()
    assert block.gate.grad is not None and block.gate.grad.abs().item() > 1e-6  # ... but no shortcut: gate learns
    assert info["gate"].item() == 0.0
    assert 0 < info["attn_entropy"].item() <= np.log(3) + 1e-6


def test_gate_gradient_through_the_whole_policy():
    policy = build(memory="pred")
    out = policy(random_batch(policy.cfg, batch_size=3))
    out["loss"].backward()
    assert policy.memory.gate.grad.abs().item() > 1e-8


@pytest.mark.parametrize("head", ["mse", "flow"])
def test_e1_with_closed_gate_equals_e0(head):
    """E1 (memory module, zero memory, gate 0) with E0's weights copied in gives E0's outputs exactly."""
    e0 = build(memory="none", head=head)
    e1 = build(memory="zero", head=head)
    missing, unexpected = e1.load_state_dict(e0.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("memory.", "prophet.")) for k in missing)
    batch = random_batch(e0.cfg, batch_size=3)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for mode in ("zero", "pred", "random"):  # the gate is closed: no memory content can leak through
        assert torch.equal(e0.predict_normalized(batch, generator=g()),
                           e1.predict_normalized(batch, memory_mode=mode, generator=g()))
    torch.manual_seed(0)
    out0, out1 = e0(batch, generator=g()), e1(batch, generator=g())
    assert torch.equal(out0["action_loss"], out1["action_loss"])
    with torch.no_grad():
        e1.memory.gate.fill_(0.5)
    assert not torch.allclose(e0.predict_normalized(batch, generator=g()),
                              e1.predict_normalized(batch, memory_mode="pred", generator=g()))


def test_non_finite_memory_raises():
    block = GatedMemoryAttention(width=16, world_dim=8, horizon=3, heads=4)
    bad = torch.randn(2, 3, 8)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(WmvlaError, match="NaN"):
        block(torch.randn(2, 5, 16), bad)
    policy = build(memory="oracle", rollout_memory="pred")
    batch = random_batch(policy.cfg, batch_size=2)
    batch["world_future"][0, 0, 0] = np.inf
    with pytest.raises(WmvlaError, match="NaN/Inf"):
        policy(batch)


def test_memory_modes_feed_what_they_claim():
    policy = build(memory="pred")
    batch = policy.prepare(random_batch(policy.cfg, batch_size=3))
    pred_raw = policy.prophet(batch["world_history"])
    pred = policy.prophet.normalize(pred_raw)
    mem = lambda mode: policy._memory(mode, batch, pred_raw)  # noqa: E731
    assert torch.equal(mem("pred"), pred)
    assert torch.equal(mem("zero"), torch.zeros_like(pred))
    assert torch.equal(mem("oracle"), policy.prophet.normalize(batch["world_future"]))
    assert torch.equal(mem("shuffle"), pred.roll(1, dims=0))  # another sample's memory
    rnd = mem("random")
    assert torch.allclose(rnd.norm(dim=-1), pred.norm(dim=-1), rtol=1e-5)  # norm-matched per slot
    assert (torch.nn.functional.cosine_similarity(rnd, pred, dim=-1).abs() < 0.9).all()


def test_shuffle_at_batch_size_one_uses_an_earlier_memory():
    policy = build(memory="pred", rollout_memory="shuffle")
    cfg = policy.cfg
    rng = np.random.default_rng(0)
    hist = [rng.normal(size=(cfg.world_history, cfg.world_dim)).astype(np.float32) for _ in range(2)]
    obs = random_observation(cfg)
    policy.predict_action(obs, world_history=hist[0], generator=0)  # empty bank: zeros this once
    assert len(policy._shuffle_bank.items) == 1
    first = policy._shuffle_bank.items[0].clone()
    inputs = policy.prepare(policy.processor.observations([obs], [obs["task"]]))
    inputs["world_history"] = torch.as_tensor(hist[1])[None]
    pred_raw = policy.prophet(inputs["world_history"])
    out = policy._memory("shuffle", inputs, pred_raw)
    assert torch.equal(out[0], first)  # the previous call's memory, not this sample's own
    bank = ShuffleBank(2)
    for i in range(3):
        bank.push(torch.full((1, 2, 2), float(i)))
    assert [int(m[0, 0]) for m in bank.items] == [1, 2]


def test_random_like_memory_is_seeded():
    m = torch.randn(2, 3, 4)
    a = random_like_memory(m, torch.Generator().manual_seed(1))
    b = random_like_memory(m, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_mode_errors_are_explicit():
    e0 = build(memory="none")
    with pytest.raises(WmvlaError, match="none"):
        e0(random_batch(e0.cfg), memory_mode="zero")
    e2 = build(memory="pred")
    with pytest.raises(WmvlaError, match="none"):
        e2(random_batch(e2.cfg), memory_mode="none")
    with pytest.raises(WmvlaError, match="world_history"):
        e2.predict_action(random_observation(e2.cfg))  # pred needs the Prophet's input
    with pytest.raises(WmvlaError, match="oracle"):
        e2.predict_action(random_observation(e2.cfg), memory_mode="oracle")  # no future at rollout
    e3 = build(memory="oracle")
    with pytest.raises(WmvlaError, match="rollout_memory"):
        e3.predict_action(random_observation(e3.cfg))
    with pytest.raises(WmvlaError, match="rollout_memory"):
        tiny_policy_config(memory="none", rollout_memory="zero")


def test_rollout_mode_is_independent_of_training_mode():
    policy = build(memory="pred", rollout_memory="zero")
    obs = random_observation(policy.cfg)
    a = policy.predict_action(obs)  # zero memory: no world history needed
    assert a.shape == (policy.cfg.chunk_size, policy.cfg.action_dim)
    with torch.no_grad():
        policy.memory.gate.fill_(1.0)
    hist = np.random.default_rng(0).normal(size=(policy.cfg.world_history, policy.cfg.world_dim))
    b = policy.predict_action(obs, world_history=hist, memory_mode="pred")
    assert not np.allclose(a, b)


def test_world_loss_trains_the_prophet_and_memory_is_detached_by_default():
    policy = build(memory="pred")
    out = policy(random_batch(policy.cfg, batch_size=3))
    assert out["world_loss"].item() > 0
    out["loss"].backward()
    assert policy.prophet.out_proj.weight.grad.abs().sum() > 0
    # with the world loss off and detached memory, the action loss alone gives the Prophet nothing
    policy.zero_grad()
    policy.cfg.world_loss_weight = 0.0
    with torch.no_grad():
        policy.memory.gate.fill_(0.5)
    out = policy(random_batch(policy.cfg, batch_size=3))
    out["loss"].backward()
    assert policy.prophet.out_proj.weight.grad is None or policy.prophet.out_proj.weight.grad.abs().sum() == 0
    policy.zero_grad()
    policy.cfg.detach_memory = False
    out = policy(random_batch(policy.cfg, batch_size=3))
    out["loss"].backward()
    assert policy.prophet.out_proj.weight.grad.abs().sum() > 0
