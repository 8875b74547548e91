"""CLIP-ReID's image model (Li et al., AAAI 2023), the base of CLIP-SCGI: CLIP's image tower with a learnable
camera embedding (SIE) added to CLS. At inference only this runs; the text tower inside `clip` is left untouched.

Features (docs/scgi.md, 'The CLIP-ReID baseline'), for images [B, H, W, 3] and zero-based camera ids [B]:
  last  [B, Dv]  CLS after the second-to-last block (CLIP-ReID's `img_feature_last`, a triplet-loss input)
  cls   [B, Dv]  CLS after the last block and ln_post (`img_feature`)
  proj  [B, E]   cls @ proj (`img_feature_proj`)
  test feature   cls ++ proj [B, Dv + E] (BNNeck's "before" features; `image_features`)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.models import clip as clip_lib

Array = jax.Array


class CLIPReID(nnx.Module):
    def __init__(self, clip: clip_lib.CLIP, num_cameras: int, sie_coe: float = 1.0, *, rngs: nnx.Rngs):
        self.clip = clip
        self.sie_coe = sie_coe
        width = clip.config.vision.width
        # CLIP-ReID: zeros then trunc_normal_(std=0.02); one row per camera (views unused for people)
        self.cam_embed = nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                                                      (max(num_cameras, 1), width)))
        self.use_cameras = num_cameras > 0

    def encode(self, images: Array, camids: Array | None = None) -> dict[str, Array]:
        """-> {'tokens' [B, T, Dv] (last block, before ln_post), 'last', 'cls' [B, Dv], 'proj' [B, E]}."""
        visual = self.clip.visual
        offset = None
        if self.use_cameras:
            if camids is None:
                raise ValueError(f"this model has a camera embedding (SIE, {self.cam_embed.shape[0]} cameras): pass "
                                 f"the images' zero-based camera ids (camids int [B])")
            offset = self.sie_coe * self.cam_embed[...][camids]
        tokens, layers = visual(images, return_layers=True, cls_offset=offset)
        cls = visual.ln_post(tokens[:, 0])
        return {"tokens": tokens, "last": layers[-2][:, 0].astype(jnp.float32), "cls": cls.astype(jnp.float32),
                "proj": (cls @ visual.proj[...].astype(cls.dtype)).astype(jnp.float32)}

    def image_features(self, images: Array, camids: Array | None = None) -> Array:
        """The test feature [B, Dv + E]: ln_post(CLS) ++ its projection, before the BNNecks."""
        f = self.encode(images, camids)
        return jnp.concatenate([f["cls"], f["proj"]], axis=-1)
