"""MUVA (Li, Gong, Zhang): domain-generalised image ReID with multi-grained prompts and AM-MSA (docs/muva.md).

Defaults follow the authors' public code; where the paper says otherwise the paper's way is a config switch.

Before training (stage 1: `Task.prepare`, which the loop runs once before the first step of a fresh run and
checkpoints as step 0):
  1. every training image (test transform) through the initial image encoder with its pseudo masks -> the
     per-identity centroids of the features before the BNNeck, [C, G E] (G = 1 + R granularities: person, head,
     upper body, legs);
  2. learnable prompts "A photo of a X X X X {person | head of a person | upper body of a person | legs of a
     person}" (4 context vectors per identity and granularity) trained alone, the text tower frozen, on P x K
     batches of image indices (every image once per epoch): CE between normalised text features and the
     centroids; Adam with L2 decay, linear warmup, cosine to an lr floor, per epoch;
  3. the text prototypes [C, G E] (the G EOT features concatenated) are frozen for stage 2.
Stage 2 (the training loop), on P x K batches, image and pseudo masks flipped together:
  ID CE (smoothing) on the classifier of BN(f) + prototype contrast CE(norm(BN f) . memory / 0.01) +
  image-to-text CE against the text prototypes + mask loss (BCE of every block's accumulated RMP logits + Dice
  of every block's mask probabilities) against the pseudo masks. The memory is rebuilt at the start of every
  epoch from all training images (`start_epoch`: test transform, eval mode, pseudo masks, normalised BN features,
  normalised identity means) and takes each identity's hardest instance after every step. Evaluation:
  `evaluate.image_reid` on the unseen domain(s) with BN(f), running statistics.

Pseudo masks (`config.muva.pseudo_masks`): 'stored' = the authors' released masks stored with the dataset
(`python -m reid_jax.data.build NAME ... --part_masks=FILE.pkl`), 'boxes' = the masks of the stored (or
simulated) part boxes.
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
from reid_jax.data import part_masks, pipeline, simulated_grounding, sources, specs
from reid_jax.data.index import relabel
from reid_jax.errors import expand_path
from reid_jax.models import muva as muva_lib
from reid_jax.models import prompts
from reid_jax.models.memory import update_hard
from reid_jax.eval import image_reid
from reid_jax.eval.encode import encode_stream, jitted
from reid_jax.train import common, loop
from reid_jax.weights import released
from reid_jax.weights.released import muva as released_muva

GRANULARITIES = ("person", "head of a person", "upper body of a person", "legs of a person")
PSEUDO_MASKS = ("stored", "boxes")
# In 'stored' mode every record carries this box as its first part box: the pipeline flips boxes with the image,
# so its centre tells the step whether to mirror the stored mask (left of the middle = not flipped).
FLIP_MARKER = np.array([[0.0, 0.0, 0.25, 1.0], [-1.0] * 4, [-1.0] * 4], np.float32)


class MUVAHeads(nnx.Module):
    """Training-only: the bias-free ID classifier on BN(f), N(0, 0.001) as the authors' (the BNNeck is in the
    model: the test feature is its output)."""

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.classifier = nnx.Linear(dim, num_classes, use_bias=False,
                                     kernel_init=jax.nn.initializers.normal(0.001), rngs=rngs)


def rmp_config(m: ml_collections.ConfigDict) -> muva_lib.RMPConfig:
    return muva_lib.RMPConfig(**m.rmp.to_dict())


def _check(config: ml_collections.ConfigDict) -> None:
    m = config.muva
    if m.mask_mode not in ("rmp", "fixed"):
        raise errors.ConfigError(f"config.muva.mask_mode must be 'rmp' or 'fixed', got {m.mask_mode!r}")
    if not 0 <= m.num_parts <= 3:
        raise errors.ConfigError(f"config.muva.num_parts must be 0 (CLS only) .. 3 (head, upper body, legs), "
                                 f"got {m.num_parts}")
    if m.pseudo_masks not in PSEUDO_MASKS:
        raise errors.ConfigError(f"config.muva.pseudo_masks must be one of {PSEUDO_MASKS}, got {m.pseudo_masks!r}")
    if m.pseudo_masks == "stored" and m.simulate_grounding:
        raise errors.ConfigError("config.muva.simulate_grounding makes part boxes: set config.muva.pseudo_masks="
                                 "'boxes' with it")
    if m.memory_rebuild not in ("epoch", "none"):
        raise errors.ConfigError(f"config.muva.memory_rebuild must be 'epoch' or 'none', got {m.memory_rebuild!r}")


class Task:
    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config, self.workdir = config, Path(workdir)
        _check(config)
        m = config.muva
        self.data_dir = specs.data_dir(config, self.workdir)
        self.source, self.index = specs.training_set(config.data.train, self.data_dir, config.data.auto_build,
                                                      decode_image=False)  # encoded: the pipeline decodes
        self._stored = m.pseudo_masks == "stored" and m.num_parts and m.mask_mode == "rmp" and \
            not m.simulate_grounding
        self._mask_table = None  # read on first use: evaluating a checkpoint does not need the masks
        if m.simulate_grounding:
            boxes = np.stack([np.asarray(r["part_boxes"], np.float32) for r in self._meta()])
            noise = simulated_grounding.GroundingNoise(**m.grounding_noise.to_dict())
            table, fallbacks = simulated_grounding.simulate_table(boxes, config.seed, noise)
            logging.warning("simulated grounding: %s of %d images fell back to fixed bands (head, upper, legs)",
                            fallbacks.tolist(), len(boxes))
            self.source = sources.PartBoxesSource(self.source, table)
        elif self._stored:
            self.source = sources.PartBoxesSource(self.source, np.broadcast_to(FLIP_MARKER,
                                                                               (len(self.index), 3, 4)))
        self.num_classes = len(np.unique(self.index.pids))
        common.check_pk_batch(config)
        self.steps_per_epoch, self.total_steps, self.tx, self.learning_rate = common.schedule(config, len(self.index))
        self.clip_config = None  # the built model's (patch grid, context length): set by `_model`
        self._release = None  # (path, state) of an authors' MUVA file given as init_checkpoint
        self._encoders = {}  # after_bn -> the jitted encoder of `_identity_means` (state as an argument)

    @property
    def mask_table(self) -> np.ndarray | None:
        """bool [N, 3, L] in 'stored' mode: the stored masks of every training record (None otherwise)."""
        if self._stored and self._mask_table is None:
            self._mask_table = part_masks.training_table(self.config.data.train, self.data_dir,
                                                         [r["file_name"] for r in self._meta()])
        return self._mask_table

    def _meta(self):
        """Every training record in turn (cheap: the source leaves images encoded, and only metadata is read)."""
        return (self.source[i] for i in range(len(self.source)))

    # ------------------------------------------------------------------------------------------------ model
    def _released_file(self):
        """(path, state) when config.init_checkpoint is an authors' MUVA checkpoint, else None."""
        path = expand_path(self.config.init_checkpoint) if self.config.init_checkpoint else None
        if path is None or not path.is_file():
            return None
        module, state = released.read(path)
        return (path, state) if module is released_muva else None

    def _model(self) -> muva_lib.MUVAModel:
        cfg, m = self.config, self.config.muva
        vision = {**cfg.model.overrides.get("vision", {}), "num_extra_tokens": m.num_parts}
        self._release = self._released_file()
        if self._release is not None:  # their CLIP with their part tokens folded in
            overrides = {"dtype": cfg.model.dtype, "remat": cfg.model.remat,
                         **cfg.model.get("overrides", {}).to_dict(), "vision": vision}
            clip = released_muva.clip(*self._release, tuple(cfg.model.image_size), cfg.model.stride, overrides)
        else:
            clip = weights.model_for(cfg.model, cfg.init_checkpoint, cfg.seed, vision=vision)
            if m.num_parts and not self._has_run_part_tokens():  # the authors' init: N(0, 0.02) + CLS's position
                key = jax.random.key(cfg.seed + 4)
                clip.visual.extra_tokens[...] = m.part_token_init_std * jax.random.normal(
                    key, clip.visual.extra_tokens.shape)
        self.clip_config = clip.config  # the grid and context length come from the model, not the config
        model = muva_lib.MUVAModel(clip, rmp_config(m), rngs=nnx.Rngs(cfg.seed + 1))
        if self._release is not None:
            path, state = self._release
            skipped = released_muva.set_arrays(
                path, model, released_muva.rmp_params(state, clip.config.vision.layers)
                | released_muva.bnneck_arrays(state), strict=False)
            if skipped:
                logging.warning("%s: kept the initial values of what does not fit this model: %s", path,
                                "; ".join(skipped))
        return model

    def _has_run_part_tokens(self) -> bool:
        """Whether config.init_checkpoint is a reid-jax run whose part tokens `model_for` loaded."""
        path = expand_path(self.config.init_checkpoint) if self.config.init_checkpoint else None
        if path is None or not path.exists() or weights.runs.checkpoints_dir(path) is None:
            return False
        _, saved = weights.runs.latest_arrays(weights.runs.checkpoints_dir(path))
        return any(k.endswith("visual.extra_tokens") for k in saved)

    def init_state(self) -> loop.TrainState:
        cfg = self.config
        model = self._model()
        dim = (1 + cfg.muva.num_parts) * model.clip.config.embed_dim
        heads = MUVAHeads(dim, self.num_classes, rngs=nnx.Rngs(cfg.seed + 2))
        if self._release is not None and "fc.weight" in self._release[1]:
            path, state = self._release
            released_muva.set_arrays(path, heads, {("classifier", "kernel"): state["fc.weight"].T}, strict=False)
        zeros = jnp.zeros((self.num_classes, dim), jnp.float32)  # filled by `prepare` (stage 1)
        return loop.TrainState(model, self.tx, {"text_protos": zeros, "memory": zeros}, heads, frozen=cfg.optim.frozen)

    # ------------------------------------------------------------------------------------------ pseudo masks
    def _pseudo_masks(self, batch: dict, train: bool) -> jax.Array:
        """The masks the model is trained towards and given in stage 1, bool [B, R, L]: stored (mirrored when the
        pipeline flipped the image), from the part boxes, or the fixed bands."""
        m, v = self.config.muva, self.clip_config.vision
        boxes = batch["part_boxes"]
        if m.mask_mode == "fixed":
            fixed = jnp.asarray(muva_lib.band_masks(m.fixed_bands[: m.num_parts], v.grid))
            return jnp.broadcast_to(fixed, (boxes.shape[0], *fixed.shape))
        if self.mask_table is None:
            return muva_lib.boxes_to_masks(boxes[:, : m.num_parts], tuple(v.image_size), v.patch_size, v.stride)
        masks = jnp.asarray(self.mask_table)[batch["index" if train else "image_index"], : m.num_parts]
        if not train:
            return masks
        flipped = boxes[:, 0, 0] + boxes[:, 0, 2] > 1.0  # the marker's centre went right
        grid = masks.reshape(*masks.shape[:2], *v.grid)
        return jnp.where(flipped[:, None, None, None], grid[..., ::-1], grid).reshape(masks.shape)

    def _given_masks(self, batch: dict) -> jax.Array | None:
        """Masks fed to the model instead of the RMP's: fixed bands in the 'fixed' ablation, else none."""
        if self.config.muva.mask_mode == "fixed" and self.config.muva.num_parts:
            return self._pseudo_masks(batch, train=False)
        return None

    def _check_mask_grid(self) -> None:
        if self.mask_table is not None and self.mask_table.shape[-1] != np.prod(self.clip_config.vision.grid):
            v = self.clip_config.vision
            raise errors.ConfigError(
                f"the stored part masks have {self.mask_table.shape[-1]} patches, the model's grid is "
                f"{v.grid[0]}x{v.grid[1]} = {np.prod(v.grid)} ({v.image_size[0]}x{v.image_size[1]} stride "
                f"{v.stride}); train at the size the masks were made for (the authors': 256x128 stride 16)")

    # ------------------------------------------------------------------------------------ per-identity means
    def _identity_means(self, model: muva_lib.MUVAModel, mesh, after_bn: bool, desc: str) -> np.ndarray:
        """[C, G E]: every training image (test transform, its pseudo masks as given masks) through the model in
        eval mode; after the BNNeck each feature is normalised before the identity means (the memory), before
        it the raw features are averaged (stage 1's centroids); the means normalised, as the authors'."""
        cfg = self.config
        self._check_mask_grid()
        graphdef, state = nnx.split(model)
        if after_bn not in self._encoders:  # compiled once: the memory is rebuilt every epoch

            def encode(s, b):
                masks = self._pseudo_masks(b, train=False) if cfg.muva.num_parts else None
                f = nnx.merge(graphdef, s).image_features(b["image"], masks, after_bn=after_bn)
                return losses.l2_normalize(f) if after_bn else f

            self._encoders[after_bn] = jax.jit(encode)
        run = self._encoders[after_bn]
        shard = pipeline.Shard.from_jax()
        stream = pipeline.eval_images(self.source, cfg.data, batch_size=cfg.eval.batch_size // shard.count,
                                      shard=shard)
        out = encode_stream(stream, "image", lambda batch: run(state, batch), mesh, desc=desc)
        means = common.class_means(out["feats"], relabel(self.index.pids)[0], self.num_classes)
        return np.asarray(losses.l2_normalize(jnp.asarray(means)))

    # ---------------------------------------------------------------------------------------------- stage 1
    def prepare(self, ts: loop.TrainState, mesh) -> None:
        """Stage 1, before the first step: the prompts learned against the identity centroids give the frozen
        text prototypes; the memory starts from the centroids, or is rebuilt as every epoch will rebuild it."""
        centroids = self._identity_means(ts.model, mesh, after_bn=False, desc="identity centroids")
        ts.text_protos[...] = jnp.asarray(self._learn_prompts(ts.model.clip, centroids))
        ts.memory[...] = jnp.asarray(centroids)
        self.start_epoch(ts, mesh)

    def start_epoch(self, ts: loop.TrainState, mesh) -> None:
        """At the start of a stage-2 epoch: the memory rebuilt from every training image (`memory_rebuild`)."""
        if self.config.muva.memory_rebuild == "epoch":
            ts.memory[...] = jnp.asarray(self._identity_means(ts.model, mesh, after_bn=True, desc="memory"))

    def _prompt_specs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        s1 = self.config.stage1
        length = self.clip_config.text.context_length
        return [prompts.prompt_ids(s1.template.format(g), s1.num_context, length)
                for g in GRANULARITIES[: 1 + self.config.muva.num_parts]]

    def _text_features(self, clip, ctx: jax.Array, prompt_specs) -> jax.Array:
        """Context vectors [b, G, n, Dt] -> the G prompts' EOT features concatenated, [b, G E]."""
        return jnp.concatenate([prompts.prompt_features(clip, ctx[:, g], ids, slots)
                                for g, (ids, slots) in enumerate(prompt_specs)], axis=-1)

    def stage1_lr(self, epoch: int) -> float:
        """The authors' per-epoch stage-1 lr (epoch 1-based): linear warmup from `warmup_lr` over `warmup_epochs`,
        then cosine from `lr` to `lr_min` over `epochs` (timm's CosineLRScheduler, stepped once an epoch)."""
        s1 = self.config.stage1
        if epoch < s1.warmup_epochs:
            return s1.warmup_lr + epoch * (s1.lr - s1.warmup_lr) / s1.warmup_epochs
        if epoch >= s1.epochs:
            return s1.lr_min
        return s1.lr_min + 0.5 * (s1.lr - s1.lr_min) * (1 + np.cos(np.pi * epoch / s1.epochs))

    def _stage1_batches(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch of P x K batches over the training images' labels, as the identity sampler walks them:
        [num_batches, P] identities (each batch holds K images of each, so its loss is their mean)."""
        p, k = self.config.stage1.batch_size // self.config.data.pk.instances, self.config.data.pk.instances
        labels = relabel(self.index.pids)[0]
        order = np.argsort(labels, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
        walk = pipeline.identity_walk(groups, p, k, rng)
        return labels[walk.reshape(len(walk), p, k)[:, :, 0]]

    def _learn_prompts(self, clip, centroids: np.ndarray) -> np.ndarray:
        """Stage 1: the per-identity context vectors alone (text tower frozen) -> text prototypes [C, G E]."""
        s1, n = self.config.stage1, self.num_classes
        prompt_specs = self._prompt_specs()
        width = clip.config.text.width
        ctx = s1.init_std * jax.random.normal(jax.random.key(self.config.seed + 3),
                                              (n, len(prompt_specs), s1.num_context, width))
        graphdef, state = nnx.split(clip)
        centres = jnp.asarray(centroids)
        tx = optax.chain(optax.add_decayed_weights(s1.weight_decay), optax.scale_by_adam())  # torch Adam, L2
        opt_state = tx.init(ctx)

        @jax.jit
        def step(ctx, opt_state, ids, lr):
            def loss_fn(ctx):
                text = self._text_features(nnx.merge(graphdef, state), ctx[ids], prompt_specs)
                return losses.cross_entropy(losses.l2_normalize(text) @ centres.T / s1.temperature, ids)

            loss, grads = jax.value_and_grad(loss_fn)(ctx)
            updates, opt_state = tx.update(grads, opt_state, ctx)
            return optax.apply_updates(ctx, jax.tree.map(lambda u: -lr * u, updates)), opt_state, loss

        rng = np.random.default_rng(self.config.seed)
        for epoch in range(1, s1.epochs + 1):
            lr = self.stage1_lr(epoch)
            for ids in self._stage1_batches(rng):
                ctx, opt_state, loss = step(ctx, opt_state, jnp.asarray(ids), lr)
            logging.warning("MUVA stage 1 (prompts): epoch %d/%d, lr %.2e, loss %.4f", epoch, s1.epochs, lr,
                            float(loss))
        encode = jax.jit(lambda ctx: self._text_features(nnx.merge(graphdef, state), ctx, prompt_specs))
        chunk = s1.batch_size
        return np.concatenate([np.asarray(encode(ctx[i: i + chunk])) for i in range(0, n, chunk)])

    # ---------------------------------------------------------------------------------------------- stage 2
    def train_stream(self, shard):
        if self.clip_config is not None:
            self._check_mask_grid()
        return pipeline.pk_train(self.source, self.index, self.config.data, seed=self.config.seed, shard=shard)

    def train_step(self, ts: loop.TrainState, batch: dict, rng: jax.Array) -> dict:
        del rng
        cfg, lw, pid = self.config, self.config.loss, batch["pid"]
        target = self._pseudo_masks(batch, train=True).astype(jnp.float32)
        given = self._given_masks(batch)

        def loss_fn(params: loop.Trainable):
            model = params.model
            feats, logits = model.encode(batch["image"], given)
            # their step runs the BNNeck twice (classifier, then memory loss): the same output, two running-stat
            # updates, which the test feature sees
            bn = [model.bnneck(feats) for _ in range(cfg.muva.bn_updates_per_step)][-1]
            parts = {"id": lw.id_weight * losses.cross_entropy(params.heads.classifier(bn), pid,
                                                               lw.id_label_smoothing),
                     "proto": lw.proto_weight * losses.prototype_contrast(bn, ts.memory[...], pid,
                                                                          lw.proto_temperature),
                     "i2t": lw.i2t_weight * losses.cross_entropy(feats @ ts.text_protos[...].T, pid,
                                                                 lw.i2t_label_smoothing)}
            if logits is not None:
                parts["mask"] = lw.mask_weight * losses.mask_bce(logits, target)
                parts["dice"] = lw.mask_weight * losses.dice(model.mask_probs(logits), target, lw.dice_smooth)
            return sum(parts.values()), (parts, bn)

        loss, (parts, bn) = ts.minimize(loss_fn)
        ts.memory[...] = update_hard(ts.memory[...], jax.lax.stop_gradient(bn), pid, cfg.muva.memory_momentum)
        return {"loss": loss} | {f"loss_{k}": v for k, v in parts.items()}

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: muva_lib.MUVAModel, step: int, workdir: Path, mesh) -> dict:
        after_bn = self.config.muva.test_after_bn
        encode = jitted(model, lambda m, b: m.image_features(b["image"], self._given_masks(b), after_bn=after_bn))
        return image_reid.evaluate(self.config, self.data_dir, encode, step, workdir, mesh)
