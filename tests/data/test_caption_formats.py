"""Caption text formats: SA-Pancap inline boxes, the model-side 0-1000 grid and
COCONut-PanCap grounding tags."""

import numpy as np
import pytest

from pix2cap.data.caption_formats import (
    check_pancap_boxes,
    find_grid_boxes,
    format_box,
    format_grounding_tag,
    format_grid_box,
    grid_box_to_normalized,
    grid_box_to_pixel,
    STUFF_SEG_TOKEN,
    grid_text_to_pancap,
    grounded_to_markup,
    markup_sentence_openers,
    markup_to_grounded,
    normalized_box_to_grid,
    truncate_markup,
    pancap_text_to_grid,
    parse_grounded_caption,
    parse_pancap_boxes,
    parse_tagged_boxes,
    pixel_box_to_grid,
    rewrite_pancap_boxes,
)

# ---------------------------------------------------------------------------------------------
# SA-Pancap inline boxes
# ---------------------------------------------------------------------------------------------

DESIGN_FRAGMENT = (
    "The woman [[0.307, 0.213, 0.743, 0.886]] is the central focus of the image. "
    "She is dressed in a black suit jacket, ..."
)


def check_spans(text, items):
    for item in items:
        assert text[item["start"] : item["end"]] == item["phrase"]
        assert text[item["box_start"] : item["box_end"]].startswith("[[")
        assert text[item["box_start"] : item["box_end"]].endswith("]]")


def test_design_fragment():
    boxes = parse_pancap_boxes(DESIGN_FRAGMENT)
    assert boxes == [
        {
            "phrase": "The woman",
            "box": [0.307, 0.213, 0.743, 0.886],
            "start": 0,
            "end": 9,
            "box_start": 10,
            "box_end": 40,
        }
    ]
    assert all(isinstance(v, float) for v in boxes[0]["box"])


def test_markdown_bullets_and_delimiters():
    text = (
        "The image shows:\n"
        "- **A red car** [[0.1,0.2, 0.3 ,0.4]] parked on the left.\n"
        "* a tree [[0.5, 0.1, 0.9, 0.8]]\n"
        "1. Sky [[0.0, 0.0, 1.0, 0.5]]; grass [[0.0,0.5,1,1]], and a dog [[0.5, 0.5, 0.6, 0.6]]\n"
        "  - the lamp post [[0.25, 0.125, 0.5, 0.75]] stands tall. A cat [[0.2, 0.3, 0.4, 0.5]]"
    )
    boxes = parse_pancap_boxes(text)
    assert [b["phrase"] for b in boxes] == [
        "A red car",
        "a tree",
        "Sky",
        "grass",
        "and a dog",
        "the lamp post",
        "A cat",
    ]
    assert boxes[0]["box"] == [0.1, 0.2, 0.3, 0.4]
    assert boxes[3]["box"] == [0.0, 0.5, 1.0, 1.0]
    check_spans(text, boxes)


def test_previous_box_ends_a_phrase():
    text = "A man [[0.1, 0.1, 0.2, 0.2]] holds a cup [[0.3, 0.3, 0.4, 0.4]]"
    boxes = parse_pancap_boxes(text)
    assert [b["phrase"] for b in boxes] == ["A man", "holds a cup"]
    check_spans(text, boxes)


def test_int_boxes_and_spacing():
    text = "a kite [[1, 2,3 ,   4]] and a bird [[ 0.5 , .25 , 1 , 1.0 ]]"
    boxes = parse_pancap_boxes(text)
    assert [b["box"] for b in boxes] == [[1.0, 2.0, 3.0, 4.0], [0.5, 0.25, 1.0, 1.0]]
    assert [b["phrase"] for b in boxes] == ["a kite", "and a bird"]


def test_malformed_boxes_are_skipped_but_end_phrases():
    text = (
        "A hat [[0.1, 0.2, 0.3]] then a bag [[0.1, x, 0.3, 0.4]] and a shoe [[0.1, 0.2, 0.3, 0.4]] "
        "and [[0.1, 0.2, 0.3, 0.4 a broken one and [0.1, 0.2, 0.3, 0.4] single, "
        "a sock [[0.5, 0.5, 0.6, 0.7]]"
    )
    boxes = parse_pancap_boxes(text)
    assert [b["phrase"] for b in boxes] == ["and a shoe", "a sock"]
    assert [b["box"] for b in boxes] == [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.7]]
    assert parse_pancap_boxes("") == []
    assert parse_pancap_boxes("no boxes [[ ]] here [[1,2,3,4,5]]") == []


def test_box_right_after_a_colon_has_an_empty_phrase():
    text = "Objects: [[0.1, 0.2, 0.3, 0.4]]"
    boxes = parse_pancap_boxes(text)
    assert boxes[0]["phrase"] == "" and boxes[0]["start"] == boxes[0]["end"]


def test_format_and_rewrite_boxes():
    assert format_box([0.1024, 0.2, 0.398, 0.502]) == "[[0.102, 0.200, 0.398, 0.502]]"
    assert format_box((0, 1, 1, 1)) == "[[0.000, 1.000, 1.000, 1.000]]"
    with pytest.raises(ValueError):
        format_box([0.1, 0.2])
    flipped = rewrite_pancap_boxes(DESIGN_FRAGMENT, lambda b: [1 - b[2], b[1], 1 - b[0], b[3]])
    assert flipped.startswith("The woman [[0.257, 0.213, 0.693, 0.886]] is the central focus")
    # Round trip: parse -> format reproduces 3-decimal boxes exactly.
    assert rewrite_pancap_boxes(DESIGN_FRAGMENT, lambda b: b) == DESIGN_FRAGMENT


@pytest.mark.parametrize(
    "box, reason",
    [
        ("[[-0.2, 0.1, 0.5, 0.6]]", "out_of_range"),  # negative
        ("[[0.2, 0.1, 1.5, 0.6]]", "out_of_range"),  # above 1
        ("[[0.2, 0.1, 0.5, 1.0011]]", "out_of_range"),  # just past the tolerance
        ("[[0.5, 0.1, 0.4, 0.6]]", "inverted"),  # x1 > x2
        ("[[0.1, 0.7, 0.4, 0.6]]", "inverted"),  # y1 > y2
        ("[[1e309, 0.1, 0.4, 0.6]]", "non_finite"),  # overflows to infinity
        ("[[0.1, nan, 0.4, 0.6]]", "non_finite"),
        ("[[0.1, 0.2, -inf, 0.6]]", "non_finite"),
        ("[[0.1, 0.2, 0.4]]", "malformed"),  # three numbers
        ("[[0.1, 0.2, 0.4, x]]", "malformed"),
    ],
)
def test_check_pancap_boxes_removes_invalid_boxes(box, reason):
    text = f"A dog [[0.1, 0.2, 0.3, 0.4]] runs past a cat {box}, then sits."
    clean, issues = check_pancap_boxes(text)
    assert clean == "A dog [[0.1, 0.2, 0.3, 0.4]] runs past a cat, then sits."
    assert issues == [{"literal": box, "reason": reason}]
    assert [b["box"] for b in parse_pancap_boxes(clean)] == [[0.1, 0.2, 0.3, 0.4]]


def test_check_pancap_boxes_clamps_within_tolerance_and_keeps_valid_text():
    clean, issues = check_pancap_boxes("Sea [[-0.001, 0.5, 1.0004, 1]] and sky [[0, 0, 1, 0.5]].")
    assert clean == "Sea [[0.000, 0.500, 1.000, 1.000]] and sky [[0, 0, 1, 0.5]]."
    assert issues == [{"literal": "[[-0.001, 0.5, 1.0004, 1]]", "reason": "clamped"}]
    assert check_pancap_boxes(DESIGN_FRAGMENT) == (DESIGN_FRAGMENT, [])
    # A degenerate (zero-width) box is ordered, so it stays.
    assert check_pancap_boxes("a line [[0.5, 0.1, 0.5, 0.9]]")[1] == []
    # A tighter tolerance rejects what the default clamps.
    assert check_pancap_boxes("x [[-0.0004, 0, 1, 1]]", tolerance=1e-4)[1] == [
        {"literal": "[[-0.0004, 0, 1, 1]]", "reason": "out_of_range"}
    ]


# ---------------------------------------------------------------------------------------------
# Model-side 0-1000 grid
# ---------------------------------------------------------------------------------------------


def test_tagged_boxes():
    text = (
        "person <box>[[10, 20, 300, 400]]</box>, red car <box>[[1, 2, 3, 4]]</box>, "
        "<box>[[5,6,7,8]]</box>"
    )
    items = parse_tagged_boxes(text)
    assert [(i["tag"], i["box"]) for i in items] == [
        ("person", [10, 20, 300, 400]),
        ("red car", [1, 2, 3, 4]),
        ("", [5, 6, 7, 8]),
    ]
    assert all(text[i["start"] : i["end"]] == i["tag"] for i in items)
    assert [i["tag"] for i in parse_tagged_boxes("None, dog <box>[[1, 2, 3, 4]]</box>")] == ["dog"]
    assert parse_tagged_boxes("cat <box>[[1, 2, 3]]</box>") == []


def test_grid_box_to_normalized_removes_square_padding():
    # 200x100 image padded to 200x200: the image occupies rows 250..750 of the 1000 grid.
    assert grid_box_to_normalized([0, 250, 1000, 750], 200, 100) == [0.0, 0.0, 1.0, 1.0]
    assert grid_box_to_normalized([500, 500, 750, 600], 200, 100) == [0.5, 0.5, 0.75, 0.7]
    assert grid_box_to_normalized([0, 0, 1000, 1000], 100, 100) == [0.0, 0.0, 1.0, 1.0]


def test_pixel_box_to_grid_pads_short_axis_in_the_middle():
    # 200 wide x 100 high: side 200, 50 px of padding above and below.
    assert pixel_box_to_grid([0, 0, 200, 100], 200, 100) == [0, 250, 999, 750]
    assert pixel_box_to_grid([50, 20, 150, 80], 200, 100) == [250, 350, 750, 650]
    # Portrait: 100 wide x 200 high, padding left and right.
    assert pixel_box_to_grid([0, 0, 100, 200], 100, 200) == [250, 0, 750, 999]
    # Square: no padding; 0.5-steps round half up.
    assert pixel_box_to_grid([1, 1, 3, 3], 4000, 4000) == [0, 0, 1, 1]


def test_grid_and_pixel_inverse():
    box = [250, 350, 750, 650]
    assert grid_box_to_pixel(box, 200, 100) == [50.0, 20.0, 150.0, 80.0]
    assert grid_box_to_normalized(box, 200, 100) == [0.25, 0.2, 0.75, 0.8]


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 1000), (512, 512), (1500, 999)])
def test_round_trips(size):
    width, height = size
    rng = np.random.default_rng(width * 7 + height)
    side = max(width, height)
    for _ in range(200):
        # grid -> normalised -> grid is exact for boxes inside the image.
        x = np.sort(rng.uniform(0, width, 2))
        y = np.sort(rng.uniform(0, height, 2))
        grid = pixel_box_to_grid([x[0], y[0], x[1], y[1]], width, height)
        norm = grid_box_to_normalized(grid, width, height)
        assert all(round(v, 3) == v for v in norm)
        assert normalized_box_to_grid(norm, width, height) == grid
        # normalised (3 decimals) -> grid -> normalised: within half a grid step (+ rounding).
        n = [round(float(v), 3) for v in (x[0] / width, y[0] / height, x[1] / width, y[1] / height)]
        back = grid_box_to_normalized(normalized_box_to_grid(n, width, height), width, height)
        tol = [0.5 * side / 1000 / width + 5e-4, 0.5 * side / 1000 / height + 5e-4] * 2
        assert all(abs(a - b) <= t + 1e-9 for a, b, t in zip(back, n, tol))


def test_square_image_round_trip_is_exact():
    for box in ([0.307, 0.213, 0.743, 0.886], [0.0, 0.0, 0.5, 0.999]):
        grid = normalized_box_to_grid(box, 800, 800)
        assert grid_box_to_normalized(grid, 800, 800) == box
    # The grid stops at 999 ([0, 1000) as PancapChain writes it).
    assert normalized_box_to_grid([0, 0, 1, 1], 800, 800) == [0, 0, 999, 999]


def test_text_box_conversions():
    width, height = 200, 100
    text = (
        "A dog <box>[[250, 350, 750, 650]]</box> sits; "
        "a ball < box > [ [ 0, 250, 999, 750 ] ] < / box >."
    )
    assert grid_text_to_pancap(text, width, height) == (
        "A dog [[0.250, 0.200, 0.750, 0.800]] sits; a ball [[0.000, 0.000, 0.999, 1.000]]."
    )
    # Already-normalised boxes stay as they are.
    plain = "The woman [[0.307, 0.213, 0.743, 0.886]] stands."
    assert grid_text_to_pancap(plain, width, height) == plain
    grid_text = pancap_text_to_grid("A dog [[0.25, 0.2, 0.75, 0.8]] sits.", width, height)
    assert grid_text == "A dog <box>[[250, 350, 750, 650]]</box> sits."
    back = grid_text_to_pancap(grid_text, width, height)
    assert back == "A dog [[0.250, 0.200, 0.750, 0.800]] sits."


def test_bad_input_errors():
    with pytest.raises(ValueError, match="4 numbers"):
        pixel_box_to_grid([1, 2, 3], 10, 10)
    with pytest.raises(ValueError, match="positive"):
        pixel_box_to_grid([1, 2, 3, 4], 0, 10)


def test_find_and_format_grid_boxes():
    assert format_grid_box([1, 2.4, 3, 999]) == "<box>[[1, 2, 3, 999]]</box>"
    text = "a <box>[[1, 2, 3, 4]]</box> b < BOX >[ [5,6, 7 ,8] ]</ box> c [[9, 9, 9, 9]]"
    found = find_grid_boxes(text)
    assert [box for _, _, box in found] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert text[found[0][0] : found[0][1]] == "<box>[[1, 2, 3, 4]]</box>"
    assert text[found[1][0] : found[1][1]] == "< BOX >[ [5,6, 7 ,8] ]</ box>"


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (512, 512)])
def test_text_round_trips(size):
    width, height = size
    rng = np.random.default_rng(width + 3 * height)
    boxes = []
    for _ in range(20):
        x = np.sort(rng.uniform(0, width, 2))
        y = np.sort(rng.uniform(0, height, 2))
        boxes.append(pixel_box_to_grid([x[0], y[0], x[1], y[1]], width, height))
    # Grid text -> SA-Pancap text -> grid text gives back every character.
    items = [f"thing {i} {format_grid_box(b)}" for i, b in enumerate(boxes)]
    grid_text = "A scene: " + ", ".join(items)
    pancap = grid_text_to_pancap(grid_text, width, height)
    assert "<box>" not in pancap and len(parse_pancap_boxes(pancap)) == len(boxes)
    assert pancap_text_to_grid(pancap, width, height) == grid_text
    # SA-Pancap text -> grid text -> SA-Pancap text: the same words, each box within half a
    # grid step of the original (exact when it is itself a converted grid box).
    assert grid_text_to_pancap(pancap_text_to_grid(pancap, width, height), width, height) == pancap
    original = "The woman [[0.307, 0.213, 0.743, 0.886]] and a dog [[0.1, 0.5, 0.25, 0.75]]."
    back = grid_text_to_pancap(pancap_text_to_grid(original, width, height), width, height)
    assert [b["phrase"] for b in parse_pancap_boxes(back)] == ["The woman", "and a dog"]
    side = max(width, height)
    tol = [0.5 * side / 1000 / width + 5e-4, 0.5 * side / 1000 / height + 5e-4] * 2
    for a, b in zip(parse_pancap_boxes(back), parse_pancap_boxes(original)):
        assert all(abs(u - v) <= t + 1e-9 for u, v, t in zip(a["box"], b["box"], tol))


# ---------------------------------------------------------------------------------------------
# COCONut-PanCap grounding tags
# ---------------------------------------------------------------------------------------------


def spans_are_exact(parsed):
    return all(parsed["text"][p["start"] : p["end"]] == p["phrase"] for p in parsed["phrases"])


def test_design_fragment_with_id_zero_is_a_zero_based_index():
    raw = (
        "In the center and right side of the plate, the region represents <0:a serving of French "
        "fries>. The upper left side shows <1: a slice of onion>."
    )
    parsed = parse_grounded_caption(raw, segment_ids=[3, 5, 9])
    assert parsed["raw"] == raw
    assert parsed["text"] == (
        "In the center and right side of the plate, the region represents a serving of "
        "French fries. The upper left side shows a slice of onion."
    )
    assert [p["phrase"] for p in parsed["phrases"]] == [
        "a serving of French fries",
        "a slice of onion",
    ]
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[3], [5]]
    assert [p["tag_ids"] for p in parsed["phrases"]] == [[0], [1]]
    assert parsed["convention"] == "index0"
    assert spans_are_exact(parsed)


def test_segment_ids_single_and_multiple():
    parsed = parse_grounded_caption("A <4:large zebu> beside <6,7,8:eight boys>.", [4, 6, 7, 8])
    assert parsed["text"] == "A large zebu beside eight boys."
    assert [(p["phrase"], p["start"], p["end"], p["segment_ids"]) for p in parsed["phrases"]] == [
        ("large zebu", 2, 12, [4]),
        ("eight boys", 20, 30, [6, 7, 8]),
    ]
    assert parsed["convention"] == "segment_id"
    assert parsed["tag_stats"]["segment_id"] == 2 and parsed["tag_stats"]["unresolved"] == 0


def test_spaces_around_ids_commas_and_colon():
    parsed = parse_grounded_caption("see < 2 , 3 :x> and <1: a slice of onion >!", [1, 2, 3])
    assert parsed["text"] == "see x and a slice of onion!"
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[2, 3], [1]]
    assert [p["phrase"] for p in parsed["phrases"]] == ["x", "a slice of onion"]
    assert parsed["convention"] == "segment_id"
    assert spans_are_exact(parsed)


def test_no_colon_form_is_a_zero_based_index():
    parsed = parse_grounded_caption("A <1>brown dog> sits on <0>green grass>.", [40, 12])
    assert parsed["text"] == "A brown dog sits on green grass."
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[12], [40]]
    assert [p["convention"] for p in parsed["phrases"]] == ["index0", "index0"]
    assert parsed["convention"] == "index0"
    assert parsed["tag_stats"]["index0"] == 2
    assert spans_are_exact(parsed)


def test_one_based_index_when_ids_run_from_1_to_n():
    # Ids 1..3 are not segment ids, and 3 is out of range for 0-based indices.
    parsed = parse_grounded_caption("<1:a> <2:b> <3:c>", [101, 102, 103])
    assert parsed["convention"] == "index1"
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[101], [102], [103]]


def test_ambiguous_indices_prefer_zero_based():
    # 1 and 2 fit both 0-based and 1-based indices over 4 segments: 0-based wins.
    parsed = parse_grounded_caption("<1:a> <2:b>", [50, 60, 70, 80])
    assert parsed["convention"] == "index0"
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[60], [70]]


def test_a_stray_index_does_not_move_the_other_tags():
    # Segment ids 1..6: every id here is a valid 0-based index, but 5 and 2 are segment ids of
    # the image and 0 is not. Read per caption, the stray 0 made the whole caption 0-based
    # and put the sky on segment 6 (the grass); read per tag, only the 0 is an index.
    raw = "<5:Light blue sky> above <2:a red kite> and <0:a small bird>, over <6:green grass>."
    parsed = parse_grounded_caption(raw.replace(", over <6:green grass>", ""), [1, 2, 3, 4, 5, 6])
    assert [(p["phrase"], p["segment_ids"], p["convention"]) for p in parsed["phrases"]] == [
        ("Light blue sky", [5], "segment_id"),
        ("a red kite", [2], "segment_id"),
        ("a small bird", [1], "index0"),
    ]
    assert parsed["convention"] == "mixed" and parsed["mixed_id_conventions"] is True
    assert parsed["tag_stats"] == {
        "segment_id": 2,
        "index0": 1,
        "index1": 0,
        "unresolved": 0,
        "unresolved_ids": 0,
    }
    # With the grass mentioned too (6 is out of range for 0-based indices) nothing changes.
    parsed = parse_grounded_caption(raw, [1, 2, 3, 4, 5, 6])
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[5], [2], [1], [6]]


def test_index_tags_follow_the_captions_other_index_tags():
    # 60 is a segment id; 1 fits both index readings, 4 only the 1-based one over 4 segments,
    # so the caption's index tags are 1-based: 1 -> 50, 4 -> 80.
    parsed = parse_grounded_caption("<60:a> <1:b> <4:c>", [50, 60, 70, 80])
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[60], [50], [80]]
    assert [p["convention"] for p in parsed["phrases"]] == ["segment_id", "index1", "index1"]
    assert parsed["mixed_id_conventions"] is True
    # One convention throughout: not mixed, whichever it is.
    for raw, segment_ids in (("<0:a> <1:b>", [3, 5, 9]), ("<5:a> <9:b>", [3, 5, 9])):
        assert parse_grounded_caption(raw, segment_ids)["mixed_id_conventions"] is False
    # Colon tags as segment ids next to a no-colon (always 0-based) tag: mixed forms, but
    # no guess about the colon ids.
    mixed_forms = parse_grounded_caption("<5:sky> over <0>grass>", [5, 6])
    assert mixed_forms["convention"] == "mixed" and mixed_forms["mixed_id_conventions"] is False


def test_ids_not_in_the_image_are_unresolved_but_never_crash():
    parsed = parse_grounded_caption("A <2:cat> and a <99:ghost> and <2,77:both>.", [1, 2])
    assert parsed["convention"] == "segment_id"  # resolves 2 of the 4 ids, more than the others
    assert [p["segment_ids"] for p in parsed["phrases"]] == [[2], [], [2]]
    assert parsed["phrases"][1]["phrase"] == "ghost"
    assert parsed["text"] == "A cat and a ghost and both."
    assert parsed["tag_stats"] == {
        "segment_id": 2,
        "index0": 0,
        "index1": 0,
        "unresolved": 1,
        "unresolved_ids": 2,
    }


def test_id_zero_with_too_few_segments_is_unresolved():
    parsed = parse_grounded_caption("<0:void thing>", [])
    assert parsed["phrases"][0]["segment_ids"] == []
    assert parsed["tag_stats"]["unresolved"] == 1
    assert parsed["text"] == "void thing"


def test_unclosed_and_stray_brackets_stay_text():
    raw = "a < b and c > d, <3 unclosed, 5 > 4, <x:word>, <7:> and <2:real one>"
    parsed = parse_grounded_caption(raw, [2])
    assert parsed["text"] == "a < b and c > d, <3 unclosed, 5 > 4, <x:word>, <7:> and real one"
    assert [p["phrase"] for p in parsed["phrases"]] == ["real one"]
    assert parsed["phrases"][0]["segment_ids"] == [2]
    assert spans_are_exact(parsed)


def test_mixed_forms_and_no_segment_ids():
    mixed = parse_grounded_caption("<5:sky> over <0>grass>", [5, 6])
    assert [p["convention"] for p in mixed["phrases"]] == ["segment_id", "index0"]
    assert mixed["convention"] == "mixed"
    assert [p["segment_ids"] for p in mixed["phrases"]] == [[5], [5]]
    unchecked = parse_grounded_caption("<5:sky> over <0>grass>")
    assert unchecked["convention"] == "unresolved"
    assert [p["segment_ids"] for p in unchecked["phrases"]] == [[5], []]
    none = parse_grounded_caption("no tags at all", [1])
    assert none == {
        "raw": "no tags at all",
        "text": "no tags at all",
        "phrases": [],
        "convention": "none",
        "mixed_id_conventions": False,
        "tag_stats": {
            "segment_id": 0,
            "index0": 0,
            "index1": 0,
            "unresolved": 0,
            "unresolved_ids": 0,
        },
    }
    with pytest.raises(TypeError):
        parse_grounded_caption(None)


def test_format_grounding_tag_round_trip():
    caption = (
        f"{format_grounding_tag([4], 'A large zebu')} beside "
        f"{format_grounding_tag([6, 7, 8], 'eight boys')}."
    )
    assert caption == "<4:A large zebu> beside <6,7,8:eight boys>."
    parsed = parse_grounded_caption(caption, [4, 6, 7, 8])
    assert parsed["text"] == "A large zebu beside eight boys."
    assert [(p["phrase"], p["segment_ids"]) for p in parsed["phrases"]] == [
        ("A large zebu", [4]),
        ("eight boys", [6, 7, 8]),
    ]
    for ids, phrase in (([], "x"), ([-1], "x"), ([1], " "), ([1], "a <b>")):
        with pytest.raises(ValueError):
            format_grounding_tag(ids, phrase)


# ---------------------------------------------------------------------------------------------
# Grounded generation markup
# ---------------------------------------------------------------------------------------------
GROUNDED = (
    "<4:Light blue sky> covers the top above <5:beige sand>. <6,7,8:eight boys> play on "
    "<5:the sand>, near <9:a dog>."
)


def test_markup_round_trip_through_generation_targets():
    parsed = parse_grounded_caption(GROUNDED, segment_ids=[4, 5, 6, 7, 8, 9])
    markup, targets = grounded_to_markup(parsed)
    assert markup == (
        "<p> Light blue sky </p> [SEG] covers the top above <p> beige sand </p> [SEG]. "
        "<p> eight boys </p> [SEG] play on <p> the sand </p> [SEG], near <p> a dog </p> [SEG]."
    )
    # One SEG per phrase; a multi-segment phrase is one SEG whose mask is the union.
    assert targets == [[4], [5], [6, 7, 8], [5], [9]]
    back = markup_to_grounded(markup, targets)
    assert back["tagged"] == GROUNDED
    assert back["text"] == parsed["text"]
    for phrase in back["phrases"]:
        assert back["text"][phrase["start"] : phrase["end"]] == phrase["phrase"]
    assert [p["seg_index"] for p in back["phrases"]] == [0, 1, 2, 3, 4]
    # Stuff may get its own SEG kind; reading back treats both kinds alike.
    stuff = {4, 5}
    markup, targets = grounded_to_markup(
        parsed, seg_token=lambda ids: STUFF_SEG_TOKEN if set(ids) <= stuff else "[SEG]"
    )
    assert markup.startswith("<p> Light blue sky </p> [SEG_STUFF] covers")
    assert "<p> eight boys </p> [SEG] play" in markup
    assert markup_to_grounded(markup, targets)["tagged"] == GROUNDED


def test_ungrounded_phrases_are_plain_targets():
    parsed = parse_grounded_caption("<3:a cat> sits on <99:a mat>.", segment_ids=[3])
    markup, targets = grounded_to_markup(parsed)
    assert (markup, targets) == ("<p> a cat </p> [SEG] sits on a mat.", [[3]])


def test_generated_markup_that_is_not_well_formed():
    out = markup_to_grounded(
        "</p> a <p> dog </p> and <p> cat </p> [SEG] [SEG] . <p> open end", [[3], [4]]
    )
    # The stray </p> and the unclosed <p> vanish; "dog" has no SEG, so no segments; the
    # second SEG follows no phrase.
    assert out["text"] == "a dog and cat. open end"
    assert out["tagged"] == "a dog and <3:cat>. open end"
    assert [(p["phrase"], p["segment_ids"], p["seg_index"]) for p in out["phrases"]] == [
        ("dog", [], None),
        ("cat", [3], 0),
    ]
    # More SEGs than masks: the phrase keeps its text, without segments.
    out = markup_to_grounded("<p> a cat </p> [SEG]", [])
    assert (out["tagged"], out["phrases"][0]["segment_ids"]) == ("a cat", [])
    assert markup_to_grounded("", None) == {"text": "", "tagged": "", "phrases": []}


def test_sentence_openers_of_each_seg():
    markup = (
        "<p> Light sky </p> [SEG_STUFF] covers the top above <p> grass </p> [SEG_STUFF]. "
        "<p> Two squares </p> [SEG] appear! <p> A red star </p> [SEG] <p> the grass </p> [SEG] "
        "is on it. Then <p> a dog </p> [SEG]. <p> open end"
    )
    # A phrase right after another, or after words of its sentence, opens nothing; the
    # unclosed phrase has no SEG.
    assert markup_sentence_openers(markup) == [True, False, True, True, False, False]
    assert markup_sentence_openers("") == []


def test_long_targets_are_cut_at_a_sentence_boundary_never_inside_a_phrase():
    markup = (
        "<p> Light blue sky </p> [SEG] covers the top. <p> eight boys </p> [SEG] play on "
        "<p> the sand </p> [SEG]. A dog runs."
    )
    targets = [[4], [6, 7, 8], [5]]

    def words(text):
        return len(text.split())

    assert words(markup) == 24
    assert truncate_markup(markup, targets, words, 24) == (markup, targets)
    # 23 tokens: the last sentence goes, the second (ending after its phrase) stays whole.
    cut, kept = truncate_markup(markup, targets, words, 23)
    assert cut.endswith("<p> the sand </p> [SEG].") and kept == targets
    # 20: only the first sentence fits whole, with its one SEG.
    assert truncate_markup(markup, targets, words, 20) == (
        "<p> Light blue sky </p> [SEG] covers the top.",
        [[4]],
    )
    # The first sentence alone is too long: cut after whole words, the phrase unit kept whole
    # or dropped whole.
    assert truncate_markup(markup, targets, words, 8) == (
        "<p> Light blue sky </p> [SEG] covers the",
        [[4]],
    )
    assert truncate_markup(markup, targets, words, 5) == ("", [])
