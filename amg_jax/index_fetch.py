"""Fetch the training images of a memorized-prompt list into a folder ``amg index build`` reads.

A prompt list names each training image by URL:

- ``.jsonl``: one object a line with ``caption`` (or ``prompt``), ``url`` and optionally ``index``
  (Wen et al.'s ``examples/sdv1_500_memorized.jsonl``: ``{"caption", "index", "url"}``);
- ``.csv``: a header with ``caption`` (or ``prompt`` / ``text``) and ``url`` columns, optionally
  ``index``;
- any other file (one prompt a line) has no URLs and is refused.

``fetch_images`` downloads each URL (a few at once, timeouts, retries with exponential back-off on
the failures that can pass: timeouts, dropped connections, HTTP 429 / 5xx, waiting at least what a
``Retry-After`` asks; at most ``per_host`` downloads at once from one host), keeps the body only if
it decodes as a whole image, and writes ``DIR/<index>.<ext>`` (the server's bytes, unchanged; the
extension from the decoded format), ``DIR/captions.jsonl`` (``{"file", "caption"}`` lines, which
``amg index build DIR`` reads as they are) and ``DIR/fetch_report.json`` (every failure with its
URL and reason). An image is written to a temporary name and renamed once it has decoded, so an
interrupted run leaves no partial file, and a re-run requests only the images not on disk.

HTTP client: the standard library's ``urllib`` (redirects with loop detection, proxies from the
environment, HTTPS with the system's certificates) in a thread pool: a few hundred images are
I/O-bound, and this needs no new dependency. For LAION-scale lists use img2dataset.
"""
from __future__ import annotations

import csv
import dataclasses
import http.client
import io
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

REPORT = "fetch_report.json"
CAPTIONS = "captions.jsonl"
USER_AGENT = "amg_jax-index-fetch/1 (+https://github.com/; research reproduction of memorization benchmarks)"
# decoded format -> the extension written (every one is in index_build.IMAGE_EXTENSIONS)
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}
_CAPTION_KEYS = ("caption", "prompt", "text")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a prompt list: ``index`` names the file (``<index>.<ext>``)."""

    index: str
    caption: str
    url: str


class FetchError(Exception):
    """A download that failed; ``retry``: whether trying again may help; ``wait``: the seconds the
    server asked for before a retry (its ``Retry-After``), 0 if it did not."""

    def __init__(self, reason: str, retry: bool = False, wait: float = 0.0):
        super().__init__(reason)
        self.reason, self.retry, self.wait = reason, retry, wait


MAX_RETRY_AFTER = 120.0     # seconds: a longer Retry-After is cut to this


def _retry_after(value) -> float:
    """Seconds of a ``Retry-After`` header (delta-seconds or an HTTP date), 0 when absent / unreadable."""
    if not value:
        return 0.0
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except ValueError:
        pass
    try:
        import email.utils
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0
    return min(max(when - time.time(), 0.0), MAX_RETRY_AFTER)


class HostLimits:
    """At most ``per_host`` downloads at once from one host (``scheme://host:port``), whatever the
    number of workers: a prompt list often names one image host hundreds of times."""

    def __init__(self, per_host: int):
        self.per_host, self._lock, self._sems = per_host, threading.Lock(), {}

    def __call__(self, url: str) -> threading.Semaphore:
        parts = urllib.parse.urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}".lower()
        with self._lock:
            if key not in self._sems:
                self._sems[key] = threading.BoundedSemaphore(self.per_host)
            return self._sems[key]


# ----------------------------------------------------------------------------- prompt lists

def _entry(where: str, obj: dict, line: int, fail) -> Entry:
    caption = next((obj[k] for k in _CAPTION_KEYS if k in obj and obj[k] is not None), None)
    if not isinstance(caption, str) or not caption.strip():
        fail(f"{where} line {line}: no caption (a non-empty 'caption', 'prompt' or 'text' field)")
    url = obj.get("url")
    if not isinstance(url, str) or not url.strip():
        fail(f"{where} line {line}: no 'url' (amg index fetch downloads each prompt's training image from it)")
    url = url.strip()
    if not url.lower().startswith(("http://", "https://")):
        fail(f"{where} line {line}: url must be http:// or https://, got {url[:80]!r}")
    index = obj.get("index")
    index = str(line) if index is None or str(index).strip() == "" else str(index).strip()
    if not all(ch.isalnum() or ch in "-_." for ch in index) or index.startswith("."):
        fail(f"{where} line {line}: index {index!r} cannot name a file (letters, digits, '-', '_', '.')")
    return Entry(index, caption.strip(), url)


def read_prompt_list(path: str) -> list[Entry]:
    """The entries of a ``.jsonl`` or ``.csv`` prompt list with URLs (module docstring);
    ValueError naming the file and line for anything malformed, or for a list without URLs."""
    def fail(msg):
        raise ValueError(msg)

    where = f"index fetch: {path}"
    if not os.path.isfile(path):
        fail(f"{where} does not exist")
    low = path.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is unreadable: {e}") from None
    out = []
    if low.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} line {n} is not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                fail(f"{where} line {n}: expected an object {{\"caption\", \"url\", \"index\"}}, got {line[:80]}")
            out.append(_entry(where, obj, n, fail))
    elif low.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        cols = set(reader.fieldnames or ())
        if "url" not in cols or not cols & set(_CAPTION_KEYS):
            fail(f"{where}: needs a 'url' column and a 'caption' (or 'prompt' / 'text') column, "
                 f"got {reader.fieldnames}")
        for n, row in enumerate(reader, 2):
            out.append(_entry(where, row, n, fail))
    else:
        fail(f"{where}: a plain list of prompts has no image URLs, so there is nothing to fetch; give a .jsonl "
             "with 'caption' and 'url' per line (e.g. Wen et al.'s sdv1_500_memorized.jsonl) or a .csv with "
             "caption and url columns")
    if not out:
        fail(f"{where} has no entries")
    seen: dict[str, int] = {}
    for i, e in enumerate(out):
        if e.index in seen:
            fail(f"{where}: index {e.index!r} appears twice (entries {seen[e.index] + 1} and {i + 1}); "
                 "each names a file")
        seen[e.index] = i
    return out


# ----------------------------------------------------------------------------- one download

def _read_body(resp, deadline: float, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        chunk = resp.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchError("download took longer than the deadline", retry=True)
        chunks.append(chunk)


def decode_check(data: bytes) -> str:
    """The extension for image bytes ``data`` that decode in full; FetchError saying why not."""
    if not data:
        raise FetchError("empty response")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()                              # decodes every pixel: a truncated file fails here
    except UnidentifiedImageError:
        head = data[:256].lstrip().lower()
        kind = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head else "no image"
        raise FetchError(f"not an image: the body is {kind} ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FetchError(f"undecodable image: {e}") from None
    if fmt not in FORMATS:
        raise FetchError(f"image format {fmt} is not one amg index build reads")
    return FORMATS[fmt]


def download(url: str, *, timeout: float, deadline: float, max_bytes: int) -> tuple[bytes, str]:
    """(body, extension) of the image at ``url``; FetchError (with ``retry``) otherwise.
    ``timeout``: seconds a connect or a read may stall; ``deadline``: seconds for the whole body."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
    end = time.monotonic() + deadline
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            data = _read_body(resp, end, max_bytes)
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise FetchError(f"redirect loop or too many redirects (HTTP {e.code})") from None
        raise FetchError(f"HTTP {e.code} {e.reason}", retry=e.code == 429 or e.code >= 500,
                         wait=_retry_after(e.headers.get("Retry-After") if e.headers else None)) from None
    except urllib.error.URLError as e:
        r = e.reason
        if isinstance(r, (socket.timeout, TimeoutError)):
            raise FetchError(f"timed out after {timeout:g} s", retry=True) from None
        raise FetchError(f"connection failed: {r}", retry=not isinstance(r, socket.gaierror)) from None
    except (socket.timeout, TimeoutError):
        raise FetchError(f"timed out after {timeout:g} s (no data)", retry=True) from None
    except (http.client.HTTPException, ConnectionError, OSError) as e:
        raise FetchError(f"connection broke: {type(e).__name__}: {e}", retry=True) from None
    try:
        ext = decode_check(data)
    except FetchError as e:
        if ctype.startswith("text/html") and not e.reason.startswith("not an image"):
            raise FetchError(f"not an image: Content-Type {ctype}") from None
        raise
    return data, ext


# ----------------------------------------------------------------------------- the folder

def existing_file(out: str, index: str) -> str | None:
    """The image already fetched for ``index`` in ``out`` (a file name), or None."""
    for ext in sorted(set(FORMATS.values())):
        name = f"{index}.{ext}"
        if os.path.isfile(os.path.join(out, name)):
            return name
    return None


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.part-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_captions(out: str, entries: Sequence[Entry]) -> int:
    """``out/captions.jsonl`` for every entry whose image is in ``out`` (list order); the count."""
    lines = []
    for e in entries:
        name = existing_file(out, e.index)
        if name is not None:
            lines.append(json.dumps({"file": name, "caption": e.caption, "url": e.url}, ensure_ascii=False))
    _write_atomic(os.path.join(out, CAPTIONS), ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
    return len(lines)


def fetch_one(e: Entry, out: str, *, timeout: float, deadline: float, retries: int, backoff: float,
              max_bytes: int, sleep: Callable[[float], None] = time.sleep, host_limit=None) -> dict:
    """Download ``e`` into ``out`` with up to ``retries`` retries (exponential back-off with jitter, or
    the server's ``Retry-After`` when longer); a result row for the report. ``host_limit``: a
    ``HostLimits`` (the host's slot is held while downloading, not while waiting to retry)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            slot = host_limit(e.url) if host_limit is not None else None
            if slot is not None:
                slot.acquire()
            try:
                data, ext = download(e.url, timeout=timeout, deadline=deadline, max_bytes=max_bytes)
            finally:
                if slot is not None:
                    slot.release()
        except FetchError as err:
            if err.retry and attempt <= retries:
                sleep(max(backoff * 2 ** (attempt - 1) * (1.0 + 0.25 * random.random()), err.wait))
                continue
            return {"index": e.index, "url": e.url, "ok": False, "reason": err.reason, "attempts": attempt}
        name = f"{e.index}.{ext}"
        _write_atomic(os.path.join(out, name), data)
        return {"index": e.index, "url": e.url, "ok": True, "file": name, "bytes": len(data), "attempts": attempt}


def fetch_images(prompts: str, out: str, *, workers: int = 8, per_host: int = 2, timeout: float = 10.0,
                 deadline: float = 60.0, retries: int = 3, backoff: float = 1.0, max_bytes: int = 64 << 20,
                 progress: bool = True, echo=print) -> dict:
    """Fetch the images of prompt list ``prompts`` into folder ``out`` (module docstring): the
    images not there yet, then ``captions.jsonl`` and ``fetch_report.json``. Returns the report.
    ``workers`` downloads at once, at most ``per_host`` of them from one host."""
    for name, v, lo in (("workers", workers, 1), ("per_host", per_host, 1), ("retries", retries, 0),
                        ("max_bytes", max_bytes, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"index fetch: {name} must be an integer >= {lo}, got {v!r}")
    for name, v in (("timeout", timeout), ("deadline", deadline), ("backoff", backoff)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf") or (
                name != "backoff" and v == 0):
            raise ValueError(f"index fetch: {name} must be a finite number of seconds > 0, got {v!r}")
    entries = read_prompt_list(prompts)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"index fetch: --out {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):                       # a killed run's unfinished downloads
        if ".part-" in name:
            os.remove(os.path.join(out, name))
    have = {e.index: existing_file(out, e.index) for e in entries}
    todo = [e for e in entries if have[e.index] is None]
    echo(f"index fetch: {len(entries)} entries in {prompts}; {len(entries) - len(todo)} already in {out}, "
         f"fetching {len(todo)} ({workers} at once, {per_host} per host)")
    t0 = time.time()
    rows: list[dict] = []
    bar = tqdm(total=len(todo), desc="index fetch", unit="img", disable=not progress or not todo)
    kw = dict(timeout=float(timeout), deadline=float(deadline), retries=retries, backoff=float(backoff),
              max_bytes=max_bytes)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        limits = HostLimits(per_host)
        futures = [pool.submit(fetch_one, e, out, host_limit=limits, **kw) for e in todo]
        for fut in as_completed(futures):
            rows.append(fut.result())
            bar.update(1)
            bar.set_postfix(failed=sum(not r["ok"] for r in rows), refresh=False)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)   # on Ctrl-C: no new requests; running ones end alone
        bar.close()
        n_captions = write_captions(out, entries)      # also after an interrupt: what is on disk is kept
    order = {e.index: i for i, e in enumerate(entries)}
    failed = sorted((r for r in rows if not r["ok"]), key=lambda r: order[r["index"]])
    report = {"prompts": os.path.abspath(prompts), "entries": len(entries),
              "already_present": len(entries) - len(todo), "requested": len(todo),
              "fetched": sum(r["ok"] for r in rows), "failed": len(failed), "images": n_captions,
              "seconds": round(time.time() - t0, 3),
              "settings": {"workers": workers, "per_host": per_host, **kw},
              "failures": [{k: r[k] for k in ("index", "url", "reason", "attempts")} for r in failed]}
    _write_atomic(os.path.join(out, REPORT), (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
    return report


__all__ = ["CAPTIONS", "Entry", "FetchError", "REPORT", "decode_check", "download", "existing_file", "fetch_images",
           "fetch_one", "read_prompt_list", "write_captions"]
