import numpy as np

from pix2cap.bridge import (
    PanopticCaptionBridge,
    align_to_mentions,
    make_training_pairs,
)
from pix2cap.data.caption_formats import find_grid_boxes
from pix2cap.data.datasets.builtin import load_shapes
from pix2cap.data.datasets.shapes import generate_shapes

SKY, CIRCLE, SQUARE, GRASS, STAR, UNSEEN = (
    [0, 0, 999, 400], [10, 10, 50, 50], [600, 600, 700, 700],
    [0, 380, 999, 999], [300, 300, 400, 400], [800, 50, 900, 150],
)


def _box(b):
    return f"<box>[[{b[0]}, {b[1]}, {b[2]}, {b[3]}]]</box>"


def test_align_to_mentions_orders_by_own_sentence_and_snaps_boxes():
    boxes = [SKY, CIRCLE, SQUARE, UNSEEN, GRASS, STAR]
    target = (
        f"Sky {_box([0, 0, 999, 401])} covers the top, and grass {_box(GRASS)} the bottom. "
        f"A circle {_box(CIRCLE)} is above the square {_box([601, 600, 700, 698])}. "
        f"A star {_box(STAR)} is right of the circle {_box(CIRCLE)}. "
        f"A square {_box(SQUARE)} is below the star {_box(STAR)}. "
        f"A moon {_box([900, 0, 999, 50])} is not in the list."
    )
    order, snapped = align_to_mentions(boxes, target)
    # Sky, then grass (first mentioned in the sky's sentence), circle, star; the square is
    # placed at its own sentence, not where the circle's sentence names it; UNSEEN last.
    assert order == [0, 4, 1, 5, 2, 3]
    found = [box for _, _, box in find_grid_boxes(snapped)]
    assert found[0] == tuple(SKY) and found[3] == tuple(SQUARE)  # within 3 units: snapped
    assert found[-1] == (900, 0, 999, 50)  # nothing within 3 units: left as written
    assert snapped.replace(_box(SKY), "").count("covers the top") == 1
    # A caption without boxes keeps the list order.
    assert align_to_mentions(boxes, "A plain caption.") == (list(range(6)), "A plain caption.")


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_decode_lists_stuff_before_things_each_in_reading_order():
    h, w = 40, 60
    seg = np.full((h, w), 1, dtype=np.int32)  # sky
    seg[25:] = 2  # grass
    seg[2:8, 2:8] = 3  # circle at the very top left, above the grass' top
    seg[30:36, 40:50] = 4  # square on the grass
    info = [
        {"id": 4, "category_id": 1, "isthing": True, "caption": "a square"},
        {"id": 2, "category_id": 2, "isthing": False, "caption": "grass"},
        {"id": 3, "category_id": 0, "isthing": True, "caption": "a circle"},
        {"id": 1, "category_id": 3, "isthing": False, "caption": "sky"},
    ]
    bridge = PanopticCaptionBridge(None, class_names=["circle", "square", "grass", "sky"])
    segments, extras = bridge.decode({"panoptic_seg": (seg, info)}, (h, w))
    assert [e.tag for e in segments] == ["sky", "grass", "circle", "square"]
    assert extras == []


def test_training_pairs_follow_the_caption_order(tmp_path):
    generate_shapes(tmp_path, "val", num_images=3, image_size=96, seed=5)
    records = load_shapes(str(tmp_path), "val")
    pairs = make_training_pairs(records, class_names=None, metadata=None)
    assert len(pairs) == 3
    for pair in pairs:
        listed = pair["prompt"].split("Region captions:")[0]
        listed_boxes = [box for _, _, box in find_grid_boxes(listed)]
        target_boxes = [box for _, _, box in find_grid_boxes(pair["target"])]
        # Every box of the caption is a listed box, and the sentences' subjects (their first
        # boxes) come in list order.
        assert set(target_boxes) <= set(listed_boxes)
        subjects = []
        for sentence in pair["target"].split(". "):
            boxes = [box for _, _, box in find_grid_boxes(sentence)]
            if boxes and boxes[0] not in subjects:
                subjects.append(boxes[0])
        assert len(subjects) >= 2
        assert subjects == [box for box in listed_boxes if box in subjects]
        region_part = pair["prompt"].split("Region captions:")[1]
        assert [box for _, _, box in find_grid_boxes(region_part)] == listed_boxes

