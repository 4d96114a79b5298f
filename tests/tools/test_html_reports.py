"""The ``--html`` reports of tools/demo.py, tools/pancap_infer.py and tools/visualize_data.py:
which pages they write and what each page shows (read back from its JSON block)."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np

from pix2cap.data.catalog import DatasetCatalog
from tests.tools.test_demo import LOADED_SCORE, _FakePanopticCaptioner, setup  # noqa: F401
from tests.tools.test_pancap_infer import FakePredictor, _write_images

REPO = Path(__file__).resolve().parents[2]
PAGE_DATA = re.compile(
    r'<script type="application/json" id="page-data">(.*?)</script>', re.DOTALL
)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"html_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_data(report: Path, key: str) -> dict:
    (block,) = PAGE_DATA.findall((report / "pages" / f"{key}.html").read_text())
    return json.loads(block)


def index_keys(report: Path) -> list:
    index = (report / "index.html").read_text()
    return re.findall(r'class="card" href="pages/([^"]+)\.html"', index)


def report_order(report: Path) -> list:
    text = (report / "report.js").read_text()
    return [p["key"] for p in json.loads(text[text.index("=") + 1 : text.rindex(";")])["pages"]]


def test_demo_html_report(setup):  # noqa: F811 (the fixture imported above)
    demo, config, images, out = setup
    _FakePanopticCaptioner.grounded = {
        "text": "a red circle beside the grass",
        "phrases": [
            {"phrase": "a red circle", "start": 0, "end": 12, "segment_ids": [1]},
            {"phrase": "the grass", "start": 20, "end": 29, "segment_ids": [2]},
        ],
    }
    report = out.parent / "report"
    argv = ["--config-file", str(config), "--input", str(images), "--output", str(out),
            "--html", str(report)]
    demo.main(demo.get_parser().parse_args(argv))
    assert index_keys(report) == ["a", "b"] == report_order(report)
    page = page_data(report, "a")
    assert (page["height"], page["width"], page["title"]) == (40, 48, "a.png")
    (view,) = page["views"]
    # The sky (score 0.2) is below --confidence 0.5: neither listed nor in the masks.
    assert [(s["id"], s["category"], s["score"]) for s in view["segments"]] == [
        (1, "circle", LOADED_SCORE), (2, "grass", 0.9)
    ]
    assert view["segments"][0]["caption"] == "a red circle to the left of the grass"
    assert view["segments"][0]["box"] == [0, 0, 24, 40]
    assert view["grounded"] == [
        {"text": "a red circle", "segments": [1], "phrase": True},
        {"text": " beside ", "segments": []},
        {"text": "the grass", "segments": [2], "phrase": True},
    ]
    assert page["scores"] == {"segments": 2, "grounded phrases": 2}
    assert (report / "media" / "a.jpg").is_file() and (report / "media" / "a.thumb.jpg").is_file()

    # --resume redoes an image whose page is missing, and only that one.
    (report / "pages" / "b.entry.json").unlink()
    _FakePanopticCaptioner.seen_inputs.clear()
    demo.main(demo.get_parser().parse_args(argv + ["--resume"]))
    assert len(_FakePanopticCaptioner.seen_inputs) == 1
    assert index_keys(report) == ["a", "b"]


def test_pancap_infer_html_report(tmp_path):
    tool = _load("pancap_infer")
    paths = _write_images(tmp_path / "images", 2)
    truth = "The sky [[0.000, 0.000, 1.000, 0.667]] is above a circle [[0.1, 0.3, 0.4, 0.7]]."
    name = "_html_report_pancap_dataset"
    DatasetCatalog.register(
        name,
        lambda: [
            {"file_name": str(p), "image_id": f"sam/{p.name}", "panoptic_caption": truth}
            for p in paths
        ],
    )
    try:
        out = tmp_path / "out"
        args = tool.get_parser().parse_args(["--dataset", name, "--output", str(out), "--html"])
        predictions, _ = tool.main(args, predictor=FakePredictor())
    finally:
        DatasetCatalog.remove(name)
    report = out / "report"
    assert index_keys(report) == ["img0", "img1"]
    page = page_data(report, "img0")
    assert page["title"] == "sam/img0.png"
    prediction, ground_truth = page["views"]
    assert [s["id"] for s in prediction["segments"]] == [1, 2, 3]
    # The panoptic caption, cut into text and boxes, reads back as the caption written.
    caption = predictions[0]["model_response"]
    assert "".join(p["text"] for p in prediction["panoptic"]) == caption
    boxes = {tuple(p["xyxy"]) for p in prediction["panoptic"] if p.get("literal")}
    assert (0.125, 0.333, 0.375, 0.667) in boxes  # the circle's box
    # Its grounded form ties mentions to the decoded segments.
    linked = {i for p in prediction["grounded"] for i in p["segments"]}
    assert linked == {1, 2, 3}
    assert ground_truth["name"] == "Ground truth" and ground_truth["masks"] is None
    assert [p["xyxy"] for p in ground_truth["panoptic"] if p.get("literal")] == [
        [0.0, 0.0, 1.0, 0.667], [0.1, 0.3, 0.4, 0.7]
    ]


def test_visualize_data_html_report(tiny_shapes, tmp_path):
    tool = _load("visualize_data")
    out = tmp_path / "vis"
    args = tool.get_parser().parse_args(
        ["--dataset", "shapes_val", "--output", str(out), "--num", "3", "--html"]
    )
    assert tool.main(args) == [str(out / "index.html")]
    assert not list(out.glob("*.png"))  # the report instead of pictures
    dicts = DatasetCatalog.get("shapes_val")[:3]
    keys = [Path(d["file_name"]).stem for d in dicts]
    assert index_keys(out) == keys
    for key, record in zip(keys, dicts):
        (view,) = page_data(out, key)["views"]
        assert view["name"] == "Ground truth"
        listed = {s["id"]: s["caption"] for s in view["segments"]}
        assert listed == {s["id"]: s["description"] for s in record["segments_info"]}
        text = "".join(p["text"] for p in view["grounded"])
        assert text == record["grounded_caption"]["text"]
        assert "".join(p["text"] for p in view["panoptic"]) == record["panoptic_caption"]
        # The masks PNG has the image's size and one index per listed segment.
        assert view["masks"].startswith("data:image/png;base64,")
    assert np.isclose(
        page_data(out, keys[0])["scores"]["segments"], len(dicts[0]["segments_info"])
    )
