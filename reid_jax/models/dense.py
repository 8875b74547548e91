"""The dense layers' matrix product, with a bfloat16 path that keeps XLA:CPU on its fast kernels.

XLA:CPU hands a matrix product to YNNPACK (AMX / AVX-512-BF16 kernels for bfloat16 operands) only when both
operands are row-major with the contraction on the left operand's last axis and the right operand's first; any
other product of bfloat16 operands is first converted to float32. A dense layer's forward product is of that form,
but the two products of its backward pass are not: dx = g @ w^T and dw = x^T @ g. XLA lowers a transpose as a
layout change of the operand (no copy), which that check rejects. `dot_general` gives these products operands that
are transposed copies: a gather by computed indices, which XLA cannot fold into a layout, costs one pass over the
operand. `Linear` also adds its bias in float32 and sums the bias gradient in float32: XLA:CPU rewrites the
reduction of a bfloat16 gradient into a slow tree of reduce-windows. On `python -m reid_jax.bench train_step
--dtype bfloat16` this is what makes the bfloat16 step faster than float32 on a CPU (docs/speed.md has the figures).

Numerics are those of mixed precision: bfloat16 operands, float32 accumulation, the output and the gradients of
the operands rounded to bfloat16 (as PyTorch's autocast). On other backends, and for float32 operands, this is
`jax.lax.dot_general`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def transposed_copy(a: Array) -> Array:
    """[M, K] -> [K, M] as a row-major copy (a gather XLA cannot turn back into a layout change)."""
    m, k = a.shape
    index = jnp.arange(m, dtype=jnp.int32)[None, :] * k + jnp.arange(k, dtype=jnp.int32)[:, None]
    return a.reshape(-1)[index]


def _product(a: Array, b: Array) -> Array:
    """[M, K] @ [K, N] on bfloat16 operands, float32 accumulation -> bfloat16 [M, N]."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
    """bfloat16 [M, K] @ [K, N] -> bfloat16 [M, N]; every product of forward and backward in YNNPACK's form."""
    return _product(x, w)


def _matmul_fwd(x: Array, w: Array):
    return _product(x, w), (x, w)


def _matmul_bwd(residuals, g: Array):
    x, w = residuals
    g = g.astype(jnp.bfloat16)
    return _product(g, transposed_copy(w)), _product(transposed_copy(x), g)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _is_dense(lhs: Array, rhs: Array, dimension_numbers) -> bool:
    """A dense layer's product: [..., K] x [K, N], contracting the last axis with the first, no batch axes."""
    (lc, rc), (lb, rb) = dimension_numbers
    return (rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb)


def dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs) -> Array:
    """`jax.lax.dot_general`, routed through `matmul` for bfloat16 dense products on CPU (what `Linear` calls).
    lhs [..., K], rhs [K, N] -> [..., N]."""
    fast = (jax.default_backend() == "cpu" and lhs.dtype == rhs.dtype == jnp.bfloat16
            and preferred_element_type in (None, jnp.bfloat16) and _is_dense(lhs, rhs, dimension_numbers)
            and not kwargs.get("out_sharding"))
    if not fast:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    return matmul(lhs.reshape(-1, lhs.shape[-1]), rhs).reshape(*lhs.shape[:-1], rhs.shape[1])


@jax.custom_vjp
def add_bias(y: Array, bias: Array) -> Array:
    """y [..., N] + float32 bias [N], added in float32 and returned in y's dtype; the bias gradient is the float32
    sum of the output gradient."""
    return (y.astype(jnp.float32) + bias).astype(y.dtype)


def _add_bias_fwd(y: Array, bias: Array):
    return add_bias(y, bias), None


def _add_bias_bwd(_, g: Array):
    return g, jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters, same init arguments) whose products go through `dot_general` above and whose
    float32 bias goes through `add_bias`. x [..., in] -> [..., out] in the layer's compute dtype."""

    def __call__(self, x: Array) -> Array:
        x, kernel = self.promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y if self.bias is None else add_bias(y, self.bias[...].astype(jnp.float32))
