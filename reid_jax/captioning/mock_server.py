"""A local OpenAI-compatible vision server that answers from the synthetic pedestrians' ground truth.

Part of the tool, not only of its tests: `python -m reid_jax.captioning.bench` times the captioner against it,
and a user can try the tool with it before pointing it at a model. `render(folder, n)` draws n synthetic
pedestrians to PNG files and returns their truth (attributes and exact part boxes); `MockServer(truth)` serves
`POST /v1/chat/completions` on 127.0.0.1, recognises each image by the SHA-256 of its bytes, and answers
  - a caption request (the static instruction, or a "Template: ..." prompt) with a true caption
    (templates filled from the identity's attributes),
  - a grounding request (the part named in the prompt, or all three) with the true box in `box_format`
    ('qwen' <box> tags, 'cogvlm' [[...]], 'json', 'shikra' 0-1 floats, or 'cycle' through them),
  - a text-only chat (the template dialogue) with the next of `chat_replies`.
It can be told to misbehave, per image or for the next requests: '500', 'hang' (no answer for `hang_s`),
'drop' (connection closed), 'garbage' (not JSON), 'leak' (template returned with its slots), 'empty',
'nobox', 'legs_full' (legs box of the whole person), 'legs_tiny'.

`python -m reid_jax.captioning.mock_server --images DIR --render N [--port P]` serves a fresh folder.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import hashlib
import http.server
import json
import re
import threading
import time
from pathlib import Path

import numpy as np

from data_builders.synthetic_pedestrians import attributes, builder

BOX_FORMATS = ("qwen", "cogvlm", "json", "shikra")
PART_NAMES = ("head", "upper body", "legs")
FAILURES = ("500", "hang", "drop", "garbage", "leak", "empty", "nobox", "legs_full", "legs_tiny")


@dataclasses.dataclass(frozen=True)
class Truth:
    key: str  # path relative to the image folder
    identity: attributes.Identity
    boxes: np.ndarray  # float32 [3, 4]: head, upper body, legs, normalised


def render(folder: str | Path, n: int, config: str = "small") -> dict[str, Truth]:
    """Draws the first n shots of a synthetic_pedestrians config into folder (as its file names); {sha256: Truth}."""
    cfg = next(c for c in builder.CONFIGS if c.name == config)
    shots = [s for split in builder.plan(cfg).values() for s in split]
    truth = {}
    for shot in shots[:n]:
        image, boxes = builder.render_shot(cfg, shot)
        data = builder.encode_png(image, cfg.png_compress_level)
        path = Path(folder) / shot.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        truth[hashlib.sha256(data).hexdigest()] = Truth(shot.file_name, shot.identity, boxes)
    return truth


def slot_phrases(who: attributes.Identity) -> dict[str, str]:
    """The true phrase for each template slot."""
    lower = ("a " if who.lower_type == "skirt" else "") + f"{who.lower_colour} {who.lower_type}"
    return {
        "[clothing description]": f"a {who.pattern} {who.upper_colour} {who.upper_type} and {lower}",
        "[hair description]": f"{who.hair_length} {who.hair_colour} hair",
        "[footwear description]": f"{who.shoes_colour} {who.shoes_type}",
        "[accessory description]": f"a {who.hat_colour} {who.hat_type}" if who.hat_type else "no hat",
        "[belongings description]": f"a {who.bag_colour} {who.bag_type}" if who.bag_type else "empty hands",
        "[person/woman/man]": who.gender,
    }


def fill(template: str, who: attributes.Identity) -> str:
    text = template
    for slot, phrase in slot_phrases(who).items():
        text = text.replace(slot, phrase)
    return text[0].upper() + text[1:]


def static_caption(who: attributes.Identity, key: str) -> str:
    tid = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(attributes.TEMPLATES)
    return attributes.caption(who, tid, np.random.default_rng(0)).text


def format_box(box, part: str, fmt: str) -> str:
    """One part's box as a grounding model would write it."""
    k = [int(round(float(v) * 1000)) for v in box]
    if fmt == "qwen":
        return f"<ref>the {part}</ref><box>({k[0]},{k[1]}),({k[2]},{k[3]})</box>"
    if fmt == "cogvlm":
        return f"The {part}[[{k[0]:03d},{k[1]:03d},{k[2]:03d},{k[3]:03d}]]"
    if fmt == "json":
        return "```json\n" + json.dumps([{"label": part, "bbox_2d": k}]) + "\n```"
    if fmt == "shikra":
        return f"The {part} is at [{box[0]:.3f},{box[1]:.3f},{box[2]:.3f},{box[3]:.3f}]."
    raise ValueError(f"box format {fmt!r}: expected one of {BOX_FORMATS}")


class MockServer:
    """Serves in a background thread; `url` is the base URL (.../v1). Use as a context manager or close()."""

    def __init__(self, truth: dict[str, Truth], box_format: str = "cycle", delay_s: float = 0.0,
                 hang_s: float = 5.0, sign: bool = False, chat_replies: list[str] | None = None, port: int = 0):
        self.truth, self.box_format, self.delay_s, self.hang_s, self.sign = truth, box_format, delay_s, hang_s, sign
        self.chat_replies = list(chat_replies or [])
        self.by_key = {t.key: t for t in truth.values()}
        self.failures: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.next_failures: collections.deque = collections.deque()
        self.log: list[dict] = []  # one entry per request: what was asked and what was answered
        self.chats: list[list[dict]] = []  # the messages of each text-only chat request
        self._lock = threading.Lock()
        self._n = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, key: str, *kinds: str, part: str | None = None) -> None:
        """The next requests about image `key` (and, for grounding, about `part` only) misbehave as `kinds`."""
        assert all(k in FAILURES for k in kinds) and part in (None, *PART_NAMES), (kinds, part)
        part = "legs" if part is None and kinds and kinds[0].startswith("legs_") else part
        self.failures[key].extend((k, part) for k in kinds)

    def fail_next(self, *kinds: str) -> None:
        """The next requests, whatever they ask, misbehave as `kinds`, in order."""
        self.next_failures.extend(kinds)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------------------------------------- answering
    def _failure(self, key: str | None, part: str | None = None) -> str | None:
        """The failure the next request about `key` (asking about `part`, if grounding) gets, if any."""
        with self._lock:
            if self.next_failures:
                return self.next_failures.popleft()
            queue = self.failures.get(key) if key is not None else None
            for i, (kind, target) in enumerate(queue or ()):
                if target is None or target == part:
                    del queue[i]
                    return kind
        return None

    def answer(self, body: dict) -> tuple[int, object]:
        """(status, answer): answer is the reply text for 200, an error message otherwise, or a failure kind."""
        messages = body.get("messages") or []
        if not messages:
            return 400, "no messages"
        content = messages[-1].get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        text = " ".join(p.get("text", "") for p in parts if p.get("type") == "text")
        urls = [p["image_url"]["url"] for p in parts if p.get("type") == "image_url"]
        if not urls:
            return self._chat(messages)
        try:
            data = base64.b64decode(urls[0].split(",", 1)[1], validate=True)
        except (ValueError, IndexError):
            return 400, "image_url is not a base64 data URL"
        truth = self.truth.get(hashlib.sha256(data).hexdigest())
        if truth is None:
            return 400, "unknown image (not one of the rendered ground truth)"
        return self._about_image(truth, text)

    def _chat(self, messages: list[dict]) -> tuple[int, object]:
        fail = self._failure(None)
        if fail:
            return 200, fail
        with self._lock:
            self.chats.append(messages)
            if not self.chat_replies:
                return 503, "no scripted chat reply left"
            return 200, self.chat_replies.pop(0)

    def _about_image(self, truth: Truth, text: str) -> tuple[int, object]:
        key, who = truth.key, truth.identity
        template = re.search(r"Template: (.*)", text)
        captioning = bool(template) or "Describe the pedestrian" in text
        asked = [name for name in PART_NAMES if name in text.lower()]
        fail = self._failure(key, None if captioning or len(asked) != 1 else asked[0])
        entry = {"image": key, "template": template.group(1).strip() if template else None, "failure": fail}
        if captioning:
            kind = "caption"
            reply = fill(entry["template"], who) if template else static_caption(who, key)
            if self.sign:
                reply += f" Image {hashlib.sha256(key.encode()).hexdigest()[:8]}."
            if fail == "leak":
                reply = entry["template"] or "A [person/woman/man] in [clothing description]."
        else:
            kind = "ground"
            reply = self._boxes(truth, text, fail)
        entry.update(kind=kind, reply=reply)
        with self._lock:
            self.log.append(entry)
            self._n += 1
        if fail in ("leak", "legs_full", "legs_tiny", None):
            return 200, reply
        return (200, "") if fail in ("empty", "nobox") else (200, fail)

    def _boxes(self, truth: Truth, text: str, fail: str | None) -> str:
        boxes = truth.boxes.copy()
        if fail == "legs_full":
            boxes[2, 1], boxes[2, 3] = 0.02, 0.99
        elif fail == "legs_tiny":
            boxes[2, 3] = boxes[2, 1] + 0.01
        lower = text.lower()
        asked = [p for p, name in enumerate(PART_NAMES) if name in lower]
        with self._lock:
            n = self._n
        fmt = BOX_FORMATS[n % len(BOX_FORMATS)] if self.box_format == "cycle" else self.box_format
        if len(asked) == len(PART_NAMES):  # all three at once: JSON, as the joint prompt asks
            return json.dumps({name: [round(float(v), 4) for v in boxes[p]] for p, name in enumerate(PART_NAMES)})
        if not asked:
            return "I cannot tell which part you mean."
        return format_box(boxes[asked[0]], PART_NAMES[asked[0]], fmt)


def _handler(server: MockServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            if self.path.rstrip("/").endswith("/v1/models"):
                self._send(200, json.dumps({"data": [{"id": "mock", "object": "model"}]}).encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if server.delay_s:
                time.sleep(server.delay_s)
            if not self.path.endswith("/chat/completions"):
                return self._send(404, b'{"error": "not found"}')
            try:
                status, reply = server.answer(json.loads(body))
            except ValueError:
                return self._send(400, b'{"error": "body is not JSON"}')
            if status != 200:
                return self._send(status, json.dumps({"error": reply}).encode())
            if reply == "500":
                return self._send(500, b'{"error": "injected failure"}')
            if reply == "hang":
                time.sleep(server.hang_s)
                self.close_connection = True
                return None
            if reply == "drop":
                self.close_connection = True
                return None
            if reply == "garbage":
                return self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
            self._send(200, json.dumps({
                "id": "mock", "object": "chat.completion", "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop"}]}).encode())

    return Handler


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m reid_jax.captioning.mock_server", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, type=Path, help="folder to draw the synthetic images into")
    p.add_argument("--render", type=int, default=64, help="how many images to draw")
    p.add_argument("--config", default="small", help="synthetic_pedestrians config")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--box-format", default="cycle", choices=("cycle", *BOX_FORMATS))
    p.add_argument("--delay", type=float, default=0.0, help="seconds added to every answer")
    args = p.parse_args(argv)
    truth = render(args.images, args.render, args.config)
    server = MockServer(truth, args.box_format, args.delay, port=args.port)
    print(json.dumps({"url": server.url, "images": len(truth)}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
