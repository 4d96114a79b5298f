import pytest

from pix2cap.data.caption_formats import parse_pancap_boxes
from pix2cap.data.text import flip_grounded_caption, flip_panoptic_caption, swap_left_right


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the dog on the left", "the dog on the right"),
        ("Left and right", "Right and left"),
        ("LEFT, RIGHT.", "RIGHT, LEFT."),
        ("the leftmost cup, the Rightmost one", "the rightmost cup, the Leftmost one"),
        ("a left-hand glove and a right-handed man", "a right-hand glove and a left-handed man"),
        ("lefthand righthand", "righthand lefthand"),
        ("moving leftward then rightwards", "moving rightward then leftwards"),
        ("(left) [right] 'left' left's", "(right) [left] 'right' right's"),
    ],
)
def test_swap_left_right(text, expected):
    assert swap_left_right(text) == expected
    assert swap_left_right(swap_left_right(text)) == text


def test_swap_leaves_other_words_alone():
    text = "bright leftover copyright lefty brightly upright Leftovers alright"
    assert swap_left_right(text) == text


def test_flip_grounded_caption_recomputes_spans():
    text = "On the left, a dog. A cat sits right of the leftmost dog; bright sky."
    phrases = [("a dog", [1]), ("A cat", [2]), ("the leftmost dog", [1]), ("bright sky", [3]),
               ("On the left", [4])]
    spans = []
    for phrase, ids in phrases:
        start = text.index(phrase)
        spans.append({"phrase": phrase, "start": start, "end": start + len(phrase),
                      "segment_ids": ids})
    gc = {"raw": "<4:On the left>, <1:a dog>. <2:A cat> sits right of <1:the leftmost dog>; "
                 "<3:bright sky>.",
          "text": text, "phrases": spans, "convention": "colon"}
    original = {**gc, "phrases": [dict(p) for p in spans]}

    flipped = flip_grounded_caption(gc)
    assert flipped["text"] == (
        "On the right, a dog. A cat sits left of the rightmost dog; bright sky."
    )
    assert flipped["raw"] == ("<4:On the right>, <1:a dog>. <2:A cat> sits left of "
                              "<1:the rightmost dog>; <3:bright sky>.")
    got = {p["phrase"]: (p["start"], p["end"]) for p in flipped["phrases"]}
    assert set(got) == {"a dog", "A cat", "the rightmost dog", "bright sky", "On the right"}
    for p in flipped["phrases"]:
        assert flipped["text"][p["start"]:p["end"]] == p["phrase"]
    assert [p["segment_ids"] for p in flipped["phrases"]] == [ids for _, ids in phrases]
    assert flipped["convention"] == "colon"
    assert gc == original  # input untouched

    back = flip_grounded_caption(flipped)
    assert back["text"] == text
    assert [(p["start"], p["end"]) for p in back["phrases"]] == [
        (s["start"], s["end"]) for s in spans
    ]


def test_flip_panoptic_caption_mirrors_boxes_and_words():
    text = ("The woman [[0.307, 0.213, 0.743, 0.886]] stands left of a car "
            "[[0.8, 0.1, 1.0, 0.5]].\n"
            "- **Left lamp** [[0,0,0.25,0.5]] is bright.")
    flipped = flip_panoptic_caption(text)
    assert flipped == (
        "The woman [[0.257, 0.213, 0.693, 0.886]] stands right of a car "
        "[[0.000, 0.100, 0.200, 0.500]].\n"
        "- **Right lamp** [[0.750, 0.000, 1.000, 0.500]] is bright."
    )
    boxes = parse_pancap_boxes(flipped)
    assert [b["phrase"] for b in boxes] == ["The woman", "stands right of a car", "Right lamp"]
    twice = parse_pancap_boxes(flip_panoptic_caption(flipped))
    for a, b in zip(twice, parse_pancap_boxes(text)):
        assert a["box"] == pytest.approx(b["box"], abs=1e-3)
