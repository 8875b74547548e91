"""Optimizers and learning-rate schedules from config (every number in `config.optim`).

`adam` is PyTorch's Adam with `weight_decay` (L2 added to the gradient, what IRRA / CLIP-ReID / MUVA use);
`adamw` decouples the decay. Parameter groups match regular expressions against dotted parameter names of
`loop.Trainable` (`model.visual.transformer.resblocks.3.attn.in_proj.bias`, `heads.classifier.kernel`) and
scale the learning rate and set the weight decay, as the papers' PyTorch param groups do (e.g. IRRA: biases at
2x lr without decay; MUVA: RMP at 10x lr).
The schedule runs per step: linear warmup from `warmup_factor` x lr, then cosine (to `final_factor` x lr) or
steps of `gamma` at the `milestones` epochs.
"""

from __future__ import annotations

import re

import jax
import ml_collections
import optax

from reid_jax import errors


def param_name(path) -> str:
    """A jax key path into an nnx.State -> 'model.visual.transformer.resblocks.0.attn.in_proj.kernel'."""
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _group(cfg: ml_collections.ConfigDict, name: str) -> tuple[float, float]:
    """(lr multiplier, weight decay) of a parameter: the first matching group, else (1, cfg.weight_decay)."""
    for group in cfg.get("param_groups", ()):
        if re.search(group["pattern"], name):
            return group.get("lr_mult", 1.0), group.get("weight_decay", cfg.weight_decay)
    return 1.0, cfg.weight_decay


def _per_param(fn) -> optax.GradientTransformation:
    """updates <- fn(name, update, param) leaf by leaf."""
    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(lambda p, u, w: fn(param_name(p), u, w), updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    warmup = optax.linear_schedule(cfg.lr * cfg.warmup_factor, cfg.lr, max(warm, 1))
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warm, 1), alpha=cfg.final_factor)
    elif cfg.schedule == "multistep":
        main = optax.piecewise_constant_schedule(
            cfg.lr, {int(round(m * steps_per_epoch)) - warm: cfg.gamma for m in cfg.milestones})
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        raise errors.ConfigError(f"config.optim.schedule must be cosine, multistep or constant, got {cfg.schedule!r}")
    return optax.join_schedules([warmup, main], [warm]) if warm else main


def make(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
    """(optax transformation, schedule) for `config.optim`."""
    lr = schedule(cfg, steps_per_epoch, total_steps)
    decay = _per_param(lambda name, u, p: u + _group(cfg, name)[1] * p)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.get("grad_clip") else []
    if cfg.name == "adam":
        parts += [decay, optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps)]
    elif cfg.name == "adamw":
        parts += [optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps), decay]
    else:
        raise errors.ConfigError(f"config.optim.name must be adam or adamw, got {cfg.name!r}")
    parts += [optax.scale_by_learning_rate(lr), _per_param(lambda name, u, p: u * _group(cfg, name)[0])]
    return optax.chain(*parts), lr
