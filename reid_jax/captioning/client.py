"""OpenAI-compatible chat-completions client for vision models: images as base64 data URLs, retries, backoff.

vLLM, SGLang, LMDeploy, TGI and Ollama all serve `POST {base}/chat/completions` with messages whose content
holds `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` parts. Standard library only
(http.client): one keep-alive connection per worker thread, so concurrency = threads.

What is retried (with exponential backoff, `Retry-After` honoured): timeouts, refused or dropped connections,
HTTP 408 / 429 / 5xx, and answers that are not the JSON the API promises. Other 4xx are not retried: the request
itself is wrong (model name, payload) and asking again would not help.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence

from reid_jax.errors import UserError

MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
        ".webp": "image/webp"}
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
EXCERPT = 200  # characters of a server's answer quoted in an error


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Every number of the HTTP client (the CLI flags of the same names)."""

    timeout_s: float = 120.0  # per request: connecting, and each wait for bytes (a hung server = a retry)
    retries: int = 5  # extra attempts after the first, for retryable failures
    backoff_s: float = 1.0  # wait before the first retry; doubles each retry, with jitter in [0.5, 1] x
    backoff_max_s: float = 60.0  # cap of one wait (Retry-After included)
    max_tokens: int = 300  # per answer
    temperature: float = 0.0  # greedy by default: reproducible captions
    api_key: str = ""  # sent as "Authorization: Bearer ..." when set


class RetryableError(Exception):
    """A failure worth another try (timeout, connection, 5xx/408/429, malformed answer)."""


class RequestError(Exception):
    """A failure another try would not fix (4xx: unknown model, payload rejected); the message says what to do."""


class ServerURLError(UserError, ValueError):
    """A --server that is not an http(s) URL."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One question about one image (image None: a text-only chat, e.g. the template dialogue)."""

    prompt: str
    image: bytes | None = None
    mime: str = "image/png"
    temperature: float | None = None  # None: the client's default
    messages: tuple = ()  # a whole conversation instead of prompt (text-only)


def chat_url(server: str) -> urllib.parse.SplitResult:
    """`http://host:port`, `.../v1` or `.../v1/chat/completions` -> the chat-completions URL."""
    url = urllib.parse.urlsplit(server.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ServerURLError(f"--server {server!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    path = url.path
    if not path.endswith("/chat/completions"):
        path = (path if path.endswith("/v1") else path + "/v1") + "/chat/completions"
    return url._replace(path=path)


def models_path(chat: urllib.parse.SplitResult) -> str:
    """The model list beside the chat endpoint: `.../v1/chat/completions` -> `.../v1/models`."""
    return chat.path[:-len("/chat/completions")] + "/models"


def model_ids(body: bytes) -> list[str]:
    """The ids of a `GET /v1/models` answer ({"data": [{"id": ...}, ...]}); RetryableError if it is not one."""
    try:
        return [str(m["id"]) for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise RetryableError(f"malformed model list (expected {{'data': [{{'id': ...}}]}}): "
                             f"{body[:EXCERPT].decode('utf-8', 'replace')!r}") from None


def data_url(image: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def payload(model: str, req: Request, cfg: ClientConfig) -> dict:
    """The JSON body of one chat-completions request."""
    if req.messages:
        messages = list(req.messages)
    else:
        content = [{"type": "text", "text": req.prompt}]
        if req.image is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": data_url(req.image, req.mime)}})
        messages = [{"role": "user", "content": content}]
    temperature = cfg.temperature if req.temperature is None else req.temperature
    return {"model": model, "messages": messages, "max_tokens": cfg.max_tokens, "temperature": temperature}


def answer_text(body: bytes) -> str:
    """choices[0].message.content of a chat-completions answer; RetryableError if it is not one."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RetryableError(f"malformed answer (expected chat-completions JSON): "
                             f"{body[:EXCERPT].decode('utf-8', 'replace')!r}") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise RetryableError(f"malformed answer: message content is {type(content).__name__}, not text")
    return content


class ChatClient:
    """Thread-safe: each thread keeps its own connection. `on_retry(error)` is called before each retry."""

    def __init__(self, server: str, model: str, cfg: ClientConfig = ClientConfig(),
                 on_retry: Callable[[Exception], None] | None = None, sleep: Callable[[float], None] = time.sleep):
        self.url, self.model, self.cfg = chat_url(server), model, cfg
        self.on_retry, self.sleep = on_retry, sleep
        self._local = threading.local()
        self.batch_size = 1  # requests per `complete` call that run as one unit (the runner's job size)

    def complete(self, requests: Sequence[Request]) -> list[str]:
        """Answers, in order; raises RetryableError (retries exhausted) or RequestError."""
        return [self.ask(r) for r in requests]

    def ask(self, req: Request) -> str:
        body = json.dumps(payload(self.model, req, self.cfg)).encode()
        return self._with_retries(lambda: answer_text(self._send("POST", self.url.path, body)))

    def models(self) -> list[str] | None:
        """The model names the server lists, or None if it has no model list (404/405: not every server does).

        Retried like a request, so a server still loading gets the same patience; a server that never answers
        raises RetryableError, one that refuses (401/403: the API key) RequestError.
        """
        def fetch():
            try:
                return model_ids(self._send("GET", models_path(self.url), None))
            except RequestError as e:
                if getattr(e, "status", None) in (404, 405):
                    return None
                raise
        return self._with_retries(fetch)

    def _with_retries(self, call: Callable[[], object]):
        for attempt in range(self.cfg.retries + 1):
            try:
                return call()
            except RetryableError as e:
                if attempt == self.cfg.retries:
                    raise RetryableError(f"{e} (gave up after {attempt + 1} attempts)") from None
                if self.on_retry:
                    self.on_retry(e)
                self.sleep(self._backoff(attempt, getattr(e, "retry_after", None)))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        wait = min(self.cfg.backoff_s * 2 ** attempt, self.cfg.backoff_max_s) * random.uniform(0.5, 1.0)
        return min(max(wait, retry_after or 0.0), self.cfg.backoff_max_s)

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.url.hostname, self.url.port, timeout=self.cfg.timeout_s)
            conn.connect()
            # small request/answer exchanges: without NODELAY, Nagle + delayed ACK can add 40 ms to each
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Closes this thread's connection (the next request opens a new one)."""
        self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            conn.close()

    def _send(self, method: str, path: str, body: bytes | None) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        try:
            conn = self._connection()
            conn.request(method, path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
        except (socket.timeout, TimeoutError) as e:
            self._drop_connection()  # the late answer must not be read as the next request's
            raise RetryableError(f"no answer within {self.cfg.timeout_s:g} s ({e})") from None
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection()
            raise RetryableError(f"connection to {self.url.netloc} failed: {type(e).__name__}: {e}") from None
        if resp.status == 200:
            if resp.getheader("Connection", "").lower() == "close":
                self._drop_connection()
            return data
        text, where = data[:EXCERPT].decode("utf-8", "replace"), f"{self.url.scheme}://{self.url.netloc}{path}"
        if resp.status >= 500 or resp.status in RETRY_STATUS:
            self._drop_connection()
            err = RetryableError(f"HTTP {resp.status} from {where}: {text!r}")
            err.retry_after = _seconds(resp.getheader("Retry-After"))
            raise err
        if resp.status in (401, 403):
            err = RequestError(f"HTTP {resp.status} from {where}: {text!r}; the server wants an API "
                               "key: pass --api-key or set $OPENAI_API_KEY")
        else:
            err = RequestError(f"HTTP {resp.status} from {where} (model {self.model!r}): {text!r}; "
                               "check --server (the OpenAI-compatible base URL, e.g. http://host:8000/v1) and "
                               "--model (a name the server lists at /v1/models)")
        err.status = resp.status
        raise err


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:  # an HTTP date: not worth parsing, fall back to our own backoff
        return None
