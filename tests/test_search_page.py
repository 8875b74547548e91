"""`reid_jax.search.serve`: the local search page over a real index (a tiny random CLIP, 12 drawn pedestrians).

Over HTTP (http.client): the routes, the answers of POST /api/query against `Index.query` itself, only the listed
gallery images served (traversal, absolute paths, unlisted files and a listed symlink out of the gallery: 404), the
413 for a too large upload, bad queries as 4xx with a message, the Host check, the command's start and SIGTERM.
In a browser (headless Chromium through selenium, skipped where none is installed): a typed query and an uploaded
image give the grid `Index.query` gives, every thumbnail loads, and errors (a text query to an image-only model, a
file that is no image) appear on the page.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from reid_jax.errors import UserError
from reid_jax.inference import Encoder
from reid_jax.search import BuildConfig, Index, build, serve
from tests import torch_clip_reid, torch_refs

TEXT = "a man in a red jacket and blue jeans"
SIZES = [(64, 128), (200, 400), (48, 96)]  # (W, H): smaller than the thumbnail box, 1.25x it, smaller
SCREENSHOT = os.environ.get("REID_JAX_SEARCH_SCREENSHOT")  # where to save the page with results, if set


def _person(size, rng) -> Image.Image:
    """A pedestrian drawing: background, head, coat and trousers in random colours."""
    w, h = size
    colour = lambda lo=0: tuple(int(c) for c in rng.integers(lo, 256, 3))  # noqa: E731
    im = Image.new("RGB", size, colour(120))
    d = ImageDraw.Draw(im)
    d.ellipse((0.35 * w, 0.05 * h, 0.65 * w, 0.2 * h), fill=(230, 190, 160))
    d.rectangle((0.28 * w, 0.21 * h, 0.72 * w, 0.58 * h), fill=colour())
    d.rectangle((0.32 * w, 0.58 * h, 0.68 * w, 0.95 * h), fill=colour())
    return im


def _index(model: Path, gallery: Path, out: Path) -> Index:
    """Builds and opens the index with one loaded model (loading and compiling it once more costs seconds)."""
    encoder = Encoder.load(model)
    build(model, gallery, out, cfg=BuildConfig(batch=4, workers=2), encoder=encoder)
    return Index.open(out, encoder=encoder)


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory):
    """A text-image index: 12 images in two camera folders, one png with a space and a non-ASCII letter."""
    tmp = tmp_path_factory.mktemp("search_clip")
    model = tmp / "ViT-tiny.pt"
    torch.save(torch_refs.openai_clip(seed=3).state_dict(), model)
    rng = np.random.default_rng(0)
    gallery = tmp / "gallery"
    for i in range(12):
        name = f"cam{i % 2 + 1}/{i:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg" if i != 7 else "cam2/person 7 ü.png"
        (gallery / name).parent.mkdir(parents=True, exist_ok=True)
        _person(SIZES[i % len(SIZES)], rng).save(gallery / name)
    (gallery / "notes.txt").write_text("not an image: never indexed, never served\n")
    index = _index(model, gallery, tmp / "index")
    assert len(index) == 12 and index.has_text
    return index


@pytest.fixture(scope="module")
def reid_index(tmp_path_factory):
    """An image-only index (CLIP-ReID) whose gallery holds a symlink to an image outside it."""
    tmp = tmp_path_factory.mktemp("search_reid")
    model = tmp / "ViT-B-16_60.pth"
    torch_clip_reid.save(torch_clip_reid.build(seed=0), model)
    gallery, rng = tmp / "gallery", np.random.default_rng(1)
    gallery.mkdir()
    _person((64, 128), rng).save(gallery / "a.jpg")
    _person((64, 128), rng).save(tmp / "secret.jpg")
    (gallery / "link.jpg").symlink_to(tmp / "secret.jpg")
    index = _index(model, gallery, tmp / "index")
    assert not index.has_text and index.paths == ["a.jpg", "link.jpg"]  # the index follows the symlink
    return index


@pytest.fixture(scope="module")
def clip_server(clip_index):
    yield from _serve(clip_index)


@pytest.fixture(scope="module")
def reid_server(reid_index):
    yield from _serve(reid_index)


def _serve(index):
    server = serve.make_server(index, "127.0.0.1", 0, log=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def _request(server, method, path, body=None, headers=None):
    """(status, headers, body) of one request; `path` is sent exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _query(server, body, ctype, query=""):
    status, _, data = _request(server, "POST", "/api/query" + query, body, {"Content-Type": ctype})
    return status, json.loads(data)


def _expected(hits) -> list[dict]:
    return [{"rank": h.rank, "score": h.score, "path": h.path, "image": "/image/" + urllib.parse.quote(h.path),
             "thumb": "/thumb/" + urllib.parse.quote(h.path)} for h in hits]


def _thumb_size(w: int, h: int) -> tuple[int, int]:
    """The size a (w, h) image is shown at: shrunk to fit THUMB_SIZE, never enlarged (exact for SIZES)."""
    scale = min(1.0, serve.THUMB_SIZE[0] / w, serve.THUMB_SIZE[1] / h)
    return round(w * scale), round(h * scale)


# ------------------------------------------------------------------------------------------------ over HTTP
def test_queries_answer_what_the_index_answers(clip_server, clip_index):
    status, got = _query(clip_server, json.dumps({"text": TEXT, "top": 5}).encode(), "application/json")
    assert status == 200
    assert got["hits"] == _expected(clip_index.query(text=TEXT, top=5))
    probe = clip_index.root / clip_index.paths[3]
    status, got = _query(clip_server, probe.read_bytes(), "image/jpeg", "?top=12")
    assert status == 200
    want = clip_index.query(image=probe, top=12)
    assert got["hits"] == _expected(want) and want[0].path == clip_index.paths[3]  # the image finds itself first

    status, info = _request(clip_server, "GET", "/api/info")[::2]
    assert status == 200 and json.loads(info) == {"kind": "clip", "has_text": True, "count": 12, "root": "gallery",
                                                  "top": serve.TOP_DEFAULT, "top_max": serve.TOP_MAX}


@pytest.mark.parametrize("body, ctype, query, status, message", [
    (b'{"text": "  "}', "application/json", "", 400, "the text query is empty"),
    (b'["a man"]', "application/json", "", 400, "a text query is a JSON object"),
    (b'{"text": "a man", "top": 0}', "application/json", "", 400, "top must be a whole number from 1 to 200, got 0"),
    (b'{"text": "a man", "top": 2.5}', "application/json", "", 400, "top must be a whole number"),
    (b'{"text": "a man", "camid": -1}', "application/json", "", 400, "camera id must be a whole number >= 0"),
    (b"GIF89a broken", "image/gif", "", 400, "the upload is not an image Pillow can read"),
    (b"", "image/png", "", 400, "the upload is empty"),
    (b"\x89PNG", "image/png", "?top=many", 400, "top must be a whole number from 1 to 200, got 'many'"),
    (b"a man", "text/plain", "", 415, "a query is JSON text or an image, not Content-Type 'text/plain'"),
])
def test_bad_queries_are_4xx_with_a_message(clip_server, body, ctype, query, status, message):
    got_status, got = _query(clip_server, body, ctype, query)
    assert (got_status, list(got)) == (status, ["error"]) and message in got["error"], got


def test_a_text_query_to_an_image_only_model(reid_server):
    status, got = _query(reid_server, b'{"text": "a man"}', "application/json")
    assert status == 400 and "encodes images only: ask it with an image query" in got["error"], got


def test_an_upload_over_the_limit_is_413_unread(clip_server):
    conn = http.client.HTTPConnection(*clip_server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/query")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(serve.MAX_UPLOAD_BYTES + 1))
    conn.endheaders()  # no body follows: the server must answer without waiting for it
    response = conn.getresponse()
    got = json.loads(response.read())
    conn.close()
    assert response.status == 413
    assert got["error"] == "the upload is 20.0 MB, over the 20.0 MB limit: send a smaller image"


def _raw(server, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Sends `head` and `body` as they are, closes the sending side, returns (status, JSON answer)."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, answer = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(answer)


def test_a_body_without_length_or_cut_short(clip_server):
    status, got = _raw(clip_server, "POST /api/query HTTP/1.1\nHost: 127.0.0.1\nContent-Type: image/png\n", b"x")
    assert (status, got["error"]) == (411, "the upload has no valid Content-Length ('none')")
    status, got = _raw(clip_server, "POST /api/query HTTP/1.1\nHost: 127.0.0.1\nContent-Type: image/png\n"
                                    "Content-Length: 1000\n", b"\x89PNG\r\n\x1a\n")
    assert (status, got["error"]) == (400, "the upload ended after 8 of its 1000 bytes; send it again")


def test_only_listed_gallery_images_are_served(clip_server, clip_index):
    for rel in ("cam1/0000_c1s1_000000_00.jpg", "cam2/person 7 ü.png"):
        status, headers, body = _request(clip_server, "GET", "/image/" + urllib.parse.quote(rel))
        assert status == 200 and body == (clip_index.root / rel).read_bytes()
        assert headers["Content-Type"] == ("image/png" if rel.endswith(".png") else "image/jpeg")
        status, headers, body = _request(clip_server, "GET", "/thumb/" + urllib.parse.quote(rel))
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
    for i, rel in enumerate(clip_index.paths[:3]):  # 64x128, 200x400, 48x96
        status, _, body = _request(clip_server, "GET", "/thumb/" + urllib.parse.quote(rel))
        with Image.open(clip_index.root / rel) as full, Image.open(io.BytesIO(body)) as thumb:
            assert thumb.format == "JPEG" and thumb.size == _thumb_size(*full.size)
    outside = [
        "/image/../../../../etc/passwd", "/image/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/thumb/..%2f..%2fetc%2fpasswd",
        "/image//etc/passwd", "/image/%2Fetc%2Fpasswd",
        "/image/" + urllib.parse.quote(str(clip_index.root / clip_index.paths[0])),  # absolute, though inside
        "/image/cam1/../" + urllib.parse.quote(clip_index.paths[0]),  # not the listed spelling
        "/image/notes.txt", "/image/cam1", "/image/", "/image/%ff%fe", "/thumb/notes.txt",
        "/static/../serve.py", "/static/%2e%2e/serve.py", "/static/", "/../../etc/passwd", "/index.py",
    ]
    for path in outside:
        status, _, body = _request(clip_server, "GET", path)
        assert status == 404 and b"root:" not in body, path


def test_a_listed_symlink_out_of_the_gallery_is_404(reid_server, reid_index):
    assert "link.jpg" in reid_index.paths and (reid_index.root / "link.jpg").is_symlink()
    assert _request(reid_server, "GET", "/image/a.jpg")[0] == 200
    for path in ("/image/link.jpg", "/thumb/link.jpg"):
        assert _request(reid_server, "GET", path)[0] == 404, path


def test_page_headers_and_host_check(clip_server):
    status, headers, body = _request(clip_server, "GET", "/")
    assert status == 200 and b'<input id="text"' in body and "script-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "style.css"):
        assert _request(clip_server, "GET", f"/static/{name}")[0] == 200
    # a page elsewhere that rebinds its DNS name to 127.0.0.1 sends its own name as Host
    status, _, body = _request(clip_server, "GET", "/api/info", headers={"Host": "evil.example:8000"})
    assert status == 403 and "is not this machine" in json.loads(body)["error"]
    assert _request(clip_server, "GET", "/api/info", headers={"Host": "localhost:1"})[0] == 200


def test_the_command_starts_reports_and_stops_on_sigterm(clip_index, tmp_path):
    assert serve.main(str(tmp_path / "missing"), "127.0.0.1", 0) == 1  # the error is reported, not raised
    with serve.make_server(clip_index, "127.0.0.1", 0, log=False) as taken:
        with pytest.raises(UserError, match=rf"cannot listen on --host 127.0.0.1 --port {taken.server_port}"):
            serve.make_server(clip_index, "127.0.0.1", taken.server_port)
    cmd = [sys.executable, "-m", "reid_jax.search", "serve", "--index", str(clip_index.out), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line = proc.stdout.readline()
        assert "searching 12 images of" in line and "(clip, text and image queries) at http://127.0.0.1:" in line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/info")
        assert json.loads(conn.getresponse().read())["count"] == 12
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------ in a browser
@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("the search page's browser test needs headless Chromium: no Chromium/ChromeDriver installed "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # never downloads a driver
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait_for_results(driver, state="done"):
    from selenium.webdriver.support.ui import WebDriverWait

    results = driver.find_element("id", "results")
    WebDriverWait(driver, 60).until(lambda d: results.get_attribute("data-state") in ("done", "error"))
    assert results.get_attribute("data-state") == state, driver.find_element("id", "error").text
    # every thumbnail finished loading (complete) before it is read
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete)"))


def _grid(driver) -> list[dict]:
    """What the page shows: per card its rank, score, path, the two links and the thumbnail's loaded size."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results .hit')].map(card => {
          const img = card.querySelector('img');
          return {rank: Number(card.dataset.rank), score: Number(card.dataset.score), path: card.dataset.path,
                  image: card.querySelector('a').getAttribute('href'), thumb: img.getAttribute('src'),
                  shown: card.querySelector('figcaption').innerText.split('\\n').join(' '),
                  natural: [img.naturalWidth, img.naturalHeight]};
        });""")


def _check_grid(grid, hits, index):
    assert [{k: g[k] for k in ("rank", "score", "path", "image", "thumb")} for g in grid] == _expected(hits)
    for g, h in zip(grid, hits):
        assert g["shown"] == f"#{h.rank} {h.score:.3f} {h.path.split('/')[-1]}", g["shown"]
        with Image.open(index.root / h.path) as full:
            assert tuple(g["natural"]) == _thumb_size(*full.size), (g["path"], g["natural"])


def test_the_page_in_a_browser(browser, clip_server, clip_index, reid_server, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(clip_server.url)
    WebDriverWait(browser, 30).until(lambda d: "12 images in gallery" in d.find_element("id", "about").text)
    assert "model: clip · text and image queries" in browser.find_element("id", "about").text
    browser.find_element("id", "text").send_keys(TEXT)
    browser.find_element("id", "text-go").click()
    _wait_for_results(browser)
    _check_grid(_grid(browser), clip_index.query(text=TEXT, top=10), clip_index)
    assert browser.find_element("id", "status").text.startswith(f"10 results for “{TEXT}”")
    if SCREENSHOT:
        browser.get_screenshot_as_file(SCREENSHOT)

    Select(browser.find_element("id", "top")).select_by_visible_text("20")
    probe = clip_index.root / "cam2/person 7 ü.png"
    browser.find_element("id", "image").send_keys(str(probe))  # choosing a file runs the search
    _wait_for_results(browser)
    grid = _grid(browser)
    assert len(grid) == 12 and grid[0]["path"] == "cam2/person 7 ü.png"
    _check_grid(grid, clip_index.query(image=probe, top=20), clip_index)

    junk = tmp_path / "not an image.jpg"
    junk.write_bytes(b"\xff\xd8 this is no jpeg")
    browser.find_element("id", "image").send_keys(str(junk))
    _wait_for_results(browser, "error")
    assert "the upload is not an image Pillow can read" in browser.find_element("id", "error").text
    assert _grid(browser) == []

    browser.get(reid_server.url)  # an image-only model: the page says so and shows the server's refusal
    WebDriverWait(browser, 30).until(lambda d: "image queries only" in d.find_element("id", "about").text)
    browser.find_element("id", "text").send_keys("a man")
    browser.find_element("id", "text-go").click()
    _wait_for_results(browser, "error")
    error = browser.find_element("id", "error")
    assert error.is_displayed() and "encodes images only: ask it with an image query" in error.text
