"""pix2cap.viewer.report: the report folder (files, page HTML, index), keys and the JSON
inlined in pages, checked without a browser on tiny images."""

import html
import json
import os
import re
from html.parser import HTMLParser
from importlib import resources

import numpy as np
import pytest
from PIL import Image

from pix2cap.structures import PanopticResult
from pix2cap.viewer import HtmlReport, ImageView, page_key, page_keys
from pix2cap.viewer.page import view_payload
from pix2cap.viewer.report import ASSETS, json_for_html
from tests.viewer.test_page import decode_indices

HOSTILE = "</script><img src=x onerror=alert(1)>"
SAFE_KEY = re.compile(r"[A-Za-z0-9._-]{1,120}")


class Tags(HTMLParser):
    """Start tags (name, attributes) and the text of every <script> of a document."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.texts = [], [], []
        self._script = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "script":
            self._script = [attrs, ""]

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append(tuple(self._script))
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self._script[1] += data
        else:
            self.texts.append(data)

    def find(self, tag, **attrs):
        return [
            a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())
        ]


def image(height=12, width=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def result(caption="a red car", height=12, width=16):
    seg = np.zeros((height, width), dtype=np.int64)
    seg[1:5, 2:8] = 5
    seg[height // 2 :, :] = 9
    infos = [
        {"id": 5, "category_id": 0, "isthing": True, "score": 0.9, "caption": caption},
        {"id": 9, "category_id": 1, "isthing": False, "score": 0.6, "caption": "road"},
    ]
    return PanopticResult.from_panoptic(seg, infos)


def views(caption="a red car"):
    grounded = {
        "text": f"{caption} on a road",
        "phrases": [{"start": 0, "end": len(caption), "segment_ids": [5]}],
    }
    return [
        ImageView("Prediction", result(caption), grounded_caption=grounded),
        ImageView("Ground truth", panoptic_caption=f"{caption} [[0.1, 0.1, 0.5, 0.4]]"),
    ]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def page_data(text):
    """The payload of a page: its one application/json block, parsed."""
    blocks = [body for attrs, body in Tags(text).scripts if attrs.get("type") == "application/json"]
    assert len(blocks) == 1 and text.count("application/json") == 1
    return json.loads(blocks[0])


def report_order(path):
    text = read(path)
    prefix = "window.PIX2CAP_REPORT = "
    assert text.startswith(prefix) and text.endswith(";\n")
    return json.loads(text[len(prefix) : -2])


# -- page_key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, key",
    [
        ("000001.jpg", "000001"),
        ("/data/coco/val2017/000000000139.jpg", "000000000139"),
        ("a b&c?.png", "a_b_c"),
        ("../../etc/passwd", "passwd"),
        ("<script>.jpg", "script"),
        ("über straße.jpg", "ber_stra_e"),
        (".hidden", "hidden"),
        ("", "image"),
        ("...", "image"),
        ("/", "image"),
        (12, "12"),
    ],
)
def test_page_key(name, key):
    assert page_key(name) == key
    assert SAFE_KEY.fullmatch(key)


def test_page_key_caps_the_length():
    key = page_key("x" * 500 + ".png")
    assert key == "x" * 120


# -- json_for_html ----------------------------------------------------------------------------


def test_json_for_html_round_trips_and_cannot_close_the_block():
    obj = {
        "caption": HOSTILE + " <!-- & -->  Tom & Jerry > 3 <b>",
        "lines": "a\u2028b\u2029c",
        "unicode": "straße ☃ 😀",
        "nested": [{"</SCRIPT>": [1, 2.5, None, True]}],
    }
    text = json_for_html(obj)
    assert json.loads(text) == obj
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert "</script" not in text.lower()
    assert "straße ☃ 😀" in text  # other characters are kept as they are


def test_json_for_html_is_standard_json_for_non_finite_numbers():
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    text = json_for_html({"PQ": float("nan"), "SQ": float("inf")})
    json.loads(text, parse_constant=reject)


# -- HtmlReport: files ----------------------------------------------------------------------


@pytest.fixture
def written(tmp_path):
    """A report of three pages (the second hostile) and its index."""
    out = tmp_path / "report"
    report = HtmlReport(str(out), title="shapes_val " + HOSTILE, thumb_size=8)
    entries = [
        report.add_page("img_a", image(seed=1), views(), scores={"PQ": 87.5, "caption": 0.25}),
        report.add_page(
            "img_b",
            image(seed=2),
            views(HOSTILE),
            title=HOSTILE,
            source="/data/" + HOSTILE,
            scores={"PQ": 12.125},
        ),
        report.add_page("img_c", image(seed=3), views(), scores={"PQ": None, "caption": 0.5}),
    ]
    index = report.write_index(["img_c", "img_a", "img_b"], default_sort="PQ")
    return out, report, entries, index


def test_report_writes_the_documented_files(written):
    out, _, entries, index = written
    assert index == str(out / "index.html")
    for name in ASSETS:
        packaged = resources.files("pix2cap.viewer").joinpath("assets", name).read_bytes()
        assert (out / "assets" / name).read_bytes() == packaged
    for key in ("img_a", "img_b", "img_c"):
        assert (out / "pages" / f"{key}.html").is_file()
        with Image.open(out / "media" / f"{key}.jpg") as jpg:
            assert jpg.format == "JPEG" and jpg.size == (16, 12)
        with Image.open(out / "media" / f"{key}.thumb.jpg") as thumb:
            assert thumb.format == "JPEG" and thumb.size == (8, 6)  # thumb_size 8
    assert (out / "report.js").is_file() and (out / "index.html").is_file()
    assert entries[0] == {
        "key": "img_a",
        "title": "img_a",
        "page": "pages/img_a.html",
        "thumb": "media/img_a.thumb.jpg",
        "scores": {"PQ": 87.5, "caption": 0.25},
        "segments": {"Prediction": 2, "Ground truth": 0},
    }
    for entry in entries:
        assert json.loads(read(out / "pages" / f"{entry['key']}.entry.json")) == entry
    # No temporary file of the atomic writes is left behind.
    names = {p.name for p in out.rglob("*")}
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    assert report_order(out / "report.js") == {
        "pages": [
            {"key": "img_c", "page": "pages/img_c.html"},
            {"key": "img_a", "page": "pages/img_a.html"},
            {"key": "img_b", "page": "pages/img_b.html"},
        ]
    }


def test_page_html_carries_the_payload_as_inert_json(written):
    out, _, _, _ = written
    text = read(out / "pages" / "img_a.html")
    payload = page_data(text)
    the_views = views()
    assert payload == {
        "key": "img_a",
        "title": "img_a",
        "source": None,
        "height": 12,
        "width": 16,
        "display": [12, 16],
        "image": "../media/img_a.jpg",
        "views": [view_payload(v, (12, 16), (12, 16)) for v in the_views],
        "scores": {"PQ": 87.5, "caption": 0.25},
    }
    tags = Tags(text)
    csp = tags.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert len(csp) == 1
    policy = csp[0]["content"]
    assert "default-src 'none'" in policy and "connect-src 'none'" in policy
    assert "img-src 'self' data:" in policy
    # Only local scripts, and nothing but the data block inline.
    sources = [a.get("src") for a, _ in tags.scripts if a.get("type") != "application/json"]
    assert sources == ["../report.js", "../assets/viewer.js"]
    assert [a["href"] for a in tags.find("link")] == ["../assets/viewer.css"]
    assert "PQ 87.5 · caption 0.25" in text


def test_hostile_caption_never_appears_raw(written):
    out, _, _, _ = written
    text = read(out / "pages" / "img_b.html")
    assert HOSTILE not in text
    assert "<img" not in text and "</script><" not in text
    assert text.lower().count("</script") == 3  # the three script elements' own end tags
    payload = page_data(text)
    # It is all there as data: the title, source, segment caption and both captions.
    assert payload["title"] == HOSTILE and payload["source"] == "/data/" + HOSTILE
    prediction, truth = payload["views"]
    assert prediction["segments"][0]["caption"] == HOSTILE
    assert prediction["grounded"][0] == {"text": HOSTILE, "segments": [5], "phrase": True}
    assert "".join(p["text"] for p in truth["panoptic"]).startswith(HOSTILE)
    # Visible text: the escaped title, shown as the literal string.
    tags = Tags(text)
    assert HOSTILE in tags.texts and html.escape(HOSTILE) in text
    index = read(out / "index.html")
    assert HOSTILE not in index
    assert html.escape("shapes_val " + HOSTILE) in index  # the report title, in <title> and <h1>
    assert Tags(index).texts.count(HOSTILE) == 1  # the card's title


def test_index_lists_pages_in_order_with_scores(written):
    out, _, _, _ = written
    tags = Tags(read(out / "index.html"))
    cards = tags.find("a", **{"class": "card"})
    assert [c["data-key"] for c in cards] == ["img_c", "img_a", "img_b"]
    assert [c["data-order"] for c in cards] == ["0", "1", "2"]
    assert [c["href"] for c in cards] == [f"pages/{c['data-key']}.html" for c in cards]
    assert [c["data-score-pq"] for c in cards] == ["", "87.5", "12.12"]
    assert [c["data-score-caption"] for c in cards] == ["0.5", "0.25", ""]
    thumbs = [a["src"] for a in tags.find("img")]
    assert thumbs == ["media/img_c.thumb.jpg", "media/img_a.thumb.jpg", "media/img_b.thumb.jpg"]
    options = tags.find("option")
    assert [o["value"] for o in options[:3]] == ["order", "pq", "caption"]
    assert "selected" in options[1] and "selected" not in options[2]  # default_sort="PQ"
    assert tags.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert [a["src"] for a, _ in tags.scripts] == ["assets/index.js"]
    assert "3 images" in tags.texts


def test_index_without_default_sort_keeps_dataset_order(tmp_path):
    report = HtmlReport(str(tmp_path), thumb_size=8)
    for key in ("b", "a"):
        report.add_page(key, image(), [ImageView("P", result())], scores={"PQ": 1.0})
    tags = Tags(read(report.write_index()))
    assert [c["data-key"] for c in tags.find("a", **{"class": "card"})] == ["b", "a"]
    assert not [o for o in tags.find("option") if "selected" in o]


def test_a_new_report_lists_pages_of_an_earlier_run(written):
    out, _, entries, _ = written
    again = HtmlReport(str(out), title="resumed", thumb_size=8)
    assert again.has_page("img_b") and not again.has_page("img_z")
    assert again.entry("img_b") == entries[1]
    assert again.entry("img_z") is None
    again.add_page("img_d", image(seed=4), views(), scores={"PQ": 50.0})
    again.write_index(["img_z", "img_b", "img_d", "img_b", "img_a"])
    cards = Tags(read(out / "index.html")).find("a", **{"class": "card"})
    assert [c["data-key"] for c in cards] == ["img_b", "img_d", "img_a"]
    assert [p["key"] for p in report_order(out / "report.js")["pages"]] == [
        "img_b",
        "img_d",
        "img_a",
    ]
    # The earlier pages themselves are untouched.
    assert page_data(read(out / "pages" / "img_a.html"))["title"] == "img_a"


@pytest.mark.parametrize("key", ["../evil", "a b", "a/b", "", ".hidden", "x" * 121])
def test_add_page_rejects_an_unsafe_key(tmp_path, key):
    report = HtmlReport(str(tmp_path / "r"))
    with pytest.raises(ValueError, match="page key"):
        report.add_page(key, image(), views())
    assert os.listdir(tmp_path / "r" / "pages") == []
    assert os.listdir(tmp_path / "r" / "media") == []
    assert sorted(os.listdir(tmp_path)) == ["r"]


@pytest.mark.parametrize(
    "bad",
    [
        image().astype(np.float32),
        image().astype(np.int64),
        image()[..., 0],
        np.concatenate([image(), image()[..., :1]], axis=2),  # RGBA
        image()[None],
    ],
)
def test_add_page_rejects_a_bad_image(tmp_path, bad):
    report = HtmlReport(str(tmp_path))
    with pytest.raises(ValueError, match="RGB uint8"):
        report.add_page("img", bad, [])
    assert not report.has_page("img")


def test_add_page_rejects_a_view_of_another_size(tmp_path):
    report = HtmlReport(str(tmp_path))
    with pytest.raises(ValueError, match="Prediction"):
        report.add_page("img", image(10, 16), [ImageView("Prediction", result())])
    assert not report.has_page("img")


@pytest.mark.parametrize("name", ["frame.0001.jpg", "a" * 119 + "._x.jpg"])
def test_add_page_accepts_every_key_page_key_makes(tmp_path, name):
    report = HtmlReport(str(tmp_path), thumb_size=8)
    key = page_key(name)
    report.add_page(key, image(), [])
    assert report.has_page(key)


@pytest.mark.parametrize("max_size, display", [(8, (6, 8)), (0, (12, 16)), (100, (12, 16))])
def test_max_size_downsizes_image_and_masks(tmp_path, max_size, display):
    report = HtmlReport(str(tmp_path), max_size=max_size, thumb_size=4)
    report.add_page("img", image(), [ImageView("P", result())])
    with Image.open(tmp_path / "media" / "img.jpg") as jpg:
        assert jpg.size == (display[1], display[0])
    with Image.open(tmp_path / "media" / "img.thumb.jpg") as thumb:
        assert thumb.size == (4, 3)
    payload = page_data(read(tmp_path / "pages" / "img.html"))
    assert payload["display"] == list(display)
    assert (payload["height"], payload["width"]) == (12, 16)
    assert decode_indices(payload["views"][0]["masks"]).shape == display
    # Boxes stay in the original image's pixels.
    assert payload["views"][0]["segments"][0]["box"] == [2, 1, 8, 5]


def test_thumbnail_blends_the_first_segmented_view(tmp_path):
    report = HtmlReport(str(tmp_path), max_size=0, thumb_size=16, jpeg_quality=100)
    gray = np.full((12, 16, 3), 128, dtype=np.uint8)
    # The first view has no segments: the thumbnail uses the second.
    the_views = [ImageView("Caption", panoptic_caption="x"), ImageView("P", result())]
    report.add_page("img", gray, the_views)
    with Image.open(tmp_path / "media" / "img.jpg") as jpg:
        plain = np.asarray(jpg.convert("RGB"), dtype=np.int64)
    with Image.open(tmp_path / "media" / "img.thumb.jpg") as thumb:
        blended = np.asarray(thumb.convert("RGB"), dtype=np.int64)
    assert np.abs(plain - 128).max() <= 3  # the image as it is
    void = blended[2:5, 10:15]  # no segment there
    masked = blended[8:12, 2:14]  # the road
    assert np.abs(void - 128).max() <= 3
    assert np.abs(masked - 128).max() > 20


def test_metrics_tables_render_numbers(tmp_path):
    report = HtmlReport(str(tmp_path), title="metrics")
    report.add_page("img", image(), [])
    metrics = {
        "panoptic_seg": {"PQ": 88.91234, "SQ": 80, "RQ": None, "per_class": [1.0, 2.0]},
        "caption <b>": {"CIDEr": 1.5, "name": "a&b", "truth": {"recall": 0.75}},
        "loss": 0.125,
    }
    text = read(report.write_index(metrics=metrics))
    tables = re.findall(r"<table class=\"metrics\">(.*?)</table>", text)
    assert len(tables) == 3

    def rows(table):
        return re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", table)

    assert tables[0].startswith("<caption>panoptic_seg</caption>")
    # Floats to 4 significant digits, ints as they are, None empty, lists left out.
    assert rows(tables[0]) == [("PQ", "88.91"), ("SQ", "80"), ("RQ", "")]
    assert tables[1].startswith("<caption>caption &lt;b&gt;</caption>")
    assert rows(tables[1]) == [("CIDEr", "1.5"), ("name", "a&amp;b"), ("truth/recall", "0.75")]
    assert tables[2] == "<caption>loss</caption><tr><th>value</th><td>0.125</td></tr>"
    assert "1 images" in text


def test_page_keys_are_unique_and_accepted(tmp_path):
    names = ["a/x.jpg", "b/x.jpg", "x.png", "x_2.jpg", "y z.jpg"]
    keys = page_keys(names)
    assert len(set(keys)) == len(keys) == 5
    assert keys[0] == "x" and keys[4] == "y_z"
    report = HtmlReport(str(tmp_path), thumb_size=4)
    for key in keys:
        assert SAFE_KEY.fullmatch(key)
        report.add_page(key, image(), [])
    assert all(report.has_page(k) for k in keys)


def test_empty_index(tmp_path):
    report = HtmlReport(str(tmp_path))
    text = read(report.write_index())
    assert "0 images" in text and 'class="card"' not in text
    assert report_order(tmp_path / "report.js") == {"pages": []}
