"""Random-init Flax modules made non-trivial for tests: every parameter perturbed (LayerNorm scales and biases
included), so that a test cannot pass on an all-ones scale or an all-zero bias."""

import jax
from flax import nnx


def perturb(module: nnx.Module, seed: int = 0, scale: float = 0.1) -> nnx.Module:
    """Adds scale * N(0, 1) to every nnx.Param of `module`, in place; returns it."""
    leaves, tree = jax.tree.flatten(nnx.state(module, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                                 for x, k in zip(leaves, keys)]))
    return module


# The trainers' tests run their configs with this model: 64x32 images, 2 layers of width 32 in each tower
TINY_MODEL = {"vision": {"width": 32, "layers": 2, "heads": 2, "mlp_dim": 64, "patch_size": 16},
              "text": {"width": 32, "layers": 2, "heads": 2, "mlp_dim": 64, "context_length": 48},
              "embed_dim": 24}
