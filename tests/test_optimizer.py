"""Optimizer and schedules against torch.optim: Adam with L2 weight decay and AdamW, IRRA-style parameter groups
(per-group lr multiplier and weight decay), linear warmup then cosine / multistep, per step."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from reid_jax.train import loop, optimizer
from tests.numerics import assert_close


def _config(name: str, schedule: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "name": name, "lr": 1e-2, "b1": 0.9, "b2": 0.98, "eps": 1e-3, "weight_decay": 0.05,
        "schedule": schedule, "warmup_epochs": 2.0, "warmup_factor": 0.1, "final_factor": 0.0,
        "milestones": (4, 6), "gamma": 0.1, "grad_clip": 0.0,
        "param_groups": [{"pattern": r"^heads\..*bias$", "lr_mult": 5.0, "weight_decay": 0.0},
                         {"pattern": r"\.bias$", "lr_mult": 2.0, "weight_decay": 0.0},
                         {"pattern": r"^heads\.", "lr_mult": 5.0}]})


def _torch_lr_factor(cfg, spe: int, total: int, step: int) -> float:
    """The schedule written out: linear warmup from warmup_factor, then cosine or steps of gamma."""
    warm = int(cfg.warmup_epochs * spe)
    if step < warm:
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * step / warm
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    return cfg.gamma ** sum(step >= m * spe for m in cfg.milestones)


@pytest.mark.parametrize("name,schedule", [("adam", "cosine"), ("adamw", "multistep")])
def test_matches_torch_optim_with_param_groups(name, schedule):
    cfg, spe, total = _config(name, schedule), 3, 24
    model, heads = nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    ts = loop.TrainState(model, optimizer.make(cfg, spe, total)[0], heads=heads)
    tm, th = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)
    with torch.no_grad():
        for t, m in ((tm, model), (th, heads)):
            t.weight.copy_(torch.from_numpy(np.array(m.kernel[...]).T))
            t.bias.copy_(torch.from_numpy(np.array(m.bias[...]) + 0.3))  # non-zero biases
            m.bias[...] = m.bias[...] + 0.3
    groups = [{"params": [tm.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
              {"params": [tm.bias], "lr": cfg.lr * 2, "weight_decay": 0.0},
              {"params": [th.weight], "lr": cfg.lr * 5, "weight_decay": cfg.weight_decay},
              {"params": [th.bias], "lr": cfg.lr * 5, "weight_decay": 0.0}]
    if name == "adam":
        opt = torch.optim.Adam(groups, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    else:  # torch's AdamW decays by lr * wd, as optax does
        opt = torch.optim.AdamW(groups, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _torch_lr_factor(cfg, spe, total, s))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)

    def loss_fn(p):
        return jnp.mean((p.heads(jnp.tanh(p.model(x))) - y) ** 2)

    for _ in range(total):
        params = ts.trainable()
        grads = nnx.grad(loss_fn)(params)
        ts.optimizer.update(params, grads)
        opt.zero_grad()
        torch.mean((th(torch.tanh(tm(torch.from_numpy(x)))) - torch.from_numpy(y)) ** 2).backward()
        opt.step()
        sched.step()
    # 24 steps of float32 rounding in two implementations, relative to each array's largest value
    for label, t, m in (("model", tm, model), ("heads", th, heads)):
        assert_close(np.asarray(m.kernel[...]), t.weight.detach().numpy().T, 1e-5, f"{label} kernel")
        assert_close(np.asarray(m.bias[...]), t.bias.detach().numpy(), 1e-5, f"{label} bias")


def test_schedule_matches_the_written_formula():
    cfg = _config("adam", "cosine")
    lr = optimizer.schedule(cfg, 3, 24)
    got = np.asarray([lr(s) for s in range(24)])
    want = np.asarray([cfg.lr * _torch_lr_factor(cfg, 3, 24, s) for s in range(24)])
    assert_close(got, want, 1e-6, "learning rates")  # float32 of the float64 formula; relative to the peak
    assert got[0] == pytest.approx(cfg.lr * 0.1) and got[6] == pytest.approx(cfg.lr)


def test_unknown_names_are_rejected():
    cfg = _config("sgd", "cosine")
    with pytest.raises(ValueError, match="config.optim.name"):
        optimizer.make(cfg, 3, 24)
    cfg = _config("adam", "linear")
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optimizer.make(cfg, 3, 24)
