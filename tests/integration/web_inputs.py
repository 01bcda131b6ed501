"""Build a web-pipeline input folder from real gimp-help-en pages plus hostile inputs."""

from __future__ import annotations

import io
import json
import re
import shutil
import zlib
from pathlib import Path

GIMP_PAGES = [
    "gimp-tool-crop.html", "gimp-tool-rotate.html", "gimp-tool-scale.html",
    "gimp-tool-flip.html", "gimp-tool-perspective.html", "gimp-tool-shear.html",
    "gimp-tool-levels.html", "gimp-tool-curves.html", "gimp-tool-threshold.html",
    "gimp-tool-posterize.html", "gimp-tool-dodge-burn.html", "gimp-tool-smudge.html",
]
_SRC = re.compile(rb'<img[^>]+src="([^"]+)"')


def copy_pages(gimp_root: Path, out: Path, pages: list[str]) -> list[Path]:
    """Copy pages and the images they reference, keeping the manual's layout."""
    copied = []
    for name in pages:
        page = gimp_root / name
        if not page.exists():
            continue
        data = page.read_bytes()
        (out / name).write_bytes(data)
        copied.append(out / name)
        for src in _SRC.findall(data):
            rel = Path(src.decode())
            source = (gimp_root / rel).resolve()
            if source.is_file() and source.is_relative_to(gimp_root.resolve()):
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    return copied


def bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG that claims side x side pixels and compresses to a few KB."""
    raw = zlib.compress(b"".join(b"\x00" + bytes((side + 7) // 8) for _ in range(side)), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (len(body).to_bytes(4, "big") + kind + body
                + zlib.crc32(kind + body).to_bytes(4, "big"))

    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def hostile_inputs(out: Path, prose: list[str]) -> dict[str, Path]:
    """Malformed, deeply nested, non-UTF-8 pages, path escapes, a bomb, bad records.

    Each page carries its own real prose (Wikipedia lead paragraphs), so the text
    rules keep it and the image rules get to judge its images.
    """
    files: dict[str, Path] = {}
    texts = iter(prose)
    words = next(texts)
    body = f"<p>{next(texts)}</p>"
    files["malformed"] = out / "malformed.html"
    files["malformed"].write_bytes(b"<html><body><p>" + words.encode() + b"<div><b><i></p></td>"
                                   b"<img src='images/nowhere.png' alt='missing'>"
                                   b"<table><tr><td>cell</p></b><div class='x")
    files["deep"] = out / "deep.html"
    files["deep"].write_text("<html><body>" + "<div>" * 100_000 + f"<p>{next(texts)}</p>"
                             + "</body></html>")
    files["latin1"] = out / "latin1.html"
    files["latin1"].write_bytes(("<html><head><meta charset='iso-8859-1'></head><body><p>"
                                 "Caf\xe9 cr\xe8me. " + next(texts) + "</p></body></html>")
                                .encode("latin-1"))
    files["invalid_utf8"] = out / "invalid_utf8.html"
    files["invalid_utf8"].write_bytes(b"<html><body><p>" + next(texts).encode() + b"\xff\xfe\xc3("
                                      b"</p></body></html>")
    files["escape"] = out / "escape.html"
    files["escape"].write_text(f"<html><body>{body}<img src='../../etc/passwd' alt='x'>"
                               f"<img src='/etc/passwd' alt='y'></body></html>")
    (out / "bomb.png").write_bytes(bomb_png())
    files["bomb"] = out / "bomb.html"
    files["bomb"].write_text(f"<html><body><p>{next(texts)}</p><img src='bomb.png' alt='bomb'>"
                             "</body></html>")
    files["empty"] = out / "empty.html"
    files["empty"].write_bytes(b"")
    files["records"] = out / "records.jsonl"
    good = {"url": "https://example.org/a", "items": [{"type": "text", "text": next(texts)}]}
    buf = io.StringIO()
    buf.write(json.dumps(good) + "\n")
    buf.write("{not json\n")
    buf.write(json.dumps({"url": "https://example.org/b", "items": [{"type": "video"}]}) + "\n")
    files["records"].write_text(buf.getvalue())
    files["binary"] = out / "binary.html"
    files["binary"].write_bytes(bytes(range(256)))
    return files


def wiki_texts(path: Path) -> list[str]:
    """Lead paragraphs of a summaries file, in title order."""
    data = json.loads(path.read_text())
    return [v["extract"].strip() for _, v in sorted(data.items())
            if isinstance(v, dict) and (v.get("extract") or "").strip()]


def fortunes(path: Path) -> list[str]:
    """The entries of a fortune file ("%" lines separate them)."""
    entries, current = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]
