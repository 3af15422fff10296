"""Unit tests of the training building blocks: schedule, sampler, EMA, first-step checks, run naming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_core.train.checks import (
    ParamSnapshot,
    check_first_step,
    check_fp32_trainable,
    check_optimizer_covers,
    check_optimizer_state_fp32,
    grad_status,
)
from vla_core.train.ema import EMA
from vla_core.train.rundir import check_same_config, run_dir_for, run_status, run_tag, world_source_name
from vla_core.train.sampler import ResumableBatchSampler
from vla_core.train.schedule import lr_at
from vla_core.utils import WmvlaError


def test_lr_schedule_warmup_cosine_floor():
    lrs = [lr_at(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1)  # first update is not a no-op
    assert lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_sampler_resume_and_shards():
    idx = np.arange(100, 137)
    full = list(ResumableBatchSampler(idx, 4, seed=3, num_batches=20))
    resumed = list(ResumableBatchSampler(idx, 4, seed=3, start_batch=7, num_batches=20))
    assert resumed == full[7:]
    # one epoch = 9 batches of 4 out of 37; within an epoch no sample repeats, all from idx
    epoch0 = [i for b in full[:9] for i in b]
    assert len(set(epoch0)) == 36 and set(epoch0) <= set(idx.tolist())
    assert full[9:18] != full[:9]  # a new permutation each epoch
    # two ranks split the same global batches disjointly
    r0 = list(ResumableBatchSampler(idx, 2, seed=3, rank=0, world_size=2, num_batches=5))
    r1 = list(ResumableBatchSampler(idx, 2, seed=3, rank=1, world_size=2, num_batches=5))
    for a, b, g in zip(r0, r1, full):
        assert a + b == g
    with pytest.raises(WmvlaError):
        ResumableBatchSampler(np.arange(3), 4, seed=0)


def test_ema_tracks_trainable_and_swaps():
    lin = torch.nn.Linear(3, 2)
    params = {n: p for n, p in lin.named_parameters()}
    ema = EMA(params, decay=0.5)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()  # warmed-up decay min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], w0 * d + (w0 + 1) * (1 - d))
    with ema.swapped_in():
        assert torch.allclose(lin.weight, ema.shadow["weight"])
    assert torch.allclose(lin.weight, w0 + 1)


class Gated(torch.nn.Module):
    """A toy gated branch; `skip_closed_gate` reproduces the earlier attempt's bug."""

    def __init__(self, skip_closed_gate=False):
        super().__init__()
        self.base = torch.nn.Linear(4, 4)
        self.branch = torch.nn.Linear(4, 4)
        self.gate = torch.nn.Parameter(torch.zeros(1))
        self.skip = skip_closed_gate

    def forward(self, x):
        y = self.base(x)
        if self.skip and torch.tanh(self.gate).abs().item() < 1e-6:
            return y
        return y + torch.tanh(self.gate) * self.branch(x)


def _first_step(model, optimizer, allow=()):
    snap = ParamSnapshot(model)
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    seen = grad_status(model)
    optimizer.step()
    return check_first_step(model, snap, seen, allow)


def test_first_step_check_passes_on_correct_setup():
    torch.manual_seed(0)
    m = Gated()
    opt = torch.optim.AdamW([p for p in m.parameters()], lr=1e-3)
    check_optimizer_covers(m, opt)
    # branch weights get a zero gradient while the gate is exactly 0 (d/dW of 0*branch): allowed explicitly
    counts = _first_step(m, opt, allow=("branch.*",))
    assert counts["trainable_tensors"] == 5
    assert m.gate.item() != 0.0  # the closed gate still receives a gradient
    check_optimizer_state_fp32(opt)


def test_first_step_check_fires_on_skipped_gate():
    torch.manual_seed(0)
    m = Gated(skip_closed_gate=True)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with pytest.raises(WmvlaError, match="gate"):
        _first_step(m, opt, allow=("branch.*",))


def test_first_step_check_fires_on_param_missing_from_optimizer_and_frozen_moving():
    torch.manual_seed(0)
    m = Gated()
    opt = torch.optim.AdamW([m.base.weight, m.gate], lr=1e-3)  # base.bias "forgotten" (the LoRA bug)
    with pytest.raises(WmvlaError, match="not given to the optimizer"):
        check_optimizer_covers(m, opt)
    with pytest.raises(WmvlaError, match="did not change"):
        _first_step(m, opt, allow=("branch.*",))
    # frozen parameters in the optimizer, or changed by anything else, are caught too
    m2 = Gated()
    m2.base.requires_grad_(False)
    opt2 = torch.optim.AdamW(list(m2.branch.parameters()) + [m2.gate, m2.base.weight], lr=1e-3)
    with pytest.raises(WmvlaError, match="frozen parameters"):
        check_optimizer_covers(m2, opt2)
    snap = ParamSnapshot(m2)
    with torch.no_grad():
        m2.base.bias.mul_(1.5)
    with pytest.raises(WmvlaError, match="frozen parameters that changed"):
        check_first_step(m2, snap, {n: "ok" for n, p in m2.named_parameters() if p.requires_grad}, ("*",))


def test_fp32_check_fires_on_bf16_trainable():
    m = Gated().to(torch.bfloat16)
    with pytest.raises(WmvlaError, match="float32"):
        check_fp32_trainable(m)
    m.base.requires_grad_(False)
    m.branch.float()
    m.gate.data = m.gate.data.float()
    check_fp32_trainable(m)  # a bf16 frozen base is fine


def test_run_naming_and_status(tmp_path):
    assert world_source_name("facebook/vjepa2-vitl-fpc64-256") == "vjepa2-vitl"
    assert world_source_name("tiny") == "tiny"
    assert run_tag("facebook/vjepa2-vitg-fpc64-256", 4, True, "flow") == "vjepa2-vitg_m4_delta_flow"
    assert run_tag("tiny", 1, False, "mse") == "tiny_m1_mse"
    d = run_dir_for(tmp_path, "E2", "tiny_m4_delta_mse", 1)
    assert d == tmp_path / "E2" / "tiny_m4_delta_mse" / "seed1"
    assert run_status(d).state == "new"
    d.mkdir(parents=True)
    (d / "something.txt").write_text("x")
    with pytest.raises(WmvlaError, match="not a wmvla run folder"):
        run_status(d)
    with pytest.raises(WmvlaError, match="different configuration"):
        check_same_config(d, {"optim": {"lr": 1e-4}, "log_every": 1}, {"optim": {"lr": 3e-4}, "log_every": 1})
    check_same_config(d, {"optim": {"lr": 1e-4}, "log_every": 1}, {"optim": {"lr": 1e-4}, "log_every": 5})
