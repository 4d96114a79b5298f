"""The PGC baseline: a grounded caption composed from decoded segments and their captions."""

import numpy as np

from pix2cap.bridge.content import DecodedEntity, build_content
from pix2cap.bridge.grounded_writer import compose_grounded_caption
from pix2cap.data.caption_formats import parse_grounded_caption

H = W = 40


def rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def decoded(circle_caption="a red circle to the left of the blue square", extra=False):
    """Sky (id 10) over grass (id 11); a circle (id 3, left) and a square (id 7, right) on
    the grass; optionally an extra instance without a segment id."""
    ground, circle, square = rect(20, 40, 0, 40), rect(10, 20, 2, 10), rect(10, 20, 25, 33)
    sky = ~(ground | circle | square)
    entities = [
        DecodedEntity(sky, "sky", isthing=False, caption="light blue sky", segment_id=10, score=0.99),
        DecodedEntity(ground, "grass", isthing=False, caption="green grass", segment_id=11),
        DecodedEntity(circle, "circle", caption=circle_caption, segment_id=3, score=0.9),
        DecodedEntity(square, "square", caption="a blue square on the grass", segment_id=7),
    ]
    if extra:
        entities.append(
            DecodedEntity(rect(2, 6, 2, 6), "star", caption="a star", source="extra", score=0.4)
        )
    return build_content(entities, (H, W))


def test_every_sentence_tags_its_segment_and_the_entities_it_names():
    out = compose_grounded_caption(decoded(extra=True))
    assert out["tagged"] == (
        "<10:Light blue sky>. <11:Green grass>. "
        "<3:A red circle> to the left of <7:the blue square>. "
        "<7:A blue square> on <11:the grass>."
    )
    assert out["text"] == (
        "Light blue sky. Green grass. A red circle to the left of the blue square. "
        "A blue square on the grass."
    )
    # Offsets point into the plain text; each phrase carries its segment and score.
    for phrase in out["phrases"]:
        assert out["text"][phrase["start"] : phrase["end"]] == phrase["phrase"]
    assert [(p["phrase"], p["segment_ids"], p["score"]) for p in out["phrases"]][:3] == [
        ("Light blue sky", [10], 0.99),
        ("Green grass", [11], None),
        ("A red circle", [3], 0.9),
    ]
    # The tagged form reads back with the dataset's parser to the same text and phrases.
    parsed = parse_grounded_caption(out["tagged"], segment_ids=[3, 7, 10, 11])
    assert parsed["text"] == out["text"]
    assert [(p["phrase"], p["segment_ids"], p["start"]) for p in parsed["phrases"]] == [
        (p["phrase"], p["segment_ids"], p["start"]) for p in out["phrases"]
    ]


def test_a_wrong_relation_object_is_restated_before_it_is_tagged():
    # The caption says "right of"; the masks refute it, so the sentence takes the circle's
    # strongest geometric relation instead and tags that object.
    out = compose_grounded_caption(decoded("a red circle to the right of the blue square"))
    assert "<3:A red circle> on <11:the grass>." in out["tagged"]


def test_nothing_to_write():
    content = build_content([], (H, W))
    assert compose_grounded_caption(content) == {"text": "", "tagged": "", "phrases": []}
