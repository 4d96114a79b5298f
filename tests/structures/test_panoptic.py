"""PanopticResult: the typed view of one image's panoptic result, built from a real model
output; the COCO panoptic form and back; Metadata's class names and thing/stuff."""

import numpy as np
import pytest
import torch

from pix2cap.data.catalog import Metadata
from pix2cap.structures import PanopticResult, Segment, id2rgb, rgb2id
from tests.modeling.test_pix2cap import THING_IDS, tiny_model

# Contiguous 0, 1 are things (dataset ids 7, 9), 2 is stuff (dataset id 30).
META = Metadata(
    "panoptic_result_test",
    thing_classes=["circle", "square"],
    stuff_classes=["circle", "square", "grass"],
    thing_dataset_id_to_contiguous_id={7: 0, 9: 1},
    stuff_dataset_id_to_contiguous_id={7: 0, 9: 1, 30: 2},
)


@pytest.fixture(scope="module")
def model_run():
    """One image through a tiny random Pix2Cap that keeps every query, with the query
    features the caption head was given, in the order it was given them."""
    model = tiny_model(seed=1, object_mask_threshold=0.0, overlap_threshold=0.0).eval()
    with torch.no_grad():
        # No query may say "no object", so the image gets several segments.
        model.transformer_decoder.class_embed.bias[-1] = -20.0
    seen = {}
    model.transformer_decoder.register_forward_hook(
        lambda module, args, output: seen.update(query_features=output["query_features"])
    )
    generate = model.caption_head.generate

    def recording_generate(query_feats, global_feats=None, **kwargs):
        seen["captioned"] = query_feats
        return generate(query_feats, global_feats, **kwargs)

    model.caption_head.generate = recording_generate
    g = torch.Generator().manual_seed(4)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 70, "width": 60}])
    return output, seen


def test_result_from_a_model_output(model_run):
    output, seen = model_run
    ids, segments_info = output["panoptic_seg"]
    result = PanopticResult.from_model_output(output, META)
    assert result.image_size == (70, 60) and result.panoptic_seg.dtype == np.int64
    np.testing.assert_array_equal(result.panoptic_seg, ids.numpy())
    assert len(result) == len(segments_info) >= 2
    for segment, info in zip(result, segments_info):
        assert isinstance(segment, Segment)
        assert (segment.id, segment.category_id) == (info["id"], info["category_id"])
        assert segment.name == META.stuff_classes[segment.category_id]
        assert segment.isthing == (segment.category_id in THING_IDS)
        assert segment.score == pytest.approx(info["score"])
        assert segment.caption == info["caption"]
        mask = result.mask(segment.id)
        assert mask.shape == (70, 60) and segment.area == int(mask.sum()) > 0
        # The box measured on the map is the model's own.
        assert segment.bbox_xywh == info["bbox"]
        ys, xs = np.nonzero(mask)
        assert segment.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert segment.iscrowd is False
    assert result.segment(segments_info[0]["id"]) == result.segments[0]


def test_query_index_reaches_the_segments(model_run):
    output, seen = model_run
    result = PanopticResult.from_model_output(output, META)
    queries = [s.query_index for s in result]
    assert all(isinstance(q, int) for q in queries) and len(set(queries)) == len(queries)
    assert [info["query_index"] for info in output["panoptic_seg"][1]] == queries
    # Each segment's caption was decoded from the features of exactly that query.
    torch.testing.assert_close(seen["captioned"], seen["query_features"][0, queries].float())


def test_coco_panoptic_form_and_back(model_run):
    output, _ = model_run
    result = PanopticResult.from_model_output(output, META)
    rgb, infos = result.to_coco_panoptic(META)
    assert rgb.dtype == np.uint8 and rgb.shape == (70, 60, 3)
    np.testing.assert_array_equal(rgb2id(rgb), result.panoptic_seg)
    to_dataset = {0: 7, 1: 9, 2: 30}
    assert [i["category_id"] for i in infos] == [to_dataset[s.category_id] for s in result]
    assert PanopticResult.from_coco_panoptic(rgb, infos, META) == result
    # The decoded id map is accepted as well as the PNG's pixels.
    assert PanopticResult.from_coco_panoptic(rgb2id(rgb), infos, META) == result


def test_id2rgb_and_rgb2id_are_inverse():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 0xABCDEF, 0xFFFFFF]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[1, 2], [0xEF, 0xCD, 0xAB])
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError, match=r"\[0, 256\^3\)"):
        id2rgb(np.array([[256**3]]))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        rgb2id(np.zeros((2, 2), np.uint8))


def test_metadata_class_name_and_is_thing():
    assert META.class_name(2) == "grass" and META.class_name(0) == "circle"
    assert META.class_name(5) == "class 5"
    assert [META.is_thing(i) for i in range(3)] == [True, True, False]
    # Without the id maps: the first len(thing_classes) ids are things.
    plain = Metadata("no_maps", thing_classes=["circle"], stuff_classes=["circle", "sky"])
    assert [plain.is_thing(i) for i in range(3)] == [True, False, False]
    assert plain.class_name(1) == "sky"
    # Only thing names: they still name the things.
    things_only = Metadata("things_only", thing_classes=["circle", "square"])
    assert things_only.class_name(1) == "square" and things_only.class_name(2) == "class 2"
    # The map wins over the order of the class lists (a thing that is not listed first).
    mapped = Metadata(
        "mapped", stuff_classes=["sky", "cat"], thing_dataset_id_to_contiguous_id={17: 1}
    )
    assert (mapped.is_thing(0), mapped.is_thing(1)) == (False, True)
    empty = Metadata("empty")
    assert (empty.class_name(3), empty.is_thing(3)) == ("class 3", False)


def test_names_and_thing_stuff_come_from_the_metadata_only():
    seg = np.array([[1, 1, 2], [3, 3, 2]], dtype=np.int32)
    infos = [
        {"id": 1, "category_id": 0},
        {"id": 2, "category_id": 2, "isthing": True},  # the producer's word wins
        {"id": 3, "category_id": 1, "description": "a square", "iscrowd": 1},
    ]
    result = PanopticResult.from_panoptic(seg, infos, META, caption_key="description")
    assert [(s.name, s.isthing) for s in result] == [
        ("circle", True), ("grass", True), ("square", True)
    ]
    assert result.segments[2].caption == "a square" and result.segments[2].iscrowd
    bare = PanopticResult.from_panoptic(seg, infos)
    assert [(s.name, s.isthing) for s in bare] == [
        ("class 0", False), ("class 2", True), ("class 1", False)
    ]


def test_filter_captions_and_segments_without_pixels():
    seg = torch.tensor([[1, 1, 0], [2, 2, 0]], dtype=torch.int32)
    infos = [
        {"id": 1, "category_id": 0, "score": 0.9},
        {"id": 2, "category_id": 1, "score": torch.tensor(0.2)},
        {"id": 5, "category_id": 2},  # listed, but no pixel carries it
    ]
    result = PanopticResult.from_panoptic(seg, infos, META)
    absent = result.segment(5)
    assert (absent.area, absent.box, absent.bbox_xywh, absent.score) == (0, None, [0, 0, 0, 0], None)
    kept = result.filter(0.5)
    assert [s.id for s in kept] == [1, 5]  # a segment without a score is kept
    np.testing.assert_array_equal(kept.panoptic_seg, [[1, 1, 0], [0, 0, 0]])
    assert result.filter(0.1) is result
    infos_out = result.segments_info()
    assert infos_out[0]["bbox"] == [0, 0, 2, 1] and infos_out[0]["category_name"] == "circle"


def test_bad_inputs_are_refused_clearly():
    seg = np.array([[1, 2], [2, 1]])
    with pytest.raises(ValueError, match=r"segment id\(s\) \[2\] are listed more than once"):
        PanopticResult.from_panoptic(
            seg, [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1},
                  {"id": 2, "category_id": 2}]
        )
    with pytest.raises(ValueError, match=r"must be \[H, W\], got shape \(4,\)"):
        PanopticResult.from_panoptic(seg.ravel(), [{"id": 1, "category_id": 0}])
    with pytest.raises(ValueError, match=r"must be \[H, W\], got shape \(1, 2, 2\)"):
        PanopticResult(seg[None])
    with pytest.raises(TypeError, match="integer ids"):
        PanopticResult.from_panoptic(seg.astype(np.float32), [])
    with pytest.raises(ValueError, match="negative"):
        PanopticResult.from_panoptic(-seg, [])
    with pytest.raises(ValueError, match="VOID"):
        PanopticResult.from_panoptic(seg, [{"id": 0, "category_id": 0}])
    with pytest.raises(KeyError, match="segments_info\\[0\\] has no 'category_id'"):
        PanopticResult.from_panoptic(seg, [{"id": 1}])
    with pytest.raises(ValueError, match="segments_info is None"):
        PanopticResult.from_panoptic(seg, None)
    with pytest.raises(KeyError, match="no 'panoptic_seg'.*PANOPTIC_ON"):
        PanopticResult.from_model_output({"sem_seg": torch.zeros(1, 2, 2)})
    with pytest.raises(ValueError, match="listed more than once"):
        PanopticResult(seg, [Segment(1, 0, "a", True), Segment(1, 1, "b", True)])
    # COCO form: a category the metadata does not know, and metadata without the id maps.
    with pytest.raises(KeyError, match="category id 99 of segment 1"):
        PanopticResult.from_coco_panoptic(id2rgb(seg), [{"id": 1, "category_id": 99}], META)
    result = PanopticResult.from_panoptic(seg, [{"id": 1, "category_id": 0}], META)
    with pytest.raises(KeyError, match="maps no dataset category ids"):
        result.to_coco_panoptic(Metadata("no_maps", stuff_classes=["circle"]))
