"""CLIP-SCGI (Han et al.): image ReID on the CLIP-ReID baseline, guided by synthesized captions.

One training step on a P x K batch of images with one caption each (docs/scgi.md, sections 2-4: baseline, CGI, CFF):
  baseline  ID (BNNeck classifiers on ln_post(CLS) and its projection, label smoothing) + batch-hard triplet (on the
            second-to-last block's CLS, ln_post(CLS) and the projection) + image-to-text CE of the projection
            against per-identity text prototypes (the mean text feature of the identity's captions, computed once
            with the frozen text tower; CLIP-ReID's second stage with captions in place of learned prompts);
  + CGI     the image (guided by its caption) -> pseudo-words -> "A photo of a * person." through the frozen text
            tower; its feature is aligned with the caption's and the image's (`models/cgi.py`);
  + CFF     CLS attends to [pseudo-words; patches]; the fused feature gets its own BNNeck ID and triplet losses
            (`models/cff.py`).
Inference: the image encoder alone (CLS ++ projection, before the BNNecks); `evaluate.image_reid`, optionally
k-reciprocal re-ranked.

`config.init_checkpoint` may be a CLIP-ReID release file: training then starts from its image tower, text tower,
camera embedding, BNNecks and (same identity count) classifiers; its missing token table comes from
`config.init_text_checkpoint` (docs/scgi.md, section 9).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from reid_jax import data, errors, losses, weights
from reid_jax.data import pipeline, specs
from reid_jax.models import cgi as cgi_lib
from reid_jax.models import prompts
from reid_jax.models.cff import CFF
from reid_jax.models.clip_reid import CLIPReID
from reid_jax.models.heads import BNNeck
from reid_jax.eval import image_reid
from reid_jax.eval.encode import encode_stream, jitted
from reid_jax.train import common, loop
from reid_jax.weights import released
from reid_jax.weights.released import clip_reid


class SCGIHeads(nnx.Module):
    """Training-only modules: the BNNecks of the baseline, CGI, and CFF with its own BNNeck."""

    def __init__(self, model: CLIPReID, num_classes: int, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        cfg = model.clip.config
        self.neck = BNNeck(cfg.vision.width, num_classes, rngs=rngs)
        self.neck_proj = BNNeck(cfg.embed_dim, num_classes, rngs=rngs)
        self.cgi = (cgi_lib.CGI(cfg, config.cgi.num_queries, config.cgi.depth, config.cgi.guidance, rngs=rngs)
                    if config.cgi.enabled else None)
        self.cff = CFF(cfg, config.cff.depth, rngs=rngs) if config.cff.enabled else None
        self.neck_fuse = BNNeck(cfg.vision.width, num_classes, rngs=rngs) if config.cff.enabled else None


def clip_reid_file(init_checkpoint: str) -> tuple[Path, dict[str, np.ndarray]] | None:
    """(path, state) when `init_checkpoint` is a CLIP-ReID release file, else None."""
    path = errors.expand_path(init_checkpoint)
    if path is None or not path.is_file():
        return None
    module, state = released.read(path)
    return (path, state) if module is clip_reid else None


def warn_if_resized(path: Path, state: dict[str, np.ndarray], model_cfg: ml_collections.ConfigDict) -> None:
    """A warning when config.model runs the file at another input size or stride than it was trained at."""
    want = (tuple(model_cfg.image_size), model_cfg.stride)
    size, stride = clip_reid.trained_input(path, state, *want)
    if (tuple(size), stride) != want:
        logging.warning("config.init_checkpoint=%s was trained at %dx%d stride %d; config.model runs it at %dx%d "
                        "stride %d, its position grid resized (an SIE-OLP file wants the <set>_sie_olp variant)",
                        path, *size, stride, *want[0], want[1])


def load_camera_embedding(model: CLIPReID, state: dict[str, np.ndarray]) -> list[tuple[bool, str]]:
    """cv_embed [N, Dv] -> model.cam_embed when the model has one of that shape; [(loaded?, what)]."""
    table = state.get("cv_embed")
    if table is None:  # the plain model; SIE here keeps its fresh rows
        return [(False, "camera embedding (the file has none)")] if model.use_cameras else []
    if not model.use_cameras:
        return [(False, f"camera embedding ({len(table)} cameras; config.model.sie=False)")]
    if table.shape != model.cam_embed.shape:
        return [(False, f"camera embedding ({len(table)} cameras in the file, {model.cam_embed.shape[0]} here)")]
    model.cam_embed[...] = jnp.asarray(table, jnp.float32)
    return [(True, f"camera embedding ({len(table)} cameras)")]


def load_bnneck(neck: BNNeck, state: dict[str, np.ndarray], bn: str, classifier: str) -> list[tuple[bool, str]]:
    """Their BatchNorm1d `bn` (scale, running mean / variance) and bias-free Linear `classifier` [C, D] into
    `neck`; the classifier only when the identity count matches. [(loaded?, what), ...]"""
    out = []
    norm = neck.bn
    norm.scale[...] = jnp.asarray(state[f"{bn}.weight"])
    norm.mean[...] = jnp.asarray(state[f"{bn}.running_mean"])
    norm.var[...] = jnp.asarray(state[f"{bn}.running_var"])
    out.append((True, bn))
    shift = state.get(f"{bn}.bias")
    if getattr(norm, "bias", None) is not None and shift is not None:
        norm.bias[...] = jnp.asarray(shift)
    elif shift is not None and np.any(shift):  # frozen at 0 in their training: non-zero only in edited files
        out.append((False, f"{bn}.bias (non-zero; this BNNeck keeps its shift at 0)"))
    weight, kernel = state[f"{classifier}.weight"], neck.classifier.kernel
    if weight.T.shape == kernel.shape:
        kernel[...] = jnp.asarray(weight.T)
        out.append((True, classifier))
    else:
        out.append((False, f"{classifier} ({weight.shape[0]} identities in the file, {kernel.shape[1]} here)"))
    return out


class Task:
    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config = config
        if config.cff.enabled and not config.cgi.enabled:
            raise errors.ConfigError("config.cff.enabled needs config.cgi.enabled: CFF fuses CGI's pseudo-words")
        if config.loss.i2t_mode not in ("prototypes", "batch"):
            raise errors.ConfigError(f"config.loss.i2t_mode must be 'prototypes' or 'batch', got "
                                     f"{config.loss.i2t_mode!r}")
        self.data_dir = specs.data_dir(config, workdir)
        self.source, self.index = specs.training_set(config.data.train, self.data_dir, config.data.auto_build,
                                                      decode_image=False)  # encoded: the pipeline decodes
        self.num_classes = len(np.unique(self.index.pids))
        self.num_cameras = int(self.index.camids.max()) + 1 if config.model.sie else 0
        common.check_pk_batch(config)
        self.steps_per_epoch, self.total_steps, self.tx, self.learning_rate = common.schedule(config, len(self.index))
        self.uses_captions = config.cgi.enabled or bool(config.loss.i2t_weight)
        self.missing_token_table = None  # a CLIP-ReID init_checkpoint read without config.init_text_checkpoint
        self.prompt_ids, self.prompt_slots = prompts.prompt_ids(
            config.cgi.prompt, config.cgi.num_queries, config.data.context_length)

    # ------------------------------------------------------------------------------------------- training
    def init_state(self) -> loop.TrainState:
        cfg = self.config
        clip = weights.model_for(cfg.model, cfg.init_checkpoint, cfg.seed)
        model = CLIPReID(clip, self.num_cameras, cfg.model.sie_coe, rngs=nnx.Rngs(cfg.seed + 1))
        heads = SCGIHeads(model, self.num_classes, cfg, rngs=nnx.Rngs(cfg.seed + 2))
        if (release := clip_reid_file(cfg.init_checkpoint)) is not None:
            self._start_from_clip_reid(model, heads, *release)
        buffers = {}
        if self._uses_prototypes():  # filled by `prepare`
            buffers["text_protos"] = jnp.zeros((self.num_classes, clip.config.embed_dim), jnp.float32)
        return loop.TrainState(model, self.tx, buffers, heads, frozen=cfg.optim.frozen)

    def _start_from_clip_reid(self, model: CLIPReID, heads: SCGIHeads, path: Path, state: dict) -> None:
        """The file's camera embedding and BNNecks over the fresh ones where shapes fit, and the token table it
        lacks from config.init_text_checkpoint; one log line says what was loaded and what was skipped."""
        loaded, skipped = ["image and text towers"], []
        for outcome, what in (*load_camera_embedding(model, state),
                              *load_bnneck(heads.neck, state, "bottleneck", "classifier"),
                              *load_bnneck(heads.neck_proj, state, "bottleneck_proj", "classifier_proj")):
            (loaded if outcome else skipped).append(what)
        if self.config.init_text_checkpoint:
            loaded.append(self._fill_token_table(model.clip))
        else:  # enough to evaluate (--mode=eval); training with captions stops in `prepare`
            self.missing_token_table = path
            skipped.append("token table (config.init_text_checkpoint is empty)")
        logging.info("config.init_checkpoint=%s (CLIP-ReID): loaded %s; skipped %s", path, ", ".join(loaded),
                     ", ".join(skipped) or "nothing")
        warn_if_resized(path, state, self.config.model)

    def _fill_token_table(self, clip) -> str:
        """CLIP-ReID keeps no token table (nor logit scale): both come from the CLIP it was trained from."""
        source = self.config.init_text_checkpoint
        donor = weights.load_clip(errors.expand_path(source))
        table, want = donor.text.token_embedding.embedding, clip.text.token_embedding.embedding
        if table.shape != want.shape:
            raise errors.ConfigError(
                f"config.init_text_checkpoint={source}: its token table is {list(table.shape)}, the CLIP-ReID "
                f"file's text tower needs {list(want.shape)}; pass the CLIP the file was trained from")
        want[...] = table[...]
        clip.logit_scale[...] = donor.logit_scale[...]
        return f"token table and logit scale from {source}"

    def _uses_prototypes(self) -> bool:
        return bool(self.config.loss.i2t_weight) and self.config.loss.i2t_mode == "prototypes"

    def prepare(self, ts: loop.TrainState, mesh) -> None:
        """Before the first step: the per-identity caption prototypes of the frozen text tower."""
        if self.uses_captions and self.missing_token_table:
            raise errors.ConfigError(
                f"config.init_checkpoint={self.missing_token_table} is a CLIP-ReID file, which stores no token table, "
                f"and SCGI trains on captions: set config.init_text_checkpoint to the CLIP it was trained from "
                f"(OpenAI's ViT-B-16.pt)")
        if self._uses_prototypes():
            ts.text_protos[...] = self._text_prototypes(ts.model.clip, mesh)

    def _text_prototypes(self, clip, mesh) -> jax.Array:
        """[C, E]: per training identity, the mean text feature of its images' captions (frozen text tower)."""
        cfg = self.config
        captions = data.load_source(cfg.data.train.name, cfg.data.train.split, self.data_dir,
                                    cfg.data.train.get("config") or None, decode_image=False)
        shard = pipeline.Shard.from_jax()
        stream = pipeline.eval_captions(captions, self.index, cfg.data, batch_size=cfg.eval.batch_size // shard.count,
                                        shard=shard)
        out = encode_stream(stream, "text", jitted(clip, lambda m, b: m.text_features(b["text"])), mesh,
                            desc="caption prototypes")
        labels = np.searchsorted(np.unique(self.index.pids), out["pid"])
        return jnp.asarray(common.class_means(out["feats"], labels, self.num_classes))

    def train_stream(self, shard):
        return pipeline.pk_train(self.source, self.index, self.config.data, seed=self.config.seed, shard=shard,
                                 captions=self.uses_captions)

    def train_step(self, ts: loop.TrainState, batch: dict, rng: jax.Array) -> dict:
        del rng  # deterministic step: all randomness is in the data stream and the device-side erasing
        cfg = self.config
        lw, pid = cfg.loss, batch["pid"]

        def id_and_triplet(neck, feats):
            _, logits = neck(feats)
            return losses.cross_entropy(logits, pid, lw.id_label_smoothing), losses.triplet_hard(feats, pid, lw.margin)

        def loss_fn(params: loop.Trainable):
            model, heads = params.model, params.heads
            f = model.encode(batch["image"], batch["camid"] if self.num_cameras else None)
            id_cls, tri_cls = id_and_triplet(heads.neck, f["cls"])
            id_proj, tri_proj = id_and_triplet(heads.neck_proj, f["proj"])
            parts = {"id": lw.id_weight * (id_cls + id_proj),
                     "triplet": lw.triplet_weight * (losses.triplet_hard(f["last"], pid, lw.margin) + tri_cls
                                                     + tri_proj)}
            if self.uses_captions:
                clip = model.clip
                cap_tokens, _ = clip.text(batch["text"])
                cap_tokens = clip.text.project(cap_tokens)  # [B, L, E]
                eot = clip.text.eot_index(batch["text"])
                cap_feat = jnp.take_along_axis(cap_tokens, eot[:, None, None], axis=1)[:, 0].astype(jnp.float32)
            if lw.i2t_weight:
                if cfg.loss.i2t_mode == "prototypes":
                    i2t = losses.cross_entropy(f["proj"] @ ts.text_protos[...].T, pid, lw.i2t_label_smoothing)
                else:  # a text tower trained along (from scratch): match the batch's captions, identity-aware
                    i2t = losses.sdm(f["proj"], cap_feat, pid, lw.i2t_logit_scale)
                parts["i2t"] = lw.i2t_weight * i2t
            if cfg.cgi.enabled:
                img_tokens = clip.visual.project(f["tokens"])
                if cfg.cgi.detach_image:
                    img_tokens = jax.lax.stop_gradient(img_tokens)
                words = heads.cgi(img_tokens, cap_tokens, cgi_lib.caption_mask(batch["text"]))
                prompt = prompts.prompt_features(clip, words, self.prompt_ids, self.prompt_slots)
                parts["cgi"] = (lw.cgi_text_weight * losses.sdm(prompt, cap_feat, pid, lw.cgi_logit_scale)
                                + lw.cgi_image_weight * losses.sdm(f["proj"], prompt, pid, lw.cgi_logit_scale))
            if cfg.cff.enabled:
                if cfg.cff.detach_words:
                    words = jax.lax.stop_gradient(words)
                fused = heads.cff(f["tokens"][:, 0], f["tokens"][:, 1:], words)
                id_fuse, tri_fuse = id_and_triplet(heads.neck_fuse, fused)
                parts["cff"] = lw.cff_weight * (lw.id_weight * id_fuse + lw.triplet_weight * tri_fuse)
            return sum(parts.values()), parts

        loss, parts = ts.minimize(loss_fn)
        return {"loss": loss} | {f"loss_{k}": v for k, v in parts.items()}

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: CLIPReID, step: int, workdir: Path, mesh) -> dict:
        cams = bool(self.num_cameras)
        encode = jitted(model, lambda m, b: m.image_features(b["image"], b["camid"] if cams else None))
        return image_reid.evaluate(self.config, self.data_dir, encode, step, workdir, mesh, check=self._check_cameras)

    def _check_cameras(self, spec, split: str, index) -> None:
        if self.num_cameras and index.camids.max() >= self.num_cameras:
            raise errors.ConfigError(f"{spec.name}/{split} has camera ids up to {int(index.camids.max())} but the "
                                     f"model's camera embedding has {self.num_cameras} (the training set's); set "
                                     f"config.model.sie=False for sets with other cameras")
