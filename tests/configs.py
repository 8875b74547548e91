"""The project's configs as the tests run them: loaded by path (configs/ is not a package), shrunk to the tiny
model on the `small` synthetic set."""

import importlib.util
from pathlib import Path

from tests.params import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """configs/<name>.py as a module (its get_config and dataset-spec helpers)."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_image_reid(config, data_dir):
    """An image-ReID variant (SCGI, MUVA) shrunk in place: tiny model at 64x32, 4 x 4 PK batches, one epoch, an
    evaluation per epoch; returns it."""
    c = config
    c.data.data_dir = str(data_dir)
    c.model.update({"preset": "tiny", "image_size": (64, 32), "stride": 16, "dtype": "float32"})
    c.model.overrides = TINY_MODEL
    c.data.update({"batch_size": 16, "context_length": 48, "num_workers": 0})
    c.data.pk.update({"identities": 4, "instances": 4})
    c.data.aug.update({"pad": 2})
    c.train.update({"epochs": 1, "log_every": 1, "checkpoint_every_steps": 100})
    c.eval.update({"every_epochs": 1, "batch_size": 32, "png_queries": 2})
    c.mesh.fsdp_min_size = 256
    return c
