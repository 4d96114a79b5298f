"""pix2cap.viewer.page: the data of one image page (display size, the mask PNG of segment
indices, grounded and panoptic caption pieces, one view's JSON), checked without a browser."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pix2cap.data.catalog import Metadata
from pix2cap.structures import PanopticResult, rgb2id
from pix2cap.utils.visualizer import segment_colors
from pix2cap.viewer.page import (
    ImageView,
    display_size,
    encode_segment_indices,
    grounded_pieces,
    panoptic_caption_pieces,
    view_payload,
)

PNG_PREFIX = "data:image/png;base64,"

# Contiguous 0 ("car") is a thing, 1 ("road") stuff.
META = Metadata(
    "viewer_page_test",
    thing_classes=["car"],
    stuff_classes=["car", "road"],
    thing_dataset_id_to_contiguous_id={3: 0},
    stuff_dataset_id_to_contiguous_id={3: 0, 21: 1},
    thing_colors=[(200, 30, 30)],
    stuff_colors=[(200, 30, 30), (40, 160, 60)],
)


def decode_indices(uri: str) -> np.ndarray:
    """The index map a mask data URI carries (what viewer.js reads from its pixels)."""
    assert uri.startswith(PNG_PREFIX)
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(PNG_PREFIX):])))
    assert image.format == "PNG" and image.mode == "RGB"
    return rgb2id(np.asarray(image))


def tiny_result(score_road=0.3) -> PanopticResult:
    """12 x 16: a car (id 5) top-left, road (id 9) on the bottom half, void top-right, and a
    listed segment 11 with no pixel."""
    seg = np.zeros((12, 16), dtype=np.int64)
    seg[1:5, 2:8] = 5
    seg[6:12, :] = 9
    infos = [
        {"id": 5, "category_id": 0, "score": 0.9, "caption": "a red car"},
        {"id": 9, "category_id": 1, "score": score_road, "caption": "wet road"},
        {"id": 11, "category_id": 0, "score": 0.8, "caption": "ghost"},
    ]
    return PanopticResult.from_panoptic(seg, infos, META)


# -- display_size -----------------------------------------------------------------------------


def test_display_size_never_upscales():
    assert display_size(12, 16, 1024) == (12, 16)
    assert display_size(100, 200, 200) == (100, 200)  # the longer side exactly at the cap


def test_display_size_caps_the_longer_side():
    assert display_size(100, 200, 64) == (32, 64)
    assert display_size(200, 100, 64) == (64, 32)
    assert display_size(480, 640, 320) == (240, 320)


def test_display_size_rounds_and_keeps_at_least_one_pixel():
    assert display_size(15, 10, 4) == (4, 3)  # 10 * 4 / 15 = 2.67 -> 3
    assert display_size(3, 1000, 100) == (1, 100)  # 0.3 -> at least 1


@pytest.mark.parametrize("max_size", [0, -1])
def test_display_size_non_positive_max_size_is_full_size(max_size):
    assert display_size(3000, 4000, max_size) == (3000, 4000)


# -- encode_segment_indices -------------------------------------------------------------------


def test_encode_segment_indices_marks_listed_segments_in_order():
    seg = np.array(
        [
            [0, 5, 5, 9],
            [7, 5, 9, 9],  # 7 is not listed
            [0, 0, 9, 7],
        ],
        dtype=np.int64,
    )
    # Index = position in the given list + 1, not the id order.
    indices = decode_indices(encode_segment_indices(seg, [9, 5], (3, 4)))
    expected = np.array([[0, 2, 2, 1], [0, 2, 1, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(indices, expected)


def test_encode_segment_indices_without_segments_is_all_void():
    seg = np.full((2, 3), 4, dtype=np.int64)
    indices = decode_indices(encode_segment_indices(seg, [], (2, 3)))
    assert indices.shape == (2, 3) and not indices.any()


def test_encode_segment_indices_large_ids():
    # COCO panoptic colour ids reach 2^24.
    seg = np.array([[5_000_123, 5_000_124, 0], [12, 5_000_123, 16_777_215]], dtype=np.int64)
    indices = decode_indices(encode_segment_indices(seg, [16_777_215, 5_000_123, 12], (2, 3)))
    np.testing.assert_array_equal(indices, [[2, 0, 0], [3, 2, 1]])


def test_encode_segment_indices_many_segments_use_green_and_blue():
    # More than 255 segments: the index spills over into G (R + 256 G).
    seg = np.arange(1, 301, dtype=np.int64).reshape(15, 20)
    ids = list(range(300, 0, -1))
    indices = decode_indices(encode_segment_indices(seg, ids, (15, 20)))
    np.testing.assert_array_equal(indices, 301 - seg)


def test_encode_segment_indices_nearest_downscale_keeps_valid_indices():
    # A map of constant 2 x 2 blocks: whichever pixel of a block nearest-neighbour picks, the
    # half-size map is the block values; no index is ever blended.
    rng = np.random.default_rng(0)
    blocks = rng.choice([0, 3, 77, 5_000_123], size=(6, 8))  # 77: not listed
    seg = np.kron(blocks, np.ones((2, 2), dtype=np.int64))
    full = decode_indices(encode_segment_indices(seg, [5_000_123, 3], (12, 16)))
    expected_full = np.select([seg == 5_000_123, seg == 3], [1, 2], 0)
    np.testing.assert_array_equal(full, expected_full)
    half = decode_indices(encode_segment_indices(seg, [5_000_123, 3], (6, 8)))
    assert half.shape == (6, 8)
    np.testing.assert_array_equal(half, expected_full[::2, ::2])
    # Any size: only valid indices (0, 1, 2).
    odd = decode_indices(encode_segment_indices(seg, [5_000_123, 3], (5, 7)))
    assert odd.shape == (5, 7)
    assert set(np.unique(odd)) <= {0, 1, 2}


# -- grounded_pieces ---------------------------------------------------------------------------

TEXT = "A red car next to a tree."


def _joined(pieces):
    return "".join(p["text"] for p in pieces)


def test_grounded_pieces_cut_text_into_phrases_and_plain_text():
    phrases = [
        {"start": 20, "end": 24, "segment_ids": [9, 42]},  # 42 is not shown
        {"start": 2, "end": 9, "segment_ids": [5], "extra": "ignored"},
    ]
    pieces = grounded_pieces(TEXT, phrases, known_ids=[5, 9])
    assert pieces == [
        {"text": "A ", "segments": []},
        {"text": "red car", "segments": [5], "phrase": True},
        {"text": " next to a ", "segments": []},
        {"text": "tree", "segments": [9], "phrase": True},
        {"text": ".", "segments": []},
    ]
    assert _joined(pieces) == TEXT


def test_grounded_pieces_phrase_of_unknown_segments_has_none():
    pieces = grounded_pieces(TEXT, [{"start": 0, "end": 9, "segment_ids": [42]}], [5])
    assert pieces[0] == {"text": "A red car", "segments": [], "phrase": True}
    # No ids at all (None / missing) is a phrase naming nothing, not an error.
    for phrase in ({"start": 0, "end": 1, "segment_ids": None}, {"start": 0, "end": 1}):
        assert grounded_pieces(TEXT, [phrase], [5])[0]["segments"] == []


def test_grounded_pieces_overlapping_phrase_is_plain_text():
    phrases = [
        {"start": 2, "end": 9, "segment_ids": [5]},  # "red car"
        {"start": 6, "end": 13, "segment_ids": [9]},  # "car nex": overlaps it
        {"start": 2, "end": 5, "segment_ids": [9]},  # "red": same start, shorter
    ]
    pieces = grounded_pieces(TEXT, phrases, [5, 9])
    assert _joined(pieces) == TEXT
    assert [(p["text"], p["segments"]) for p in pieces if p.get("phrase")] == [("red car", [5])]


@pytest.mark.parametrize(
    "phrase",
    [
        {"start": 20, "end": 99, "segment_ids": [5]},  # past the end
        {"start": -1, "end": 3, "segment_ids": [5]},
        {"start": 4, "end": 4, "segment_ids": [5]},  # empty
        {"start": 6, "end": 2, "segment_ids": [5]},  # reversed
        {"end": 3, "segment_ids": [5]},  # no start
        {"start": "x", "end": 3, "segment_ids": [5]},
        {"start": None, "end": 3, "segment_ids": [5]},
        None,
        "2:9",
        [2, 9],
    ],
)
def test_grounded_pieces_bad_phrase_is_plain_text(phrase):
    pieces = grounded_pieces(TEXT, [phrase, {"start": 0, "end": 1, "segment_ids": [5]}], [5])
    assert pieces == [
        {"text": "A", "segments": [5], "phrase": True},
        {"text": " red car next to a tree.", "segments": []},
    ]


@pytest.mark.parametrize("segment_ids", [[None], ["car"], 5])
def test_grounded_pieces_malformed_segment_ids_do_not_raise(segment_ids):
    pieces = grounded_pieces(TEXT, [{"start": 2, "end": 9, "segment_ids": segment_ids}], [5])
    assert _joined(pieces) == TEXT


def test_grounded_pieces_every_character_exactly_once():
    rng = np.random.default_rng(3)
    text = "Two dogs play on the grass beside a small red ball, under a tree."
    for _ in range(50):
        phrases = []
        for _ in range(rng.integers(0, 6)):
            start, end = sorted(rng.integers(-3, len(text) + 3, size=2).tolist())
            phrases.append({"start": start, "end": end, "segment_ids": [1, 2, 3]})
        pieces = grounded_pieces(text, phrases, [2])
        assert _joined(pieces) == text
        assert all(p["text"] for p in pieces)
        assert all(p["segments"] in ([], [2]) for p in pieces)


def test_grounded_pieces_empty_text():
    assert grounded_pieces("", [{"start": 0, "end": 1, "segment_ids": [1]}], [1]) == []


# -- panoptic_caption_pieces -----------------------------------------------------------------


def test_panoptic_caption_pieces_phrase_and_box_literal_share_the_box():
    text = "The woman [[0.307, 0.213, 0.743, 0.886]] holds a dog [[0.1, 0.5, 0.3, 0.9]]."
    pieces = panoptic_caption_pieces(text, 100, 200)
    assert "".join(p["text"] for p in pieces) == text
    woman = [0.307, 0.213, 0.743, 0.886]
    dog = [0.1, 0.5, 0.3, 0.9]
    assert pieces == [
        {"text": "The woman", "box": 0, "xyxy": woman},
        {"text": " ", "box": None},
        {"text": "[[0.307, 0.213, 0.743, 0.886]]", "box": 0, "xyxy": woman, "literal": True},
        {"text": " ", "box": None},
        {"text": "holds a dog", "box": 1, "xyxy": dog},
        {"text": " ", "box": None},
        {"text": "[[0.1, 0.5, 0.3, 0.9]]", "box": 1, "xyxy": dog, "literal": True},
        {"text": ".", "box": None},
    ]


def test_panoptic_caption_pieces_pixel_box_is_normalised_by_width_and_height():
    text = "A cat [[10, 20, 50, 60]]"
    pieces = panoptic_caption_pieces(text, 100, 200)  # height 100, width 200
    assert pieces[0] == {"text": "A cat", "box": 0, "xyxy": [0.05, 0.2, 0.25, 0.6]}
    assert pieces[-1]["literal"] and pieces[-1]["xyxy"] == [0.05, 0.2, 0.25, 0.6]


@pytest.mark.parametrize(
    "literal, xyxy",
    [
        ("[[-0.2, 0.5, 1.3, 0.7]]", [0.0, 0.5, 1.0, 0.7]),  # normalised, clamped
        ("[[-10, 20, 250, 300]]", [0.0, 0.2, 1.0, 1.0]),  # pixels, clamped to the image
        ("[[0.8, 0.4, 0.2, 0.1]]", [0.2, 0.1, 0.8, 0.4]),  # corners swapped
        ("[[1e9, 0, 2e9, 5]]", [1.0, 0.0, 1.0, 0.05]),
        ("[[ 0.1 ,0.2,  0.3 , 0.4 ]]", [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_panoptic_caption_pieces_boxes_are_clamped_to_the_image(literal, xyxy):
    text = "a thing " + literal
    pieces = panoptic_caption_pieces(text, 100, 200)
    assert "".join(p["text"] for p in pieces) == text
    boxes = [p for p in pieces if p["box"] is not None]
    assert [p["text"] for p in boxes] == ["a thing", literal]
    for piece in boxes:
        assert piece["xyxy"] == pytest.approx(xyxy)
        assert all(0.0 <= v <= 1.0 for v in piece["xyxy"])


@pytest.mark.parametrize(
    "text",
    [
        "A cat [[1, 2, 3]] sits.",
        "A cat [[a, b, c, d]] sits.",
        "A cat [[0.1, 0.2, 0.3, 0.4] sits.",
        "A cat [0.1, 0.2, 0.3, 0.4] sits.",
        "No boxes at all.",
        "",
    ],
)
def test_panoptic_caption_pieces_malformed_boxes_stay_plain_text(text):
    pieces = panoptic_caption_pieces(text, 100, 200)
    assert "".join(p["text"] for p in pieces) == text
    assert all(p["box"] is None and "xyxy" not in p for p in pieces)


def test_panoptic_caption_pieces_malformed_box_ends_the_next_phrase():
    text = "a cat [[1, 2]] and a dog [[0.1, 0.2, 0.3, 0.4]]"
    pieces = panoptic_caption_pieces(text, 100, 200)
    assert "".join(p["text"] for p in pieces) == text
    assert [p["text"] for p in pieces if p["box"] == 0] == [
        "and a dog",
        "[[0.1, 0.2, 0.3, 0.4]]",
    ]
    assert pieces[0] == {"text": "a cat [[1, 2]] ", "box": None}


def test_panoptic_caption_pieces_box_without_phrase():
    text = "[[0.1, 0.2, 0.3, 0.4]], then [[0.5, 0.5, 0.6, 0.6]]"
    pieces = panoptic_caption_pieces(text, 10, 10)
    assert "".join(p["text"] for p in pieces) == text
    assert [(p["text"], p["box"]) for p in pieces if p.get("literal")] == [
        ("[[0.1, 0.2, 0.3, 0.4]]", 0),
        ("[[0.5, 0.5, 0.6, 0.6]]", 1),
    ]
    assert [p["text"] for p in pieces if p["box"] == 1 and not p.get("literal")] == ["then"]


# -- view_payload -----------------------------------------------------------------------------


def test_view_payload_lists_segments_with_their_fields():
    result = tiny_result()
    view = ImageView("Prediction", result, metadata=META, notes=["beam 3", 7])
    payload = view_payload(view, (12, 16), (12, 16))
    assert set(payload) == {"name", "notes", "masks", "segments", "grounded", "panoptic"}
    assert payload["name"] == "Prediction" and payload["notes"] == ["beam 3", "7"]
    assert payload["grounded"] is None and payload["panoptic"] is None
    colors = segment_colors(result.segments, META)
    # Segment 11 has no pixel: left out.
    assert payload["segments"] == [
        {
            "index": 1,
            "id": 5,
            "category": "car",
            "isthing": True,
            "score": pytest.approx(0.9),
            "box": [2, 1, 8, 5],
            "area": 24,
            "caption": "a red car",
            "color": list(colors[5]),
        },
        {
            "index": 2,
            "id": 9,
            "category": "road",
            "isthing": False,
            "score": pytest.approx(0.3),
            "box": [0, 6, 16, 12],
            "area": 96,
            "caption": "wet road",
            "color": [40, 160, 60],  # stuff keeps its class colour
        },
    ]
    indices = decode_indices(payload["masks"])
    np.testing.assert_array_equal(indices, np.select([result.panoptic_seg == 5,
                                                      result.panoptic_seg == 9], [1, 2], 0))


def test_view_payload_masks_at_display_size():
    payload = view_payload(ImageView("P", tiny_result()), (12, 16), (6, 8))
    indices = decode_indices(payload["masks"])
    assert indices.shape == (6, 8)
    assert set(np.unique(indices)) == {0, 1, 2}
    assert (indices[3:] == 2).all()  # the road's rows


def test_view_payload_min_score_leaves_low_segments_out():
    view = ImageView("Prediction", tiny_result(score_road=0.3), min_score=0.5)
    payload = view_payload(view, (12, 16), (12, 16))
    assert [s["id"] for s in payload["segments"]] == [5]
    indices = decode_indices(payload["masks"])
    assert (indices[6:] == 0).all()  # the road's pixels are void
    assert (indices[1:5, 2:8] == 1).all()
    # A ground truth without scores keeps every segment whatever min_score.
    seg = tiny_result().panoptic_seg
    gt = PanopticResult.from_panoptic(seg, [{"id": 5, "category_id": 0}], META)
    payload = view_payload(ImageView("GT", gt, min_score=0.5), (12, 16), (12, 16))
    assert [(s["id"], s["score"]) for s in payload["segments"]] == [(5, None)]


def test_view_payload_grounded_caption_names_shown_segments_only():
    grounded = {
        "text": "a red car on a wet road",
        "phrases": [
            {"start": 2, "end": 9, "segment_ids": [5]},
            {"start": 15, "end": 23, "segment_ids": [9]},
        ],
    }
    view = ImageView("P", tiny_result(), grounded_caption=grounded, min_score=0.5)
    payload = view_payload(view, (12, 16), (12, 16))
    phrases = [(p["text"], p["segments"]) for p in payload["grounded"] if p.get("phrase")]
    assert phrases == [("red car", [5]), ("wet road", [])]  # the road was filtered out


def test_view_payload_size_mismatch_names_the_view():
    view = ImageView("Ground truth", tiny_result())
    with pytest.raises(ValueError, match="Ground truth"):
        view_payload(view, (13, 16), (13, 16))


def test_view_payload_panoptic_caption_only():
    caption = "A cat [[10, 20, 50, 60]] sleeps."
    payload = view_payload(ImageView("Caption", panoptic_caption=caption), (100, 200), (50, 100))
    assert payload["masks"] is None and payload["segments"] == []
    assert payload["grounded"] is None
    assert "".join(p["text"] for p in payload["panoptic"]) == caption
    # Boxes are normalised by the original image's size, not the display size.
    assert payload["panoptic"][0]["xyxy"] == [0.05, 0.2, 0.25, 0.6]
