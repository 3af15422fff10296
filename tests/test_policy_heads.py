"""Action heads: the flow sampler's time grid (integrates a known field exactly), seeded whole-chunk noise,
attention across the chunk, masked losses, and the MSE head shared across positions."""

from __future__ import annotations

import pytest
import torch

from vla_core.policy.heads import FlowHead, MSEHead, euler_integrate, masked_mse, sinusoidal_time_embedding



@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_euler_integrates_the_rectified_flow_field_exactly(steps):
    """For one data point x1 the exact rectified-flow field is v(x, t) = (x1 - x) / (1 - t); its trajectories are
    straight lines, so Euler on the grid t_i = i/N lands on x1 exactly. Querying one step late (t_{i+1}) would
    evaluate 1/(1-1) at the last step; querying at another grid would miss x1."""
    x1 = torch.tensor([[[0.3, -1.2], [2.0, 0.5]]])
    x0 = torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(0))
    queried = []

    def field(x, t):
        queried.append(t[0].item())
        return (x1 - x) / (1 - t)[:, None, None]

    out = euler_integrate(field, x0, steps)
    assert torch.allclose(out, x1, atol=1e-5)
    assert queried == pytest.approx([i / steps for i in range(steps)])


def test_euler_linear_field():
    """dx/dt = c: x(1) = x0 + c for any grid."""
    x0 = torch.zeros(3, 4, 2)
    c = torch.randn(3, 4, 2)
    assert torch.allclose(euler_integrate(lambda x, t: c, x0, 7), c, atol=1e-6)


def make_flow(**kw):
    torch.manual_seed(0)
    args = dict(width=16, flow_width=32, depth=2, heads=2, action_dim=3, chunk_size=5, steps=6)
    args.update(kw)
    return FlowHead(**args)


def test_flow_sampling_is_seeded_and_draws_noise_for_the_whole_chunk():
    head = make_flow()
    cond = torch.randn(4, 5, 16)
    a = head.predict(cond, torch.Generator().manual_seed(1))
    b = head.predict(cond, torch.Generator().manual_seed(1))
    c = head.predict(cond, torch.Generator().manual_seed(2))
    assert a.shape == (4, 5, 3)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # a zero velocity returns the initial noise: one draw of shape [B, H, A] from the generator
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.zero_()
    x0 = head.predict(cond, torch.Generator().manual_seed(3))
    assert torch.equal(x0, torch.randn((4, 5, 3), generator=torch.Generator().manual_seed(3)))


def test_flow_velocity_attends_across_the_chunk():
    head = make_flow()
    cond = torch.randn(2, 5, 16)
    x = torch.randn(2, 5, 3)
    t = torch.full((2,), 0.3)
    v = head.velocity(x, t, cond)
    x2 = x.clone()
    x2[:, 0] += 1.0  # change only the first action of the chunk
    v2 = head.velocity(x2, t, cond)
    assert not torch.allclose(v[:, 4], v2[:, 4])  # ... and the last position's velocity changes
    # the time conditioning matters too
    assert not torch.allclose(v, head.velocity(x, torch.full((2,), 0.9), cond))


def test_flow_loss_convention_mask_and_gradients():
    """loss = masked MSE(v(x_t, t), x1 - x0) with x_t = (1 - t) x0 + t x1 (t=0 noise, t=1 actions)."""
    head = make_flow()
    cond = torch.randn(2, 5, 16)
    actions = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    loss = head.loss(cond, actions, mask, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # replay the same draws: noise, then time
    x0 = torch.randn(actions.shape, generator=g)
    t = head.sample_time(2, "cpu", g)
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * actions
    v = head.velocity(x_t, t, cond)
    expected = ((v - (actions - x0)) ** 2)[mask].mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    no_grad = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []  # adaLN starts at zero modulation but still gets a gradient at step 1


def test_masked_mse():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [50.0, 50.0]]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 1 + 4 + 4) / 4)


def test_mse_head_is_shared_across_positions():
    head = MSEHead(8, 16, 3)
    cond = torch.randn(2, 4, 8)
    out = head(cond)
    assert out.shape == (2, 4, 3)
    assert torch.allclose(out[:, 2], head(cond[:, 2:3])[:, 0])
    swapped = cond[:, [1, 0, 2, 3]]
    assert torch.allclose(head(swapped)[:, 0], out[:, 1])


def test_time_embedding_separates_times():
    e = sinusoidal_time_embedding(torch.tensor([0.0, 0.01, 0.5, 1.0]), 32)
    assert e.shape == (4, 32)
    d = torch.cdist(e, e)
    assert (d + torch.eye(4) * 10).min() > 0.1
