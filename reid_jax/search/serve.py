"""A local search page over an index: `python -m reid_jax.search serve --index OUT [--host 127.0.0.1 --port 8000]`.

    server = make_server(index, "127.0.0.1", 0)       # a ThreadingHTTPServer; port 0 = a free port
    server.serve_forever()                            # or main(index_path, host, port): the command, until Ctrl-C

Routes:
    GET  /                  the page (static/index.html): a text box, an image upload, the results as a grid
    GET  /static/<name>     the page's script and style sheet (only the files named in STATIC)
    GET  /api/info          {"kind", "has_text", "count", "root"}: what the page says about the index
    POST /api/query         a text query as JSON {"text": str, "top": int, "camid": int | null}, or an image as the raw
                            request body (Content-Type image/*, `top` and `camid` in the query string)
                            -> {"hits": [{"rank", "score", "path", "image", "thumb"}]}, or 4xx {"error": message}
    GET  /image/<path>      a gallery image, as stored
    GET  /thumb/<path>      the same image shrunk to fit THUMB_SIZE (JPEG, made once and kept in memory)

Only the gallery images are served, and only those the index holds: <path> (percent-encoded) must be one of
`index.paths` exactly, and must resolve inside `index.root`. A request for `../../etc/passwd`, an absolute path, a
file the index does not list, or a listed symlink that points out of the gallery folder is a 404. The image travels
as the raw body rather than multipart form data: the browser's fetch sends a File as it is, and the standard
library has no multipart parser since `cgi` left it. Uploads over `max_upload` bytes get a 413 without being read.
The server binds 127.0.0.1 by default; while it listens on a loopback address it also answers only requests whose
Host header names a loopback host, so that a web page in the same browser cannot reach it through a DNS name
rebound to 127.0.0.1.
"""

from __future__ import annotations

import collections
import http.server
import io
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

from PIL import Image, ImageOps

from reid_jax.errors import UserError, report

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
MAX_UPLOAD_BYTES = 20 * 2**20  # a query image; a photo straight from a phone is well under this
MAX_JSON_BYTES = 64 * 2**10  # a text query
TOP_DEFAULT, TOP_MAX = 10, 200
THUMB_SIZE = (160, 320)  # (W, H) box a thumbnail is shrunk to fit; pedestrian crops are tall
THUMB_QUALITY = 85
THUMB_CACHE = 4096  # thumbnails kept in memory (~10 kB each)
STATIC_DIR = Path(__file__).with_name("static")
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".gif": "image/gif", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}
# the page loads nothing from elsewhere; blob: is the preview of the image being uploaded
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class SearchServer(http.server.ThreadingHTTPServer):
    """The HTTP server with what its handlers share: the index, one lock for queries, the thumbnail cache."""

    daemon_threads = True

    def __init__(self, address, index, max_upload: int, log: bool):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.index, self.max_upload, self.log = index, max_upload, log
        self.root = Path(index.root).resolve()
        self.paths = frozenset(index.paths)
        self.query_lock = threading.Lock()  # one query at a time: the model's compiled functions are shared
        self.thumbs: collections.OrderedDict = collections.OrderedDict()
        self.thumbs_lock = threading.Lock()
        self.static = {name: (STATIC_DIR / name).read_bytes() for name in STATIC}
        self.check_host = _is_loopback(address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def make_server(index, host: str = DEFAULT_HOST, port: int = 0, *, max_upload: int = MAX_UPLOAD_BYTES,
                log: bool = True) -> SearchServer:
    """A server for `index` (a `reid_jax.search.Index`) listening on host:port (0 = a free port), not yet serving.
    `log`: one line per request on stderr."""
    try:
        return SearchServer((host, port), index, max_upload, log)
    except OSError as e:
        raise UserError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}; choose another --port "
                        f"(0 picks a free one) or --host") from e


def main(index_path: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """The `serve` command: opens the index, serves the page until Ctrl-C or SIGTERM; returns the exit status."""
    from reid_jax.search import Index  # the model stack loads only when the command runs

    try:
        index = Index.open(index_path)
        server = make_server(index, host, port)
    except UserError as e:
        return report(e)
    print(f"searching {len(index.paths)} images of {index.root} ({index.kind}, "
          f"{'text and image' if index.has_text else 'image'} queries) at {server.url}  (Ctrl-C stops)", flush=True)
    if not _is_loopback(host):
        print(f"note: --host {host} lets other machines query the index and see its images", flush=True)
    restore = None
    if threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    server: SearchServer
    timeout = 60  # seconds a client may stall mid-request before its thread lets go
    server_version = "reid-jax-search"
    sys_version = ""

    # ------------------------------------------------------------------------------------------------ routing
    def do_GET(self):  # noqa: N802 (the name http.server dispatches to)
        if not self._host_ok():
            return
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._send(200, self.server.static["index.html"], STATIC["index.html"],
                              {"Content-Security-Policy": PAGE_POLICY})
        if path.startswith("/static/") and path[len("/static/"):] in STATIC:
            name = path[len("/static/"):]
            return self._send(200, self.server.static[name], STATIC[name])
        if path == "/favicon.ico":  # none: an empty answer keeps the browser's console quiet
            return self._send(204, b"", "image/x-icon")
        if path == "/api/info":
            idx = self.server.index
            return self._json(200, {"kind": idx.kind, "has_text": bool(idx.has_text), "count": len(idx.paths),
                                    "root": Path(idx.root).name, "top": TOP_DEFAULT, "top_max": TOP_MAX})
        for prefix, thumb in (("/image/", False), ("/thumb/", True)):
            if path.startswith(prefix):
                return self._gallery(path[len(prefix):], thumb)
        self._json(404, {"error": f"no such page: {path}"})

    def do_POST(self):  # noqa: N802
        if not self._host_ok():
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/api/query":
            self.close_connection = True  # the body is not read
            return self._json(404, {"error": f"no such endpoint: POST {url.path}"})
        try:
            kwargs = self._read_query(url.query)
            t0 = time.perf_counter()
            with self.server.query_lock:
                hits = self.server.index.query(**kwargs)
            seconds = time.perf_counter() - t0
        except _HTTPError as e:
            return self._json(e.status, {"error": str(e)})
        except UserError as e:  # e.g. a text query on an image-only model: the index's message, as it is
            return self._json(400, {"error": " ".join(str(e).split())})
        except Exception as e:  # a bug: the page says so briefly, the log has the traceback
            traceback.print_exc()
            return self._json(500, {"error": f"internal error ({type(e).__name__}: {e}); see the server's log"})
        self._json(200, {"hits": [_hit(h) for h in hits], "seconds": round(seconds, 4)})

    # ------------------------------------------------------------------------------------------------ queries
    def _read_query(self, query_string: str) -> dict:
        """The index.query keyword arguments of this request."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                fields = json.loads(self._body(MAX_JSON_BYTES, "text query", "send a shorter text"))
            except ValueError:
                fields = None
            if not isinstance(fields, dict):
                raise _HTTPError(400, 'a text query is a JSON object: {"text": "...", "top": 10}')
            text = fields.get("text")
            if not isinstance(text, str) or not text.strip():
                raise _HTTPError(400, "the text query is empty: type a description of the person")
            return {"text": text.strip(), **self._options(fields)}
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            body = self._body(self.server.max_upload, "upload", "send a smaller image")
            options = self._options(dict(urllib.parse.parse_qsl(query_string)))
            if not body:
                raise _HTTPError(400, "the upload is empty: choose a jpg or png image")
            _check_image(body)
            return {"image": body, **options}
        self.close_connection = True  # the body stays unread
        raise _HTTPError(415, f"a query is JSON text or an image, not Content-Type {ctype or 'none'!r}")

    def _body(self, limit: int, what: str, advice: str) -> bytes:
        """The request body, read only when its declared length is within `limit`."""
        length = self.headers.get("Content-Length", "")
        if not length.strip().isdigit():
            self.close_connection = True
            raise _HTTPError(411, f"the {what} has no valid Content-Length ({length or 'none'!r})")
        if int(length) > limit:
            self.close_connection = True  # the body stays unread
            raise _HTTPError(413, f"the {what} is {_mb(int(length))}, over the {_mb(limit)} limit: {advice}")
        try:
            body = self.rfile.read(int(length))
        except OSError:  # the socket timed out (Handler.timeout) or broke
            body = b""
        if len(body) != int(length):
            self.close_connection = True
            raise _HTTPError(400, f"the {what} ended after {len(body)} of its {length} bytes; send it again")
        return body

    @staticmethod
    def _options(fields: dict) -> dict:
        """`top` and `camid` from the JSON body or the query string, checked."""
        top = _whole(fields.get("top", TOP_DEFAULT), 1, TOP_MAX, f"top must be a whole number from 1 to {TOP_MAX}")
        camid = fields.get("camid")
        if camid is not None and camid != "":
            camid = _whole(camid, 0, None, "camera id must be a whole number >= 0 (or empty)")
        return {"top": top, "camid": None if camid == "" else camid}

    # ------------------------------------------------------------------------------------------------ images
    def _gallery(self, quoted: str, thumb: bool):
        """A gallery image (or its thumbnail), only when the index lists it and it lies inside the gallery."""
        try:
            rel = urllib.parse.unquote(quoted, errors="strict")
        except UnicodeDecodeError:
            rel = None
        file = None if rel is None else self._listed_file(rel)
        if file is None:
            return self._json(404, {"error": "no such image in the index"})
        try:
            if thumb:
                body, ctype = self._thumbnail(rel, file), "image/jpeg"
            else:
                body, ctype = file.read_bytes(), IMAGE_TYPES.get(file.suffix.lower(), "application/octet-stream")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return self._json(404, {"error": f"the image can no longer be read ({type(e).__name__})"})
        self._send(200, body, ctype, {"Cache-Control": "private, max-age=3600"})

    def _listed_file(self, rel: str) -> Path | None:
        if rel not in self.server.paths:  # the only names served: no '..', no absolute path, nothing unlisted
            return None
        file = (self.server.root / rel).resolve()
        if not file.is_relative_to(self.server.root) or not file.is_file():  # a symlink out of the gallery
            return None
        return file

    def _thumbnail(self, rel: str, file: Path) -> bytes:
        key = (rel, file.stat().st_mtime_ns)
        cache, lock = self.server.thumbs, self.server.thumbs_lock
        with lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        with Image.open(file) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail(THUMB_SIZE, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=THUMB_QUALITY)
        body = out.getvalue()
        with lock:
            cache[key] = body
            while len(cache) > THUMB_CACHE:
                cache.popitem(last=False)
        return body

    # ------------------------------------------------------------------------------------------------ replies
    def _host_ok(self) -> bool:
        if not self.server.check_host:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if _is_loopback(name):
            return True
        self.close_connection = True
        self._json(403, {"error": f"Host {host!r} is not this machine; open {self.server.url}"})
        return False

    def _json(self, status: int, value: dict):
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if "Cache-Control" not in (headers or {}):
            self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _hit(h) -> dict:
    quoted = urllib.parse.quote(h.path)
    return {"rank": int(h.rank), "score": float(h.score), "path": h.path, "image": f"/image/{quoted}",
            "thumb": f"/thumb/{quoted}"}


def _check_image(body: bytes) -> None:
    """A clear 400 for an upload Pillow cannot decode, before the model sees it."""
    try:
        with Image.open(io.BytesIO(body)) as im:
            im.load()
    except Image.DecompressionBombError as e:
        raise _HTTPError(413, f"the upload is too many pixels to decode safely ({e})") from None
    except Exception as e:  # Pillow raises many types for broken files
        raise _HTTPError(400, f"the upload is not an image Pillow can read (jpg, png, ...): {e}") from None


def _whole(value, lo: int, hi: int | None, message: str) -> int:
    """An int from JSON (not a bool, not a fraction) or from a query string's digits, within [lo, hi]."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise _HTTPError(400, f"{message}, got {value!r}")
    return value


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"
