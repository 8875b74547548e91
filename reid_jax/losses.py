"""Losses of the three methods as pure functions of arrays (easy to test against written-out formulas).

Shapes: B batch, D feature, C classes, L tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SDM_EPS = 1e-8  # IRRA's epsilon inside log(q); kept as in the published code


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows (last axis) scaled to unit length; zero rows stay zero."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sdm(image_feats: jax.Array, text_feats: jax.Array, pids: jax.Array, logit_scale: float = 50.0) -> jax.Array:
    """Similarity-distribution matching (IRRA; TDE+NAM's only pretraining loss).

    image_feats [B, D], text_feats [B, D] (row i is a matched pair), pids [B]. S = norm(t) @ norm(v)^T; the
    target q_ij = 1[pid_i == pid_j] / (row count); each direction is mean_i KL(softmax(scale S_i) || q_i),
    computed as sum_j p_ij (log p_ij - log(q_ij + eps)). Returns the scalar L_i2t + L_t2i.
    """
    sims = l2_normalize(text_feats.astype(jnp.float32)) @ l2_normalize(image_feats.astype(jnp.float32)).T  # [B_t, B_i]
    same = (pids[:, None] == pids[None, :]).astype(jnp.float32)
    q = same / same.sum(axis=1, keepdims=True)
    log_q = jnp.log(q + SDM_EPS)

    def direction(logits):
        log_p = jax.nn.log_softmax(logits, axis=1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1))

    return direction(logit_scale * sims) + direction(logit_scale * sims.T)


def itc(image_feats: jax.Array, text_feats: jax.Array, logit_scale: float = 50.0) -> jax.Array:
    """CLIP's image-text contrastive loss (IRRA's optional 'itc' term): row i of each is a matched pair, every other
    row a negative; (CE(image->text) + CE(text->image)) / 2 over logits scale * cos. [B, D] each -> scalar."""
    img, txt = l2_normalize(image_feats.astype(jnp.float32)), l2_normalize(text_feats.astype(jnp.float32))
    logits = logit_scale * img @ txt.T
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (cross_entropy(logits, labels) + cross_entropy(logits.T, labels))


def patch_word_cosines(patches: jax.Array, words: jax.Array) -> jax.Array:
    """Cosine of every patch of every image with every word of every caption, in float32: patches [B_i, P, D],
    words [B_j, L, D] -> c [B_i, P, B_j, L]. One 2-D product of [B_i P, D] by [D, B_j L]: on CPU a batched einsum
    and a transposed result were each slower (the stage-A step spends most of its time here)."""
    v, t = l2_normalize(patches.astype(jnp.float32)), l2_normalize(words.astype(jnp.float32))
    (bi, p, d), (bj, l, _) = v.shape, t.shape
    return jnp.dot(v.reshape(bi * p, d), t.reshape(bj * l, d).T).reshape(bi, p, bj, l)


def filip(cosines: jax.Array, word_mask: jax.Array, logit_scale: float = 50.0) -> jax.Array:
    """FILIP's token-wise contrastive loss (Yao et al., 2021): CLIP's loss on a similarity that matches each token
    to its best counterpart instead of comparing two pooled features, so that single words learn to match image
    regions. cosines c [B, P, B, L] = patch_word_cosines(patches of image i, words of caption j; row i: a matched
    pair); word_mask bool [B, L] (the tokens that count; at least one per row).
        image i -> caption j:  mean over patches p of  max over words l of c
        caption j -> image i:  mean over words l of  max over patches p of c
    and (CE(image -> caption) + CE(caption -> image)) / 2 against the diagonal, at `logit_scale`. -> scalar."""
    c = cosines
    i2t = jnp.mean(jnp.max(jnp.where(word_mask[None, None], c, -2.0), axis=3), axis=1)  # a cosine >= -1: -2 never wins
    count = jnp.maximum(word_mask.sum(1), 1)[None, :]
    t2i = jnp.sum(jnp.where(word_mask[None], jnp.max(c, axis=1), 0.0), axis=2) / count  # [B_i, B_j]
    labels = jnp.arange(c.shape[0])
    return 0.5 * (cross_entropy(logit_scale * i2t, labels) + cross_entropy(logit_scale * t2i.T, labels))


def word_match(cosines: jax.Array, word_ids: jax.Array, word_mask: jax.Array, scale: float = 10.0,
               bias: float = -5.0, image_words: jax.Array | None = None) -> jax.Array:
    """A word-level sigmoid loss that teaches each caption word, on its own, whether an image shows it: word l of
    caption j against image i, with m[i, j, l] = max over patches p of cos(patch p of image i, word l of caption
    j), is a positive when image i is known to show the same token, else a negative; BCE(sigmoid(scale * m +
    bias), label) averaged over the real words of every caption and every image of the batch. Unlike a softmax, it
    fixes the similarity's level: a word every caption has ("a", "with") is pulled up against every image, a colour
    the image lacks down. cosines [B, P, B, L] = patch_word_cosines(patches, words), word_ids int [B, L] (row i:
    image i's caption), word_mask bool [B, L]; image_words int [B, K]: the tokens image i shows, 0-padded (e.g.
    those of all its captions; default: the real words of its caption in the batch). -> scalar."""
    m = jnp.max(cosines, axis=1)  # [B_i, B_j, L]
    if image_words is None:
        image_words = jnp.where(word_mask, word_ids, 0)
    labels = _shows(image_words[:, None], word_ids[None])  # [B_i, B_j, L]: image i shows word l of caption j
    return _mean_bce(scale * m + bias, labels, jnp.broadcast_to(word_mask[None], m.shape))


def own_word_match(patches: jax.Array, words: jax.Array, word_ids: jax.Array, word_mask: jax.Array,
                   image_words: jax.Array, scale: float = 10.0, bias: float = -5.0) -> jax.Array:
    """word_match on matched pairs only: word l of caption b against image b, with the labels of image b's
    words. With a caption whose colours were swapped (pipeline.swap_words), a swapped word is a negative in a
    context that otherwise describes the image: the model cannot score it by how well the caption's prefix fits
    the image, as it can for another image's caption. patches [B, P, D], words [B, L, D], word_ids int [B, L],
    word_mask bool [B, L] (the words that count), image_words int [B, K] (0-padded). -> scalar."""
    v, t = l2_normalize(patches.astype(jnp.float32)), l2_normalize(words.astype(jnp.float32))
    m = jnp.max(jnp.einsum("bld,bpd->blp", t, v), axis=-1)  # [B, L]
    return _mean_bce(scale * m + bias, _shows(image_words, word_ids), word_mask)


def _shows(image_words: jax.Array, word_ids: jax.Array) -> jax.Array:
    """[..., K] 0-padded words an image shows, [..., L] word ids (broadcast) -> [..., L] float: 1 where shown."""
    same = (image_words[..., :, None] == word_ids[..., None, :]) & (image_words > 0)[..., :, None]
    return jnp.any(same, axis=-2).astype(jnp.float32)


def _mean_bce(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(jnp.where(mask, bce, 0.0)) / jnp.maximum(mask.sum(), 1)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax CE over rows; logits [B, C], labels int [B]; smoothing spreads eps uniformly over C classes
    (CLIP-ReID's CrossEntropyLabelSmooth: (1 - eps) one-hot + eps / C)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def id_loss(image_logits: jax.Array, text_logits: jax.Array, labels: jax.Array,
            label_smoothing: float = 0.0) -> jax.Array:
    """IRRA's identity loss: one linear classifier over image and text features, the two CEs averaged."""
    return 0.5 * (cross_entropy(image_logits, labels, label_smoothing)
                  + cross_entropy(text_logits, labels, label_smoothing))


def mlm(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Masked-language-model CE: logits [B, L, V], labels int [B, L] with 0 where no token was masked
    (IRRA ignores index 0); the mean over masked tokens."""
    mask = labels > 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(mask.sum(), 1)


def euclidean_dist(x: jax.Array, y: jax.Array) -> jax.Array:
    """[M, D], [N, D] -> [M, N] Euclidean distances, sqrt(max(|x|^2 + |y|^2 - 2 x.y, 1e-12)) as CLIP-ReID's."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    d2 = jnp.sum(x * x, 1)[:, None] + jnp.sum(y * y, 1)[None] - 2.0 * x @ y.T
    return jnp.sqrt(jnp.maximum(d2, 1e-12))


def triplet_hard(feats: jax.Array, pids: jax.Array, margin: float = 0.3) -> jax.Array:
    """Batch-hard triplet loss (Hermans et al.; CLIP-ReID's TripletLoss with hard example mining): for each anchor
    the farthest positive and the nearest negative by Euclidean distance, mean of max(0, d_ap - d_an + margin).
    feats [B, D] (not normalised), pids [B]; every anchor needs a negative in the batch (PK sampling)."""
    dist = euclidean_dist(feats, feats)
    same = pids[:, None] == pids[None, :]
    d_ap = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
    d_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
    return jnp.mean(jnp.maximum(d_ap - d_an + margin, 0.0))


def prototype_contrast(feats: jax.Array, memory: jax.Array, labels: jax.Array, temperature: float = 0.01) -> jax.Array:
    """MUVA's prototype contrast: CE over cos(f, memory) / temperature. feats [B, D] (normalised here), memory
    [C, D] (unit rows), labels [B] -> scalar."""
    return cross_entropy(l2_normalize(feats.astype(jnp.float32)) @ memory.T / temperature, labels)


def mask_bce(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of mask logits [..., R, L] (e.g. every layer's, [layers, B, R, L]) against a
    {0, 1} target broadcastable to them ([B, R, L])."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.broadcast_to(target, logits.shape)))


def dice(probs: jax.Array, target: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Dice loss 1 - (2 |p t| + s) / (|p| + |t| + s) per mask over its last axis, averaged: [..., L] each."""
    inter = jnp.sum(probs * target, axis=-1)
    return jnp.mean(1.0 - (2.0 * inter + smooth) / (jnp.sum(probs, -1) + jnp.sum(target, -1) + smooth))
