"""Independent PyTorch reference models for parity tests.

* `hf_clip`: transformers' `CLIPModel` (random init), the reference the issue names.
* `openai_clip`: OpenAI's own model code, `clip/model.py` from the `clip-anytorch` PyPI package. The package's
  `__init__` imports torchvision (not installable here without CUDA torch), so the file is loaded by path.

Every parameter is perturbed so that LayerNorm scales/biases and all biases are non-trivial.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import transformers

from tests import numerics

TINY_HF = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8),
    text=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77),
    projection_dim=48)
B16_HF = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                patch_size=16),
    text=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
              max_position_embeddings=77),
    projection_dim=512)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """LayerNorm scales ~ 1 + 0.1 N(0,1), every other tensor + 0.02 N(0,1) (biases included)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        scale = 0.1 if p.ndim == 1 and ("norm" in name or "ln_" in name or "layrnorm" in name) else 0.02
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_clip(shape: dict, seed: int = 0, act: str = "quick_gelu") -> transformers.CLIPModel:
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(vision_config={**shape["vision"], "hidden_act": act},
                                  text_config={**shape["text"], "hidden_act": act},
                                  projection_dim=shape["projection_dim"])
    model = transformers.CLIPModel(cfg)
    return perturb_(model, seed + 1)


def hf_image_features(hf: transformers.CLIPModel, images: np.ndarray, interpolate: bool = False) -> np.ndarray:
    """NHWC float images -> projected CLS [B, E] (HF's bicubic position interpolation when `interpolate`)."""
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=nchw(images), interpolate_pos_encoding=interpolate)
    return getattr(out, "pooler_output", out).numpy()  # transformers 5 may wrap the features in an output


def hf_text_features(hf: transformers.CLIPModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf.get_text_features(input_ids=torch.from_numpy(ids))
    return getattr(out, "pooler_output", out).numpy()


def _load_file(name: str):
    spec = importlib.util.find_spec("clip")
    if spec is None:
        raise ImportError("the parity tests need `pip install --no-deps clip-anytorch==2.6.0` (see README)")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    mod_spec = importlib.util.spec_from_file_location(f"openai_clip_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def openai_model_module():
    return _load_file("model.py")


def openai_simple_tokenizer():
    return _load_file("simple_tokenizer.py")


def openai_clip(seed: int = 0, image_resolution: int = 32, patch: int = 8, width: int = 128,
                layers: int = 2, embed_dim: int = 48) -> torch.nn.Module:
    """OpenAI's CLIP (ViT) at a small size; OpenAI's code sets heads = width // 64."""
    torch.manual_seed(seed)
    model = openai_model_module().CLIP(
        embed_dim=embed_dim, image_resolution=image_resolution, vision_layers=layers, vision_width=width,
        vision_patch_size=patch, context_length=77, vocab_size=49408, transformer_width=width,
        transformer_heads=width // 64, transformer_layers=layers)
    return perturb_(model.float(), seed + 1)


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


rel_err = numerics.rel_err  # max |ours - ref| / max |ref|


def random_ids(n: int, rng: np.random.Generator, length: int = 77, vocab: int = 49405) -> np.ndarray:
    """OpenAI layout: SOT, random ids, EOT, zeros; lengths vary per row."""
    ids = np.zeros((n, length), np.int64)
    for i in range(n):
        k = int(rng.integers(1, length - 1))
        ids[i, 0], ids[i, k] = 49406, 49407
        ids[i, 1:k] = rng.integers(1, vocab, size=k - 1)
    return ids
