"""A PyTorch IRRA model with the attribute names and structure of IRRA's / MLLM4Text-ReID's `model/build.py`,
built on OpenAI's CLIP code (the `clip-anytorch` package): the CLIP as `base_model` with a patch stride and a
non-square position grid (what their `build_CLIP_from_openai_pretrained` makes), plus the ID classifier and the
cross-modal MLM head. Saved as their `Checkpointer` does: {'model': state_dict (float16 by default, as their
`convert_weights`), 'optimizer', 'scheduler', 'num_epoch', 'iteration', 'epoch'}.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from tests import torch_refs


class IRRARef(nn.Module):
    def __init__(self, image_size=(32, 16), patch=8, stride=8, width=64, embed_dim=64, layers=2, num_classes=7,
                 cmt_depth=1, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        clip_mod = torch_refs.openai_model_module()
        self.base_model = clip_mod.CLIP(embed_dim=embed_dim, image_resolution=2 * patch, vision_layers=layers,
                                        vision_width=width, vision_patch_size=patch, context_length=77,
                                        vocab_size=49408, transformer_width=width, transformer_heads=width // 64,
                                        transformer_layers=layers)
        visual = self.base_model.visual
        visual.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=stride, bias=False)
        rows, cols = ((image_size[0] - patch) // stride + 1, (image_size[1] - patch) // stride + 1)
        visual.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1 + rows * cols, width))
        heads = embed_dim // 64
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.cross_attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.cross_modal_transformer = clip_mod.Transformer(width=embed_dim, layers=cmt_depth, heads=heads)
        self.ln_pre_t = clip_mod.LayerNorm(embed_dim)
        self.ln_pre_i = clip_mod.LayerNorm(embed_dim)
        self.ln_post = clip_mod.LayerNorm(embed_dim)
        self.mlm_head = nn.Sequential(OrderedDict([
            ("dense", nn.Linear(embed_dim, embed_dim)), ("gelu", clip_mod.QuickGELU()),
            ("ln", clip_mod.LayerNorm(embed_dim)), ("fc", nn.Linear(embed_dim, 49408))]))
        self.float()
        torch_refs.perturb_(self, seed + 1)

    # their encode_image / encode_text: projected CLS, projected EOT
    def encode_image(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.base_model.encode_image(torch_refs.nchw(images)).float().numpy()

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.base_model.encode_text(torch.from_numpy(ids)).float().numpy()

    def image_tokens(self, images: np.ndarray) -> torch.Tensor:
        """Every token through ln_post and proj, [B, T, E] (their modified `VisionTransformer.forward`)."""
        v = self.base_model.visual
        x = v.conv1(torch_refs.nchw(images)).flatten(2).permute(0, 2, 1)
        cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)
        x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return v.ln_post(x) @ v.proj

    def text_tokens(self, ids: np.ndarray) -> torch.Tensor:
        """Every token through ln_final and text_projection, [B, L, E] (their `encode_text`)."""
        m = self.base_model
        x = m.token_embedding(torch.from_numpy(ids)) + m.positional_embedding
        x = m.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return m.ln_final(x) @ m.text_projection

    def mlm_logits(self, images: np.ndarray, mlm_ids: np.ndarray) -> np.ndarray:
        """Their `cross_former` then `mlm_head`: [B, L, vocab]."""
        with torch.no_grad():
            q, kv = self.text_tokens(mlm_ids), self.image_tokens(images)
            x = self.cross_attn(self.ln_pre_t(q), self.ln_pre_i(kv), self.ln_pre_i(kv), need_weights=False)[0]
            x = self.cross_modal_transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
            return self.mlm_head(self.ln_post(x)).float().numpy()

    def save(self, path, half: bool = True, prefix: str = "") -> None:
        """As their Checkpointer: the model's state dict (float16 after `convert_weights`) with the optimizer's and
        scheduler's state and the loop's counters beside it."""
        sd = OrderedDict((prefix + k, v.half() if half and v.is_floating_point() else v.clone())
                         for k, v in self.state_dict().items())
        opt = torch.optim.Adam(self.parameters(), lr=1e-5)
        torch.save({"model": sd, "optimizer": opt.state_dict(),
                    "scheduler": {"last_epoch": 3, "base_lrs": [1e-5]}, "num_epoch": 60, "iteration": 0,
                    "epoch": 3}, path)

    def round_to_half_(self) -> IRRARef:
        """Every float tensor rounded through float16, so a float32 forward sees the weights the file holds."""
        with torch.no_grad():
            for p in self.state_dict().values():
                if p.is_floating_point():
                    p.copy_(p.half().float())
        return self
