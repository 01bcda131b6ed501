"""HTML page -> OmniCorpus-style record (schemas/web.py), in reading order.

Block-level text (headings, paragraphs, list items, table cells, pre/code,
captions ...) becomes text items, inline text within a block merged and its
whitespace collapsed (pre keeps its own); each `<img>` becomes an image item
where it stands. Script/style, navigation chrome (`<nav>`, page `<header>` and
`<footer>`, role=navigation/search/banner/contentinfo, sidebar/navheader-like
classes) and hidden elements are skipped, images inside them too.

The parser is lxml's (libxml2) HTML parser driven with a *target*: it emits
start/end/data events without building a tree, so a page of 100k nested divs
costs a flat stack (a list), never Python recursion nor libxml2's tree-depth
limit, and malformed markup is repaired by libxml2 as browsers would.

Bytes are decoded here, not by libxml2, so the outcome is recorded: BOM, then
the transport's charset, then `<meta charset>`, then strict UTF-8, and last
UTF-8 with errors="replace" (metadata.encoding_source = "fallback" and the
count of U+FFFD inserted, also a score for the policy).

Reason codes: missing_file, source_changed, empty_document, too_large, not_html,
html_parse_error.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urljoin, urlsplit

import pyarrow as pa
from lxml import etree
from pydantic import Field

from weft.schemas.ids import stable_json
from weft.schemas.web import WEB_DOC_FIELDS, image_item, text_item
from weft.stages.base import ItemError, Outcome, Resources, Stage, StageConfig

CONVERTER_VERSION = "1"

# Elements whose start and end separate text items.
BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details",
    "dialog", "dir", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "h1", "h2",
    "h3", "h4", "h5", "h6", "header", "hgroup", "hr", "html", "legend", "li", "listing", "main",
    "menu", "ol", "p", "plaintext", "pre", "section", "summary", "table", "tbody", "td", "tfoot",
    "th", "thead", "tr", "ul", "xmp",
})
PRE_TAGS = frozenset({"pre", "listing", "plaintext", "xmp", "textarea"})
DEFAULT_SKIP_TAGS = (
    "head", "script", "style", "noscript", "template", "nav", "form", "button", "select",
    "option", "textarea", "input", "label", "iframe", "object", "embed", "svg", "math", "canvas",
    "audio", "video", "map",
)
DEFAULT_SKIP_ROLES = ("navigation", "search", "banner", "contentinfo", "menu", "menubar")
# class/id tokens of navigation chrome: gimp-help's navheader/navfooter, Sphinx's
# sphinxsidebar/related/footer/headerlink (the pilcrow), generic sidebars and breadcrumbs.
DEFAULT_BOILERPLATE = (
    r"(?:^|[-_])(?:nav|navbar|navigation|navheader|navfooter|sidebar|sphinxsidebar|"
    r"breadcrumbs?|footer|headerlink|related|skip-?link|cookie-?(?:banner|notice|consent))"
    r"(?:$|[-_])"
)
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
_WS = re.compile(r"\s+")
_BR = "\ue000"  # a private-use mark for <br> that whitespace collapsing leaves alone
_BR_RUN = re.compile(f"(?: ?{_BR})+ ?")
_META_CHARSET = re.compile(
    rb"<meta[^>]+?charset\s*=\s*[\"']?\s*([a-zA-Z0-9_:.\-]+)", re.I)
_XML_ENCODING = re.compile(rb"^\s*<\?xml[^>]+encoding\s*=\s*[\"']([a-zA-Z0-9_.\-]+)", re.I)
# The WHATWG encoding standard reads these labels as windows-1252.
_WHATWG_ALIASES = {"iso-8859-1": "cp1252", "latin-1": "cp1252", "latin1": "cp1252",
                   "us-ascii": "cp1252", "ascii": "cp1252", "iso8859-1": "cp1252",
                   "l1": "cp1252", "cp819": "cp1252", "ibm819": "cp1252"}
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF32_LE, "utf-32-le"),
         (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))
_BINARY_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"PK\x03\x04", b"%PDF", b"\x1f\x8b",
                 b"RIFF", b"\x7fELF", b"BZh", b"\xfd7zXZ")


class HtmlConvertConfig(StageConfig):
    """What counts as boilerplate and how large a page may be."""

    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="larger pages are too_large")
    skip_tags: tuple[str, ...] = Field(DEFAULT_SKIP_TAGS,
                                       description="elements skipped with their content")
    skip_roles: tuple[str, ...] = Field(DEFAULT_SKIP_ROLES,
                                        description="ARIA roles skipped with their content")
    boilerplate_pattern: str = Field(
        DEFAULT_BOILERPLATE, description="regex over class/id tokens of skipped chrome")
    keep_header_in: tuple[str, ...] = Field(
        ("article", "main", "section"),
        description="a <header> inside one of these is content (an article's title)")
    site_root: str | None = Field(
        None, description="local directory that root-relative srcs (/img/x.png) resolve against")
    resources: Resources = Field(default_factory=lambda: Resources(cpus=1, batch_size=8))


# ---- decoding ------------------------------------------------------------------
def _codec(label: str | None) -> str | None:
    """A Python codec name for a charset label, or None when Python does not know it."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    label = _WHATWG_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


_counts = threading.local()


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    """errors= handler: replace like "replace" and count, so the record says how many."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _counts.n = getattr(_counts, "n", 0) + 1
    return "\ufffd", exc.end


codecs.register_error("weft_count_replace", _count_replace)


def _decode_counting(data: bytes, encoding: str) -> tuple[str, int]:
    """(text, bytes sequences replaced) for a decode that never fails."""
    _counts.n = 0
    text = data.decode(encoding, errors="weft_count_replace")
    return text, _counts.n


def decode_html(data: bytes, transport_charset: str | None = None) -> tuple[str, dict[str, Any]]:
    """(text, facts): decode page bytes the way the outcome can be recorded.

    facts: encoding, encoding_source (bom | transport | meta | default | fallback),
    declared_charset (a label Python did not know, if any), replacement_chars (byte
    sequences that were not valid in the chosen encoding, each now U+FFFD).
    """
    facts: dict[str, Any] = {}
    encoding, source = None, None
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, source, data = name, "bom", data[len(bom):]
            break
    if encoding is None and transport_charset:
        encoding = _codec(transport_charset)
        source = "transport" if encoding else None
        if encoding is None:
            facts["declared_charset"] = transport_charset
    if encoding is None:
        head = data[:8192]
        match = _XML_ENCODING.search(head) or _META_CHARSET.search(head)
        if match:
            label = match.group(1).decode("ascii", "replace")
            encoding = _codec(label)
            source = "meta" if encoding else None
            if encoding is None:
                facts["declared_charset"] = label
            elif encoding.startswith(("utf-16", "utf-32")):
                encoding, source = None, None  # bytes that hold ASCII <meta> are not UTF-16
    if encoding is None:
        encoding, source = "utf-8", "default"
    text, replaced = _decode_counting(data, encoding)
    if replaced and source == "default":
        source = "fallback"
    facts["encoding"] = encoding
    facts["encoding_source"] = source
    facts["replacement_chars"] = replaced
    return text, facts


# ---- the event target ------------------------------------------------------------
class _Frame:
    __slots__ = ("block", "pre", "skip", "tag")

    def __init__(self, tag: str, skip: bool, pre: bool, block: bool) -> None:
        self.tag, self.skip, self.pre, self.block = tag, skip, pre, block


class _Builder:
    """lxml parser target: turns start/end/data events into ordered items, iteratively."""

    def __init__(self, config: HtmlConvertConfig, resolve: Any) -> None:
        self.config = config
        self.resolve = resolve
        self.skip_tags = frozenset(t.lower() for t in config.skip_tags)
        self.skip_roles = frozenset(r.lower() for r in config.skip_roles)
        self.boilerplate = re.compile(config.boilerplate_pattern, re.I)
        self.keep_header_in = frozenset(config.keep_header_in)
        self.stack: list[_Frame] = []
        self.open_counts: dict[str, int] = {}
        self.items: list[dict[str, Any]] = []
        self.pieces: list[str] = []
        self.pre_block = False
        self.title_parts: list[str] | None = None
        self.title: str | None = None
        self.h1_parts: list[str] | None = None
        self.h1: str | None = None
        self.lang: str | None = None
        self.base_href: str | None = None
        self.images_without_src = 0
        self.skipped_images = 0
        self.max_depth = 0

    # -- helpers
    def _is_skipped(self, tag: str, attrib: Any, parent_skip: bool) -> bool:
        if parent_skip or tag in self.skip_tags:
            return True
        if tag == "footer" or (tag == "header" and not any(
                self.open_counts.get(t) for t in self.keep_header_in)):
            return True
        if not attrib:
            return False
        get = attrib.get
        if get("hidden") is not None or (get("aria-hidden") or "").strip().lower() == "true":
            return True
        if (get("type") or "").lower() == "hidden":
            return True
        style = get("style")
        if style and _HIDDEN_STYLE.search(style):
            return True
        role = (get("role") or "").strip().lower()
        if role and role in self.skip_roles:
            return True
        tokens = f"{get('class') or ''} {get('id') or ''}".split()
        return any(self.boilerplate.search(t) for t in tokens)

    def flush(self) -> None:
        if not self.pieces:
            return
        raw = "".join(self.pieces)
        self.pieces = []
        if self.pre_block:
            text = raw.replace(_BR, "\n").strip("\n")
            if not text.strip():
                return
        else:
            text = _WS.sub(" ", raw)
            text = _BR_RUN.sub(lambda m: "\n" * min(2, m.group(0).count(_BR)), text)
            text = text.strip()
        if text:
            self.items.append(text_item(text))

    # -- lxml target interface
    def start(self, tag: Any, attrib: Any, nsmap: Any = None) -> None:
        tag = tag.lower() if isinstance(tag, str) else ""
        if "}" in tag:
            tag = tag.rsplit("}", 1)[1]
        parent = self.stack[-1] if self.stack else None
        skip = self._is_skipped(tag, attrib, parent.skip if parent else False)
        pre = (parent.pre if parent else False) or tag in PRE_TAGS
        block = tag in BLOCK_TAGS
        if tag == "html" and self.lang is None:
            lang = (attrib.get("lang") or attrib.get("xml:lang") or "").strip().lower()
            self.lang = lang or None
        elif tag == "base" and self.base_href is None and attrib.get("href"):
            self.base_href = attrib.get("href").strip()
        elif tag == "meta" and self.lang is None and (
                (attrib.get("http-equiv") or "").lower() == "content-language"):
            self.lang = (attrib.get("content") or "").split(",")[0].strip().lower() or None
        elif tag == "title" and self.title is None and self.open_counts.get("head") \
                and not self.open_counts.get("svg"):
            self.title_parts = []
        if tag == "h1" and self.h1 is None and not skip:
            self.h1_parts = []
        if not skip:
            if block or tag == "img":
                self.flush()
                self.pre_block = pre
            if tag == "br":
                self.pieces.append(_BR)
            elif tag == "img":
                self._image(attrib)
        elif tag == "img":
            self.skipped_images += 1
        self.stack.append(_Frame(tag, skip, pre, block))
        self.open_counts[tag] = self.open_counts.get(tag, 0) + 1
        self.max_depth = max(self.max_depth, len(self.stack))

    def _image(self, attrib: Any) -> None:
        src = (attrib.get("src") or "").strip()
        if not src:
            srcset = (attrib.get("srcset") or "").strip()
            src = srcset.split(",")[0].strip().split(" ")[0] if srcset else ""
        if not src:
            self.images_without_src += 1
            return
        alt = attrib.get("alt")
        alt = _WS.sub(" ", alt).strip() if alt is not None else None
        path, url = self.resolve(src, self.base_href)
        self.items.append(image_item(src, alt, path, url))

    def end(self, tag: Any) -> None:
        tag = tag.lower() if isinstance(tag, str) else ""
        if "}" in tag:
            tag = tag.rsplit("}", 1)[1]
        if not self.open_counts.get(tag):
            return  # a stray end tag libxml2 let through: nothing to close
        while self.stack:
            frame = self.stack.pop()
            self.open_counts[frame.tag] -= 1
            if frame.block and not frame.skip:
                self.flush()
                self.pre_block = self.stack[-1].pre if self.stack else False
            if frame.tag == "title" and self.title_parts is not None:
                self.title = _WS.sub(" ", "".join(self.title_parts)).strip() or None
                self.title_parts = None
            if frame.tag == "h1" and self.h1_parts is not None:
                self.h1 = _WS.sub(" ", "".join(self.h1_parts)).strip() or None
                self.h1_parts = None
            if frame.tag == tag:
                break

    def data(self, text: str) -> None:
        if self.title_parts is not None:
            self.title_parts.append(text)
        if self.stack and self.stack[-1].skip:
            return
        if self.h1_parts is not None:
            self.h1_parts.append(text)
        self.pieces.append(text)

    def comment(self, text: str) -> None:
        """Comments carry no content."""

    def close(self) -> None:
        self.flush()


# ---- resolving image references ------------------------------------------------------
def _resolver(page_path: str | None, page_url: str | None, site_root: str | None) -> Any:
    """A function (src, base_href) -> (local path or None, http(s) url or None)."""
    page_dir = os.path.dirname(os.path.abspath(page_path)) if page_path else None
    web_base = page_url if page_url and urlsplit(page_url).scheme in ("http", "https") else None

    def resolve(src: str, base_href: str | None) -> tuple[str | None, str | None]:
        base_url, local_dir = web_base, page_dir
        if base_href:
            scheme = urlsplit(base_href).scheme.lower()
            if scheme in ("http", "https"):
                base_url = base_href
            elif not scheme and local_dir and not base_href.startswith("/"):
                local_dir = os.path.normpath(os.path.join(local_dir, unquote(base_href)))
                if not base_href.endswith("/"):
                    local_dir = os.path.dirname(local_dir)
        parts = urlsplit(src)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            return None, src
        if src.startswith("//"):
            return None, urljoin(base_url or "https:", src)
        if scheme:  # data:, file:, ftp:, javascript: ... the loader decides, nothing resolved
            return None, None
        url = urljoin(base_url, src) if base_url else None
        rel = unquote(parts.path)
        if not rel:
            return None, url
        if rel.startswith("/"):
            path = os.path.normpath(os.path.join(site_root, rel.lstrip("/"))) if site_root else None
        else:
            path = os.path.normpath(os.path.join(local_dir, rel)) if local_dir else None
        return path, url

    return resolve


# ---- the function -------------------------------------------------------------------
def html_to_record(data: bytes, *, path: str | Path | None = None, url: str | None = None,
                   source_id: str | None = None, charset: str | None = None,
                   config: HtmlConvertConfig | None = None) -> dict[str, Any]:
    """One page's bytes as a canonical record (schemas/web.py); bad input raises ItemError.

    `path` (the page's local file) resolves relative image srcs to local paths,
    `url` (its address) to absolute URLs; `charset` is the transport's declaration.
    """
    config = config or HtmlConvertConfig()
    if len(data) > config.max_bytes:
        raise ItemError("too_large", f"page has {len(data)} bytes, the cap is {config.max_bytes}")
    if not data.strip():
        raise ItemError("empty_document", "page has no content")
    head = data[:1024]
    utf16 = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    if head.startswith(_BINARY_MAGIC) or (head.count(b"\x00") > len(head) // 4 and not utf16):
        raise ItemError("not_html", "bytes are binary (an image, archive or executable), "
                        "not an HTML page")
    text, facts = decode_html(data, charset)
    # NUL is not allowed in HTML text; the private-use <br> mark must not come from the page.
    text = text.replace("\x00", "\ufffd").replace(_BR, "")
    builder = _Builder(config, _resolver(str(path) if path else None, url, config.site_root))
    parser = etree.HTMLParser(target=builder, encoding="utf-8", huge_tree=True,
                              remove_comments=True, remove_pis=True, no_network=True)
    try:
        parser.feed(text.encode("utf-8"))
        parser.close()
    except etree.LxmlError as exc:
        if not builder.items and not builder.pieces:
            raise ItemError("html_parse_error", f"libxml2 could not parse the page: {exc}") from exc
        builder.close()
        facts["parse_error"] = str(exc)[:300]
    sid = source_id or hashlib.sha256(data).hexdigest()
    n_chars = sum(len(i["text"]) for i in builder.items if i["type"] == "text")
    metadata = {
        "converter": f"html_convert/{CONVERTER_VERSION}",
        "n_bytes": len(data),
        **facts,
        "images_without_src": builder.images_without_src,
        "images_in_boilerplate": builder.skipped_images,
        "max_depth": builder.max_depth,
        "n_chars": n_chars,
    }
    if builder.base_href:
        metadata["base_href"] = builder.base_href
    return {
        "doc_id": hashlib.sha256(data).hexdigest(),
        "source_id": sid,
        "url": url,
        "path": str(path) if path is not None else None,
        "title": builder.title or builder.h1,
        "lang": builder.lang,
        "items": builder.items,
        "metadata": metadata,
    }


def page_row(path: str | Path, url: str | None = None) -> dict[str, Any]:
    """A discovered page as the stage's input row (item id = source id = sha256 of bytes)."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"item_id": digest, "source_id": digest, "item_kind": "web_doc",
            "path": str(path), "url": url, "size_bytes": path.stat().st_size}


class HtmlConvertStage(Stage):
    """Convert one HTML page into a record; score its size so the policy can drop empties."""

    name: ClassVar[str] = "html_convert"
    version: ClassVar[str] = CONVERTER_VERSION
    kind = "map"
    item_kind: ClassVar[str] = "web_doc"
    Config: ClassVar[type[StageConfig]] = HtmlConvertConfig
    # Optional columns: url (the page's address), charset (the transport's declaration).
    input_columns: ClassVar[tuple[str, ...]] = ("path",)
    output_fields: ClassVar[list[pa.Field]] = [
        f for f in WEB_DOC_FIELDS if f.name not in ("path", "source_id")]
    heavy_columns: ClassVar[tuple[str, ...]] = ("items",)
    config: HtmlConvertConfig

    def process(self, row: dict[str, Any]) -> list[Outcome]:
        path = Path(row["path"])
        try:
            size = path.stat().st_size
            if size > self.config.max_bytes:
                raise ItemError("too_large", f"{path.name} has {size} bytes, the cap is "
                                f"{self.config.max_bytes}")
            data = path.read_bytes()
        except OSError as exc:
            raise ItemError("missing_file", f"cannot read {path}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if row.get("source_id") and row["source_id"] != digest:
            raise ItemError("source_changed", f"{path.name} changed since discovery: its sha256 "
                            f"is {digest}, the row says {row['source_id']}")
        record = html_to_record(data, path=path, url=row.get("url"), source_id=digest,
                                charset=row.get("charset"), config=self.config)
        meta = record["metadata"]
        items = record["items"]
        scores = {
            "n_text_items": sum(1 for i in items if i["type"] == "text"),
            "n_images": sum(1 for i in items if i["type"] == "image"),
            "n_chars": meta["n_chars"],
            "replacement_chars": meta["replacement_chars"],
        }
        details = {k: meta[k] for k in ("encoding", "encoding_source", "max_depth",
                                         "images_in_boilerplate", "images_without_src")}
        out = {k: record[k] for k in ("doc_id", "url", "title", "lang", "items")}
        out["metadata"] = stable_json(meta)
        return [Outcome(self.entry(row, scores, details=details), out)]
