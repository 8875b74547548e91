"""TDE + NAM (Tan et al., CVPR 2024): CLIP trained with SDM on MLLM-captioned pedestrians, noise-aware masking.

One training step (docs/tde_nam.md, 'Noise-aware masking (NAM)'; evaluation: docs/evaluation.md):
  1. read last epoch's token-image similarities of these examples from the per-example table (nam.UNSEEN = not
     seen yet);
  2. mask the captions with NAM's probabilities (or uniformly, or not at all: `config.nam.mode`);
  3. encode images and masked captions; SDM between image CLS and masked-caption EOT features;
  4. without gradient, the unmasked captions' token similarities to the image patches at layer
     `config.nam.layer` are written to the table for the next epoch.
Evaluation: text-to-image retrieval on every `config.eval.datasets` test set (R@1/5/10, mAP, mINP).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from reid_jax import errors, losses, weights
from reid_jax.weights import released
from reid_jax.weights.released import irra as irra_release
from reid_jax.data import pipeline, specs
from reid_jax.eval import text_reid
from reid_jax.models import clip as clip_lib
from reid_jax.models import irra, nam
from reid_jax.train import common, loop, nam_oracle


class Task:
    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config = config
        self.data_dir = specs.data_dir(config, workdir)
        if config.nam.mode == "nam" and config.data.caption_mode != "all":
            raise errors.ConfigError("config.nam.mode='nam' keeps one similarity row per (image, caption) example: set "
                             "config.data.caption_mode='all'")
        if config.nam.get("oracle") and config.nam.mode != "nam":
            raise errors.ConfigError(f"config.nam.oracle = {config.nam.oracle!r} is NAM's table from the truth; it "
                                     f"needs config.nam.mode = 'nam', got {config.nam.mode!r}")
        if config.nam.get("oracle_auc") and not config.nam.get("oracle"):
            raise errors.ConfigError(f"config.nam.oracle_auc = {config.nam.oracle_auc} degrades NAM's table from the "
                                     f"truth: set config.nam.oracle to 'exact' or 'word' too, or oracle_auc = 0")
        if config.nam.get("oracle") and config.nam.oracle_timing not in ("start", "as_nam"):
            raise errors.ConfigError(f"config.nam.oracle_timing must be 'start' (the table from the first step) or "
                                     f"'as_nam' (written as NAM writes the model's), got {config.nam.oracle_timing!r}")
        self.source, self.index = specs.training_set(config.data.train, self.data_dir, config.data.auto_build,
                                                      decode_image=False)  # encoded: the pipeline decodes
        self.num_examples = len(pipeline.caption_examples(self.index.num_captions, np.arange(len(self.index)),
                                                          config.data.caption_mode)[0])
        self.steps_per_epoch, self.total_steps, self.tx, self.learning_rate = common.schedule(config,
                                                                                             self.num_examples)

    # ------------------------------------------------------------------------------------------- training
    def init_state(self) -> loop.TrainState:
        model = weights.model_for(self.config.model, self.config.init_checkpoint, self.config.seed)
        buffers = {}
        if self.config.nam.mode == "nam":  # rows padded so the table shards evenly over every device
            rows = -(-self.num_examples // jax.device_count()) * jax.device_count()
            buffers["nam_sims"] = jnp.full((rows, self.config.data.context_length), nam.UNSEEN, jnp.float16)
            if self.config.nam.get("oracle"):  # the ablation's ceiling: the table from the truth, never the model
                oracle = nam_oracle.table(self.config.data.train, self.config.nam, self.data_dir,
                                          self.config.data.context_length, self.config.seed)
                if len(oracle) != self.num_examples:
                    raise errors.ConfigError(f"config.nam.oracle: {len(oracle)} examples in the clean captions' "
                                             f"table, {self.num_examples} in training; keep config.data.train whole")
                table = buffers["nam_sims"].at[:len(oracle)].set(oracle.astype(np.float16))
                # 'start': NAM's table holds it from the first step; 'as_nam': each step writes the rows of its
                # examples into NAM's table as NAM writes the model's, so the first epoch masks uniformly
                buffers["nam_oracle" if self.config.nam.oracle_timing == "as_nam" else "nam_sims"] = table
        heads = None
        if self.config.loss.id_weight or self.config.loss.mlm_weight:
            heads = irra.IRRAHeads(model.config, len(np.unique(self.index.pids)), self.config.loss.mlm_depth,
                                   rngs=nnx.Rngs(self.config.seed + 1))
            self._heads_from_release(heads)
        return loop.TrainState(model, self.tx, buffers, heads, frozen=self.config.optim.frozen)

    def _heads_from_release(self, heads: irra.IRRAHeads) -> None:
        """An IRRA / MLLM4Text-ReID checkpoint as init_checkpoint starts the heads too (those it has that fit)."""
        path = errors.expand_path(self.config.init_checkpoint)
        if path is not None and path.is_file():
            module, state = released.read(path)
            if module is irra_release:
                irra_release.load_heads(path, state, heads)

    def train_stream(self, shard):
        return pipeline.pairs_train(self.source, self.index, self.config.data, seed=self.config.seed, shard=shard)

    def train_step(self, ts: loop.TrainState, batch: dict, rng: jax.Array) -> dict:
        cfg = self.config
        ids, index = batch["text"], batch["index"]
        k_nam, k_mlm = jax.random.split(rng)
        prev = ts.nam_sims[...][index] if cfg.nam.mode == "nam" else jnp.zeros(ids.shape)
        probs = nam.masking_probs(ids, prev, cfg.nam.p, cfg.nam.mode)
        masked, labels = nam.mask_tokens(ids, probs, k_nam, mask_prob=cfg.nam.mask_prob,
                                         random_prob=cfg.nam.random_prob, ensure_one=cfg.nam.mode != "none")
        want_sims = cfg.nam.mode == "nam" and not cfg.nam.get("oracle")
        oracle_as_nam = bool(cfg.nam.get("oracle")) and cfg.nam.oracle_timing == "as_nam"
        token_losses = bool(cfg.loss.filip_weight or cfg.loss.word_weight)  # stage A's word-region terms
        filip_layer = cfg.loss.filip_layer if token_losses else 0
        use_mlm = bool(cfg.loss.mlm_weight)
        if use_mlm:  # IRRA: an independent uniform 15% BERT masking of the caption for the MLM head (at least one)
            mlm_ids, mlm_labels = nam.mask_tokens(ids, nam.masking_probs(ids, prev, cfg.loss.mlm_p, "uniform"),
                                                  k_mlm)
            if cfg.loss.sdm_sees_mlm_mask:  # the public IRRA code's aliasing: SDM and ID see the MLM-masked ids
                masked = mlm_ids
        prefix = 1 + ts.model.config.vision.num_extra_tokens
        swapped = batch.get("swapped_text")  # stage A's in-context negatives (config.data.swap_prob)
        if swapped is not None:
            swappable = jnp.isin(ids, jnp.asarray(pipeline.swap_token_ids(cfg.data.swap_words)))

        def loss_fn(params: loop.Trainable):
            model, heads = params.model, params.heads
            img_tokens, img_layers = model.visual(batch["image"], return_layers=want_sims or filip_layer > 0)
            img_feat = model.visual.project(img_tokens[:, 0]).astype(jnp.float32)
            txt_tokens, txt_layers = model.text(masked, return_layers=filip_layer > 0)
            txt_feat = model.text_features_of(txt_tokens, masked)
            parts = {}
            if cfg.loss.sdm_weight:
                parts["sdm"] = cfg.loss.sdm_weight * losses.sdm(img_feat, txt_feat, batch["pid"], cfg.loss.logit_scale)
            if cfg.loss.itc_weight:
                parts["itc"] = cfg.loss.itc_weight * losses.itc(img_feat, txt_feat, cfg.loss.logit_scale)
            if token_losses:  # each caption word against the image's patch tokens, after the last block or
                # (filip_layer = l) after block l of each tower, where NAM compares them
                patches = model.visual.project((img_layers[filip_layer - 1] if filip_layer else img_tokens)[:, prefix:])
                words = model.text.project(txt_layers[filip_layer - 1] if filip_layer else txt_tokens)
                real = nam.real_tokens(masked)
                cosines = losses.patch_word_cosines(patches, words)  # once for both terms: most of the step's time
                if cfg.loss.filip_weight:
                    parts["filip"] = cfg.loss.filip_weight * losses.filip(cosines, real, cfg.loss.logit_scale)
                if cfg.loss.word_weight:
                    parts["word"] = cfg.loss.word_weight * losses.word_match(  # labels: the batch's captions,
                        # or every caption of the image with config.data.image_words
                        cosines, masked, real, cfg.loss.word_scale, cfg.loss.word_bias, batch.get("image_words"))
                if cfg.loss.word_weight and swapped is not None:  # each swappable word in its own caption's
                    # context, against its own image: swapped -> a negative unless the image shows it elsewhere
                    sw_tokens, sw_layers = model.text(swapped, return_layers=filip_layer > 0)
                    sw_words = model.text.project(sw_layers[filip_layer - 1] if filip_layer else sw_tokens)
                    shown = batch.get("image_words", jnp.where(nam.real_tokens(ids), ids, 0))
                    parts["word_swap"] = cfg.loss.word_weight * losses.own_word_match(
                        patches, sw_words, swapped, swappable, shown, cfg.loss.word_scale, cfg.loss.word_bias)
            if cfg.loss.id_weight:
                parts["id"] = cfg.loss.id_weight * losses.id_loss(heads.id_logits(img_feat), heads.id_logits(txt_feat),
                                                                  batch["pid"], cfg.loss.id_label_smoothing)
            if use_mlm:
                mlm_tokens, _ = model.text(mlm_ids)
                logits = heads.mlm_logits(model.text.project(mlm_tokens), model.visual.project(img_tokens))
                parts["mlm"] = cfg.loss.mlm_weight * losses.mlm(logits, mlm_labels)
            sims = None
            if want_sims:
                _, txt_layers = model.text(ids, return_layers=True)
                sims = nam.token_similarity(img_layers, txt_layers, model, cfg.nam.layer, prefix)
            return sum(parts.values()), (parts, sims)

        loss, (parts, sims) = ts.minimize(loss_fn)
        if want_sims:
            ts.nam_sims[...] = ts.nam_sims[...].at[index].set(sims.astype(jnp.float16))
        elif oracle_as_nam:  # the truth's rows instead of the model's, at the same moment
            ts.nam_sims[...] = ts.nam_sims[...].at[index].set(ts.nam_oracle[...][index])
        real = nam.real_tokens(ids)
        metrics = {"loss": loss, "mask_rate": jnp.sum(labels > 0) / jnp.maximum(real.sum(), 1)}
        return metrics | ({f"loss_{k}": v for k, v in parts.items()} if len(parts) > 1 else {})

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: clip_lib.CLIP, step: int, workdir: Path, mesh) -> dict:
        return text_reid.evaluate(self.config, self.data_dir, model, step, workdir, mesh)
