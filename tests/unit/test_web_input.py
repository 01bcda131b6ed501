"""Web input side: record schema, HTML conversion, record reading, safe image loading.

Hostile inputs (malformed and 100k-deep HTML, bad encodings, path escapes,
decompression bombs, truncated images, hanging and oversized HTTP responses)
must each end as a record or a reason code, never an exception or a hang.
"""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from weft.schemas.web import (
    WEB_DOC_SCHEMA,
    RecordValidationError,
    canonical_doc_id,
    records_to_table,
    table_to_records,
    validate_record,
)
from weft.stages.base import DECISION_COLUMN, ItemError, ledger_rows_of
from weft.stages.web.html_convert import (
    HtmlConvertConfig,
    HtmlConvertStage,
    decode_html,
    html_to_record,
    page_row,
)
from weft.stages.web.images import (
    ImageFetchConfig,
    ImageLoadStage,
    load_image,
    load_images,
)
from weft.stages.web.reader import ReadRecordsStage, read_records


# ---- helpers ------------------------------------------------------------------------------
def png_bytes(size: tuple[int, int] = (32, 24),
              color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (256, 256)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_with_header(width: int, height: int, idat: bytes, bit_depth: int = 8,
                    color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real, fully valid 30000x30000 1-bit PNG: 900M pixels in ~110 KB."""
    width = height = 30000
    row = b"\x00" * (1 + width // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(comp.flush())
    return png_with_header(width, height, b"".join(parts), bit_depth=1, color_type=0)


def rec(items: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"url": "https://example.org/a.html", "items": items, **kw}


# ---- schema -------------------------------------------------------------------------------
def test_record_round_trips_through_arrow() -> None:
    record = validate_record(rec(
        [{"type": "text", "text": "hello"},
         {"type": "image", "src": "a.png", "alt": None, "path": "/d/a.png", "url": None},
         {"type": "image", "src": "https://x.org/b.jpg", "alt": "", "url": "https://x.org/b.jpg"}],
        title="T", lang="en", metadata={"k": [1, 2]}), source_id="s" * 64)
    assert len(record["doc_id"]) == 64 and record["source_id"] == "s" * 64
    assert record["items"][2] == {"type": "image", "src": "https://x.org/b.jpg", "alt": "",
                                  "path": None, "url": "https://x.org/b.jpg"}
    table = records_to_table([record])
    assert table.schema.equals(WEB_DOC_SCHEMA)
    assert table.schema.metadata[b"weft.schema_version"] == b"1"
    items_type = table.schema.field("items").type
    assert pa.types.is_list(items_type) and all(f.nullable for f in items_type.value_type)
    assert table_to_records(table) == [record]


def test_doc_id_is_content_addressed() -> None:
    a = validate_record(rec([{"type": "text", "text": "x"}], metadata={"fetched": 1}))
    b = validate_record(rec([{"type": "text", "text": "x"}], metadata={"fetched": 2}))
    c = validate_record(rec([{"type": "text", "text": "y"}]))
    assert a["doc_id"] == b["doc_id"] == canonical_doc_id(a) != c["doc_id"]
    given = validate_record(rec([{"type": "text", "text": "x"}], doc_id="ab" * 32))
    assert given["doc_id"] == "ab" * 32
    foreign = validate_record(rec([{"type": "text", "text": "x"}], doc_id="cc.crawl/42"))
    assert foreign["doc_id"] == a["doc_id"]
    assert foreign["metadata"]["original_doc_id"] == "cc.crawl/42"


@pytest.mark.parametrize("bad", [
    "not a dict",
    {"url": "u", "items": "nope"},
    {"items": [{"type": "text", "text": "x"}]},  # neither url nor path
    rec([{"type": "video", "src": "v.mp4"}]),
    rec([{"type": "text", "text": 3}]),
    rec([{"type": "text", "text": "x", "src": "a.png"}]),
    rec([{"type": "image", "alt": "only alt"}]),
    rec([{"type": "image", "src": 5}]),
    rec([{"type": "text", "text": "x"}], metadata="{not json"),
    rec([{"type": "text", "text": "x"}], colour="blue"),
])
def test_invalid_records_are_refused_with_a_reason(bad: Any) -> None:
    with pytest.raises(RecordValidationError) as info:
        validate_record(bad)
    assert info.value.reason == "invalid_record"


def test_omnicorpus_parallel_lists_and_extra_fields() -> None:
    record = validate_record({"url": "https://e.org/p", "texts": ["a", None, "b"],
                              "images": [None, "https://e.org/i.png", None],
                              "general_metadata": {"score": 0.5}}, unknown_fields="metadata")
    assert [i["type"] for i in record["items"]] == ["text", "image", "text"]
    assert record["items"][1]["url"] == "https://e.org/i.png"
    assert record["metadata"]["general_metadata"] == {"score": 0.5}
    with pytest.raises(RecordValidationError):
        validate_record({"url": "u", "texts": ["a", "b"], "images": [None, "x"]})  # slot 1 both
    with pytest.raises(RecordValidationError):  # strict: extra fields are not silently kept
        validate_record({"url": "u", "texts": ["a"], "images": [None], "crawl": 1})


# ---- HTML conversion ------------------------------------------------------------------------
PAGE = b"""<!DOCTYPE html><html lang="EN-gb"><head><title> A  page </title>
<style>p { color: red }</style><script>var x = "<p>not text</p>";</script></head>
<body>
<header><a href="/">Site</a> <img src="logo.png" alt="logo"></header>
<nav><ul><li>Home</li><li>About</li></ul></nav>
<div class="sphinxsidebar">Sidebar links</div>
<main>
<article><header><h1>The <em>real</em>   title</h1></header>
<p>First   paragraph with <b>bold</b>
and <a href="x">a link</a>.</p>
<img src="img/one.png" alt="  The   first  image ">
<p>Second<br>line two</p>
<ul><li>item one</li><li>item <i>two</i></li></ul>
<table><tr><th>h1</th><td>cell</td></tr></table>
<pre>def f():
    return  1</pre>
<p hidden>hidden text</p><p style="display: none">also hidden</p>
<div aria-hidden="true"><img src="spacer.gif"></div>
<figure><img src="../shared/two.jpg"><figcaption>Caption two</figcaption></figure>
<p>Inline <img src="https://cdn.example.org/icon.svg" alt="icon"> icon</p>
<img src="data:image/png;base64,AAAA" alt="inline data">
<img src="//static.example.org/three.png">
<img src="/abs/four.png">
<img alt="no src">
</article></main>
<footer>Copyright <img src="footer.png"></footer>
</body></html>"""


def test_reading_order_text_and_images(tmp_path: Path) -> None:
    page = tmp_path / "site" / "docs" / "page.html"
    record = html_to_record(PAGE, path=page)
    texts = [i["text"] for i in record["items"] if i["type"] == "text"]
    images = [(i["src"], i["alt"]) for i in record["items"] if i["type"] == "image"]
    assert record["title"] == "A page" and record["lang"] == "en-gb"
    assert texts == ["The real title", "First paragraph with bold and a link.",
                     "Second\nline two", "item one", "item two", "h1", "cell",
                     "def f():\n    return  1", "Caption two", "Inline", "icon"]
    assert images == [("img/one.png", "The first image"), ("../shared/two.jpg", None),
                      ("https://cdn.example.org/icon.svg", "icon"),
                      ("data:image/png;base64,AAAA", "inline data"),
                      ("//static.example.org/three.png", None), ("/abs/four.png", None)]
    kinds = [(i["type"], i.get("text") or i.get("src")) for i in record["items"]]
    assert kinds.index(("image", "img/one.png")) == 2  # after the first paragraph
    assert kinds[kinds.index(("image", "https://cdn.example.org/icon.svg")) - 1] == (
        "text", "Inline")
    by_src = {i["src"]: i for i in record["items"] if i["type"] == "image"}
    assert by_src["img/one.png"]["path"] == str(tmp_path / "site/docs/img/one.png")
    assert by_src["../shared/two.jpg"]["path"] == str(tmp_path / "site/shared/two.jpg")
    assert by_src["https://cdn.example.org/icon.svg"]["url"] == "https://cdn.example.org/icon.svg"
    assert by_src["//static.example.org/three.png"]["url"] == "https://static.example.org/three.png"
    assert by_src["data:image/png;base64,AAAA"]["path"] is None
    assert by_src["data:image/png;base64,AAAA"]["url"] is None
    assert by_src["/abs/four.png"]["path"] is None  # no site root given
    meta = record["metadata"]
    assert meta["images_without_src"] == 1 and meta["images_in_boilerplate"] == 3
    assert record["doc_id"] == record["source_id"] and validate_record(record) == record

    rooted = html_to_record(PAGE, path=page, config=HtmlConvertConfig(site_root=str(tmp_path)))
    four = next(i for i in rooted["items"] if i.get("src") == "/abs/four.png")
    assert four["path"] == str(tmp_path / "abs/four.png")


def test_page_url_and_base_href_resolve_to_absolute_urls() -> None:
    html = b'<p>x</p><img src="a/b.png"><img src="../c.png?x=1#f">'
    record = html_to_record(html, url="https://example.org/docs/page.html")
    assert [i["url"] for i in record["items"][1:]] == [
        "https://example.org/docs/a/b.png", "https://example.org/c.png?x=1#f"]
    assert all(i["path"] is None for i in record["items"][1:])
    based = html_to_record(b'<base href="https://cdn.example.org/assets/"><img src="d.png">',
                           path="/srv/p.html")
    assert based["items"][0]["url"] == "https://cdn.example.org/assets/d.png"


@pytest.mark.parametrize("html", [
    b"<p>unclosed <b>bold <i>italic<p>next para<div>open div",
    b"</div></p>stray ends first<p>then text</span></table>",
    b"<<<>>><p>angle <soup</p><<img src=x.png>",
    b'<p title="unterminated>text after a bad attribute</p><p>ok</p>',
    b"<p>before<!-- a comment that never ends <p>hidden?",
    b"<table><p>para in table<td>cell<tr>row</table><li>orphan li",
    b"<html><html><body><body><p>double roots</p></body></body></html></html>",
    b"<p>\x00nul byte and \x01 control</p>",
    b"<svg><p>svg inside</p></svg><p>after svg",
    b"plain text, no tags at all",
])
def test_malformed_html_gives_a_record(html: bytes) -> None:
    record = html_to_record(html, path="/tmp/x.html")
    validate_record(record)
    assert isinstance(record["items"], list)


def test_malformed_html_keeps_recoverable_text() -> None:
    record = html_to_record(b"<p>unclosed <b>bold <i>italic<p>next para<div>open div")
    texts = [i["text"] for i in record["items"]]
    assert texts == ["unclosed bold italic", "next para", "open div"]


def test_100k_nested_divs_do_not_recurse(tmp_path: Path) -> None:
    depth = 100_000
    html = (b"<html><body>" + b"<div>" * depth + b"deep text<img src='deep.png' alt='d'>"
            + b"</div>" * depth + b"<p>after</p></body></html>")
    started = time.perf_counter()
    record = html_to_record(html, path=tmp_path / "deep.html")
    elapsed = time.perf_counter() - started
    assert [(i["type"], i.get("text") or i.get("src")) for i in record["items"]] == [
        ("text", "deep text"), ("image", "deep.png"), ("text", "after")]
    assert record["metadata"]["max_depth"] >= depth
    assert elapsed < 10
    # Unclosed too: the stack unwinds in a loop at the end.
    record = html_to_record(b"<div>" * depth + b"<span>" * depth + b"bottom")
    assert record["items"] == [{"type": "text", "text": "bottom"}]


def test_charset_from_meta_bom_and_fallback() -> None:
    latin = "<meta charset='iso-8859-1'><p>café naïve – €</p>".encode("cp1252")
    record = html_to_record(latin)
    assert record["items"][0]["text"] == "café naïve – €"
    assert record["metadata"]["encoding"] == "cp1252"
    assert record["metadata"]["encoding_source"] == "meta"
    assert record["metadata"]["replacement_chars"] == 0

    http_equiv = ('<meta http-equiv="Content-Type" content="text/html; charset=koi8-r">'
                  "<p>Привет</p>").encode("koi8-r")
    assert html_to_record(http_equiv)["items"][0]["text"] == "Привет"

    undeclared = "<p>café</p>".encode("latin-1")  # not UTF-8 and says nothing
    record = html_to_record(undeclared)
    assert record["items"][0]["text"] == "caf\ufffd"
    assert record["metadata"]["encoding_source"] == "fallback"
    assert record["metadata"]["replacement_chars"] == 1

    broken = b"<meta charset=utf-8><p>ok \xff\xfe\xc3 end</p>"
    record = html_to_record(broken)
    assert record["items"][0]["text"].startswith("ok \ufffd")
    assert record["metadata"]["replacement_chars"] >= 2

    utf16 = "\ufeff<p>wide ☃</p>".encode("utf-16-le")
    record = html_to_record(utf16)
    assert record["items"][0]["text"] == "wide ☃"
    assert record["metadata"]["encoding_source"] == "bom"

    record = html_to_record(b"<meta charset='x-no-such-charset'><p>plain</p>")
    assert record["metadata"]["declared_charset"] == "x-no-such-charset"
    assert record["items"][0]["text"] == "plain"

    text, facts = decode_html("<p>é</p>".encode("cp1252"), transport_charset="windows-1252")
    assert text == "<p>é</p>" and facts["encoding_source"] == "transport"


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty_document"),
    (b"  \n\t ", "empty_document"),
    (png_bytes(), "not_html"),
    (b"\x7fELF\x02\x01\x01" + b"\x00" * 100, "not_html"),
    (b"<p>" + b"x" * 2000 + b"</p>", "too_large"),
])
def test_unusable_pages_raise_item_error(data: bytes, reason: str) -> None:
    with pytest.raises(ItemError) as info:
        html_to_record(data, config=HtmlConvertConfig(max_bytes=1000))
    assert info.value.reason == reason


def test_html_convert_stage_rows_and_ledger(tmp_path: Path, run_context: Any) -> None:
    good = tmp_path / "good.html"
    good.write_bytes(b"<title>T</title><p>hello</p><img src='a.png' alt='A'>")
    empty = tmp_path / "empty.html"
    empty.write_bytes(b"")
    rows = [page_row(good), page_row(empty),
            {"item_id": "f" * 64, "source_id": "f" * 64, "path": str(tmp_path / "gone.html")}]
    changed = page_row(good)
    changed["source_id"] = changed["item_id"] = "0" * 64
    rows.append(changed)
    stage = HtmlConvertStage(None, run_context({"html_convert": {"n_chars": {"min": 1}}}))
    out = stage.process_rows(rows)
    assert [r[DECISION_COLUMN] for r in out] == ["keep", "error", "error", "error"]
    assert out[0]["items"] == [{"type": "text", "text": "hello"},
                               {"type": "image", "src": "a.png", "alt": "A",
                                "path": str(tmp_path / "a.png"), "url": None}]
    assert json.loads(out[0]["metadata"])["encoding"] == "utf-8"
    ledger = ledger_rows_of(out)
    assert [r["reason"] for r in ledger] == ["ok", "empty_document", "missing_file",
                                             "source_changed"]
    assert json.loads(ledger[0]["scores"]) == {"n_chars": 5, "n_images": 1, "n_text_items": 1,
                                               "replacement_chars": 0}
    table = stage(pa.Table.from_pylist(rows))
    assert table.num_rows == 4 and "items" in table.column_names


# ---- reading records ------------------------------------------------------------------------
def _good(n: int) -> dict[str, Any]:
    return {"url": f"https://e.org/{n}", "title": f"doc {n}",
            "items": [{"type": "text", "text": f"text {n}"},
                      {"type": "image", "src": f"{n}.png", "alt": None, "path": None,
                       "url": f"https://e.org/{n}.png"}]}


def test_jsonl_bad_records_become_errors_and_the_rest_is_read(tmp_path: Path) -> None:
    lines = [json.dumps(_good(0)).encode(), b"{not json", json.dumps([1, 2]).encode(), b"",
             json.dumps({**_good(1), "items": [{"type": "text"}]}).encode(), b"x" * 5000,
             json.dumps(_good(2)).encode(), b'{"url": "\xff"}']
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read_records(path, max_record_bytes=4096)
    assert [r["title"] for r in result.records] == ["doc 0", "doc 2"]
    assert [(e.index, e.reason) for e in result.errors] == [
        (1, "invalid_json"), (2, "invalid_record"), (4, "invalid_record"),
        (5, "record_too_large"), (7, "invalid_json")]
    assert all(r["source_id"] == result.source_id for r in result.records)


def test_parquet_records_and_extra_columns(tmp_path: Path) -> None:
    records = [validate_record(_good(n)) for n in range(3)]
    table = records_to_table(records).append_column("crawl", pa.array(["a", "b", "c"]))
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path)
    result = read_records(path)
    assert not result.errors
    assert [r["doc_id"] for r in result.records] == [r["doc_id"] for r in records]
    assert [r["metadata"]["crawl"] for r in result.records] == ["a", "b", "c"]
    strict = read_records(path, unknown_fields="error")
    assert [e.reason for e in strict.errors] == ["invalid_record"] * 3


def test_read_records_stage_expands_with_error_rows(tmp_path: Path, run_context: Any) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join([json.dumps(_good(0)), "{bad", json.dumps(_good(0)),
                               json.dumps(_good(1))]))
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    rows = [{"item_id": f"{n}" * 64, "source_id": f"{n}" * 64, "path": str(p)}
            for n, p in enumerate([path, bad, broken])]
    out = ReadRecordsStage(None, run_context()).process_rows(rows)
    ledger = ledger_rows_of(out)
    assert [(r["decision"], r["reason"]) for r in ledger] == [
        ("keep", "ok"), ("error", "invalid_json"), ("drop", "duplicate_doc_id"), ("keep", "ok"),
        ("error", "unsupported_format"), ("error", "unreadable_file")]
    assert len({r["item_id"] for r in ledger}) == 6
    assert out[0]["items"][0] == {"type": "text", "text": "text 0"}


# ---- images: local files --------------------------------------------------------------------
@pytest.fixture
def doc_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "ok.png").write_bytes(png_bytes((40, 30)))
    (tmp_path / "secret.png").write_bytes(png_bytes((5, 5)))
    (root / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "img" / "inner-link.png").symlink_to(root / "img" / "ok.png")
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "trunc.jpg").write_bytes(jpeg_bytes()[:3000])
    (root / "img" / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    (root / "img" / "logo.svg").write_bytes(b'<?xml version="1.0"?><svg xmlns="x"></svg>')
    return root


def img(path: str | None = None, url: str | None = None, src: str | None = None) -> dict:
    return {"type": "image", "src": src or path or url, "alt": None, "path": path, "url": url}


def test_local_images_confined_to_the_root(doc_root: Path, monkeypatch: Any) -> None:
    opened: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path: Any, *a: Any, **k: Any) -> int:
        opened.append(str(path))
        return real_os_open(path, *a, **k)

    def spy_open(path: Any, *a: Any, **k: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    config = ImageFetchConfig()
    page_dir = str(doc_root / "img")
    escape = os.path.normpath(os.path.join(page_dir, "../../etc/passwd"))
    cases = {
        "../../etc/passwd": img(escape, src="../../etc/passwd"),
        "abs": img("/etc/passwd"),
        "relative-escape": img("../../../../etc/passwd"),
        "symlink-out": img(str(doc_root / "img" / "link.png")),
    }
    for name, item in cases.items():
        result = load_image(item, doc_root, config)
        assert result.reason == "path_escape", name
        assert result.data is None
    assert not any("passwd" in p or "secret" in p for p in opened)
    monkeypatch.undo()

    ok = load_image(img(str(doc_root / "img" / "ok.png")), doc_root, config)
    assert ok.ok and (ok.width, ok.height, ok.format) == (40, 30, "PNG") and ok.data
    assert load_image(img("img/inner-link.png"), doc_root, config).ok  # relative, inside
    for name, reason in [("missing.png", "image_missing"), ("empty.png", "empty_image"),
                         ("trunc.jpg", "image_undecodable"), ("junk.png", "image_undecodable"),
                         ("logo.svg", "unsupported_format")]:
        assert load_image(img(str(doc_root / "img" / name)), doc_root, config).reason == reason
    assert load_image(img(str(doc_root / "img")), doc_root, config).reason == "not_a_file"
    assert load_image(img(str(doc_root / "img" / "ok.png")), None, config).reason == "no_root"
    small = ImageFetchConfig(max_bytes=100)
    assert load_image(img(str(doc_root / "img" / "ok.png")), doc_root, small).reason == "too_large"


def test_decompression_bombs_refused_from_the_header(bomb_png: bytes, tmp_path: Path) -> None:
    assert len(bomb_png) < 300_000
    (tmp_path / "bomb.png").write_bytes(bomb_png)
    # A crafted IHDR: 100000 x 100000 RGB with a few bytes of image data.
    (tmp_path / "crafted.png").write_bytes(png_with_header(100_000, 100_000, zlib.compress(b"\0")))
    # 12000 x 10000 = 120M pixels: past our cap, under PIL's own hard limit.
    (tmp_path / "mid.png").write_bytes(png_with_header(
        12_000, 10_000, zlib.compress(b"\0" * 10), bit_depth=1, color_type=0))
    config = ImageFetchConfig()
    started = time.perf_counter()
    for name in ("bomb.png", "crafted.png", "mid.png"):
        result = load_image(img(str(tmp_path / name)), tmp_path, config)
        assert result.reason == "decompression_bomb", (name, result.message)
        assert result.data is None
    assert time.perf_counter() - started < 2  # refused before decoding 900M pixels
    tiny_cap = ImageFetchConfig(max_pixels=1000)
    (tmp_path / "ok.png").write_bytes(png_bytes((64, 64)))
    assert load_image(img(str(tmp_path / "ok.png")), tmp_path, tiny_cap).reason == \
        "decompression_bomb"


def test_data_uris_and_refused_schemes() -> None:
    config = ImageFetchConfig(max_data_uri_chars=2000)
    good = "data:image/png;base64," + base64.b64encode(png_bytes((4, 4))).decode()
    assert load_image(img(src=good), None, config).ok
    big = "data:image/png;base64," + "A" * 5000
    cases = {
        big: "data_uri_too_large",
        "data:text/html;base64,PGI+aGk8L2I+": "bad_content_type",
        "data:image/png;base64,@@@notbase64": "data_uri_invalid",
        "data:image/png,no-comma-needed-but-not-an-image": "image_undecodable",
        "file:///etc/passwd": "unsupported_scheme",
        "ftp://example.org/a.png": "unsupported_scheme",
        "javascript:alert(1)": "unsupported_scheme",
    }
    for src, reason in cases.items():
        assert load_image(img(src=src), None, config).reason == reason, src
    assert load_image({"type": "image", "src": None, "alt": "x"}, None, config).reason == \
        "no_source"


# ---- images: HTTP ------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str | None = "image/png",
              length: int | None = None) -> None:
        self.send_response(code)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
        if self.path == "/ok.png":
            self._send(200, srv.png)
        elif self.path == "/hang.png":
            srv.stop.wait(20)  # past any client timeout; released at teardown
        elif self.path == "/missing.png":
            self._send(404, b"not found", "text/plain")
        elif self.path == "/huge.png":
            self._send(200, b"\x89PNG", length=10**9)
        elif self.path == "/endless.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\0" * 1024)
            except OSError:
                pass
        elif self.path == "/trickle.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(100):
                    if srv.stop.wait(0.05):
                        break
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            except OSError:
                pass
        elif self.path == "/page.png":
            self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
        elif self.path == "/flaky.png":
            if srv.hits[self.path] == 1:
                self._send(503, b"busy", "text/plain")
            else:
                self._send(200, srv.png)
        elif self.path == "/always500.png":
            self._send(500, b"boom", "text/plain")
        elif self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/to-file.png":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/truncated.jpg":
            self._send(200, srv.jpeg[:2000], "image/jpeg")
        else:
            self._send(404, b"", "text/plain")


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.stop = threading.Event()
    server.hits = {}
    server.png = png_bytes((20, 10))
    server.jpeg = jpeg_bytes()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


FAST = ImageFetchConfig(timeout_s=0.5, deadline_s=1.0, retries=1, backoff_s=0.05,
                        max_bytes=50_000)


def test_http_good_image_and_redirect(http_server: str) -> None:
    result = load_image(img(url=f"{http_server}/ok.png"), None, FAST)
    assert result.ok and result.origin == "url" and (result.width, result.height) == (20, 10)
    assert result.data and result.sha256 and result.attempts == 1
    assert load_image(img(url=f"{http_server}/redirect.png"), None, FAST).ok
    # A local copy cannot be confined without a root: the item's url is used instead.
    both = {"type": "image", "src": "a.png", "alt": None, "path": "/nowhere/a.png",
            "url": f"{http_server}/ok.png"}
    assert load_image(both, None, FAST).origin == "url"


def test_http_hang_is_bounded(http_server: str) -> None:
    started = time.perf_counter()
    result = load_image(img(url=f"{http_server}/hang.png"), None, FAST)
    elapsed = time.perf_counter() - started
    assert result.reason == "fetch_timeout" and result.attempts == 2
    assert elapsed < 3, elapsed
    started = time.perf_counter()
    trickle = load_image(img(url=f"{http_server}/trickle.png"), None,
                         FAST.model_copy(update={"retries": 0}))
    assert trickle.reason == "fetch_timeout"
    assert time.perf_counter() - started < 3


@pytest.mark.parametrize(("path", "reason"), [
    ("/missing.png", "http_error"),
    ("/huge.png", "too_large"),
    ("/endless.png", "too_large"),
    ("/page.png", "bad_content_type"),
    ("/always500.png", "http_error"),
    ("/to-file.png", "unsupported_scheme"),
    ("/truncated.jpg", "image_undecodable"),
])
def test_http_failures_have_reasons(http_server: str, path: str, reason: str) -> None:
    result = load_image(img(url=http_server + path), None, FAST)
    assert result.reason == reason, result.message
    assert result.data is None


def test_http_retries_a_5xx(http_server: str) -> None:
    result = load_image(img(url=f"{http_server}/flaky.png"), None, FAST)
    assert result.ok and result.attempts == 2
    assert load_image(img(url=f"{http_server}/always500.png"), None, FAST).attempts == 2
    assert load_image(img(url=f"{http_server}/missing.png"), None, FAST).attempts == 1


def test_load_images_and_stage_never_raise(http_server: str, doc_root: Path,
                                           run_context: Any) -> None:
    items = [{"type": "text", "text": "t"}, img(str(doc_root / "img" / "ok.png")),
             img(url=f"{http_server}/missing.png"), img(src="../../etc/passwd",
                                                         path="/etc/passwd"),
             img(url=f"{http_server}/ok.png"), {"type": "image", "src": "gopher://x"}]
    results = load_images(items, doc_root, FAST)
    assert [r.reason for r in results] == ["ok", "http_error", "path_escape", "ok",
                                           "unsupported_scheme"]
    stage = ImageLoadStage(ImageLoadStage.Config(fetch=FAST, root=str(doc_root)), run_context())
    out = stage.process_rows([{"item_id": "d" * 64, "source_id": "d" * 64,
                               "path": str(doc_root / "p.html"), "items": items}])
    assert out[0][DECISION_COLUMN] == "keep"
    assert [s["reason"] for s in out[0]["image_status"]] == [r.reason for r in results]
    assert [b is not None for b in out[0]["image_bytes"]] == [True, False, False, True, False]
    scores = json.loads(ledger_rows_of(out)[0]["scores"])
    assert scores == {"n_images": 5, "n_images_failed": 3, "n_images_ok": 2}
    table = stage(pa.Table.from_pylist([{"item_id": "d" * 64, "source_id": "d" * 64,
                                         "path": str(doc_root / "p.html"), "items": items}]))
    assert table.column("image_status").type.value_type.field("reason").type == pa.string()
