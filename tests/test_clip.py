"""CLIP towers against transformers' PyTorch CLIPModel (random init, every parameter perturbed)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from reid_jax import weights
from reid_jax.models import clip as clip_lib
from reid_jax.models import cpu_attention
from tests import torch_refs
from tests.numerics import assert_close

# Tolerances relative to the largest value of each compared array (tests/numerics.py).
MAX_REL_ERR = 1e-4  # against the PyTorch models: other kernels, other summation orders, 2-12 layers
SAME_MATH = 1e-5  # the same computation arranged differently (scan / loop, remat, masking): rounding only
BF16_REL_ERR = 4e-2  # bfloat16 compute (8-bit mantissa, unit roundoff 2^-8 = 0.4%) against float32


def _saved_hf(shape, seed, tmp_path_factory):
    """A perturbed random-init HF CLIPModel and the folder it was saved to."""
    hf = torch_refs.hf_clip(shape, seed=seed)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    return _saved_hf(torch_refs.B16_HF, 0, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _saved_hf(torch_refs.TINY_HF, 3, tmp_path_factory)


@pytest.mark.parametrize("size", [(224, 224), (384, 128)])
def test_vit_b16_parity(b16, size):
    """ViT-B/16 shape. 384x128 uses HF's bicubic position interpolation, so we load with 'bicubic' there."""
    hf, folder = b16
    interp = size != (224, 224)
    model = weights.load_clip(folder, image_size=size, posemb_interpolation="bicubic")
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, *size, 3)).astype(np.float32)
    ids = torch_refs.random_ids(3, rng)
    img = assert_close(model.encode_image(images), torch_refs.hf_image_features(hf, images, interp), MAX_REL_ERR,
                       "image features")
    txt = assert_close(model.encode_text(ids), torch_refs.hf_text_features(hf, ids), MAX_REL_ERR, "text features")
    print(f"ViT-B/16 {size[0]}x{size[1]}: image error {img:.2f}, text error {txt:.2f} of the tolerance")


def test_every_layer_matches_hf_hidden_states(tiny):
    hf, folder = tiny
    model = weights.load_clip(folder, image_size=(32, 32), stride=8)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = torch_refs.random_ids(2, rng)
    _, img_layers = model.visual(jnp.asarray(images), return_layers=True)
    _, txt_layers = model.text(jnp.asarray(ids), return_layers=True)
    with torch.no_grad():
        ref_img = hf.vision_model(pixel_values=torch_refs.nchw(images), output_hidden_states=True).hidden_states
        ref_txt = hf.text_model(input_ids=torch.from_numpy(ids), output_hidden_states=True).hidden_states
    assert len(img_layers) == len(ref_img) - 1 == 2
    for i, (ours, ref) in enumerate(zip(img_layers + txt_layers, ref_img[1:] + ref_txt[1:])):
        assert_close(ours, ref.numpy(), MAX_REL_ERR, f"{'image' if i < 2 else 'text'} layer {i % 2}")


def _hf_vision_tokens(hf, embeddings: torch.Tensor, masks) -> np.ndarray:
    """HF encoder layers run one by one with one additive mask each."""
    h = hf.vision_model.pre_layrnorm(embeddings)
    with torch.no_grad():
        for layer, mask in zip(hf.vision_model.encoder.layers, masks):
            h = layer(h, mask)
            h = h[0] if isinstance(h, tuple) else h
    return h.numpy()


def test_attention_bias_per_layer_matches_hf(tiny):
    hf, folder = tiny
    model = weights.load_clip(folder, image_size=(32, 32), stride=8)
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    t = model.config.vision.num_tokens
    # A different mask per layer and per example: random blocked entries, the diagonal always open.
    masks = [np.where((rng.random((2, 1, t, t)) < 0.4) & ~np.eye(t, dtype=bool), -1e9, 0.0).astype(np.float32)
             for _ in range(2)]
    with torch.no_grad():
        ref = _hf_vision_tokens(hf, hf.vision_model.embeddings(torch_refs.nchw(images)),
                                [torch.from_numpy(m) for m in masks])
    as_list, _ = model.visual(jnp.asarray(images), attn_bias=[jnp.asarray(m) for m in masks])
    as_fn, _ = model.visual(jnp.asarray(images), attn_bias=lambda i, x: jnp.asarray(masks[i]))
    assert_close(as_list, ref, MAX_REL_ERR, "tokens, a bias per layer")
    assert_close(as_fn, as_list, SAME_MATH, "tokens, bias function vs list")  # scanned vs unrolled blocks
    one, _ = model.visual(jnp.asarray(images), attn_bias=jnp.asarray(masks[0]))
    ref_one = _hf_vision_tokens(hf, hf.vision_model.embeddings(torch_refs.nchw(images)),
                                [torch.from_numpy(masks[0])] * 2)
    assert_close(one, ref_one, MAX_REL_ERR, "tokens, one bias")


def test_overlapping_stride_matches_torch(tiny):
    """Stride 4 < patch 8 at 48x32 (an 11x7 grid): torch conv + F.interpolate'd grid + HF encoder as reference."""
    hf, folder = tiny
    model = weights.load_clip(folder, image_size=(48, 32), stride=4)
    assert model.config.vision.grid == (11, 7)
    images = np.random.default_rng(5).normal(size=(2, 48, 32, 3)).astype(np.float32)
    emb = hf.vision_model.embeddings
    with torch.no_grad():
        patches = F.conv2d(torch_refs.nchw(images), emb.patch_embedding.weight, stride=4).flatten(2).transpose(1, 2)
        pos = emb.position_embedding.weight
        grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(11, 7), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        pos = torch.cat([pos[:1], grid.reshape(-1, pos.shape[1])])
        x = torch.cat([emb.class_embedding.expand(2, 1, -1), patches], 1) + pos
        tokens = _hf_vision_tokens(hf, x, [None, None])
        ref = hf.visual_projection(hf.vision_model.post_layernorm(torch.from_numpy(tokens[:, 0]))).numpy()
    assert_close(model.encode_image(images), ref, MAX_REL_ERR, "image features")


def test_text_from_embeddings_matches_hf(tiny):
    """Prompt-learning path: arbitrary token embeddings in, EOT pooled at the ids' argmax."""
    hf, folder = tiny
    model = weights.load_clip(folder, image_size=(32, 32), stride=8)
    rng = np.random.default_rng(6)
    ids = torch_refs.random_ids(2, rng)
    embeddings = (0.05 * rng.normal(size=(2, 77, 64))).astype(np.float32)
    ours = model.text_features(jnp.asarray(ids), jnp.asarray(embeddings))
    tm = hf.text_model
    with torch.no_grad():
        x = tm.embeddings(inputs_embeds=torch.from_numpy(embeddings))
        causal = torch.full((77, 77), -1e9).triu(1)[None, None]
        for layer in tm.encoder.layers:
            x = layer(x, causal)
            x = x[0] if isinstance(x, tuple) else x
        x = tm.final_layer_norm(x)[torch.arange(2), torch.from_numpy(ids).argmax(-1)]
        ref = hf.text_projection(x).numpy()
    assert_close(ours, ref, MAX_REL_ERR, "text features")


def test_extra_tokens_share_cls_position_and_can_be_isolated(tiny):
    hf, folder = tiny
    plain = weights.load_clip(folder, image_size=(32, 32), stride=8)
    parts = weights.load_clip(folder, image_size=(32, 32), stride=8, vision={"num_extra_tokens": 3})
    images = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)
    # Token 1..3 are the extra tokens: before ln_pre they are extra + CLS position.
    v = parts.visual
    raw = np.asarray(v.extra_tokens[...] + v.positional_embedding[...][0])
    mean, var = raw.mean(-1, keepdims=True), raw.var(-1, keepdims=True)
    ln = v.ln_pre.norm
    expected = (raw - mean) / np.sqrt(var + 1e-5) * np.asarray(ln.scale[...]) + np.asarray(ln.bias[...])
    assert_close(v.embed(images)[0, 1:4], expected, SAME_MATH, "extra tokens after ln_pre")
    # When no other token may attend to them, CLS and the patches are unchanged.
    t = parts.config.vision.num_tokens
    bias = np.zeros((1, 1, t, t), np.float32)
    bias[:, :, :, 1:4] = -1e9
    bias[:, :, np.arange(1, 4), np.arange(1, 4)] = 0.0
    tokens, _ = parts.visual(images, attn_bias=jnp.asarray(bias))
    ref_tokens, _ = plain.visual(images)
    assert_close(np.delete(np.asarray(tokens), [1, 2, 3], axis=1), ref_tokens, SAME_MATH, "isolated tokens")


def test_bfloat16_compute_keeps_float32_params(tiny):
    _, folder = tiny
    f32 = weights.load_clip(folder, image_size=(32, 32), stride=8)
    bf16 = weights.load_clip(folder, image_size=(32, 32), stride=8, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
    rng = np.random.default_rng(8)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = torch_refs.random_ids(2, rng)
    tokens, _ = bf16.visual(jnp.asarray(images))
    assert tokens.dtype == jnp.bfloat16
    out = bf16.encode_image(images)
    assert out.dtype == jnp.float32
    assert_close(out, f32.encode_image(images), BF16_REL_ERR, "bfloat16 image features")
    assert_close(bf16.encode_text(ids), f32.encode_text(ids), BF16_REL_ERR, "bfloat16 text features")


def test_remat_gives_the_same_gradients():
    cfg = clip_lib.CLIPConfig.tiny()
    images = jnp.asarray(np.random.default_rng(9).normal(size=(2, 32, 16, 3)), jnp.float32)

    def grads(remat):
        model = clip_lib.CLIP(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
        return nnx.grad(lambda m: jnp.sum(m.image_features(images) ** 2))(model)

    for (k, a), (_, b) in zip(nnx.to_flat_state(grads(True)), nnx.to_flat_state(grads(False))):
        assert_close(a[...], b[...], SAME_MATH, "gradient " + ".".join(map(str, k)))


def test_layer_scan_equals_unrolled_blocks():
    """The scanned transformer (default) against the plain per-block loop: outputs, every layer's tokens, a
    per-layer attention bias, gradients (with and without remat), and the same parameter names."""
    cfg = clip_lib.CLIPConfig.tiny()
    rng = np.random.default_rng(10)
    images = jnp.asarray(rng.normal(size=(2, 32, 16, 3)), jnp.float32)
    t = cfg.vision.num_tokens
    biases = [jnp.asarray(rng.normal(size=(2, 1, t, t)), jnp.float32) for _ in range(cfg.vision.layers)]
    ids = jnp.asarray(torch_refs.random_ids(2, rng, cfg.text.context_length))

    def run(scan, remat=False):
        model = clip_lib.CLIP(cfg.replace(scan_layers=scan, remat=remat), rngs=nnx.Rngs(0))
        leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))  # LayerNorm and biases non-trivial
        keys = jax.random.split(jax.random.key(1), len(leaves))
        nnx.update(model, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                                    for x, k in zip(leaves, keys)]))
        tokens, layers = model.visual(images, attn_bias=biases, return_layers=True)
        grads = nnx.grad(lambda m: jnp.sum(m.image_features(images) ** 2) + jnp.sum(m.text_features(ids) ** 2))(
            model)
        return tokens, layers, nnx.to_flat_state(grads)

    ref_tokens, ref_layers, ref_grads = run(False)
    for remat in (False, True):
        tokens, layers, grads = run(True, remat)
        assert_close(tokens, ref_tokens, SAME_MATH, f"tokens (remat={remat})")
        assert len(layers) == cfg.vision.layers
        for i, (a, b) in enumerate(zip(layers, ref_layers)):
            assert_close(a, b, SAME_MATH, f"layer {i} (remat={remat})")
        assert [k for k, _ in grads] == [k for k, _ in ref_grads]
        for (k, a), (_, b) in zip(grads, ref_grads):
            assert_close(a[...], b[...], SAME_MATH, f"gradient {'.'.join(map(str, k))} (remat={remat})")


@pytest.mark.parametrize("scan", [False, True])
def test_padded_masked_attention_equals_unpadded(scan):
    """The token padding cuDNN needs (sequence padded, pad keys masked, pad sliced off), run on XLA here, against
    the unpadded model: image 33 -> 36 tokens and text 15 -> 16, with a per-layer and a token-dependent (MUVA-like)
    attention bias; features, every layer's tokens and the gradients of every parameter."""
    cfg = clip_lib.CLIPConfig.tiny(scan_layers=scan, attention="xla")
    rng = np.random.default_rng(11)
    images = jnp.asarray(rng.normal(size=(2, 32, 16, 3)), jnp.float32)
    ids = jnp.asarray(torch_refs.random_ids(2, rng, cfg.text.context_length))[:, :15]
    ids = ids.at[:, 14].set(jnp.maximum(ids[:, 14], 49407))  # keep an EOT within the 15 tokens
    t = cfg.vision.num_tokens
    assert t % 4 and ids.shape[1] % 4, "the test needs sequences that get padded"
    biases = [jnp.asarray(rng.normal(size=(2, 1, t, t)), jnp.float32) for _ in range(cfg.vision.layers)]

    def token_bias(i, tokens):  # depends on the layer's real tokens, as MUVA's masks do
        return jnp.tanh(tokens[:, None, :, :1] - tokens[:, None, None, :, 0]) * (i + 1)

    def run(pad):
        model = clip_lib.CLIP(cfg.replace(pad_tokens_to=pad), rngs=nnx.Rngs(0))
        leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
        keys = jax.random.split(jax.random.key(2), len(leaves))
        nnx.update(model, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                                    for x, k in zip(leaves, keys)]))
        _, per_layer = model.visual(images, attn_bias=biases, return_layers=True)
        tokens, _ = model.visual(images, attn_bias=token_bias)

        def loss(m):
            return jnp.sum(m.image_features(images) ** 2) + jnp.sum(m.text_features(ids) ** 2)

        return model.image_features(images), model.text_features(ids), per_layer, tokens, nnx.to_flat_state(
            nnx.grad(loss)(model))

    ref, padded = run(1), run(4)
    for name, a, b in zip(("image features", "text features"), padded[:2], ref[:2]):
        assert_close(a, b, SAME_MATH, name)
    assert padded[2][0].shape == ref[2][0].shape == (2, t, cfg.vision.width)
    for i, (a, b) in enumerate(zip(padded[2], ref[2])):
        assert_close(a, b, SAME_MATH, f"layer {i} with a per-layer bias")
    assert_close(padded[3], ref[3], SAME_MATH, "tokens with a token-dependent bias")
    for (k, a), (_, b) in zip(padded[4], ref[4]):
        assert_close(a[...], b[...], SAME_MATH, f"gradient {'.'.join(map(str, k))}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_attention_equals_jax_attention(dtype):
    """The CPU attention (a hand-written backward) against autodiff of jax.nn.dot_product_attention (XLA): plain,
    with a bias, causal, with masked pad keys; values and the gradients of q, k, v and of the bias."""
    rng = np.random.default_rng(12)
    q, k, v, c = (jnp.asarray(rng.normal(size=(2, 9, 3, 8)), dtype) for _ in range(4))
    bias = jnp.asarray(rng.normal(size=(2, 1, 9, 9)), jnp.float32)  # per image, shared by the heads (MUVA's)
    tol = SAME_MATH if dtype == "float32" else BF16_REL_ERR
    for kw in ({}, {"bias": bias}, {"bias": bias[0, 0]}, {"is_causal": True}, {"keys": 6}):
        b = kw.get("bias", jnp.zeros((), jnp.float32))

        def loss(fn):
            return lambda q, k, v, b: jnp.sum(fn(q, k, v, b).astype(jnp.float32) * c)

        ours = lambda q, k, v, b: cpu_attention.attention(q, k, v, **(kw | ({"bias": b} if "bias" in kw else {})))

        def ref(q, k, v, b):
            if "keys" in kw:
                return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.full((2,), 6, jnp.int32),
                                                    implementation="xla")
            bias4 = jnp.broadcast_to(b, (1,) * (4 - b.ndim) + b.shape).astype(dtype) if "bias" in kw else None
            return jax.nn.dot_product_attention(q, k, v, bias=bias4, is_causal=kw.get("is_causal", False),
                                                implementation="xla")

        assert_close(ours(q, k, v, b), ref(q, k, v, b), tol, f"attention {kw.keys()}")
        ours_grads, ref_grads = (jax.grad(loss(fn), (0, 1, 2, 3))(q, k, v, b) for fn in (ours, ref))
        for name, a, r in zip("qkvb", ours_grads, ref_grads):
            assert a.shape == r.shape, f"d{name} {kw.keys()}: shape {a.shape} vs {r.shape}"
            assert_close(a, r, tol, f"d{name} {kw.keys()} bias shape {b.shape}")


def test_attention_implementation_choice():
    """cuDNN only where its kernel runs: never on CPU, whatever the dtype; an explicit choice is kept."""
    for dtype in ("float32", "bfloat16"):
        assert clip_lib.attention_implementation(clip_lib.CLIPConfig.tiny(dtype=dtype), 16) == "xla"
    assert clip_lib.attention_implementation(clip_lib.CLIPConfig.tiny(attention="cudnn"), 16) == "cudnn"
    model = clip_lib.CLIP(clip_lib.CLIPConfig.tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert model.visual.transformer.pad_tokens_to == 1  # XLA: no padding
    assert clip_lib.padded_length(193, 2) == 194 and clip_lib.padded_length(196, 2) == 196
    with pytest.raises(ValueError, match="pad_tokens_to"):
        clip_lib.CLIPConfig.tiny(pad_tokens_to=-1).validate()


def test_set_compute_dtype_chooses_attention_again(monkeypatch):
    """A model built in float32 and switched to bfloat16 (as inference.Encoder does) on an NVIDIA GPU gets cuDNN and
    its padding, as one built in bfloat16 would; back to float32, XLA without padding; explicit choices stay."""
    model = clip_lib.CLIP(clip_lib.CLIPConfig.tiny(), rngs=nnx.Rngs(0))
    fixed = clip_lib.CLIP(clip_lib.CLIPConfig.tiny(attention="xla", pad_tokens_to=4), rngs=nnx.Rngs(0))
    gpu = types.SimpleNamespace(platform="gpu", client=types.SimpleNamespace(platform_version="cuda 12.8"),
                                compute_capability="9.0")
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    towers = lambda m: (m.visual.transformer, m.text.transformer)
    attentions = lambda m: [b.attn for t in towers(m) for b in t.resblocks]
    for dtype, impl, pad in (("bfloat16", "cudnn", 2), ("float32", "xla", 1)):
        clip_lib.set_compute_dtype(model, dtype)
        clip_lib.set_compute_dtype(fixed, dtype)
        assert {a.implementation for a in attentions(model)} == {impl}
        assert {t.pad_tokens_to for t in towers(model)} == {pad}
        assert {a.implementation for a in attentions(fixed)} == {"xla"}
        assert {t.pad_tokens_to for t in towers(fixed)} == {4}
        block = model.visual.transformer.resblocks[0]
        assert block.mlp.c_fc.dtype == block.ln_1.dtype == jnp.dtype(dtype)
        assert block.ln_1.norm.dtype == jnp.float32  # LayerNorm itself stays in float32


def test_encode_accepts_numpy_and_checks_the_input_size():
    model = clip_lib.CLIP(clip_lib.CLIPConfig.tiny(), rngs=nnx.Rngs(0))
    out = model.encode_image(np.zeros((3, 32, 16, 3), np.float32))
    assert out.shape == (3, 24) and out.dtype == jnp.float32
    assert model.encode_text(np.zeros((2, 16), np.int32)).shape == (2, 24)
    with pytest.raises(ValueError, match=r"images must be \[B, 32, 16, 3\]"):
        model.encode_image(np.zeros((1, 16, 32, 3), np.float32))


def test_config_round_trip_and_validation():
    cfg = clip_lib.CLIPConfig.vit_b16(image_size=(384, 128), stride=12)
    assert clip_lib.CLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.vision.grid == (31, 10)
    with pytest.raises(ValueError, match="activation"):
        cfg.replace(activation="relu").validate()
