"""Local transformers backend: AutoProcessor + AutoModelForImageTextToText, batched generation on one device.

For a single GPU without a model server: `--backend=transformers --model-path DIR` (a folder saved with
`save_pretrained`, holding the processor with its chat template, and the weights; nothing is downloaded).
The same `complete([Request]) -> [str]` as the HTTP client, so the runner and jobs do not care which one answers.
Prompts are left-padded so that every sequence's new tokens start at the same column.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Sequence
from pathlib import Path

from reid_jax.captioning.client import Request
from reid_jax.errors import UserError


class ModelPathError(UserError, FileNotFoundError):
    """--model-path is not a usable save_pretrained folder."""


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    batch_size: int = 8  # images per generate call
    max_new_tokens: int = 300
    temperature: float = 0.0  # 0 = greedy
    device: str = "auto"  # 'auto' = cuda if available, else cpu
    dtype: str = "auto"  # torch dtype name, or 'auto' (the checkpoint's)


class TransformersBackend:
    def __init__(self, model_path: str | Path, cfg: LocalConfig = LocalConfig()):
        import torch  # heavy: only for this backend
        import transformers

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ModelPathError(f"--model-path {path}: no config.json; expected a folder written by "
                                    "save_pretrained (model weights + processor), e.g. a downloaded "
                                    "Qwen2-VL / LLaVA / InternVL-hf checkpoint")
        self.cfg, self.torch = cfg, torch
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        if not getattr(self.processor, "chat_template", None):
            raise ModelPathError(f"--model-path {path}: the processor has no chat template; this backend formats "
                             "prompts with it (add chat_template.jinja to the folder)")
        self.processor.tokenizer.padding_side = "left"
        dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.batch_size = cfg.batch_size
        self._lock = threading.Lock()  # one generate at a time: the device is the limit, not the threads

    def complete(self, requests: Sequence[Request]) -> list[str]:
        out = []
        for i in range(0, len(requests), self.cfg.batch_size):
            out += self._generate(requests[i:i + self.cfg.batch_size])
        return out

    def _prompt(self, req: Request) -> str:
        content = ([{"type": "image"}] if req.image is not None else []) + [{"type": "text", "text": req.prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _generate(self, batch: Sequence[Request]) -> list[str]:
        from PIL import Image

        if any(r.image is None or r.messages for r in batch):
            raise ValueError("the transformers backend answers image questions only (use --server for chats)")
        images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in batch]
        inputs = self.processor(images=images, text=[self._prompt(r) for r in batch], padding=True,
                                return_tensors="pt").to(self.device, dtype=self.model.dtype)  # casts floats only
        temps = [self.cfg.temperature if r.temperature is None else r.temperature for r in batch]
        sample = max(temps) > 0  # one setting per batch: a retry's temperature applies to its batch
        kwargs = {"do_sample": True, "temperature": max(temps)} if sample else {"do_sample": False}
        with self._lock, self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)
