"""Prophet: ordered history, delta prediction, masked loss, and learning real dynamics."""

import numpy as np
import pytest
import torch

from vla_core.utils import WmvlaError
from vla_core.world.prophet import Prophet, ProphetConfig, add_metric_sums, episode_windows



def _rotation_episodes(rng, n_eps, dim, min_len=12, max_len=30):
    """Latent sequences z_{t+1} = A z_t (+ small noise) with A a fixed random rotation; offset + scale per dim."""
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    angles = rng.uniform(0.15, 0.4, size=dim // 2)
    blocks = np.zeros((dim, dim))
    for i, a in enumerate(angles):
        blocks[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    a_mat = q @ blocks @ q.T
    offset, scale = rng.normal(size=dim) * 3, rng.uniform(0.5, 2, size=dim)
    seqs = []
    for _ in range(n_eps):
        n = int(rng.integers(min_len, max_len))
        z = [rng.normal(size=dim)]
        for _ in range(n - 1):
            z.append(a_mat @ z[-1] + 0.01 * rng.normal(size=dim))
        seqs.append(np.stack(z) * scale + offset)
    lengths = np.array([len(s) for s in seqs])
    starts = np.cumsum(lengths) - lengths
    return np.concatenate(seqs).astype(np.float32), starts, lengths


def test_episode_windows_never_cross_episodes():
    starts, lengths = np.array([0, 3, 10]), np.array([3, 7, 1])
    idx, hist, fut, mask = episode_windows(starts, lengths, history=4, horizon=3)
    assert idx.tolist() == list(range(11))
    ep_of = np.repeat(np.arange(3), lengths)
    assert np.all(ep_of[hist] == ep_of[:, None]) and np.all(ep_of[fut] == ep_of[:, None])
    assert hist[3].tolist() == [3, 3, 3, 3]  # episode start: repeat the first frame
    assert hist[5].tolist() == [3, 3, 4, 5]
    assert fut[8].tolist() == [9, 9, 9] and mask[8].tolist() == [True, False, False]  # episode end
    assert fut[10].tolist() == [10, 10, 10] and not mask[10].any()  # one-frame episode
    assert mask[3].all()


def test_untrained_delta_prophet_is_copy_the_present_and_order_matters():
    torch.manual_seed(0)
    cfg = ProphetConfig(dim=8, history=3, horizon=2, width=32, depth=1, heads=2)
    p = Prophet(cfg)
    h = torch.randn(5, 3, 8)
    out = p(h)
    assert out.shape == (5, 2, 8)
    assert torch.allclose(out, h[:, -1:].expand(-1, 2, -1), atol=1e-6)
    # with trained (non-zero) output layer the prediction depends on the history order (time embeddings)
    torch.nn.init.normal_(p.out_proj.weight, std=0.1)
    assert not torch.allclose(p(h), p(h.flip(1)), atol=1e-4)
    with pytest.raises(WmvlaError, match="expects history"):
        p(torch.randn(5, 4, 8))


def test_loss_is_masked_and_normalised():
    torch.manual_seed(0)
    p = Prophet(ProphetConfig(dim=4, history=2, horizon=2, width=16, depth=1, heads=2, loss="mse"))
    p.set_normalization(np.full(4, 10.0), np.full(4, 2.0))
    target = torch.randn(3, 2, 4)
    pred = target.clone()
    pred[:, 1] += 1000.0  # garbage only where the future is past the episode end
    mask = torch.tensor([[True, False]] * 3)
    assert p.loss(pred, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred[:, 0] += 2.0  # one std in every dim -> standardised MSE of 1
    assert p.loss(pred, target, mask).item() == pytest.approx(1.0, rel=1e-5)
    # all masked: zero but still differentiable
    pred.requires_grad_(True)
    loss = p.loss(pred, target, torch.zeros(3, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0


@pytest.mark.parametrize("loss", ["both", "cosine"])
def test_prophet_beats_copy_the_present_on_rotation_dynamics(loss):
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    dim, T, K = 16, 3, 4
    z, starts, lengths = _rotation_episodes(rng, 80, dim)
    _, hist, fut, mask = episode_windows(starts, lengths, T, K)
    n_train_frames = int(starts[60])  # episodes 0-59 train, 60-79 held out
    zt = torch.from_numpy(z)
    p = Prophet(ProphetConfig(dim=dim, history=T, horizon=K, width=48, depth=2, heads=4, loss=loss))
    p.set_normalization(z[:n_train_frames].mean(0), z[:n_train_frames].std(0))
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        b = torch.randint(0, n_train_frames, (64,), generator=g)
        pred = p(zt[hist[b]])
        l = p.loss(pred, zt[fut[b]], torch.from_numpy(mask[b]))
        opt.zero_grad()
        l.backward()
        opt.step()
    p.eval()
    held = torch.arange(n_train_frames, len(z))
    m = p.metrics(p(zt[hist[held]]), zt[fut[held]], zt[held], torch.from_numpy(mask[held]))
    for k in range(K):
        assert m["count"][k] > 0
        assert 1 - m["cos_abs"][k] < 0.5 * (1 - m["baseline_cos_abs"][k]), (k, m)  # half the error
        assert m["cos_delta"][k] > 0.8, (k, m)
        if loss == "both":
            assert m["mse"][k] < 0.5 * m["baseline_mse"][k], (k, m)
    # accumulating two halves gives the same as one batch
    a = p.metric_sums(p(zt[hist[held[:50]]]), zt[fut[held[:50]]], zt[held[:50]], torch.from_numpy(mask[held[:50]]))
    b2 = p.metric_sums(p(zt[hist[held[50:]]]), zt[fut[held[50:]]], zt[held[50:]], torch.from_numpy(mask[held[50:]]))
    both = Prophet.finalize_metrics(add_metric_sums(add_metric_sums(None, a), b2))
    assert np.allclose(both["cos_abs"], m["cos_abs"], atol=1e-5)
