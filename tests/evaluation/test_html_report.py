"""HtmlReportWriter (the report of ``TEST.HTML_REPORT``) and the per-image PQ it sorts by."""

import json

import numpy as np
import pytest
import torch

from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.detection_utils import read_panoptic_result
from pix2cap.evaluation import HtmlReportWriter
from pix2cap.evaluation.html_report import image_pq
from pix2cap.structures import PanopticResult, Segment

CATEGORIES = {0: {"isthing": 1}, 4: {"isthing": 0}}


def _result(ids, segments):
    return PanopticResult(np.asarray(ids, dtype=np.int64), segments)


def test_image_pq_counts_matches_misses_and_false_positives():
    ids = np.zeros((4, 6), dtype=np.int64)
    ids[:, :3] = 1  # a thing
    ids[:, 3:] = 2  # stuff
    truth = _result(ids, [Segment(1, 0, "circle", True), Segment(2, 4, "sky", False)])
    perfect = _result(ids, [Segment(1, 0, "circle", True, 0.9, area=12),
                            Segment(2, 4, "sky", False, 0.9, area=12)])
    assert image_pq(truth, perfect, CATEGORIES) == {"PQ": 100.0, "SQ": 100.0, "RQ": 100.0}

    # The thing is missed (its pixels predicted as sky): sky matches at IoU 0.5 exactly,
    # which is not a match; every category then has PQ 0.
    merged = np.full((4, 6), 2, dtype=np.int64)
    missed = _result(merged, [Segment(2, 4, "sky", False, 0.9, area=24)])
    assert image_pq(truth, missed, CATEGORIES)["PQ"] == 0.0

    # A third of the thing's pixels go to the sky: thing IoU 8/12, sky IoU 12/16.
    shifted = ids.copy()
    shifted[:, 2] = 2
    partial = _result(shifted, [Segment(1, 0, "circle", True, 0.9, area=8),
                                Segment(2, 4, "sky", False, 0.9, area=16)])
    scores = image_pq(truth, partial, CATEGORIES)
    assert scores["PQ"] == pytest.approx(100 * (8 / 12 + 12 / 16) / 2)
    assert scores["RQ"] == 100.0


def _as_output(result: PanopticResult) -> dict:
    """A ground truth as the model would return it (every segment scored 1, captioned)."""
    info = [
        {"id": s.id, "category_id": s.category_id, "isthing": s.isthing, "score": 1.0,
         "caption": s.caption}
        for s in result.segments
    ]
    return {"panoptic_seg": (torch.from_numpy(result.panoptic_seg), info)}


def test_writer_pages_scores_and_index(tiny_shapes, tmp_path):
    dicts = DatasetCatalog.get("shapes_val")
    metadata = MetadataCatalog.get("shapes_val")
    writer = HtmlReportWriter("shapes_val", str(tmp_path / "report"), max_images=4)
    writer.reset()
    for record in dicts:
        truth = read_panoptic_result(record, metadata)
        writer.process([{"file_name": record["file_name"], "image_id": record["image_id"]}],
                       [_as_output(truth)])
    assert writer.evaluate() is None
    index = writer.write_index({"panoptic_seg": {"PQ": 100.0}})
    assert index == str(tmp_path / "report" / "index.html")
    pages = sorted((tmp_path / "report" / "pages").glob("*.entry.json"))
    assert len(pages) == 4  # max_images
    for page in pages:
        entry = json.loads(page.read_text())
        # The prediction is the ground truth: a perfect image.
        assert entry["scores"]["PQ"] == pytest.approx(100.0)
        assert entry["scores"]["predicted segments"] == entry["scores"]["true segments"]
        assert entry["segments"]["Prediction"] == entry["segments"]["Ground truth"]
    text = (tmp_path / "report" / "index.html").read_text()
    assert "<tr><th>PQ</th><td>100</td></tr>" in text
    # Sorted by PQ from the start (worst first).
    assert '<option value="pq" selected>PQ</option>' in text
