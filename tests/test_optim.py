"""systems.optim: AdamW and LambdaSchedule against torch.optim (values, state, checkpoints), a
hand-worked AdamW step, and no torch._dynamo import on the training path."""
import subprocess
import sys

import pytest
import torch

from systems.optim import AdamW, LambdaSchedule, OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler


def _params(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((4, 3), (5,), ())]


def _groups(params):
    return [{"params": params[:2], "lr": 0.1, "name": "geometry"}, {"params": params[2:], "lr": 0.01, "name": "variance"}]


def _grads(step: int, params):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator) for p in params]


@pytest.mark.parametrize("fused", [False, True])
def test_one_step_by_hand(fused):
    """t = 1, g = 2, lr 0.1, betas (0.9, 0.99), eps 0, weight decay 0.5, p = 1:
    p <- 1 * (1 - 0.05) = 0.95; m = 0.1 * 2 = 0.2; v = 0.01 * 4 = 0.04;
    p <- 0.95 - 0.1 / 0.1 * 0.2 / (sqrt(0.04) / sqrt(0.01)) = 0.95 - 0.2 / 2 = 0.85."""
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = AdamW([{"params": [p], "lr": 0.1}], betas=(0.9, 0.99), eps=0.0, weight_decay=0.5, fused=fused)
    p.grad = torch.tensor([2.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.85]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.2]))
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor([0.04]))
    assert opt.state[p]["step"].item() == 1.0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_torch_adamw(weight_decay, fused):
    """Six steps with two groups, a schedule and a parameter that has no gradient at step 2:
    bit for bit the same parameters, moments and learning rates as torch.optim.AdamW + LambdaLR
    (its single-tensor algorithm for ours unfused, its fused kernel for ours fused)."""
    ours, ref = _params(), _params()
    factor = lambda step: 0.5 + 0.1 * step  # noqa: E731
    opt = AdamW(_groups(ours), betas=(0.9, 0.99), eps=1e-15, weight_decay=weight_decay, fused=fused)
    ref_opt = torch.optim.AdamW(_groups(ref), betas=(0.9, 0.99), eps=1e-15, weight_decay=weight_decay,
                                **({"fused": True} if fused else {"foreach": False}))
    sched, ref_sched = LambdaSchedule(opt, factor), torch.optim.lr_scheduler.LambdaLR(ref_opt, factor)
    for step in range(6):
        for params in (ours, ref):
            for p, g in zip(params, _grads(step, params)):
                p.grad = None if (step == 2 and p.dim() == 0) else g.clone()
        opt.step(), ref_opt.step()
        sched.step(), ref_sched.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=0, atol=0)
    assert opt.state[ours[2]]["step"].item() == 5.0  # skipped at step 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in ref_opt.param_groups])
    assert sched.state_dict()["last_epoch"] == ref_sched.state_dict()["last_epoch"] == 6


def test_state_dict_loads_both_ways():
    """A torch.optim.AdamW checkpoint (older runs) resumes in AdamW and the other way round:
    the next step is the same."""
    ref = _params()
    ref_opt = torch.optim.AdamW(_groups(ref), betas=(0.9, 0.99), eps=1e-15, weight_decay=0.0, foreach=False)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 0.9 ** s)
    for step in range(3):
        for p, g in zip(ref, _grads(step, ref)):
            p.grad = g
        ref_opt.step(), ref_sched.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt = AdamW(_groups(ours), betas=(0.9, 0.99), eps=1e-15, weight_decay=0.0, fused=False)
    sched = LambdaSchedule(opt, lambda s: 0.9 ** s)
    opt.load_state_dict(ref_opt.state_dict())
    sched.load_state_dict(ref_sched.state_dict())
    assert sched.last_epoch == 3 and sched.base_lrs == [0.1, 0.01]
    back = torch.optim.AdamW(_groups([torch.nn.Parameter(p.detach().clone()) for p in ref]), foreach=False)
    back.load_state_dict(opt.state_dict())  # our layouts load in torch.optim too
    back_sched = torch.optim.lr_scheduler.LambdaLR(back, lambda s: 0.9 ** s)
    back_sched.load_state_dict(sched.state_dict())
    assert back_sched.last_epoch == 3 and back_sched.base_lrs == [0.1, 0.01]
    for params, o, s in ((ref, ref_opt, ref_sched), (ours, opt, sched)):
        for p, g in zip(params, _grads(3, params)):
            p.grad = g
        o.step(), s.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in ref_opt.param_groups])


def test_fused_matches_reference():
    """The fused step (the default) against the single-tensor reference over 50 steps of a
    hash-table-sized parameter and two small ones, with weight decay: the same values to float32
    rounding, and the same step counts."""
    def run(fused):
        generator = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((4096, 2), (7,), ())]
        opt = AdamW(_groups(params), betas=(0.9, 0.99), eps=1e-15, weight_decay=0.01, fused=fused)
        for step in range(50):
            for p, g in zip(params, _grads(step, params)):
                p.grad = g * 0.01
            opt.step()
        return params, opt

    (fused, fused_opt), (ref, ref_opt) = run(True), run(False)
    assert fused_opt.fused and not ref_opt.fused
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused_opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])
        assert fused_opt.state[p]["step"].item() == ref_opt.state[q]["step"].item() == 50.0


def test_load_refuses_other_groups():
    opt = AdamW(_groups(_params()))
    other = AdamW([{"params": _params()[:1], "lr": 0.1}])
    with pytest.raises(ValueError, match="other parameter groups"):
        opt.load_state_dict(other.state_dict())


def test_build_from_config():
    """One group per module with its learning rate, the warm-up's first factor applied."""
    params = _params()
    opt = build_optimizer({"geometry": params[:2], "texture": [], "variance": params[2:]},
                          OptimizerConfig(lr_geometry=0.02, lr_variance=0.001))
    assert [g["name"] for g in opt.param_groups] == ["geometry", "variance"]  # empty groups dropped
    sched = build_scheduler(opt, SchedulerConfig(warmup_steps=10, warmup_start_factor=0.01, decay_start=10))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 0.01, 0.001 * 0.01])
    sched.step()  # step 1 of 10: 0.01 + 0.99 * 0.1 = 0.109
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 0.109, 0.001 * 0.109])


def test_training_step_does_not_import_dynamo():
    """The optimizer and a training step leave torch._dynamo unimported (2 s at start-up)."""
    code = (
        "import sys, torch\n"
        "from systems.optim import build_optimizer, build_scheduler, OptimizerConfig, SchedulerConfig\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = build_optimizer({'geometry': [p]}, OptimizerConfig()); s = build_scheduler(opt, SchedulerConfig())\n"
        "scaler = torch.amp.GradScaler('cpu', enabled=False)\n"
        "(p * p).sum().backward(); scaler.unscale_(opt); scaler.step(opt); scaler.update(); s.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    assert out.stdout.strip() == "False"
