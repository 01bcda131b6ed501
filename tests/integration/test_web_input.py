"""Real web documents (ASSETS.md): the gimp manual, scikit-learn's gallery, Python's docs.

The expected (src, alt) lists and text snippets below were written by hand from
reading the pages' HTML, not produced by the converter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from weft.schemas.web import records_to_table, table_to_records, validate_record
from weft.stages.base import DECISION_COLUMN, ledger_rows_of
from weft.stages.web.html_convert import HtmlConvertStage, html_to_record, page_row
from weft.stages.web.images import ImageFetchConfig, ImageLoadStage, load_images

pytestmark = pytest.mark.integration

ALLOW = "Example for “Allow Growing”"
AUTO = "Example for “Autoshrink”"
GIMP_PAGES: dict[str, dict[str, Any]] = {
    "gimp-tool-crop.html": {
        "title": "4.4. Crop",
        "images": [
            ("images/toolbox/toolbox-crop.png", "Crop tool"),
            ("images/note.png", "[Note]"),
            ("images/tip.png", "[Tip]"),
            ("images/toolbox/stock-tool-crop-22.png", None),  # the page gives no alt
            ("images/toolbox/crop-dialog.png", "Tool Options for the “Crop” tool"),
            ("images/toolbox/crop-grow-1.png", ALLOW),
            ("images/toolbox/crop-grow-2.png", ALLOW),
            ("images/toolbox/crop-grow-3.png", ALLOW),
            ("images/toolbox/autoshrink-1.png", AUTO),
            ("images/toolbox/autoshrink-2.png", AUTO),
        ],
        # (text just before an image, the image, text just after it)
        "around": [
            ("Figure 14.127. Crop tool", "images/toolbox/toolbox-crop.png",
             "The Crop Tool is used to crop or clip an image."),
            ("by clicking the tool icon:", "images/toolbox/stock-tool-crop-22.png",
             "in the ToolBox,"),
            ("Figure 14.129. Example for “Allow Growing”", "images/toolbox/crop-grow-1.png",
             "An image on a big canvas"),
            ("The option is checked. The crop rectangle extends outside the canvas.",
             "images/toolbox/crop-grow-3.png", "The resulting image."),
        ],
        "snippets": [
            "Holding the Shift key down allows to move by increments of 25 pixels.",
            "4.4.3. Tool Options",
            "Delete cropped pixels",
        ],
    },
    "gimp-tutorial-quickie-rotate.html": {
        "title": "4.9. Rotate An Image",
        "images": [
            ("images/tutorials/quickie-rotate-menu.png", "Menu for “Rotate An Image”"),
            ("images/tutorials/quickie-rotate-example-source.jpg",
             "Example for “Rotate An Image”"),
            ("images/tutorials/quickie-rotate-example-90-CCW.jpg",
             "Example for “Rotate An Image”"),
        ],
        "around": [
            ("Figure 3.37. Menu for “Rotate An Image”",
             "images/tutorials/quickie-rotate-menu.png", "Images that are taken with digital "
             "cameras sometimes need to be rotated."),
            ("Figure 3.38. Example for “Rotate An Image”",
             "images/tutorials/quickie-rotate-example-source.jpg", "Source Image"),
            ("Source Image", "images/tutorials/quickie-rotate-example-90-CCW.jpg",
             "Rotated image 90 degree CCW"),
        ],
        "snippets": ["Image → Transform → Rotate 90° clockwise (or counter-clockwise)."],
    },
    "gimp-filter-sepia.html": {
        "title": "8.33. Sepia",
        "images": [
            ("images/filters/examples/taj_orig.jpg", "Example for the “Sepia” filter"),
            ("images/filters/examples/color-taj-sepia.jpg", "Example for the “Sepia” filter"),
            ("images/menus/colors/desaturate/sepia.png", "“Sepia” options"),
        ],
        "around": [
            ("Figure 16.211. Example for the “Sepia” filter",
             "images/filters/examples/taj_orig.jpg", "Original image"),
            ("Original image", "images/filters/examples/color-taj-sepia.jpg",
             "“Sepia” filter applied"),
            ("Figure 16.212. “Sepia” options", "images/menus/colors/desaturate/sepia.png",
             "Effect strength"),
        ],
        "snippets": ["The Sepia filter imitates sepia toning to produce a black-and-white "
                     "picture with a warm brown-ish tone.",
                     "You can find this command through Colors → Desaturate → Sepia…."],
    },
    "gimp-image-scale.html": {
        "title": "6.21. Scale Image",
        "images": [
            ("images/note.png", "[Note]"),
            ("images/menus/image/scale-image.png", "The “Scale Image” dialog"),
            ("images/note.png", "[Note]"),
        ],
        "around": [
            ("Figure 16.82. The “Scale Image” dialog", "images/menus/image/scale-image.png",
             "Image Size"),
        ],
        "snippets": ["6.21.1. Activate the Command",
                     "Adding or removing pixels is called “Resampling”."],
    },
}
NAV_TEXT = ("Prev", "Next", "Home", "Report a bug in GIMP")


@pytest.fixture(scope="module")
def gimp(asset: Callable[[str], Path]) -> Path:
    return asset("gimp-help-en")


@pytest.fixture(scope="module")
def sklearn_html(asset: Callable[[str], Path]) -> Path:
    return asset("sklearn-doc-html")


@pytest.fixture(scope="module")
def python_html(asset: Callable[[str], Path]) -> Path:
    return asset("python3.11-doc-html")


def _texts(record: dict[str, Any]) -> list[str]:
    return [i["text"] for i in record["items"] if i["type"] == "text"]


@pytest.mark.parametrize("page", sorted(GIMP_PAGES))
def test_gimp_pages_images_alt_and_order(gimp: Path, page: str) -> None:
    want = GIMP_PAGES[page]
    path = gimp / page
    record = html_to_record(path.read_bytes(), path=path)
    assert record["title"] == want["title"]
    images = [i for i in record["items"] if i["type"] == "image"]
    assert [(i["src"], i["alt"]) for i in images] == want["images"]
    assert all(i["path"] == str(gimp / i["src"]) and i["url"] is None for i in images)
    texts = _texts(record)
    assert texts[0] == want["title"]  # the navigation header's copy of the title is skipped
    for snippet in want["snippets"]:
        assert any(snippet in t for t in texts), snippet
    assert not any(t in NAV_TEXT for t in texts)
    items = record["items"]
    for before, src, after in want["around"]:
        at = next(n for n, i in enumerate(items) if i.get("src") == src)
        assert items[at - 1]["type"] == "text" and items[at - 1]["text"].startswith(before), (
            src, items[at - 1])
        assert items[at + 1]["type"] == "text" and items[at + 1]["text"].startswith(after), (
            src, items[at + 1])
    assert record["metadata"]["images_in_boilerplate"] >= 4  # prev/next/up/home
    assert validate_record(record) == record


def test_gimp_images_load_inside_the_manual(gimp: Path) -> None:
    path = gimp / "gimp-tool-crop.html"
    record = html_to_record(path.read_bytes(), path=path)
    results = load_images(record["items"], gimp)
    assert [r.reason for r in results] == ["ok"] * 10
    assert all(r.format == "PNG" and r.width and r.height for r in results)
    rotate = html_to_record((gimp / "gimp-tutorial-quickie-rotate.html").read_bytes(),
                            path=gimp / "gimp-tutorial-quickie-rotate.html")
    source, rotated = load_images(rotate["items"], gimp)[1:]
    assert source.format == rotated.format == "JPEG"
    assert (source.width, source.height) == (rotated.height, rotated.width)  # 90° CCW


def test_whole_gimp_manual_converts_and_its_images_load(gimp: Path, run_context: Any) -> None:
    pages = sorted(gimp.glob("*.html"))
    assert len(pages) >= 680
    stage = HtmlConvertStage(None, run_context())
    out = stage.process_rows([page_row(p) for p in pages])
    assert Counter(r[DECISION_COLUMN] for r in out) == {"keep": len(pages)}
    assert len(ledger_rows_of(out)) == len(pages)
    records = [validate_record({**{k: r[k] for k in ("doc_id", "source_id", "url", "path",
                                                      "title", "lang", "items", "metadata")}})
               for r in out]
    assert table_to_records(records_to_table(records)) == records
    unique = {i["path"]: i for r in records for i in r["items"] if i["type"] == "image"}
    assert len(unique) > 1000
    results = load_images(list(unique.values()), gimp, ImageFetchConfig())
    reasons = Counter(r.reason for r in results)
    assert reasons["ok"] >= 0.99 * len(unique), reasons
    assert set(reasons) <= {"ok", "image_missing"}, reasons


def test_sklearn_gallery_interleaves_text_and_plots(sklearn_html: Path) -> None:
    path = sklearn_html / "auto_examples/cluster/plot_kmeans_assumptions.html"
    record = html_to_record(path.read_bytes(), path=path)
    assert record["title"] == "Demonstration of k-means assumptions — scikit-learn 1.2.1 " \
        "documentation"
    assert record["lang"] == "en"
    images = [(i["src"], i["alt"]) for i in record["items"] if i["type"] == "image"]
    plot = "../../_images/sphx_glr_plot_kmeans_assumptions_00{}.png"
    assert images == [
        (plot.format(1), "Ground truth clusters, Mixture of Gaussian Blobs, Anisotropically "
                         "Distributed Blobs, Unequal Variance, Unevenly Sized Blobs"),
        (plot.format(2), "Unexpected KMeans clusters, Non-optimal Number of Clusters, "
                         "Anisotropically Distributed Blobs, Unequal Variance, Unevenly Sized "
                         "Blobs"),
        (plot.format(3), "Optimal Number of Clusters"),
        (plot.format(4), "Unevenly Sized Blobs with several initializations"),
        (plot.format(5), "Gaussian mixture clusters, Anisotropically Distributed Blobs, "
                         "Unequal Variance"),
    ]
    assert record["metadata"]["images_in_boilerplate"] == 2  # the logo, navbar and sidebar
    kinds = "".join("I" if i["type"] == "image" else "T" for i in record["items"])
    assert kinds.count("I") == 5 and "II" not in kinds  # text between every pair of plots
    assert kinds.startswith("TTT") and kinds.endswith("T")
    items = record["items"]
    first = next(n for n, i in enumerate(items) if i["type"] == "image")
    assert items[first - 1]["text"].startswith("import matplotlib.pyplot as plt")
    assert items[first + 1]["text"] == "Fit models and plot results"
    texts = _texts(record)
    assert "Demonstration of k-means assumptions" in texts
    assert "Data generation" in texts and "Final remarks" in texts
    assert not any("Toggle Menu" in t or t in ("Prev", "Up", "Next") for t in texts)
    # Plots live in html/_images: the document root is the doc tree, not the page's folder.
    results = load_images(items, sklearn_html)
    assert [r.reason for r in results] == ["ok"] * 5
    assert all(r.format == "PNG" for r in results)
    escaped = load_images(items, path.parent)
    assert [r.reason for r in escaped] == ["path_escape"] * 5


def test_python_docs_are_text_with_no_content_images(python_html: Path) -> None:
    for name in ("library/json.html", "tutorial/introduction.html"):
        path = python_html / name
        record = html_to_record(path.read_bytes(), path=path)
        assert [i for i in record["items"] if i["type"] == "image"] == [], name
        assert record["metadata"]["images_in_boilerplate"] == 3  # the py.svg logos, in nav
        assert record["metadata"]["n_chars"] > 10_000
    path = python_html / "library/json.html"
    record = html_to_record(path.read_bytes(), path=path)
    texts = _texts(record)
    assert texts[0] == "json — JSON encoder and decoder"
    assert "Source code: Lib/json/__init__.py" in texts
    assert any(t.startswith(">>> import json\n>>> json.dumps(['foo',") for t in texts)
    assert not any(t in ("index", "modules", "next", "previous", "Navigation") for t in texts)
    tutorials = sorted((python_html / "tutorial").glob("*.html"))
    records = [html_to_record(p.read_bytes(), path=p) for p in tutorials]
    n_images = sum(1 for r in records for i in r["items"] if i["type"] == "image")
    assert len(records) >= 15 and n_images == 0


def test_image_load_stage_on_a_real_page(sklearn_html: Path, run_context: Any) -> None:
    path = sklearn_html / "auto_examples/cluster/plot_kmeans_assumptions.html"
    ctx = run_context()
    row = HtmlConvertStage(None, ctx).process_rows([page_row(path)])[0]
    stage = ImageLoadStage(ImageLoadStage.Config(root=str(sklearn_html)), ctx)
    out = stage.process_rows([row])[0]
    assert out[DECISION_COLUMN] == "keep"
    assert [s["reason"] for s in out["image_status"]] == ["ok"] * 5
    assert all(len(b) > 10_000 for b in out["image_bytes"])
    assert [r["stage"] for r in ledger_rows_of([out])] == ["html_convert", "image_load"]
