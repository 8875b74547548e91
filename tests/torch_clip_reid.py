"""A PyTorch stand-in for CLIP-ReID's stage-2 ViT model: the same module tree and state-dict key names as the
authors' `build_transformer` (make_model_clipreid.py) and their CLIP ViT, at test widths, with their eval forward.

Keys: image_encoder.{conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.*, ln_post,
proj}, cv_embed (SIE only), bottleneck(.running_*), bottleneck_proj, classifier, classifier_proj,
prompt_learner.{cls_ctx, token_prefix, token_suffix}, text_encoder.{transformer, positional_embedding, ln_final,
text_projection}. `save` writes `torch.save(model.state_dict())` as their trainer does.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

# their person configs: 256x128, patch 16, stride 16 (plain) or 12 (SIE-OLP); widths shrunk (heads = width / 64)
TINY = dict(width=128, layers=2, patch=16, embed=48, text_width=64, text_layers=2, context=16, classes=7)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """Pre-LN residual block on [L, N, D] (sequence first, as nn.MultiheadAttention's default)."""

    def __init__(self, width: int, causal_length: int = 0):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.mask = torch.full((causal_length, causal_length), float("-inf")).triu(1) if causal_length else None

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, causal_length: int = 0):
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width, causal_length) for _ in range(layers)])


class VisionTransformer(nn.Module):
    def __init__(self, grid: tuple[int, int], patch: int, stride: int, width: int, layers: int, embed: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid[0] * grid[1] + 1, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed) * width ** -0.5)

    def forward(self, x, camera=None):
        """x [N, 3, H, W] -> (tokens after the second-to-last block, after ln_post, projected), each [N, L, *].
        The camera row joins the CLS token before the position embedding, as their forward adds it."""
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1)
        if camera is not None:
            x[:, 0] = x[:, 0] + camera
        x = self.ln_pre(x + self.positional_embedding).permute(1, 0, 2)
        blocks = self.transformer.resblocks
        before_last = blocks[:-1](x)  # their code: resblocks[:11] of 12
        last = self.ln_post(blocks[-1](before_last).permute(1, 0, 2))
        return before_last.permute(1, 0, 2), last, last @ self.proj


class PromptLearner(nn.Module):
    """Stage 1's per-identity context words, and the fixed prompt's token embeddings as buffers."""

    def __init__(self, classes: int, width: int, context: int):
        super().__init__()
        self.cls_ctx = nn.Parameter(0.02 * torch.randn(classes, 4, width))
        self.register_buffer("token_prefix", torch.randn(1, 5, width))  # SOT "a photo of a"
        self.register_buffer("token_suffix", torch.randn(1, context - 9, width))  # "person." EOT padding


class TextEncoder(nn.Module):
    def __init__(self, width: int, layers: int, context: int, embed: int):
        super().__init__()
        self.transformer = Transformer(width, layers, causal_length=context)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width ** -0.5)


class CLIPReIDStage2(nn.Module):
    """Their `build_transformer` for ViT-B-16 at test widths. `cameras` > 0 adds `cv_embed` (SIE_CAMERA)."""

    def __init__(self, image_size=(256, 128), stride=16, cameras=0, sie_coe=1.0, **shape):
        super().__init__()
        s = {**TINY, **shape}
        grid = ((image_size[0] - s["patch"]) // stride + 1, (image_size[1] - s["patch"]) // stride + 1)
        self.sie_coe = sie_coe
        self.classifier = nn.Linear(s["width"], s["classes"], bias=False)
        self.classifier_proj = nn.Linear(s["embed"], s["classes"], bias=False)
        self.bottleneck = nn.BatchNorm1d(s["width"])
        self.bottleneck_proj = nn.BatchNorm1d(s["embed"])
        self.image_encoder = VisionTransformer(grid, s["patch"], stride, s["width"], s["layers"], s["embed"])
        if cameras:
            self.cv_embed = nn.Parameter(0.02 * torch.randn(cameras, s["width"]))
        self.prompt_learner = PromptLearner(s["classes"], s["text_width"], s["context"])
        self.text_encoder = TextEncoder(s["text_width"], s["text_layers"], s["context"], s["embed"])

    def forward(self, x, cam_label=None, neck_feat="before"):
        """Eval mode: [N, Dv + E], before (their TEST.NECK_FEAT 'before') or after the BNNecks."""
        camera = None if cam_label is None else self.sie_coe * self.cv_embed[cam_label]
        _, feats, proj = self.image_encoder(x, camera)
        cls, cls_proj = feats[:, 0], proj[:, 0]
        if neck_feat == "after":
            return torch.cat([self.bottleneck(cls), self.bottleneck_proj(cls_proj)], dim=1)
        return torch.cat([cls, cls_proj], dim=1)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and floating buffer moved: LayerNorm and BN scales ~ 1 + 0.1 N(0, 1), BN running variances
    ~ 1 + 0.3 |N(0, 1)|, everything else + 0.05 N(0, 1) (biases, BN shift and running means included)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if not t.is_floating_point():
            continue  # num_batches_tracked
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("running_var"):
            t.copy_(1.0 + 0.3 * noise.abs())
        elif t.ndim == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scales
            t.add_(0.1 * noise)
        else:
            t.add_(0.05 * noise)
    return model.eval()


def build(seed: int = 0, **kwargs) -> CLIPReIDStage2:
    torch.manual_seed(seed)
    return perturb_(CLIPReIDStage2(**kwargs), seed + 1)


def save(model: nn.Module, path, dtype=None, prefix: str = "") -> None:
    """`torch.save(model.state_dict())`, optionally cast (fp16) and key-prefixed ('module.' from DataParallel)."""
    state = {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    torch.save(state, str(path))


def load_cast(model: nn.Module, dtype) -> nn.Module:
    """The model with its floating weights rounded through `dtype` (what an fp16 file holds), in float32."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return model


def features(model: CLIPReIDStage2, images: np.ndarray, camids=None, neck_feat: str = "before") -> np.ndarray:
    """NHWC float32 images [N, H, W, 3] -> the eval-mode feature [N, Dv + E]."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    cams = None if camids is None else torch.as_tensor(np.asarray(camids), dtype=torch.long)
    with torch.no_grad():
        return model.eval()(x, cams, neck_feat).numpy()
