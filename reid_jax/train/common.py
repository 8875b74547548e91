"""Training set-up every method's task shares: the schedule (steps, optimizer, learning rate) and its checks, P x K
batches, per-class means. The data comes from `reid_jax.data.specs`, the starting CLIP from
`reid_jax.weights.model_for`, evaluation from `reid_jax.eval`."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from reid_jax import errors
from reid_jax.data import specs
from reid_jax.train import optimizer


def schedule(config: ml_collections.ConfigDict, num_examples: int):
    """(steps_per_epoch, total_steps, optax transformation, learning-rate schedule) for `num_examples` training
    examples per epoch in batches of config.data.batch_size."""
    batch, devices = config.data.batch_size, jax.device_count()
    if batch <= 0 or batch % devices:
        raise errors.UserError(f"config.data.batch_size={batch}: expected a positive multiple of the {devices} "
                               f"device(s); set --config.data.batch_size")
    if batch > num_examples:
        raise errors.UserError(f"config.data.batch_size={batch} is larger than the training set "
                               f"({num_examples} examples of {specs.describe(config.data.train)}); lower "
                               f"--config.data.batch_size or train on a larger set")
    if config.train.epochs < 0:
        raise errors.UserError(f"config.train.epochs={config.train.epochs}: expected 0 (evaluate only) or more")
    steps_per_epoch = num_examples // batch
    total_steps = steps_per_epoch * config.train.epochs
    return (steps_per_epoch, total_steps, *optimizer.make(config.optim, steps_per_epoch, total_steps))


def check_pk_batch(config: ml_collections.ConfigDict) -> None:
    """P x K batches (`pipeline.pk_train`) hold pk.identities * pk.instances images: the epoch length is counted
    with config.data.batch_size, so the two must agree."""
    pk = config.data.pk
    if pk.identities * pk.instances != config.data.batch_size:
        raise errors.ConfigError(f"config.data.batch_size={config.data.batch_size} must equal config.data.pk.identities "
                         f"x instances = {pk.identities} x {pk.instances}")


def class_means(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [C, D]: the mean of the rows `feats` [N, D] of each class `labels` [N] in 0..C-1 (0 when empty)."""
    sums = np.zeros((num_classes, feats.shape[1]), np.float64)
    np.add.at(sums, labels, feats)
    return (sums / np.maximum(np.bincount(labels, minlength=num_classes), 1)[:, None]).astype(np.float32)
