"""Input data: TFDS sources (built once by `python -m reid_jax.data.build`) and grain pipelines."""

from __future__ import annotations

from pathlib import Path


def builder(name: str, data_dir, config: str | None = None, **kwargs):
    """The TFDS builder of dataset `name` (see data_builders.BUILDERS) over `data_dir`."""
    from data_builders import builder_class

    return builder_class(name)(data_dir=str(data_dir), config=config, **kwargs)


def load_source(name: str, split: str, data_dir, config: str | None = None, decode_image: bool = True):
    """Random-access source of a built dataset: a sequence of dicts (see data_builders/common.py).

    With `decode_image=False` the image stays encoded bytes: cheap metadata and caption reads.
    """
    b = builder(name, data_dir, config)
    if not Path(b.data_dir).exists():
        if name == "manifest":
            raise FileNotFoundError(
                f"dataset manifest/{config} is not built under {data_dir}; build it with `python -m "
                f"reid_jax.data.build manifest --manifest=FILE.csv|FILE.jsonl --name={config} --data_dir={data_dir}`")
        cfg = f" --config={b.builder_config.name}" if b.builder_config else ""
        raise FileNotFoundError(
            f"dataset {name!r} is not built under {data_dir} (no {b.data_dir}); build it with "
            f"`python -m reid_jax.data.build {name} --manual_dir=DIR --data_dir={data_dir}{cfg}`")
    if split not in b.info.splits:
        raise KeyError(f"dataset {name!r} has splits {sorted(b.info.splits)}, not {split!r}")
    if decode_image:
        return b.as_data_source(split=split)
    import tensorflow_datasets as tfds

    return b.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
