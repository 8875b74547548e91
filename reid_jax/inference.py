"""One way to run any model reid-jax can load: `Encoder.load(path)`, then `image_features` / `text_features`.

    enc = Encoder.load(path)                            # image_size=, stride=, camera_coefficient= optional
    f = enc.image_features(images, camids=None)         # float32 [B, H, W, 3], normalised with enc.mean / enc.std
                                                        #   -> float32 [B, D]: the method's test feature, not
                                                        #   L2-normalised
    t = enc.text_features(ids)                          # int32 [B, 77] (OpenAI's layout) -> [B, E], text models

`path` is any of:
  * a reid-jax training run: its workdir, its checkpoints/ or best/<dataset>/ (the method and input size are read
    from WORKDIR/config.json, which training writes);
  * a `python -m reid_jax.convert` output, or any CLIP checkpoint `reid_jax.weights.load_clip` reads (kind 'clip');
  * an authors' released training checkpoint, recognised from its keys (`reid_jax.weights.released`): IRRA and
    MLLM4Text-ReID (kind 'tde_nam'), CLIP-ReID ('clip_reid'), MUVA ('muva').

The feature is what the method evaluates with (docs/evaluation.md): projected CLS (and EOT for text) for CLIP and
TDE+NAM; ln_post(CLS) ++ its projection for CLIP-ReID and CLIP-SCGI; MUVA's BNNeck output of its four tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from reid_jax.data import transforms
from reid_jax.models import clip as clip_lib
from reid_jax.errors import expand_path
from reid_jax.weights import converted, released, runs
from reid_jax.weights.load import load_clip
from reid_jax.weights.readers import CheckpointError
from reid_jax.weights.released import Loaded, common

KINDS = ("clip", "tde_nam", "clip_reid", "scgi", "muva")
RUN_CONFIG = "config.json"  # written into a training run's workdir by `reid_jax.train.loop.fit`


class Encoder:
    """A loaded model's test-time features. Build with `Encoder.load`."""

    def __init__(self, loaded: Loaded, source: Path, dtype: str = "float32"):
        self.kind, self.model, self.source = loaded.kind, loaded.model, source
        self.image_size, self.mean, self.std = tuple(loaded.image_size), loaded.mean, loaded.std
        self.info = loaded.info
        # The test resize: the run's config where it records one; bilinear in the three methods' test code,
        # bicubic in CLIP's own preprocessing.
        self.interpolation = loaded.info.get("interpolation", "bicubic" if loaded.kind == "clip" else "bilinear")
        self.dtype = _compute_dtype(loaded.model, dtype)
        # SIE: the image feature adds its camera's embedding, so it needs each image's camera id
        self.num_cameras = int(loaded.model.cam_embed.shape[0]) if getattr(loaded.model, "use_cameras", 0) else 0
        graphdef, self.state = nnx.split(loaded.model)
        # Pure functions of (state, inputs), for those who trace them themselves (export); jitted below.
        self.image_fn = lambda s, images, camids: loaded.image_fn(nnx.merge(graphdef, s), images, camids)
        self.text_fn = None if loaded.text_fn is None else lambda s, ids: loaded.text_fn(nnx.merge(graphdef, s), ids)
        self._image = jax.jit(self.image_fn)
        self._text = None if self.text_fn is None else jax.jit(self.text_fn)
        # Text models are CLIPs (plain or TDE+NAM): their ids are [B, context_length]
        self.context_length = loaded.model.config.text.context_length if self._text is not None else None

    def __repr__(self) -> str:
        return f"Encoder(kind={self.kind!r}, image_size={self.image_size}, source={str(self.source)!r})"

    @classmethod
    def load(cls, path, image_size=None, stride=None, camera_coefficient=None, dtype="float32") -> Encoder:
        """The model at `path` (see the module docstring). `image_size` (H, W) and `stride`: the input the model
        runs at (None = as trained; the position grid is resized otherwise); `camera_coefficient`: the weight of
        a camera embedding (SIE), where the model has one and the file does not record it; `dtype`: the compute
        dtype of its matrix products ('float32', 'bfloat16', or 'auto' = bfloat16 on GPU / TPU, float32 on CPU;
        parameters and normalisation layers stay float32)."""
        path = expand_path(path)
        if path is None or not path.exists():
            raise CheckpointError(f"{path}: no such file or folder; expected a reid-jax workdir, checkpoints/ or "
                                  f"best/<dataset>/, a `reid_jax.convert` output, a CLIP checkpoint or an authors' "
                                  f"released checkpoint (IRRA, MLLM4Text-ReID, CLIP-ReID, MUVA)")
        size = None if image_size is None else tuple(int(s) for s in image_size)
        if path.is_dir() and (run := runs.checkpoints_dir(path)) is not None:
            return cls(_from_run(path, run, size, stride, camera_coefficient), path, dtype)
        if path.is_file():
            module, state = released.read(path)
            if module is not None:
                return cls(module.encoder(path, state, size, stride, camera_coefficient), path, dtype)
        return cls(_from_clip(path, size, stride, camera_coefficient), path, dtype)

    def image_features(self, images, camids=None) -> np.ndarray:
        """float32 [B, H, W, 3] (normalised with `mean` / `std`), optional int camera ids [B] -> float32 [B, D]."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != (*self.image_size, 3):
            raise ValueError(f"images must be float32 [B, {self.image_size[0]}, {self.image_size[1]}, 3] (NHWC, "
                             f"normalised with enc.mean / enc.std), got {list(images.shape)}")
        cams = None if camids is None else jnp.asarray(np.asarray(camids, np.int32).reshape(len(images)))
        return np.asarray(self._image(self.state, jnp.asarray(images), cams), np.float32)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 [h, w, 3] RGB -> float32 [H, W, 3]: the model's test transform (resize, then normalise)."""
        image = transforms.resize(transforms.check_rgb(image), self.image_size, self.interpolation)
        return (image.astype(np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)

    def image_features_on_device(self, images: jax.Array, camids: jax.Array | None = None) -> jax.Array:
        """`image_features` without the host round trip: jax arrays in (sharded as the caller likes), jax out."""
        return self._image(self.state, images, camids)

    @property
    def has_text(self) -> bool:
        return self._text is not None

    def digest(self) -> str:
        """A hash of every parameter and buffer: two Encoders with equal digests compute the same features."""
        h = hashlib.blake2b(digest_size=16)
        for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(self.state), key=lambda kv: str(kv[0])):
            h.update(str(path).encode())
            h.update(np.ascontiguousarray(leaf).tobytes())
        return h.hexdigest()

    def text_features(self, ids) -> np.ndarray:
        """int32 [B, L] token ids (OpenAI's layout: SOT ... EOT, zero padded) -> float32 [B, E]."""
        if self._text is None:
            raise ValueError(f"this {self.kind} model ({self.source}) encodes images only: it has no text features")
        return np.asarray(self._text(self.state, jnp.asarray(np.asarray(ids, np.int32))), np.float32)


def _compute_dtype(model: nnx.Module, dtype: str) -> str:
    """Sets the compute dtype of `model` (see models.clip.set_compute_dtype). Returns the dtype chosen."""
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'auto', got {dtype!r}")
    clip_lib.set_compute_dtype(model, dtype)
    return dtype


# --------------------------------------------------------------------------------------------- CLIP weights
def _from_clip(path: Path, size, stride, camera_coefficient) -> Loaded:
    if camera_coefficient is not None:
        raise CheckpointError(f"{path}: a plain CLIP has no camera embedding; drop camera_coefficient")
    if size is None and converted.is_converted(path):  # a conversion records the input size it was made for
        stored = json.loads((path / "config.json").read_text())["model"]["vision"]
        size, stride = tuple(stored["image_size"]), stride or stored["stride"]
    clip = load_clip(path, image_size=size or (224, 224), stride=stride)
    mean, std = common.CLIP_MEAN_STD
    return Loaded("clip", clip, lambda m, images, camids=None: m.image_features(images),
                  lambda m, ids: m.text_features(ids), clip.config.vision.image_size, mean, std,
                  {"stride": clip.config.vision.stride})


# ------------------------------------------------------------------------------------------ reid-jax runs
def run_config(path: Path) -> ml_collections.ConfigDict | None:
    """The config a training run wrote into its workdir, found from the workdir, checkpoints/ or best/<dataset>/."""
    for folder in (path, path.parent, path.parent.parent):
        if (folder / RUN_CONFIG).is_file():
            return ml_collections.ConfigDict(json.loads((folder / RUN_CONFIG).read_text()))
    return None


def _from_run(path: Path, directory: Path, size, stride, camera_coefficient) -> Loaded:
    config = run_config(path)
    if config is None:
        raise CheckpointError(f"{path}: a reid-jax run without {RUN_CONFIG} in its workdir (trained before runs "
                              f"recorded their config); load its CLIP with reid_jax.weights.load_clip(path, "
                              f"image_size=..., stride=...) instead")
    model_cfg = config.model
    size = size or tuple(model_cfg.image_size)
    stride = stride or model_cfg.stride
    overrides = {**model_cfg.get("overrides", {}), "dtype": "float32"}
    mean, std = transforms.MEANS_STDS[config.data.aug.mean_std]
    info = {"stride": stride, "run": str(directory), "interpolation": config.data.aug.test_interpolation}
    if config.method == "tde_nam":
        if camera_coefficient is not None:
            raise CheckpointError(f"{path}: a TDE+NAM model has no camera embedding; drop camera_coefficient")
        clip = runs.load(directory, size, stride, overrides)
        return Loaded("tde_nam", clip, lambda m, images, camids=None: m.image_features(images),
                      lambda m, ids: m.text_features(ids), size, mean, std, info)
    method = _RUN_MODELS.get(config.method)
    if method is None:
        raise CheckpointError(f"{path}: {RUN_CONFIG} names method {config.method!r}; expected one of "
                              f"{', '.join(['tde_nam', *_RUN_MODELS])}")
    model, image_fn = method(directory, config, size, stride, overrides, camera_coefficient)
    return Loaded(config.method, model, image_fn, None, size, mean, std, info)


def _scgi_model(directory: Path, config, size, stride, overrides, camera_coefficient):
    from reid_jax.models.clip_reid import CLIPReID

    arrays = runs.clip_arrays(directory)  # read once: the CLIP, the camera count and the rest come from it
    clip = runs.load(directory, size, stride, overrides, arrays)
    num_cameras = 0
    if config.model.sie:  # the run's camera count is its embedding's row count
        num_cameras = next(v for k, v in arrays[2].items() if k.endswith("cam_embed")).shape[0]
    elif camera_coefficient is not None:
        raise CheckpointError(f"{directory}: this run has no camera embedding (config.model.sie=False); drop "
                              f"camera_coefficient")
    coefficient = config.model.sie_coe if camera_coefficient is None else camera_coefficient
    model = CLIPReID(clip, num_cameras, coefficient, rngs=nnx.Rngs(0))
    runs.load_module(model, directory, arrays)
    return model, lambda m, images, camids: m.image_features(images, camids)


def _muva_model(directory: Path, config, size, stride, overrides, camera_coefficient):
    from reid_jax.models import muva as muva_lib
    from reid_jax.train.muva import rmp_config

    if camera_coefficient is not None:
        raise CheckpointError(f"{directory}: a MUVA model has no camera embedding; drop camera_coefficient")
    m = config.muva
    arrays = runs.clip_arrays(directory)
    model = muva_lib.MUVAModel(runs.load(directory, size, stride, overrides, arrays), rmp_config(m),
                               rngs=nnx.Rngs(0))
    runs.load_module(model, directory, arrays)
    fixed = None  # the 'fixed bands' ablation runs with given masks instead of the RMP's
    if m.mask_mode == "fixed" and m.num_parts:
        fixed = jnp.asarray(muva_lib.band_masks(m.fixed_bands[: m.num_parts], model.clip.config.vision.grid))

    def image_fn(model, images, camids=None):
        masks = None if fixed is None else jnp.broadcast_to(fixed, (images.shape[0], *fixed.shape))
        return model.image_features(images, masks, after_bn=m.test_after_bn)

    return model, image_fn


_RUN_MODELS = {"scgi": _scgi_model, "muva": _muva_model}
