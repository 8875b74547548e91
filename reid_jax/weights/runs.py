"""CLIP weights out of a reid-jax training run: its workdir, checkpoints/ or best/<dataset>/.

These are the folders `reid_jax.train.checkpoint.Checkpointer` writes (`<step>/state`, arrays under dotted names);
they are read here without a target, so that no training code is needed to read them. A run's CLIP sits at
'model.' (TDE), 'model.clip.' (SCGI, MUVA), or one level up in a best-model checkpoint ('', 'clip.').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from reid_jax.errors import ConfigError
from reid_jax.models.clip import CLIP
from reid_jax.weights import mapping
from reid_jax.weights.readers import CheckpointError

_ANCHOR = "visual.conv1.kernel"  # the parameter whose name tells where a run keeps its CLIP
_KEEP_MISSING = ("visual.extra_tokens",)  # a plain CLIP's run has no part tokens: they keep their initial values
_TOWERS = ("visual", "text", "logit_scale")  # CLIP's top-level parameters (a best model at '' holds only them)
_TRAINED_WITH = "Use the architecture the checkpoint was trained with (config.model)."


def checkpoints_dir(path: Path) -> Path | None:
    """The Checkpointer folder behind `path` (a workdir -> its checkpoints/; `best/<dataset>` or `checkpoints/`
    themselves), or None when `path` is not one."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = [p for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir()] if path.is_dir() else []
    return path if steps else None


def latest_arrays(directory: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(step, {dotted name: array}) of the newest checkpoint in a Checkpointer folder, read without a target."""
    manager = ocp.CheckpointManager(Path(directory).absolute(), item_names=("state", "data", "meta"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory}: no finished checkpoint")
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, {k: np.asarray(v) for k, v in out.state.items()}


def clip_arrays(directory: Path) -> tuple[int, str, dict[str, np.ndarray]]:
    """(step, prefix, {dotted name: array}) of the newest checkpoint; `prefix` is where its CLIP sits. `load` and
    `load_module` take it as `arrays`, so that one read serves both."""
    step, saved = latest_arrays(directory)
    prefix = next((k[: -len(_ANCHOR)] for k in saved if k.endswith(_ANCHOR)), None)
    if prefix is None:
        raise ConfigError(f"{directory}: step {step} holds no CLIP (no '*{_ANCHOR}' among {len(saved)} arrays)")
    return step, prefix, saved


def _fit(directory: Path, step: int, prefix: str, saved: dict, want: dict[tuple, tuple], hint: str) -> dict:
    """{path: array} for every parameter path of `want` ({path: shape}) from `saved` under `prefix`; raises
    ConfigError naming what is missing (beyond `_KEEP_MISSING`) or mis-shaped."""
    flat, problems = {}, []
    for path, shape in want.items():
        name = ".".join(map(str, path))
        have = saved.get(prefix + name)
        if have is None:
            if name not in _KEEP_MISSING:
                problems.append(f"missing {prefix + name}")
            continue
        if have.shape != shape:
            problems.append(f"{prefix + name}: saved {list(have.shape)}, model {list(shape)}")
        flat[path] = have
    if problems:
        raise ConfigError(f"{directory} (step {step}) does not fit this model: " + "; ".join(problems[:10])
                          + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "") + ". " + hint)
    return flat


def load_into(clip: nnx.Module, directory: Path) -> int:
    """Copies the CLIP parameters of a reid-jax training checkpoint into `clip` (same architecture), whichever
    model held them. Part tokens (`visual.extra_tokens`) may be absent: they keep their values. Returns the step.
    """
    step, prefix, saved = clip_arrays(directory)
    params = dict(nnx.to_flat_state(nnx.state(clip, nnx.Param)))
    flat = _fit(directory, step, prefix, saved, {p: v[...].shape for p, v in params.items()}, _TRAINED_WITH)
    nnx.update(clip, nnx.State.from_flat_path(flat))
    return step


def load_module(module: nnx.Module, directory: Path, arrays=None) -> int:
    """Copies every variable of a method's model (parameters and batch statistics; e.g. `CLIPReID`, `MUVAModel`,
    holding its CLIP as `.clip`) from the newest checkpoint of a run that trained that model (`arrays`: its
    `clip_arrays`, when already read). Returns the step."""
    step, prefix, saved = arrays or clip_arrays(directory)
    base = prefix[: -len("clip.")] if prefix.endswith("clip.") else prefix
    variables = dict(nnx.to_flat_state(nnx.state(module)))
    nnx.update(module, nnx.from_flat_state(_fit(directory, step, base, saved,
                                                {p: v[...].shape for p, v in variables.items()}, _TRAINED_WITH)))
    return step


def load(directory: Path, image_size, stride: int, overrides: dict, arrays=None) -> CLIP:
    """A run's CLIP on its own. A run does not record its architecture: what the arrays' shapes tell is read from
    them (part tokens included), attention heads follow OpenAI's width / 64 rule and the rest are CLIPConfig
    defaults, each changed by `overrides`; `image_size` and `stride` must give the grid the run trained at
    (a ReID grid is not square, so it cannot be resized from the arrays alone). `arrays`: the run's
    `clip_arrays`, when already read."""
    step, prefix, saved = arrays or clip_arrays(directory)
    ours = {}  # {parameter path: array} of the CLIP
    for name, value in saved.items():
        path = tuple(int(p) if p.isdigit() else p for p in name[len(prefix):].split("."))
        if name.startswith(prefix) and path[0] in _TOWERS:
            ours[path] = value
    arch, _ = mapping.infer_arch(directory, {mapping.openai_name(p): mapping.to_torch_layout(p, v)
                                             for p, v in ours.items()})
    if ("visual", "extra_tokens") in ours:
        arch["vision"]["num_extra_tokens"] = ours["visual", "extra_tokens"].shape[0]
    for tower in ("vision", "text"):
        if "heads" not in overrides.get(tower, {}) and arch[tower]["width"] % 64:
            raise CheckpointError(f"{directory}: a reid-jax run does not record its attention heads, and OpenAI's "
                                  f"rule (width / 64) does not fit {tower} width {arch[tower]['width']}; pass "
                                  f"{tower}={{'heads': N}} with the number it was trained with")
    cfg = mapping.model_config(arch, image_size, stride or arch["vision"]["patch_size"], overrides)
    want = {p: s.shape for p, s in mapping.abstract_params(cfg).items()}
    hint = ("Load it at the image size and stride it was trained with, and pass the CLIPConfig fields its arrays "
            "do not tell (heads, activation) as overrides.")
    return mapping.with_params(cfg, _fit(directory, step, prefix, saved, want, hint))
