"""Search a folder of images with a trained model: index it, then query it with a sentence or a photo.

Command line: `python -m reid_jax.search index | query | serve` (see `reid_jax/search/__main__.py` and
docs/search.md); Python: `build(model, images, out)`, `Index.open(out).query(text=... | image=..., top=K)`.
"""

from reid_jax.search.index import BuildConfig, Hit, Index, build

__all__ = ["BuildConfig", "Hit", "Index", "build"]
