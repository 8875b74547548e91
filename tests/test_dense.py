"""The bfloat16 dense product (reid_jax/models/dense.py) against the same product written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reid_jax.models import clip as clip_lib
from reid_jax.models import dense
from tests.numerics import assert_close

BF16_REL_ERR = 1e-2  # outputs and gradients rounded to bfloat16 once (unit roundoff 2^-8), float32 accumulation


def _bf16(a) -> np.ndarray:
    """numpy float64 copy of an array rounded to bfloat16."""
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def test_transposed_copy_is_the_transpose():
    a = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dense.transposed_copy(a)), np.asarray(a).T)


def test_bf16_product_and_gradients_match_numpy():
    """y = x @ w and, for a loss sum(y * c), dx = c @ w^T, dw = x^T @ c on bfloat16-rounded operands."""
    rng = np.random.default_rng(1)
    x, w, c = rng.normal(size=(2, 9, 24)), rng.normal(size=(24, 40)), rng.normal(size=(2, 9, 40))
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def loss(x, w):
        y = dense.dot_general(x, w, (((2,), (0,)), ((), ())))
        return jnp.sum(y.astype(jnp.float32) * c), y

    (_, y), (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(xb, wb)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    x64, w64, c64 = _bf16(x), _bf16(w), _bf16(c)
    assert_close(np.asarray(y, np.float32), x64 @ w64, BF16_REL_ERR, "y")
    assert_close(np.asarray(dx, np.float32), c64 @ w64.T, BF16_REL_ERR, "dx")
    assert_close(np.asarray(dw, np.float32), x64.reshape(-1, 24).T @ c64.reshape(-1, 40), BF16_REL_ERR, "dw")


def test_linear_is_nnx_linear_with_a_float32_bias_gradient():
    """dense.Linear against nnx.Linear with the same parameters: outputs equal in float32; in bfloat16 the bias
    gradient is the float32 sum of the bfloat16 output gradient (numpy)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
    ours, ref = dense.Linear(12, 7, rngs=nnx.Rngs(0)), nnx.Linear(12, 7, rngs=nnx.Rngs(0))
    ours.bias[...] = ref.bias[...] = jnp.asarray(rng.normal(size=7), jnp.float32)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(ref(x)), rtol=1e-6, atol=1e-6)
    ours.dtype = jnp.bfloat16
    c = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) * c))(ours)
    np.testing.assert_allclose(np.asarray(grads.bias[...]), _bf16(c).sum(axis=(0, 1)), rtol=1e-5)
    assert_close(grads.kernel[...], _bf16(x).reshape(-1, 12).T @ _bf16(c).reshape(-1, 7), BF16_REL_ERR, "kernel")


def test_float32_and_other_products_are_lax_dot_general():
    rng = np.random.default_rng(2)
    x, w = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32), jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    dims = (((2,), (0,)), ((), ()))
    np.testing.assert_array_equal(np.asarray(dense.dot_general(x, w, dims)),
                                  np.asarray(jax.lax.dot_general(x, w, dims)))
    batched = (((2,), (2,)), ((0,), (0,)))  # not a dense layer's product: passed through
    y = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dense.dot_general(x.astype(jnp.bfloat16), y, batched)),
                                  np.asarray(jax.lax.dot_general(x.astype(jnp.bfloat16), y, batched)))


def test_bf16_clip_gradients_follow_float32():
    """A bfloat16 CLIP (every dense layer on the path above) against the same model in float32: features and the
    gradient of every parameter, to bfloat16's precision over two layers."""
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(2, 32, 16, 3)), jnp.float32)

    def run(dtype):
        model = clip_lib.CLIP(clip_lib.CLIPConfig.tiny(dtype=dtype), rngs=nnx.Rngs(0))
        loss = lambda m: jnp.sum(m.image_features(images) ** 2)
        features, grads = nnx.jit(lambda m: (m.image_features(images), nnx.grad(loss)(m)))(model)
        return features, nnx.to_flat_state(grads)

    (f16, g16), (f32, g32) = run("bfloat16"), run("float32")
    assert_close(f16, f32, 4e-2, "image features")
    for (k, a), (_, b) in zip(g16, g32):
        assert a[...].dtype == jnp.float32  # parameters and their gradients stay float32
        assert_close(a[...], b[...], 8e-2, "gradient " + ".".join(map(str, k)))
