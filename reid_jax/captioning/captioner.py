"""TDE captions: one per image, from the static instruction or from a template of the bank.

Output lines (read by the luperson_mllm builder as they are):
  {"image": "path/under/--images.jpg", "caption": "...", "source": "<model>_<mode>", "template_id": int | null}
template_id is the bank index of the template the caption follows (null in static mode).

Each image gets its template from a hash of (seed, image path): the same on every run and restart, spread
evenly over the bank. A caption that is empty or leaks a template slot (any bracket, '<', 'description]')
is asked again, `content_retries` times, each time with the next template of the bank and at
`retry_temperature`; then the image is recorded as failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from reid_jax.captioning import templates as templates_lib
from reid_jax.captioning.client import MIME, Request, RequestError, RetryableError
from reid_jax.captioning.runner import Outcome, Stats, read_image

MODES = ("static", "template")
# A caption holding one of these leaked template syntax; a superset of what the luperson_mllm builder drops.
LEAK_MARKS = ("[", "]", "<", ">", "description]", "person/woman/man")


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    mode: str = "template"
    source: str = ""  # the 'source' field; '' = '<model name>_<mode>'
    content_retries: int = 2  # extra asks after an empty or leaking caption
    retry_temperature: float = 0.7  # sampling for those asks (greedy decoding would repeat the answer)
    min_chars: int = 8  # a shorter answer counts as empty
    seed: int = 0  # template assignment


def source_name(model: str, mode: str) -> str:
    """'/models/Qwen-VL-Chat' + 'template' -> 'Qwen-VL-Chat_template'."""
    return f"{Path(model.rstrip('/')).name or model}_{mode}"


def template_for(image: str, attempt: int, bank_size: int, seed: int) -> int:
    """Bank index for an image's attempt: stable hash of (seed, path), then the next template per retry."""
    digest = hashlib.blake2b(f"{seed}\0{image}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") + attempt) % bank_size


def clean(answer: str) -> str:
    """One line, outer quotes and spaces removed (models like to quote the sentence they were asked for)."""
    text = " ".join(answer.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def problem(caption: str, cfg: CaptionConfig) -> str | None:
    if len(caption) < cfg.min_chars:
        return f"empty caption ({caption!r})"
    leaked = [m for m in LEAK_MARKS if m in caption]
    if leaked:
        return f"template slot leaked ({leaked[0]!r})"
    return None


def make_job(backend, root: Path, bank: list[str], cfg: CaptionConfig, source: str, stats: Stats):
    """The runner's job: image keys -> Outcomes. `backend.complete([Request]) -> [str]` (client or transformers)."""
    if cfg.mode not in MODES:
        raise ValueError(f"--mode {cfg.mode!r}: expected one of {MODES}")

    def request(key: str, image: bytes, attempt: int) -> tuple[Request, int | None]:
        temperature = cfg.retry_temperature if attempt else None
        mime = MIME.get(Path(key).suffix.lower(), "image/jpeg")
        if cfg.mode == "static":
            return Request(templates_lib.STATIC_INSTRUCTION, image, mime, temperature), None
        tid = template_for(key, attempt, len(bank), cfg.seed)
        prompt = templates_lib.TEMPLATE_INSTRUCTION.format(template=bank[tid])
        return Request(prompt, image, mime, temperature), tid

    def job(keys: list[str]) -> list[Outcome]:
        outcomes, images = [], {}
        for key in keys:
            try:
                images[key] = read_image(root / key)
            except OSError as e:
                outcomes.append(Outcome(key, error=f"unreadable image: {e}"))
        pending, last = list(images), {}
        for attempt in range(cfg.content_retries + 1):
            if attempt:
                stats.add("content_retries", len(pending))
            asks = [request(k, images[k], attempt) for k in pending]
            try:
                answers = backend.complete([r for r, _ in asks])
            except (RetryableError, RequestError) as e:
                return outcomes + [Outcome(k, error=str(e)) for k in pending]
            retry = []
            for key, (_, tid), answer in zip(pending, asks, answers):
                caption = clean(answer)
                why = problem(caption, cfg)
                if why is None:
                    outcomes.append(Outcome(key, {"image": key, "caption": caption, "source": source,
                                                  "template_id": tid}))
                else:
                    retry.append(key)
                    last[key] = (why, answer)
            pending = retry
            if not pending:
                break
        n = cfg.content_retries + 1
        return outcomes + [Outcome(k, error=f"{last[k][0]} in all {n} answers", answer=last[k][1]) for k in pending]

    return job
