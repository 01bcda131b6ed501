"""Load a web document's images safely: every failure is a value, never an exception.

Where an image comes from decides what can go wrong:

- a local path must stay inside the document root: the path is normalised
  (`..` escapes) and resolved (symlinks) and both must lie under the root, or
  the file is never opened (`path_escape`);
- an http(s) URL is fetched with a per-attempt timeout and a wall-clock
  deadline (a server that trickles bytes cannot hold a worker), retries with
  exponential backoff on timeouts, connection errors, 5xx and 429, a byte cap
  checked on Content-Length and again while streaming, and a Content-Type check;
- a data: URI is decoded only below a size cap; any other scheme is refused.

Decoding reads the header first (PIL's `Image.open` is lazy) and refuses an
image whose width x height exceeds `max_pixels` before a single pixel is
decoded (`decompression_bomb`), then decodes fully so truncated or corrupt
files fail here (`image_undecodable`), not in the trainer. PIL's own bomb
check (2x Image.MAX_IMAGE_PIXELS) maps to the same reason.

Reason codes: ok, no_source, no_root, unsupported_scheme, path_escape,
image_missing, not_a_file, empty_image, too_large, fetch_timeout, fetch_error,
http_error, bad_content_type, data_uri_too_large, data_uri_invalid,
decompression_bomb, unsupported_format, image_undecodable, internal_error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from weft.stages.base import Outcome, Resources, Stage, StageConfig

REASONS = (
    "ok", "no_source", "no_root", "unsupported_scheme", "path_escape", "image_missing",
    "not_a_file", "empty_image", "too_large", "fetch_timeout", "fetch_error", "http_error",
    "bad_content_type", "data_uri_too_large", "data_uri_invalid", "decompression_bomb",
    "unsupported_format", "image_undecodable", "internal_error",
)
RETRYABLE = frozenset({"fetch_timeout", "fetch_error", "http_error_retryable"})


class ImageFetchConfig(BaseModel):
    """Limits for loading one image; the defaults suit training data, not archiving."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(10.0, gt=0, description="connect/read/write timeout per attempt")
    deadline_s: float = Field(30.0, gt=0, description="wall-clock cap on one attempt")
    retries: int = Field(2, ge=0, description="extra attempts after a retryable failure")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="encoded size cap")
    max_pixels: int = Field(50_000_000, gt=0, description="width x height cap, from the header")
    max_data_uri_chars: int = Field(1_000_000, gt=0, description="longer data: URIs are refused")
    content_types: tuple[str, ...] = Field(
        ("image/", "application/octet-stream"),
        description="accepted Content-Type prefixes for http(s) responses")
    allow_missing_content_type: bool = True
    max_redirects: int = Field(3, ge=0)
    prefer_local: bool = Field(True, description="an item with a path and a url uses the path")
    user_agent: str = "weft-image-fetch/1"


@dataclass
class ImageResult:
    """One image's outcome. `data` holds the encoded bytes only when reason == "ok"."""

    src: str | None
    reason: str
    message: str = ""
    origin: str | None = None  # "path" | "url" | "data"
    data: bytes | None = field(default=None, repr=False)
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None
    sha256: str | None = None
    n_bytes: int | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.reason == "ok"

    def to_row(self) -> dict[str, Any]:
        """Everything but the bytes (what the ledger and the status column keep)."""
        return {k: getattr(self, k) for k in (
            "src", "reason", "message", "origin", "width", "height", "format", "mode",
            "sha256", "n_bytes", "attempts")}


class _Failure(Exception):
    """Internal: a failure on its way to becoming an ImageResult."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.attempts: int | None = None


# ---- decoding ---------------------------------------------------------------------
def _looks_like_svg(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096])


def decode_image(data: bytes, max_pixels: int) -> tuple[int, int, str, str]:
    """(width, height, format, mode) after a full decode; raises _Failure otherwise."""
    if not data:
        raise _Failure("empty_image", "0 bytes")
    if _looks_like_svg(data):
        raise _Failure("unsupported_format", "SVG is a vector format; it is not rasterised here")
    with warnings.catch_warnings():
        # Our own cap comes first; PIL's warning between 1x and 2x its limit is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as exc:
            raise _Failure("decompression_bomb", f"header: {exc}") from exc
        except Exception as exc:
            raise _Failure("image_undecodable", f"not a readable image: "
                           f"{type(exc).__name__}: {exc}") from exc
        with im:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise _Failure("image_undecodable", f"header claims {width}x{height}")
            if width * height > max_pixels:
                raise _Failure("decompression_bomb", f"header claims {width}x{height} = "
                               f"{width * height} pixels, the cap is {max_pixels}")
            fmt, mode = im.format or "unknown", im.mode
            try:
                im.load()
            except Image.DecompressionBombError as exc:
                raise _Failure("decompression_bomb", str(exc)) from exc
            except Exception as exc:  # truncated data, bad CRC, broken Huffman tables ...
                raise _Failure("image_undecodable", f"{fmt} {width}x{height} does not decode: "
                               f"{type(exc).__name__}: {exc}") from exc
    return width, height, fmt, mode


# ---- local files ---------------------------------------------------------------------
def confine(path: str | Path, root: str | Path) -> Path:
    """The real path of `path` if it stays inside `root`, else _Failure("path_escape").

    Checks the normalised path (catches `..`) and the resolved one (catches symlinks
    that point out); a relative path is taken relative to the root.
    """
    root_abs = Path(os.path.normpath(os.path.abspath(root)))
    root_real = Path(os.path.realpath(root))
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root_abs / candidate
    lexical = Path(os.path.normpath(candidate))
    if not (lexical.is_relative_to(root_abs) or lexical.is_relative_to(root_real)):
        raise _Failure("path_escape", f"{path} lies outside the document root {root_abs}")
    real = Path(os.path.realpath(lexical))
    if not real.is_relative_to(root_real):
        raise _Failure("path_escape", f"{path} resolves (through a symlink) to {real}, "
                       f"outside the document root {root_real}")
    return real


def read_local(path: str | Path, root: str | Path, max_bytes: int) -> bytes:
    """A confined local file's bytes (at most max_bytes); raises _Failure."""
    real = confine(path, root)
    try:
        st = os.stat(real)
    except FileNotFoundError as exc:
        raise _Failure("image_missing", f"{path} does not exist") from exc
    except OSError as exc:
        raise _Failure("image_missing", f"cannot stat {path}: {exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _Failure("not_a_file", f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise _Failure("too_large", f"{path} has {st.st_size} bytes, the cap is {max_bytes}")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise _Failure("image_missing", f"cannot read {path}: {exc}") from exc
    if len(data) > max_bytes:
        raise _Failure("too_large", f"{path} grew past the cap of {max_bytes} bytes")
    return data


# ---- data: URIs ------------------------------------------------------------------------
def read_data_uri(uri: str, config: ImageFetchConfig) -> bytes:
    """The bytes of a data: URI of an image type, under the size cap; raises _Failure."""
    if len(uri) > config.max_data_uri_chars:
        raise _Failure("data_uri_too_large", f"data: URI has {len(uri)} characters, the cap "
                       f"is {config.max_data_uri_chars}")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise _Failure("data_uri_invalid", "data: URI has no comma")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0] or "text/plain"
    if not media.startswith("image/"):
        raise _Failure("bad_content_type", f"data: URI holds {media}, not an image")
    try:
        if "base64" in params[1:]:
            data = base64.b64decode("".join(payload.split()), validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise _Failure("data_uri_invalid", f"data: URI payload does not decode: {exc}") from exc
    if len(data) > config.max_bytes:
        raise _Failure("too_large", f"data: URI holds {len(data)} bytes, the cap is "
                       f"{config.max_bytes}")
    return data


# ---- http(s) ---------------------------------------------------------------------------
def make_client(config: ImageFetchConfig) -> httpx.Client:
    """An httpx client with the config's timeouts and redirect limit (http(s) only)."""
    return httpx.Client(timeout=httpx.Timeout(config.timeout_s), follow_redirects=True,
                        max_redirects=config.max_redirects, trust_env=False,
                        headers={"User-Agent": config.user_agent, "Accept": "image/*"})


def _fetch_once(client: httpx.Client, url: str, config: ImageFetchConfig) -> bytes:
    deadline = time.monotonic() + config.deadline_s
    try:
        with client.stream("GET", url) as resp:
            if resp.status_code >= 400:
                retry = resp.status_code >= 500 or resp.status_code == 429
                raise _Failure("http_error_retryable" if retry else "http_error",
                               f"HTTP {resp.status_code} for {url}")
            ctype = (resp.headers.get("content-type") or "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith(tuple(config.content_types)):
                raise _Failure("bad_content_type", f"{url} is {ctype}, not an image")
            if not ctype and not config.allow_missing_content_type:
                raise _Failure("bad_content_type", f"{url} has no Content-Type")
            length = resp.headers.get("content-length")
            if length and length.isdigit() and int(length) > config.max_bytes:
                raise _Failure("too_large", f"{url} declares {length} bytes, the cap is "
                               f"{config.max_bytes}")
            chunks: list[bytes] = []
            total = 0
            for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > config.max_bytes:
                    raise _Failure("too_large", f"{url} sent over {config.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise _Failure("fetch_timeout", f"{url} took over {config.deadline_s}s")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException as exc:
        raise _Failure("fetch_timeout", f"{url}: {type(exc).__name__} after "
                       f"{config.timeout_s}s") from exc
    except httpx.TooManyRedirects as exc:
        raise _Failure("http_error", f"{url}: more than {config.max_redirects} redirects") from exc
    except httpx.UnsupportedProtocol as exc:
        raise _Failure("unsupported_scheme", f"{url}: redirected to a scheme other than "
                       f"http(s): {exc}") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise _Failure("fetch_error", f"{url}: {type(exc).__name__}: {exc}") from exc


def fetch_url(url: str, config: ImageFetchConfig,
              client: httpx.Client | None = None) -> tuple[bytes, int]:
    """(bytes, attempts) of an http(s) URL, retrying with backoff; raises _Failure."""
    own = client is None
    client = client or make_client(config)
    try:
        attempt = 0
        while True:
            attempt += 1
            try:
                return _fetch_once(client, url, config), attempt
            except _Failure as failure:
                retryable = failure.reason in RETRYABLE
                if not retryable or attempt > config.retries:
                    if failure.reason == "http_error_retryable":
                        failure.reason = "http_error"
                    failure.args = (f"{failure.args[0]} (attempt {attempt})",)
                    failure.attempts = attempt
                    raise
                time.sleep(config.backoff_s * 2 ** (attempt - 1))
    finally:
        if own:
            client.close()


# ---- one image, many images ----------------------------------------------------------------
def load_image(item: dict[str, Any], root: str | Path | None, config: ImageFetchConfig,
               client: httpx.Client | None = None) -> ImageResult:
    """Load and decode one image item (schemas/web.py); never raises."""
    src = item.get("src")
    result = ImageResult(src=src, reason="internal_error")
    try:
        path, url = item.get("path"), item.get("url")
        ref = src or url or path
        # A path is used when there is no url, or when preferred and confinable.
        if path and (not url or (config.prefer_local and root is not None)):
            result.origin = "path"
            if root is None:
                raise _Failure("no_root", f"{path}: no document root to confine local paths to")
            data = read_local(path, root, config.max_bytes)
            result.attempts = 1
        elif url or (ref and urlsplit(ref).scheme.lower() in ("http", "https")):
            target = url or ref
            scheme = urlsplit(target).scheme.lower()
            if scheme not in ("http", "https"):
                raise _Failure("unsupported_scheme", f"{scheme}: URLs are not fetched")
            result.origin = "url"
            data, result.attempts = fetch_url(target, config, client)
        elif ref and ref[:5].lower() == "data:":
            result.origin = "data"
            data = read_data_uri(ref, config)
            result.attempts = 1
        elif ref and urlsplit(ref).scheme:
            raise _Failure("unsupported_scheme",
                           f"{urlsplit(ref).scheme}: references are not loaded ({ref[:80]})")
        else:
            raise _Failure("no_source", f"image item has no loadable reference ({ref!r})")
        width, height, fmt, mode = decode_image(data, config.max_pixels)
        result.data, result.width, result.height = data, width, height
        result.format, result.mode = fmt, mode
        result.sha256, result.n_bytes = hashlib.sha256(data).hexdigest(), len(data)
        result.reason, result.message = "ok", ""
    except _Failure as failure:
        result.reason, result.message = failure.reason, str(failure)[:500]
        if failure.attempts is not None:
            result.attempts = failure.attempts
    except Exception as exc:  # a bug or an odd library error: still a value
        result.reason = "internal_error"
        result.message = f"{type(exc).__name__}: {exc}"[:500]
    return result


def load_images(items: list[dict[str, Any]], root: str | Path | None,
                config: ImageFetchConfig | None = None) -> list[ImageResult]:
    """Every image item of a record, in order, sharing one HTTP client; never raises."""
    config = config or ImageFetchConfig()
    images = [i for i in items if i.get("type") == "image"]
    if not images:
        return []
    with make_client(config) as client:
        return [load_image(item, root, config, client) for item in images]


# ---- the stage --------------------------------------------------------------------------------
IMAGE_STATUS_TYPE = pa.struct([
    pa.field("src", pa.string()), pa.field("reason", pa.string()),
    pa.field("message", pa.string()), pa.field("origin", pa.string()),
    pa.field("width", pa.int32()), pa.field("height", pa.int32()),
    pa.field("format", pa.string()), pa.field("mode", pa.string()),
    pa.field("sha256", pa.string()), pa.field("n_bytes", pa.int64()),
    pa.field("attempts", pa.int32()),
])
IMAGE_FIELDS = [
    pa.field("image_status", pa.list_(IMAGE_STATUS_TYPE)),  # one per image item, in order
    pa.field("image_bytes", pa.list_(pa.binary())),  # the encoded bytes, null where it failed
]


class ImageLoadConfig(StageConfig):
    """Limits for each image, and where local paths must stay."""

    fetch: ImageFetchConfig = Field(default_factory=ImageFetchConfig)
    root: str | None = Field(
        None, description="document root for local paths; default: the row's doc_root "
                          "column, else the page's own directory")
    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=4))


class ImageLoadStage(Stage):
    """Load every image of a document; per-image failures are values, the doc is scored."""

    name: ClassVar[str] = "image_load"
    version: ClassVar[str] = "1"
    kind = "map"
    item_kind: ClassVar[str] = "web_doc"
    Config: ClassVar[type[StageConfig]] = ImageLoadConfig
    input_columns: ClassVar[tuple[str, ...]] = ("items", "path")
    output_fields: ClassVar[list[pa.Field]] = IMAGE_FIELDS
    heavy_columns: ClassVar[tuple[str, ...]] = ("image_bytes",)
    config: ImageLoadConfig

    def _root(self, row: dict[str, Any]) -> str | None:
        if self.config.root:
            return self.config.root
        if row.get("doc_root"):
            return str(row["doc_root"])
        return os.path.dirname(os.path.abspath(row["path"])) if row.get("path") else None

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        results = load_images(list(row.get("items") or []), self._root(row), self.config.fetch)
        reasons: dict[str, int] = {}
        for r in results:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        n_ok = reasons.get("ok", 0)
        scores = {"n_images": len(results), "n_images_ok": n_ok,
                  "n_images_failed": len(results) - n_ok}
        details = {"reasons": dict(sorted(reasons.items())),
                   "failures": [{"src": r.src, "reason": r.reason, "message": r.message}
                                for r in results if not r.ok][:20]}
        out = {"image_status": [r.to_row() for r in results],
               "image_bytes": [r.data for r in results]}
        return [Outcome(self.entry(row, scores, details=details), out)]
