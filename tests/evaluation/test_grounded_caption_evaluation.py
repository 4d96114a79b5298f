"""The grounded-caption (PGC) evaluator on a tiny registered dataset, with hand-computed values.

The phrase embedder is a cheap deterministic stand-in (phrases with the same last word are
identical, others orthogonal) and METEOR an exact-match stand-in, so only the PTB tokenizer of
the caption metrics needs java.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.data.caption_formats import parse_grounded_caption
from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
from pix2cap.data.detection_utils import read_panoptic_png
from pix2cap.evaluation import (
    EVALUATOR_REGISTRY,
    COCOPanopticEvaluator,
    GroundedCaptionEvaluator,
    PanCapEvaluator,
    Pix2CapEvaluator,
    build_evaluator,
)
from pix2cap.evaluation import densecap_evaluation, grounded_caption_evaluation

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="the PTB tokenizer of the caption metrics needs java"
)

H = W = 8
# Segment 1: rows 0-1 (16 px), segment 2: rows 2-3 (16 px), segment 3: rows 4-7 (32 px).
GT_IDS = np.zeros((H, W), dtype=np.int64)
GT_IDS[0:2], GT_IDS[2:4], GT_IDS[4:8] = 1, 2, 3
SEGMENTS = [
    {"id": 1, "category_id": 0, "iscrowd": 0, "isthing": True, "description": "a red circle"},
    {"id": 2, "category_id": 1, "iscrowd": 0, "isthing": True, "description": "a blue square"},
    {"id": 3, "category_id": 2, "iscrowd": 0, "isthing": False, "description": "the sky"},
]
# "a cloud" names no segment of the image: not a grounding target.
RAW_CAPTIONS = {
    1: "<1:A red circle> is above <2:a blue square> under <3:the sky> near <9:a cloud>.",
    2: "<3:The sky> covers <1:one red circle> and <2:one blue square>.",
}


class LastWordEmbedder:
    """Unit vectors by last word: phrases ending in the same word have similarity 1, others 0."""

    name = "last-word"

    def __call__(self, texts):
        words = sorted({t.split()[-1].lower() for t in texts})
        out = np.zeros((len(texts), max(len(words), 1)), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, words.index(t.split()[-1].lower())] = 1.0
        return out


class ExactMeteor:
    """METEOR 1 for an exact match, else 0; the corpus score is the mean."""

    def score_corpus(self, pairs):
        scores = [1.0 if cand == refs[0] else 0.0 for cand, refs in pairs]
        return (sum(scores) / len(scores) if scores else 0.0), scores

    def __call__(self, pairs):
        return [1.0 if cand == refs[0] else 0.0 for cand, refs in pairs]

    def close(self):
        pass


def _write_png(path, ids):
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)


@pytest.fixture
def dataset(tmp_path):
    """A registered ``coconut_pancap`` dataset of three images; image 3 has no grounded
    caption. Yields its name and dicts."""
    png = tmp_path / "pan.png"
    _write_png(png, GT_IDS)
    records = []
    for image_id in (1, 2, 3):
        record = {
            "file_name": str(tmp_path / f"{image_id}.jpg"),
            "image_id": image_id,
            "height": H,
            "width": W,
            "pan_seg_file_name": str(png),
            "segments_info": [dict(s) for s in SEGMENTS],
        }
        if image_id in RAW_CAPTIONS:
            record["grounded_caption"] = parse_grounded_caption(RAW_CAPTIONS[image_id], [1, 2, 3])
        records.append(record)
    name = f"_grounded_caption_test_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(
        evaluator_type="coconut_pancap",
        stuff_classes=["circle", "square", "sky"],
        thing_classes=["circle", "square"],
        stuff_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2},
        thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
    )
    yield name, records
    DatasetCatalog.remove(name)
    MetadataCatalog.pop(name, None)


def _input(record):
    """What the test mapper passes to evaluators (the grounded caption left out: the
    evaluator reads it from the catalog)."""
    return {k: v for k, v in record.items() if k != "grounded_caption"}


def _output(text, phrases, masks=None, ids=GT_IDS):
    """A model output: ``phrases`` are ``(phrase, segment_ids)``."""
    spans, position = [], 0
    for phrase, segment_ids in phrases:
        start = text.find(phrase, position)
        spans.append(
            {"phrase": phrase, "start": start, "end": start + len(phrase),
             "segment_ids": list(segment_ids), "score": 0.9}
        )
        position = max(start, 0)
    segments = [{"id": s["id"], "category_id": s["category_id"], "score": 0.9,
                 "caption": s["description"]} for s in SEGMENTS]
    out = {
        "panoptic_seg": (torch.from_numpy(ids).int(), segments),
        "grounded_caption": {"text": text, "tagged": f"<tagged>{text}", "phrases": spans},
    }
    if masks is not None:
        out["grounded_phrase_masks"] = torch.from_numpy(np.stack(masks))
    return out


def _perfect_output(record):
    caption = record["grounded_caption"]
    grounded = [(p["phrase"], p["segment_ids"]) for p in caption["phrases"] if p["segment_ids"]]
    return _output(caption["text"], grounded)


def _rows(row0, row1):
    mask = np.zeros((H, W), dtype=bool)
    mask[row0:row1] = True
    return mask


def _evaluator(name, output_dir=None, caption_metrics=False):
    return GroundedCaptionEvaluator(
        dataset_name=name,
        output_dir=output_dir,
        embedder=LastWordEmbedder(),
        compute_caption_metrics=caption_metrics,
        meteor_scorer=ExactMeteor(),
    )


def _run(evaluator, records, outputs):
    evaluator.reset()
    for record, output in zip(records, outputs):
        evaluator.process([_input(record)], [output])
    return evaluator.evaluate()


# One image, the text right, "a blue square" grounded in segments 2 and 3 (rows 2-7, 48 px):
# IoU 16/48 with the square, 32/48 with the sky.
#   mIoU: pairs (circle, circle) 1, (sky, sky) 1, then (square, square) 1/3 -> 7/9.
#   recall: circle and sky count; the next maximum, 1/3, is below 0.5 -> 2 of 3.
#   AP50: the square prediction takes the sky (IoU 2/3 >= 0.5) before the sky prediction, which
#   is then a false positive: TP, TP, FP -> precision 1 up to recall 2/3 -> 67 of 101 points.
WRONG_TEXT = "A red circle is above a blue square under the sky near a cloud."
WRONG_MIOU, WRONG_RECALL, WRONG_AP50 = 7 / 9, 2 / 3, 67 / 101


@needs_java
def test_perfect_prediction_scores_the_top(dataset, tmp_path):
    name, records = dataset
    evaluator = _evaluator(name, output_dir=str(tmp_path / "out"), caption_metrics=True)
    results = _run(evaluator, records, [_perfect_output(r) for r in records[:2]] + [
        _output("a caption without ground truth", [("ground truth", [1])])
    ])
    metrics = results["grounded_caption"]
    assert metrics["mIoU"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"):
        assert metrics[key] == pytest.approx(100.0), key
    assert metrics["CIDEr"] == pytest.approx(1000.0)  # CIDEr-D of identical captions: 10
    assert metrics["recalled_phrases"] == metrics["gt_phrases"] == 6
    assert metrics["num_images"] == 2
    assert metrics["images_without_gt_caption"] == 1
    assert metrics["images_without_prediction"] == 0
    assert metrics["pred_phrases_per_image"] == pytest.approx(3.0)
    assert metrics["gt_phrases_per_image"] == pytest.approx(3.5)  # "a cloud" included
    assert metrics["pred_phrases_with_segments"] == pytest.approx(1.0)
    assert metrics["phrase_embedder"] == "last-word"
    assert "SPICE" in metrics["skipped"] and "CAPTURE" in metrics["skipped"]
    assert list(metrics)[:3] == ["mIoU", "recall", "AP50"]

    written = json.loads((tmp_path / "out" / "grounded_caption_predictions.json").read_text())
    assert [p["image_id"] for p in written] == [1, 2, 3]  # every prediction, GT or not
    assert written[0]["text"] == records[0]["grounded_caption"]["text"]
    assert written[0]["tagged"].startswith("<tagged>")
    assert written[0]["phrases"][0] == {
        "phrase": "A red circle", "start": 0, "end": 12, "segment_ids": [1], "score": 0.9
    }


@needs_java
def test_wrong_caption_scores_lower(dataset):
    name, records = dataset
    caption = records[0]["grounded_caption"]
    grounded = [(p["phrase"], p["segment_ids"]) for p in caption["phrases"] if p["segment_ids"]]
    text = "A red circle is above a blue square under the sky near a green star."
    evaluator = _evaluator(name, caption_metrics=True)
    metrics = _run(evaluator, records[:1], [_output(text, grounded)])["grounded_caption"]
    assert metrics["mIoU"] == pytest.approx(1.0)  # the grounding is right
    assert metrics["METEOR"] == 0.0  # the exact-match stand-in
    # 13 of the 15 predicted words are in the 14-word reference ("green", "star" are not);
    # the prediction is the longer: no brevity penalty.
    assert metrics["BLEU-1"] == pytest.approx(100 * 13 / 15, abs=1e-4)
    assert 0.0 < metrics["BLEU-4"] < metrics["BLEU-1"]
    assert "not implemented" in metrics["skipped"]["CAPTURE"]


def test_phrase_grounded_in_the_wrong_segments(dataset):
    name, records = dataset
    output = _output(
        WRONG_TEXT, [("A red circle", [1]), ("a blue square", [2, 3]), ("the sky", [3])]
    )
    metrics = _run(_evaluator(name), records[:1], [output])["grounded_caption"]
    assert metrics["mIoU"] == pytest.approx(WRONG_MIOU)
    assert metrics["recall"] == pytest.approx(WRONG_RECALL)
    assert metrics["AP50"] == pytest.approx(WRONG_AP50)
    assert (metrics["recalled_phrases"], metrics["gt_phrases"]) == (2, 3)
    assert metrics["skipped"] == {"caption metrics": "compute_caption_metrics=False"}
    assert "BLEU-4" not in metrics

    # A phrase naming a segment the panoptic map does not have gets an empty mask: mIoU
    # pairs (circle, circle) 1 and (square, sky) 2/3; recall stops at (sky, square), whose
    # phrases differ.
    output = _output(
        WRONG_TEXT, [("A red circle", [1]), ("a blue square", [2, 3]), ("the sky", [7])]
    )
    metrics = _run(_evaluator(name), records[:1], [output])["grounded_caption"]
    assert metrics["mIoU"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert metrics["recall"] == pytest.approx(1 / 3)


def test_explicit_phrase_masks_are_used_instead_of_segment_ids(dataset):
    name, records = dataset
    phrases = [("A red circle", []), ("a blue square", []), ("the sky", [])]
    masks = [_rows(0, 2), _rows(2, 8), _rows(4, 8)]  # the wrong-segment masks
    metrics = _run(_evaluator(name), records[:1], [_output(WRONG_TEXT, phrases, masks)])
    metrics = metrics["grounded_caption"]
    assert metrics["mIoU"] == pytest.approx(WRONG_MIOU)
    assert metrics["recall"] == pytest.approx(WRONG_RECALL)
    assert metrics["AP50"] == pytest.approx(WRONG_AP50)
    assert metrics["pred_phrases_with_segments"] == 0.0

    # The masks win over correct segment ids.
    phrases = [("A red circle", [1]), ("a blue square", [2]), ("the sky", [3])]
    metrics = _run(_evaluator(name), records[:1], [_output(WRONG_TEXT, phrases, masks)])
    assert metrics["grounded_caption"]["mIoU"] == pytest.approx(WRONG_MIOU)
    # ... and without them the segment ids give the perfect grounding.
    metrics = _run(_evaluator(name), records[:1], [_output(WRONG_TEXT, phrases)])
    assert metrics["grounded_caption"]["mIoU"] == pytest.approx(1.0)

    evaluator = _evaluator(name)
    with pytest.raises(ValueError, match="one mask per phrase"):
        evaluator.process([_input(records[0])], [_output(WRONG_TEXT, phrases, masks[:2])])
    small = [m[:4, :4] for m in masks]
    with pytest.raises(ValueError, match="original resolution"):
        evaluator.process([_input(records[0])], [_output(WRONG_TEXT, phrases, small)])


def test_ungrounded_predicted_phrases_count_as_empty_predictions(dataset):
    name, records = dataset
    caption = records[0]["grounded_caption"]
    # The perfect grounded phrases plus "a cloud" with no segment: an empty mask.
    phrases = [(p["phrase"], p["segment_ids"]) for p in caption["phrases"]]
    metrics = _run(_evaluator(name), records[:1], [_output(caption["text"], phrases)])
    metrics = metrics["grounded_caption"]
    assert metrics["mIoU"] == pytest.approx(1.0) and metrics["recall"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)  # the false positive ranks after the hits
    assert metrics["pred_phrases_per_image"] == pytest.approx(4.0)
    assert metrics["pred_phrases_with_segments"] == pytest.approx(3 / 4)


def test_images_without_ground_truth_or_prediction(dataset, caplog):
    name, records = dataset
    evaluator = _evaluator(name)
    # Only image 3 (no GT caption) has a prediction: nothing to score, the counts say why.
    metrics = _run(evaluator, records[2:], [_perfect_output(records[0])])["grounded_caption"]
    assert metrics["num_images"] == 0 and metrics["images_without_gt_caption"] == 1
    assert "grounding and caption metrics" in metrics["skipped"]
    assert np.isnan(metrics["pred_phrases_per_image"])

    # Image 2's output has no grounded caption while image 1's has: image 2 counts as an
    # empty caption (mIoU 0, its phrases unrecalled).
    no_caption = {"panoptic_seg": _perfect_output(records[1])["panoptic_seg"]}
    with caplog.at_level("WARNING"):
        metrics = _run(evaluator, records[:2], [_perfect_output(records[0]), no_caption])
    metrics = metrics["grounded_caption"]
    assert metrics["images_without_prediction"] == 1
    assert metrics["num_images"] == 2
    assert metrics["mIoU"] == pytest.approx(0.5)
    assert metrics["recall"] == pytest.approx(3 / 6)
    assert metrics["AP50"] == pytest.approx(51 / 101)  # precision 1 up to recall 1/2
    assert any("empty captions" in r.getMessage() for r in caplog.records)

    # No output has a grounded caption: nothing reported, the dataset never read.
    evaluator = _evaluator("_a_dataset_that_is_not_registered")
    assert _run(evaluator, records, [no_caption] * 3) is None


def test_build_evaluator_for_a_coconut_pancap_dataset(dataset, monkeypatch, tmp_path):
    name, records = dataset
    assert EVALUATOR_REGISTRY.get("coconut_pancap") is PanCapEvaluator
    assert EVALUATOR_REGISTRY.get("GroundedCaptionEvaluator") is GroundedCaptionEvaluator
    # The packaged embedder is loaded lazily by the evaluator; the stand-in keeps this fast.
    monkeypatch.setattr(
        grounded_caption_evaluation, "SentenceTransformerEmbedder", lambda path: LastWordEmbedder()
    )
    evaluator = build_evaluator(None, name, str(tmp_path))
    assert isinstance(evaluator, PanCapEvaluator)
    assert [type(e) for e in evaluator._evaluators] == [
        COCOPanopticEvaluator, GroundedCaptionEvaluator
    ]
    evaluator._evaluators[1]._compute_caption_metrics = False
    results = _run(evaluator, records[:2], [_perfect_output(r) for r in records[:2]])
    assert list(results) == ["panoptic_seg", "grounded_caption"]
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert results["grounded_caption"]["mIoU"] == pytest.approx(1.0)
    assert results["grounded_caption"]["phrase_embedder"] == "last-word"
    assert (tmp_path / "grounded_caption_predictions.json").is_file()


def test_pix2cap_evaluator_reports_grounded_captions_only_when_there_are_some(
    dataset, monkeypatch
):
    name, records = dataset
    monkeypatch.setattr(densecap_evaluation, "MeteorScorer", ExactMeteor)
    monkeypatch.setattr(
        grounded_caption_evaluation, "SentenceTransformerEmbedder", lambda path: LastWordEmbedder()
    )
    evaluator = Pix2CapEvaluator(dataset_name=name, compute_caption_metrics=False)
    plain = []
    for record in records[:2]:
        output = _perfect_output(record)
        plain.append({"panoptic_seg": output["panoptic_seg"]})
    results = _run(evaluator, records[:2], plain)
    assert list(results) == ["panoptic_seg", "dense_caption"]

    grounded = [_perfect_output(r) for r in records[:2]]
    results = _run(evaluator, records[:2], grounded)
    assert list(results) == ["panoptic_seg", "dense_caption", "grounded_caption"]
    assert results["grounded_caption"]["recall"] == pytest.approx(1.0)


@pytest.mark.slow
def test_default_embedder_and_meteor_on_shapes(tmp_path):
    """The packaged MiniLM embedder and METEOR jar on shapes_val's ground truth as prediction."""
    records = DatasetCatalog.get("shapes_val")[:4]
    evaluator = GroundedCaptionEvaluator(dataset_name="shapes_val", output_dir=str(tmp_path))
    outputs = []
    for record in records:
        caption = record["grounded_caption"]
        ids = read_panoptic_png(record["pan_seg_file_name"])
        outputs.append({
            "panoptic_seg": (torch.from_numpy(ids), []),
            "grounded_caption": {"text": caption["text"], "tagged": caption["raw"],
                                 "phrases": caption["phrases"]},
        })
    metrics = _run(evaluator, records, outputs)["grounded_caption"]
    assert metrics["mIoU"] == pytest.approx(1.0) and metrics["recall"] == pytest.approx(1.0)
    assert metrics["METEOR"] > 90.0 and metrics["phrase_embedder"] == "all-MiniLM-L6-v2"
