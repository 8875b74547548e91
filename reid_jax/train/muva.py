"""MUVA (Li, Gong, Zhang): domain-generalised image ReID with multi-grained prompts and AM-MSA (docs/muva.md).

Before training (stage 1: `Task.prepare`, which the loop runs once before the first step of a fresh run and
checkpoints as step 0):
  1. every training image through the initial image encoder with the pseudo masks of its part boxes -> per-
     identity centroids of the normalised features [C, G E] (G = 1 + R granularities: person, head, upper body,
     legs);
  2. learnable prompts "A photo of a X X X X {person | head of a person | upper body of a person | legs of a
     person}." (4 context vectors per identity and granularity) trained alone, the text tower frozen: CE between
     normalised text features and the centroids (temperature `stage1.temperature`);
  3. the text prototypes [C, G E] (the four EOT features concatenated) are frozen for stage 2; the centroids
     start the prototype memory.
Stage 2 (the training loop), on P x K batches with flipped / cropped images and part boxes together:
  ID CE (smoothing) on the BNNeck of the image feature + prototype contrast CE(norm(BN f) . memory / 0.01) +
  image-to-text CE against the text prototypes + mask loss (BCE of every block's accumulated RMP logits + Dice
  of the last) against the pseudo masks of the augmented boxes; the memory takes each identity's hardest
  instance after every step. Evaluation: `evaluate.image_reid` on the unseen domain(s).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from reid_jax import errors, losses, weights
from reid_jax.data import pipeline, simulated_grounding, sources, specs
from reid_jax.data.index import relabel
from reid_jax.models import muva as muva_lib
from reid_jax.models import prompts
from reid_jax.models.heads import BNNeck
from reid_jax.models.memory import update_hard
from reid_jax.eval import image_reid
from reid_jax.eval.encode import encode_stream, jitted
from reid_jax.train import common, loop

GRANULARITIES = ("person", "head of a person", "upper body of a person", "legs of a person")


class MUVAHeads(nnx.Module):
    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.neck = BNNeck(dim, num_classes, rngs=rngs)


class Task:
    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config, self.workdir = config, Path(workdir)
        m = config.muva
        if m.mask_mode not in ("rmp", "fixed"):
            raise errors.ConfigError(f"config.muva.mask_mode must be 'rmp' or 'fixed', got {m.mask_mode!r}")
        if not 0 <= m.num_parts <= 3:
            raise errors.ConfigError(f"config.muva.num_parts must be 0 (CLS only) .. 3 (head, upper body, legs), "
                             f"got {m.num_parts}")
        self.data_dir = specs.data_dir(config, self.workdir)
        self.source, self.index = specs.training_set(config.data.train, self.data_dir, config.data.auto_build)
        if m.simulate_grounding:
            meta, _ = specs.training_set(config.data.train, self.data_dir, False, decode_image=False)
            boxes = np.stack([np.asarray(meta[i]["part_boxes"], np.float32) for i in range(len(meta))])
            noise = simulated_grounding.GroundingNoise(**m.grounding_noise.to_dict())
            table, fallbacks = simulated_grounding.simulate_table(boxes, config.seed, noise)
            logging.warning("simulated grounding: %s of %d images fell back to fixed bands (head, upper, legs)",
                            fallbacks.tolist(), len(boxes))
            self.source = sources.PartBoxesSource(self.source, table)
        self.num_classes = len(np.unique(self.index.pids))
        common.check_pk_batch(config)
        self.steps_per_epoch, self.total_steps, self.tx, self.learning_rate = common.schedule(config, len(self.index))
        self.clip_config = None  # the built model's (patch grid, context length): set by `_model`

    # ------------------------------------------------------------------------------------------------ model
    def _model(self) -> muva_lib.MUVAModel:
        cfg = self.config
        vision = {**cfg.model.overrides.get("vision", {}), "num_extra_tokens": cfg.muva.num_parts}
        clip = weights.model_for(cfg.model, cfg.init_checkpoint, cfg.seed, vision=vision)
        self.clip_config = clip.config  # the grid and context length come from the model, not the config
        return muva_lib.MUVAModel(clip, cfg.muva.rmp_heads, rngs=nnx.Rngs(cfg.seed + 1))

    def _pseudo_masks(self, boxes: jax.Array) -> jax.Array:
        """Part boxes [B, 3, 4] -> the masks the model is trained towards, bool [B, R, L]."""
        m, v = self.config.muva, self.clip_config.vision
        if m.mask_mode == "fixed":
            fixed = jnp.asarray(muva_lib.band_masks(m.fixed_bands[: m.num_parts], v.grid))
            return jnp.broadcast_to(fixed, (boxes.shape[0], *fixed.shape))
        return muva_lib.boxes_to_masks(boxes[:, : m.num_parts], tuple(v.image_size), v.patch_size, v.stride)

    def _given_masks(self, boxes: jax.Array) -> jax.Array | None:
        """Masks fed to the model instead of the RMP's: fixed bands in the 'fixed' ablation, else none."""
        if self.config.muva.mask_mode == "fixed" and self.config.muva.num_parts:
            return self._pseudo_masks(boxes)
        return None

    def init_state(self) -> loop.TrainState:
        cfg = self.config
        model = self._model()
        dim = (1 + cfg.muva.num_parts) * model.clip.config.embed_dim
        heads = MUVAHeads(dim, self.num_classes, rngs=nnx.Rngs(cfg.seed + 2))
        zeros = jnp.zeros((self.num_classes, dim), jnp.float32)  # filled by `prepare` (stage 1)
        return loop.TrainState(model, self.tx, {"text_protos": zeros, "memory": zeros}, heads, frozen=cfg.optim.frozen)

    # ---------------------------------------------------------------------------------------------- stage 1
    def prepare(self, ts: loop.TrainState, mesh) -> None:
        """Stage 1, before the first step: the identity centroids start the memory, the prompts learned against
        them give the frozen text prototypes."""
        centroids = self._centroids(ts.model, mesh)
        ts.memory[...] = jnp.asarray(centroids)
        ts.text_protos[...] = jnp.asarray(self._learn_prompts(ts.model.clip, centroids))

    def _centroids(self, model: muva_lib.MUVAModel, mesh) -> np.ndarray:
        """[C, G E]: per training identity, the normalised mean of its images' normalised features, each image
        encoded with the pseudo masks of its (stored) part boxes."""
        cfg = self.config
        r = cfg.muva.num_parts

        def encode(m, b):
            masks = self._pseudo_masks(b["part_boxes"]) if r else None
            return losses.l2_normalize(m.image_features(b["image"], masks))

        shard = pipeline.Shard.from_jax()
        stream = pipeline.eval_images(self.source, cfg.data, batch_size=cfg.eval.batch_size // shard.count,
                                      shard=shard)
        out = encode_stream(stream, "image", jitted(model, encode), mesh, desc="identity centroids")
        means = common.class_means(out["feats"], relabel(self.index.pids)[0], self.num_classes)
        return np.asarray(losses.l2_normalize(jnp.asarray(means)))

    def _prompt_specs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        s1 = self.config.stage1
        length = self.clip_config.text.context_length
        return [prompts.prompt_ids(s1.template.format(g), s1.num_context, length)
                for g in GRANULARITIES[: 1 + self.config.muva.num_parts]]

    def _text_features(self, clip, ctx: jax.Array, prompt_specs) -> jax.Array:
        """Context vectors [b, G, n, Dt] -> the G prompts' EOT features concatenated, [b, G E]."""
        return jnp.concatenate([prompts.prompt_features(clip, ctx[:, g], ids, slots)
                                for g, (ids, slots) in enumerate(prompt_specs)], axis=-1)

    def _learn_prompts(self, clip, centroids: np.ndarray) -> np.ndarray:
        """Stage 1: the per-identity context vectors alone (text tower frozen) -> text prototypes [C, G E]."""
        s1, n = self.config.stage1, self.num_classes
        prompt_specs = self._prompt_specs()
        width = clip.config.text.width
        ctx = s1.init_std * jax.random.normal(jax.random.key(self.config.seed + 3),
                                              (n, len(prompt_specs), s1.num_context, width))
        graphdef, state = nnx.split(clip)
        centres = jnp.asarray(centroids)
        steps_per_epoch = -(-n // s1.batch_size)
        tx = optax.adam(optax.cosine_decay_schedule(s1.lr, max(1, s1.epochs * steps_per_epoch)))
        opt_state = tx.init(ctx)

        @jax.jit
        def step(ctx, opt_state, ids):
            def loss_fn(ctx):
                text = self._text_features(nnx.merge(graphdef, state), ctx[ids], prompt_specs)
                return losses.cross_entropy(losses.l2_normalize(text) @ centres.T / s1.temperature, ids)

            loss, grads = jax.value_and_grad(loss_fn)(ctx)
            updates, opt_state = tx.update(grads, opt_state)
            return optax.apply_updates(ctx, updates), opt_state, loss

        rng = np.random.default_rng(self.config.seed)
        for epoch in range(s1.epochs):
            order = rng.permutation(n)
            order = np.concatenate([order, order[: -n % s1.batch_size or 0]])  # whole batches: one shape
            for b in range(steps_per_epoch):
                ctx, opt_state, loss = step(ctx, opt_state, jnp.asarray(order[b * s1.batch_size:
                                                                              (b + 1) * s1.batch_size]))
            logging.warning("MUVA stage 1 (prompts): epoch %d/%d, loss %.4f", epoch + 1, s1.epochs, float(loss))
        encode = jax.jit(lambda ctx: self._text_features(nnx.merge(graphdef, state), ctx, prompt_specs))
        return np.concatenate([np.asarray(encode(ctx[i: i + s1.batch_size])) for i in range(0, n, s1.batch_size)])

    # ---------------------------------------------------------------------------------------------- stage 2
    def train_stream(self, shard):
        return pipeline.pk_train(self.source, self.index, self.config.data, seed=self.config.seed, shard=shard)

    def train_step(self, ts: loop.TrainState, batch: dict, rng: jax.Array) -> dict:
        del rng
        cfg, lw, pid = self.config, self.config.loss, batch["pid"]
        target = self._pseudo_masks(batch["part_boxes"]).astype(jnp.float32)
        given = self._given_masks(batch["part_boxes"])

        def loss_fn(params: loop.Trainable):
            feats, logits = params.model.encode(batch["image"], given)
            bn, cls_logits = params.heads.neck(feats)
            parts = {"id": lw.id_weight * losses.cross_entropy(cls_logits, pid, lw.id_label_smoothing),
                     "proto": lw.proto_weight * losses.prototype_contrast(bn, ts.memory[...], pid,
                                                                          lw.proto_temperature),
                     "i2t": lw.i2t_weight * losses.cross_entropy(feats @ ts.text_protos[...].T, pid,
                                                                 lw.i2t_label_smoothing)}
            if logits is not None:
                parts["mask"] = lw.mask_weight * (losses.mask_bce(logits, target)
                                                  + losses.dice(jax.nn.sigmoid(logits[-1]), target))
            return sum(parts.values()), (parts, bn)

        loss, (parts, bn) = ts.minimize(loss_fn)
        ts.memory[...] = update_hard(ts.memory[...], jax.lax.stop_gradient(bn), pid, cfg.muva.memory_momentum)
        return {"loss": loss} | {f"loss_{k}": v for k, v in parts.items()}

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: muva_lib.MUVAModel, step: int, workdir: Path, mesh) -> dict:
        encode = jitted(model, lambda m, b: m.image_features(b["image"], self._given_masks(b["part_boxes"])))
        return image_reid.evaluate(self.config, self.data_dir, encode, step, workdir, mesh)
