import pytest
import torch

from pix2cap.structures import ImageList, Instances, masks_to_boxes_xyxy


def _instances():
    inst = Instances((5, 6))
    inst.gt_classes = torch.tensor([3, 1, 4])
    inst.gt_captions = ["a", "b", "c"]
    inst.gt_masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    return inst


def test_instances_fields_and_length():
    inst = _instances()
    assert len(inst) == 3
    assert inst.image_size == (5, 6)
    assert inst.has("gt_classes") and not inst.has("gt_boxes")
    assert inst.get("gt_captions") == ["a", "b", "c"]
    assert torch.equal(inst.gt_classes, torch.tensor([3, 1, 4]))
    with pytest.raises(ValueError, match="length 2"):
        inst.gt_boxes = torch.zeros(2, 4)
    with pytest.raises(AttributeError, match="gt_scores"):
        inst.gt_scores
    inst.remove("gt_captions")
    assert sorted(inst.get_fields()) == ["gt_classes", "gt_masks"]
    assert len(Instances((2, 2))) == 0


def test_instances_indexing():
    inst = _instances()
    one = inst[1]
    assert len(one) == 1 and one.gt_captions == ["b"] and one.gt_classes.tolist() == [1]
    assert inst[-1].gt_captions == ["c"]
    assert inst[1:].gt_captions == ["b", "c"]
    picked = inst[torch.tensor([True, False, True])]
    assert picked.gt_captions == ["a", "c"] and picked.gt_classes.tolist() == [3, 4]
    reordered = inst[torch.tensor([2, 0])]
    assert reordered.gt_captions == ["c", "a"] and reordered.gt_classes.tolist() == [4, 3]
    assert reordered.gt_masks.shape == (2, 5, 6)
    with pytest.raises(IndexError):
        inst[3]


def test_instances_to_and_cat():
    inst = _instances()
    moved = inst.to(torch.float64)
    assert moved.gt_classes.dtype == torch.float64 and moved.gt_captions == ["a", "b", "c"]
    joined = Instances.cat([inst, inst[:1]])
    assert len(joined) == 4
    assert joined.gt_captions == ["a", "b", "c", "a"]
    assert joined.gt_classes.tolist() == [3, 1, 4, 3]
    with pytest.raises(ValueError, match="image sizes"):
        Instances.cat([inst, Instances((7, 7), gt_classes=torch.tensor([1]),
                                       gt_captions=["x"], gt_masks=torch.zeros(1, 7, 7))])


def test_image_list_pads_bottom_right():
    a = torch.full((3, 5, 7), 1.0)
    b = torch.full((3, 9, 4), 2.0)
    batch = ImageList.from_tensors([a, b], size_divisibility=8, pad_value=-1.0)
    assert batch.tensor.shape == (2, 3, 16, 8)
    assert batch.image_sizes == [(5, 7), (9, 4)]
    assert len(batch) == 2
    assert torch.all(batch.tensor[0, :, :5, :7] == 1.0)
    assert torch.all(batch.tensor[0, :, 5:, :] == -1.0)
    assert torch.all(batch.tensor[0, :, :, 7:] == -1.0)
    assert torch.all(batch.tensor[1, :, :9, :4] == 2.0)
    assert torch.equal(batch[1], b)
    assert batch.to(torch.float16).tensor.dtype == torch.float16


def test_image_list_single_and_no_divisibility():
    img = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    batch = ImageList.from_tensors([img])
    assert batch.tensor.shape == (1, 1, 3, 4)
    assert torch.equal(batch.tensor[0], img)
    batch = ImageList.from_tensors([img], size_divisibility=32)
    assert batch.tensor.shape == (1, 1, 32, 32) and batch.image_sizes == [(3, 4)]
    with pytest.raises(ValueError):
        ImageList.from_tensors([])


def test_masks_to_boxes():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[2, 4, 5] = True
    boxes = masks_to_boxes_xyxy(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[2, 1, 5, 3], [0, 0, 0, 0], [5, 4, 6, 5]]
    assert masks_to_boxes_xyxy(torch.zeros(0, 5, 6, dtype=torch.bool)).shape == (0, 4)
