"""What an image-ReID training run logged, against its final model: the last evaluation's metrics recomputed from
that model's query and gallery features by the numpy loops of tests/test_evaluate.py (Market-1501 protocol) and,
when re-ranking is on, on the distances of the numpy transcription in tests/test_rerank.py."""

from pathlib import Path

import numpy as np

from reid_jax import mesh as mesh_lib
from reid_jax.eval import image_reid, metrics
from reid_jax.eval.encode import jitted
from reid_jax.train.writer import read_records
from tests import test_evaluate, test_rerank
from tests.numerics import assert_close

KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def last_evaluation(workdir: Path, label: str) -> dict:
    """The last metrics.jsonl record with 'eval/<label>/...' metrics."""
    return [r for r in read_records(Path(workdir) / "metrics.jsonl") if f"eval/{label}/mAP" in r][-1]


def assert_logged_metrics_are_the_final_models(config, workdir: Path, task, model, image_features) -> dict:
    """`model` (what loop.fit returned) encodes config.eval.datasets[0] with `image_features(model, batch)`;
    the metrics logged at the last step must be the numpy metrics of those features. Returns the logged record."""
    spec = config.eval.datasets[0]
    last = last_evaluation(workdir, spec.label)
    assert last["step"] == task.total_steps
    encode, mesh = jitted(model, image_features), mesh_lib.make_mesh(config.mesh)
    q, g = (image_reid.encode_split(config, spec, split, task.data_dir, encode, mesh)
            for split in (spec.query, spec.gallery))
    want = {spec.label: test_evaluate._reference(q["feats"], q["pid"], q["camid"], g["feats"], g["pid"],
                                                 g["camid"], 10)}
    rr = config.eval.get("rerank")
    if rr is not None and rr.enabled:
        qf, gf = q["feats"].astype(np.float64), g["feats"].astype(np.float64)
        if rr.get("normalize", True):  # the evaluators re-rank L2-normalised features
            qf, gf = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (qf, gf))
        distances, _ = test_rerank._reference(qf, gf, rr.k1, rr.k2, rr.lambda_value)
        want[spec.label + "+rerank"] = metrics.image_reid(None, q["pid"], q["camid"], None, g["pid"], g["camid"],
                                                          distances=distances)
    for run, m in want.items():
        for key in KEYS:  # percent from float32 scores against float64 loops (tests/test_evaluate.py)
            assert_close(last[f"eval/{run}/{key}"], m[key], test_evaluate.PERCENT, f"{run} {key}", scale=100)
    return last
