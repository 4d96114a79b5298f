"""pix2cap.viewer reports in a real browser: headless Chromium driven by playwright opens a
small synthetic report from ``file://`` and checks what a person sees -- no request leaves the
folder, no script error, masks light up from phrases and phrases from masks, panoptic-caption
boxes are drawn, hostile captions stay text, the index reaches every page and sorts, and the
keyboard and mask controls work.

The module is skipped when playwright or a Chromium executable is missing (looked up in
``$PIX2CAP_CHROMIUM``, ``/usr/bin/chromium``, then ``chromium`` / ``chromium-browser`` on
PATH); with ``PIX2CAP_REQUIRE_BROWSER=1`` (CI) every test fails instead, saying why.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image

from pix2cap.data.catalog import Metadata
from pix2cap.structures import PanopticResult
from pix2cap.utils.visualizer import segment_colors
from pix2cap.viewer import HtmlReport, ImageView

REQUIRE_BROWSER = os.environ.get("PIX2CAP_REQUIRE_BROWSER", "") == "1"


def _find_chromium() -> str | None:
    configured = os.environ.get("PIX2CAP_CHROMIUM")
    if configured:
        usable = os.path.isfile(configured) and os.access(configured, os.X_OK)
        return configured if usable else None
    candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = None
try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError as error:  # pragma: no cover - depends on the environment
    UNAVAILABLE = f"playwright is not importable ({error}); pip install playwright"
else:
    CHROMIUM = _find_chromium()
    UNAVAILABLE = None if CHROMIUM else (
        "no Chromium executable ($PIX2CAP_CHROMIUM, /usr/bin/chromium, chromium or "
        "chromium-browser on PATH); e.g. apt-get install chromium"
    )


def _unavailable(reason: str) -> None:
    """Skip -- or, under PIX2CAP_REQUIRE_BROWSER=1, fail -- the calling test or fixture."""
    if REQUIRE_BROWSER:
        pytest.fail(f"PIX2CAP_REQUIRE_BROWSER=1, but {reason}", pytrace=False)
    pytest.skip(f"browser tests skipped: {reason}")


if UNAVAILABLE and not REQUIRE_BROWSER:
    pytest.skip(f"browser tests skipped: {UNAVAILABLE}", allow_module_level=True)
# Under PIX2CAP_REQUIRE_BROWSER=1 the module still loads: each test then fails (the browser
# fixture says why) while the rest of the suite runs.

# -- the synthetic report ---------------------------------------------------------------------

H, W = 96, 128  # each image; below the report's max_size, so display pixel == image pixel
VIEWPORT = {"width": 760, "height": 1400}  # a one-view page fits without scrolling

HOSTILE_IMG = '<img src=x onerror="window.__pwned=1">'
HOSTILE_SCRIPT = "</script><script>window.__pwned=2</script>"
HOSTILE = f"{HOSTILE_IMG} {HOSTILE_SCRIPT}"
HOSTILE_TITLE = 'pets <img src=x onerror="window.__pwned=3">'

# Contiguous 0 dog, 1 cat (things), 2 sky, 3 grass (stuff); colours far apart and from the image.
META = Metadata(
    "viewer_browser_test",
    thing_classes=["dog", "cat"],
    stuff_classes=["dog", "cat", "sky", "grass"],
    thing_colors=[(255, 160, 0), (255, 0, 255)],
    stuff_colors=[(255, 160, 0), (255, 0, 255), (0, 255, 255), (0, 255, 0)],
)
SKY, GRASS, DOG, CAT = 1, 2, 3, 4  # segment ids
NAMES = {SKY: "sky", GRASS: "grass", DOG: "dog", CAT: "cat"}
GRAY = 40  # the image: one dark grey, so a mask's colour dominates a screenshot

# The panoptic caption's boxes: the dog's in pixels, the cat's normalised.
DOG_BOX = (8, 30, 48, 80)  # x1, y1, x2, y2 pixels, the dog's mask's box
CAT_BOX_TEXT = "[[0.5625, 0.375, 0.9375, 0.8958]]"  # 72, 36, 120, 86 pixels


@dataclass
class Sample:
    key: str
    title: str
    ids: np.ndarray  # segment id per pixel
    result: PanopticResult
    grounded: dict
    panoptic: str
    scores: dict
    views: int  # views with masks


@dataclass
class Report:
    root: Path
    samples: list

    def url(self, relative: str) -> str:
        return (self.root / relative).as_uri()

    def page_url(self, index: int) -> str:
        return self.url(f"pages/{self.samples[index].key}.html")

    @property
    def keys(self) -> list:
        return [s.key for s in self.samples]


def _id_map(dx: int, with_cat: bool) -> np.ndarray:
    ids = np.full((H, W), GRASS, dtype=np.int64)
    ids[:40] = SKY
    ids[30:80, 8 + dx : 48 + dx] = DOG
    if with_cat:
        ids[36:86, 72:120] = CAT
    return ids


def _grounded(text: str, phrases: dict) -> dict:
    return {
        "text": text,
        "phrases": [
            {"start": text.index(p), "end": text.index(p) + len(p), "segment_ids": ids}
            for p, ids in phrases.items()
        ],
    }


def _sample(index: int) -> Sample:
    with_cat = index != 2
    ids = _id_map(0 if index != 1 else 6, with_cat)
    hostile = index == 0
    infos = [
        {"id": SKY, "category_id": 2, "score": 0.97, "caption": "a clear blue sky"},
        {"id": GRASS, "category_id": 3, "score": 0.95, "caption": "short green grass"},
        {"id": DOG, "category_id": 0, "score": 0.91, "caption": "a brown dog"},
    ]
    dog_box = "[[" + ", ".join(map(str, DOG_BOX)) + "]]"  # image 1's dog is 6 px right of it
    if with_cat:
        cat_caption = "a grey cat" + (" " + HOSTILE if hostile else "")
        infos.append({"id": CAT, "category_id": 1, "score": 0.88, "caption": cat_caption})
        text = "A dog and a cat, two pets, sit on the grass under the sky."
        phrases = {"dog": [DOG], "cat": [CAT], "two pets": [DOG, CAT], "grass": [GRASS],
                   "sky": [SKY]}
        panoptic = f"The dog {dog_box} sits next to the cat {CAT_BOX_TEXT}."
    else:
        text = "A dog sits on the grass under the sky."
        phrases = {"dog": [DOG], "grass": [GRASS], "sky": [SKY]}
        panoptic = f"The dog {dog_box} sits on the grass."
    if hostile:
        text += " " + HOSTILE
        panoptic += " " + HOSTILE
    return Sample(
        key=f"img_{index:03d}",
        title=HOSTILE_TITLE if hostile else f"image {index}",
        ids=ids,
        result=PanopticResult.from_panoptic(ids, infos, META),
        grounded=_grounded(text, phrases),
        panoptic=panoptic,
        scores={"PQ": [70.0, 30.0, 50.0][index], "segments": len(infos)},
        views=2 if index == 1 else 1,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Report:
    root = tmp_path_factory.mktemp("browser_report") / "report"
    html = HtmlReport(str(root), title="browser test report")
    samples = [_sample(i) for i in range(3)]
    for s in samples:
        image = np.full((H, W, 3), GRAY, dtype=np.uint8)
        views = [ImageView("Prediction", s.result, s.grounded, s.panoptic, META)]
        if s.views == 2:
            ground_truth = PanopticResult.from_panoptic(
                s.ids,
                [{"id": x.id, "category_id": x.category_id, "caption": x.caption}
                 for x in s.result.segments],
                META,
            )
            views.append(ImageView("Ground truth", ground_truth, s.grounded, s.panoptic, META))
        html.add_page(s.key, image, views, title=s.title, scores=s.scores,
                      source=f"synthetic/{s.key}.png")
    html.write_index(metrics={"panoptic_seg": {"PQ": 50.0, "SQ": 80.0}})
    return Report(root, samples)


# -- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if UNAVAILABLE:
        _unavailable(UNAVAILABLE)
    with sync_playwright() as p:
        try:
            instance = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except PlaywrightError as error:  # pragma: no cover - depends on the environment
            _unavailable(f"{CHROMIUM} does not start: {str(error).splitlines()[0]}")
        yield instance
        instance.close()


@dataclass
class Tab:
    """A page with what it logged: console errors, uncaught errors, every request, the
    requests that failed and those the route refused (anything not file: or data:)."""

    page: object
    errors: list = field(default_factory=list)
    requests: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    refused: list = field(default_factory=list)


@pytest.fixture
def tab(browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    t = Tab(page)

    def route(r):
        url = r.request.url
        if url.startswith(("file:", "data:")):
            r.continue_()
        else:
            t.refused.append(url)
            r.abort()

    context.route("**/*", route)
    page.on("request", lambda request: t.requests.append(request.url))
    page.on("requestfailed", lambda request: t.failed.append(request.url))
    page.on(
        "console",
        lambda m: t.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: t.errors.append(f"pageerror: {e}"))
    yield t
    context.close()


def open_image_page(tab: Tab, report: Report, index: int) -> object:
    page = tab.page
    page.goto(report.page_url(index))
    wait_loaded(page, report.samples[index].views)
    return page


# Waits pass wait_for_function a *function*: playwright evaluates it once (from the DevTools
# protocol, which the report's Content-Security-Policy does not govern) and then calls it. A
# bare expression is eval'ed again at every poll, which the policy (no 'unsafe-eval') refuses.
IMAGES_LOADED = (
    "selector => document.querySelectorAll(selector).length > 0 && "
    "Array.from(document.querySelectorAll(selector)).every(i => i.complete && i.naturalWidth)"
)


def wait_loaded(page, views: int) -> None:
    """Until every view's masks are decoded and its photo has its pixels."""
    page.wait_for_function(
        "n => document.body.dataset.masksLoaded === String(n)", arg=views, timeout=10_000
    )
    page.wait_for_function(IMAGES_LOADED, arg="img.photo", timeout=10_000)


def canvas_rgba(page, selector: str, nth: int = 0) -> np.ndarray:
    """The pixels of a canvas, uint8 [H, W, 4] (not a screenshot: the canvas' own buffer)."""
    data = page.evaluate(
        """([selector, nth]) => {
            const c = document.querySelectorAll(selector)[nth];
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let bytes = '';
            for (let i = 0; i < px.length; i += 8192) {
                bytes += String.fromCharCode.apply(null, px.subarray(i, i + 8192));
            }
            return {w: c.width, h: c.height, px: btoa(bytes)};
        }""",
        [selector, nth],
    )
    pixels = np.frombuffer(base64.b64decode(data["px"]), dtype=np.uint8)
    return pixels.reshape(data["h"], data["w"], 4)


def interior(ids: np.ndarray, margin: int = 2) -> dict:
    """Per segment id, its pixels at least ``margin`` pixels from any other id."""
    same = np.ones(ids.shape, dtype=bool)
    padded = np.pad(ids, margin, mode="edge")
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            shifted = padded[margin + dy : margin + dy + H, margin + dx : margin + dx + W]
            same &= shifted == ids
    return {int(i): same & (ids == i) for i in np.unique(ids)}


def stage_shot(page, view: int = 0) -> np.ndarray:
    """A screenshot of a view's stage (image + mask canvas + box canvas) as int RGB."""
    box = page.locator(".stage").nth(view).bounding_box()
    assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], box
    png = page.screenshot(clip=box)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)


def to_shot(mask: np.ndarray, shape) -> np.ndarray:
    """A canvas-sized mask resized (nearest) to a screenshot's size."""
    sh, sw = shape[:2]
    ys = np.minimum(((np.arange(sh) + 0.5) * H / sh).astype(int), H - 1)
    xs = np.minimum(((np.arange(sw) + 0.5) * W / sw).astype(int), W - 1)
    return mask[ys][:, xs]


def canvas_point(page, x: float, y: float, view: int = 0) -> tuple:
    """Viewport coordinates of canvas pixel (x, y)'s centre."""
    box = page.locator("canvas.boxes").nth(view).bounding_box()
    return (box["x"] + (x + 0.5) * box["width"] / W, box["y"] + (y + 0.5) * box["height"] / H)


def park_mouse(page) -> None:
    """The pointer on the page title, away from canvases, phrases and boxes."""
    page.locator("header h1").hover()


# -- tests ------------------------------------------------------------------------------------

PAGES = ["index", 0, 1, 2]


@pytest.mark.parametrize("which", PAGES, ids=[f"page-{p}" for p in PAGES])
def test_no_outside_request_and_no_console_error(tab, report, which):
    page = tab.page
    if which == "index":
        page.goto(report.url("index.html"))
        page.wait_for_function(IMAGES_LOADED, arg="img", timeout=10_000)
        assert page.locator("img").count() == 3  # the thumbnails
        page.select_option("#sort-key", "pq")
        page.keyboard.press("ArrowRight")
        expected = ["index.html", "assets/index.js", "assets/viewer.css"] + [
            f"media/{k}.thumb.jpg" for k in report.keys
        ]
    else:
        open_image_page(tab, report, which)
        # Exercise the interactive paths too: a script error in any of them must show.
        page.locator(".phrase").first.hover()
        page.mouse.move(*canvas_point(page, 20, 50))
        page.locator(".box-phrase").first.hover()
        park_mouse(page)
        page.keyboard.press("m")
        page.keyboard.press("m")
        page.locator("#masks-none").click()
        page.locator("#masks-all").click()
        key = report.samples[which].key
        expected = [f"pages/{key}.html", "report.js", "assets/viewer.js",
                    "assets/viewer.css", f"media/{key}.jpg"]
    assert tab.refused == [], f"requests outside the report were attempted: {tab.refused}"
    outside = [u for u in tab.requests if not u.startswith(("file:", "data:"))]
    assert outside == [], f"requests that are not file: or data: {outside}"
    assert tab.failed == [], f"requests that failed: {tab.failed}"
    assert tab.errors == [], f"console errors / page errors: {tab.errors}"
    # The recorder saw the report's own files (so an empty 'outside' list means something).
    requested = {u for u in tab.requests if u.startswith("file:")}
    for relative in expected:
        assert report.url(relative) in requested, (relative, sorted(requested))
    assert all(u.startswith(report.root.as_uri()) for u in requested), sorted(requested)
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_hovering_a_phrase_lights_its_segment(tab, report):
    page = open_image_page(tab, report, 0)
    sample = report.samples[0]
    colors = segment_colors(sample.result.segments, META)
    park_mouse(page)
    before = stage_shot(page)
    regions = {i: to_shot(m, before.shape) for i, m in interior(sample.ids).items()}
    view = page.locator("section.view").first

    def distance_to_colour(shot, segment_id):
        region = regions[segment_id]
        return np.abs(shot[region] - np.asarray(colors[segment_id])).mean()

    def mean_change(a, b, segment_id):
        return np.abs(a[regions[segment_id]] - b[regions[segment_id]]).mean()

    def naming(lit):
        text = sample.grounded["text"]
        return sorted(text[p["start"]:p["end"]] for p in sample.grounded["phrases"]
                      if set(p["segment_ids"]) & lit)

    shots = {}
    for word, lit in (("dog", {DOG}), ("cat", {CAT}), ("two pets", {DOG, CAT})):
        phrase = view.locator(".phrase", has_text=re.compile(f"^{word}$"))
        phrase.hover()
        active = page.evaluate(
            "() => Array.from(document.querySelectorAll('section.view .phrase.active'))"
            ".map(e => e.textContent)"
        )
        assert sorted(active) == naming(lit), (word, active)
        after = stage_shot(page)
        shots[word] = after
        # The hovered segments' regions change a lot and move towards their colours ...
        gain = {i: distance_to_colour(before, i) - distance_to_colour(after, i) for i in regions}
        for segment_id in lit:
            assert mean_change(before, after, segment_id) > 25, (word, segment_id)
            assert gain[segment_id] > 25, (word, gain)
        # ... every other region moves away from its own (dimmed), so only they are lit.
        assert all(gain[i] < -5 for i in regions if i not in lit), (word, gain)
        assert {i for i in regions if gain[i] > 0} == lit, (word, gain)
        park_mouse(page)

    # Between the two hovers only the dog's and the cat's regions differ (the rest stay dimmed).
    changes = {i: mean_change(shots["dog"], shots["cat"], i) for i in regions}
    assert changes[DOG] > 25 and changes[CAT] > 25, changes
    assert changes[SKY] < 3 and changes[GRASS] < 3, changes
    # Unhovered, the stage is as it was.
    assert np.abs(stage_shot(page) - before).mean() < 1
    assert tab.errors == []


def test_hovering_a_mask_marks_its_phrases_and_row(tab, report):
    page = open_image_page(tab, report, 0)
    sample = report.samples[0]
    view = page.locator("section.view").first
    segments = {s.id: s for s in sample.result.segments}

    def naming(segment_id):
        text = sample.grounded["text"]
        return [text[p["start"]:p["end"]] for p in sample.grounded["phrases"]
                if segment_id in p["segment_ids"]]

    def state():
        return page.evaluate(
            """() => {
                const v = document.querySelector('section.view');
                const all = selector => Array.from(v.querySelectorAll(selector));
                return {
                    phrases: all('.phrase.active').map(e => e.textContent),
                    rows: all('li.segment.active').map(e => e.dataset.segment),
                    info: v.querySelector('.info').textContent,
                };
            }"""
        )

    # A pixel inside each segment, away from its border.
    points = {DOG: (28, 55), CAT: (96, 60), SKY: (64, 10), GRASS: (60, 90)}
    assert all(sample.ids[y, x] == i for i, (x, y) in points.items())
    for segment_id, (x, y) in points.items():
        page.mouse.move(*canvas_point(page, x, y))
        page.wait_for_function(
            "id => document.querySelector('section.view li.segment.active')?.dataset.segment"
            " === String(id)",
            arg=segment_id,
        )
        now = state()
        assert sorted(now["phrases"]) == sorted(naming(segment_id)), (segment_id, now)
        assert now["rows"] == [str(segment_id)], now
        s = segments[segment_id]
        kind = "thing" if s.isthing else "stuff"
        assert f"{NAMES[segment_id]} ({kind})" in now["info"], now["info"]
        assert s.caption and s.caption in now["info"], now["info"]
        # The lit mask is the hovered one: its pixel is at the highlight alpha, others dimmed.
        alpha = canvas_rgba(page, "canvas.masks")[..., 3]
        assert alpha[y, x] == round(0.85 * 255)
        other = [i for i in points if i != segment_id][0]
        ox, oy = points[other]
        assert alpha[oy, ox] == round(0.45 * 0.25 * 255)
    assert naming(DOG) == ["dog", "two pets"]  # the test data names the dog twice

    park_mouse(page)  # leaving the canvas clears everything
    now = state()
    assert now["phrases"] == [] and now["rows"] == [], now
    assert view.locator(".info").text_content().startswith("Hover a segment")
    assert tab.errors == []


def test_hovering_a_box_phrase_draws_its_box(tab, report):
    page = open_image_page(tab, report, 0)
    view = page.locator("section.view").first
    yellow = np.array([255, 221, 0])

    def is_yellow(pixel):
        return pixel[3] > 200 and np.abs(pixel[:3].astype(int) - yellow).max() < 40

    assert canvas_rgba(page, "canvas.boxes")[..., 3].max() == 0

    # Box 0: the dog's, written in pixels [[8, 30, 48, 80]].
    view.locator('.box-phrase[data-box="0"]').hover()
    assert view.locator('.box-phrase[data-box="0"]').text_content() == "The dog"
    rgba = canvas_rgba(page, "canvas.boxes")
    x1, y1, x2, y2 = DOG_BOX
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    edges = {"left": (x1, cy), "top": (cx, y1), "right": (x2 - 1, cy), "bottom": (cx, y2 - 1)}
    for name, (x, y) in edges.items():
        assert is_yellow(rgba[y, x]), (name, rgba[y, x])
    assert rgba[cy, cx, 3] == 0, rgba[cy, cx]  # the centre stays clear
    assert rgba[10, 100, 3] == 0  # and so does everything away from the box
    drawn = rgba[..., 3] > 0
    ys, xs = np.nonzero(drawn)
    assert x1 - 4 <= xs.min() and xs.max() <= x2 + 4 and y1 - 4 <= ys.min() and ys.max() <= y2 + 4
    # The phrase and its [[...]] literal are marked.
    active = view.locator(".box-phrase.active, .box-literal.active")
    assert active.count() == 2

    park_mouse(page)  # mouse leave clears the box
    assert canvas_rgba(page, "canvas.boxes")[..., 3].max() == 0
    assert view.locator(".box-phrase.active, .box-literal.active").count() == 0

    # Box 1 from its literal: the cat's, written normalised -> 72, 36, 120, 86 pixels.
    literal = view.locator('.box-literal[data-box="1"]')
    assert literal.text_content() == CAT_BOX_TEXT
    literal.hover()
    rgba = canvas_rgba(page, "canvas.boxes")
    assert is_yellow(rgba[60, 72]) and is_yellow(rgba[36, 96]), (rgba[60, 72], rgba[36, 96])
    assert rgba[60, 96, 3] == 0 and rgba[cy, x1, 3] == 0  # its centre; the dog's old edge
    park_mouse(page)
    assert canvas_rgba(page, "canvas.boxes")[..., 3].max() == 0
    assert tab.errors == []


def test_hostile_caption_stays_text(tab, report):
    page = open_image_page(tab, report, 0)
    view = page.locator("section.view").first
    for where in (".grounded", ".panoptic", f'li.segment[data-segment="{CAT}"]'):
        text = view.locator(where).text_content()
        assert HOSTILE_IMG in text and HOSTILE_SCRIPT in text, (where, text)
    assert page.locator("h1").text_content() == HOSTILE_TITLE
    assert page.title().startswith(HOSTILE_TITLE)
    # The hostile segment's caption in the info panel is text too.
    page.mouse.move(*canvas_point(page, 96, 60))
    assert HOSTILE_IMG in view.locator(".info").text_content()
    # No element came of it: no img[src=x], only the page's own three scripts, no handler ran.
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator("img").count() == 1  # the photo
    assert page.evaluate(
        "() => Array.from(document.scripts).map(s => s.id || s.getAttribute('src'))"
    ) == ["page-data", "../report.js", "../assets/viewer.js"]
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # The index lists its title as text as well.
    page.goto(report.url("index.html"))
    card = page.locator(f'a.card[data-key="{report.keys[0]}"] .title')
    assert card.text_content() == HOSTILE_TITLE
    assert page.locator('img[src="x"]').count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # And the page's HTML never holds the markup raw (the JSON block escapes '<').
    raw = (report.root / "pages" / f"{report.keys[0]}.html").read_text(encoding="utf-8")
    assert HOSTILE_SCRIPT not in raw and "<img src=x" not in raw
    assert tab.errors == []


def test_index_links_every_page_and_sorts(tab, report):
    page = tab.page
    index_url = report.url("index.html")
    page.goto(index_url)
    cards = page.locator("a.card")
    assert cards.count() == len(report.samples)

    def order():
        return cards.evaluate_all("cs => cs.map(c => c.dataset.key)")

    assert order() == report.keys  # the dataset's order first
    links = cards.evaluate_all("cs => cs.map(c => [c.dataset.key, c.getAttribute('href')])")
    reached = set()
    titles = {s.key: s.title for s in report.samples}
    for key, href in links:
        page.goto(urljoin(index_url, href))
        data = json.loads(page.locator("#page-data").text_content())
        assert data["key"] == key
        assert page.locator("h1").text_content() == titles[key]
        assert page.url.startswith(report.url(f"pages/{key}.html"))
        reached.add(data["key"])
    assert reached == set(report.keys)

    page.goto(index_url)
    by_pq = [s.key for s in sorted(report.samples, key=lambda s: s.scores["PQ"])]
    page.select_option("#sort-key", "pq")
    assert order() == by_pq == ["img_001", "img_002", "img_000"]
    page.select_option("#sort-direction", "desc")
    assert order() == by_pq[::-1]
    page.select_option("#sort-direction", "asc")
    page.select_option("#sort-key", "segments")  # 3 segments first, ties in dataset order
    assert order() == ["img_002", "img_000", "img_001"]
    page.select_option("#sort-key", "order")
    assert order() == report.keys
    assert tab.errors == []


def test_keyboard_navigation_and_mask_toggle(tab, report):
    page = open_image_page(tab, report, 0)
    assert page.locator("#nav-position").text_content() == "1 / 3"
    assert "disabled" in page.locator("#nav-prev").get_attribute("class")

    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(re.escape(report.page_url(1)) + "(#.*)?$"))
    wait_loaded(page, report.samples[1].views)
    assert json.loads(page.locator("#page-data").text_content())["key"] == report.keys[1]
    assert page.locator("#nav-position").text_content() == "2 / 3"

    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(re.escape(report.page_url(0)) + "(#.*)?$"))
    wait_loaded(page, report.samples[0].views)
    assert json.loads(page.locator("#page-data").text_content())["key"] == report.keys[0]

    # m hides every mask: the mask canvas becomes fully transparent, m again brings it back.
    assert canvas_rgba(page, "canvas.masks")[..., 3].max() > 0
    page.keyboard.press("m")
    assert canvas_rgba(page, "canvas.masks")[..., 3].max() == 0
    assert not page.locator("#masks-toggle").is_checked()
    # The setting travels to the next page in the URL: masks stay hidden there.
    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(re.escape(report.page_url(1)) + "#masks=0.*$"))
    wait_loaded(page, report.samples[1].views)
    for nth in range(2):
        assert canvas_rgba(page, "canvas.masks", nth)[..., 3].max() == 0
    page.keyboard.press("m")
    for nth in range(2):
        assert canvas_rgba(page, "canvas.masks", nth)[..., 3].max() > 0
    # i goes to the index.
    page.keyboard.press("i")
    page.wait_for_url(report.url("index.html"))
    assert page.locator("a.card").count() == 3
    assert tab.errors == []


def test_mask_buttons_and_opacity(tab, report):
    page = open_image_page(tab, report, 1)  # two views: the controls act on both
    sample = report.samples[1]
    inside = interior(sample.ids)
    counts = {i: int(m.sum()) for i, m in inside.items()}
    assert min(counts.values()) > 50, counts

    def fill_alphas():
        """Per view, the set of alpha values inside the segments (away from borders)."""
        out = []
        for nth in range(2):
            alpha = canvas_rgba(page, "canvas.masks", nth)[..., 3]
            out.append(set(int(a) for m in inside.values() for a in np.unique(alpha[m])))
        return out

    def total_alpha():
        return [int(canvas_rgba(page, "canvas.masks", n)[..., 3].sum()) for n in range(2)]

    assert fill_alphas() == [{round(0.45 * 255)}] * 2  # the default opacity
    page.locator("#masks-none").click()
    assert total_alpha() == [0, 0]
    assert not page.locator("#masks-toggle").is_checked()
    page.locator("#masks-all").click()
    assert fill_alphas() == [{round(0.45 * 255)}] * 2
    assert page.locator("#masks-toggle").is_checked()

    slider = page.locator("#masks-opacity")
    slider.fill("80")
    assert fill_alphas() == [{round(0.80 * 255)}] * 2
    slider.fill("20")
    assert fill_alphas() == [{round(0.20 * 255)}] * 2
    # The checkbox hides and shows as well; moving the slider while hidden shows them again.
    page.locator("#masks-toggle").uncheck()
    assert total_alpha() == [0, 0]
    slider.fill("60")
    assert fill_alphas() == [{round(0.60 * 255)}] * 2
    assert page.locator("#masks-toggle").is_checked()
    # A screenshot agrees: more opacity, more of the segment colours over the grey image.
    low = stage_shot_sum(page, "20", slider)
    high = stage_shot_sum(page, "90", slider)
    assert high > low + 20, (low, high)
    assert tab.errors == []


def stage_shot_sum(page, value: str, slider) -> float:
    """The mean distance of the first stage's screenshot from the image's grey at an
    opacity of ``value`` percent."""
    slider.fill(value)
    return float(np.abs(stage_shot(page) - GRAY).mean())
