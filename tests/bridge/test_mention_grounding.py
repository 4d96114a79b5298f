"""A written panoptic caption's mentions tied to the decoded segments their boxes came from."""

import numpy as np
import pytest

from pix2cap.bridge import PanopticCaptionBridge, build_caption_writer
from pix2cap.bridge.content import DecodedEntity, build_content
from pix2cap.bridge.mention_grounding import ground_mentions, match_box, mention_span
from pix2cap.data.caption_formats import format_box, parse_grounded_caption

H = W = 40
# Normalised boxes of the scene below, as build_content writes them.
SKY, GRASS = [0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]
CIRCLE, SQUARE, STAR = [0.05, 0.25, 0.25, 0.5], [0.625, 0.25, 0.825, 0.5], [0.05, 0.05, 0.15, 0.15]


def rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def scene():
    """Sky (id 10) over grass (id 11); a circle (id 3) and a square (id 7) on the grass; a
    star as an extra instance (no segment id)."""
    ground, circle, square = rect(20, 40, 0, 40), rect(10, 20, 2, 10), rect(10, 20, 25, 33)
    star = rect(2, 6, 2, 6)
    sky = ~(ground | circle | square | star)
    return build_content(
        [
            DecodedEntity(sky, "sky", isthing=False, segment_id=10, score=0.99),
            DecodedEntity(ground, "grass", isthing=False, segment_id=11),
            DecodedEntity(circle, "circle", segment_id=3, score=0.9),
            DecodedEntity(square, "square", segment_id=7, score=0.8),
            DecodedEntity(star, "star", source="extra", score=0.4),
        ],
        (H, W),
    )


def check_offsets(out):
    for phrase in out["phrases"]:
        assert out["text"][phrase["start"] : phrase["end"]] == phrase["phrase"]
    parsed = parse_grounded_caption(out["tagged"])
    assert parsed["text"] == out["text"]
    assert [(p["phrase"], p["start"], p["end"], p["segment_ids"]) for p in parsed["phrases"]] == [
        (p["phrase"], p["start"], p["end"], p["segment_ids"]) for p in out["phrases"]
    ]


def test_two_mentions_get_the_segment_ids_of_their_boxes():
    content = scene()
    assert [e.box for e in content.entities] == [SKY, GRASS, CIRCLE, SQUARE, STAR]
    caption = (
        f"A small red circle {format_box(CIRCLE)} is to the left of the blue square "
        f"{format_box(SQUARE)}."
    )
    out = ground_mentions(caption, content)
    assert out["text"] == "A small red circle is to the left of the blue square."
    assert out["tagged"] == "<3:A small red circle> is to the left of <7:the blue square>."
    assert out["phrases"] == [
        {"phrase": "A small red circle", "start": 0, "end": 18, "segment_ids": [3], "score": 0.9},
        {"phrase": "the blue square", "start": 37, "end": 52, "segment_ids": [7], "score": 0.8},
    ]
    check_offsets(out)


def test_unmatched_box_and_extra_instance_stay_untagged():
    caption = (
        f"The sky {format_box(SKY)} is above a moon [[0.800, 0.000, 0.900, 0.100]], "
        f"and a star {format_box(STAR)} is in the sky {format_box(SKY)}. Nothing else."
    )
    out = ground_mentions(caption, scene())
    assert out["text"] == "The sky is above a moon, and a star is in the sky. Nothing else."
    assert out["tagged"] == (
        "<10:The sky> is above a moon, and a star is in <10:the sky>. Nothing else."
    )
    assert [p["phrase"] for p in out["phrases"]] == ["The sky", "the sky"]
    check_offsets(out)


def test_copied_boxes_match_by_iou_and_ties_go_to_the_named_tag():
    content = scene()
    # An LM's box read back from its grid: not the same numbers, nearly the same box.
    assert match_box([0.0, 0.0, 0.999, 0.499], "light blue sky", content.entities).segment_id == 10
    assert match_box([0.0, 0.0, 0.6, 0.2], "the sky", content.entities) is None  # IoU 0.24
    loose = match_box([0.0, 0.0, 0.6, 0.2], "the sky", content.entities, min_iou=0.2)
    assert loose.segment_id == 10
    # Two regions with one box: the mention's noun decides.
    twin = scene()
    twin.entities[1].box = list(SKY)
    assert match_box(SKY, "the green grass", twin.entities).segment_id == 11
    assert match_box(SKY, "the light blue sky", twin.entities).segment_id == 10


@pytest.mark.parametrize(
    "phrase, mention",
    [
        ("A small red circle", "A small red circle"),
        ("is to the left of the sky", "the sky"),
        ("The image also shows a blue square", "a blue square"),
        ("and above the green grass", "the green grass"),
        ("covers the top of the image, and green grass", "green grass"),
        ("there are two circles", "two circles"),
        ("light blue sky", "light blue sky"),
    ],
)
def test_a_mention_is_the_noun_phrase_before_its_box(phrase, mention):
    text = "x. " + phrase
    start, end = mention_span(text, 3, len(text))
    assert text[start:end] == mention


def test_box_at_the_start_and_captions_without_boxes():
    out = ground_mentions(f"{format_box(CIRCLE)} A circle {format_box(CIRCLE)}.", scene())
    assert out["text"] == "A circle."
    assert out["tagged"] == "<3:A circle>."
    check_offsets(out)
    plain = ground_mentions("A plain caption.", scene())
    assert plain == {"text": "A plain caption.", "tagged": "A plain caption.", "phrases": []}


def _model_output():
    """Sky (id 5) over grass (id 6), a circle (id 2) on the grass."""
    seg = np.full((H, W), 5, dtype=np.int32)
    seg[20:] = 6
    seg[12:20, 4:12] = 2
    info = [
        {"id": 2, "category_id": 0, "isthing": True, "score": 0.9, "caption": "a red circle"},
        {"id": 5, "category_id": 3, "isthing": False, "score": 0.8, "caption": "blue sky"},
        {"id": 6, "category_id": 2, "isthing": False, "score": 0.7, "caption": "green grass"},
    ]
    return {"panoptic_seg": (seg, info)}


@pytest.mark.parametrize("writer", ["template", "concat_boxes", "concat"])
def test_every_bridge_result_has_the_grounded_caption(writer):
    bridge = PanopticCaptionBridge(
        build_caption_writer(writer), class_names=["circle", "square", "grass", "sky"]
    )
    out = bridge(_model_output(), (H, W))
    grounded = out["grounded_caption"]
    assert set(grounded) == {"text", "tagged", "phrases"}
    assert "[[" not in grounded["text"]
    check_offsets(grounded)
    if writer == "concat":  # no boxes written: nothing to tie
        assert grounded["text"] == out["caption"] and grounded["phrases"] == []
        return
    assert {p["segment_ids"][0] for p in grounded["phrases"]} == {2, 5, 6}
    for phrase in grounded["phrases"]:
        name = {2: "circle", 5: "sky", 6: "grass"}[phrase["segment_ids"][0]]
        assert name in phrase["phrase"].lower()
    if writer == "template":
        assert grounded["tagged"].startswith("<5:The blue sky> is above <6:the green grass>")
