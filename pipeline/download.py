"""Download images over HTTP(S) into a content-addressed cache, safely and in parallel.

`ImageDownloader.fetch_many(urls)` returns, per URL, `Downloaded` (the cached file) or
`DownloadFailed` (a reason a person can act on). Per URL:

- only http/https; a `requests.Session` with (connect, read) timeouts and a total deadline;
- retries with exponential backoff and jitter for connection errors, timeouts, 429 and 5xx
  (a `Retry-After` of up to `max_backoff_s` is honoured); other answers fail at once;
- the Content-Type must be an allowed image type; the body may not exceed `max_bytes`
  (checked against Content-Length first, then while streaming);
- the bytes must be an image Pillow can verify and fully decode, with at most
  `max_pixels` pixels (decompression-bomb guard, checked before decoding);
- the file is written atomically (temp file + rename) to `objects/<sha256[:2]>/<sha256>`,
  and a small ref file maps the URL to it, so an interrupted run resumes where it stopped
  and identical images are stored once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlparse

import requests
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    deadline_s: float = Field(120.0, gt=0)  # one attempt, headers to last byte
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    allowed_content_types: tuple[str, ...] = ("image/jpeg", "image/png", "image/webp")
    workers: int = Field(8, ge=1)
    user_agent: str = "okedit/0.1 (+https://github.com/okedit)"


@dataclass(frozen=True)
class Downloaded:
    url: str
    sha256: str
    path: Path
    cached: bool  # True when no request was needed

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass(frozen=True)
class DownloadFailed:
    url: str
    reason: str


DownloadResult = Downloaded | DownloadFailed


class _Retryable(Exception):
    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.reason, self.wait_s = reason, wait_s


class _Fatal(Exception):
    pass


# --------------------------------------------------------------------------- checks


def check_url(url: str) -> str | None:
    """None if the URL may be fetched, else why not."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return f"unsupported URL scheme {parsed.scheme or '(none)'!r}: only http and https"
    if not parsed.netloc:
        return "URL has no host"
    return None


def image_problem(data: bytes, max_pixels: int) -> str | None:
    """None if `data` is a complete, sane image, else the reason."""
    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return f"image too large: {width}x{height} px > {max_pixels} px (bomb guard)"
                img.verify()
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # verify() does not decode; a truncated JPEG fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"image too large (bomb guard): {exc}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a valid image: {type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- cache


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _holds(path: Path, sha: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha
    except OSError:
        return False


class ContentCache:
    """objects/<sha[:2]>/<sha> + refs/<sha(url)[:2]>/<sha(url)>.json."""

    def __init__(self, root: Path):
        self.root = root

    def object_path(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha

    def ref_path(self, url: str) -> Path:
        key = hashlib.sha256(url.encode()).hexdigest()
        return self.root / "refs" / key[:2] / f"{key}.json"

    def lookup(self, url: str) -> Downloaded | None:
        """The cached file for `url` if its ref and an intact object exist."""
        try:
            ref = json.loads(self.ref_path(url).read_text())
            path = self.object_path(ref["sha256"])
            data = path.read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            return None
        return Downloaded(url=url, sha256=ref["sha256"], path=path, cached=True)

    def store(self, url: str, data: bytes, content_type: str) -> Downloaded:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not _holds(path, sha):
            _atomic_write(path, data)
        ref = {"url": url, "sha256": sha, "bytes": len(data), "content_type": content_type}
        _atomic_write(self.ref_path(url), json.dumps(ref, sort_keys=True).encode())
        return Downloaded(url=url, sha256=sha, path=path, cached=False)


# --------------------------------------------------------------------------- downloader


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class ImageDownloader:
    def __init__(self, cache_dir: Path, config: DownloadConfig | None = None):
        self.config = config or DownloadConfig()
        self.cache = ContentCache(cache_dir)
        self._local = threading.local()
        self.requests_sent = 0
        self._count_lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.config.user_agent
            session.max_redirects = 5
            self._local.session = session
        return session

    def fetch_many(self, urls: list[str]) -> dict[str, DownloadResult]:
        unique = list(dict.fromkeys(urls))
        with ThreadPoolExecutor(max_workers=self.config.workers) as pool:
            return dict(zip(unique, pool.map(self.fetch, unique), strict=True))

    def fetch(self, url: str) -> DownloadResult:
        problem = check_url(url)
        if problem:
            return DownloadFailed(url, problem)
        hit = self.cache.lookup(url)
        if hit is not None:
            return hit
        last = "no attempt made"
        for attempt in range(1 + self.config.retries):
            try:
                data, content_type = self._get(url)
            except _Retryable as exc:
                last = exc.reason
                if attempt < self.config.retries:
                    time.sleep(self._backoff(attempt, exc.wait_s))
                continue
            except _Fatal as exc:
                return DownloadFailed(url, str(exc))
            problem = image_problem(data, self.config.max_pixels)
            if problem:
                return DownloadFailed(url, problem)
            return self.cache.store(url, data, content_type)
        return DownloadFailed(url, f"{last} (after {1 + self.config.retries} attempts)")

    def _backoff(self, attempt: int, server_wait: float | None) -> float:
        cap = self.config.max_backoff_s
        if server_wait is not None:
            return min(server_wait, cap)
        return min(cap, self.config.backoff_s * (2**attempt)) * (0.5 + random.random() / 2)

    def _get(self, url: str) -> tuple[bytes, str]:
        cfg = self.config
        with self._count_lock:
            self.requests_sent += 1
        try:
            with self._session().get(
                url, stream=True, timeout=(cfg.connect_timeout_s, cfg.read_timeout_s)
            ) as response:
                self._check_response(response)
                return self._read_body(response), response.headers.get("Content-Type", "")
        except requests.Timeout as exc:
            raise _Retryable(f"timed out ({type(exc).__name__})") from None
        except requests.ConnectionError as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__})") from None
        except requests.TooManyRedirects:
            raise _Fatal("too many redirects") from None
        except requests.RequestException as exc:
            raise _Retryable(f"transfer failed ({type(exc).__name__})") from None

    def _check_response(self, response: requests.Response) -> None:
        cfg = self.config
        status = response.status_code
        if status in RETRY_STATUSES:
            raise _Retryable(f"HTTP {status}", _retry_after(response.headers.get("Retry-After")))
        if status != 200:
            raise _Fatal(f"HTTP {status}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in cfg.allowed_content_types:
            raise _Fatal(f"content-type {content_type or '(none)'!r} is not an allowed image type")
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > cfg.max_bytes:
            raise _Fatal(f"too large: Content-Length {length} > {cfg.max_bytes} bytes")

    def _read_body(self, response: requests.Response) -> bytes:
        cfg = self.config
        started = time.monotonic()
        buf = bytearray()
        for chunk in response.iter_content(chunk_size=64 * 1024):
            buf.extend(chunk)
            if len(buf) > cfg.max_bytes:
                raise _Fatal(f"too large: body exceeds {cfg.max_bytes} bytes")
            if time.monotonic() - started > cfg.deadline_s:
                raise _Retryable(f"slower than the {cfg.deadline_s:g} s deadline")
        return bytes(buf)
