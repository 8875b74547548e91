"""A PyTorch MUVA with the authors' structure and state-dict key names, written from reading their code, at any
size: the reference the released-checkpoint tests compare against.

Keys as their trainer saves them (`torch.save(model.state_dict())`): image_encoder.* (the ViT, its position
embedding [1 + R + L, D] after their rebuild), text_encoder.{transformer, positional_embedding, ln_final,
text_projection}, prompt_learner.learnable_ctx, local_token, residual_mask_predictor.blocks.N.*, fc, bnneck.
Forward as theirs: the RMP on each block's input, logits accumulated, sigmoid(logits / tau) gated at the threshold
into an additive -inf mask; the test feature is the BNNeck output of [CLS, parts] through ln_post and proj.
"""

from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """OpenAI's residual attention block (sequence first), with an additive mask given per call."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int | None = None):
        super().__init__()
        self.heads, self.width, self.layers = heads, width, layers
        self.resblocks = nn.Sequential(*[Block(width, heads, mlp or 4 * width) for _ in range(layers)])


class VisionTransformer(nn.Module):
    def __init__(self, grid: tuple[int, int], patch: int, stride: int, width: int, layers: int, heads: int,
                 out_dim: int, mlp: int | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride, bias=False)
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid[0] * grid[1] + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, out_dim))


class TextEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, context: int, out_dim: int, mlp: int | None = None):
        super().__init__()
        self.transformer = Transformer(width, layers, heads, mlp)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, out_dim))


class PromptLearner(nn.Module):
    def __init__(self, classes: int, parts: int, n_ctx: int, width: int):
        super().__init__()
        self.learnable_ctx = nn.Parameter(0.002 * torch.randn(classes, 1 + parts, n_ctx, width))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, y):
        b, h = x.shape[0], self.heads
        split = lambda t: t.reshape(b, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731  [B, h, n, d]
        q, k, v = split(self.to_q(x)), split(self.to_k(y)), split(self.to_v(y))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, x.shape[1], -1))


class MaskPredictor(nn.Module):
    def __init__(self, dim: int, heads: int, num_patches: int, layer_norm: bool, shortcut: bool):
        super().__init__()
        self.cross_attn = CrossAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, num_patches), QuickGELU(), nn.Linear(num_patches, num_patches))
        self.shortcut = shortcut
        norm = (lambda: nn.LayerNorm(dim)) if layer_norm else nn.Identity
        self.ln_attn1, self.ln_attn2, self.ln_mlp = norm(), norm(), norm()

    def forward(self, parts, patches):
        x = self.cross_attn(self.ln_attn1(parts), self.ln_attn2(patches))
        if self.shortcut:
            x = x + parts
        return self.mlp(self.ln_mlp(x))


class ResidualMaskPredictor(nn.Module):
    def __init__(self, layers: int, parts: int, num_patches: int, dim: int, heads: int, tau: float,
                 layer_norm: bool, shortcut: bool):
        super().__init__()
        self.parts, self.tau = parts, tau
        self.blocks = nn.ModuleList([MaskPredictor(dim, heads, num_patches, layer_norm, shortcut)
                                     for _ in range(layers)])

    def forward(self, x, i, prev):
        """x [T, B, D] (sequence first) -> (probabilities, accumulated logits), both [B, R, L]."""
        x = x.permute(1, 0, 2)
        logits = self.blocks[i](x[:, 1: 1 + self.parts], x[:, 1 + self.parts:])
        if prev is not None:
            logits = logits + prev
        return torch.sigmoid(logits / self.tau), logits


class MUVA(nn.Module):
    def __init__(self, *, image_size=(24, 12), patch=4, stride=4, width=128, layers=2, heads=None, embed_dim=32,
                 text_width=64, text_layers=1, text_heads=None, context=77, classes=5, parts=3, rmp_heads=2,
                 layer_norm=True, shortcut=True, tau=1.0, threshold=0.5, mlp=None, text_mlp=None):
        super().__init__()
        self.grid = ((image_size[0] - patch) // stride + 1, (image_size[1] - patch) // stride + 1)
        self.parts, self.threshold = parts, threshold
        num_patches = self.grid[0] * self.grid[1]
        self.image_encoder = VisionTransformer(self.grid, patch, stride, width, layers, heads or width // 64,
                                               embed_dim, mlp)
        self.prompt_learner = PromptLearner(classes, parts, 4, text_width)
        self.text_encoder = TextEncoder(text_width, text_layers, text_heads or text_width // 64, context, embed_dim,
                                        text_mlp)
        self.local_token = nn.Parameter(0.02 * torch.randn(parts, width))
        pe = self.image_encoder.positional_embedding.data  # their rebuild: CLS's row copied once per part
        self.image_encoder.positional_embedding = nn.Parameter(torch.cat([pe[:1], pe[:1].repeat(parts, 1), pe[1:]]))
        self.residual_mask_predictor = ResidualMaskPredictor(layers, parts, num_patches, width, rmp_heads, tau,
                                                             layer_norm, shortcut)
        self.fc = nn.Linear((1 + parts) * embed_dim, classes, bias=False)
        self.bnneck = nn.BatchNorm1d((1 + parts) * embed_dim)

    def attn_mask(self, mask):
        """[B, R, L] additive part-to-patch mask -> [B * heads, T, T], their template filled in."""
        b, r, n = mask.shape
        t = 1 + r + n
        out = torch.zeros(b, t, t)
        diag = torch.full((r, r), float("-inf"))
        diag.fill_diagonal_(0.0)
        out[:, 1: 1 + r, 1: 1 + r] = diag
        out[:, 1: 1 + r, 1 + r:] = mask
        out[:, 1 + r:, 1: 1 + r] = mask.transpose(1, 2)
        heads = self.image_encoder.transformer.heads
        return out.unsqueeze(1).repeat(1, heads, 1, 1).reshape(b * heads, t, t)

    def tokens(self, img):
        v = self.image_encoder
        x = v.conv1(img).flatten(2).permute(0, 2, 1)
        cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, self.local_token.expand(x.shape[0], -1, -1), x], dim=1) + v.positional_embedding
        return v.ln_pre(x).permute(1, 0, 2)

    def forward_image(self, img, gt_mask=None, full_attention=False):
        """-> (projected tokens [B, T, E], probabilities [layers, B, R, L] or None)."""
        x, probs, logits = self.tokens(img), [], None
        for i, block in enumerate(self.image_encoder.transformer.resblocks):
            if full_attention:
                x = block(x)
                continue
            if gt_mask is not None:
                x = block(x, self.attn_mask(gt_mask))
                continue
            p, logits = self.residual_mask_predictor(x, i, logits)
            gated = torch.full(p.shape, float("-inf"))
            gated[p.detach() > self.threshold] = 0.0
            x = block(x, self.attn_mask(gated))
            probs.append(p)
        x = self.image_encoder.ln_post(x.permute(1, 0, 2)) @ self.image_encoder.proj
        return x, (torch.stack(probs) if probs else None)

    @torch.no_grad()
    def infer_image(self, img, gt_mask=None, after_bn=True):
        x, _ = self.forward_image(img, gt_mask)
        feats = x[:, : 1 + self.parts].reshape(x.shape[0], -1)
        return self.bnneck(feats) if after_bn else feats


@torch.no_grad()
def perturb_(model: MUVA, seed: int, rmp_scale: float = 0.3) -> MUVA:
    """Every parameter and buffer moved off its init: LayerNorm / BN scales 1 + 0.1 N, BN running variance
    |1 + 0.3 N|, the rest + 0.02 N; the RMP's weights and biases by `rmp_scale` N so that its logits lie well
    away from the gate (a patch near the threshold would flip on rounding alone)."""
    gen = torch.Generator().manual_seed(seed)
    noise = lambda t, s: s * torch.randn(t.shape, generator=gen)  # noqa: E731
    for name, p in model.named_parameters():
        norm = p.ndim == 1 and ("ln_" in name or "bnneck.weight" in name)
        p.add_(noise(p, rmp_scale if name.startswith("residual_mask_predictor") and not norm else
                     0.1 if norm else 0.02))
    model.bnneck.running_mean.add_(noise(model.bnneck.running_mean, 0.1))
    model.bnneck.running_var.copy_((1 + noise(model.bnneck.running_var, 0.3)).abs() + 0.05)
    model.bnneck.num_batches_tracked.fill_(100)
    return model.eval()
