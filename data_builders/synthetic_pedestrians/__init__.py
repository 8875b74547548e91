"""synthetic_pedestrians: the built-in, download-free ReID set (procedural pedestrians, three visual domains).

`python -m reid_jax.data.build synthetic_pedestrians --data_dir=DIR --config=small` (or demo, small_noisy).
Pure pieces for other code: `attributes.identities(config)`, `attributes.caption(...)`, `render.render(...)`,
`builder.plan(config)`.
"""

from data_builders.synthetic_pedestrians.builder import CONFIGS, SyntheticConfig, SyntheticPedestrians

__all__ = ["CONFIGS", "SyntheticConfig", "SyntheticPedestrians"]
