import numpy as np
import pytest

from pix2cap.bridge.content import (
    Attribute,
    DecodedEntity,
    Entity,
    PanopticContent,
    build_content,
)
from pix2cap.bridge.geometry import geometric_relations
from pix2cap.bridge.grounding import grounded_caption, reference
from pix2cap.bridge.phrases import DETERMINERS, caption_attributes
from pix2cap.structures.masks import mask_stats

H = W = 40


def rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def rels(masks, isthing):
    return {(i, j, t) for i, j, t in geometric_relations(masks, isthing)}


def test_left_right_above_below():
    a, b = rect(10, 20, 0, 8), rect(10, 20, 20, 30)
    assert rels([a, b], [True, True]) == {(0, 1, "left_of")}
    assert rels([b, a], [True, True]) == {(0, 1, "right_of")}
    c, d = rect(0, 8, 10, 20), rect(20, 30, 10, 20)
    assert rels([c, d], [True, True]) == {(0, 1, "above")}
    assert rels([d, c], [True, True]) == {(0, 1, "below")}
    # Diagonal: both hold.
    assert rels([rect(0, 5, 0, 5), rect(30, 35, 30, 35)], [True, True]) == {
        (0, 1, "left_of"),
        (0, 1, "above"),
    }


def test_on_a_stuff_region_below():
    ground = rect(20, 40, 0, 40)
    thing = rect(5, 20, 10, 20)  # bottom row 19 sits right on top of the ground
    sky = rect(0, 20, 0, 40) & ~thing
    found = rels([thing, ground, sky], [True, False, False])
    assert (0, 1, "on") in found
    # The sky surrounds the thing on three sides but is not under it: not "on"; not inside either
    # (the ground holds a third of its ring).
    assert not any(r[2] in ("on", "inside") and r[1] == 2 for r in found)
    # Stuff-stuff: only above/below.
    assert (1, 2, "below") in found


def test_inside_a_surrounding_region_is_not_on():
    sky = ~rect(10, 20, 10, 20)
    thing = rect(10, 20, 10, 20)
    found = rels([thing, sky], [True, False])
    assert found == {(0, 1, "inside")}


def test_next_to_and_overlapping():
    a, b = rect(10, 20, 5, 15), rect(12, 22, 15, 25)  # touching columns 14|15, extents overlap rows
    # x-overlap is 0 so left_of holds: directional wins, no next_to.
    assert rels([a, b], [True, True]) == {(0, 1, "left_of")}
    # Interlocking L-shapes: extents overlap both ways, masks touch -> next_to only.
    l1 = rect(0, 20, 0, 10) | rect(10, 20, 10, 20)
    l2 = rect(0, 10, 10, 20) | rect(0, 20, 20, 22)
    assert rels([l1, l2], [True, True]) == {(0, 1, "next_to")}
    # Masks sharing pixels (an extra instance over a segment).
    assert (0, 1, "overlapping") in rels([rect(0, 20, 0, 20), rect(5, 15, 5, 15)], [True, True])


def test_nothing_invented_when_masks_do_not_support_it():
    # A hollow square and a blob in its middle that does not touch it: extents overlap fully,
    # no contact, the blob's ring is void -> no relation at all.
    ring = rect(0, 40, 0, 40) & ~rect(5, 35, 5, 35)
    blob = rect(15, 25, 15, 25)
    assert rels([ring, blob], [True, True]) == set()
    # Empty masks take part in nothing.
    assert rels([np.zeros((H, W), bool), blob], [True, True]) == set()


def test_caption_attributes():
    assert caption_attributes("a large red striped circle to the left of the blue square", "circle") == (
        "large red striped"
    )
    assert caption_attributes("light blue sky covering the top of the image", "sky") == "light blue"
    # Head noun found through the fallback (tag not in the caption): the phrase's last word.
    assert caption_attributes("a tall man in a black suit", "person") == "tall"
    assert caption_attributes("", "dog") is None
    assert caption_attributes("the dog", "dog") is None


def test_build_content_dict_form_and_caption_relations():
    ground = rect(20, 40, 0, 40)
    c1 = rect(10, 20, 2, 10)
    c2 = rect(10, 20, 25, 33)
    sky = ~(ground | c1 | c2)
    entities = [
        DecodedEntity(sky, "sky", isthing=False, caption="light blue sky", segment_id=4),
        DecodedEntity(c1, "circle", caption="a red circle to the left of the blue square", score=0.9, segment_id=1),
        DecodedEntity(c2, "square", caption="a blue square", score=0.8, segment_id=2),
        DecodedEntity(ground, "grass", isthing=False, caption="green grass", segment_id=3),
        DecodedEntity(np.zeros((H, W), bool), "ghost", caption="a ghost"),
    ]
    content = build_content(entities, (H, W))
    d = content.to_dict()
    assert set(d) == {"entities", "attributes", "relations", "global"}
    assert [e["name"] for e in d["entities"]] == ["sky", "circle", "square", "grass"]
    assert d["entities"][1] == {"id": 2, "name": "circle", "box": [0.05, 0.25, 0.25, 0.5]}
    assert {"entity": 2, "text": "red"} in d["attributes"]
    assert {"entity": 1, "text": "light blue"} in d["attributes"]
    assert {"entities": [2, 4], "text": "on"} in d["relations"]
    assert {"entities": [3, 4], "text": "on"} in d["relations"]
    assert {"entities": [2, 3], "text": "to the left of"} in d["relations"]
    # The caption relation names an object that geometry already gives with the same words:
    # listed once.
    assert sum(r == {"entities": [2, 3], "text": "to the left of"} for r in d["relations"]) == 1
    assert d["global"][0] == "the image shows two objects"
    full = content.to_full_dict()
    assert full["entities"][1]["grid_box"] == [50, 250, 250, 500]
    assert {r["source"] for r in full["relations"]} <= {"geometry", "caption"}


def test_caption_relation_requires_a_unique_object():
    a, b, c = rect(0, 5, 0, 5), rect(30, 35, 0, 5), rect(30, 35, 30, 35)
    entities = [
        DecodedEntity(a, "circle", caption="a circle resting beside the square"),
        DecodedEntity(b, "square", caption="a red square"),
        DecodedEntity(c, "square", caption="a blue square"),
    ]
    content = build_content(entities, (H, W))
    assert not [r for r in content.relations if r.source == "caption"]
    entities[0].caption = "a circle resting beside the blue square"
    content = build_content(entities, (H, W))
    caption_rels = [r for r in content.relations if r.source == "caption"]
    assert [(r.subject, r.object, r.text) for r in caption_rels] == [(1, 3, "resting beside")]


def scene(circle_caption, square_caption="a blue square", third=None):
    """Sky over grass; a circle (left) and a square (right), both standing on the grass."""
    ground = rect(20, 40, 0, 40)
    circle, square = rect(10, 20, 2, 10), rect(10, 20, 25, 33)
    masks = [circle, square] + ([third[0]] if third else [])
    sky = ~(ground | circle | square | (third[0] if third else ground))
    entities = [
        DecodedEntity(sky, "sky", isthing=False, caption="light blue sky covering the top"),
        DecodedEntity(ground, "grass", isthing=False, caption="green grass"),
        DecodedEntity(circle, "circle", caption=circle_caption),
        DecodedEntity(square, "square", caption=square_caption),
    ]
    if third:
        entities.append(DecodedEntity(third[0], third[1], caption=third[2]))
    assert all(m.any() for m in masks)
    return build_content(entities, (H, W))


def test_caption_relation_against_the_centroids_is_refuted():
    content = scene("a red circle to the right of the blue square")
    stated = [(r.subject, r.object, r.text) for r in content.relations if r.source == "caption"]
    assert stated == []
    refuted = [(r.subject, r.object, r.text) for r in content.refuted_caption_relations]
    assert refuted == [(3, 4, "to the right of")]
    assert 3 not in content.caption_relations
    # Stated the right way round it stands (and is the geometric relation already listed).
    content = scene("a red circle to the left of the blue square")
    assert content.refuted_caption_relations == []
    assert content.caption_relations[3].source == "geometry"
    assert content.caption_relations[3].text == "to the left of"


def test_grounded_caption_keeps_what_the_masks_support():
    content = scene("a red circle to the left of the blue square", "a blue square")
    assert grounded_caption(content, 3) == "a red circle to the left of the blue square"
    # No words after the head noun, and stuff captions: unchanged.
    assert grounded_caption(content, 4) == "a blue square"
    assert grounded_caption(content, 1) == "light blue sky covering the top"
    # Two objects, each named uniquely ("between" is never a relation of its own): unchanged.
    between = "a red circle on the horizon between the sky and the grass"
    assert grounded_caption(scene(between), 3) == between
    # The right object under the wrong colour: restated with its own colour ...
    content = scene("a red circle to the left of the green square", "a small blue square")
    assert grounded_caption(content, 3) == "a red circle to the left of the blue square"
    # ... or by its tag alone when it has no colour word and is the only one of its kind.
    content = scene("a red circle to the left of the green square", "a small square")
    assert grounded_caption(content, 3) == "a red circle to the left of the square"
    # With two circles, "the green circle" names neither: the clause is replaced.
    third = (rect(30, 35, 15, 20), "circle", "a small yellow circle")
    content = scene("a red circle", "a blue square left of the green circle", third)
    assert content.refuted_caption_relations == []
    assert grounded_caption(content, 4) == "a blue square on the grass"


def test_grounded_caption_replaces_a_wrong_or_missing_object():
    # A refuted direction: the clause becomes the strongest geometric relation, "on" the grass.
    content = scene("a red circle to the right of the blue square")
    assert grounded_caption(content, 3) == "a red circle on the grass"
    # An object that was not decoded at all.
    content = scene("a red circle to the left of the green star")
    assert grounded_caption(content, 3) == "a red circle on the grass"
    # The square's direction seen from the square: mirrored, with its attribute words when the
    # tag is shared.
    third = (rect(30, 35, 15, 20), "circle", "a small yellow circle")
    content = scene(
        "a red circle to the left of the blue square", "a blue square beside a tree", third
    )
    relations = [(r.subject, r.object, r.type) for r in content.relations]
    assert (3, 4, "left_of") in relations and (4, 2, "on") in relations
    assert grounded_caption(content, 4) == "a blue square on the grass"
    content.relations = [r for r in content.relations if r.type != "on"]
    assert grounded_caption(content, 4) == "a blue square to the right of the red circle"
    # No relation at all: the unsupported clause is dropped.
    content.relations = []
    assert grounded_caption(content, 4) == "a blue square"


def test_mask_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="mask shape"):
        build_content([DecodedEntity(np.ones((3, 3), bool), "x")], (H, W))


def test_reference_names_an_object_by_its_distinguishing_colour():
    def entity(i, name, isthing=True):
        return Entity(id=i, name=name, box=None, grid_box=None, isthing=isthing, score=None,
                      caption="", area=1, segment_id=i, source="segment")

    content = PanopticContent(
        entities=[entity(1, "square"), entity(2, "square"), entity(3, "square"),
                  entity(4, "star"), entity(5, "sand", isthing=False)],
        attributes=[Attribute(1, "large red solid"), Attribute(2, "small blue dotted"),
                    Attribute(3, "large blue solid"), Attribute(4, "small striped")],
    )
    assert reference(content, 1) == "the red square"
    # Two blue squares: the colour does not single one out, all attribute words do.
    assert reference(content, 2) == "the small blue dotted square"
    assert reference(content, 4) == "the star"
    assert reference(content, 5) == "the sand"


def test_determiners_are_the_noun_phrase_openers():
    assert DETERMINERS == {
        "a", "an", "the", "this", "that", "these", "those", "some", "several", "many", "its",
        "his", "her", "their", "one", "two", "three", "four", "five", "six", "seven", "eight",
        "nine", "ten", "another", "each", "every",
    }


def test_mask_statistics_are_measured_once_per_entity(monkeypatch):
    import pix2cap.bridge.content as content_module

    calls = []

    def counting(mask):
        calls.append(1)
        return mask_stats(mask)

    monkeypatch.setattr(content_module, "mask_stats", counting)
    entities = [
        DecodedEntity(rect(30, 40, 0, 40), "grass", isthing=False, caption="green grass"),
        DecodedEntity(rect(20, 30, 5, 15), "circle", caption="a red circle on the grass"),
        DecodedEntity(rect(22, 30, 25, 35), "square", caption="a square right of the circle"),
    ]
    build_content(entities, (H, W))
    build_content(entities, (H, W))
    assert len(calls) == 3
    assert entities[1].pixel_box == [5, 20, 15, 30]
