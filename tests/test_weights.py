"""`weights.load_clip` on a reid-jax training run: the CLIP read from its checkpoint as the run saved it."""

import jax
import numpy as np
import pytest
from flax import nnx

from reid_jax import weights
from reid_jax.models import clip as clip_lib
from reid_jax.train.checkpoint import Checkpointer

HEADS = {"vision": {"heads": 2}, "text": {"heads": 2}}  # the tiny model's: width 32 is below OpenAI's width / 64


class _Run(nnx.Module):
    """What a method's training state holds: its CLIP one level down, as SCGI's and MUVA's 'model.clip.'."""

    def __init__(self, clip):
        self.clip = clip


def _run(folder, cfg, seed=1):
    """A workdir whose checkpoints/ holds one step of a model around a CLIP of `cfg`; returns that CLIP."""
    clip = clip_lib.CLIP(cfg, rngs=nnx.Rngs(seed))
    ckpt = Checkpointer(folder / "checkpoints", async_save=False)
    ckpt.save(7, nnx.State({"model": nnx.state(_Run(clip))}), None, {})
    ckpt.close()
    return clip


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("extra_tokens", [0, 3])
def test_a_run_loads_as_it_was_saved(tmp_path, extra_tokens):
    cfg = clip_lib.CLIPConfig.tiny(image_size=(32, 16), stride=4).replace(vision={"num_extra_tokens": extra_tokens})
    saved = _run(tmp_path, cfg)
    for source in (tmp_path, tmp_path / "checkpoints"):
        loaded = weights.load_clip(source, image_size=(32, 16), stride=4, **HEADS)
        assert loaded.config == cfg  # part tokens counted from the arrays
        for a, b in zip(_params(saved), _params(loaded), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_run_says_what_its_arrays_cannot(tmp_path):
    _run(tmp_path, clip_lib.CLIPConfig.tiny(image_size=(32, 16), stride=4))
    with pytest.raises(weights.CheckpointError, match=r"does not record its attention heads.*vision=\{'heads': N\}"):
        weights.load_clip(tmp_path, image_size=(32, 16), stride=4)
    with pytest.raises(ValueError, match=r"does not fit this model: .*visual\.positional_embedding: saved \[33, 32\], "
                                         r"model \[65, 32\].*image size and stride it was trained with"):
        weights.load_clip(tmp_path, image_size=(32, 32), stride=4, **HEADS)
