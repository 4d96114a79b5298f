"""Visualizer: tinted segments, numbered labels on the segments, and the caption panel."""

import importlib.util
import os
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.data.catalog import Metadata
from pix2cap.data.detection_utils import read_panoptic_result
from pix2cap.data.errors import DatasetError
from pix2cap.structures import PanopticResult
from pix2cap.utils.visualizer import (
    MAX_HEIGHT,
    PANEL_BACKGROUND,
    Visualizer,
    _label_point,
    _load_font,
    draw_panoptic_result,
    draw_panoptic_seg,
    save_rgb_png,
    segment_colors,
    truncate_text,
    wrap_text,
)

REPO = Path(__file__).resolve().parents[2]

META = Metadata(
    "visualizer_test",
    thing_classes=["circle", "square"],
    stuff_classes=["circle", "square", "sky", "grass"],
    thing_colors=[[220, 20, 60], [0, 130, 200]],
    stuff_colors=[[220, 20, 60], [0, 130, 200], [135, 195, 235], [75, 135, 60]],
)
GREY = 100
H, W = 60, 80
PANEL = 300


def _scene():
    """Grey image; segment 3 (circle) on the left, 4 (square) top right, 7 (grass) bottom
    right, and a void column in between."""
    image = np.full((H, W, 3), GREY, dtype=np.uint8)
    seg = np.zeros((H, W), dtype=np.int64)
    seg[:, :36] = 3
    seg[:30, 40:] = 4
    seg[30:, 40:] = 7
    segments = [
        {"id": 3, "category_id": 0, "isthing": True, "score": 0.93, "caption": "a red circle"},
        {"id": 4, "category_id": 1, "isthing": True, "score": 0.71, "caption": "a blue square"},
        {"id": 7, "category_id": 3, "isthing": False, "score": 0.88, "caption": "green grass"},
    ]
    return image, seg, segments


def _segments(seg, segments, metadata=META):
    return PanopticResult.from_panoptic(seg, segments, metadata).segments


def _panel(out):
    return out[:, W:]


def _ink_pixels(region):
    """Pixels that differ from the panel background (text, swatches, the separator)."""
    return int(np.any(region != np.array(PANEL_BACKGROUND, dtype=np.uint8), axis=-1).sum())


def test_output_size_and_segment_tint():
    image, seg, segments = _scene()
    out = Visualizer(image, META, panel_width=PANEL, alpha=0.5).draw_panoptic_seg(seg, segments)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[1] == W + PANEL
    assert out.shape[0] >= H

    colors = segment_colors(_segments(seg, segments), META)
    # Pixels well inside each segment (away from the outline and the centred number).
    for (y, x), seg_id in (((5, 5), 3), ((4, 76), 4), ((56, 76), 7)):
        expected = np.round(0.5 * GREY + 0.5 * np.array(colors[seg_id], dtype=np.float64))
        np.testing.assert_allclose(out[y, x].astype(np.float64), expected, atol=1)
    # Void keeps the image.
    np.testing.assert_array_equal(out[10:50, 37], np.full((40, 3), GREY, dtype=np.uint8))
    # Stuff keeps its class colour; a thing is jittered per instance but stays close.
    assert colors[7] == (75, 135, 60)
    assert max(abs(a - b) for a, b in zip(colors[3], (220, 20, 60))) <= 48


def test_instances_of_one_class_get_different_colours():
    seg = np.arange(1, 6).reshape(1, 5)
    segments = _segments(seg, [{"id": i, "category_id": 0} for i in range(1, 6)])
    colors = segment_colors(segments, META)
    assert len(set(colors.values())) == 5
    # Reproducible: the jitter is seeded by the segment id.
    assert colors == segment_colors(segments, META)


def test_numbers_are_drawn_on_their_segments():
    image, seg, segments = _scene()
    out = Visualizer(image, META, panel_width=PANEL, alpha=0.5).draw_panoptic_seg(seg, segments)
    plain = Visualizer(image, META, panel_width=PANEL, alpha=0.5)._draw_segments(
        seg, []
    )  # no segments: the untouched image
    assert np.asarray(plain).shape == (H, W, 3)
    for seg_id in (3, 4, 7):
        x, y = _label_point(seg == seg_id)
        assert seg[y, x] == seg_id
        # The label box (number on the segment's colour, with an outline) changes the pixels
        # around that point from the flat tint.
        patch = out[max(y - 3, 0) : y + 4, max(x - 3, 0) : x + 4].reshape(-1, 3)
        assert len(np.unique(patch, axis=0)) > 2


def test_label_point_lies_on_a_ring_shaped_segment():
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    ring = (r > 18) & (r < 28)
    x, y = _label_point(ring)
    assert ring[y, x]  # the bbox centre (32, 32) would be in the hole


def test_caption_panel_has_text_and_wraps_long_captions():
    image, seg, segments = _scene()
    font_size = 12
    short = Visualizer(image, META, panel_width=PANEL, font_size=font_size).draw_panoptic_seg(
        seg, segments
    )
    assert _ink_pixels(_panel(short)[:, 1:]) > 200  # header, three entries, swatches

    long_segments = [dict(s) for s in segments]
    long_segments[0]["caption"] = ("a very long caption " * 15)[:300]
    long_segments[1]["caption"] = "x" * 300  # no space to break at
    out = Visualizer(image, META, panel_width=PANEL, font_size=font_size).draw_panoptic_seg(
        seg, long_segments
    )
    assert out.shape[1] == W + PANEL
    # Two 300-character captions need more lines than a 60-pixel-high image holds: the
    # canvas grows instead of clipping them.
    assert out.shape[0] > short.shape[0] and out.shape[0] > H
    assert _ink_pixels(_panel(out)[:, 1:]) > 2 * _ink_pixels(_panel(short)[:, 1:])
    # Nothing runs into the right margin or off the bottom.
    margin = max(6, font_size // 2)
    assert _ink_pixels(out[:, -(margin - 1) :]) == 0
    assert _ink_pixels(out[-(margin - 1) :, W + 1 :]) == 0
    # The padding below the image is plain.
    assert _ink_pixels(out[H:, :W]) == 0


def test_wrap_text_fits_width_and_keeps_every_character():
    font = _load_font(12)
    text = "word " * 40 + "y" * 300
    lines = wrap_text(text, font, 150)
    assert len(lines) > 10
    assert all(font.getlength(line) <= 150 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_truncate_text_cuts_at_a_word_with_an_ellipsis():
    assert truncate_text("short", 10) == "short"
    assert truncate_text("exactly10!", 10) == "exactly10!"
    assert truncate_text("a red circle on the grass", 20) == "a red circle on..."
    assert truncate_text("x" * 30, 10) == "xxxxxxx..."  # no space near the end: a hard cut
    assert truncate_text("x" * 30, None) == "x" * 30
    assert len(truncate_text("word " * 1000, 1000)) <= 1000


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@pytest.mark.parametrize("caption", [("a long caption " * 7000)[:100_000], "x" * 100_000])
def test_a_100k_character_caption_renders_fast_and_bounded(caption):
    image, seg, segments = _scene()
    long_segments = [dict(s) for s in segments]
    long_segments[0]["caption"] = caption
    vis = Visualizer(image, META, panel_width=PANEL, font_size=12)
    out, seconds = _timed(lambda: vis.draw_panoptic_seg(seg, long_segments))
    assert seconds < 1.0  # about 0.05 s; wrapping was quadratic (55 s for 50k characters)
    assert out.shape[0] <= MAX_HEIGHT and out.shape[1] == W + PANEL
    # What is drawn is the caption cut to max_caption_chars (1000) with "...".
    cut = [dict(s) for s in long_segments]
    cut[0]["caption"] = truncate_text(caption, 1000)
    assert cut[0]["caption"].endswith("...") and len(cut[0]["caption"]) <= 1000
    np.testing.assert_array_equal(out, vis.draw_panoptic_seg(seg, cut))

    # Without the character cut, the panel stops at max_height with a note; still fast.
    uncut = Visualizer(image, META, panel_width=PANEL, font_size=12, max_caption_chars=None,
                       max_height=400)
    out, seconds = _timed(lambda: uncut.draw_panoptic_seg(seg, long_segments))
    assert seconds < 1.0 and out.shape[0] <= 400
    assert _ink_pixels(out[-5:, W + 1 :]) == 0  # a clean bottom margin: nothing overflows

    # The grounded-caption band is bounded the same way.
    result = PanopticResult.from_panoptic(seg, segments, META)
    grounded = {"text": caption, "phrases": [{"start": 0, "end": 500, "segment_ids": [3]}]}
    out, seconds = _timed(lambda: uncut.draw_panoptic_result(result, grounded))
    assert seconds < 1.0 and out.shape[0] <= 400 + 2 * uncut.line_height


def test_panel_leaves_out_entries_past_max_height_with_a_note():
    image, seg, segments = _scene()
    long_segments = [dict(s, caption="many words " * 40) for s in segments]
    full = Visualizer(image, META, panel_width=PANEL, font_size=12).draw_panoptic_seg(
        seg, long_segments
    )
    assert full.shape[0] > 200
    bounded_vis = Visualizer(image, META, panel_width=PANEL, font_size=12, max_height=200)
    bounded = bounded_vis.draw_panoptic_seg(seg, long_segments)
    assert bounded.shape[0] <= 200
    # The top of the panel is drawn as before; the rest is cut.
    top = 60
    np.testing.assert_array_equal(bounded[:top, W:], full[:top, W:])
    assert not np.array_equal(bounded[: bounded.shape[0]], full[: bounded.shape[0]])
    # The image itself is never cut: max_height below it is raised to it.
    tall = Visualizer(image, META, panel_width=PANEL, scale=4, max_height=100)
    assert tall.max_height == 4 * H and tall.draw_panoptic_seg(seg, segments).shape[0] == 4 * H
    with pytest.raises(ValueError, match="max_caption_chars"):
        Visualizer(image, META, max_caption_chars=0)


def test_wrap_text_stops_after_max_lines():
    font = _load_font(12)
    lines, seconds = _timed(lambda: wrap_text("y" * 1_000_000, font, 150, max_lines=20))
    assert len(lines) == 21 and seconds < 0.5
    assert wrap_text("word " * 40, font, 150, max_lines=2) == wrap_text("word " * 40, font, 150)[:3]


def test_segments_without_caption_or_score():
    image, seg, segments = _scene()
    bare = [{"id": s["id"], "category_id": s["category_id"]} for s in segments]
    vis = Visualizer(image, META, panel_width=PANEL)
    out = vis.draw_panoptic_seg(seg, bare)
    assert out.shape[1] == W + PANEL and _ink_pixels(_panel(out)[:, 1:]) > 50
    # isthing comes from the metadata when absent; no score, no caption -> class name only.
    plain = _segments(seg, bare)
    assert [s.isthing for s in plain] == [True, True, False]
    assert vis._entry_text(1, plain[0]) == "1. circle"
    assert vis._entry_text(3, plain[2]) == "3. grass"
    full = _segments(seg, segments)
    assert vis._entry_text(2, full[1]) == "2. square (0.71): a blue square"
    crowd = _segments(seg, [{**segments[2], "iscrowd": 1}])
    assert vis._entry_text(1, crowd[0], visible=False) == (
        "1. grass [crowd] [no pixels] (0.88): green grass"
    )


def test_empty_segments_list_leaves_the_image_untouched():
    image, seg, _ = _scene()
    out = Visualizer(image, META, panel_width=PANEL).draw_panoptic_seg(np.zeros_like(seg), [])
    assert out.shape == (H, W + PANEL, 3)
    np.testing.assert_array_equal(out[:, :W], image)
    assert _ink_pixels(_panel(out)[:, 1:]) > 0  # the "0 segments" header


def test_tensor_input_scale_and_bad_shapes():
    image, seg, segments = _scene()
    out = draw_panoptic_seg(
        image, torch.from_numpy(seg).int(), segments, META, scale=2.0, panel_width=PANEL
    )
    assert out.shape[1] == 2 * W + PANEL and out.shape[0] >= 2 * H
    with pytest.raises(ValueError, match="panoptic_seg has shape"):
        draw_panoptic_seg(image, seg[:10], segments, META)
    with pytest.raises(ValueError, match="RGB image"):
        Visualizer(image[:, :, 0])
    with pytest.raises(ValueError, match="listed more than once"):
        draw_panoptic_seg(image, seg, segments + segments[:1], META)


def test_result_and_detectron2_form_draw_the_same_picture():
    image, seg, segments = _scene()
    result = PanopticResult.from_panoptic(seg, segments, META)
    np.testing.assert_array_equal(
        draw_panoptic_result(image, result, META, panel_width=PANEL),
        draw_panoptic_seg(image, seg, segments, META, panel_width=PANEL),
    )
    with pytest.raises(ValueError, match="panoptic_seg has shape"):
        draw_panoptic_result(image[:10], result, META)


GROUNDED_TEXT = "A red circle is left of a blue square. Green grass lies below a ghost."


def _grounded(text=GROUNDED_TEXT):
    """A grounded caption of the scene: the circle (3), the square (4), the grass (7), and a
    phrase without a segment."""

    def phrase(words, ids):
        start = text.index(words)
        return {"phrase": words, "start": start, "end": start + len(words), "segment_ids": ids,
                "score": None}

    return {
        "text": text,
        "tagged": "(not drawn)",
        "phrases": [phrase("A red circle", [3]), phrase("a blue square", [4]),
                    phrase("Green grass", [7]), phrase("a ghost", [])],
    }


def _has_color(region, color):
    return bool(np.all(region == np.array(color, dtype=np.uint8), axis=-1).any())


def test_grounded_caption_is_drawn_under_the_image_in_segment_colours():
    image, seg, segments = _scene()
    result = PanopticResult.from_panoptic(seg, segments, META)
    vis = Visualizer(image, META, scale=4, panel_width=PANEL)
    before = vis.draw_panoptic_result(result)
    assert before.shape[0] == 4 * H  # the panel is shorter than the image
    np.testing.assert_array_equal(vis.draw_panoptic_result(result, None), before)

    out = vis.draw_panoptic_result(result, _grounded())
    # The canvas grew downward only; the image and the panel are drawn as before.
    assert out.shape[0] > before.shape[0] and out.shape[1] == before.shape[1]
    np.testing.assert_array_equal(out[: before.shape[0]], before)
    band = out[before.shape[0] :, : 4 * W]
    assert _ink_pixels(band) > 100
    colors = segment_colors(result.segments, META)
    for seg_id in (3, 4, 7):  # the colours of the segments' number labels
        assert _has_color(band, colors[seg_id]), seg_id
    # The circle's phrase opens the caption: its colour lies left of the square's.
    xs = {k: np.nonzero(np.all(band == colors[k], axis=-1))[1] for k in (3, 4)}
    assert xs[3].max() < xs[4].min()
    # Nothing is drawn right of the image: the panel rows below the image stay empty.
    assert _ink_pixels(out[before.shape[0] :, 4 * W + 1 :]) == 0


def test_grounded_caption_band_wraps_and_plain_phrases_use_the_text_colour():
    image, seg, segments = _scene()
    colors = segment_colors(_segments(seg, segments), META)
    vis = Visualizer(image, META, panel_width=PANEL)
    grounded = _grounded()
    wide = vis.draw_grounded_caption(grounded["text"], grounded["phrases"], colors, width=800)
    narrow = vis.draw_grounded_caption(grounded["text"], grounded["phrases"], colors)
    assert wide.shape[1] == 800 and narrow.shape[1] == W  # default: the image width
    assert narrow.shape[0] > wide.shape[0]  # wrapped to more lines
    assert all(_has_color(narrow, colors[k]) for k in (3, 4, 7))
    # A phrase without a segment, or with one not drawn, looks like the rest of the text.
    plain = vis.draw_grounded_caption(GROUNDED_TEXT, [], colors, width=800)
    unknown = [dict(p, segment_ids=[99]) for p in grounded["phrases"]]
    np.testing.assert_array_equal(
        vis.draw_grounded_caption(GROUNDED_TEXT, unknown, colors, width=800), plain
    )
    np.testing.assert_array_equal(
        vis.draw_grounded_caption(GROUNDED_TEXT, grounded["phrases"][3:], colors, width=800),
        plain,
    )
    # Offsets past the text are clipped; the first of several ids that has a colour counts.
    odd = [{"start": 0, "end": 10_000, "segment_ids": [99, 4]}]
    assert _has_color(vis.draw_grounded_caption("a square", odd, colors, width=200), colors[4])


def test_metadata_must_answer_class_names_itself():
    image, _, _ = _scene()
    with pytest.raises(TypeError, match="Metadata"):
        Visualizer(image, {"stuff_classes": ["circle"]})


def test_without_metadata_classes_are_numbered():
    image, seg, segments = _scene()
    vis = Visualizer(image, None, panel_width=PANEL)
    assert vis._entry_text(1, _segments(seg, segments, None)[2]).startswith("1. class 3 (0.88)")
    assert vis.draw_panoptic_seg(seg, segments).shape[1] == W + PANEL


def test_ground_truth_and_visualize_data_script(datasets_root, tmp_path):
    from pix2cap.data.catalog import DatasetCatalog, MetadataCatalog
    from pix2cap.data.datasets.shapes import generate_shapes

    generate_shapes(str(datasets_root / "shapes"), "train", num_images=3, image_size=64, seed=2)
    record = DatasetCatalog.get("shapes_train")[0]
    metadata = MetadataCatalog.get("shapes_train")
    spec = importlib.util.spec_from_file_location(
        "visualize_data", REPO / "tools" / "visualize_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    out = module.draw_record(record, metadata, panel_width=PANEL)
    assert out.shape[1] == 64 + PANEL
    # The description of a ground-truth segment is its caption.
    result = read_panoptic_result(record, metadata)
    first = record["segments_info"][0]
    assert result.segments[0].caption == first["description"]
    vis = Visualizer(np.zeros((64, 64, 3), np.uint8), metadata)
    assert vis._entry_text(1, result.segments[0]).endswith(first["description"])
    with pytest.raises(DatasetError, match="pan_seg_file_name"):
        read_panoptic_result({k: v for k, v in record.items() if k != "pan_seg_file_name"})
    with pytest.raises(DatasetError, match="is 64x64 .*is 32x32"):
        read_panoptic_result(record, metadata, image_size=(32, 32))

    written = module.main(
        Namespace(
            dataset="shapes_train", output=str(tmp_path / "vis"), num=2, scale=2.0, html=False
        )
    )
    assert [os.path.basename(p) for p in written] == ["000000.png", "000001.png"]
    picture = np.asarray(Image.open(written[0]))
    assert picture.shape[1] > 128 and picture.shape[0] >= 128


def test_save_rgb_png_round_trip(tmp_path):
    image, seg, segments = _scene()
    out = draw_panoptic_seg(image, seg, segments, META)
    path = tmp_path / "sub" / "vis.png"
    save_rgb_png(out, path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), out)
    assert os.listdir(path.parent) == ["vis.png"]  # no temporary file left behind
