"""MUVA's released pseudo masks: the authors' pkl format ({image basename: [R, L] additive mask, 0 = in the part})
stored by `python -m reid_jax.data.build ... --part_masks=FILE.pkl`, bad files as one-line errors, rebuilds when
the file changes, and MUVA training reading them (mirrored with a flipped image) instead of part boxes."""

import pickle
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from reid_jax import data as data_lib
from reid_jax.data import build as build_lib
from reid_jax.data import load_source, part_masks, pipeline, transforms
from reid_jax.data.records import as_str
from tests import configs, fixtures
from tests.test_build_cli import _cli, _error_line

L = 128  # 16 x 8 patches: the authors' 256 x 128 at stride 16


def _authors_pkl(path: Path, names, seed=0, drop=()) -> dict[str, np.ndarray]:
    """A pkl as the authors ship it: float32 [3, L], 0 where the patch is in the part, -inf elsewhere; returns
    the boolean masks (True = in the part) it encodes, by basename."""
    rng = np.random.default_rng(seed)
    masks = {Path(n).name: rng.random((3, L)) < 0.4 for n in names if Path(n).name not in drop}
    with open(path, "wb") as f:
        pickle.dump({k: np.where(v, 0.0, -np.inf).astype(np.float32) for k, v in masks.items()}, f)
    return masks


def _train_names(data_dir, name="market1501", config=None) -> list[str]:
    source = load_source(name, "train", data_dir, config, decode_image=False)
    return [as_str(source[i]["file_name"]) for i in range(len(source))]


def test_build_stores_the_authors_masks_of_the_training_images(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    fixtures.market1501(manual)
    build_lib.build("market1501", data, manual)
    names = _train_names(data)
    pkl = tmp_path / "market1501_patch_grounding_mask_calibrated.pkl"
    want = _authors_pkl(pkl, names + ["9999_c1s1_000000_00.jpg"])  # masks of other images are ignored
    b, outcome, why = build_lib.prepare("market1501", data, manual, part_masks=pkl)
    assert (outcome, why) == ("rebuilt", "--part_masks was not given, now given")
    stored = part_masks.load(b.data_dir)
    assert sorted(stored) == sorted(names)
    for n in names:
        np.testing.assert_array_equal(stored[n], want[Path(n).name])
    assert build_lib.prepare("market1501", data, manual, part_masks=pkl)[1] == "reused"
    _authors_pkl(pkl, names, seed=1)
    assert build_lib.prepare("market1501", data, manual, part_masks=pkl)[1:] == (
        "rebuilt", "the --part_masks file changed")
    b, outcome, _ = build_lib.prepare("market1501", data, manual)
    assert outcome == "rebuilt" and part_masks.load(b.data_dir) is None


@pytest.mark.parametrize("content,message", [
    ("missing", "has no mask for 1 of the"),
    ("list", "holds list; expected a dict"),
    ("shape", "has shape [3, 128], others [3, 64]"),
    ("text", "could not be read as a pickle"),
])
def test_bad_part_masks_are_one_line_errors_naming_the_file(tmp_path, content, message):
    manual = tmp_path / "manual"
    fixtures.market1501(manual)
    names = [p.name for p in (manual / "bounding_box_train").glob("*.jpg")]
    pkl = tmp_path / "masks.pkl"
    if content == "missing":
        _authors_pkl(pkl, names, drop=names[:1])
    elif content == "text":
        pkl.write_text("not a pickle")
    else:
        value = [] if content == "list" else {n: np.zeros((3, L if i else 64), np.float32)
                                                for i, n in enumerate(sorted(names))}
        with open(pkl, "wb") as f:
            pickle.dump(value, f)
    out = _cli("market1501", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'data'}", f"--part_masks={pkl}")
    assert out.returncode == 1
    line = _error_line(out)
    assert str(pkl) in line and message in line, line


def test_muva_trains_towards_the_stored_masks_flipped_with_the_image(data_dir, tmp_path):
    """The synthetic set rebuilt with a pkl for its training images: the task's table is the pkl's masks in record
    order, a batch's targets are the record's mask, mirrored (columns of the 16 x 8 grid) when the pipeline flipped
    the image, and stage 1's given masks are the stored ones unflipped."""
    from reid_jax.train import muva

    names = _train_names(data_dir, "synthetic_pedestrians", "small")
    pkl = tmp_path / "synthetic.pkl"
    _authors_pkl(pkl, names)
    data = tmp_path / "tfds"
    build_lib.build("synthetic_pedestrians", data, config="small", part_masks=pkl)
    c = configs.load("muva").get_config("demo")
    c = configs.tiny_image_reid(c, data)
    module = configs.load("muva")
    c.data.train = [module._dataset("synthetic_pedestrians", "train", "small", "synthetic", ("daylight", "night"))]
    c.eval.datasets = [module._test_set("synthetic_pedestrians", "small", "overcast", ("overcast",))]
    c.model.image_size = (256, 128)  # the masks' 16 x 8 grid
    c.muva.update({"simulate_grounding": False, "pseudo_masks": "stored"})
    task = muva.Task(c, tmp_path / "run")
    task.clip_config = task._model().clip.config
    stored = part_masks.load(Path(data_lib.builder("synthetic_pedestrians", data, "small").data_dir))
    meta = load_source("synthetic_pedestrians", "train", data, "small", decode_image=False)
    kept = [i for i in range(len(meta)) if as_str(meta[i]["domain"]) in ("daylight", "night")]
    np.testing.assert_array_equal(task.mask_table, np.stack([stored[as_str(meta[i]["file_name"])] for i in kept]))

    marker = muva.FLIP_MARKER
    _, flipped = transforms.hflip(np.zeros((4, 4, 3)), marker)
    index = np.array([0, 5, 7, 11])
    batch = {"index": jnp.asarray(index), "image_index": jnp.asarray(index),
             "part_boxes": jnp.asarray(np.stack([marker, flipped, marker, flipped]))}
    got = np.asarray(task._pseudo_masks(batch, train=True)).reshape(4, 3, 16, 8)
    want = task.mask_table[index].reshape(4, 3, 16, 8)
    np.testing.assert_array_equal(got[[0, 2]], want[[0, 2]])
    np.testing.assert_array_equal(got[[1, 3]], want[[1, 3], :, :, ::-1])
    np.testing.assert_array_equal(np.asarray(task._pseudo_masks(batch, train=False)), task.mask_table[index])
    # the pipeline's batches carry the marker, flipped or not (shifted by at most the pad of the crop)
    x = next(iter(task.train_stream(pipeline.Shard())))["part_boxes"][:, 0]
    centre = (x[:, 0] + x[:, 2]) / 2
    assert np.all(np.abs(np.abs(centre - 0.5) - 0.375) < 0.05), centre
    assert (centre > 0.5).any() and (centre < 0.5).any()  # both orientations in one batch of 16


def test_stored_masks_are_read_only_when_training_needs_them(data_dir, tmp_path):
    """A set built without --part_masks: the task still builds its model (evaluating a checkpoint needs no masks);
    stage 1 / training stop with a one-line error saying how to build them."""
    from reid_jax.errors import UserError
    from reid_jax.train import muva

    module = configs.load("muva")
    c = configs.tiny_image_reid(module.get_config("demo"), data_dir)
    c.data.train = [module._dataset("synthetic_pedestrians", "train", "small", "synthetic", ("daylight", "night"))]
    c.muva.update({"simulate_grounding": False, "pseudo_masks": "stored"})
    task = muva.Task(c, tmp_path)
    task.init_state()
    with pytest.raises(UserError, match="holds no part masks .* --part_masks=FILE.pkl"):
        task.train_stream(pipeline.Shard())
