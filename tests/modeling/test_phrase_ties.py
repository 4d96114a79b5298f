"""Checking a grounded phrase's SEG selection against the segments' dense captions."""

from pix2cap.modeling.caption_head.phrase_ties import (
    agreeing_slots,
    caption_subject,
    ground_unmarked_mentions,
    phrase_agreement,
)

CAPTIONS = [
    "light blue sky covering the top of the image",
    "green grass covering the bottom of the image",
    "a small green dotted star to the left of the white circle",
    "a large white solid circle below the green star",
    "a medium green striped star in the sky",
]


def test_caption_subject_stops_at_the_first_preposition_or_verb():
    assert caption_subject(CAPTIONS[2]) == ["a", "small", "green", "dotted", "star"]
    assert caption_subject(CAPTIONS[0]) == ["light", "blue", "sky"]
    assert caption_subject("a dog") == ["a", "dog"]
    assert caption_subject("") == []


def test_phrase_agreement_needs_the_noun_and_every_modifier():
    assert phrase_agreement("the green star", CAPTIONS) == [False, False, True, False, True]
    assert phrase_agreement("the small green star", CAPTIONS) == [False, False, True, False, False]
    assert phrase_agreement("the sky", CAPTIONS) == [True, False, False, False, False]
    # Its noun names segments, its words fit none of them.
    assert phrase_agreement("the yellow star", CAPTIONS) == [False] * 5
    # A noun no caption's subject has, or no word but determiners: the captions cannot judge.
    assert phrase_agreement("the sand", CAPTIONS) is None
    assert phrase_agreement("the", CAPTIONS) is None


def test_agreeing_slots_keep_move_drop_or_take_all():
    probs = [0.0, 0.0, 0.3, 0.9, 0.6]
    # A selection that agrees is kept.
    assert agreeing_slots("the small green star", CAPTIONS, [2], probs) == [2]
    # One that does not (a circle for "the green star") moves to the most selected star.
    assert agreeing_slots("the green star", CAPTIONS, [3], probs) == [4]
    # Of several selected, the agreeing ones stay.
    assert agreeing_slots("the green star", CAPTIONS, [2, 3], probs) == [2]
    # A phrase describing nothing decoded is left ungrounded.
    assert agreeing_slots("the yellow star", CAPTIONS, [3], probs) == []
    # A plural names every segment it agrees with, selected or not.
    assert agreeing_slots("two green stars", CAPTIONS, [2], probs) == [2, 4]
    # What the captions cannot judge keeps its selection.
    assert agreeing_slots("the sand", CAPTIONS, [1], probs) == [1]


def test_the_class_name_finds_the_noun_of_a_subject_running_past_it():
    # "partly hidden" is neither preposition nor verb form that ends a subject.
    captions = ["a large blue striped square partly hidden behind the white square"]
    assert phrase_agreement("the blue square", captions, ["square"]) == [True]
    assert phrase_agreement("the white square", captions, ["square"]) == [False]
    # Without the class name, the last word is the head noun: nothing to judge by.
    assert phrase_agreement("the blue square", captions) is None
    # An attribute is no noun: "the white" names nothing.
    assert phrase_agreement("the white", ["a white triangle"], ["triangle"]) is None


def test_class_names_are_a_second_name_of_each_segment():
    # The caption head calls segment 1 a triangle, the panoptic head a square; a relation
    # target may name it either way.
    captions = ["green grass covering the bottom", "a medium white striped triangle on the grass"]
    names = ["grass", "square"]
    assert phrase_agreement("the white square", captions) is None
    assert phrase_agreement("the white square", captions, names) == [False, True]
    assert phrase_agreement("the white triangle", captions, names) == [False, True]
    assert phrase_agreement("the red square", captions, names) == [False, False]
    assert agreeing_slots("the white square", captions, [0], [0.9, 0.2], names) == [1]
    assert agreeing_slots("two white squares", captions, [], [0.9, 0.2], names) == [1]


def test_unmarked_mentions_of_one_segment_become_phrases():
    captions = [
        "light blue sky covering the top",
        "beige sand covering the bottom",
        "a small purple dotted triangle on the sand",
        "a large white solid circle below the sky",
        "a small white dotted circle in the sky",
    ]
    markup = (
        "<p> a small purple dotted triangle </p> [SEG] is on the sand . <p> a circle </p> [SEG] "
        "is below the white circle and the large white circle . the scene contains two objects ."
    )
    out, sources = ground_unmarked_mentions(markup, captions)
    # "the sand" and "the large white circle" name one segment each; "the white circle" two
    # (ambiguous), "two objects" none; the head's own phrases are left as they are.
    assert out == (
        "<p> a small purple dotted triangle </p> [SEG] is on <p> the sand </p> [SEG] . "
        "<p> a circle </p> [SEG] is below the white circle and <p> the large white circle </p> "
        "[SEG] . the scene contains two objects ."
    )
    assert sources == [None, [1], None, [3]]
    # A plural names each segment it agrees with.
    out, sources = ground_unmarked_mentions("there are two white circles here", captions)
    assert out == "there are <p> two white circles </p> [SEG] here" and sources == [[3, 4]]
    assert ground_unmarked_mentions("", captions) == ("", [])
