"""Image-ReID heads of the CLIP-ReID family (CLIP-SCGI, MUVA): BNNeck and its BatchNorm.

BNNeck (Luo et al., "Bag of Tricks"): the feature goes through a BatchNorm whose shift is frozen at 0, then a
bias-free linear classifier; the triplet loss sees the feature before the BatchNorm, the ID loss the logits after it.
Init as CLIP-ReID: BN scale 1, classifier weights N(0, 0.001). A BatchNorm can keep its frozen shift as a variable
(`bias=True`, MUVA's test feature is the BatchNorm's output): 0 unless loaded from a checkpoint, never trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class FrozenBias(nnx.Variable):
    """A BatchNorm shift kept but never trained (not an nnx.Param: no optimizer sees it)."""


class BatchNorm1d(nnx.Module):
    """torch.nn.BatchNorm1d(affine, bias frozen at 0): batch statistics in training (biased variance to normalise,
    unbiased variance into the running estimate, as torch), running statistics after `.eval()`. [B, D] -> [B, D].
    """

    def __init__(self, dim: int, *, momentum: float = 0.1, epsilon: float = 1e-5, bias: bool = False):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = FrozenBias(jnp.zeros((dim,), jnp.float32)) if bias else None
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
        self.momentum, self.epsilon = momentum, epsilon
        self.use_running_average = False  # flipped by Module.eval() / .train()

    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """`use_running_average` overrides the module's mode for this call (None = the mode)."""
        x = x.astype(jnp.float32)
        if self.use_running_average if use_running_average is None else use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = x.shape[0]
            mean, var = jnp.mean(x, axis=0), jnp.var(x, axis=0)
            stats = jax.lax.stop_gradient((mean, var * n / max(n - 1, 1)))
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * stats[0]
            self.var[...] = (1 - m) * self.var[...] + m * stats[1]
        out = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        return out if self.bias is None else out + self.bias[...]


class BNNeck(nnx.Module):
    """feature [B, D] -> (BN feature [B, D], logits [B, C])."""

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.bn = BatchNorm1d(dim)
        self.classifier = nnx.Linear(dim, num_classes, use_bias=False,
                                     kernel_init=jax.nn.initializers.normal(0.001), rngs=rngs)

    def __call__(self, feats: Array) -> tuple[Array, Array]:
        bn = self.bn(feats)
        return bn, self.classifier(bn)
