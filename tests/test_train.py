"""The shared training loop on the TDE+NAM task: sharded step == single-device step, resume == uninterrupted,
metrics files, the main command's errors. Small synthetic set, tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reid_jax.train import loop
from tests import sharding
from tests.cli_config import tiny_config
from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[1]


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


class Interrupt(Exception):
    pass


def test_resume_after_a_crash_gives_the_same_parameters(data_dir, tmp_path):
    from reid_jax.train import tde_nam

    config = tiny_config(data_dir)
    whole = loop.fit(config, tmp_path / "whole", tde_nam.Task(config, tmp_path / "whole"))

    task = tde_nam.Task(config, tmp_path / "resumed")
    stream = task.train_stream

    def crashing_stream(shard):  # the process dies while reading the 7th batch (after the step-4 checkpoint)
        it = iter(stream(shard))

        class Crashing:
            def __init__(self):
                self.n = 0

            def __next__(self):
                self.n += 1
                if self.n == 7:
                    raise Interrupt
                return next(it)

            def get_state(self):
                return it.get_state()

            def set_state(self, s):
                it.set_state(s)

        return type("S", (), {"__iter__": lambda self: Crashing()})()

    task.train_stream = crashing_stream
    with pytest.raises(Interrupt):
        loop.fit(config, tmp_path / "resumed", task)
    assert (tmp_path / "resumed" / "checkpoints" / "4").exists()
    resumed = loop.fit(config, tmp_path / "resumed", tde_nam.Task(config, tmp_path / "resumed"))
    for a, b in zip(_params(whole), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == task.total_steps  # one record per step, no repeats
    evals = [r for r in records if "eval/synthetic/R1" in r]
    assert evals and {"eval/synthetic/R5", "eval/synthetic/mAP", "eval/synthetic/mINP"} <= set(evals[-1])
    assert (tmp_path / "resumed" / f"retrieval_synthetic_{task.total_steps}.png").exists()
    assert (tmp_path / "resumed" / "best" / "synthetic").exists()
    assert list((tmp_path / "resumed" / "tensorboard").iterdir())


def test_sharded_step_equals_single_device_step(data_dir, tmp_path):
    sharding.assert_sharded_step_equals_single("tests.test_train", "tiny_config", "tde_nam", data_dir, tmp_path)


def test_main_names_what_is_missing(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "reid_jax.main", f"--config={ROOT / 'configs' / 'tde_nam.py'}",
           f"--workdir={tmp_path}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 1
    assert "luperson_mllm" in run.stderr and "python -m reid_jax.data.build luperson_mllm" in run.stderr
    run = subprocess.run(cmd + ["--config.data.train.name=synthetic_pedestrians",
                                     "--config.data.train.config=small", "--config.data.auto_build=True",
                                     "--config.data.batch_size=16",
                                     "--config.init_checkpoint=/nonexistent/clip_b16"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 1 and "python -m reid_jax.convert" in run.stderr, run.stderr[-2000:]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    from reid_jax.train import tde_nam

    config = tiny_config(data_dir)
    task = tde_nam.Task(config, tmp_path)
    good_step = task.train_step

    def diverging(ts, batch, rng):  # finite for the first 4 steps (checkpointed), then NaN
        metrics = good_step(ts, batch, rng)
        return metrics | {"loss": jax.numpy.where(ts.optimizer.step[...] > 4, jax.numpy.nan, metrics["loss"])}

    task.train_step = diverging
    with pytest.raises(loop.TrainingDiverged, match="non-finite training metrics at step 5"):
        loop.fit(config, tmp_path, task)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


def test_two_processes_on_loopback_equal_one_process(data_dir, tmp_path):
    """jax.distributed with gloo CPU collectives: 2 processes x 2 devices vs 1 process x 1 device, same run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    worker = [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(data_dir)]
    procs = [subprocess.Popen(worker + [str(tmp_path / "multi"), str(tmp_path / "multi.npz"), str(i), "2",
                                        str(port)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.run(worker + [str(tmp_path / "single"), str(tmp_path / "single.npz")], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert single.returncode == 0, single.stderr[-3000:]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    one, two = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert sorted(one.files) == sorted(two.files)
    for k in one.files:  # 1e-5 of the array's scale (at least 1: LayerNorm scales, projections near 0.1)
        assert_close(two[k], one[k], 1e-5, k, scale=max(1.0, float(np.abs(one[k]).max())))

    def last_eval(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if "eval/synthetic/R1" in line][-1]

    single_eval, multi_eval = last_eval(tmp_path / "single"), last_eval(tmp_path / "multi")
    assert single_eval.keys() == multi_eval.keys()
    for k in single_eval:  # percentages: 1e-6 of 100 (float32 spacing near 100 is 7.6e-6 of a percent)
        assert_close(multi_eval[k], single_eval[k], 1e-6, k, scale=100.0)


def test_a_run_is_an_init_checkpoint(data_dir, tmp_path):
    """config.init_checkpoint = a reid-jax workdir (or its best/<dataset>): the next stage (IRRA fine-tuning after
    TDE pretraining, SCGI / MUVA from a TDE model) starts from its CLIP weights; `Encoder.load` of the workdir,
    its checkpoints/ or best/<dataset> gives the trained model's features."""
    from reid_jax import weights
    from reid_jax.train import tde_nam

    from reid_jax.inference import Encoder

    config = tiny_config(data_dir, epochs=1)
    config.eval.every_epochs = 1
    trained = loop.fit(config, tmp_path / "pre", tde_nam.Task(config, tmp_path / "pre"))
    for init in (tmp_path / "pre", tmp_path / "pre" / "best" / "synthetic"):
        nxt = tiny_config(data_dir)
        nxt.init_checkpoint = str(init)
        nxt.seed = 5  # a fresh model would differ
        for a, b in zip(_params(trained), _params(weights.model_for(nxt.model, nxt.init_checkpoint, nxt.seed))):
            np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(0).normal(size=(2, *config.model.image_size, 3)).astype(np.float32)
    ids = np.zeros((2, config.data.context_length), np.int32)
    ids[:, :3] = [49406, 320, 49407]
    for path in (tmp_path / "pre", tmp_path / "pre" / "checkpoints", tmp_path / "pre" / "best" / "synthetic"):
        enc = Encoder.load(path)  # the run's config.json tells the method and input
        assert (enc.kind, enc.image_size) == ("tde_nam", tuple(config.model.image_size))
        np.testing.assert_array_equal(enc.image_features(images), np.asarray(trained.encode_image(images)))
        np.testing.assert_array_equal(enc.text_features(ids), np.asarray(trained.encode_text(ids)))
    wider = tiny_config(data_dir)
    wider.init_checkpoint = str(tmp_path / "pre")
    wider.model.overrides.embed_dim = 32
    with pytest.raises(ValueError, match=r"does not fit this model: .*visual\.proj: saved \[32, 24\], model \[32, 32\]"):
        weights.model_for(wider.model, wider.init_checkpoint, wider.seed)


def test_start_epoch_runs_before_every_epoch_but_the_first_also_after_a_resume(data_dir, tmp_path):
    """`task.start_epoch(ts, mesh)` (MUVA's memory rebuild) runs before the first step of epochs 2, 3, ...; what
    it writes into the state is trained with; a run resumed from the checkpoint at an epoch's end runs it again."""
    from reid_jax.train import tde_nam

    calls = []

    def run(epochs):
        config = tiny_config(data_dir, epochs=epochs)
        task = tde_nam.Task(config, tmp_path)

        def start_epoch(ts, mesh):
            calls.append(int(ts.optimizer.step[...]))
            ts.model.logit_scale[...] = jnp.asarray(float(len(calls)))  # frozen in TDE: it keeps what was set
        task.start_epoch = start_epoch
        return loop.fit(config, tmp_path, task), task.steps_per_epoch

    _, spe = run(1)
    assert calls == []
    model, _ = run(3)  # resumes at the end of epoch 1
    assert calls == [spe, 2 * spe]
    assert float(model.logit_scale[...]) == 2.0
