"""NormStats: vectorised computation (vs a slow reference), round trips, gripper passthrough, save/load."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from vla_core.data.fixtures import make_libero_like
from vla_core.data.keys import DatasetKeys
from vla_core.data.lerobot import LeRobotDataset
from vla_core.data.normalize import NormStats, compute_stats, feature_stats, load_stats, normalize, save_stats, unnormalize
from vla_core.utils import WmvlaError

KEYS = DatasetKeys()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = make_libero_like(tmp_path_factory.mktemp("norm") / "d", layout="v3_png", episodes=6, image_size=8,
                            min_length=20, max_length=40)
    return LeRobotDataset.open(root, keys=KEYS)


def _slow_reference(x: np.ndarray) -> dict:
    """Frame-by-frame Python: running sums, then sorted columns with linear-interpolated percentiles."""
    n, d = x.shape
    s = [0.0] * d
    ss = [0.0] * d
    for row in x:
        for j in range(d):
            s[j] += float(row[j])
            ss[j] += float(row[j]) ** 2
    mean = [v / n for v in s]
    std = [max(ss[j] / n - mean[j] ** 2, 0.0) ** 0.5 for j in range(d)]

    def pct(col, q):
        c = sorted(col)
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return c[lo] + (c[hi] - c[lo]) * (pos - lo)

    cols = [[float(r[j]) for r in x] for j in range(d)]
    return {"mean": mean, "std": std, "q01": [pct(c, 0.01) for c in cols], "q99": [pct(c, 0.99) for c in cols]}


def test_stats_match_slow_reference(ds):
    stats = compute_stats(ds, KEYS)
    assert set(stats) == {"observation.state", "action"}  # keyed by dataset key, as the policy looks them up
    for key in ("observation.state", "action"):
        ref = _slow_reference(ds.columns(key))
        for name in ("mean", "std", "q01", "q99"):
            np.testing.assert_allclose(getattr(stats[key], name), ref[name], rtol=1e-9, atol=1e-9, err_msg=f"{key} {name}")
        assert stats[key].count == ds.num_frames
    assert stats["observation.state"].mode == "mean_std"
    assert stats["action"].mode == "quantile" and stats["action"].passthrough_dims == (6,)


class _BigColumns:
    """A dataset-like object with one million frames."""

    def __init__(self, n):
        rng = np.random.default_rng(0)
        self.data = {"observation.state": rng.normal(size=(n, 8)).astype(np.float32),
                     "action": np.concatenate([rng.uniform(-1, 1, (n, 6)), rng.choice([-1.0, 1.0], (n, 1))], 1).astype(np.float32)}

    def columns(self, key):
        return self.data[key]


def test_stats_are_vectorised():
    """1M frames without a per-frame Python loop: the Python lines executed inside vla_core.data.normalize are
    counted (a loop over frames would execute >= 1M); counting, not timing, so machine load cannot flake it."""
    import sys

    import vla_core.data.normalize as normalize_module

    big = _BigColumns(1_000_000)
    source = normalize_module.__file__
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        if frame.f_code.co_filename != source:
            return None
        if event == "line":
            lines += 1
        return trace

    sys.settrace(trace)
    try:
        stats = compute_stats(big, KEYS)
    finally:
        sys.settrace(None)
    assert 0 < lines < 10_000, f"{lines} Python lines ran in normalize.py for 1M frames: a per-frame loop?"
    np.testing.assert_allclose(stats["action"].mean, big.data["action"].astype(np.float64).mean(0), atol=1e-9)


def test_round_trip_numpy_and_torch(ds):
    stats = compute_stats(ds, KEYS)
    for key in stats:
        x = ds.columns(key)
        st = stats[key]
        inside = np.all((x >= st.q01) & (x <= st.q99), axis=1) if st.mode == "quantile" else np.ones(len(x), bool)
        y = normalize(x, st)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(unnormalize(y, st)[inside], x[inside], rtol=1e-5, atol=1e-5)
        yt = normalize(torch.from_numpy(x.copy()), st)
        assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
        np.testing.assert_allclose(yt.numpy(), y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(unnormalize(yt, st).numpy()[inside], x[inside], rtol=1e-5, atol=1e-5)
    # batched [B, H, A] chunks work the same
    chunk = ds.columns("action")[:24].reshape(4, 6, 7)
    np.testing.assert_allclose(normalize(chunk, stats["action"]).reshape(24, 7), normalize(ds.columns("action")[:24], stats["action"]))


def test_action_scaling_and_gripper_passthrough(ds):
    stats = compute_stats(ds, KEYS)["action"]
    a = ds.columns("action")
    y = normalize(a, stats)
    # arm dims: quantile scaling into [-1, 1], q01 -> -1, q99 -> +1
    assert y[:, :6].min() >= -1 and y[:, :6].max() <= 1
    np.testing.assert_allclose(normalize(stats.q01.astype(np.float32)[None], stats)[0, :6], -1, atol=1e-6)
    np.testing.assert_allclose(normalize(stats.q99.astype(np.float32)[None], stats)[0, :6], 1, atol=1e-6)
    # gripper: exactly unchanged both ways (still -1 / +1)
    np.testing.assert_array_equal(y[:, 6], a[:, 6])
    np.testing.assert_array_equal(unnormalize(y, stats)[:, 6], a[:, 6])
    np.testing.assert_array_equal(unnormalize(np.array([[0.0] * 6 + [0.3]], np.float32), stats)[0, 6], np.float32(0.3))
    # predictions outside [-1, 1] are clipped to the data range on the way out
    out = unnormalize(np.full((1, 7), 5.0, np.float32), stats)
    np.testing.assert_allclose(out[0, :6], stats.q99[:6], rtol=1e-6)
    # state: mean/std
    s = compute_stats(ds, KEYS)["observation.state"]
    z = normalize(ds.columns("observation.state"), s)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-3)


def test_mean_std_option_and_no_passthrough(ds):
    stats = compute_stats(ds, KEYS, action_mode="mean_std", passthrough_dims=())
    a = ds.columns("action")
    y = normalize(a, stats["action"])
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(unnormalize(y, stats["action"]), a, rtol=1e-5, atol=1e-5)  # no clipping in mean_std


def test_constant_dims_are_guarded():
    x = np.zeros((50, 3), np.float32)
    x[:, 0] = 2.5  # constant
    x[:, 1] = np.linspace(-1, 1, 50)
    x[:, 2] = 1.0  # constant gripper
    for mode in ("mean_std", "quantile"):
        st = feature_stats(x, "action", mode=mode, passthrough_dims=(2,))
        y = normalize(x, st)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y[:, 0], 0, atol=1e-6)
        back = unnormalize(y, st)
        np.testing.assert_allclose(back[:, [0, 2]], x[:, [0, 2]], atol=1e-5)
        inside = (x[:, 1] >= st.q01[1]) & (x[:, 1] <= st.q99[1])  # quantile mode clips the 1 % tails
        np.testing.assert_allclose(back[inside, 1], x[inside, 1], atol=1e-5)


def test_gripper_outside_unit_range_is_refused():
    x = np.zeros((10, 2), np.float32)
    x[:, 1] = np.linspace(0, 255, 10)
    with pytest.raises(WmvlaError, match=r"passed through unnormalised.*passthrough_dims=\(\)"):
        feature_stats(x, "action", mode="quantile", passthrough_dims=(1,))
    with pytest.raises(WmvlaError, match="NaN"):
        feature_stats(np.array([[np.nan]]), "action")


def test_dimension_mismatch_is_an_error(ds):
    stats = compute_stats(ds, KEYS)
    with pytest.raises(WmvlaError, match="last dim is 6"):
        normalize(np.zeros((2, 6), np.float32), stats["action"])


def test_save_load_round_trip(ds, tmp_path):
    stats = compute_stats(ds, KEYS)
    path = tmp_path / "norm_stats.json"
    save_stats(stats, path, fingerprint=ds.fingerprint())
    loaded = load_stats(path)
    assert set(loaded) == set(stats)
    for k in stats:
        for name in ("mean", "std", "q01", "q99", "min", "max"):
            np.testing.assert_array_equal(getattr(loaded[k], name), getattr(stats[k], name))
        assert loaded[k].mode == stats[k].mode and loaded[k].passthrough_dims == stats[k].passthrough_dims
    x = ds.columns("action")
    np.testing.assert_array_equal(normalize(x, loaded["action"]), normalize(x, stats["action"]))
    with pytest.raises(WmvlaError, match="missing"):
        load_stats(tmp_path / "nope.json")
    with pytest.raises(WmvlaError):
        NormStats.from_dict({**stats["action"].to_dict(), "extra": 1})
