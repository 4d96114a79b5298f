import numpy as np
import pytest
import torch

from pix2cap.data.transforms import (
    CropTransform,
    FixedSizeCrop,
    HFlipTransform,
    NoOpTransform,
    PadTransform,
    RandomFlip,
    ResizeScale,
    ResizeShortestEdge,
    ResizeTransform,
    TransformList,
    apply_augmentations,
    image_frame,
)
from pix2cap.structures import masks_to_boxes_xyxy


def _scene(height=48, width=64):
    """An image, a segment-id map with three rectangles, and their exact boxes."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    seg = np.zeros((height, width), dtype=np.int64)
    rects = {7: (5, 10, 25, 30), 9: (30, 2, 60, 20), 300000: (40, 25, 63, 47)}  # x1, y1, x2, y2
    for seg_id, (x1, y1, x2, y2) in rects.items():
        seg[y1:y2, x1:x2] = seg_id
    return image, seg, rects


def _mask_box(seg, seg_id):
    mask = torch.from_numpy(seg == seg_id)[None]
    return masks_to_boxes_xyxy(mask)[0].numpy()


def _check_boxes_follow_masks(transform, seg, rects):
    out_seg = transform.apply_segmentation(seg)
    checked = 0
    for seg_id, box in rects.items():
        if not (out_seg == seg_id).any():
            continue
        moved_box = transform.apply_box(np.array([box], dtype=np.float32))[0]
        assert np.abs(_mask_box(out_seg, seg_id) - moved_box).max() <= 1.0, (seg_id, transform)
        checked += 1
    return checked


@pytest.mark.parametrize("new_size", [(24, 32), (96, 128), (37, 51), (100, 30)])
def test_resize_keeps_boxes_and_masks_consistent(new_size):
    image, seg, rects = _scene()
    t = ResizeTransform(48, 64, *new_size)
    assert t.apply_image(image).shape == (*new_size, 3)
    out_seg = t.apply_segmentation(seg)
    assert out_seg.shape == new_size and out_seg.dtype == np.int64
    assert set(np.unique(out_seg)) <= {0, 7, 9, 300000}  # nearest: no blended ids
    assert _check_boxes_follow_masks(t, seg, rects) == 3


def test_image_and_segmentation_resized_with_the_same_alignment():
    seg = np.zeros((40, 40), dtype=np.int64)
    seg[7:29, 11:23] = 1
    image = np.repeat((seg * 255).astype(np.uint8)[..., None], 3, axis=2)
    t = ResizeTransform(40, 40, 97, 61)
    seg_mask = t.apply_segmentation(seg) == 1
    image_mask = t.apply_image(image)[..., 0] >= 128
    iou = (seg_mask & image_mask).sum() / (seg_mask | image_mask).sum()
    assert iou > 0.95


def test_masks_follow_segmentation():
    _, seg, _ = _scene()
    masks = np.stack([seg == 7, seg == 9], axis=0)
    t = TransformList([ResizeTransform(48, 64, 70, 90), HFlipTransform(90),
                       CropTransform(10, 5, 60, 50), PadTransform(14, 4)])
    out_masks = t.apply_masks(masks)
    out_seg = t.apply_segmentation(seg)
    assert out_masks.shape == (2, 64, 64) == (2, *t.output_size(48, 64))
    assert np.array_equal(out_masks[0], out_seg == 7)
    assert np.array_equal(out_masks[1], out_seg == 9)
    assert t.apply_masks(np.zeros((0, 48, 64), dtype=bool)).shape == (0, 64, 64)


def test_flip_twice_is_identity():
    image, seg, rects = _scene()
    flip = HFlipTransform(64)
    twice = TransformList([flip, flip])
    assert flip.flips_horizontally and not twice.flips_horizontally
    assert np.array_equal(twice.apply_image(image), image)
    assert np.array_equal(twice.apply_segmentation(seg), seg)
    boxes = np.array(list(rects.values()), dtype=np.float32)
    assert np.allclose(twice.apply_box(boxes), boxes)
    assert np.allclose(flip.apply_box(np.array([[5, 10, 25, 30]])), [[39, 10, 59, 30]])
    assert np.array_equal(flip.apply_image(image)[:, 0], image[:, -1])
    assert _check_boxes_follow_masks(flip, seg, rects) == 3


def test_fixed_size_crop_crops_then_pads():
    image, seg, rects = _scene()
    # Larger than the crop in width only: cropped horizontally, padded vertically.
    t = FixedSizeCrop((60, 40), pad_value=128, seg_pad_value=0).get_transform(
        image, np.random.default_rng(3)
    )
    out = t.apply_image(image)
    out_seg = t.apply_segmentation(seg)
    assert out.shape == (60, 40, 3) and out_seg.shape == (60, 40)
    assert np.all(out[48:] == 128) and np.all(out_seg[48:] == 0)
    x0 = t.transforms[0].x0
    assert 0 <= x0 <= 24
    assert np.array_equal(out[:48], image[:, x0 : x0 + 40])
    _check_boxes_follow_masks(t, seg, rects)
    # Smaller than the crop: pad only, image untouched at the top left.
    small = FixedSizeCrop(100).get_transform(image, np.random.default_rng(0))
    assert np.array_equal(small.apply_image(image)[:48, :64], image)
    assert small.output_size(48, 64) == (100, 100)


def test_lsj_pipeline_consistent_and_reproducible():
    image, seg, rects = _scene()
    augs = [RandomFlip(prob=0.5), ResizeScale(0.3, 2.0, 64, 64), FixedSizeCrop(64)]
    checked = flips = 0
    for seed in range(25):
        out, t = apply_augmentations(augs, image, np.random.default_rng(seed))
        assert out.shape == (64, 64, 3)
        assert t.apply_segmentation(seg).shape == (64, 64)
        checked += _check_boxes_follow_masks(t, seg, rects)
        flips += t.flips_horizontally
        again, t_again = apply_augmentations(augs, image, np.random.default_rng(seed))
        assert np.array_equal(out, again)
        assert np.array_equal(t.apply_segmentation(seg), t_again.apply_segmentation(seg))
    assert checked > 25  # most segments survive most crops
    assert 0 < flips < 25


def test_image_frame_places_the_output_in_the_original():
    # Resize 100 x 200 -> 50 x 100, crop 40 x 30 at (x 20, y 10): the crop's corners are
    # (x 40, y 20) and (x 100, y 100) original pixels.
    t = TransformList([ResizeTransform(100, 200, 50, 100), CropTransform(20, 10, 30, 40)])
    assert image_frame(t, (100, 200), (40, 30)) == pytest.approx((0.2, 0.2, 0.5, 1.0))
    # Shrunk to half and padded to twice its size: the output reaches beyond the original.
    t = TransformList([ResizeTransform(100, 200, 50, 100), PadTransform(50, 100)])
    assert image_frame(t, (100, 200), (100, 200)) == pytest.approx((0.0, 0.0, 2.0, 2.0))
    # A flip is kept (the captions are mirrored with it), so the frame is the same.
    t = TransformList([HFlipTransform(200), ResizeTransform(100, 200, 50, 100)])
    assert image_frame(t, (100, 200), (50, 100)) == (0.0, 0.0, 1.0, 1.0)
    assert image_frame(NoOpTransform(), (100, 200), (100, 200)) == (0.0, 0.0, 1.0, 1.0)
    # Points follow the pixels: a segment's box in the output, mapped through the frame,
    # is its box in the original (normalised).
    image, seg, rects = _scene()
    augs = [RandomFlip(prob=0.0), ResizeScale(1.5, 1.5, 64, 64), FixedSizeCrop(64)]
    _, t = apply_augmentations(augs, image, np.random.default_rng(1))
    x0, y0, x1, y1 = image_frame(t, (48, 64), (64, 64))
    out_box = _mask_box(t.apply_segmentation(seg), 7) / 64.0
    want = np.array(rects[7], dtype=np.float64) / [64, 48, 64, 48]
    got = [x0 + out_box[0] * (x1 - x0), y0 + out_box[1] * (y1 - y0)]
    assert np.abs(np.array(got) - want[:2]).max() < 0.03


def test_resize_scale_range():
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    aug = ResizeScale(0.5, 1.5, 200, 200)
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = aug.get_transform(image, rng)
        assert 50 <= t.new_w <= 300  # long side is scale * 200
        assert abs(t.new_h * 2 - t.new_w) <= 2  # aspect ratio kept


def test_resize_shortest_edge():
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    t = ResizeShortestEdge(800, 1333).get_transform(image)
    assert (t.new_h, t.new_w) == (800, 1067)
    wide = np.zeros((100, 400, 3), dtype=np.uint8)
    t = ResizeShortestEdge(800, 1333).get_transform(wide)
    assert (t.new_h, t.new_w) == (333, 1333)
    same = np.zeros((800, 900, 3), dtype=np.uint8)
    assert isinstance(ResizeShortestEdge(800, 1333).get_transform(same), NoOpTransform)


def test_random_flip_probabilities():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    assert isinstance(RandomFlip(prob=0.0).get_transform(image, rng), NoOpTransform)
    assert RandomFlip(prob=1.0).get_transform(image, rng).flips_horizontally
    vertical = RandomFlip(horizontal=False, prob=1.0).get_transform(image, rng)
    assert not vertical.flips_horizontally
    boxes = vertical.apply_box(np.array([[0, 0, 2, 1]]))
    assert np.allclose(boxes, [[0, 3, 2, 4]])
