"""Evaluation, in one place: what the loop runs at every evaluation step and `--mode=eval` runs on a checkpoint.

  encode.py      a model function jitted once over its state; an evaluation stream encoded on the mesh
  metrics.py     retrieval metrics: text-to-image and image ReID (Market-1501 protocol), R@k, mAP, mINP
  rerank.py      k-reciprocal re-ranking (dense, or sparse from neighbour lists for large N)
  sheet.py       contact sheet of rankings: query, thumbnails with rank and score, the true match after them
  pictures.py    ranked-gallery pictures (`retrieval_<dataset>_<step>.png`), drawn as contact sheets
  text_reid.py   text-to-image evaluation of a CLIP on test sets of captioned images (TDE + NAM)
  image_reid.py  image ReID on query / gallery splits, optionally re-ranked (CLIP-SCGI, MUVA)

Each evaluator is handed the mesh the loop built and returns {'eval/<dataset>/<metric>': value}.
"""
