"""`amg index fetch` against a web server on 127.0.0.1 the test starts: good images kept with their
captions; a 404, an HTML page, a truncated image, a redirect loop and a stalled response reported
by URL; bounded time; a re-run requests nothing it has; an interrupted run resumes."""
import collections
import http.server
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from amg_jax import index_fetch
from amg_jax.index_build import list_images, load_captions, read_captions
from amg_jax.index_fetch import fetch_images, read_prompt_list
from cli_checks import assert_clean_error, run_cli

STALL_S = 30.0      # the stalling route sleeps this long; the fetch's timeout is far shorter


def _image(fmt: str, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


JPEG, PNG = _image("JPEG", 0), _image("PNG", 1)
ROUTES = {
    "/a.jpg": (200, "image/jpeg", JPEG),
    "/b.png": (200, "image/png", PNG),
    "/c": (200, "application/octet-stream", _image("JPEG", 2)),       # no extension, a wrong type: still an image
    "/missing.jpg": (404, "text/plain", b"not found"),
    "/page.jpg": (200, "text/html", b"<!DOCTYPE html><html><body>This image is gone</body></html>"),
    "/trunc.jpg": (200, "image/jpeg", JPEG[: len(JPEG) // 2]),
}


class Server:
    def __init__(self):
        self.hits = collections.Counter()
        self.flaky_left = self.busy_left = 1
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.hits[self.path] += 1
                if self.path == "/stall.jpg":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(JPEG)))
                    self.end_headers()
                    self.wfile.flush()
                    time.sleep(STALL_S)
                    return
                if self.path == "/loop.jpg":
                    self.send_response(302)
                    self.send_header("Location", "/loop.jpg")
                    self.end_headers()
                    return
                if self.path.startswith("/slow/"):         # counts the downloads at once
                    with owner.lock:
                        owner.in_flight += 1
                        owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                    time.sleep(0.2)
                    with owner.lock:
                        owner.in_flight -= 1
                if self.path == "/busy.png" and owner.busy_left > 0:
                    owner.busy_left -= 1
                    self.send_response(429)
                    self.send_header("Retry-After", "1")
                    self.end_headers()
                    return
                if self.path == "/flaky.png":
                    if owner.flaky_left > 0:
                        owner.flaky_left -= 1
                        self.send_response(503)
                        self.end_headers()
                        return
                    code, ctype, body = 200, "image/png", PNG
                elif self.path.startswith("/slow/") or self.path == "/busy.png":
                    code, ctype, body = 200, "image/png", PNG
                else:
                    code, ctype, body = ROUTES.get(self.path, (404, "text/plain", b"no such route"))
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


GOOD = {"1": "/a.jpg", "2": "/b.png", "3": "/c", "9": "/flaky.png"}
BAD = {"4": ("/missing.jpg", "HTTP 404"), "5": ("/page.jpg", "not an image"), "6": ("/trunc.jpg", "undecodable"),
       "7": ("/stall.jpg", "timed out"), "8": ("/loop.jpg", "redirect")}


def _write_list(path, server, routes):
    with open(path, "w") as f:
        for idx, route in routes.items():
            f.write(json.dumps({"caption": f"caption number {idx}", "index": int(idx), "url": server.url + route}) + "\n")
    return str(path)


FAST = dict(workers=3, timeout=0.5, deadline=5.0, retries=1, backoff=0.01, progress=False)


def test_fetch_keeps_good_images_reports_failures_and_resumes(tmp_path, server):
    routes = {**GOOD, **{k: v[0] for k, v in BAD.items()}}
    prompts = _write_list(tmp_path / "mem.jsonl", server, routes)
    out = str(tmp_path / "imgs")
    t0 = time.monotonic()
    report = fetch_images(prompts, out, echo=lambda *_: None, **FAST)
    elapsed = time.monotonic() - t0
    # bounded: the stalled route is given up after (retries + 1) read timeouts, not STALL_S
    assert elapsed < STALL_S / 2, elapsed
    assert report["fetched"] == len(GOOD) and report["failed"] == len(BAD) and report["images"] == len(GOOD)
    assert sorted(list_images(out)) == ["1.jpg", "2.png", "3.jpg", "9.png"]
    with open(os.path.join(out, "1.jpg"), "rb") as f:
        assert f.read() == JPEG                              # the server's bytes, unchanged
    on_disk = json.load(open(os.path.join(out, "fetch_report.json")))
    assert on_disk["failed"] == len(BAD)
    by_index = {f["index"]: f for f in on_disk["failures"]}
    for idx, (route, reason) in BAD.items():
        assert by_index[idx]["url"] == server.url + route
        assert reason in by_index[idx]["reason"], by_index[idx]
    assert by_index["7"]["attempts"] == 2 and by_index["4"]["attempts"] == 1   # timeouts retried, a 404 not
    assert server.hits["/flaky.png"] == 2                    # a 503, then the image
    # what index build reads: every kept image with its caption
    files = list_images(out)
    assert read_captions(out, files) == [f"caption number {os.path.splitext(f)[0]}" for f in files]

    # a re-run requests none of the images it has, only the failures again
    before = collections.Counter(server.hits)
    report2 = fetch_images(prompts, out, echo=lambda *_: None, **FAST)
    assert report2["already_present"] == len(GOOD) and report2["requested"] == len(BAD)
    for route in GOOD.values():
        assert server.hits[route] == before[route], route
    assert server.hits["/missing.jpg"] == before["/missing.jpg"] + 1


def test_downloads_per_host_are_limited(tmp_path, server):
    """6 workers, one host: at most ``per_host`` requests are in flight at once (the server counts);
    with ``per_host=6`` more are, so the count can tell."""
    prompts = _write_list(tmp_path / "mem.jsonl", server, {str(i): f"/slow/{i}.png" for i in range(6)})
    report = fetch_images(prompts, str(tmp_path / "a"), echo=lambda *_: None, **{**FAST, "workers": 6, "per_host": 2})
    assert report["fetched"] == 6 and report["settings"]["per_host"] == 2
    assert server.max_in_flight == 2
    server.max_in_flight = 0
    fetch_images(prompts, str(tmp_path / "b"), echo=lambda *_: None, **{**FAST, "workers": 6, "per_host": 6})
    assert server.max_in_flight > 2
    with pytest.raises(ValueError, match="per_host must be an integer >= 1"):
        fetch_images(prompts, str(tmp_path / "c"), echo=lambda *_: None, **{**FAST, "per_host": 0})


def test_retry_after_is_honoured(tmp_path, server):
    """An HTTP 429 with ``Retry-After: 1`` is retried after at least 1 s, not after the 0.01 s back-off."""
    waits = []
    e = index_fetch.Entry(index="1", caption="c", url=server.url + "/busy.png")
    row = index_fetch.fetch_one(e, str(tmp_path), timeout=0.5, deadline=5.0, retries=2, backoff=0.01,
                                max_bytes=1 << 20, sleep=waits.append)
    assert row["ok"] and row["attempts"] == 2 and waits == [1.0]
    assert index_fetch._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0     # a date in the past
    assert index_fetch._retry_after("99999") == index_fetch.MAX_RETRY_AFTER
    assert index_fetch._retry_after("soon") == 0.0


def test_an_interrupted_run_resumes(tmp_path, server, monkeypatch):
    prompts = _write_list(tmp_path / "mem.jsonl", server, {"1": "/a.jpg", "2": "/b.png", "3": "/c"})
    out = tmp_path / "imgs"
    out.mkdir()
    (out / "2.png.part-1-2").write_bytes(PNG[:10])           # a killed run's unfinished download
    real, calls, running = index_fetch.fetch_one, [], []

    def interrupt_second(e, *a, **kw):
        calls.append(e.index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        running.append(e.index)
        try:
            return real(e, *a, **kw)
        finally:
            running.remove(e.index)

    monkeypatch.setattr(index_fetch, "fetch_one", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        fetch_images(prompts, str(out), echo=lambda *_: None, **{**FAST, "workers": 1})
    # the pool's thread may have started entry 3 before the interrupt reached the main thread; a
    # running download ends alone (no new ones start), so wait for it before looking at the folder
    t0 = time.time()
    while running and time.time() - t0 < 20:
        time.sleep(0.01)
    assert not running
    monkeypatch.setattr(index_fetch, "fetch_one", real)
    kept = list_images(str(out))
    assert "1.jpg" in kept and "2.png" not in kept           # the worker may have started 3 before the interrupt
    # the captions are written on the way out, for what is on disk
    written = [json.loads(line)["file"] for line in open(out / "captions.jsonl")]
    assert written == kept or written == ["1.jpg"]       # 3 may have landed after the captions were written
    report = fetch_images(prompts, str(out), echo=lambda *_: None, **FAST)
    assert report["already_present"] == len(kept) and report["fetched"] == 3 - len(kept)
    assert server.hits["/a.jpg"] == 1
    assert sorted(list_images(str(out))) == ["1.jpg", "2.png", "3.jpg"]
    assert not [n for n in os.listdir(out) if ".part-" in n]


def test_prompt_lists(tmp_path):
    csv_path = tmp_path / "mem.csv"
    csv_path.write_text('caption,url\n"a, quoted caption",http://127.0.0.1:1/x.jpg\nplain,https://127.0.0.1:1/y\n')
    entries = read_prompt_list(str(csv_path))
    assert [(e.index, e.caption) for e in entries] == [("2", "a, quoted caption"), ("3", "plain")]
    txt = tmp_path / "prompts.txt"
    txt.write_text("a prompt\n")
    with pytest.raises(ValueError, match="plain list of prompts has no image URLs"):
        read_prompt_list(str(txt))
    bad = tmp_path / "bad.jsonl"
    for text, message in (('{"caption": "x"}', "line 1: no 'url'"),
                          ('{"caption": "x", "url": "ftp://h/x"}', "http:// or https://"),
                          ('{"caption": "x", "url": "http://h/x", "index": "../up"}', "cannot name a file"),
                          ('{"url": "http://h/x"}', "no caption"),
                          ('{"caption": "x", "url": "http://h/1", "index": 3}\n{"caption": "y", "url": "http://h/2", '
                           '"index": 3}', "index '3' appears twice"),
                          ("not json", "not valid JSON")):
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            read_prompt_list(str(bad))
    nourl = tmp_path / "nourl.csv"
    nourl.write_text("caption\nx\n")
    with pytest.raises(ValueError, match="needs a 'url' column"):
        read_prompt_list(str(nourl))


def test_cli_fetch_then_build(tmp_path, server, capsys):
    prompts = _write_list(tmp_path / "mem.jsonl", server, {"1": "/a.jpg", "2": "/b.png", "4": "/missing.jpg"})
    out = tmp_path / "imgs"
    code, err = run_cli(["index", "fetch", prompts, "--out", str(out), "--timeout", "2", "--no-progress"], capsys)
    assert code == 0, err
    bank = tmp_path / "bank.npz"
    code, err = run_cli(["index", "build", str(out), "--out", str(bank), "--size", "8", "8", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(load_captions(str(bank))) == ["caption number 1", "caption number 2"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("a prompt\n")
    assert_clean_error(*run_cli(["index", "fetch", str(txt), "--out", str(tmp_path / "o")], capsys), "no image URLs")
    assert_clean_error(*run_cli(["index", "fetch", prompts, "--out", str(tmp_path / "o"), "--retries", "-1"], capsys),
                       "--retries")


def test_the_suite_reaches_no_network_beyond_loopback():
    """conftest's guard: a connection anywhere but 127.0.0.1 fails at once, naming the address."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(ConnectionRefusedError, match="beyond 127.0.0.1"):
            s.connect(("93.184.216.34", 80))
    finally:
        s.close()
