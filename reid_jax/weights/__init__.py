"""Where CLIP weights come from: any source -> our CLIP (`load_clip`), and a training run's starting model
(`model_for`). `python -m reid_jax.convert` is the command on top.

  readers    checkpoint files (OpenAI, open_clip, safetensors, Hugging Face folders) -> an OpenAI-named state
  mapping    OpenAI-named state -> our CLIP: architecture inference, parameter names and layouts, the model
  converted  the folder `reid_jax.convert` writes (config.json + orbax parameters)
  runs       CLIP weights of a reid-jax training run (workdir, checkpoints/, best/<dataset>/)
  load       `load_clip` (any of the above) and `model_for` (a config's model section + init_checkpoint)
"""

from reid_jax.weights.load import load_clip, model_for
from reid_jax.weights.readers import CheckpointError

__all__ = ["CheckpointError", "load_clip", "model_for"]
